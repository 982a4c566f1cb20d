import CSQLite
import EvdClient
import OrderedCollections

/// One entry of `sqlite_schema`.
struct SchemaEntry: Sendable, Equatable {
    let type: String
    let name: String
    let sql: String?
}

/// The DDL events of PROTOCOL.md §6.4 (live) and the schema events of §6.5 (committed), for raw
/// DDL and the structured ops alike.
///
/// The authorizer tells, while a statement is prepared, what it creates, drops or alters. Before
/// it runs: `before_create` / `before_drop` (vetoable; a deny means it does not run). A statement
/// that adds columns (CREATE TABLE, ALTER TABLE ... ADD COLUMN) runs inside a savepoint, so that
/// `before_parent_attach` can be asked about each new column once SQLite has said what the columns
/// are; a deny rolls the savepoint back. Then `after_parent_attach`, `after_create` / `after_drop`,
/// and the committed changes (comparing `sqlite_schema` before and after) are recorded for the
/// commit.
extension SQLRun {
    func withSchemaEvents<T>(
        sql: String,
        actions: [SchemaAction],
        _ body: () throws(EvdError) -> T
    ) throws(EvdError) -> T {
        let before = try self.schemaSnapshot()
        // Only what will really change: CREATE ... IF NOT EXISTS of an existing object, or DROP ...
        // IF EXISTS of a missing one, does nothing (and a plain one fails).
        let effective = actions.filter { action in
            let exists = before[action.name.lowercased()] != nil
            switch action.verb {
            case .create: return !exists
            case .drop, .alter: return exists
            }
        }
        for action in effective where action.verb != .alter {
            try self.vetoable(action.verb == .create ? .beforeCreate : .beforeDrop) { self.ddlProperties(action, sql) }
        }
        let altered = effective.filter { $0.verb == .alter }.map(\.name)
        var columnsBefore: [String: [ColumnInfo]] = [:]
        for table in altered { columnsBefore[table.lowercased()] = try self.columns(of: table) }
        let addsColumns = effective.contains { ($0.verb == .create && $0.kind == "table") || $0.verb == .alter }
        if addsColumns { try self.evdSQL("SAVEPOINT evd_schema") }
        let value: T
        do {
            value = try body()
        } catch {
            if addsColumns { try? self.evdSQL("ROLLBACK TO evd_schema; RELEASE evd_schema") }
            throw error
        }
        var attached: [(table: String, column: ColumnInfo)] = []
        if addsColumns {
            do {
                for action in effective where action.kind == "table" && action.verb != .drop {
                    let known = Set((columnsBefore[action.name.lowercased()] ?? []).map { $0.name.lowercased() })
                    let tableName = self.currentName(of: action.name) ?? action.name
                    for column in try self.columns(of: tableName) where !known.contains(column.name.lowercased()) {
                        try self.vetoable(.beforeParentAttach) { self.attachProperties(tableName, column) }
                        attached.append((tableName, column))
                    }
                }
            } catch {
                try? self.evdSQL("ROLLBACK TO evd_schema; RELEASE evd_schema")
                self.connection.capture.dropUnit()
                throw error
            }
            try self.evdSQL("RELEASE evd_schema")
        }
        for (table, column) in attached {
            self.bus.emit(.afterParentAttach, self.origin) { self.attachProperties(table, column) }
        }
        let after = try self.schemaSnapshot()
        for action in effective where action.verb != .alter {
            self.bus.emit(action.verb == .create ? .afterCreate : .afterDrop, self.origin) { self.ddlProperties(action, sql) }
        }
        for change in Self.committedChanges(before: before, after: after, altered: Set(altered.map { $0.lowercased() })) {
            self.connection.capture.record(change)
        }
        return value
    }

    /// The committed schema events between two snapshots: tables created, dropped, renamed (an
    /// ALTER of a table that is then gone, with exactly one new table) and altered (new SQL).
    static func committedChanges(
        before: [String: SchemaEntry],
        after: [String: SchemaEntry],
        altered: Set<String>
    ) -> [SchemaChange] {
        func tables(_ snapshot: [String: SchemaEntry]) -> [String: SchemaEntry] {
            snapshot.filter { $0.value.type == "table" && !$0.key.hasPrefix("sqlite_") }
        }
        let old = tables(before)
        let new = tables(after)
        var removed = old.keys.filter { new[$0] == nil }.sorted()
        var added = new.keys.filter { old[$0] == nil }.sorted()
        var changes: [SchemaChange] = []
        if removed.count == 1, added.count == 1, altered.contains(removed[0]) {
            changes.append(
                SchemaChange(
                    kind: .renameTable,
                    properties: ["old_table": .string(old[removed[0]]!.name), "new_table": .string(new[added[0]]!.name)]
                )
            )
            removed = []
            added = []
        }
        for key in added {
            let entry = new[key]!
            changes.append(
                SchemaChange(kind: .createTable, properties: ["table": .string(entry.name), "schema": .string(entry.sql ?? "")])
            )
        }
        for key in removed {
            changes.append(SchemaChange(kind: .dropTable, properties: ["table": .string(old[key]!.name)]))
        }
        for (key, entry) in new.sorted(by: { $0.key < $1.key }) {
            guard let previous = old[key], previous.sql != entry.sql else { continue }
            changes.append(
                SchemaChange(
                    kind: .alterTable,
                    properties: [
                        "table": .string(entry.name), "before_schema": .string(previous.sql ?? ""),
                        "after_schema": .string(entry.sql ?? ""),
                    ]
                )
            )
        }
        return changes
    }

    /// `sqlite_schema` of the main database, by lower-cased name (SQLite's names ignore case).
    func schemaSnapshot() throws(EvdError) -> [String: SchemaEntry] {
        let sqlite = self.sqlite
        do {
            return try self.connection.schema.snapshot(sqlite) { () throws(SQLiteError) in
                var entries: [String: SchemaEntry] = [:]
                guard let statement = try sqlite.prepare(SQLText("SELECT type, name, sql FROM main.sqlite_schema"), from: 0)
                else { return [:] }
                while try statement.step() {
                    let entry = SchemaEntry(
                        type: statement.column(0).stringValue ?? "",
                        name: statement.column(1).stringValue ?? "",
                        sql: statement.column(2).stringValue
                    )
                    entries[entry.name.lowercased()] = entry
                }
                return entries
            }
        } catch {
            throw error.evdError
        }
    }

    /// A table's columns, as `describe` and the attach events give them.
    func columns(of table: String) throws(EvdError) -> [ColumnInfo] {
        let sqlite = self.sqlite
        do {
            return try self.connection.schema.columns(of: table, sqlite) { () throws(SQLiteError) in
                guard
                    let statement = try sqlite.prepare(
                        SQLText(
                            "SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info(\(SQLIdentifier.literal(table)), 'main')"
                        ),
                        from: 0
                    )
                else { return [] }
                var columns: [ColumnInfo] = []
                while try statement.step() {
                    columns.append(
                        ColumnInfo(
                            name: statement.column(0).stringValue ?? "",
                            type: statement.column(1).stringValue ?? "",
                            notNull: statement.column(2).intValue == 1,
                            defaultValue: statement.column(3),
                            pk: statement.column(4).intValue ?? 0
                        )
                    )
                }
                return columns
            }
        } catch {
            throw error.evdError
        }
    }

    /// The table's name as the schema spells it (after a statement created it, say).
    private func currentName(of table: String) -> String? {
        try? self.schemaSnapshot()[table.lowercased()]?.name
    }

    /// Runs evd's own SQL (savepoints, not a client's statement: no events).
    func evdSQL(_ sql: String) throws(EvdError) {
        do {
            // One statement is prepared once per connection; a script (`ROLLBACK TO x; RELEASE x`,
            // on failures only) is run as it is.
            if sql.contains(";") { try self.sqlite.exec(sql) } else { try self.connection.run(own: sql) }
        } catch {
            throw error.evdError
        }
    }

    private func ddlProperties(_ action: SchemaAction, _ sql: String) -> JSONObject {
        [
            "database": .string(self.database), "target": ["kind": .string(action.kind), "name": .string(action.name)],
            "sql": .string(sql),
        ]
    }

    private func attachProperties(_ table: String, _ column: ColumnInfo) -> JSONObject {
        [
            "database": .string(self.database),
            "target": ["kind": "column", "name": .string(column.name), "type": .string(column.type)],
            "parent": ["kind": "table", "name": .string(table)],
        ]
    }
}

/// A column as `describe` reports it (PROTOCOL.md §3).
struct ColumnInfo: Sendable, Equatable {
    var name: String
    var type: String
    var notNull: Bool
    /// The default's SQL text, or null.
    var defaultValue: JSONValue
    /// The column's position in the primary key (1-based), 0 if not in it.
    var pk: Int64

    var jsonObject: JSONObject {
        [
            "name": .string(self.name), "type": .string(self.type), "notnull": .bool(self.notNull), "default": self.defaultValue,
            "pk": .int(self.pk),
        ]
    }
}

/// What evd reads of a connection's schema for its own work (the tables, their columns and keys),
/// kept while the schema stays the same: a one-row insert would otherwise spend most of its time
/// preparing and running these reads again.
///
/// Every use first compares the schema cookie (`PRAGMA schema_version`, a prepared statement kept
/// here: about a microsecond), which moves with every schema change, committed by any connection
/// or made inside this connection's transaction. A rolled-back change takes the cookie back to a
/// number it may reach again with a different schema, so a rollback forgets everything (`clear`).
/// `@unchecked Sendable`: it belongs to one connection (`PooledConnection.schema`) and shares its
/// exclusive use (one thread inside at a time, `SQLiteConnection`). Debug builds check it: each
/// method is a use of its own (`exclusiveUse`).
final class SchemaCache: @unchecked Sendable {
    /// Checks the claim of exclusive use in debug builds (nothing in release builds).
    private let exclusiveUse = ExclusiveUse("SchemaCache")
    private var version: Int64 = -1
    private var versionStatement: SQLiteStatement?
    private var snapshot: [String: SchemaEntry]?
    private var columns: [String: [ColumnInfo]] = [:]
    private var shapes: [String: TableShape] = [:]

    private var replacing: Set<String>?
    /// The tables with an `ON CONFLICT REPLACE` constraint as last read, kept when the rest is
    /// forgotten: for a transaction that must not read yet (see `replacingTables`).
    private(set) var lastReplacing: Set<String> = []
    /// Client statements prepared under the current schema, by their text (`SQLRun.prepare`),
    /// the oldest first; forgotten with everything else.
    private var statements: OrderedDictionary<String, CachedStatement> = [:]

    /// A prepared client statement kept for its next use, with what its compile told the
    /// authorizer observer that a later use needs (`AuthorizerObserver.writtenTables`).
    struct CachedStatement {
        let statement: SQLiteStatement
        let writtenTables: Set<String>
    }

    /// The most statements kept per connection, and the longest text kept: a client sending ever
    /// new SQL costs a bounded amount of memory.
    static let maxStatements = 64
    static let maxStatementBytes = 4096

    /// Forgets everything read so far.
    func clear() {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        self.version = -1
        self.snapshot = nil
        self.columns = [:]
        self.shapes = [:]
        self.replacing = nil
        if !self.statements.isEmpty { self.statements = [:] }
    }

    /// The statement kept for `sql` under the current schema, if any.
    func cachedStatement(_ sql: String, _ sqlite: SQLiteConnection) throws(SQLiteError) -> CachedStatement? {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        try self.validate(sqlite)
        return self.statements[sql]
    }

    /// Keeps `statement`, prepared from `sql` under the current schema, for its next use.
    func cache(_ statement: CachedStatement, for sql: String, _ sqlite: SQLiteConnection) throws(SQLiteError) {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        guard sql.utf8.count <= Self.maxStatementBytes else { return }
        try self.validate(sqlite)
        if self.statements.count >= Self.maxStatements { self.statements.removeFirst() }
        statement.statement.isCached = true
        self.statements[sql] = statement
    }

    /// The tables (lower-cased) of the main database with an `ON CONFLICT REPLACE` constraint,
    /// whose plain inserts and updates may delete rows (`SQLPolicy`).
    func replacingTables(_ sqlite: SQLiteConnection) throws(SQLiteError) -> Set<String> {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        try self.validate(sqlite)
        if let replacing = self.replacing { return replacing }
        var tables: Set<String> = []
        if let statement = try sqlite.prepare(
            SQLText("SELECT name, sql FROM main.sqlite_schema WHERE type = 'table' AND sql LIKE '%replace%'"),
            from: 0
        ) {
            while try statement.step() {
                if let name = statement.column(0).stringValue, SQLScanner.declaresReplace(statement.column(1).stringValue ?? "") {
                    tables.insert(name.lowercased())
                }
            }
        }
        self.replacing = tables
        self.lastReplacing = tables
        return tables
    }

    /// The schema cookie now (forgetting what was read under another).
    func version(_ sqlite: SQLiteConnection) throws(SQLiteError) -> Int64 {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        try self.validate(sqlite)
        return self.version
    }

    /// Forgets what was read under another schema than the current one.
    private func validate(_ sqlite: SQLiteConnection) throws(SQLiteError) {
        if self.versionStatement == nil {
            self.versionStatement = try sqlite.prepare(SQLText("PRAGMA main.schema_version"), from: 0)
        }
        guard let statement = self.versionStatement else { return self.clear() }
        statement.reset()
        defer { statement.reset() }
        let current = try statement.step() ? statement.column(0).intValue ?? -1 : -1
        if current != self.version || current == -1 {
            self.clear()
            self.version = current
        }
    }

    func snapshot(
        _ sqlite: SQLiteConnection,
        read: () throws(SQLiteError) -> [String: SchemaEntry]
    ) throws(SQLiteError)
        -> [String: SchemaEntry]
    {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        try self.validate(sqlite)
        if let snapshot = self.snapshot { return snapshot }
        let snapshot = try read()
        self.snapshot = snapshot
        return snapshot
    }

    func columns(
        of table: String,
        _ sqlite: SQLiteConnection,
        read: () throws(SQLiteError) -> [ColumnInfo]
    )
        throws(SQLiteError) -> [ColumnInfo]
    {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        try self.validate(sqlite)
        if let columns = self.columns[table] { return columns }
        let columns = try read()
        self.columns[table] = columns
        return columns
    }

    func shape(of table: String, _ sqlite: SQLiteConnection) throws(SQLiteError) -> TableShape? {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        try self.validate(sqlite)
        if let shape = self.shapes[table] { return shape }
        let shape = try TableShape.read(table, on: sqlite)
        if let shape { self.shapes[table] = shape }
        return shape
    }
}
