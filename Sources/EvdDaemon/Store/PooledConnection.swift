import CSQLite
import DequeModule
import EvdClient
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// A connection of the pool, with the per-session settings currently applied to it.
///
/// `@unchecked Sendable`: like its `SQLiteConnection`, it is in exclusive use: checked out to one
/// session, which runs one request at a time, so one thread is inside it at a time (a session's
/// task may move to another database thread between uses); the pool hands it over under its lock.
/// Its own state (`queryOnly`, `ownStatements`, ...) is touched only inside such a use: debug
/// builds check `run(own:)` and `apply` with the connection's `exclusiveUse`, and every SQLite
/// call it makes.
///
/// Closing: `close` (the pool's, on the thread pool) closes the SQLite connection, which removes
/// the hooks of its `capture`, `observer`, `busy` and the checkpointer first; `deinit` does it at
/// the latest.
public final class PooledConnection: @unchecked Sendable {
    /// The connection's number within its database's pool (the events' `connection`).
    public let number: Int
    public let sqlite: SQLiteConnection
    let observer: AuthorizerObserver
    /// The rows and schema changes of the open transaction, for its committed events.
    let capture: ChangeCapture
    /// The schema reads evd's own work needs, kept while the schema stays the same.
    let schema = SchemaCache()
    var queryOnly = false
    /// The journal's insert, prepared on first commit with events.
    var journalInsert: SQLiteStatement?
    /// In a two-phase transaction: every change is recorded with whole rows (its redo log).
    var twoPhase = false
    /// The seq of the last event its last COMMIT published (`commit`); nil when it published none
    /// (no committed event, or none anyone wanted and no journal). The response of the request
    /// that committed says it (`seq`: read your writes).
    var committedThrough: Int64?

    /// Waits for the write lock (the session's busy timeout) at the database's `WriteGate`.
    let busy: BusyWaiter
    /// Interrupts a client statement that runs too long, or whose client or daemon goes away.
    let watch: StatementWatch
    /// Whether the database's path still names the file: checked right before every COMMIT.
    let identity: DatabaseIdentity

    init(
        number: Int,
        sqlite: SQLiteConnection,
        observer: AuthorizerObserver,
        busyTimeoutMs: Int32,
        gate: WriteGate,
        identity: DatabaseIdentity
    ) {
        self.number = number
        self.identity = identity
        self.sqlite = sqlite
        self.observer = observer
        self.capture = ChangeCapture(connection: sqlite, schema: self.schema)
        self.busy = BusyWaiter(gate: gate, timeoutMs: busyTimeoutMs)
        self.busy.install(on: sqlite)
        self.watch = StatementWatch(sqlite)
    }

    deinit {
        // The hooks point at `capture`, `observer` and `busy` (and the connection keeps them until
        // it closes): the connection must close before they can go.
        self.sqlite.close()
    }

    /// Closes the SQLite connection: its hooks first (`SQLiteConnection.close`). Blocks (a close
    /// may checkpoint the WAL); nothing may use the connection afterwards.
    func close() {
        self.sqlite.close()
    }

    /// evd's own single statements (`BEGIN`, `SAVEPOINT evd_op`, ...), prepared once each: parsing
    /// them again at every request was a tenth of a one-row insert's CPU. (Here, not on the
    /// `SQLiteConnection`: a statement keeps its connection alive, so the connection must not keep
    /// its statements.)
    private var ownStatements: [String: SQLiteStatement] = [:]

    /// Runs one of evd's own statements (one statement, no parameters, no rows).
    func run(own sql: String) throws(SQLiteError) {
        let entered = self.sqlite.exclusiveUse.enter()
        defer { self.sqlite.exclusiveUse.leave(entered) }
        let statement: SQLiteStatement
        if let prepared = self.ownStatements[sql] {
            statement = prepared
        } else {
            guard let prepared = try self.sqlite.prepare(SQLText(sql), from: 0) else { return }
            self.ownStatements[sql] = prepared
            statement = prepared
        }
        defer { statement.reset() }
        while try statement.step() {}
    }

    /// Applies a session's `query_only` (touching SQLite only if it changed) and `busy_timeout_ms`
    /// (what the connection's `BusyWaiter` waits).
    func apply(queryOnly: Bool, busyTimeoutMs: Int32) throws(SQLiteError) {
        let entered = self.sqlite.exclusiveUse.enter()
        defer { self.sqlite.exclusiveUse.leave(entered) }
        if queryOnly != self.queryOnly {
            try self.sqlite.exec("PRAGMA query_only = \(queryOnly ? 1 : 0)")
            self.queryOnly = queryOnly
        }
        self.busy.timeoutMs = busyTimeoutMs
    }
}
