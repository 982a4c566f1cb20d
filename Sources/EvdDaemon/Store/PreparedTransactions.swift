import CSQLite
import EvdClient
import OrderedCollections
import Synchronization

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
