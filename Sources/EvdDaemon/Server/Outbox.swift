import OrderedCollections
import DequeModule
import EvdClient
import NIOCore
import Synchronization

/// What a subscriber does when its queue is full (PROTOCOL.md §5).
public enum OverflowPolicy: String, Sendable {
    /// Send notice `lagged` with the last seq it received, then close the connection.
    case disconnect
    /// Discard events, and later send notice `lagged` with how many and which were dropped.
    case drop
}

/// Bounds on one connection's queued output.
public struct OutboxLimits: Sendable {
    /// Events queued for one subscription before its overflow policy applies.
    public var maxEventsPerSubscription: Int
    /// Bytes of events queued for the connection before the overflow policy applies.
    public var maxBytes: Int

    public init(maxEventsPerSubscription: Int = 10_000, maxBytes: Int = 16 << 20) {
        self.maxEventsPerSubscription = maxEventsPerSubscription
        self.maxBytes = maxBytes
    }
}

/// One event queued for one subscription: the shared bytes around the subscription's number.
///
/// `prefix` and `body` are the same arrays for every subscriber of the event (copy-on-write shares
/// them), so an event is serialized once however many subscribe.
struct QueuedEvent {
    let prefix: [UInt8]
    let subscription: Int
    let body: [UInt8]
    let seq: Int64
    var byteCount: Int { self.prefix.count + self.body.count + 8 }
}

/// One piece of a connection's output, in the order it must be written.
enum OutboundChunk {
    case line([UInt8])
    case event(QueuedEvent)

    /// Appends the chunk's bytes to `buffer`.
    func write(into buffer: inout ByteBuffer) {
        switch self {
        case .line(let bytes):
            buffer.writeBytes(bytes)
        case .event(let event):
            buffer.writeBytes(event.prefix)
            var digits: [UInt8] = []
            JSONWriter.appendInt(Int64(event.subscription), to: &digits)
            buffer.writeBytes(digits)
            buffer.writeBytes(event.body)
        }
    }

    var byteCount: Int {
        switch self {
        case .line(let bytes): return bytes.count
        case .event(let event): return event.byteCount
        }
    }
}

/// A connection's outbound queue: responses, notices and events, drained by one writer task.
///
/// Producers (the request executor, and any thread publishing an event) never wait: events beyond
/// the limits trigger the subscription's overflow policy instead, so a subscriber that stops reading
/// cannot slow anyone's database work. The writer takes everything queued at once and writes it
/// with one flush, so events are batched into few syscalls under load.
final class Outbox: Sendable {
    /// A batch for the writer.
    struct Batch {
        var chunks: [OutboundChunk]
        /// Close the connection after writing this batch (a `lagged` disconnect, or shutdown).
        var closeAfter: Bool
    }

    private struct DropRecord {
        var count: Int
        var from: Int64
        var to: Int64
    }

    private struct State {
        var chunks: Deque<OutboundChunk> = []
        var queuedEvents: [Int: Int] = [:]
        var queuedBytes = 0
        /// The last seq handed to the writer, per subscription: what `lagged` reports as `last_seq`.
        var lastDelivered: [Int: Int64] = [:]
        var drops: [Int: DropRecord] = [:]
        var writer: CheckedContinuation<Batch?, Never>?
        /// No more output is accepted; the writer ends after what is queued.
        var closing = false
        /// The writer closes the connection after the final batch.
        var closeConnection = false
        /// A subscription overflowed with `on_overflow: disconnect`.
        var laggedOut = false
        /// The session's watcher, waiting in `closed()`.
        var closeWatcher: CheckedContinuation<Bool, Never>?
    }

    private let state = Mutex(State())
    let limits: OutboxLimits
    let stats: DeliveryStats

    init(limits: OutboxLimits, stats: DeliveryStats) {
        self.limits = limits
        self.stats = stats
    }

    /// Queues a response or notice line (never dropped).
    func enqueue(line: [UInt8]) {
        let writer = self.state.withLock { state -> (CheckedContinuation<Batch?, Never>, Batch)? in
            guard !state.closing else { return nil }
            state.chunks.append(.line(line))
            return Self.takeWaitingWriter(&state)
        }
        if let (continuation, batch) = writer { continuation.resume(returning: batch) }
    }

    /// Queues an event for `subscription`, applying its overflow policy when the queue is full.
    ///
    /// Returns the writer to wake, if one is waiting: the caller resumes it after releasing its own
    /// locks (see `EventBus.publish`).
    func enqueue(event: QueuedEvent, policy: OverflowPolicy) -> Wakeup? {
        self.state.withLock { state -> Wakeup? in
            guard !state.closing else { return nil }
            let queued = state.queuedEvents[event.subscription, default: 0]
            if queued >= self.limits.maxEventsPerSubscription || state.queuedBytes + event.byteCount > self.limits.maxBytes {
                switch policy {
                case .disconnect:
                    self.stats.laggedDisconnects.add(1, ordering: .relaxed)
                    self.stats.dropped.add(queued + 1, ordering: .relaxed)
                    // Drop the queued events (the client resumes with `since`), keep responses, say why, close.
                    // Nothing delivered yet: `last_seq` is the seq before the first event it misses,
                    // so that resuming with `since: last_seq` still misses nothing.
                    let firstMissed = state.chunks.lazy.compactMap { chunk -> Int64? in
                        guard case .event(let queued) = chunk, queued.subscription == event.subscription else { return nil }
                        return queued.seq
                    }.first ?? event.seq
                    let last = state.lastDelivered[event.subscription] ?? firstMissed - 1
                    state.chunks.removeAll { if case .event = $0 { return true } else { return false } }
                    state.queuedEvents = [:]
                    state.queuedBytes = 0
                    let notice: JSONValue = [
                        "type": "notice", "code": "lagged", "subscription": .integer(event.subscription), "last_seq": .int(last),
                    ]
                    state.chunks.append(.line(notice.jsonBytes + [0x0a]))
                    state.closing = true
                    state.closeConnection = true
                    state.laggedOut = true
                    // Resuming only schedules the watcher's task, so it is safe under the lock.
                    state.closeWatcher?.resume(returning: true)
                    state.closeWatcher = nil
                case .drop:
                    self.stats.dropped.add(1, ordering: .relaxed)
                    if var record = state.drops[event.subscription] {
                        record.count += 1
                        record.to = event.seq
                        state.drops[event.subscription] = record
                    } else {
                        state.drops[event.subscription] = DropRecord(count: 1, from: event.seq, to: event.seq)
                    }
                    return nil
                }
                return Self.takeWaitingWriter(&state).map(Wakeup.init)
            }
            if let record = state.drops.removeValue(forKey: event.subscription) {
                let notice: JSONValue = [
                    "type": "notice", "code": "lagged", "subscription": .integer(event.subscription),
                    "dropped": .integer(record.count), "from": .int(record.from), "to": .int(record.to),
                ]
                state.chunks.append(.line(notice.jsonBytes + [0x0a]))
            }
            state.chunks.append(.event(event))
            state.queuedEvents[event.subscription] = queued + 1
            state.queuedBytes += event.byteCount
            self.stats.delivered.add(1, ordering: .relaxed)
            return Self.takeWaitingWriter(&state).map(Wakeup.init)
        }
    }

    /// Stops accepting output; the writer ends once what is queued is written.
    func close(closeConnection: Bool = true) {
        typealias Wake = (CheckedContinuation<Batch?, Never>?, CheckedContinuation<Bool, Never>?, Bool)
        let (writer, watcher, laggedOut) = self.state.withLock { state -> Wake in
            state.closing = true
            state.closeConnection = state.closeConnection || closeConnection
            let watcher = state.closeWatcher
            state.closeWatcher = nil
            guard state.chunks.isEmpty, let writer = state.writer else { return (nil, watcher, state.laggedOut) }
            state.writer = nil
            return (writer, watcher, state.laggedOut)
        }
        writer?.resume(returning: nil)
        watcher?.resume(returning: laggedOut)
    }

    /// Waits until the outbox stops accepting output; returns whether that is because a
    /// subscription lagged out (rather than the session ending or the daemon stopping).
    func closed() async -> Bool {
        await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let now: Bool? = self.state.withLock { state in
                if state.closing { return state.laggedOut }
                state.closeWatcher = continuation
                return nil
            }
            if let now { continuation.resume(returning: now) }
        }
    }

    /// Whether the outbox stopped accepting output (closed, or a subscription lagged out).
    var isClosing: Bool { self.state.withLock { $0.closing } }

    /// Waits for output and takes all of it; `nil` when the outbox is closed and drained.
    func nextBatch() async -> Batch? {
        if let batch = self.state.withLock({ Self.takeBatch(&$0) }) { return batch }
        return await withCheckedContinuation { (continuation: CheckedContinuation<Batch?, Never>) in
            enum Now { case batch(Batch), end, parked }
            let now: Now = self.state.withLock { state in
                if let batch = Self.takeBatch(&state) { return .batch(batch) }
                if state.closing { return .end }
                state.writer = continuation
                return .parked
            }
            switch now {
            case .batch(let batch): continuation.resume(returning: batch)
            case .end: continuation.resume(returning: nil)
            case .parked: break
            }
        }
    }

    private static func takeBatch(_ state: inout State) -> Batch? {
        guard !state.chunks.isEmpty else { return nil }
        let chunks = Array(state.chunks)
        state.chunks.removeAll(keepingCapacity: true)
        for chunk in chunks {
            if case .event(let event) = chunk { state.lastDelivered[event.subscription] = event.seq }
        }
        state.queuedEvents.removeAll(keepingCapacity: true)
        state.queuedBytes = 0
        return Batch(chunks: chunks, closeAfter: state.closing && state.closeConnection)
    }

    private static func takeWaitingWriter(_ state: inout State) -> (CheckedContinuation<Batch?, Never>, Batch)? {
        guard let writer = state.writer, let batch = takeBatch(&state) else { return nil }
        state.writer = nil
        return (writer, batch)
    }

    /// A writer to resume once the caller's locks are released.
    struct Wakeup {
        let continuation: CheckedContinuation<Batch?, Never>
        let batch: Batch
        init(_ pair: (CheckedContinuation<Batch?, Never>, Batch)) {
            self.continuation = pair.0
            self.batch = pair.1
        }
        func resume() { self.continuation.resume(returning: self.batch) }
    }
}

/// Daemon-wide delivery counters for `stats`.
public final class DeliveryStats: Sendable {
    let delivered = Atomic<Int>(0)
    let dropped = Atomic<Int>(0)
    let laggedDisconnects = Atomic<Int>(0)
    public init() {}
}
