#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Dispatch
import EvdClient
import NIOCore
import OrderedCollections
import Synchronization

/// What a veto listener does when it gives no valid answer in time (PROTOCOL.md §4).
public enum VetoPolicy: String, Sendable {
    case allow, deny
}

/// The veto half of a subscription: which vetoable events it decides, and how.
final class VetoListener: Sendable {
    let subscription: Int
    let session: UInt64
    /// `by` in outcomes and `vetoed` errors: the subscription's name, else `subscription:N`.
    let name: String
    /// Vetoable catalog events matched by the subscription's `veto` patterns, as a bit set.
    let kinds: UInt64
    let priority: Int64
    let timeout: Duration
    let onTimeout: VetoPolicy
    /// `mode: "dry_run"`: asked, recorded, never enforced.
    let dryRun: Bool
    let outbox: Outbox
    /// The subscription's `where`: the listener is asked only about events that pass it.
    let filter: WhereFilter
    /// What its actor may see: it is asked only about those (`nil`: everything).
    let visibility: EventVisibility?
    /// Where its actor's `veto` grant reaches: it is asked only about those (`nil`: everywhere).
    let scope: EventVisibility?

    /// The listener's circuit: how many of its vetoes in a row timed out, and whether that run
    /// has tripped it (see `tripAfter`).
    private let circuit = Mutex(Circuit())

    private struct Circuit {
        var consecutiveTimeouts = 0
        var tripped = false
    }

    /// Consecutive timeouts after which a listener is tripped: its vetoes are then still sent to
    /// it but not waited for — its `on_timeout` decides each at once — until it replies again
    /// (any `reply`, even a late one; PROTOCOL.md §4 "The daemon never hangs on a dead or
    /// silent listener", docs/protocol.md "Vetoes").
    static let tripAfter = 3

    init(
        subscription: Int, session: UInt64, name: String?, kinds: UInt64, priority: Int64, timeout: Duration,
        onTimeout: VetoPolicy, dryRun: Bool, outbox: Outbox, filter: WhereFilter = .none,
        visibility: EventVisibility? = nil, scope: EventVisibility? = nil
    ) {
        self.visibility = visibility
        self.scope = scope
        self.filter = filter
        self.subscription = subscription
        self.session = session
        self.name = name ?? "subscription:\(subscription)"
        self.kinds = kinds
        self.priority = priority
        self.timeout = timeout
        self.onTimeout = onTimeout
        self.dryRun = dryRun
        self.outbox = outbox
    }

    /// Whether this listener is asked about `kind` with these properties (its `where`).
    func accepts(_ kind: EventKind, origin: EventOrigin, properties: JSONObject) -> Bool {
        (self.visibility?.allows(properties, name: kind.name, actor: origin.actor) ?? true)
            && (self.scope?.allows(properties, name: kind.name, actor: origin.actor) ?? true)
            && (self.filter.isEmpty || Subscription.passes(self.filter, name: kind.name, origin: origin, properties: properties))
    }

    /// Whether the listener is tripped: its vetoes are decided by its `on_timeout` without waiting.
    var isTripped: Bool { self.circuit.withLock { $0.tripped } }

    /// Counts one of its vetoes' outcomes towards its circuit: a timeout adds to the run (and trips
    /// it at `tripAfter`); an answer — valid or not — ends the run and closes the circuit. Other
    /// outcomes (disconnect, shutdown, a full outbox, a skip while tripped) change nothing.
    func note(_ decision: VetoDecision) {
        switch decision {
        case .noAnswer(.timeout):
            self.circuit.withLock { circuit in
                circuit.consecutiveTimeouts += 1
                if circuit.consecutiveTimeouts >= Self.tripAfter { circuit.tripped = true }
            }
        case .allow, .deny, .modify, .noAnswer(.invalidReply):
            self.replied()
        case .noAnswer:
            break
        }
    }

    /// The listener replied (to any veto, even one already decided): its circuit closes and its
    /// vetoes are waited for again.
    func replied() {
        self.circuit.withLock { circuit in
            circuit.consecutiveTimeouts = 0
            circuit.tripped = false
        }
    }

    /// Chain order: highest priority first, then subscription order.
    static func chainOrder(_ a: VetoListener, _ b: VetoListener) -> Bool {
        a.priority != b.priority ? a.priority > b.priority : a.subscription < b.subscription
    }
}

/// A listener's answer to one veto, or why there was none.
enum VetoDecision: Sendable, Equatable {
    case allow
    case deny(reason: String?)
    /// The listener's `set`, already checked against the event's mutable properties.
    case modify(JSONObject)
    /// No valid answer: the listener's `on_timeout` decides.
    case noAnswer(NoAnswer)

    enum NoAnswer: String, Sendable {
        case timeout, disconnected, invalidReply = "invalid_reply", shutdown
        /// The listener's unwritten output was at its bound (`--max-queued-bytes`): the veto was
        /// not sent, nor waited for.
        case outboxFull = "outbox_full"
        /// The listener is tripped (`VetoListener.tripAfter`): the veto was sent, not waited for.
        case tripped
    }
}

/// One veto waiting for one listener's reply. Resolved exactly once: by a reply, its timeout, the
/// listener's disconnect, or shutdown — whichever comes first.
///
/// It can be awaited from async code (a scheduled timeout resumes the continuation) or waited on
/// from a SQLite thread (a semaphore with a timeout): a vetoable event fired in the middle of SQL
/// work blocks only that connection's thread, which is the connection's own.
final class PendingVeto: Sendable {
    let seq: Int64
    let listener: VetoListener
    let mutable: Set<String>
    /// When the veto was sent, for the latency figures.
    let askedAt = ContinuousClock.now

    private enum State {
        case waiting(CheckedContinuation<VetoDecision, Never>?)
        case resolved(VetoDecision)
    }

    private let state = Mutex(State.waiting(nil))
    private let semaphore = DispatchSemaphore(value: 0)
    /// Set once resolved: what a SQLite thread polls before it goes to sleep on the semaphore.
    private let isResolved = Atomic<Bool>(false)
    /// How long a SQLite thread polls for the reply before it sleeps. A listener on the same
    /// machine often answers within this; a thread that never slept needs no wake-up, which is
    /// most of what a veto costs beyond the round trip itself (measured in `scripts/bench`).
    static let pollBeforeSleeping: Duration = .microseconds(150)

    init(seq: Int64, listener: VetoListener, mutable: Set<String>) {
        self.seq = seq
        self.listener = listener
        self.mutable = mutable
    }

    /// Resolves the veto; returns `false` if it was already resolved.
    @discardableResult
    func resolve(_ decision: VetoDecision) -> Bool {
        let outcome = self.state.withLock { state -> (Bool, CheckedContinuation<VetoDecision, Never>?) in
            guard case .waiting(let continuation) = state else { return (false, nil) }
            state = .resolved(decision)
            return (true, continuation)
        }
        guard outcome.0 else { return false }
        self.isResolved.store(true, ordering: .releasing)
        outcome.1?.resume(returning: decision)
        self.semaphore.signal()
        return true
    }

    private var decision: VetoDecision? {
        self.state.withLock { state in
            if case .resolved(let decision) = state { return decision }
            return nil
        }
    }

    /// Blocks the calling (non-cooperative) thread until resolved or `timeout` passes.
    func waitBlocking(timeout: Duration) -> VetoDecision {
        let clock = ContinuousClock()
        let start = clock.now
        let pollUntil = start + min(timeout, Self.pollBeforeSleeping)
        while !self.isResolved.load(ordering: .acquiring) && clock.now < pollUntil {
            sched_yield()  // the core goes to whoever else is runnable: the event loop, the listener
        }
        if self.isResolved.load(ordering: .acquiring), let decision = self.decision { return decision }
        let timeout = timeout - (clock.now - start)
        let nanoseconds = max(0, timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000)
        if self.semaphore.wait(timeout: .now() + .nanoseconds(Int(nanoseconds))) == .timedOut {
            self.resolve(.noAnswer(.timeout))
        }
        return self.decision ?? .noAnswer(.timeout)
    }

    /// Suspends until resolved or `timeout` passes.
    func wait(timeout: Duration, on eventLoop: any EventLoop) async -> VetoDecision {
        let nanoseconds = timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000
        let timer = eventLoop.scheduleTask(in: .nanoseconds(max(0, nanoseconds))) {
            self.resolve(.noAnswer(.timeout))
        }
        defer { timer.cancel() }
        return await withCheckedContinuation { (continuation: CheckedContinuation<VetoDecision, Never>) in
            let resolved = self.state.withLock { state -> VetoDecision? in
                switch state {
                case .resolved(let decision): return decision
                case .waiting: state = .waiting(continuation); return nil
                }
            }
            if let resolved { continuation.resume(returning: resolved) }
        }
    }
}

/// The vetoes waiting for replies, by listener session and seq: where `reply` finds its veto.
final class PendingVetoes: Sendable {
    private struct Key: Hashable {
        let session: UInt64
        let seq: Int64
    }

    private let pending = Mutex<[Key: PendingVeto]>([:])

    func add(_ veto: PendingVeto) {
        self.pending.withLock { $0[Key(session: veto.listener.session, seq: veto.seq)] = veto }
    }

    func remove(_ veto: PendingVeto) {
        _ = self.pending.withLock { $0.removeValue(forKey: Key(session: veto.listener.session, seq: veto.seq)) }
    }

    /// The veto `session` was asked with `seq`, if it is still pending.
    func find(session: UInt64, seq: Int64) -> PendingVeto? {
        self.pending.withLock { $0[Key(session: session, seq: seq)] }
    }

    /// Resolves every veto pending for `session` (it disconnected): at once, not at their timeout.
    func resolveAll(session: UInt64, _ decision: VetoDecision) {
        let vetoes = self.pending.withLock { pending in pending.values.filter { $0.listener.session == session } }
        for veto in vetoes { veto.resolve(decision) }
    }

    /// Resolves every pending veto (shutdown).
    func resolveAll(_ decision: VetoDecision) {
        let vetoes = self.pending.withLock { Array($0.values) }
        for veto in vetoes { veto.resolve(decision) }
    }

    var count: Int { self.pending.withLock { $0.count } }
}

/// What a veto chain decided.
struct VetoVerdict: Sendable {
    /// The properties after every modification.
    var properties: JSONObject
    /// `allow`, `deny` or `modify`: what actually happened.
    var action: String
    var by: String?
    var reason: String?
    /// The decisions of dry-run listeners: `{"by","action","reason"}`.
    var dryRun: [JSONValue] = []
    /// The seq the vetoers saw.
    var seq: Int64
    /// What each listener that modified the properties may see (listeners that see everything
    /// are left out): what it rewrote must stay within it (`SQLPolicy(rewriter:)`).
    var modifiers: [EventVisibility] = []

    var denied: Bool { self.action == "deny" }

    /// The `outcome` object plain subscribers get.
    var outcome: JSONValue {
        [
            "seq": .int(self.seq), "action": .string(self.action), "by": self.by.map(JSONValue.string) ?? .null,
            "reason": self.reason.map(JSONValue.string) ?? .null, "dry_run": .array(self.dryRun),
        ]
    }

    /// The error the client whose work was denied receives.
    func vetoedError(event: String) -> EvdError {
        EvdError(
            .vetoed, "\(event) was vetoed" + (self.by.map { " by \($0)" } ?? "") + (self.reason.map { ": \($0)" } ?? ""),
            extra: [
                "event": .string(event), "by": self.by.map(JSONValue.string) ?? .null,
                "reason": self.reason.map(JSONValue.string) ?? .null,
            ])
    }
}

/// One operation's veto budget (PROTOCOL.md §4: "one operation's vetoes together never take longer
/// than the daemon's veto budget"): the session gives each request one (`$current`), and every chain
/// the request runs — `checkout`, `before_execute`, each statement's events, `commit` — draws on it.
/// Only the time spent waiting for vetoes is spent, not the SQL work between them.
final class OperationVetoBudget: Sendable {
    /// The budget of the request running in this task. SQLite threads do not see it: what runs
    /// there takes it along when it is created (see `SQLRun.operationBudget`).
    @TaskLocal static var current: OperationVetoBudget?

    private let left: Mutex<Duration>

    init(_ budget: Duration) {
        self.left = Mutex(budget)
    }

    /// What is left of it, at most `cap` (the daemon's budget for one chain).
    func remaining(cap: Duration) -> Duration { min(cap, self.left.withLock { $0 }) }

    func spend(_ elapsed: Duration) { self.left.withLock { $0 -= elapsed } }
}

/// One run of a veto chain: asks listeners one at a time (highest priority first), each seeing the
/// properties as modified by those before; the first enforced `deny` ends it; the daemon's budget
/// caps the whole run. The same logic serves async callers and SQLite threads: they differ only in
/// how they wait for each `PendingVeto` (see `EventBus.decide` and `decideBlocking`).
struct VetoRun {
    let kind: EventKind
    let origin: EventOrigin
    let listeners: [VetoListener]
    let deadline: ContinuousClock.Instant
    private(set) var verdict: VetoVerdict
    private var index = 0
    private var finished = false

    init(kind: EventKind, seq: Int64, origin: EventOrigin, properties: JSONObject, listeners: [VetoListener], budget: Duration) {
        self.kind = kind
        self.origin = origin
        self.listeners = listeners
        self.deadline = .now + budget
        self.verdict = VetoVerdict(properties: properties, action: "allow", seq: seq)
    }

    /// The next listener to ask and how long it may take, or `nil` when the chain has ended.
    mutating func next() -> (VetoListener, Duration)? {
        guard !self.finished, self.index < self.listeners.count else { return nil }
        let listener = self.listeners[self.index]
        self.index += 1
        let remaining = self.deadline - .now
        if remaining <= .zero {
            // The budget is spent: the veto that was pending already resolved by its listener's
            // on_timeout; this and later listeners are not asked (PROTOCOL.md §4), and their own
            // on_timeout plays no part.
            self.finished = true
            return nil
        }
        return (listener, min(listener.timeout, remaining))
    }

    /// Applies one listener's decision.
    mutating func record(_ decision: VetoDecision, from listener: VetoListener) {
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
            case .deny(let why): action = "deny"; reason = why ?? reason
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
            self.finished = true
        case .modify(let set):
            for (key, value) in set { self.verdict.properties[key] = value }
            self.verdict.action = "modify"
            self.verdict.by = listener.name
            if let visibility = listener.visibility { self.verdict.modifiers.append(visibility) }
        }
    }
}

/// Veto counters and a latency distribution for `stats`.
final class VetoStats: Sendable {
    let asked = Atomic<Int>(0)
    let allowed = Atomic<Int>(0)
    let denied = Atomic<Int>(0)
    let modified = Atomic<Int>(0)
    let timedOut = Atomic<Int>(0)
    let invalidReplies = Atomic<Int>(0)
    let dryRunDenied = Atomic<Int>(0)
    /// Vetoes decided by `on_timeout` at once because the listener's output was at its bound
    /// (`stats.vetoes.skipped_outbox_full`): not sent, not counted in `asked`.
    let skippedOutboxFull = Atomic<Int>(0)
    /// Vetoes decided by `on_timeout` at once because the listener was tripped
    /// (`stats.vetoes.skipped_tripped`): sent, not waited for, not counted in `asked`.
    let skippedTripped = Atomic<Int>(0)
    /// Reply latencies in power-of-two microsecond buckets: bucket i holds [2^i, 2^(i+1)) µs.
    private let buckets = Mutex<[Int]>(Array(repeating: 0, count: 32))
    /// Also told each latency (the Prometheus histogram, `evd_veto_latency_seconds`). A veto has
    /// waited for its listener's reply already: a lock more here is on no event's path.
    private let observeLatency: (@Sendable (Duration) -> Void)?

    init(observeLatency: (@Sendable (Duration) -> Void)? = nil) {
        self.observeLatency = observeLatency
    }

    func record(_ decision: VetoDecision, dryRun: Bool, since asked: ContinuousClock.Instant) {
        switch decision {
        case .noAnswer(.outboxFull):
            self.skippedOutboxFull.add(1, ordering: .relaxed)
            return  // nobody was waited for: no latency
        case .noAnswer(.tripped):
            self.skippedTripped.add(1, ordering: .relaxed)
            return
        case .allow: self.allowed.add(1, ordering: .relaxed)
        case .deny:
            self.denied.add(1, ordering: .relaxed)
            if dryRun { self.dryRunDenied.add(1, ordering: .relaxed) }
        case .modify: self.modified.add(1, ordering: .relaxed)
        case .noAnswer(let why):
            if why == .invalidReply { self.invalidReplies.add(1, ordering: .relaxed) } else { self.timedOut.add(1, ordering: .relaxed) }
        }
        let elapsed = ContinuousClock.now - asked
        let micros = max(1, elapsed.components.seconds * 1_000_000 + elapsed.components.attoseconds / 1_000_000_000_000)
        let bucket = min(31, 63 - micros.leadingZeroBitCount)
        self.buckets.withLock { $0[bucket] += 1 }
        self.observeLatency?(elapsed)
    }

    /// The counters and the latency percentiles (upper bounds of their buckets, in µs).
    var jsonValue: JSONValue {
        let buckets = self.buckets.withLock { $0 }
        let total = buckets.reduce(0, +)
        func percentile(_ p: Double) -> JSONValue {
            guard total > 0 else { return .null }
            var seen = 0
            for (i, count) in buckets.enumerated() {
                seen += count
                if Double(seen) >= p * Double(total) { return .integer(1 << (i + 1)) }
            }
            return .null
        }
        return [
            "asked": .integer(self.asked.load(ordering: .relaxed)),
            "allowed": .integer(self.allowed.load(ordering: .relaxed)),
            "denied": .integer(self.denied.load(ordering: .relaxed)),
            "modified": .integer(self.modified.load(ordering: .relaxed)),
            "timed_out": .integer(self.timedOut.load(ordering: .relaxed)),
            "invalid_replies": .integer(self.invalidReplies.load(ordering: .relaxed)),
            "dry_run_denied": .integer(self.dryRunDenied.load(ordering: .relaxed)),
            "skipped_outbox_full": .integer(self.skippedOutboxFull.load(ordering: .relaxed)),
            "skipped_tripped": .integer(self.skippedTripped.load(ordering: .relaxed)),
            "latency_us": ["p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99), "max": percentile(1.0)],
        ]
    }
}
