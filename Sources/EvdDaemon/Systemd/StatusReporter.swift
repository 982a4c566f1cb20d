/// Tells systemd what evd is doing: a `STATUS=` line with live counts every few seconds, shown by
/// `systemctl status evd` as
///
/// ```
/// Status: "12 sessions, 30 subscriptions, 2 veto listeners, 1520 events/s, seq 48812"
/// ```
///
/// Sessions are the open client connections, subscriptions the live `subscribe`s (a veto
/// subscription counts too), veto listeners those of them that name vetoable events, events/s the
/// seqs used since the previous line divided by the time between the two, and seq the last event's.
/// Made only when `NOTIFY_SOCKET` is set: without systemd nothing runs and nothing is counted.
struct StatusReporter: Sendable {
    /// The counts one line reports.
    struct Counts: Equatable, Sendable {
        var sessions: Int
        var subscriptions: Int
        var vetoListeners: Int
        var seq: Int64
    }

    /// How often a line is sent.
    static let interval: Duration = .seconds(2)

    private let core: DaemonCore
    private let environment: [String: String]

    /// A reporter for `core`, or nil when systemd is not listening (`NOTIFY_SOCKET` unset or empty).
    init?(core: DaemonCore, environment: [String: String]) {
        guard let socket = environment["NOTIFY_SOCKET"], !socket.isEmpty else { return nil }
        self.core = core
        self.environment = environment
    }

    /// Sends a `STATUS=` line every `interval` until the daemon begins to stop or the task is cancelled.
    func run() async {
        var previous = (counts: self.counts(), at: ContinuousClock.now)
        while !Task.isCancelled && !self.core.shuttingDown.load(ordering: .relaxed) {
            try? await Task.sleep(for: Self.interval)
            // The daemon sends its own STATUS with STOPPING=1: a late count must not replace it.
            guard !Task.isCancelled && !self.core.shuttingDown.load(ordering: .relaxed) else { return }
            let now = (counts: self.counts(), at: ContinuousClock.now)
            let rate = Self.rate(from: previous.counts.seq, to: now.counts.seq, over: now.at - previous.at)
            Systemd.notify("STATUS=" + Self.line(now.counts, eventsPerSecond: rate), environment: self.environment)
            previous = now
        }
    }

    /// The daemon's counts now.
    func counts() -> Counts {
        // `statistics()` hands out the per-name counters without copying them (copy on write).
        let (_, subscriptions, head) = self.core.bus.statistics()
        return Counts(
            sessions: self.core.sessions.counts().current,
            subscriptions: subscriptions,
            vetoListeners: self.core.bus.vetoListenerCount,
            seq: head
        )
    }

    /// Events per second between two seqs `elapsed` apart, rounded to the nearest integer.
    static func rate(from start: Int64, to end: Int64, over elapsed: Duration) -> Int64 {
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18
        guard seconds > 0, end > start else { return 0 }
        return Int64((Double(end - start) / seconds).rounded())
    }

    /// `12 sessions, 30 subscriptions, 2 veto listeners, 1520 events/s, seq 48812` (singular for 1).
    static func line(_ counts: Counts, eventsPerSecond: Int64) -> String {
        func count(_ n: Int, _ noun: String) -> String { "\(n) \(noun)\(n == 1 ? "" : "s")" }
        return [
            count(counts.sessions, "session"), count(counts.subscriptions, "subscription"),
            count(counts.vetoListeners, "veto listener"), "\(eventsPerSecond) events/s", "seq \(counts.seq)",
        ].joined(separator: ", ")
    }
}
