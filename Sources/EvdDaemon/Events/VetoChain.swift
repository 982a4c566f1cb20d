import EvdClient
import NIOCore

/// One run of a veto chain, as a value: which listener is asked next, what each answer does to
/// the verdict, and when the chain ends. It asks listeners one at a time (highest priority first),
/// each seeing the properties as modified by those before; the first enforced `deny` ends it; the
/// daemon's budget caps the whole run.
///
/// It sends nothing and waits for nothing: the driver (`EventBus.advance`, then one of the two ways
/// of waiting, `decide`/`decideAhead` from async code or `decideBlocking` on a SQLite thread) asks
/// `next()` whom to ask, sends the veto, waits for that listener's answer its own way, and hands
/// the answer to `record`. Its phases:
///
/// ```
/// asking ──next()──▶ waiting(listener) ──record(decision)──▶ asking      (allow, modify, no answer)
///    │                                        └───────────────▶ ended    (an enforced deny)
///    └──next(): no listener left, or the budget is spent──────▶ ended
/// ```
struct VetoChain {
    let kind: EventKind
    let origin: EventOrigin
    let listeners: [VetoListener]
    let deadline: ContinuousClock.Instant
    private(set) var verdict: VetoVerdict
    private var index = 0
    private var phase = Phase.asking

    private enum Phase {
        /// The next listener may be asked.
        case asking
        /// `listener` was asked: its decision (an answer, or why there is none) comes next.
        case waiting(VetoListener)
        /// Nobody more is asked: the verdict is final.
        case ended
    }

    /// What the driver does next.
    enum Step {
        /// Send the veto to `listener`, which has `timeout` to answer; then `record` its decision.
        case ask(VetoListener, timeout: Duration)
        /// The chain has ended: `verdict` is final.
        case end
    }

    init(kind: EventKind, seq: Int64, origin: EventOrigin, properties: JSONObject, listeners: [VetoListener], budget: Duration) {
        self.kind = kind
        self.origin = origin
        self.listeners = listeners
        self.deadline = .now + budget
        self.verdict = VetoVerdict(properties: properties, action: "allow", seq: seq)
    }

    /// The next listener to ask and how long it may take, or `.end` when the chain has ended.
    mutating func next() -> Step {
        switch self.phase {
        case .ended:
            return .end
        case .waiting:
            preconditionFailure("a veto chain asks its next listener only after the previous one's decision is recorded")
        case .asking:
            break
        }
        guard self.index < self.listeners.count else {
            self.phase = .ended
            return .end
        }
        let listener = self.listeners[self.index]
        self.index += 1
        let remaining = self.deadline - .now
        if remaining <= .zero {
            // The budget is spent: the veto that was pending already resolved by its listener's
            // on_timeout; this and later listeners are not asked (PROTOCOL.md §4), and their own
            // on_timeout plays no part.
            self.phase = .ended
            return .end
        }
        self.phase = .waiting(listener)
        return .ask(listener, timeout: min(listener.timeout, remaining))
    }

    /// Applies the decision of the listener `next()` named.
    mutating func record(_ decision: VetoDecision) {
        guard case .waiting(let listener) = self.phase else {
            preconditionFailure("a veto chain records a decision only for the listener it asked")
        }
        self.phase = .asking
        var effective = decision
        var reason: String? = nil
        if case .noAnswer(let why) = decision {
            effective = listener.onTimeout == .allow ? .allow : .deny(reason: nil)
            reason = "no answer (\(why.rawValue)); on_timeout \(listener.onTimeout.rawValue)"
        }
        if listener.dryRun {
            let action: String
            switch effective {
            case .allow, .noAnswer: action = "allow"
            case .deny(let why):
                action = "deny"
                reason = why ?? reason
            case .modify: action = "modify"
            }
            self.verdict.dryRun.append([
                "by": .string(listener.name), "action": .string(action), "reason": reason.map(JSONValue.string) ?? .null,
            ])
            return
        }
        switch effective {
        case .allow, .noAnswer:
            break
        case .deny(let why):
            self.verdict.action = "deny"
            self.verdict.by = listener.name
            self.verdict.reason = why ?? reason
            self.phase = .ended
        case .modify(let set):
            for (key, value) in set { self.verdict.properties[key] = value }
            self.verdict.action = "modify"
            self.verdict.by = listener.name
            if let visibility = listener.visibility { self.verdict.modifiers.append(visibility) }
        }
    }
}

// MARK: The driver

extension EventBus {
    /// One answer a driver must wait for: the veto sent, and how long its listener may take.
    struct VetoWait {
        let veto: PendingVeto
        let timeout: Duration
    }

    /// Drives `chain` up to the next listener whose answer must be waited for, or (`nil`) to its
    /// end. Listeners decided without waiting (tripped, output full, gone) are recorded on the way.
    /// The one chain loop: the two ways of waiting differ only in what they do with the `VetoWait`.
    private func advance(_ chain: inout VetoChain) -> VetoWait? {
        while case .ask(let listener, let timeout) = chain.next() {
            switch self.ask(listener, chain) {
            case .answered(let decision):
                self.finishAsking(nil, listener, decision, into: &chain)
            case .pending(let veto):
                return VetoWait(veto: veto, timeout: timeout)
            }
        }
        return nil
    }

    /// Records the answer a driver waited for (a reply, or why there is none).
    private func answer(_ wait: VetoWait, _ decision: VetoDecision, into chain: inout VetoChain) {
        self.finishAsking(wait.veto, wait.veto.listener, decision, into: &chain)
    }

    // MARK: Waiting from async code

    /// Runs the veto chain for a vetoable event from async code, then emits the event to plain
    /// subscribers with its `outcome`. Returns `nil` when no listener decides `kind` (the event was
    /// emitted as usual and nothing changes); otherwise the verdict.
    func decide(
        _ kind: EventKind,
        _ origin: EventOrigin,
        budget: Duration,
        eventLoop: any EventLoop,
        _ properties: () -> JSONObject
    ) async -> VetoVerdict? {
        let budget = OperationVetoBudget.current?.remaining(cap: budget) ?? budget
        guard var chain = self.startVeto(kind, origin, budget: budget, emitPlainly: true, properties) else { return nil }
        await self.runChain(&chain, eventLoop: eventLoop)
        self.endVeto(chain)
        return chain.verdict
    }

    /// A chain decided ahead of the work it is about (`decideAhead`): its verdict (`nil`: no
    /// listener was asked), and the event, which plain subscribers get only when `publish()` is
    /// called — where the event belongs in the order they see.
    struct DecidedAhead: Sendable {
        let verdict: VetoVerdict?
        /// Emits the event to plain subscribers: with its `outcome` after a chain, else plainly.
        let publish: @Sendable () -> Void
    }

    /// Runs the veto chain for `kind` like `decide`, but leaves the event's publication to the
    /// caller. `before_execute` is decided this way before a connection is checked out (a listener
    /// never holds a pooled connection while it thinks), and published after the checkout, so that
    /// plain subscribers still see SQLAlchemy's order: `checkout`, `engine_connect`, `before_execute`.
    func decideAhead(
        _ kind: EventKind,
        _ origin: EventOrigin,
        budget: Duration,
        eventLoop: any EventLoop,
        _ properties: @escaping @Sendable () -> JSONObject
    ) async -> DecidedAhead {
        let budget = OperationVetoBudget.current?.remaining(cap: budget) ?? budget
        guard var chain = self.startVeto(kind, origin, budget: budget, emitPlainly: false, properties) else {
            return DecidedAhead(verdict: nil) { self.emit(kind, origin, properties) }
        }
        await self.runChain(&chain, eventLoop: eventLoop)
        let decided = chain
        return DecidedAhead(verdict: chain.verdict) { self.endVeto(decided) }
    }

    /// Waits for each listener's answer by suspending (a timer on `eventLoop` resolves a silent
    /// one), drawing on the request's budget (`OperationVetoBudget.current`).
    private func runChain(_ chain: inout VetoChain, eventLoop: any EventLoop) async {
        let operation = OperationVetoBudget.current
        let started = ContinuousClock.now
        defer { operation?.spend(.now - started) }
        while let wait = self.advance(&chain) {
            let decision = await wait.veto.wait(timeout: wait.timeout, on: eventLoop)
            self.answer(wait, decision, into: &chain)
        }
    }

    // MARK: Waiting on a SQLite thread

    /// The same as `decide`, for a SQLite thread: each wait blocks this thread (which serves the one
    /// connection the vetoed work runs on), never a cooperative one. `operation` is the request's
    /// budget (a SQLite thread cannot see `OperationVetoBudget.current`).
    func decideBlocking(
        _ kind: EventKind,
        _ origin: EventOrigin,
        budget: Duration,
        operation: OperationVetoBudget? = nil,
        _ properties: () -> JSONObject
    ) -> VetoVerdict? {
        let started = ContinuousClock.now
        defer { operation?.spend(.now - started) }
        guard var chain = self.startVeto(kind, origin, budget: operation?.remaining(cap: budget) ?? budget, emitPlainly: true, properties)
        else { return nil }
        while let wait = self.advance(&chain) {
            let decision = wait.veto.waitBlocking(timeout: wait.timeout)
            self.answer(wait, decision, into: &chain)
        }
        self.endVeto(chain)
        return chain.verdict
    }

    // MARK: Asking

    /// Starts a chain with `budget` (what is left of the request's), or (no listener) returns
    /// `nil` — having emitted the event plainly if `emitPlainly`.
    private func startVeto(
        _ kind: EventKind,
        _ origin: EventOrigin,
        budget: Duration,
        emitPlainly: Bool,
        _ properties: () -> JSONObject
    ) -> VetoChain? {
        guard self.wantsVeto(kind) else {
            if emitPlainly { self.emit(kind, origin, properties) }
            return nil
        }
        let properties = properties()
        // The listeners whose `where` the event passes; a seq only when someone is asked.
        let (listeners, seq) = self.state.withLock { state -> ([VetoListener], Int64) in
            let listeners = state.vetoersByKind[kind.rawValue].filter {
                $0.accepts(kind, origin: origin, properties: properties)
            }
            guard !listeners.isEmpty else { return ([], 0) }
            state.seq += 1
            return (listeners, state.seq)
        }
        if seq != 0 { self.lease?.cover(seq) }
        guard !listeners.isEmpty else {
            if emitPlainly { self.emit(kind, origin) { properties } }
            return nil
        }
        return VetoChain(kind: kind, seq: seq, origin: origin, properties: properties, listeners: listeners, budget: budget)
    }

    /// What asking a listener came to: a veto to wait for, or a decision made without waiting.
    private enum Asked {
        case pending(PendingVeto)
        /// Decided by the listener's `on_timeout` at once: it is tripped, its outbox is full, or
        /// it is gone.
        case answered(VetoDecision)
    }

    /// Sends the veto message to `listener` and registers the pending veto its reply resolves —
    /// unless the listener is tripped (the message is sent, not waited for), or its output is at
    /// its bound (nothing is sent: `Outbox.enqueue(veto:)`).
    private func ask(_ listener: VetoListener, _ chain: VetoChain) -> Asked {
        let deadline = chain.deadline - .now
        let deadlineMs =
            min(listener.timeout, deadline).components.seconds * 1000
            + min(listener.timeout, deadline).components.attoseconds / 1_000_000_000_000_000
        let line = WireLines.veto(
            seq: chain.verdict.seq,
            epoch: self.epoch,
            name: chain.kind.name,
            subscription: listener.subscription,
            origin: chain.origin,
            deadlineMs: deadlineMs,
            properties: chain.verdict.properties
        )
        if listener.isTripped {
            // Sent so that a listener that comes back has something to reply to (its reply, late
            // as it is, closes its circuit); not registered, not waited for.
            switch listener.outbox.enqueue(veto: line) {
            case .queued: return .answered(.noAnswer(.tripped))
            case .full: return .answered(.noAnswer(.outboxFull))
            case .closed: return .answered(.noAnswer(.disconnected))
            }
        }
        // Registered before it is sent: the reply may come before `enqueue` returns.
        let veto = PendingVeto(seq: chain.verdict.seq, listener: listener, mutable: Set(chain.kind.spec.mutable))
        self.pendingVetoes.add(veto)
        switch listener.outbox.enqueue(veto: line) {
        case .queued:
            self.vetoStats.asked.add(1, ordering: .relaxed)
            return .pending(veto)
        case .full:
            self.pendingVetoes.remove(veto)
            return .answered(.noAnswer(.outboxFull))
        case .closed:
            self.pendingVetoes.remove(veto)
            return .answered(.noAnswer(.disconnected))
        }
    }

    /// Records one listener's decision: in the stats, its circuit, and the chain.
    private func finishAsking(_ veto: PendingVeto?, _ listener: VetoListener, _ decision: VetoDecision, into chain: inout VetoChain) {
        if let veto { self.pendingVetoes.remove(veto) }
        self.vetoStats.record(decision, dryRun: listener.dryRun, since: veto?.askedAt ?? .now)
        listener.note(decision)
        chain.record(decision)
    }

    /// Emits the event to plain subscribers with its final properties and `outcome`.
    private func endVeto(_ chain: VetoChain) {
        if self.wants(chain.kind) {
            var properties = chain.verdict.properties
            properties["outcome"] = chain.verdict.outcome
            self.publish(name: chain.kind.name, kind: chain.kind, origin: chain.origin, properties: properties)
        }
    }
}
