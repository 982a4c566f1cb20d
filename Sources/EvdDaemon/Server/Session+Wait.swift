import EvdClient

/// `wait` (evd's addition, issue 23: read your writes): a client that wrote (its response said the
/// `seq` of its last committed event) and reads through a cache fed by its own subscriptions asks
/// evd to answer once that seq has reached them.
extension Session {
    /// Returns once every event up to `seq` has been delivered: the bus's stable point has passed it,
    /// so each of its events is in the outbox of every subscription it matches (or counted as
    /// dropped for one that overflows), this session's included, ahead of the response that follows.
    /// A replay this session started is done too: requests wait for it (`subscribe`). `timeout`
    /// after `timeoutMs`.
    ///
    /// The stable point is polled, every 0.2 ms at first and then less often (at most every 5 ms):
    /// it is usually past `seq` already (a commit publishes before it answers), and only lags while
    /// another commit holds seqs below it; a wake-up on every publish would cost the hot path
    /// instead.
    func waitForDelivery(through seq: Int64, timeoutMs: Int64) async throws {
        let bus = self.core.bus
        let deadline = ContinuousClock.now + .milliseconds(timeoutMs)
        var pause = Duration.microseconds(200)
        while bus.stableSeq < seq {
            guard ContinuousClock.now < deadline else {
                throw EvdError(
                    .timeout,
                    "events up to seq \(seq) were not all delivered within \(timeoutMs) ms (delivered up to \(bus.stableSeq), newest \(bus.headSeq))",
                    extra: ["seq": .int(seq), "delivered": .int(bus.stableSeq)]
                )
            }
            try await Task.sleep(for: min(pause, deadline - ContinuousClock.now))
            pause = min(pause * 2, .milliseconds(5))
        }
    }
}
