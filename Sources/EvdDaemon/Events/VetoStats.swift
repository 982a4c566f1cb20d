import EvdClient
import Synchronization

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
