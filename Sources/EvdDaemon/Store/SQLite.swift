import OrderedCollections
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSQLite
import EvdClient

/// An error from SQLite: its extended result code, the code's name and SQLite's message.
public struct SQLiteError: Error, Sendable, CustomStringConvertible {
    /// The extended result code (`SQLITE_CONSTRAINT_UNIQUE` is 2067).
    public let extendedCode: Int32
    /// SQLite's message (`UNIQUE constraint failed: dogs.id`).
    public let message: String
    /// The statement that failed, when there was one.
    public let sql: String?

    /// The primary result code (`SQLITE_CONSTRAINT` is 19).
    public var primaryCode: Int32 { self.extendedCode & 0xff }
    /// The extended code's name, as `sqlite_code` reports it on the wire.
    public var codeName: String {
        sqliteResultCodeNames[self.extendedCode] ?? sqliteResultCodeNames[self.primaryCode] ?? "SQLITE_\(self.extendedCode)"
    }

    /// Whether the connection that raised this should be invalidated: it can no longer be trusted.
    public var invalidatesConnection: Bool {
        [SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_NOTADB, SQLITE_CANTOPEN, SQLITE_FULL].contains(self.primaryCode)
    }

    /// Whether this is a lock conflict another connection holds (the wire's `busy`).
    public var isBusy: Bool { self.primaryCode == SQLITE_BUSY || self.primaryCode == SQLITE_LOCKED }

    public init(code: Int32, message: String, sql: String? = nil) {
        self.extendedCode = code
        self.message = message
        self.sql = sql
    }

    public var description: String { "\(self.codeName): \(self.message)" }

    /// The error as the wire's error object `{code, message, sqlite_code}`.
    public var evdError: EvdError {
        EvdError(self.isBusy ? .busy : .sqlError, self.message, extra: ["sqlite_code": .string(self.codeName)])
    }
}

/// One SQLite connection (`sqlite3*`).
///
/// `@unchecked Sendable`: SQLite is opened with `SQLITE_OPEN_NOMUTEX` (multi-thread mode), which is
/// safe as long as one thread at a time uses the connection. The pool guarantees that: a connection
/// is checked out to exactly one session, and a session runs one request at a time.
public final class SQLiteConnection: @unchecked Sendable {
    let handle: OpaquePointer
    /// The path it was opened on.
    public let path: String

    /// SQLite's process-wide settings, made before the first connection opens (they cannot change
    /// once SQLite is initialized). Memory statistics are off: evd reads none, and keeping them
    /// takes a process-wide mutex on every allocation SQLite makes (several per row it reads,
    /// and per row image the pre-update hook takes).
    private static let configured: Void = {
        _ = evd_sqlite_config_memstatus(0)
    }()

    /// Opens `path` with `flags` (`SQLITE_OPEN_*`). With `SQLITE_OPEN_CREATE`, a database file that
    /// does not exist is created 0600 first (`DatabaseFiles.createPrivately`), whatever the umask.
    public init(path: String, flags: Int32) throws(SQLiteError) {
        Self.configured
        if flags & SQLITE_OPEN_CREATE != 0 { DatabaseFiles.createPrivately(path) }
        var db: OpaquePointer?
        let rc = sqlite3_open_v2(path, &db, flags | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE, nil)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { Self.message($0, code: rc) } ?? String(cString: sqlite3_errstr(rc))
            if let db { sqlite3_close_v2(db) }
            throw SQLiteError(code: rc, message: message)
        }
        sqlite3_extended_result_codes(db, 1)
        // On every connection, evd's own too: no writable_schema, no writes to shadow tables or
        // sqlite_dbpage (DEFENSIVE), no fts3_tokenizer() with a pointer (it crashed evd).
        _ = evd_sqlite_db_config_flag(db, SQLITE_DBCONFIG_DEFENSIVE, 1)
        _ = evd_sqlite_db_config_flag(db, SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, 0)
        _ = evd_sqlite_db_config_flag(db, SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0)
        self.handle = db
        self.path = path
    }

    deinit {
        sqlite3_close_v2(self.handle)
    }

    /// The current error as a `SQLiteError`.
    ///
    /// An I/O error's message gets the operating system's reason: SQLite's own is only "disk I/O
    /// error", which is all evd said when a full disk kept it from making a database's `-shm`
    /// file (`SQLITE_IOERR_SHMSIZE`) — SQLite reports ENOSPC as `SQLITE_FULL` ("database or disk
    /// is full") only for its database, journal and WAL files.
    func lastError(_ rc: Int32, sql: String? = nil) -> SQLiteError {
        let extended = sqlite3_extended_errcode(self.handle)
        let code = extended != 0 ? extended : rc
        return SQLiteError(code: code, message: Self.message(self.handle, code: code), sql: sql)
    }

    /// SQLite's message for `code` on `db`, with the operating system's reason for an I/O error
    /// or a file that could not be opened ("disk I/O error: No space left on device").
    private static func message(_ db: OpaquePointer, code: Int32) -> String {
        let message = String(cString: sqlite3_errmsg(db))
        let systemErrno = sqlite3_system_errno(db)
        guard code & 0xff == SQLITE_IOERR || code & 0xff == SQLITE_CANTOPEN, systemErrno != 0 else { return message }
        return message + ": " + String(cString: strerror(systemErrno))
    }

    /// Runs one or more statements that return no rows (pragmas, BEGIN, COMMIT).
    public func exec(_ sql: String) throws(SQLiteError) {
        let rc = sqlite3_exec(self.handle, sql, nil, nil, nil)
        if rc != SQLITE_OK { throw self.lastError(rc, sql: sql) }
    }

    /// The first column of the first row of `sql`, as an integer.
    func scalarInt(_ sql: String) throws(SQLiteError) -> Int64? {
        guard let statement = try self.prepare(SQLText(sql), from: 0), try statement.step() else { return nil }
        return statement.column(0).intValue
    }

    /// The first column of the first row of `sql`, as text.
    func scalarText(_ sql: String) throws(SQLiteError) -> String? {
        guard let statement = try self.prepare(SQLText(sql), from: 0), try statement.step() else { return nil }
        return statement.column(0).stringValue
    }

    /// Whether a transaction is open on this connection.
    public var inTransaction: Bool { sqlite3_get_autocommit(self.handle) == 0 }

    /// Sets how long a statement waits for a lock another connection holds.
    public func setBusyTimeout(milliseconds: Int32) {
        sqlite3_busy_timeout(self.handle, milliseconds)
    }

    /// The total rows changed by INSERT, UPDATE and DELETE (triggers included) since opening.
    public var totalChanges: Int64 { sqlite3_total_changes64(self.handle) }
    /// The rows changed by the most recent INSERT, UPDATE or DELETE.
    public var changes: Int64 { sqlite3_changes64(self.handle) }
    /// The rowid of the most recent successful INSERT; the pool sets it back to 0 at checkin, so a
    /// session never sees the rowid of another session's insert.
    public var lastInsertRowid: Int64 {
        get { sqlite3_last_insert_rowid(self.handle) }
        set { sqlite3_set_last_insert_rowid(self.handle, newValue) }
    }

    /// Prepares the first statement of `sql` starting at byte `offset`; returns `nil` when only
    /// whitespace and comments remain.
    public func prepare(_ sql: SQLText, from offset: Int) throws(SQLiteError) -> SQLiteStatement? {
        var result: Result<SQLiteStatement?, SQLiteError> = .success(nil)
        // Skip the whitespace before the statement, so that its text (the events' `statement`) starts
        // with the statement itself.
        var offset = offset
        while offset < sql.utf8.count - 1, sql.utf8[offset] == 32 || (9...13).contains(sql.utf8[offset]) { offset += 1 }
        sql.utf8.withUnsafeBufferPointer { buffer in
            let base = UnsafeRawPointer(buffer.baseAddress!).assumingMemoryBound(to: CChar.self)
            var stmt: OpaquePointer?
            var tail: UnsafePointer<CChar>?
            let rc = sqlite3_prepare_v3(
                self.handle, base + offset, Int32(buffer.count - 1 - offset), 0, &stmt, &tail)
            if rc != SQLITE_OK {
                result = .failure(self.lastError(rc, sql: sql.text))
                return
            }
            let end = tail.map { $0 - base } ?? (buffer.count - 1)
            guard let stmt else { return }  // nothing but whitespace or comments
            result = .success(SQLiteStatement(handle: stmt, connection: self, tailOffset: end))
        }
        return try result.get()
    }
}

/// SQL text kept as NUL-terminated UTF-8, so statements can be prepared one after another by offset.
public struct SQLText: Sendable {
    public let text: String
    /// The UTF-8 bytes followed by a NUL.
    let utf8: [UInt8]

    public init(_ text: String) {
        self.text = text
        self.utf8 = Array(text.utf8) + [0]
    }

    /// Whether only whitespace remains from `offset`.
    public func isBlank(from offset: Int) -> Bool {
        self.utf8[offset..<(self.utf8.count - 1)].allSatisfy { $0 == 32 || ($0 >= 9 && $0 <= 13) }
    }
}

/// A prepared statement. Finalized when released; used by one thread at a time, as its connection.
public final class SQLiteStatement: @unchecked Sendable {
    let handle: OpaquePointer
    let connection: SQLiteConnection
    /// Where in the SQL text the next statement starts.
    public let tailOffset: Int

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
        sqlite3_reset(self.handle)
        sqlite3_clear_bindings(self.handle)
    }

    /// Rewinds, keeping the bindings: for a caller that binds every parameter again.
    func rewind() {
        sqlite3_reset(self.handle)
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
                    self.handle, i, start.assumingMemoryBound(to: CChar.self), UInt64(raw.count), evd_sqlite_transient(),
                    UInt8(SQLITE_UTF8))
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
        let rc = sqlite3_step(self.handle)
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

/// Registers the authorizer observer a connection uses to learn what a statement does while it is prepared.
extension SQLiteConnection {
    /// Installs `observer` as this connection's authorizer; it sees every action of every prepare.
    public func setAuthorizer(_ observer: AuthorizerObserver) {
        let context = Unmanaged.passUnretained(observer).toOpaque()
        sqlite3_set_authorizer(
            self.handle,
            { context, action, first, second, database, _ in
                let observer = Unmanaged<AuthorizerObserver>.fromOpaque(context!).takeUnretainedValue()
                return observer.authorize(action, first, second, database)
            },
            context)
    }
}

/// Records what the statements being prepared do, as SQLite's authorizer reports them, and judges
/// a client's statements by its actor's policy.
///
/// SQLite calls the authorizer whenever it compiles a statement: when evd prepares it, and again
/// inside `sqlite3_step` when the schema changed since (another connection's DDL, say). Both are
/// judged: `judgingClientSQL` stays on while a client's statement is stepped, not only while it
/// is prepared, so that a statement recompiled with a trigger planted meanwhile is judged with it.
///
/// `@unchecked Sendable`: it belongs to one connection and is only touched by the thread using it.
public final class AuthorizerObserver: @unchecked Sendable {
    /// Whether a transaction-control statement (BEGIN, COMMIT, SAVEPOINT, ...) was prepared.
    public var sawTransactionControl = false
    /// Whether a client's statement is being prepared or stepped: then every compile is judged by
    /// `policy` and recorded (evd's own statements are neither).
    public var judgingClientSQL = false
    /// The execution-option pragma (`query_only`, `busy_timeout`) a client's statement tried to set,
    /// if any. evd sets those itself per session; a value set by raw SQL would outlive the session on
    /// the pooled connection (and bypass engine-wide options), so the prepare is denied.
    public var setExecutionOptionPragma: String?

    /// The tables of the main database a statement being prepared writes (its triggers' included).
    public var writtenTables: Set<String> = []
    /// The schema changes of the main database a statement being prepared makes.
    public var schemaActions: [SchemaAction] = []
    /// A table of evd's own (`_evd_journal`) that client SQL tried to change: denied.
    public var protectedTable: String?
    /// Who prepares client SQL, when they may not do everything: each action on a table is
    /// checked as it is compiled (`nil`: the actor holds every action).
    var policy: SQLPolicy?
    /// The veto listeners that rewrote the statement (or its request): it must stay within what
    /// each may see, besides the requester's `policy`.
    var rewriters: [SQLPolicy] = []
    /// What evd read of the client's statement before preparing it, for `policy` and `rewriters`.
    var facts = StatementFacts()
    /// Whether the statement being judged creates, drops or alters a schema object.
    private var changesSchema = false
    /// The action a policy refused while compiling, for the `permission_denied` error.
    var refused: (policy: SQLPolicy, action: Action, table: String?)?
    /// Whether client SQL left something on the connection that would outlive its session: a
    /// temporary table, view, index or trigger, an attached database, a pragma set. The pool closes
    /// such a connection when it comes back instead of handing it to the next session.
    public var leftSessionState = false

    /// Forgets what the last prepare recorded.
    func clearStatementRecord() {
        self.sawTransactionControl = false
        self.setExecutionOptionPragma = nil
        if !self.writtenTables.isEmpty { self.writtenTables.removeAll() }
        if !self.schemaActions.isEmpty { self.schemaActions.removeAll() }
        self.protectedTable = nil
        self.refused = nil
        self.changesSchema = false
    }

    /// The table an action changes (its rows, its schema, its indexes or triggers), if any.
    static func changedTable(
        _ action: Int32, _ first: UnsafePointer<CChar>?, _ second: UnsafePointer<CChar>?
    ) -> UnsafePointer<CChar>? {
        switch action {
        case SQLITE_INSERT, SQLITE_UPDATE, SQLITE_DELETE, SQLITE_DROP_TABLE, SQLITE_DROP_TEMP_TABLE: return first
        case SQLITE_ALTER_TABLE, SQLITE_CREATE_INDEX, SQLITE_CREATE_TRIGGER, SQLITE_DROP_INDEX, SQLITE_DROP_TRIGGER:
            return second
        default: return nil
        }
    }

    /// Pragmas that back execution options (`query_only`, `busy_timeout_ms`).
    static let executionOptionPragmas: Set<String> = ["query_only", "busy_timeout"]

    public init() {}

    /// Records `action` and answers SQLite's authorizer. Denying must happen here, not after the
    /// prepare: SQLite applies some pragmas (query_only among them) while preparing.
    func authorize(
        _ action: Int32, _ first: UnsafePointer<CChar>?, _ second: UnsafePointer<CChar>?, _ database: UnsafePointer<CChar>?
    ) -> Int32 {
        if action == SQLITE_TRANSACTION || action == SQLITE_SAVEPOINT { self.sawTransactionControl = true }
        guard self.judgingClientSQL else { return SQLITE_OK }
        self.noteSchemaChangeAndState(action, first, second)
        if let policy = self.policy,
            let (needed, table) = policy.refusal(action, first, second, facts: self.facts, changesSchema: self.changesSchema)
        {
            self.refused = (policy, needed, table)
            return SQLITE_DENY
        }
        for rewriter in self.rewriters {
            if let (needed, table) = rewriter.refusal(action, first, second, facts: self.facts, changesSchema: self.changesSchema) {
                self.refused = (rewriter, needed, table)
                return SQLITE_DENY
            }
        }
        if let table = Self.changedTable(action, first, second), strncmp(table, "_evd_", 5) == 0 {
            // The journal is evd's record of what committed: clients may read it, never change it.
            self.protectedTable = String(cString: table)
            return SQLITE_DENY
        }
        if let first {
            let inMain = database.map { strcmp($0, "main") == 0 } ?? false
            switch action {
            case SQLITE_INSERT, SQLITE_UPDATE, SQLITE_DELETE:
                if inMain && strncmp(first, "sqlite_", 7) != 0 { self.writtenTables.insert(String(cString: first)) }
            case SQLITE_ALTER_TABLE:
                // For ALTER TABLE, `first` is the database's name and `second` the table's.
                if strcmp(first, "main") == 0, let second {
                    self.schemaActions.append(SchemaAction(verb: .alter, kind: "table", name: String(cString: second)))
                }
            default:
                if inMain, let (verb, kind) = SchemaAction.described(by: action) {
                    self.schemaActions.append(SchemaAction(verb: verb, kind: kind, name: String(cString: first)))
                }
            }
        }
        // For SQLITE_PRAGMA, `first` is the pragma's name and `second` its argument (nil for a read).
        if action == SQLITE_PRAGMA, second != nil, let first {
            let name = String(cString: first).lowercased()
            if Self.executionOptionPragmas.contains(name) {
                self.setExecutionOptionPragma = name
                return SQLITE_DENY
            }
        }
        return SQLITE_OK
    }

    /// Notes a DDL action (`changesSchema`), and state that would outlive the session on this
    /// connection (`leftSessionState`).
    private func noteSchemaChangeAndState(_ action: Int32, _ first: UnsafePointer<CChar>?, _ second: UnsafePointer<CChar>?) {
        switch action {
        case SQLITE_CREATE_TEMP_TABLE, SQLITE_CREATE_TEMP_VIEW, SQLITE_CREATE_TEMP_INDEX, SQLITE_CREATE_TEMP_TRIGGER,
            SQLITE_ATTACH:
            self.leftSessionState = true
            self.changesSchema = true
        case SQLITE_CREATE_TABLE, SQLITE_CREATE_VIEW, SQLITE_CREATE_INDEX, SQLITE_CREATE_TRIGGER, SQLITE_DROP_TABLE,
            SQLITE_DROP_VIEW, SQLITE_DROP_INDEX, SQLITE_DROP_TRIGGER, SQLITE_DROP_TEMP_TABLE, SQLITE_DROP_TEMP_VIEW,
            SQLITE_DROP_TEMP_INDEX, SQLITE_DROP_TEMP_TRIGGER, SQLITE_ALTER_TABLE, SQLITE_CREATE_VTABLE, SQLITE_DROP_VTABLE:
            self.changesSchema = true
        case SQLITE_PRAGMA where second != nil:
            // A pragma with an argument sets something, unless it describes a table.
            if let first, !SQLPolicy.describingPragmas.contains(String(cString: first).lowercased()) {
                self.leftSessionState = true
            }
        default:
            break
        }
    }
}

/// A schema change a statement makes, as the authorizer reports it while the statement is prepared.
public struct SchemaAction: Sendable, Equatable {
    public enum Verb: Sendable { case create, drop, alter }
    public let verb: Verb
    /// `table`, `index`, `view` or `trigger` (PROTOCOL.md §6.4's `target.kind`).
    public let kind: String
    public let name: String

    /// The verb and kind of an authorizer action code that creates or drops a schema object in a
    /// persistent database (the temp ones are not reported: they are the connection's own).
    static func described(by action: Int32) -> (Verb, String)? {
        switch action {
        case SQLITE_CREATE_TABLE: return (.create, "table")
        case SQLITE_CREATE_INDEX: return (.create, "index")
        case SQLITE_CREATE_VIEW: return (.create, "view")
        case SQLITE_CREATE_TRIGGER: return (.create, "trigger")
        case SQLITE_DROP_TABLE: return (.drop, "table")
        case SQLITE_DROP_INDEX: return (.drop, "index")
        case SQLITE_DROP_VIEW: return (.drop, "view")
        case SQLITE_DROP_TRIGGER: return (.drop, "trigger")
        default: return nil
        }
    }
}
