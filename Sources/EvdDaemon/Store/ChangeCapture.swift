#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSQLite
import EvdClient
import OrderedCollections

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

/// A table's columns and primary key, as the committed events need them.
struct TableShape: Sendable {
    let columns: [String]
    /// Indexes into `columns` of the primary key, in key order; empty for a rowid table without one.
    let keyColumns: [Int]
    /// The key is the rowid (no declared key, or an `INTEGER PRIMARY KEY` alias).
    let keyIsRowid: Bool
    /// For each column, 1 when it has REAL affinity, else 0; empty when none has. SQLite keeps a
    /// whole number in such a column as an integer in the record, and the pre-update hook reads
    /// an inserted row from the record (`sqlite3_preupdate_new`), so the images make it a real
    /// again, as a `SELECT` reads it.
    var reals: [UInt8] = []

    /// `row` (as the hook read it) with the integers of REAL columns as the reals they are.
    func realified(_ row: [JSONValue]) -> [JSONValue] {
        guard !self.reals.isEmpty, row.count == self.reals.count else { return row }
        var row = row
        for index in row.indices where self.reals[index] != 0 {
            if case .int(let int) = row[index] { row[index] = .double(Double(int)) }
        }
        return row
    }
}

/// A column's type affinity, by SQLite's rules for its declared type (`sqlite3AffinityType`).
enum ColumnAffinity {
    case integer, text, blob, real, numeric

    init(declaredType: String) {
        let type = Array(declaredType.utf8)
        func has(_ word: StaticString) -> Bool { ChangeCapture.BoundColumn.contains(type, word) }
        if has("INT") {
            self = .integer
        } else if has("CHAR") || has("CLOB") || has("TEXT") {
            self = .text
        } else if has("BLOB") || type.isEmpty {
            self = .blob  // none: values are stored as they are
        } else if has("REAL") || has("FLOA") || has("DOUB") {
            self = .real
        } else {
            self = .numeric
        }
    }
}

/// A schema change that becomes a committed event (`create-table`, `drop-table`, `alter-table`,
/// `rename-table`).
struct SchemaChange: Sendable {
    let kind: EventKind
    let properties: JSONObject
}

/// A committed event as properties and JSON images: what a prepared transaction's log keeps
/// (`TwoPhase`), and how its events are published after a restart.
struct CommittedEvent: Sendable {
    let kind: EventKind
    var properties: JSONObject
    /// The row images as members that follow the properties, written out: `,"rows":[…]` or
    /// `,"before":{…},"after":{…}`.
    var images: [UInt8]?
}

/// A transaction's committed events, in order.
///
/// Those the capture recorded are not made all at once: a transaction of a million rows would
/// have a million events alive together. Instead this is a compact plan (a slot per event, the
/// grouped inserts made whole) over what the capture keeps anyway, and the events are made as
/// they are asked for, a chunk at a time, as runs (`publications(_:origin:wanted:)`): to journal
/// them before COMMIT, and again to publish them after it. So a big transaction's memory stays
/// about what its capture needs (see `PooledConnection.commit`). Valid until the capture is
/// discarded.
struct CommittedEvents {
    /// The capture the plan reads, or nil for events made already.
    private let capture: ChangeCapture?
    private let plan: CommittedEventPlan
    private let listed: [CommittedEvent]

    /// Events made already (a prepared transaction's, from its log).
    init(_ events: [CommittedEvent]) {
        self.capture = nil
        self.plan = CommittedEventPlan(database: "", images: false)
        self.listed = events
    }

    fileprivate init(capture: ChangeCapture, plan: CommittedEventPlan) {
        self.capture = capture
        self.plan = plan
        self.listed = []
    }

    var count: Int { self.capture == nil ? self.listed.count : self.plan.slots.count }

    var isEmpty: Bool { self.count == 0 }

    /// The catalog event of event `index`, without making the event.
    func kind(at index: Int) -> EventKind {
        guard let capture = self.capture else { return self.listed[index].kind }
        return capture.kind(of: self.plan.slots[index], in: self.plan)
    }

    /// The events of `range`, made for `origin`: runs of events that share their name and the
    /// start of their body (`EventRun`). Events of catalog events not in `wanted` are left
    /// unmade (`Publication.unwanted`): nobody would receive them.
    func publications(_ range: Range<Int>, origin: EventOrigin, wanted: UInt64 = .max) -> [Publication] {
        guard let capture = self.capture else {
            return self.listed[range].map { event in
                wanted & (1 << UInt64(event.kind.rawValue)) != 0
                    ? .entry(event.entry(origin: origin)) : .unwanted(event.kind, count: 1)
            }
        }
        return capture.publications(self.plan, range, origin: origin, wanted: wanted)
    }

    /// Every event as properties and JSON images (a prepared transaction's log keeps them).
    var all: [CommittedEvent] {
        guard self.capture != nil else { return self.listed }
        var events: [CommittedEvent] = []
        for publication in self.publications(0..<self.count, origin: .daemon) {
            guard case .run(let run) = publication else { continue }
            for index in 0..<run.count {
                var properties = run.properties(at: index)
                properties.removeValue(forKey: "session")
                properties.removeValue(forKey: "actor")
                var images: [UInt8]?
                if !run.imageRange(index).isEmpty {
                    var rendered: [UInt8] = []
                    run.images.withUnsafeBytes { bytes in
                        _ = RowImage.render(
                            event: UnsafeRawBufferPointer(rebasing: bytes[run.imageRange(index)]), kind: run.kind,
                            columns: run.columns, into: &rendered)
                    }
                    images = rendered
                }
                events.append(CommittedEvent(kind: run.kind, properties: properties, images: images))
            }
        }
        return events
    }
}

/// How a transaction's committed events are made from its capture (`ChangeCapture.committedEvents`).
struct CommittedEventPlan {
    /// A grouped `insert-rows` / `upsert-rows` (or one a structured insert reports without rows),
    /// made whole: its images are those of all its rows.
    struct Group {
        let kind: EventKind
        var properties: JSONObject
        /// The positions in the capture of its rows, when images are recorded.
        var rows: [Int]
        var count: Int
    }

    let database: String
    /// Whether the events carry row images.
    let images: Bool
    /// Per event, in order: the position of its entry in the capture (a schema change, an updated
    /// or deleted row), or `~index` of its group.
    var slots: [Int] = []
    var groups: [Group] = []
    /// The shapes of the tables changed, read once: the events are made twice, alike.
    var shapes: [Int32: TableShape?] = [:]
}

/// Records the rows and schema changes one connection makes inside its transaction, so that they
/// can be published as committed events (PROTOCOL.md §6.5) once — and only if — it commits.
///
/// Rows come from SQLite's pre-update hook, which sees every change to a real table: the
/// statement's own, its triggers', foreign-key cascades and rows a `REPLACE` removes. Changes are
/// kept in order with marks for savepoints and for each statement, so a rolled-back savepoint or
/// a failed statement drops exactly its changes.
///
/// `@unchecked Sendable`: it belongs to one connection and is only used by the thread using it.
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
    private var imageBytes = evd_bytes(bytes: nil, count: 0, capacity: 0)
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
            context)
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
        _ db: OpaquePointer, _ operation: Int32, _ database: UnsafePointer<CChar>, _ table: UnsafePointer<CChar>,
        _ oldRowid: Int64, _ newRowid: Int64
    ) {
        guard self.active, strcmp(database, "main") == 0, strncmp(table, "sqlite_", 7) != 0 else { return }
        let index = self.index(of: table)
        let op: RowChange.Operation
        switch operation {
        case SQLITE_INSERT: op = .insert
        case SQLITE_DELETE: op = .delete
        default: op = .update
        }
        var change = RowChange(
            operation: op, table: index, depth: sqlite3_preupdate_depth(db), unit: self.unit,
            rowid: op == .insert ? newRowid : oldRowid, newRowid: newRowid)
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
                key: nil, before: op != .insert ? Self.values(db, count, old: true) : nil,
                after: op != .delete ? Self.values(db, count, old: false) : nil)
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
    private func intern(_ name: String) -> Int32 {
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

    // MARK: Images from the values bound

    /// A structured insert's run of rows while it steps: the hook writes their after-images from
    /// the values bound (`appendBoundImage`) rather than reading each back from SQLite, which
    /// unpacks the row's whole record for it (most of what an image costs). Only where a value is
    /// stored as it was bound: see `BoundColumn`.
    struct BoundImages {
        /// The table's number in `tables`.
        let table: Int32
        /// For each of the table's columns, in order.
        let columns: [BoundColumn]
        /// The run's cells, `width` to a row, and the rows' text: where they lie while the run steps.
        let cells: UnsafeBufferPointer<JSONRows.Cell>
        let text: UnsafeBufferPointer<UInt8>
        let width: Int
    }

    /// A table column of an insert's run: where its value is in a row's cells, and which values
    /// SQLite stores as they are bound, or as a real. The column's affinity converts the others
    /// (text into an INTEGER column, a whole real into an INTEGER or NUMERIC one, a number into a
    /// TEXT one), and a NOT NULL or key column may turn a NULL into a default or a new rowid:
    /// those rows are read back from SQLite.
    struct BoundColumn {
        let key: Int
        let integer: Bool
        /// An integer is stored as a real (REAL affinity).
        let integerAsReal: Bool
        /// A real with a fraction is stored as it is.
        let real: Bool
        /// A whole real is stored as a real too (REAL affinity, or none).
        let wholeReal: Bool
        let text: Bool
        let null: Bool

        /// The column `info`, which takes the value at `key` of each row.
        init(_ info: ColumnInfo, key: Int) {
            self.key = key
            let affinity = ColumnAffinity(declaredType: info.type)
            self.integer = affinity == .integer || affinity == .numeric || affinity == .blob
            self.integerAsReal = affinity == .real
            self.real = affinity != .text
            self.wholeReal = affinity == .real || affinity == .blob
            self.text = affinity == .text || affinity == .blob
            self.null = !info.notNull && info.pk == 0
        }

        /// Whether `type` contains `word` (upper-case ASCII), ignoring ASCII case, as SQLite's
        /// `sqlite3AffinityType` compares.
        static func contains(_ type: [UInt8], _ word: StaticString) -> Bool {
            let n = word.utf8CodeUnitCount
            guard n <= type.count else { return false }
            let letters = UnsafeBufferPointer(start: word.utf8Start, count: n)
            for start in 0...(type.count - n) {
                var i = 0
                while i < n, type[start + i] & 0xDF == letters[i] { i += 1 }
                if i == n { return true }
            }
            return false
        }
    }

    /// The run being stepped, while `withBoundImages` runs.
    private var bound: BoundImages?
    /// The row of `bound` being stepped (its index in the run).
    var boundRow = 0

    /// Runs `body` (which steps the run's rows, setting `boundRow` before each) with the hook
    /// writing their after-images from `cells`. `columns`: `BoundColumn`s of `table`.
    func withBoundImages<T>(
        table: String, columns: [BoundColumn], cells: UnsafeBufferPointer<JSONRows.Cell>, text: UnsafeBufferPointer<UInt8>,
        width: Int, _ body: () throws -> T
    ) rethrows -> T {
        guard self.active, self.images else { return try body() }
        self.bound = BoundImages(table: self.intern(table), columns: columns, cells: cells, text: text, width: width)
        self.boundRow = 0
        defer { self.bound = nil }
        return try body()
    }

    /// Writes row `row` of `bound` as an after-image, as `evd_append_preupdate_image` would have
    /// read it back from SQLite; its length, or nil when a value would not be stored as bound.
    private func appendBoundImage(_ bound: BoundImages, row: Int) -> Int? {
        let first = row * bound.width
        guard first + bound.width <= bound.cells.count else { return nil }
        var textBytes = 0
        for column in bound.columns {
            let cell = bound.cells[first + column.key]
            switch cell.kind {
            case .null: if !column.null { return nil }
            case .int: if !column.integer && !column.integerAsReal { return nil }
            case .double:
                let value = cell.double
                if !column.real || !value.isFinite || (!column.wholeReal && value.rounded() == value) { return nil }
            case .text:
                if !column.text { return nil }
                textBytes += cell.textRange.count
            case .bool, .other: return nil
            }
        }
        guard evd_bytes_reserve(&self.imageBytes, 10 + bound.columns.count * 11 + textBytes) != 0 else { return nil }
        let start = self.imageBytes.bytes + Int(self.imageBytes.count)
        var at = start
        func byte(_ value: UInt8) {
            at.pointee = value
            at += 1
        }
        at = evd_write_varint(at, UInt64(bound.columns.count))
        for column in bound.columns {
            let cell = bound.cells[first + column.key]
            switch cell.kind {
            case .int where column.integer:
                byte(RowImage.integer)
                at = evd_write_varint(at, evd_zigzag(cell.int))
            case .int, .double:
                // (An integer here goes into a REAL column: SQLite reads it as this real.)
                let real = cell.kind == .int ? Double(cell.int) : cell.double
                byte(RowImage.real)
                withUnsafeBytes(of: real.bitPattern.littleEndian) { bits in
                    UnsafeMutableRawPointer(at).copyMemory(from: bits.baseAddress!, byteCount: 8)
                }
                at += 8
            case .text:
                byte(RowImage.text)
                let range = cell.textRange
                at = evd_write_varint(at, UInt64(range.count))
                if !range.isEmpty {
                    UnsafeMutableRawPointer(at).copyMemory(from: bound.text.baseAddress! + range.lowerBound, byteCount: range.count)
                    at += range.count
                }
            default:
                byte(RowImage.null)
            }
        }
        let written = at - start
        self.imageBytes.count += written
        return written
    }

    /// Bytes of the images the hook wrote; valid until the next image is written.
    private func imageBytes(_ range: Range<Int>) -> UnsafeRawBufferPointer {
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

    // MARK: The redo log of a prepared transaction

    /// Every row change recorded, in the order SQLite made them (triggers' and cascades' too), with
    /// whole rows, and the columns of each table changed: what re-applying the transaction after a
    /// crash takes (`TwoPhase`). `nil` when the transaction also changed the schema, which a redo
    /// log of rows cannot carry. Needs `images` on from the transaction's start.
    func redoLog() -> (changes: [RedoChange], columns: [String: [String]])? {
        var changes: [RedoChange] = []
        var columns: [String: [String]] = [:]
        for entry in self.entries {
            guard case .row(let change) = entry else { return nil }
            let table = self.tables[Int(change.table)]
            if columns[table] == nil { columns[table] = self.shape(change.table)?.columns ?? [] }
            changes.append(
                RedoChange(
                    table: table, operation: change.operation, rowid: change.rowid, newRowid: change.newRowid,
                    before: change.before ?? self.values(of: change.beforeImage),
                    after: change.after ?? self.values(of: change.afterImage)))
        }
        return (changes, columns)
    }

    /// A row image the hook wrote, read back as its values in column order (exact: integers and
    /// reals stay apart, and blobs are `{"$base64": ...}`).
    private func values(of image: Range<Int>?) -> [JSONValue]? {
        guard let image else { return nil }
        return RowImage.values(ofRow: self.imageBytes(image))
    }

    // MARK: Committed events

    /// The committed events of everything recorded, in order. Call just before COMMIT (the
    /// events are journaled inside the transaction), and `discardAll` once they are published:
    /// they are made from what the capture keeps, as they are asked for.
    ///
    /// Inserts a statement made directly are one `insert-rows` (or `upsert-rows`) per table, at the
    /// place of the first; updates and deletes are one event per row. A row a `REPLACE` removed to
    /// put the new row with the same key in its place is part of the insert, not a `delete-row`.
    func committedEvents(database: String) -> CommittedEvents {
        guard !self.entries.isEmpty || !self.intents.isEmpty else { return CommittedEvents([]) }
        let replacedKeys = self.replacedKeys()
        var plan = CommittedEventPlan(database: database, images: self.images)
        var groupKeys: [GroupKey] = []
        var groupIndex: [GroupKey: Int] = [:]
        var reportedUnits: Set<Int32> = []
        // Rows come in long runs of one statement and table: what the last row needed is kept.
        var lastGroup: (key: GroupKey, index: Int)?
        var lastUnit: (unit: Int32, intent: StatementIntent)?
        var lastShape: Int32?
        for (position, entry) in self.entries.enumerated() {
            guard case .row(let change) = entry else {
                plan.slots.append(position)
                continue
            }
            if lastShape != change.table {
                if plan.shapes.index(forKey: change.table) == nil { plan.shapes[change.table] = self.shape(change.table) }
                lastShape = change.table
            }
            var intent = StatementIntent.other
            if change.depth == 0 {
                if lastUnit?.unit != change.unit { lastUnit = (change.unit, self.intents[change.unit] ?? .other) }
                intent = lastUnit!.intent
            }
            switch change.operation {
            case .insert,
                .update where intent.kind == .upsert:
                let groupKey = GroupKey(unit: intent.group ?? change.unit, table: change.table, direct: change.depth == 0)
                if let index = lastGroup?.key == groupKey ? lastGroup!.index : groupIndex[groupKey] {
                    lastGroup = (groupKey, index)
                    plan.groups[index].count += 1
                    if plan.images { plan.groups[index].rows.append(position) }
                } else {
                    let kind: EventKind = intent.kind == .upsert ? .upsertRows : .insertRows
                    var properties: JSONObject = [
                        "database": .string(database), "table": .string(self.tables[Int(change.table)]), "num_rows": 0,
                    ]
                    if kind == .insertRows {
                        properties["ignore"] = .bool(intent.ignore)
                        properties["replace"] = .bool(intent.replace)
                    }
                    plan.slots.append(~plan.groups.count)
                    plan.groups.append(
                        CommittedEventPlan.Group(kind: kind, properties: properties, rows: plan.images ? [position] : [], count: 1))
                    groupKeys.append(groupKey)
                    groupIndex[groupKey] = plan.groups.count - 1
                    lastGroup = (groupKey, plan.groups.count - 1)
                    if change.depth == 0 { reportedUnits.insert(intent.group ?? change.unit) }
                }
            case .update, .delete:
                if change.operation == .delete, replacedKeys.contains(position) { continue }
                plan.slots.append(position)
            }
        }
        for index in plan.groups.indices {
            plan.groups[index].properties["num_rows"] = .integer(plan.groups[index].count)
        }
        // A structured insert reports the rows it was given, even those SQLite ignored.
        var reportedGroups: Set<Int32> = []
        for (unit, intent) in self.intents.sorted(by: { $0.key < $1.key }) {
            let unit = intent.group ?? unit
            guard let reported = intent.reportedRows, let table = intent.table, reportedGroups.insert(unit).inserted else { continue }
            if let group = groupKeys.firstIndex(where: { $0.unit == unit && $0.direct }) {
                plan.groups[group].properties["num_rows"] = .integer(reported)
            } else if !reportedUnits.contains(unit), intent.kind != .other {
                var properties: JSONObject = ["database": .string(database), "table": .string(table), "num_rows": .integer(reported)]
                if intent.kind == .insert {
                    properties["ignore"] = .bool(intent.ignore)
                    properties["replace"] = .bool(intent.replace)
                }
                plan.slots.append(~plan.groups.count)
                plan.groups.append(
                    CommittedEventPlan.Group(
                        kind: intent.kind == .upsert ? .upsertRows : .insertRows, properties: properties, rows: [], count: 0))
            }
        }
        return CommittedEvents(capture: self, plan: plan)
    }

    /// The catalog event of `plan`'s slot `slot`.
    fileprivate func kind(of slot: Int, in plan: CommittedEventPlan) -> EventKind {
        if slot < 0 { return plan.groups[~slot].kind }
        switch self.entries[slot] {
        case .schema(let change): return change.kind
        case .row(let change): return change.operation == .delete ? .deleteRow : .updateRow
        }
    }

    /// The events of `plan`'s slots `range`, made from what the capture keeps, as runs.
    ///
    /// Hot path (a million-row UPDATE makes a million `update-row`s): a row's event is its key
    /// written after the start its table's events share, and its images copied as the hook wrote
    /// them; nothing else is made per event.
    fileprivate func publications(
        _ plan: CommittedEventPlan, _ range: Range<Int>, origin: EventOrigin, wanted: UInt64
    ) -> [Publication] {
        var builder = RunBuilder(origin: origin, images: plan.images)
        var lastShape: (table: Int32, shape: TableShape?)?
        for slot in plan.slots[range] {
            let kind = self.kind(of: slot, in: plan)
            guard wanted & (1 << UInt64(kind.rawValue)) != 0 else {
                builder.skip(kind)
                continue
            }
            if slot < 0 {
                // A grouped insert: its properties, then all its rows' images.
                let group = plan.groups[~slot]
                builder.start(kind, table: -1) { _ in }
                builder.tail { tail in
                    Self.appendProperties(group.properties, to: &tail)
                    tail += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
                }
                if plan.images {
                    builder.image { image, columns in
                        RowImage.appendVarint(group.count == 0 ? 0 : group.rows.count, to: &image)
                        for position in group.rows {
                            guard case .row(let change) = self.entries[position] else { continue }
                            self.appendSlot(change.afterImage, change.after, change, plan, &columns, to: &image)
                        }
                    }
                } else {
                    builder.endEvent()
                }
                continue
            }
            switch self.entries[slot] {
            case .schema(let change):
                builder.start(kind, table: -1) { _ in }
                builder.tail { tail in
                    var properties: JSONObject = ["database": .string(plan.database)]
                    properties.merge(change.properties) { _, new in new }
                    Self.appendProperties(properties, to: &tail)
                    tail += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
                }
                builder.endEvent()
            case .row(let change):
                if lastShape?.table != change.table { lastShape = (change.table, plan.shapes[change.table] ?? nil) }
                let shape = lastShape!.shape
                builder.start(kind, table: change.table) { common in
                    JSONWriter.appendASCII(#","database":"#, to: &common)
                    JSONWriter.appendString(plan.database, to: &common)
                    JSONWriter.appendASCII(#","table":"#, to: &common)
                    JSONWriter.appendString(self.tables[Int(change.table)], to: &common)
                    JSONWriter.appendASCII(#","pks":"#, to: &common)
                }
                builder.tail { tail in
                    if change.keyIsRowid {
                        tail.append(UInt8(ascii: "["))
                        JSONWriter.appendInt(change.rowid, to: &tail)
                        tail.append(UInt8(ascii: "]"))
                    } else {
                        JSONValue.array(Self.key(change, shape)).write(into: &tail)
                    }
                    tail += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
                }
                if plan.images {
                    builder.image { image, columns in
                        self.appendSlot(change.beforeImage, change.before, change, plan, &columns, to: &image)
                        if change.operation == .update {
                            self.appendSlot(change.afterImage, change.after, change, plan, &columns, to: &image)
                        }
                    }
                } else {
                    builder.endEvent()
                }
            }
        }
        return builder.finish()
    }

    /// Writes properties as the members of an event's body: `,"key":value` each.
    private static func appendProperties(_ properties: JSONObject, to bytes: inout [UInt8]) {
        for (key, value) in properties {
            bytes.append(UInt8(ascii: ","))
            JSONWriter.appendString(key, to: &bytes)
            bytes.append(UInt8(ascii: ":"))
            value.write(into: &bytes)
        }
    }

    /// Appends a row slot of an event's image (`RowImage.render(event:…)`): the image the hook
    /// wrote, or one made of the row's values (recorded while the shape was unknown, named by
    /// the shape read at commit); none (`null`) without either.
    private func appendSlot(
        _ written: Range<Int>?, _ row: [JSONValue]?, _ change: RowChange, _ plan: CommittedEventPlan,
        _ columns: inout RunBuilder.Columns, to image: inout [UInt8]
    ) {
        if let written, change.columns >= 0 {
            RowImage.appendVarint(columns.local(capture: change.columns, self.columnSets) + 1, to: &image)
            image.append(contentsOf: self.imageBytes(written))
        } else if let row {
            let shape = plan.shapes[change.table] ?? nil
            RowImage.appendVarint(columns.local(names: shape?.columns ?? []) + 1, to: &image)
            RowImage.append(row: shape?.realified(row) ?? row, to: &image)
        } else {
            RowImage.appendVarint(0, to: &image)
        }
    }

    private struct GroupKey: Hashable {
        let unit: Int32
        let table: Int32
        /// The statement's own inserts, not its triggers'.
        let direct: Bool
    }

    /// Positions of deletes a `REPLACE` made to put a row with the same key in place.
    private func replacedKeys() -> Set<Int> {
        guard self.intents.values.contains(where: \.replace) else { return [] }
        var replaced: Set<Int> = []
        var pendingDeletes: [Int32: [(position: Int, key: [JSONValue])]] = [:]  // per unit
        for (position, entry) in self.entries.enumerated() {
            guard case .row(let change) = entry, change.depth == 0, self.intents[change.unit]?.replace == true else { continue }
            let shape = self.shape(change.table)
            switch change.operation {
            case .delete:
                pendingDeletes[change.unit, default: []].append((position, Self.key(change, shape)))
            case .insert:
                let key = Self.key(change, shape, new: true)
                if let match = pendingDeletes[change.unit]?.firstIndex(where: { $0.key == key }) {
                    replaced.insert(pendingDeletes[change.unit]![match].position)
                    pendingDeletes[change.unit]!.remove(at: match)
                }
            case .update:
                break
            }
        }
        return replaced
    }

    /// A change's key: `[rowid]`, the key values recorded, or (recorded while the shape was
    /// unknown) the key taken from its whole row now that the shape is known.
    private static func key(_ change: RowChange, _ shape: TableShape?, new: Bool = false) -> [JSONValue] {
        if change.keyIsRowid { return [.int(change.rowid)] }
        if let key = change.key { return key }
        guard let shape, !shape.keyIsRowid else { return [.int(change.rowid)] }
        guard let row = new || change.operation == .insert ? change.after : change.before else { return [.int(change.rowid)] }
        return shape.keyColumns.map { $0 < row.count ? row[$0] : .null }
    }
}

/// Makes runs of events (`EventRun`) one event at a time: an event of the same catalog event and
/// table as the one before joins its run, sharing the start of its body.
private struct RunBuilder {
    /// The column sets a run's images use, numbered for the run.
    struct Columns {
        var sets: [ColumnKeys] = []
        /// The capture's set numbers, to the run's.
        private var fromCapture: [Int32: Int] = [:]
        private var byNames: [[String]: Int] = [:]

        private var last: (capture: Int32, local: Int)?

        @inline(__always)
        mutating func local(capture set: Int32, _ sets: [ColumnKeys]) -> Int {
            if let last = self.last, last.capture == set { return last.local }
            let local = self.fromCapture[set] ?? self.local(names: sets[Int(set)].names, keys: sets[Int(set)])
            self.fromCapture[set] = local
            self.last = (set, local)
            return local
        }

        mutating func local(names: [String], keys: ColumnKeys? = nil) -> Int {
            if let known = self.byNames[names] { return known }
            self.sets.append(keys ?? ColumnKeys(names))
            self.byNames[names] = self.sets.count - 1
            return self.sets.count - 1
        }
    }

    let origin: EventOrigin
    let images: Bool
    private var output: [Publication] = []
    private var kind: EventKind?
    private var table: Int32 = -1
    private var common: [UInt8] = []
    private var tails: [UInt8] = []
    private var tailEnds: [Int] = []
    private var imageBytes: [UInt8] = []
    private var imageEnds: [Int] = []
    private var columns = Columns()
    private var unwanted: (kind: EventKind, count: Int)?

    init(origin: EventOrigin, images: Bool) {
        self.origin = origin
        self.images = images
    }

    /// An event nobody wants: counted, not made.
    mutating func skip(_ kind: EventKind) {
        self.flushRun()
        if let unwanted = self.unwanted, unwanted.kind == kind {
            self.unwanted!.count += 1
        } else {
            self.flushUnwanted()
            self.unwanted = (kind, 1)
        }
    }

    /// Starts an event of `kind` about `table` (-1: none in its common start): it joins the run
    /// when the one before was the same, else a new run starts with the common start
    /// `writeCommon` appends after the origin's.
    @inline(__always)
    mutating func start(_ kind: EventKind, table: Int32, _ writeCommon: (inout [UInt8]) -> Void) {
        self.flushUnwanted()
        if self.kind == kind, self.table == table, self.tailEnds.count < Journal.maxRunEvents { return }
        self.flushRun()
        self.kind = kind
        self.table = table
        self.common = self.origin.envelopeFragment
        writeCommon(&self.common)
    }

    @inline(__always)
    mutating func tail(_ write: (inout [UInt8]) -> Void) {
        write(&self.tails)
        self.tailEnds.append(self.tails.count)
    }

    /// The event's images, then its end.
    @inline(__always)
    mutating func image(_ write: (inout [UInt8], inout Columns) -> Void) {
        write(&self.imageBytes, &self.columns)
        self.imageEnds.append(self.imageBytes.count)
    }

    /// The end of an event without images.
    @inline(__always)
    mutating func endEvent() {
        self.imageEnds.append(self.imageBytes.count)
    }

    private mutating func flushRun() {
        guard let kind = self.kind, !self.tailEnds.isEmpty else { return }
        self.output.append(
            .run(
                EventRun(
                    kind: kind, origin: self.origin, common: self.common, tails: self.tails, tailEnds: self.tailEnds,
                    images: self.imageBytes, imageEnds: self.imageEnds, columns: self.columns.sets)))
        self.kind = nil
        self.tails = []
        self.tailEnds = []
        self.imageBytes = []
        self.imageEnds = []
        self.columns = Columns()
    }

    private mutating func flushUnwanted() {
        guard let unwanted = self.unwanted else { return }
        self.output.append(.unwanted(unwanted.kind, count: unwanted.count))
        self.unwanted = nil
    }

    mutating func finish() -> [Publication] {
        self.flushRun()
        self.flushUnwanted()
        return self.output
    }
}

extension TableShape {
    /// Reads a table's columns and key with `PRAGMA table_xinfo` and `pragma_table_list`.
    static func read(_ table: String, on connection: SQLiteConnection) throws(SQLiteError) -> TableShape? {
        let quoted = SQLIdentifier.quote(table)
        guard let info = try connection.prepare(SQLText("PRAGMA main.table_xinfo(\(quoted))"), from: 0) else { return nil }
        var columns: [String] = []
        var keyed: [(position: Int64, column: Int, type: String)] = []
        var reals: [UInt8] = []
        while try info.step() {
            let name = info.column(1).stringValue ?? ""
            let type = info.column(2).stringValue ?? ""
            let pk = info.column(5).intValue ?? 0
            if pk > 0 { keyed.append((pk, columns.count, type)) }
            columns.append(name)
            reals.append(ColumnAffinity(declaredType: type) == .real ? 1 : 0)
        }
        guard !columns.isEmpty else { return nil }
        keyed.sort { $0.position < $1.position }
        var withoutRowid = false
        if let list = try connection.prepare(
            SQLText("SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = \(SQLIdentifier.literal(table))"), from: 0),
            try list.step()
        {
            withoutRowid = list.column(0).intValue == 1
        }
        let rowidAlias = !withoutRowid && keyed.count == 1 && keyed[0].type.uppercased() == "INTEGER"
        return TableShape(
            columns: columns, keyColumns: keyed.map(\.column), keyIsRowid: keyed.isEmpty || rowidAlias,
            reals: reals.contains(1) ? reals : [])
    }
}

/// Quoting for names and literals evd puts in SQL it writes itself.
enum SQLIdentifier {
    /// `"name"`, with embedded quotes doubled.
    static func quote(_ name: String) -> String {
        "\"" + name.split(separator: "\"", omittingEmptySubsequences: false).joined(separator: "\"\"") + "\""
    }

    /// `'text'`, with embedded quotes doubled.
    static func literal(_ text: String) -> String {
        "'" + text.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "''") + "'"
    }
}

extension JSONValue {
    /// Writes a SQLite value as JSON, as `JSONValue(sqliteValue:)` then `write(into:)` would,
    /// without making the value (text is copied once, into `bytes`). `textIsUTF8`: the value's
    /// database keeps text in UTF-8, so its bytes are read as they are (as a blob, which needs no
    /// terminating NUL and so no copy); the value reads as a blob afterwards.
    static func write(sqliteValue value: OpaquePointer, textIsUTF8: Bool, into bytes: inout [UInt8]) {
        switch sqlite3_value_type(value) {
        case SQLITE_INTEGER:
            JSONWriter.appendInt(sqlite3_value_int64(value), to: &bytes)
        case SQLITE_FLOAT:
            JSONWriter.appendDouble(sqlite3_value_double(value), to: &bytes)
        case SQLITE_TEXT:
            let start = textIsUTF8 ? sqlite3_value_blob(value)?.assumingMemoryBound(to: UInt8.self) : sqlite3_value_text(value)
            guard let start else {
                JSONWriter.appendASCII(#""""#, to: &bytes)
                return
            }
            let utf8 = UnsafeBufferPointer(start: start, count: Int(sqlite3_value_bytes(value)))
            JSONWriter.appendText(utf8, to: &bytes)  // not UTF-8: {"$text_base64": ...}, as the value would
        case SQLITE_NULL:
            JSONWriter.appendASCII("null", to: &bytes)
        default:
            JSONValue(sqliteValue: value).write(into: &bytes)
        }
    }

    /// A SQLite value as JSON: INTEGER, REAL, TEXT, NULL, and BLOB as `{"$base64": ...}`.
    init(sqliteValue value: OpaquePointer) {
        switch sqlite3_value_type(value) {
        case SQLITE_INTEGER:
            self = .int(sqlite3_value_int64(value))
        case SQLITE_FLOAT:
            self = .double(sqlite3_value_double(value))
        case SQLITE_TEXT:
            let count = Int(sqlite3_value_bytes(value))
            guard let text = sqlite3_value_text(value) else {
                self = .string("")
                return
            }
            self = JSONValue(text: UnsafeBufferPointer(start: text, count: count))
        case SQLITE_BLOB:
            let count = Int(sqlite3_value_bytes(value))
            guard let blob = sqlite3_value_blob(value) else {
                self = ["$base64": ""]
                return
            }
            self = ["$base64": .string(Base64.encode(UnsafeRawBufferPointer(start: blob, count: count)))]
        default:
            self = .null
        }
    }
}
