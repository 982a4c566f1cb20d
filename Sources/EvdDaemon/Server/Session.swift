import EvdClient
import Logging
import NIOCore
import OrderedCollections
import Synchronization

/// One client connection: its actor, its queued output, its subscriptions and its transaction.
///
/// Two parts serve it. On the event loop, its `SessionHandler` parses lines (a `reply` is handled
/// the moment it arrives: a client that is its own veto listener must not deadlock), queues every
/// other request in the inbox, and flushes the outbox, many messages per write. The executor task
/// runs queued requests one after another, as a database session does, on a database thread
/// (`DatabaseThreads`), which also writes a response straight to the socket when nothing is
/// queued ahead of it (`WriteThrough`).
final class Session: Sendable {
    let id: UInt64
    let core: DaemonCore
    let outbox: Outbox
    /// Requests the reader queued for the executor.
    let inbox: RequestInbox
    let logger: Logger
    private let identity: Mutex<(actor: Actor, origin: EventOrigin)>
    /// What the executor is doing: shutdown waits until no session is `running` (`settled`).
    private let phase = Atomic<Phase.RawValue>(Phase.waiting.rawValue)
    private let phaseChanges = WaitList()
    /// Whether the session has any subscription (it then outlives a half-closed input).
    let hasSubscriptions = Atomic<Int>(0)
    /// The earliest expiry (Unix seconds) of the tokens its subscriptions were made under
    /// (`Int64.max`: none expires): the session closes then, whoever its actor is by that time.
    let subscriptionsExpire = Atomic<Int64>(.max)
    /// The statement watch of the connection the session's request runs SQL on, while it does.
    let runningWatch = Mutex<StatementWatch?>(nil)
    /// The connection, for a forced close at shutdown.
    let channel = Mutex<(any Channel)?>(nil)
    /// `ack`s received and not yet answered (`Session+Acks`).
    let acks = Mutex(PendingAcks())

    init(id: UInt64, actor: Actor, core: DaemonCore, logger: Logger) {
        self.id = id
        self.core = core
        self.outbox = Outbox(limits: core.configuration.outboxLimits, stats: core.bus.deliveryStats)
        self.inbox = RequestInbox(capacity: core.configuration.maxPipelinedRequests)
        self.identity = Mutex((actor, EventOrigin(session: id, actor: actor)))
        self.peerActor = actor
        var logger = logger
        logger[metadataKey: "session"] = "\(id)"
        logger[metadataKey: "peer.uid"] = "\(actor.uid)"
        self.logger = logger
    }

    var actor: Actor { self.identity.withLock { $0.actor } }
    var origin: EventOrigin { self.identity.withLock { $0.origin } }
    /// The actor of the peer's credentials: the session's actor until a `login`, and after `logout`.
    let peerActor: Actor

    /// Switches the session's actor: to a token's (`login`), or back to `peerActor` (`logout`).
    func setActor(_ actor: Actor) {
        self.identity.withLock { $0 = (actor, EventOrigin(session: self.id, actor: actor)) }
    }
    /// The executor's lifecycle: `waiting` (for its next request) ⇄ `running` (a request, until its
    /// response is queued) → `ended` (the input ended or the session closed; for good).
    enum Phase: UInt8, Sendable {
        case waiting
        case running
        case ended
    }

    var isBusy: Bool { self.phase.load(ordering: .acquiring) == Phase.running.rawValue }

    private func enter(_ phase: Phase) {
        assert(
            self.phase.load(ordering: .relaxed) != Phase.ended.rawValue || phase == .ended,
            "an ended session runs no request"
        )
        self.phase.store(phase.rawValue, ordering: .releasing)
        if phase != .running { self.phaseChanges.wakeAll() }
    }

    /// Returns once the executor is not running a request (or when the task is cancelled).
    func settled() async {
        await self.phaseChanges.wait { !self.isBusy }
    }

    /// A line the reader hands to the executor.
    enum Inbound: Sendable {
        case request(Request)
        case failure(EvdError)
    }

    /// A request as read from its line (`EvdRequest`).
    typealias Request = EvdRequest

    /// Serves the connection until the client leaves or the daemon stops. The channel's
    /// `SessionHandler` does the reading and writing; this task runs the requests.
    func run(channel: any Channel) async {
        self.channel.withLock { $0 = channel }
        // A client that goes away does not leave its statement running on a pooled connection.
        // (Only when the connection is gone: a client that half-closed its input still waits for
        // its response.)
        channel.closeFuture.whenComplete { _ in
            // Under the lock, which the request's end takes to clear it: a commit group runs the
            // next member's statements on the same connection (`CommitGroups`), never interrupted
            // for this session.
            self.runningWatch.withLock { $0?.interrupt(.disconnected) }
        }
        self.logger.debug("session started")
        self.outbox.enqueue(line: self.helloLine())
        await self.publishSessionEvent(.login, ["method": "peercred"])
        do {
            try await channel.eventLoop.submit {
                try channel.pipeline.syncOperations.handler(type: SessionHandler.self).attach(self)
            }.get()
        } catch {
            // The connection is already gone.
            self.inputEnded()
            self.outbox.close()
        }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.cutOffIfLagged(channel) }
            // The requests run on a database thread, SQLite work and all (`DatabaseThreads`).
            await withTaskExecutorPreference(self.core.databaseThreads) {
                await self.execute(channel: channel)
            }
            await group.waitForAll()
        }
        try? await channel.closeFuture.get()
        self.core.bus.unsubscribeAll(session: self.id)
        self.core.cursors?.releaseAll(session: self.id)
        await self.publishSessionEvent(.logout, [:])
        self.logger.debug("session ended")
    }

    /// Publishes a catalog event of the session's that belongs to no database transaction
    /// (`login`, `logout`, `create-token`): journaled first, then delivered; returns its seq.
    /// Without a journal, it costs nothing (and gets no seq) unless someone subscribed. (Custom
    /// events: `publishEmits`.)
    @discardableResult
    func publishJournaled(_ kind: EventKind, _ properties: JSONObject) async throws -> Int64? {
        let bus = self.core.bus
        if self.core.journal == nil, !bus.wants(kind) { return nil }
        let seqs = try await bus.publishJournaled(
            [(kind.name, kind, properties)],
            origin: self.origin,
            journal: self.core.journal
        )
        return seqs.first
    }

    /// `login` or `logout` (the connection comes or goes, or the logout op): a failed journal write
    /// is logged, not answered. Returns the event's seq (nil: none given).
    @discardableResult
    func publishSessionEvent(_ kind: EventKind, _ properties: JSONObject) async -> Int64? {
        do {
            return try await self.publishJournaled(kind, properties)
        } catch {
            self.logger.warning("could not journal an event", metadata: ["event": "\(kind.name)", "error": "\(error)"])
            return nil
        }
    }

    /// The client's input ended (or the connection closed): no request or reply can come any more.
    func inputEnded() {
        // This session's pending vetoes resolve by on_timeout now.
        self.core.bus.removeVetoListeners(session: self.id)
        self.inbox.finish()
    }

    /// Parses one line: `nil` for a blank line, else a request or a `bad_json` failure.
    static func parse(_ buffer: ByteBuffer) -> Inbound? {
        buffer.withUnsafeReadableBytes { bytes -> Inbound? in
            if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0d }) { return nil }
            do {
                // `id` is echoed as it came: a number keeps its text.
                let (value, rows) = try JSONValue.parsing(bytes, flatteningRowsOf: "rows", keepingNumberTextOf: "id")
                guard case .object(let object) = value else {
                    return .failure(EvdError(.badJSON, "a request must be a JSON object, not \(value.typeName)"))
                }
                let request = Request(object, rows: rows)
                // Only the ops that insert rows read them flat; any other sees its request whole.
                if rows != nil, !Request.rowOps.contains(object["op"]?.stringValue ?? "") {
                    return .request(Request(request.whole))
                }
                return .request(request)
            } catch {
                return .failure(EvdError(.badJSON, "not valid JSON: \((error as? JSONParseError)?.message ?? "\(error)")"))
            }
        }
    }

    /// What the executor does with a line the reader queued.
    enum Admission {
        /// Answer it with this error; it does not run.
        case refuse(id: JSONValue, EvdError)
        /// Run it.
        case run(id: JSONValue, Request)
    }

    /// Counts a queued line as a request and checks what every request must pass before it runs:
    /// valid JSON, a scalar `id`, the daemon not stopping.
    private func admit(_ item: Inbound) -> Admission {
        self.core.requests.add(1, ordering: .relaxed)
        switch item {
        case .failure(let error):
            return .refuse(id: .null, error)
        case .request(let request):
            let id = request["id"] ?? .null
            guard id.isScalar else { return .refuse(id: .null, .badRequest(field: "id", "'id' must be a JSON scalar")) }
            if self.core.shuttingDown.load(ordering: .relaxed) {
                return .refuse(id: id, EvdError(.shuttingDown, "evd is shutting down"))
            }
            return .run(id: id, request)
        }
    }

    private func execute(channel: any Channel) async {
        var state = SessionState()
        while true {
            // Backpressure: while the client has not read what it was sent up to the output bound,
            // no request runs (and the handler reads nothing), so unread responses cannot grow.
            await self.outbox.waitForRoom()
            guard let next = await self.next(inTransaction: state.transaction != nil) else { break }
            guard case .some(let item) = next else {
                // The session's transaction sat idle past `--idle-transaction-ms`: it holds a pooled
                // connection (and perhaps the write lock) that others wait for.
                await self.endIdleTransaction(&state)
                break
            }
            switch self.admit(item) {
            case .refuse(let id, let error):
                self.respond(id: id, .failure(error))
            case .run(let id, let request) where Self.isEmit(request.object):
                // The emits queued right behind this one are journaled with it (`executeEmits`).
                let following = self.inbox.popQueued { item in
                    if case .request(let request) = item { return Self.isEmit(request.object) } else { return false }
                }
                self.enter(.running)
                await self.executeEmits([.run(id: id, request)] + following.map { self.admit($0) })
                self.enter(.waiting)
            case .run(let id, let request):
                self.enter(.running)
                let outcome: Outcome
                do {
                    // One veto budget for everything this request does (PROTOCOL.md §4).
                    let budget = OperationVetoBudget(.milliseconds(self.core.configuration.vetoBudgetMs))
                    outcome = try await OperationVetoBudget.$current.withValue(budget) {
                        try await ResultRows.$maxResponseBytes.withValue(self.core.configuration.maxResponseBytes) {
                            try await self.dispatch(request, &state)
                        }
                    }
                } catch {
                    let failure = Self.wireError(error)
                    if failure.code == ErrorCode.internalError.rawValue {
                        self.logger.error("a request failed unexpectedly", metadata: ["error": "\(error)"])
                    }
                    outcome = .failure(failure)
                }
                // Respond before leaving `running`: shutdown closes the session as soon as it is not
                // running, and the response of an in-flight request must be queued by then.
                self.respond(id: id, outcome)
                self.enter(.waiting)
            }
        }
        self.enter(.ended)
        // The client's input ended: nothing more can commit, so an open transaction rolls back.
        if let transaction = state.transaction {
            state.transaction = nil
            await transaction.pool.checkin(transaction.connection, origin: self.origin)
        }
        // A subscriber that half-closed its input (`printf ... | socat`) still gets its events
        // until it closes the connection; anyone else is done.
        if self.hasSubscriptions.load(ordering: .relaxed) > 0 && !self.outbox.isClosing {
            try? await channel.closeFuture.get()
        }
        self.outbox.close()
    }

    /// The next line to run: `nil` when the input ended, `.some(nil)` when a transaction is open and
    /// no line came within `--idle-transaction-ms`.
    private func next(inTransaction: Bool) async -> Inbound?? {
        let limit = self.core.configuration.idleTransactionMs
        guard inTransaction, limit > 0 else { return await self.inbox.pop().map { .some($0) } }
        let inbox = self.inbox
        return await withTaskGroup(of: Inbound??.self) { group in
            group.addTask { await inbox.pop().map { .some($0) } }
            group.addTask {
                try? await Task.sleep(for: .milliseconds(limit))
                return .some(nil)
            }
            let first = await group.next()!
            group.cancelAll()
            // A line the queue handed over as the timer fired is not lost: it wins.
            let second = await group.next()!
            if case .some(.some) = second { return second }
            return first
        }
    }

    /// Rolls back the session's transaction that sat idle too long, tells the client (notice
    /// `idle_transaction_timeout`) and ends the session, as PostgreSQL's
    /// `idle_in_transaction_session_timeout` does: its next request cannot be the one it meant for
    /// a transaction that is gone.
    private func endIdleTransaction(_ state: inout SessionState) async {
        guard let transaction = state.transaction else { return }
        state.transaction = nil
        let limit = self.core.configuration.idleTransactionMs
        self.logger.notice(
            "rolled back a transaction idle for \(limit) ms (--idle-transaction-ms) and closed its session",
            metadata: ["database": "\(transaction.pool.database.name)"]
        )
        await self.rollBack(transaction)
        await transaction.pool.checkin(transaction.connection, origin: self.origin)
        let line = WireLines.idleTransactionTimeoutNotice(database: transaction.pool.database.name, maxMs: limit)
        self.outbox.enqueue(line: line)
        self.inbox.finish()
        self.outbox.close()
    }

    /// How long a lagged-out subscriber may read nothing before its connection is cut.
    /// (10 s: a loaded machine can keep a reader from its socket for seconds, and the notice is
    /// what tells it where to resume.)
    static let laggedCutoff: TimeAmount = .seconds(10)

    /// After a lagged disconnect, lets the peer read what was queued (the events before the notice,
    /// then the notice) for as long as it reads, and closes the connection once `laggedCutoff` passes
    /// without a byte written: a peer that reads nothing leaves the writer stuck on a full socket,
    /// and must not keep its session (and its slot) forever, while one that reads slowly (on a busy
    /// machine, say) must still get its notice.
    private func cutOffIfLagged(_ channel: any Channel) async {
        guard await self.outbox.closed() else { return }
        let cutoff = Duration.nanoseconds(Self.laggedCutoff.nanoseconds)
        var written = self.outbox.writtenBytes
        var stalledSince = ContinuousClock.now
        while channel.isActive {
            try? await Task.sleep(for: .milliseconds(100))
            let now = self.outbox.writtenBytes
            if now != written {
                written = now
                stalledSince = .now
            } else if ContinuousClock.now - stalledSince >= cutoff {
                channel.close(promise: nil)
                return
            }
        }
    }
}

/// What only the executor touches: the open transaction, the session's execution options and the
/// databases it attached.
struct SessionState {
    var transaction: Transaction?
    var options: JSONObject = [:]
    /// What the session's SQL attached (`ATTACH DATABASE`), attached again on every connection it
    /// checks out (`Attachment`); cleared when its actor changes (`login`, `logout`).
    var attachments: [Attachment] = []

    /// Forgets the session's attachments: its actor changed. A transaction open meanwhile keeps
    /// what its connection has attached until it ends, without making it the session's again.
    mutating func clearAttachments() {
        self.attachments = []
        self.transaction?.adoptsAttachments = false
    }
}

/// A transaction opened with `begin` (or `begin_twophase`): the connection is the session's until
/// `commit`/`rollback` (or `prepare_twophase`, which hands it to `TwoPhaseTransactions`).
struct Transaction: Sendable {
    let pool: ConnectionPool
    let connection: PooledConnection
    /// A two-phase transaction's xid.
    var xid: String?
    /// A two-phase transaction's schema version at begin: prepare refuses a schema change.
    var schemaVersion: Int64 = 0
    /// Whether what its connection has attached after a request is the session's attachments
    /// (not after a `login` or `logout` inside it).
    var adoptsAttachments = true
}

/// The daemon's version, as `hello` reports it.
public let evdVersion = "0.1.0"
