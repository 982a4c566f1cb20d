import CSQLite
import EvdClient
import OrderedCollections

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A prepared statement. Finalized when released.
///
/// `@unchecked Sendable`: in exclusive use with its connection (one thread inside at a time, as
/// `SQLiteConnection` says); `step`, `reset` and `rewind` enter the connection's `exclusiveUse`,
/// so debug builds check it.
public final class SQLiteStatement: @unchecked Sendable {
    let handle: OpaquePointer
    let connection: SQLiteConnection
    /// Where in the SQL text the next statement starts.
    public let tailOffset: Int
    /// Whether its connection keeps it for the next use of its text (`SchemaCache.cache`): it is
    /// reset after each run instead of finalized.
    var isCached = false

    init(handle: OpaquePointer, connection: SQLiteConnection, tailOffset: Int) {
        self.handle = handle
        self.connection = connection
        self.tailOffset = tailOffset
    }

    deinit {
        sqlite3_finalize(self.handle)
    }

    /// The statement's SQL text.
    public var sql: String { String(cString: sqlite3_sql(self.handle)) }
    /// Whether the statement makes no direct change to the database.
    public var isReadOnly: Bool { sqlite3_stmt_readonly(self.handle) != 0 }
    /// The number of result columns (0 for statements that return no rows).
    public var columnCount: Int { Int(sqlite3_column_count(self.handle)) }

    /// For a statement that writes and returns rows (`RETURNING`), which result columns are
    /// table columns of REAL affinity; empty for any other statement (and when there are none).
    /// `RETURNING` gives such a column's whole number as an integer, as the record keeps it, where
    /// a `SELECT` reads the real it is (`column` makes it one). Read at the first integer
    /// (`realsRead`), so that a `SELECT` pays a comparison or two per integer.
    private var realResultColumns: [Bool] = []
    private var realsRead = false

    /// Whether result column `index` is one of `realResultColumns`.
    private func isRealResultColumn(_ index: Int) -> Bool {
        if !self.realsRead {
            self.realsRead = true
            let count = sqlite3_column_count(self.handle)
            if count > 0, sqlite3_stmt_readonly(self.handle) == 0 {
                let flags = (0..<count).map { column in
                    sqlite3_column_decltype(self.handle, column).map { ColumnAffinity(declaredType: String(cString: $0)) == .real }
                        ?? false
                }
                if flags.contains(true) { self.realResultColumns = flags }
            }
        }
        return !self.realResultColumns.isEmpty && index < self.realResultColumns.count && self.realResultColumns[index]
    }

    /// The result column names.
    public var columnNames: [String] {
        (0..<Int32(self.columnCount)).map { String(cString: sqlite3_column_name(self.handle, $0)) }
    }
    /// The number of parameters the statement takes (the largest index).
    public var parameterCount: Int { Int(sqlite3_bind_parameter_count(self.handle)) }

    /// The name of parameter `index` (1-based) with its prefix (`:n`), or `nil` for `?`.
    public func parameterName(_ index: Int) -> String? {
        sqlite3_bind_parameter_name(self.handle, Int32(index)).map { String(cString: $0) }
    }

    /// Clears bindings and rewinds, ready for another set of parameters.
    public func reset() {
        self.connection.exclusiveUse.run {
            sqlite3_reset(self.handle)
            sqlite3_clear_bindings(self.handle)
        }
    }

    /// Rewinds, keeping the bindings: for a caller that binds every parameter again.
    func rewind() {
        self.connection.exclusiveUse.run { _ = sqlite3_reset(self.handle) }
    }

    /// Sets every parameter to NULL.
    func clearBindings() {
        sqlite3_clear_bindings(self.handle)
    }

    /// Binds a cell of `rows` to parameter `index` (1-based); its text from `text` (`rows.text`)
    /// where it lies, without a copy: `text` must stay where it is until the statement is stepped,
    /// and the parameter bound anew (or cleared) before `text` goes.
    func bind(_ cell: JSONRows.Cell, of rows: JSONRows, text: UnsafeBufferPointer<UInt8>, at index: Int32) throws(SQLiteError) {
        let rc: Int32
        switch cell.kind {
        case .null: rc = sqlite3_bind_null(self.handle, index)
        case .bool, .int: rc = sqlite3_bind_int64(self.handle, index, cell.int)
        case .double: rc = sqlite3_bind_double(self.handle, index, cell.double)
        case .text:
            let range = cell.textRange
            if range.isEmpty {
                rc = sqlite3_bind_text64(self.handle, index, "", 0, evd_sqlite_transient(), UInt8(SQLITE_UTF8))
            } else {
                let start = UnsafeRawPointer(text.baseAddress! + range.lowerBound).assumingMemoryBound(to: CChar.self)
                rc = sqlite3_bind_text64(self.handle, index, start, UInt64(range.count), nil, UInt8(SQLITE_UTF8))
            }
        case .other:
            try self.bind(rows.other(cell), at: Int(index))  // a blob {"$base64": ...}
            return
        }
        if rc != SQLITE_OK { throw self.connection.lastError(rc, sql: self.sql) }
    }

    /// Binds a JSON value to parameter `index` (1-based).
    public func bind(_ value: JSONValue, at index: Int) throws(SQLiteError) {
        let i = Int32(index)
        let rc: Int32
        switch value {
        case .null: rc = sqlite3_bind_null(self.handle, i)
        case .bool(let b): rc = sqlite3_bind_int64(self.handle, i, b ? 1 : 0)
        case .int(let n): rc = sqlite3_bind_int64(self.handle, i, n)
        case .double(let d): rc = sqlite3_bind_double(self.handle, i, d)
        case .string(let s):
            rc = self.bindText(s, at: i)
        case .object(let o) where o["$text_base64"] != nil:
            // TEXT whose bytes are not UTF-8 {"$text_base64": "..."} (`ValueForms`): those bytes.
            let bytes = ValueForms.textBytes(o) ?? []
            rc = bytes.withUnsafeBytes { raw in
                guard let start = raw.baseAddress, raw.count > 0 else { return self.bindText("", at: i) }
                return sqlite3_bind_text64(
                    self.handle,
                    i,
                    start.assumingMemoryBound(to: CChar.self),
                    UInt64(raw.count),
                    evd_sqlite_transient(),
                    UInt8(SQLITE_UTF8)
                )
            }
        case .object(let o) where o["$real"] != nil:
            rc = sqlite3_bind_double(self.handle, i, ValueForms.real(o) ?? .nan)  // (validated: a NaN binds NULL)
        case .object(let o):
            // Else the only object a parameter may be: a blob {"$base64": "..."}; callers validated it.
            let bytes = o["$base64"]?.stringValue.flatMap(Base64.decode) ?? []
            if bytes.isEmpty {
                rc = sqlite3_bind_zeroblob64(self.handle, i, 0)  // an empty blob, not NULL
            } else {
                rc = bytes.withUnsafeBytes { raw in
                    sqlite3_bind_blob64(self.handle, i, raw.baseAddress, UInt64(raw.count), evd_sqlite_transient())
                }
            }
        case .array, .number:
            rc = SQLITE_MISMATCH  // (an integer beyond 64 bits: `ValueForms` refuses it first)
        }
        if rc != SQLITE_OK { throw self.connection.lastError(rc, sql: self.sql) }
    }

    /// Binds an integer to parameter `index` (1-based).
    func bind(int value: Int64, at index: Int32) throws(SQLiteError) {
        let rc = sqlite3_bind_int64(self.handle, index, value)
        if rc != SQLITE_OK { throw self.connection.lastError(rc, sql: self.sql) }
    }

    /// Binds text to parameter `index` (1-based).
    func bind(text value: String, at index: Int32) throws(SQLiteError) {
        let rc = self.bindText(value, at: index)
        if rc != SQLITE_OK { throw self.connection.lastError(rc, sql: self.sql) }
    }

    /// Binds a string's UTF-8 bytes where they are (SQLite copies them), not through a C-string
    /// copy of its own as passing a `String` for a `char *` would make.
    private func bindText(_ value: String, at index: Int32) -> Int32 {
        var value = value
        return value.withUTF8 { bytes in
            // An empty string still needs a pointer: NULL would bind NULL, not ''.
            guard let base = bytes.baseAddress, !bytes.isEmpty else {
                return sqlite3_bind_text64(self.handle, index, "", 0, evd_sqlite_transient(), UInt8(SQLITE_UTF8))
            }
            let text = UnsafeRawPointer(base).assumingMemoryBound(to: CChar.self)
            return sqlite3_bind_text64(self.handle, index, text, UInt64(bytes.count), evd_sqlite_transient(), UInt8(SQLITE_UTF8))
        }
    }

    /// Binds bytes as a blob (`nil`: NULL) to parameter `index` (1-based).
    func bind(blob value: [UInt8]?, at index: Int32) throws(SQLiteError) {
        let rc: Int32
        if let value {
            rc = value.withUnsafeBytes { raw in
                sqlite3_bind_blob64(self.handle, index, raw.baseAddress, UInt64(raw.count), evd_sqlite_transient())
            }
        } else {
            rc = sqlite3_bind_null(self.handle, index)
        }
        if rc != SQLITE_OK { throw self.connection.lastError(rc, sql: self.sql) }
    }

    /// Column `index` of the current row as an integer.
    func int(at index: Int32) -> Int64 { sqlite3_column_int64(self.handle, index) }

    /// Whether column `index` of the current row is NULL.
    func isNull(at index: Int32) -> Bool { sqlite3_column_type(self.handle, index) == SQLITE_NULL }

    /// Column `index` of the current row as raw bytes (text or blob; NULL reads as empty), where
    /// SQLite keeps them: valid only until the statement steps, resets or is finalized.
    func rawBytes(at index: Int32) -> UnsafeBufferPointer<UInt8> {
        let blob = sqlite3_column_blob(self.handle, index)  // before `_bytes`, as SQLite asks
        let count = Int(sqlite3_column_bytes(self.handle, index))
        guard count > 0, let blob else { return UnsafeBufferPointer(start: nil, count: 0) }
        return UnsafeBufferPointer(start: blob.assumingMemoryBound(to: UInt8.self), count: count)
    }

    /// Advances to the next row: `true` for a row, `false` when done.
    public func step() throws(SQLiteError) -> Bool {
        let rc = self.connection.exclusiveUse.run { sqlite3_step(self.handle) }
        switch rc {
        case SQLITE_ROW: return true
        case SQLITE_DONE: return false
        default: throw self.connection.lastError(rc, sql: self.sql)
        }
    }

    /// Column `index` of the current row as a JSON value (blobs as `{"$base64": ...}`, text that
    /// is not UTF-8 as `{"$text_base64": ...}`; an infinite real is written `{"$real": ...}`).
    public func column(_ index: Int) -> JSONValue {
        let i = Int32(index)
        switch sqlite3_column_type(self.handle, i) {
        case SQLITE_INTEGER:
            let int = sqlite3_column_int64(self.handle, i)
            return self.isRealResultColumn(index) ? .double(Double(int)) : .int(int)
        case SQLITE_FLOAT:
            return .double(sqlite3_column_double(self.handle, i))
        case SQLITE_TEXT:
            let count = Int(sqlite3_column_bytes(self.handle, i))
            guard let text = sqlite3_column_text(self.handle, i) else { return .string("") }
            return JSONValue(text: UnsafeBufferPointer(start: text, count: count))  // not UTF-8: {"$text_base64": ...}
        case SQLITE_BLOB:
            let count = Int(sqlite3_column_bytes(self.handle, i))
            guard let blob = sqlite3_column_blob(self.handle, i) else { return ["$base64": ""] }
            let bytes = UnsafeRawBufferPointer(start: blob, count: count)
            return ["$base64": .string(Base64.encode(bytes))]
        default:
            return .null
        }
    }

    /// The current row as an array of JSON values.
    public func row() -> [JSONValue] {
        (0..<self.columnCount).map(self.column)
    }
}
