import CSQLite
import EvdClient
import OrderedCollections

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One row SQLite changed, as the pre-update hook saw it.
///
/// Kept small (56 bytes, no allocation of its own in the common case): a transaction may record
/// millions of them, and they stay until it ends. The row images live in the capture's one byte
/// buffer; values are kept only while a table's shape is unknown, or for a key that is not the rowid.
struct RowChange {
    enum Operation: UInt8 { case insert, update, delete }
    /// The key when it is not the rowid, and the whole rows while the table's shape is unknown.
    var values: RowValues?
    /// The old rowid (update, delete) or the new one (insert).
    var rowid: Int64
    /// An update's new rowid (the same as `rowid` unless the update moved the row).
    var newRowid: Int64 = 0
    /// Where the row images start in `ChangeCapture.imageBytes`, when images are recorded and the
    /// shape is known: the row before the change (update, delete), `beforeCount` bytes, then the
    /// one after it (insert, update), `afterCount` bytes, in binary (`RowImage`). 0: no such image.
    var imageStart = 0
    var beforeCount: UInt32 = 0
    var afterCount: UInt32 = 0
    /// Index into `ChangeCapture.tables`.
    var table: Int32
    var unit: Int32
    /// The column names of the images: an index into `ChangeCapture.columnSets`.
    var columns: Int32 = -1
    /// Trigger depth: 0 for the statement's own changes (SQLite allows at most 1000).
    var depth: Int16
    var operation: Operation
    /// The key is `[rowid]` (the table's shape was known and says so).
    var keyIsRowid = false

    init(operation: Operation, table: Int32, depth: Int32, unit: Int32, rowid: Int64, newRowid: Int64) {
        self.operation = operation
        self.table = table
        self.depth = Int16(clamping: depth)
        self.unit = unit
        self.rowid = rowid
        self.newRowid = newRowid
    }

    /// The primary key values, in key order (old ones for update/delete), when recorded as values.
    var key: [JSONValue]? { self.values?.key }
    /// The whole row before the change (while the table's shape was unknown).
    var before: [JSONValue]? { self.values?.before }
    /// The whole row after the change (while the shape was unknown).
    var after: [JSONValue]? { self.values?.after }

    var beforeImage: Range<Int>? {
        self.beforeCount == 0 ? nil : self.imageStart..<(self.imageStart + Int(self.beforeCount))
    }

    var afterImage: Range<Int>? {
        let start = self.imageStart + Int(self.beforeCount)
        return self.afterCount == 0 ? nil : start..<(start + Int(self.afterCount))
    }
}

/// The values a `RowChange` keeps, out of line: most changes need none.
final class RowValues {
    let key: [JSONValue]?
    let before: [JSONValue]?
    let after: [JSONValue]?

    init(key: [JSONValue]?, before: [JSONValue]?, after: [JSONValue]?) {
        self.key = key
        self.before = before
        self.after = after
    }
}

/// A schema change that becomes a committed event (`create-table`, `drop-table`, `alter-table`,
/// `rename-table`).
struct SchemaChange: Sendable {
    let kind: EventKind
    let properties: JSONObject
}

/// Records the rows and schema changes one connection makes inside its transaction, so that they
/// can be published as committed events (PROTOCOL.md §6.5) once — and only if — it commits.
///
/// Rows come from SQLite's pre-update hook, which sees every change to a real table: the
/// statement's own, its triggers', foreign-key cascades and rows a `REPLACE` removes. Changes are
/// kept in order with marks for savepoints and for each statement, so a rolled-back savepoint or
/// a failed statement drops exactly its changes.
///
/// `@unchecked Sendable`: it belongs to one connection and shares its exclusive use (one thread
/// inside at a time, `SQLiteConnection`): the request running on the connection drives it, and
/// SQLite calls the hook (`record`) inside that request's `step`. Debug builds check that every
/// hook call comes from inside a use of the connection.
///
/// The hook is installed by `init` and registered with the connection, which keeps the capture
/// while the hook points at it and removes the hook when it closes.
final class ChangeCapture: @unchecked Sendable {
    enum Entry {
        case row(RowChange)
        case schema(SchemaChange)
    }

    /// Whether the hook records anything (someone wants committed events).
    var active = false
    /// Whether whole rows are recorded (a `rows: true` subscription wants the images).
    var images = false
    private(set) var entries: [Entry] = []
    /// The row images the hook wrote (`RowChange.beforeImage`, `afterImage`), in memory of C's
    /// (`evd_append_preupdate_image` appends to it); emptied with the entries, at the end of the
    /// transaction, and freed with the capture.
    var imageBytes = evd_bytes(bytes: nil, count: 0, capacity: 0)
    private(set) var tables: [String] = []
    private var tableIndex: [String: Int32] = [:]
    private var shapes: [Int32: TableShape] = [:] {
        didSet { self.lastShape = nil }
    }
    /// The column names the recorded images use (`RowChange.columns`): each shape's, once it wrote
    /// an image. Emptied with the entries.
    private(set) var columnSets: [ColumnKeys] = []
    /// The column set of each table's current shape, once it has one (forgotten with the shapes).
    private var shapeColumns: [Int32: Int32] = [:] {
        didSet { self.lastShape = nil }
    }
    /// The shape and column set (-1: none yet) of the table the hook saw last, to skip two
    /// dictionary lookups per row for runs of one table.
    private var lastShape: (table: Int32, shape: TableShape?, columns: Int32)?
    /// The last table the hook saw, to skip the dictionary lookup for runs of one table.
    private var lastTable: (name: [CChar], index: Int32)?
    /// Statement units: each statement (or each executemany) is one; `intents[unit]` is its meaning.
    private var unit: Int32 = 0
    private(set) var intents: [Int32: StatementIntent] = [:]
    /// Whether the current unit's intent is a REPLACE (`intents[unit]?.replace`, asked per row).
    private var unitReplaces = false
    private var unitMark = 0
    private var unitTotalChanges: Int64 = 0
    /// Open savepoints (the client's and evd's own), innermost last, with where their changes start.
    private var savepoints: [(name: String, mark: Int)] = []
    /// The schema cookie the shapes were read at.
    private var shapesSchemaVersion: Int64 = -1
    /// Whether the database keeps text in UTF-8 (the default), read with the shapes: then the
    /// hook takes a text value's bytes as they are (`sqlite3_value_blob`), where reading it as
    /// text would first copy it to add a terminating NUL.
    private var textIsUTF8 = false

    private let connection: SQLiteConnection
    /// The connection's schema reads: the shapes come from there (read once per schema for the
    /// structured ops and the capture alike); the capture keeps them by table index for the hook,
    /// which must not run SQL.
    private let schema: SchemaCache

    deinit {
        free(self.imageBytes.bytes)
    }

    init(connection: SQLiteConnection, schema: SchemaCache) {
        self.connection = connection
        self.schema = schema
        let context = Unmanaged.passUnretained(self).toOpaque()
        sqlite3_preupdate_hook(
            connection.handle,
            { context, db, operation, database, table, oldRowid, newRowid in
                guard let context, let db, let database, let table else { return }
                let capture = Unmanaged<ChangeCapture>.fromOpaque(context).takeUnretainedValue()
                capture.record(db, operation, database, table, oldRowid, newRowid)
            },
            context
        )
        connection.installed(.preUpdate, owner: self)
    }

    /// Runs `body` with the hook recording nothing: evd's own rows (the journal, the two-phase
    /// markers) are not changes of the client's.
    func withoutRecording<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        let recording = self.active
        self.active = false
        defer { self.active = recording }
        return try body()
    }

    /// Whether nothing was recorded.
    var isEmpty: Bool { self.entries.isEmpty }

    /// How many row and schema changes were recorded.
    var recordedCount: Int { self.entries.count }

    // MARK: Units and savepoints

    /// Starts a statement's unit; its inserts are grouped by `intent`.
    func beginUnit(_ intent: StatementIntent) {
        guard self.active else { return }
        self.unit += 1
        if intent != .other { self.intents[self.unit] = intent }
        self.unitReplaces = intent.replace
        self.unitMark = self.entries.count
        self.unitTotalChanges = self.connection.totalChanges
    }

    /// Ends the current unit after its statement failed: SQLite undid the statement's changes unless
    /// it failed under `ON CONFLICT FAIL` (the rows before the failure stay), and everything when the
    /// error ended the transaction.
    func failUnit() {
        guard self.active else { return }
        if !self.connection.inTransaction {
            self.discardAll()
        } else if self.connection.totalChanges == self.unitTotalChanges {
            self.entries.removeSubrange(self.unitMark...)
        }
        self.intents.removeValue(forKey: self.unit)
        self.unitReplaces = false
    }

    /// Drops the current unit's changes: evd rolled its statement back (a vetoed column).
    func dropUnit() {
        guard self.active, self.unitMark < self.entries.count else { return }
        self.entries.removeSubrange(self.unitMark...)
    }

    /// Where the changes of a structured op start, to drop them if it fails.
    var mark: Int { self.entries.count }

    /// Drops every change since `mark` (a structured op failed and was rolled back).
    func truncate(to mark: Int) {
        if mark < self.entries.count { self.entries.removeSubrange(mark...) }
    }

    /// A new group number for `StatementIntent.group`.
    func newGroup() -> Int32 {
        self.unit += 1
        return self.unit
    }

    /// A savepoint opened.
    func savepoint(_ name: String) {
        self.savepoints.append((name.lowercased(), self.entries.count))
    }

    /// `RELEASE name`: the savepoint and the ones inside it end; their changes stay.
    func release(_ name: String) {
        if let index = self.savepoints.lastIndex(where: { $0.name == name.lowercased() }) {
            self.savepoints.removeSubrange(index...)
        }
    }

    /// `ROLLBACK TO name`: the changes since the savepoint are gone; the savepoint stays open.
    func rollback(to name: String) {
        guard let index = self.savepoints.lastIndex(where: { $0.name == name.lowercased() }) else { return }
        let mark = self.savepoints[index].mark
        self.savepoints.removeSubrange((index + 1)...)
        if mark < self.entries.count { self.entries.removeSubrange(mark...) }
    }

    /// The transaction ended without committing, or its events were taken.
    func discardAll() {
        self.entries.removeAll(keepingCapacity: self.entries.count < 4096)
        self.imageBytes.count = 0
        if self.imageBytes.capacity >= 1 << 20 {
            free(self.imageBytes.bytes)
            self.imageBytes = evd_bytes(bytes: nil, count: 0, capacity: 0)
        }
        self.columnSets.removeAll()
        self.shapeColumns.removeAll()
        self.intents.removeAll()
        self.unitReplaces = false
        self.savepoints.removeAll()
        self.unit = 0
        self.unitMark = 0
    }

    /// While set, an `alter-table` right after another of the same table joins it (one structured
    /// op that adds several columns is one alter, as in Datasette).
    var coalescesAlters = false

    /// Records a schema change of the current unit.
    func record(_ change: SchemaChange) {
        guard self.active else { return }
        if self.coalescesAlters, change.kind == .alterTable, case .schema(let last)? = self.entries.last,
            last.kind == .alterTable, last.properties["table"] == change.properties["table"]
        {
            var merged = last.properties
            merged["after_schema"] = change.properties["after_schema"]
            self.entries[self.entries.count - 1] = .schema(SchemaChange(kind: .alterTable, properties: merged))
        } else {
            self.entries.append(.schema(change))
        }
        // The columns of a table may have changed.
        self.shapes.removeAll()
        self.shapeColumns.removeAll()
        self.lastTable = nil
    }

    // MARK: The hook

    private func record(
        _ db: OpaquePointer,
        _ operation: Int32,
        _ database: UnsafePointer<CChar>,
        _ table: UnsafePointer<CChar>,
        _ oldRowid: Int64,
        _ newRowid: Int64
    ) {
        self.connection.exclusiveUse.assertInside()
        guard self.active, strcmp(database, "main") == 0, strncmp(table, "sqlite_", 7) != 0 else { return }
        let index = self.index(of: table)
        let op: RowChange.Operation
        switch operation {
        case SQLITE_INSERT: op = .insert
        case SQLITE_DELETE: op = .delete
        default: op = .update
        }
        var change = RowChange(
            operation: op,
            table: index,
            depth: sqlite3_preupdate_depth(db),
            unit: self.unit,
            rowid: op == .insert ? newRowid : oldRowid,
            newRowid: newRowid
        )
        if self.lastShape?.table != index { self.lastShape = (index, self.shapes[index], self.shapeColumns[index] ?? -1) }
        let shape = self.lastShape!.shape
        let count = Int(sqlite3_preupdate_count(db))
        if let shape, shape.columns.count == count {
            var key: [JSONValue]?
            // Only a REPLACE needs an insert's key: to tell the row it replaced from others it removed.
            if op != .insert || (self.unitReplaces && change.depth == 0) {
                if shape.keyIsRowid {
                    change.keyIsRowid = true  // `rowid` is the old one, or an insert's new one
                } else {
                    key = shape.keyColumns.map { Self.value(db, Int32($0), old: op != .insert) }
                }
            }
            var before: [JSONValue]?
            var after: [JSONValue]?
            if self.images {
                // The images, written out at once in binary: no value is kept for them. (After the
                // key: the images may read text as a blob.)
                let utf8: Int32 = self.textIsUTF8 ? 1 : 0
                let start = Int(self.imageBytes.count)
                let beforeCount: Int
                let afterCount: Int
                if op == .insert, change.depth == 0, let bound = self.bound, bound.table == index, self.textIsUTF8,
                    bound.columns.count == count, let written = self.appendBoundImage(bound, row: self.boundRow)
                {
                    (beforeCount, afterCount) = (0, written)
                } else {
                    (beforeCount, afterCount) = shape.reals.withUnsafeBufferPointer { reals in
                        let reals = reals.isEmpty ? nil : reals.baseAddress  // (an empty array's may not be nil)
                        let before = op == .insert ? 0 : evd_append_preupdate_image(db, Int32(count), 1, utf8, reals, &self.imageBytes)
                        let after =
                            op == .delete || before < 0
                            ? 0 : evd_append_preupdate_image(db, Int32(count), 0, utf8, reals, &self.imageBytes)
                        return (before, after)
                    }
                }
                if let beforeCount = UInt32(exactly: beforeCount), let afterCount = UInt32(exactly: afterCount) {
                    change.imageStart = start
                    change.beforeCount = beforeCount
                    change.afterCount = afterCount
                    if self.lastShape!.columns < 0 {
                        let set = self.columnSet(of: index, shape)
                        self.lastShape = (index, shape, set)
                    }
                    change.columns = self.lastShape!.columns
                } else {
                    // An image of 4 GiB or more (or no memory for it): kept as values instead.
                    self.imageBytes.count = start
                    if op != .insert { before = shape.realified(Self.values(db, count, old: true)) }
                    if op != .delete { after = shape.realified(Self.values(db, count, old: false)) }
                }
            }
            if key != nil || before != nil || after != nil {
                change.values = RowValues(key: key, before: before, after: after)
            }
        } else {
            // Whole rows: the key (and the images) are taken from them once the shape is known.
            change.values = RowValues(
                key: nil,
                before: op != .insert ? Self.values(db, count, old: true) : nil,
                after: op != .delete ? Self.values(db, count, old: false) : nil
            )
        }
        self.entries.append(.row(change))
    }

    private func index(of table: UnsafePointer<CChar>) -> Int32 {
        if let last = self.lastTable, last.name.withUnsafeBufferPointer({ strcmp($0.baseAddress!, table) == 0 }) {
            return last.index
        }
        let name = String(cString: table)
        let index = self.intern(name)
        self.lastTable = (Array(name.utf8CString), index)
        return index
    }

    /// The table's number in `tables`, adding it when it is new.
    func intern(_ name: String) -> Int32 {
        if let known = self.tableIndex[name] { return known }
        let index = Int32(self.tables.count)
        self.tables.append(name)
        self.tableIndex[name] = index
        return index
    }

    /// The column set (`columnSets`) of table `index`'s current shape.
    private func columnSet(of index: Int32, _ shape: TableShape) -> Int32 {
        if let known = self.shapeColumns[index] { return known }
        let set = Int32(self.columnSets.count)
        self.columnSets.append(ColumnKeys(shape.columns))
        self.shapeColumns[index] = set
        return set
    }

    /// The run being stepped, while `withBoundImages` runs.
    var bound: BoundImages?
    /// The row of `bound` being stepped (its index in the run).
    var boundRow = 0

    /// Bytes of the images the hook wrote; valid until the next image is written.
    func imageBytes(_ range: Range<Int>) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: self.imageBytes.bytes.map { $0 + range.lowerBound }, count: range.count)
    }

    private static func values(_ db: OpaquePointer, _ count: Int, old: Bool) -> [JSONValue] {
        (0..<Int32(count)).map { value(db, $0, old: old) }
    }

    private static func value(_ db: OpaquePointer, _ column: Int32, old: Bool) -> JSONValue {
        var value: OpaquePointer?
        let rc = old ? sqlite3_preupdate_old(db, column, &value) : sqlite3_preupdate_new(db, column, &value)
        guard rc == SQLITE_OK, let value else { return .null }
        return JSONValue(sqliteValue: value)
    }

    // MARK: Shapes

    /// Reads the shapes of `tables` that are not known yet (the schema may have changed since).
    /// Must not run inside the hook: it runs SQL on the connection.
    func loadShapes(of names: some Sequence<String>) {
        guard self.active else { return }
        // A deferred transaction that has read nothing yet must not read now: its snapshot would
        // predate the write lock it is about to take, and another writer's commit in between
        // would make its write fail with SQLITE_BUSY_SNAPSHOT. The hook records whole rows for a
        // table whose shape it does not know; the shapes are read at commit.
        guard sqlite3_txn_state(self.connection.handle, "main") != SQLITE_TXN_NONE else {
            self.shapes.removeAll()
            self.shapeColumns.removeAll()
            self.lastTable = nil
            self.shapesSchemaVersion = -1
            self.textIsUTF8 = false
            return
        }
        let version = (try? self.schema.version(self.connection)) ?? -1
        if version != self.shapesSchemaVersion {
            self.shapes.removeAll()
            self.shapeColumns.removeAll()
            self.lastTable = nil
            self.shapesSchemaVersion = version
            // Fixed once the database has a table (so for every table with a shape).
            self.textIsUTF8 = (try? self.connection.scalarText("PRAGMA main.encoding")) == "UTF-8"
        }
        for name in names {
            let index = self.intern(name)
            if self.shapes[index] == nil, let shape = try? self.schema.shape(of: name, self.connection) {
                self.shapes[index] = shape
            }
        }
    }

    /// The shape of table `index` (reading it if needed).
    func shape(_ index: Int32) -> TableShape? {
        if let shape = self.shapes[index] { return shape }
        guard let shape = try? self.schema.shape(of: self.tables[Int(index)], self.connection) else { return nil }
        self.shapes[index] = shape
        return shape
    }
}
