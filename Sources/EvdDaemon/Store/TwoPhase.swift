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
