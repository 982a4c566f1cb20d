import CSQLite
import EvdClient
import OrderedCollections
import Synchronization

// The durable side of two-phase commit (see TwoPhase.swift): a prepared transaction's record — its
// row changes and committed events — and the log in STATE_DIR/twophase.db that keeps it across a crash.

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
