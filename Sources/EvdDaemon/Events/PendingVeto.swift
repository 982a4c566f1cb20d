import Dispatch
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

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
                case .waiting:
                    state = .waiting(continuation)
                    return nil
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
