import CSQLite
import EvdClient
import OrderedCollections
import Synchronization

// Two-phase commit (PROTOCOL.md §3), real on SQLite.
//
// SQLite has no PREPARE TRANSACTION, so evd builds one. `begin_twophase` takes the database's write
// lock at once (BEGIN IMMEDIATE) and records every row change with whole rows (the pre-update hook
// of `ChangeCapture`, triggers' and cascades' changes included). `prepare_twophase` checks that the
// COMMIT can no longer fail for the transaction's own reasons (deferred foreign keys, schema
// changes), then writes a **redo log** — the row changes and the committed events the commit will
// publish — durably into `STATE_DIR/twophase.db`, and keeps the transaction open, holding its lock,
// until a decision arrives from any session.
//
// After a crash the open transaction is gone, but its redo log is not: at start-up, before any
// client is accepted, evd opens the transaction again, re-applies the row changes exactly (triggers
// and foreign-key actions off: their effects are already in the log) and holds it prepared as
// before. A **marker** row in the database's `_evd_twophase`, written inside the transaction,
// tells a transaction that committed (marker present) from one still waiting (marker absent) when
// the daemon died between its COMMIT and forgetting its redo log.

/// A row change in a prepared transaction's redo log.
struct RedoChange: Sendable, Equatable {
    let table: String
    let operation: RowChange.Operation
    /// The old rowid (update, delete) or the new one (insert).
    let rowid: Int64
    /// An update's new rowid.
    let newRowid: Int64
    /// The whole row before (update, delete) and after (insert, update), in column order.
    let before: [JSONValue]?
    let after: [JSONValue]?
}

/// A prepared transaction as the two-phase log keeps it: what holding it prepared again after a
/// crash takes, and the events its commit publishes.
struct PreparedRecord: Sendable {
    /// The record's random, never reused number; its marker row carries it. 0: not logged (an
    /// in-memory database, which a crash empties anyway).
    var token: Int64 = 0
    let xid: String
    let database: String
    /// The session that made the changes: the committed events carry it.
    let origin: EventOrigin
    let events: [CommittedEvent]
    let changes: [RedoChange]
    /// The columns of each table changed, as they were at prepare.
    let columns: [String: [String]]
}

/// Why a transaction cannot be prepared, or prepared again after a restart.
struct TwoPhaseError: Error, CustomStringConvertible {
    let description: String
}

// MARK: The log

/// The durable log of prepared transactions: `STATE_DIR/twophase.db`, written with
/// `synchronous = FULL` (a prepare is rare and its answer is a promise).
final class TwoPhaseLog: Sendable {
    private let path: String
    private let connection = Mutex<SQLiteConnection?>(nil)

    init(stateDirectory: String) {
        self.path = stateDirectory + "/twophase.db"
    }

    func open() throws(SQLiteError) {
        let connection = try SQLiteConnection(path: self.path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
        connection.setBusyTimeout(milliseconds: 5000)
        try connection.exec("PRAGMA journal_mode = wal; PRAGMA synchronous = full")
        try connection.exec(
            "CREATE TABLE IF NOT EXISTS prepared (token INTEGER PRIMARY KEY, xid TEXT NOT NULL, database TEXT NOT NULL, record TEXT NOT NULL)"
        )
        self.connection.withLock { $0 = connection }
    }

    func close() {
        self.connection.withLock { $0 = nil }
    }

    private func withConnection<T>(_ body: (SQLiteConnection) throws(SQLiteError) -> T) throws(SQLiteError) -> T {
        try self.connection.withLock { connection throws(SQLiteError) in
            guard let connection else { throw SQLiteError(code: SQLITE_MISUSE, message: "the two-phase log is closed") }
            return try body(connection)
        }
    }

    /// Writes `record` durably under a new token, and returns the token.
    func save(_ record: PreparedRecord) throws(SQLiteError) -> Int64 {
        let token = Int64.random(in: 1...Int64.max)
        try self.withConnection { connection throws(SQLiteError) in
            guard
                let insert = try connection.prepare(
                    SQLText("INSERT INTO prepared (token, xid, database, record) VALUES (?, ?, ?, ?)"),
                    from: 0
                )
            else { return }
            try insert.bind(int: token, at: 1)
            try insert.bind(text: record.xid, at: 2)
            try insert.bind(text: record.database, at: 3)
            try insert.bind(text: String(decoding: record.jsonValue.jsonBytes, as: UTF8.self), at: 4)
            _ = try insert.step()
        }
        return token
    }

    /// Forgets a decided transaction.
    func remove(token: Int64) throws(SQLiteError) {
        try self.withConnection { connection throws(SQLiteError) in try connection.exec("DELETE FROM prepared WHERE token = \(token)") }
    }

    /// Every logged transaction, oldest first. A record that cannot be read back is reported as
    /// such, with its xid and database, so that it is never silently dropped.
    func load() throws(SQLiteError) -> [(token: Int64, xid: String, database: String, record: Result<PreparedRecord, TwoPhaseError>)] {
        try self.withConnection { connection throws(SQLiteError) in
            guard
                let select = try connection.prepare(
                    SQLText("SELECT token, xid, database, record FROM prepared ORDER BY rowid"),
                    from: 0
                )
            else { return [] }
            var records: [(Int64, String, String, Result<PreparedRecord, TwoPhaseError>)] = []
            while try select.step() {
                let token = select.int(at: 0)
                let xid = select.column(1).stringValue ?? ""
                let database = select.column(2).stringValue ?? ""
                let record = Result { () throws(TwoPhaseError) in
                    try PreparedRecord(json: (try? JSONValue(parsing: select.column(3).stringValue ?? "")) ?? .null, token: token)
                }
                records.append((token, xid, database, record))
            }
            return records
        }
    }
}

// MARK: The record as JSON

extension RowChange.Operation {
    var name: String {
        switch self {
        case .insert: "insert"
        case .update: "update"
        case .delete: "delete"
        }
    }

    init?(name: String) {
        switch name {
        case "insert": self = .insert
        case "update": self = .update
        case "delete": self = .delete
        default: return nil
        }
    }
}

extension PreparedRecord {
    /// The record as the log stores it. Values keep their SQLite types exactly: integers and reals
    /// are told apart by the JSON writer, blobs are `{"$base64": ...}`.
    var jsonValue: JSONValue {
        let changes: [JSONValue] = self.changes.map { change in
            var object: JSONObject = ["table": .string(change.table), "op": .string(change.operation.name), "rowid": .int(change.rowid)]
            if change.operation == .update { object["new_rowid"] = .int(change.newRowid) }
            if let before = change.before { object["before"] = .array(before) }
            if let after = change.after { object["after"] = .array(after) }
            return .object(object)
        }
        let events: [JSONValue] = self.events.map { event in
            var object: JSONObject = ["event": .string(event.kind.name), "properties": .object(event.properties)]
            // The images as written for the journal: `,"rows":[…]` or `,"before":{…},"after":{…}`.
            if let images = event.images { object["images"] = .string(String(decoding: images, as: UTF8.self)) }
            return .object(object)
        }
        var columns = JSONObject()
        for table in self.columns.keys.sorted() { columns[table] = .array(self.columns[table]!.map(JSONValue.string)) }
        return [
            "xid": .string(self.xid), "database": .string(self.database),
            "session": self.origin.session.map { .integer($0) } ?? .null, "actor": self.origin.actor?.jsonValue ?? .null,
            "events": .array(events), "changes": .array(changes), "columns": .object(columns),
        ]
    }

    init(json: JSONValue, token: Int64) throws(TwoPhaseError) {
        func fail(_ what: String) -> TwoPhaseError {
            TwoPhaseError(description: "the two-phase log's record \(token) is damaged (\(what))")
        }
        guard let xid = json["xid"]?.stringValue, let database = json["database"]?.stringValue else { throw fail("xid, database") }
        var events: [CommittedEvent] = []
        for event in json["events"]?.arrayValue ?? [] {
            guard let kind = event["event"]?.stringValue.flatMap(EventKind.init(name:)),
                let properties = event["properties"]?.objectValue
            else { throw fail("events") }
            events.append(CommittedEvent(kind: kind, properties: properties, images: event["images"]?.stringValue.map { Array($0.utf8) }))
        }
        var changes: [RedoChange] = []
        for change in json["changes"]?.arrayValue ?? [] {
            guard let table = change["table"]?.stringValue,
                let operation = change["op"]?.stringValue.flatMap(RowChange.Operation.init(name:)),
                let rowid = change["rowid"]?.intValue
            else { throw fail("changes") }
            changes.append(
                RedoChange(
                    table: table,
                    operation: operation,
                    rowid: rowid,
                    newRowid: change["new_rowid"]?.intValue ?? rowid,
                    before: change["before"]?.arrayValue,
                    after: change["after"]?.arrayValue
                )
            )
        }
        var columns: [String: [String]] = [:]
        for (table, names) in json["columns"]?.objectValue ?? [:] {
            columns[table] = (names.arrayValue ?? []).compactMap(\.stringValue)
        }
        let session = json["session"]?.intValue.map { UInt64(clamping: $0) }
        self.init(
            token: token,
            xid: xid,
            database: database,
            origin: EventOrigin(session: session, actor: json["actor"].flatMap(Actor.init(json:))),
            events: events,
            changes: changes,
            columns: columns
        )
    }
}

// MARK: Prepare and redo

extension PooledConnection {
    /// The table of markers, in each database: a row per prepared transaction, written inside it.
    static let markerTableSQL = "CREATE TABLE IF NOT EXISTS _evd_twophase (token INTEGER PRIMARY KEY, xid TEXT NOT NULL)"

    /// Starts a two-phase transaction: the write lock at once, whole rows recorded from the start.
    /// Returns the schema version, which must not change before prepare.
    func beginTwoPhase(logged: Bool) throws(SQLiteError) -> Int64 {
        try self.sqlite.exec("BEGIN IMMEDIATE")
        do throws(SQLiteError) {
            if logged { try self.sqlite.exec(Self.markerTableSQL) }
            self.twoPhase = true
            return try self.sqlite.scalarInt("PRAGMA main.schema_version") ?? 0
        } catch {
            try? self.sqlite.exec("ROLLBACK")
            self.schema.clear()
            throw error
        }
    }

    /// Prepares the open two-phase transaction: checks that its COMMIT cannot fail for reasons of
    /// its own, logs its redo log durably (`log`, nil for an in-memory database) and writes its
    /// marker. The transaction stays open. Throws, leaving it open and unprepared, when it cannot
    /// be prepared.
    func prepareTwoPhase(
        xid: String,
        database: String,
        origin: EventOrigin,
        schemaVersion: Int64,
        log: TwoPhaseLog?
    ) throws -> PreparedRecord {
        guard try self.sqlite.scalarInt("PRAGMA main.schema_version") == schemaVersion,
            let redo = self.capture.redoLog()
        else {
            throw EvdError(
                .badRequest,
                "a two-phase transaction that changed the schema cannot be prepared: evd re-applies a prepared transaction's row changes after a crash, and a schema change is not one; commit it in one phase (commit_twophase) or roll it back"
            )
        }
        if let other = try self.attachedSchemaWritten() {
            throw EvdError(
                .badRequest,
                "a two-phase transaction that wrote to the attached database '\(other)' cannot be prepared: evd can only guarantee the changes of the pool's own database"
            )
        }
        // A deferred foreign key still violated would fail the COMMIT: say so now, not after the vote.
        var current: Int32 = 0
        var highwater: Int32 = 0
        sqlite3_db_status(self.sqlite.handle, SQLITE_DBSTATUS_DEFERRED_FKS, &current, &highwater, 0)
        if current > 0 {
            // SQLITE_CONSTRAINT_FOREIGNKEY
            throw SQLiteError(code: SQLITE_CONSTRAINT | (3 << 8), message: "FOREIGN KEY constraint failed").evdError
        }
        var record = PreparedRecord(
            xid: xid,
            database: database,
            origin: origin,
            events: self.capture.committedEvents(database: database).all,
            changes: redo.changes,
            columns: redo.columns
        )
        guard let log else { return record }
        record.token = try log.save(record)
        do {
            try self.writeMarker(record)
        } catch {
            try? log.remove(token: record.token)
            throw error
        }
        return record
    }

    /// The attached database (not main, not temp) the transaction wrote to, if any.
    private func attachedSchemaWritten() throws(SQLiteError) -> String? {
        guard let list = try self.sqlite.prepare(SQLText("PRAGMA database_list"), from: 0) else { return nil }
        while try list.step() {
            guard let name = list.column(1).stringValue, name != "main", name != "temp" else { continue }
            if sqlite3_txn_state(self.sqlite.handle, name) == SQLITE_TXN_WRITE { return name }
        }
        return nil
    }

    /// Writes the transaction's marker into it (not a change of the client's).
    private func writeMarker(_ record: PreparedRecord) throws(SQLiteError) {
        try self.capture.withoutRecording { () throws(SQLiteError) in
            let sql = SQLText("INSERT INTO _evd_twophase (token, xid) VALUES (?, ?)")
            guard let insert = try self.sqlite.prepare(sql, from: 0) else { return }
            try insert.bind(int: record.token, at: 1)
            try insert.bind(text: record.xid, at: 2)
            _ = try insert.step()
        }
    }

    /// After a decision: the marker of a committed transaction is no longer needed (its redo log
    /// is gone). Not a change of the client's.
    func removeMarker(token: Int64) {
        self.capture.withoutRecording { try? self.sqlite.exec("DELETE FROM _evd_twophase WHERE token = \(token)") }
    }

    /// At start-up: opens a logged transaction again and re-applies its row changes exactly, with
    /// triggers and foreign-key actions off (their effects are in the log), then writes its marker.
    /// Throws a `TwoPhaseError`, with nothing left open, when the changes no longer apply (the
    /// database changed outside evd while it was down).
    func redo(_ record: PreparedRecord) throws(TwoPhaseError) {
        let handle = self.sqlite.handle
        do {
            try self.sqlite.exec("PRAGMA foreign_keys = OFF")
            evd_sqlite_enable_triggers(handle, 0)
            defer { evd_sqlite_enable_triggers(handle, 1) }
            try self.sqlite.exec("BEGIN IMMEDIATE")
            self.twoPhase = true
            self.capture.active = false
            var tables: [String: RedoTable] = [:]
            for (name, columns) in record.columns {
                guard let table = try RedoTable.read(name, on: self.sqlite), table.columns == columns else {
                    throw TwoPhaseError(description: "table '\(name)' is gone or its columns changed")
                }
                tables[name] = table
            }
            for change in record.changes {
                guard let table = tables[change.table] else { throw TwoPhaseError(description: "no columns logged for '\(change.table)'") }
                try table.apply(change, on: self.sqlite)
            }
            try self.writeMarker(record)
        } catch {
            try? self.sqlite.exec("ROLLBACK")
            self.schema.clear()
            try? self.sqlite.exec("PRAGMA foreign_keys = ON")
            self.twoPhase = false
            throw error as? TwoPhaseError ?? TwoPhaseError(description: "\(error)")
        }
    }
}

/// A table as the redo needs it: which columns can be written, and how a row is found.
struct RedoTable {
    let name: String
    let columns: [String]
    /// The columns an INSERT or UPDATE sets (not generated or hidden ones).
    let writable: [Int]
    let withoutRowid: Bool
    /// The WITHOUT ROWID table's key columns.
    let key: [Int]
    /// The rowid has a column of its own (INTEGER PRIMARY KEY), which carries it.
    let rowidAlias: Bool

    static func read(_ name: String, on sqlite: SQLiteConnection) throws(SQLiteError) -> RedoTable? {
        guard let info = try sqlite.prepare(SQLText("PRAGMA main.table_xinfo(\(SQLIdentifier.quote(name)))"), from: 0) else { return nil }
        var columns: [String] = []
        var writable: [Int] = []
        var keyed: [(position: Int64, column: Int, type: String)] = []
        while try info.step() {
            let pk = info.column(5).intValue ?? 0
            if pk > 0 { keyed.append((pk, columns.count, info.column(2).stringValue ?? "")) }
            if info.column(6).intValue ?? 0 == 0 { writable.append(columns.count) }
            columns.append(info.column(1).stringValue ?? "")
        }
        guard !columns.isEmpty else { return nil }
        keyed.sort { $0.position < $1.position }
        let withoutRowid =
            try sqlite.scalarInt("SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = \(SQLIdentifier.literal(name))") == 1
        return RedoTable(
            name: name,
            columns: columns,
            writable: writable,
            withoutRowid: withoutRowid,
            key: keyed.map(\.column),
            rowidAlias: !withoutRowid && keyed.count == 1 && keyed[0].type.uppercased() == "INTEGER"
        )
    }

    /// Applies one logged change; an update or delete must find its row.
    func apply(_ change: RedoChange, on sqlite: SQLiteConnection) throws {
        let table = SQLIdentifier.quote(self.name)
        var sql: String
        var values: [JSONValue] = []
        func row(_ values: [JSONValue]?) throws(TwoPhaseError) -> [JSONValue] {
            guard let values, values.count == self.columns.count else {
                throw TwoPhaseError(description: "a logged row of '\(self.name)' does not match its columns")
            }
            return values
        }
        // Where the changed row is: its rowid, or a WITHOUT ROWID table's key as it was.
        func locate() throws(TwoPhaseError) -> String {
            if !self.withoutRowid {
                values.append(.int(change.rowid))
                return "rowid = ?"
            }
            let before = try row(change.before)
            values += self.key.map { before[$0] }
            return self.key.map { "\(SQLIdentifier.quote(self.columns[$0])) = ?" }.joined(separator: " AND ")
        }
        let setsRowid = !self.withoutRowid && !self.rowidAlias
        switch change.operation {
        case .insert:
            let after = try row(change.after)
            var names = self.writable.map { SQLIdentifier.quote(self.columns[$0]) }
            values = self.writable.map { after[$0] }
            if setsRowid {
                names.append("rowid")
                values.append(.int(change.rowid))
            }
            sql =
                "INSERT INTO \(table) (\(names.joined(separator: ", "))) VALUES (\(Array(repeating: "?", count: names.count).joined(separator: ", ")))"
        case .update:
            let after = try row(change.after)
            var assignments = self.writable.map { "\(SQLIdentifier.quote(self.columns[$0])) = ?" }
            values = self.writable.map { after[$0] }
            if setsRowid {
                assignments.append("rowid = ?")
                values.append(.int(change.newRowid))
            }
            sql = "UPDATE \(table) SET \(assignments.joined(separator: ", ")) WHERE "
            sql += try locate()
        case .delete:
            sql = "DELETE FROM \(table) WHERE "
            sql += try locate()
        }
        guard let statement = try sqlite.prepare(SQLText(sql), from: 0) else { return }
        for (index, value) in values.enumerated() { try statement.bind(value, at: index + 1) }
        _ = try statement.step()
        if change.operation != .insert && sqlite.changes != 1 {
            throw TwoPhaseError(description: "a row of '\(self.name)' that the transaction \(change.operation.name)d is gone")
        }
    }
}

// MARK: Prepared transactions

/// A prepared transaction awaiting its decision, holding its connection (and so its lock).
final class PreparedTransaction: Sendable {
    let pool: ConnectionPool
    let connection: PooledConnection
    let record: PreparedRecord
    /// Opened again at start-up: its connection has foreign keys off until the decision.
    let recovered: Bool

    init(pool: ConnectionPool, connection: PooledConnection, record: PreparedRecord, recovered: Bool) {
        self.pool = pool
        self.connection = connection
        self.record = record
        self.recovered = recovered
    }
}

/// The prepared transactions awaiting a decision (PROTOCOL.md §3's `recover`), by database and xid.
final class TwoPhaseTransactions: Sendable {
    enum Held: Sendable {
        case prepared(PreparedTransaction)
        /// Logged, but its changes no longer applied at start-up: it can only be rolled back.
        case unrecoverable(PreparedRecord, reason: String)

        var record: PreparedRecord {
            switch self {
            case .prepared(let transaction): transaction.record
            case .unrecoverable(let record, _): record
            }
        }
    }

    private struct Key: Hashable {
        let database: String
        let xid: String
    }

    let log: TwoPhaseLog
    private let held = Mutex<OrderedDictionary<Key, Held>>([:])

    init(stateDirectory: String) {
        self.log = TwoPhaseLog(stateDirectory: stateDirectory)
    }

    func isHeld(database: String, xid: String) -> Bool {
        self.held.withLock { $0[Key(database: database, xid: xid)] != nil }
    }

    /// Holds `held` until its decision; false when that xid is already held.
    @discardableResult
    func hold(_ held: Held) -> Bool {
        let key = Key(database: held.record.database, xid: held.record.xid)
        return self.held.withLock { all in
            guard all[key] == nil else { return false }
            all[key] = held
            return true
        }
    }

    /// Takes the transaction to decide on; nobody else can decide it meanwhile.
    func take(database: String, xid: String) -> Held? {
        self.held.withLock { $0.removeValue(forKey: Key(database: database, xid: xid)) }
    }

    /// The transactions awaiting a decision on `database`, oldest first: each xid, and who
    /// prepared it (`nil`: not known, as for one that cannot be prepared again).
    func awaiting(database: String) -> [(xid: String, preparedBy: Actor?)] {
        self.held.withLock { all in
            all.filter { $0.key.database == database }.map { ($0.key.xid, $0.value.record.origin.actor) }
        }
    }

    func takeAll() -> [Held] {
        self.held.withLock { all in
            defer { all.removeAll() }
            return Array(all.values)
        }
    }

    /// At start-up, before any client: forgets the logged transactions that committed (their
    /// marker is in the database) and holds the others prepared again. Returns what it did, for
    /// the log.
    func recover(pools: OrderedDictionary<String, ConnectionPool>) async throws -> [String] {
        let logged = try await pools.values.first!.run { try self.log.load() }
        var report: [String] = []
        var byDatabase: OrderedDictionary<String, [(token: Int64, xid: String, record: Result<PreparedRecord, TwoPhaseError>)]> = [:]
        for entry in logged { byDatabase[entry.database, default: []].append((entry.token, entry.xid, entry.record)) }
        for (database, entries) in byDatabase {
            guard let pool = pools[database] else {
                report.append(
                    "\(entries.count) prepared transaction(s) on database '\(database)', which evd does not serve now, stay in the log"
                )
                continue
            }
            let connection = try await pool.checkout(origin: .daemon)
            let markers: Set<Int64> = try await pool.run {
                try connection.sqlite.exec(PooledConnection.markerTableSQL)
                var markers: Set<Int64> = []
                if let select = try connection.sqlite.prepare(SQLText("SELECT token FROM _evd_twophase"), from: 0) {
                    while try select.step() { markers.insert(select.int(at: 0)) }
                }
                // Committed ones are done; the others' markers are written again by their redo.
                try connection.sqlite.exec("DELETE FROM _evd_twophase")
                return markers
            }
            await pool.checkin(connection, origin: .daemon)
            for entry in entries {
                if markers.contains(entry.token) {
                    try await pool.run { try self.log.remove(token: entry.token) }
                    report.append("'\(entry.xid)' on '\(database)' had committed; forgotten")
                    continue
                }
                let record: PreparedRecord
                switch entry.record {
                case .success(let read): record = read
                case .failure(let error):
                    let stub = PreparedRecord(
                        token: entry.token,
                        xid: entry.xid,
                        database: database,
                        origin: .daemon,
                        events: [],
                        changes: [],
                        columns: [:]
                    )
                    self.hold(.unrecoverable(stub, reason: error.description))
                    report.append("'\(entry.xid)' on '\(database)' cannot be prepared again: \(error)")
                    continue
                }
                let connection = try await pool.checkout(origin: .daemon)
                do {
                    try await pool.run { try connection.redo(record) }
                    self.hold(.prepared(PreparedTransaction(pool: pool, connection: connection, record: record, recovered: true)))
                    report.append("'\(entry.xid)' on '\(database)' is prepared again (\(record.changes.count) row changes)")
                } catch {
                    await pool.checkin(connection, origin: .daemon)
                    self.hold(.unrecoverable(record, reason: "\(error)"))
                    report.append("'\(entry.xid)' on '\(database)' cannot be prepared again: \(error)")
                }
            }
        }
        return report
    }

    /// At shutdown: gives every held connection back, rolling its transaction back. The log keeps
    /// the transactions, so the next start holds them prepared again.
    func releaseAll() async {
        for held in self.takeAll() {
            guard case .prepared(let transaction) = held else { continue }
            await transaction.release(origin: .daemon)
        }
    }
}

extension PreparedTransaction {
    /// Gives the connection back to its pool (which rolls back whatever is still open).
    func release(origin: EventOrigin) async {
        let connection = self.connection
        if self.recovered {
            _ = try? await self.pool.run {
                if connection.sqlite.inTransaction {
                    try? connection.sqlite.exec("ROLLBACK")
                    connection.schema.clear()
                }
                try? connection.sqlite.exec("PRAGMA foreign_keys = ON")
            }
        }
        await self.pool.checkin(connection, origin: origin)
    }
}
