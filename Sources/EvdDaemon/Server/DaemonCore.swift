import EvdClient
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What every session shares: the bus, the pools, the settings, the counters.
final class DaemonCore: Sendable {
    let configuration: EvdConfiguration
    let bus: EventBus
    /// Committed events, kept durably for replay (`nil` with `--no-journal`).
    let journal: Journal?
    /// Runs blocking work (SQLite) off the event loops and the cooperative pool.
    let threadPool: NIOThreadPool
    /// Where sessions run their requests, SQLite work included (see `DatabaseThreads`).
    let databaseThreads: DatabaseThreads
    /// The pools in `--db` order; the first is the default database.
    let pools: OrderedDictionary<String, ConnectionPool>
    let permissions: Permissions
    let sessions = SessionRegistry()
    let requests = Atomic<Int>(0)
    /// Execution options set with `scope: engine`: every session starts from these.
    let engineOptions = Mutex<JSONObject>([:])
    /// Set when shutdown begins: new requests get `shutting_down`.
    let shuttingDown = Atomic<Bool>(false)
    /// Prepared two-phase transactions awaiting a decision, and their durable log.
    let twoPhase: TwoPhaseTransactions
    /// Signs and checks tokens with the secret in the state directory.
    let tokens: TokenAuthority
    /// Durable cursors (`nil` with `--no-journal`: a cursor is a position in the journal).
    let cursors: Cursors?

    init(
        configuration: EvdConfiguration,
        bus: EventBus,
        journal: Journal?,
        threadPool: NIOThreadPool,
        databaseThreads: DatabaseThreads,
        eventLoop: any EventLoop,
        tokens: TokenAuthority,
        reportLost: @escaping DatabaseIdentity.Report = { _, _, _ in }
    ) {
        self.databaseThreads = databaseThreads
        self.configuration = configuration
        self.bus = bus
        self.journal = journal
        self.threadPool = threadPool
        var pools = OrderedDictionary<String, ConnectionPool>()
        for database in configuration.databases {
            pools[database.name] = ConnectionPool(
                database: database,
                size: configuration.poolSize,
                bus: bus,
                threadPool: threadPool,
                eventLoop: eventLoop,
                busyTimeoutMs: configuration.busyTimeoutMs,
                checkoutTimeout: .milliseconds(Int64(configuration.checkoutTimeoutMs)),
                vetoBudget: .milliseconds(configuration.vetoBudgetMs),
                journal: journal,
                checkpointPages: configuration.checkpointPages,
                share: configuration.poolShare,
                unlimitedUIDs: [0, getuid()],
                reportLost: reportLost
            )
        }
        self.pools = pools
        self.permissions = Permissions(ownerUID: getuid(), grants: configuration.grants)
        self.twoPhase = TwoPhaseTransactions(stateDirectory: configuration.stateDirectory)
        self.tokens = tokens
        self.cursors =
            journal == nil
            ? nil
            : Cursors(
                stateDirectory: configuration.stateDirectory,
                maxCursors: configuration.maxCursors,
                maxPerOwner: configuration.maxCursorsPerActor
            )
    }

    /// The pool of `name`, or the default database's when `name` is nil.
    func pool(_ name: String?) throws(EvdError) -> ConnectionPool {
        guard let name else { return self.pools.values.first! }
        guard let pool = self.pools[name] else {
            throw EvdError(
                .noSuchDatabase,
                "no database named '\(name)' (evd serves: \(self.pools.keys.joined(separator: ", ")))",
                extra: ["field": "database"]
            )
        }
        return pool
    }

    /// The `stats` result.
    func statistics() -> JSONValue {
        self.statistics(journal: self.journalFigures())
    }

    /// What the journal holds now (`nil` with `--no-journal`): its running figures, never counted
    /// when asked (`Journal.RunningFigures`).
    func journalFigures() -> Journal.Figures? {
        guard let journal = self.journal else { return nil }
        return journal.running.figures(of: journal, floor: journal.floor)
    }

    /// The `stats` result with `journal` as measured: the counters are atomics and a few short
    /// locks (the bus's, each pool's, the sessions'), nothing a publisher waits on for long.
    func statistics(journal: Journal.Figures?) -> JSONValue {
        let (published, subscriptions, head) = self.bus.statistics()
        var events = JSONObject()
        for name in published.keys.sorted() { events[name] = .integer(published[name]!) }
        var pools = JSONObject()
        for (name, pool) in self.pools { pools[name] = pool.statistics() }
        let delivery = self.bus.deliveryStats
        let sessions = self.sessions.counts()
        return [
            "seq": .int(head),
            "events": .object(events),
            "deliveries": .integer(delivery.delivered.load(ordering: .relaxed)),
            "drops": .integer(delivery.dropped.load(ordering: .relaxed)),
            "lagged_disconnects": .integer(delivery.laggedDisconnects.load(ordering: .relaxed)),
            "subscriptions": .integer(subscriptions),
            "sessions": ["current": .integer(sessions.current), "total": .integer(sessions.total)],
            "requests": .integer(self.requests.load(ordering: .relaxed)),
            "vetoes": self.bus.vetoStats.jsonValue,
            "veto_listeners": .integer(self.bus.vetoListenerCount),
            "veto_listeners_tripped": .integer(self.bus.trippedVetoListenerCount),
            "vetoes_pending": .integer(self.bus.pendingVetoes.count),
            "pools": .object(pools),
            "journal": (journal ?? Journal.Figures()).jsonValue(enabled: self.journal != nil),
            "epoch": .string(self.bus.epoch.description),
            "cursors": .array((self.cursors?.all ?? []).map { $0.jsonValue(head: head) }),
        ]
    }
}

/// The live sessions, for shutdown and `stats`, and the connection limits.
final class SessionRegistry: Sendable {
    private struct State {
        var sessions: [UInt64: Session] = [:]
        /// The peer uid of every admitted session, from `admit` until `remove`.
        var admitted: [UInt64: UInt32] = [:]
        /// Admitted sessions by peer uid.
        var perUID: [UInt32: Int] = [:]
        var nextID: UInt64 = 1
        var total = 0
    }

    /// The limit a refused connection would have exceeded.
    enum Refusal: Error, Equatable {
        /// `limit` sessions are live in all.
        case total(limit: Int)
        /// The peer's uid already holds `limit` sessions.
        case perUID(limit: Int)
    }

    private let state = Mutex(State())
    /// Woken when a session is removed (shutdown waits for none to be left).
    private let removals = WaitList()

    /// Reserves a session number for a connection from `uid`, or says which limit it would exceed.
    /// The reservation counts against both limits at once, so concurrent connects cannot overshoot.
    func admit(uid: UInt32, limit: Int, perUIDLimit: Int) -> Result<UInt64, Refusal> {
        self.state.withLock { state in
            guard state.admitted.count < limit else { return .failure(.total(limit: limit)) }
            let held = state.perUID[uid, default: 0]
            guard held < perUIDLimit else { return .failure(.perUID(limit: perUIDLimit)) }
            defer { state.nextID += 1 }
            state.total += 1
            state.admitted[state.nextID] = uid
            state.perUID[uid] = held + 1
            return .success(state.nextID)
        }
    }

    func add(_ session: Session) {
        self.state.withLock { $0.sessions[session.id] = session }
    }

    /// Forgets a session and frees its place under both limits.
    func remove(_ id: UInt64) {
        self.state.withLock { state in
            state.sessions.removeValue(forKey: id)
            guard let uid = state.admitted.removeValue(forKey: id) else { return }
            let held = state.perUID[uid, default: 1] - 1
            state.perUID[uid] = held > 0 ? held : nil
        }
        self.removals.wakeAll()
    }

    /// Returns once no session is left (or when the task is cancelled).
    func allRemoved() async {
        await self.removals.wait { self.state.withLock { $0.sessions.isEmpty } }
    }

    var all: [Session] { self.state.withLock { Array($0.sessions.values) } }

    func counts() -> (current: Int, total: Int) {
        self.state.withLock { ($0.sessions.count, $0.total) }
    }
}

extension Cursors.Cursor {
    /// The cursor as `stats` lists it: `lag` is how many seqs the head is past its position.
    func jsonValue(head: Int64) -> JSONValue {
        [
            "name": .string(self.name), "owner": .string(self.owner), "position": .int(self.position),
            "lag": .int(max(0, head - self.position)), "live": .bool(self.live != nil),
            "events": .array(self.events.map(JSONValue.string)),
            "databases": self.databases.map { .array($0.map(JSONValue.string)) } ?? .null,
            "created": .string(self.created), "acked": self.acked.map(JSONValue.string) ?? .null,
        ]
    }
}
