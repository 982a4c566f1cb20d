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

/// Bounds on one connection's queued output (`--max-queued-events`, `--max-queued-bytes`).
public struct OutboxLimits: Sendable {
    /// Events queued for one subscription before its overflow policy applies.
    public var maxEventsPerSubscription: Int
    /// The connection's output bound. Events: bytes of them queued before the overflow policy
    /// applies. All output (responses, notices, vetoes and events, queued or being written): bytes
    /// of it unwritten at which evd stops running the connection's requests and reading from it,
    /// until the client has read enough (`Outbox.hasRoom`).
    public var maxBytes: Int

    /// What `--max-queued-events` accepts.
    public static let eventsRange = 1...Int.max
    /// What `--max-queued-bytes` accepts: at least 64 KiB, since an event larger than the bound
    /// overflows even an empty queue.
    public static let bytesRange = (64 << 10)...Int.max

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

/// A page of replayed events, as the lines its subscriber reads, one after another
/// (`ReplayPage`, which the server reads from the journal).
protocol ReplayedEvents: Sendable {
    var subscription: Int { get }
    /// The events' lines.
    var bytes: [UInt8] { get }
    /// How many events the lines hold.
    var count: Int { get }
    /// The seq of the first event, and of the last (0 when there is none).
    var firstSeq: Int64 { get }
    var lastSeq: Int64 { get }
}

/// One piece of a connection's output, in the order it must be written.
enum OutboundChunk {
    case line([UInt8])
    case event(QueuedEvent)
    /// Consecutive events of one subscription, already written out whole (a page of a replay).
    case events(any ReplayedEvents)
    /// Consecutive events of a run for one subscription, written out when taken.
    case run(RunDelivery)

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
        case .events(let page):
            buffer.writeBytes(page.bytes)
        case .run(let run):
            run.write(into: &buffer)
        }
    }

    var byteCount: Int {
        switch self {
        case .line(let bytes): return bytes.count
        case .event(let event): return event.byteCount
        case .events(let page): return page.bytes.count
        case .run(let run): return run.byteCount
        }
    }

    /// The subscription and first seq of the events it holds (`nil`: a line).
    var firstEvent: (subscription: Int, seq: Int64)? {
        switch self {
        case .line: return nil
        case .event(let event): return (event.subscription, event.seq)
        case .events(let page): return (page.subscription, page.firstSeq)
        case .run(let run): return (run.subscription, run.firstSeq)
        }
    }
}

/// A connection's outbound queue: responses, notices and events, drained on the connection's event loop.
///
/// Producers (the request executor, and any thread publishing an event) never wait: events beyond
/// the limits trigger the subscription's overflow policy instead, so a subscriber that stops reading
/// cannot slow anyone's database work. The first producer to queue into an idle outbox schedules
/// one flush on the event loop (`attach(flush:)`); the flush takes everything queued by then and
/// writes it with one syscall, so events are batched under load and a lone message costs one hop.
///
/// **Backpressure.** Responses are never dropped, so they are bounded another way: every byte
/// not yet written — queued here or handed to the channel and not yet written to the socket —
/// counts against `limits.maxBytes`, and while the connection is at that bound its session runs
/// no further request (`waitForRoom()`) and its handler reads nothing (`hasRoom`). A client that
/// pipelines requests and never reads the answers is thus held at the bound plus one response
/// (`--max-response-bytes`) instead of growing evd's memory without limit.
final class Outbox: Sendable {
    /// What the event loop's flush takes.
    enum Take {
        /// Output to write (`bytes` of it: hand them back to `written(bytes:)` once written);
        /// close the connection afterwards if `closeAfter`.
        case batch([OutboundChunk], bytes: Int, closeAfter: Bool)
        /// The outbox is closed and drained: close the connection.
        case close
        /// Nothing to do.
        case idle
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
        /// The last seq taken for writing, per subscription: what `lagged` reports as `last_seq`.
        var lastDelivered: [Int: Int64] = [:]
        var drops: [Int: DropRecord] = [:]
        /// Schedules a flush on the connection's event loop; `nil` until the connection is attached.
        var flush: (@Sendable () -> Void)?
        /// A flush is scheduled and has not yet taken the queue.
        var flushScheduled = false
        /// No more output is accepted; the connection closes after what is queued is written.
        var closing = false
        /// A subscription overflowed with `on_overflow: disconnect`.
        var laggedOut = false
        /// The session's watcher, waiting in `closed()`.
        var closeWatcher: CheckedContinuation<Bool, Never>?
        /// Live events of subscriptions whose replay is running: they follow the replay (`event`
        /// and `run` chunks).
        var parked: [Int: Deque<OutboundChunk>] = [:]
        /// How many events `parked` holds, per subscription.
        var parkedEvents: [Int: Int] = [:]
        /// The bytes of `parked` (part of `queuedBytes`).
        var parkedBytes = 0
        /// A replay waiting in `drained()` for the queue to be written.
        var drainWaiters: [CheckedContinuation<Void, Never>] = []
        /// Where a line is written at once by whoever queues it, when nothing is ahead of it.
        var writeThrough: WriteThrough?
        /// Batches taken by the event loop whose write has not completed (`written()`).
        var inFlight = 0
        /// The bytes of those batches.
        var inFlightBytes = 0
        /// Every byte the event loop has written to the socket so far: whether the peer reads.
        var writtenBytes = 0
        /// The bytes of the lines (responses, notices, vetoes) in `chunks`.
        var lineBytes = 0
        /// Executors waiting in `waitForRoom()` for the output to fall below the bound.
        var roomWaiters: [CheckedContinuation<Void, Never>] = []

        /// Every byte of output not yet written to the socket: lines and events queued (parked
        /// ones included) and batches being written.
        var unwrittenBytes: Int { self.lineBytes + self.queuedBytes + self.inFlightBytes }
    }

    private let state = Mutex(State())
    let limits: OutboxLimits
    let stats: DeliveryStats

    init(limits: OutboxLimits, stats: DeliveryStats) {
        self.limits = limits
        self.stats = stats
    }

    /// Sets how a flush is scheduled on the connection's event loop, and schedules one for what
    /// was queued before (the `hello`).
    func attach(flush: @escaping @Sendable () -> Void) {
        let wakeup = self.state.withLock { state -> Wakeup? in
            state.flush = flush
            return Self.scheduleFlush(&state)
        }
        wakeup?.resume()
    }

    /// Lets lines be written on the calling thread when nothing is ahead of them (see `WriteThrough`).
    func adopt(_ writeThrough: WriteThrough) {
        self.state.withLock { state in
            if !state.closing { state.writeThrough = writeThrough }
        }
    }

    /// Queues a response, notice or veto line (never dropped: it counts against the output bound
    /// instead, see "Backpressure"). When nothing is queued or being written, the line is written
    /// at once on this thread, and the event loop is not woken.
    func enqueue(line: [UInt8]) {
        let wakeup = self.state.withLock { state -> Wakeup? in
            guard !state.closing else { return nil }
            return Self.queue(&state, line: line)
        }
        wakeup?.resume()
    }

    /// What became of a veto message (`enqueue(veto:)`).
    enum VetoQueued {
        case queued
        /// The connection's unwritten output is at its bound: the message was not queued.
        case full
        /// The outbox is closed (the listener is gone): the message was not queued.
        case closed
    }

    /// Queues a veto message unless it would take the connection's unwritten output beyond its
    /// bound (`limits.maxBytes`, counting every byte not yet written: lines, events, batches being
    /// written). A veto counts against the listener's outbox as events do, but is never dropped
    /// once queued: one that does not fit is not queued at all, and the caller decides it by the
    /// listener's `on_timeout` at once (`VetoDecision.NoAnswer.outboxFull`). So a listener that
    /// never reads holds at most the bound, however many vetoes it is asked. A message larger than
    /// the bound is queued when nothing else is unwritten, as it could never be otherwise.
    func enqueue(veto line: [UInt8]) -> VetoQueued {
        let (queued, wakeup) = self.state.withLock { state -> (VetoQueued, Wakeup?) in
            guard !state.closing else { return (.closed, nil) }
            let unwritten = state.unwrittenBytes
            guard unwritten == 0 || unwritten + line.count <= self.limits.maxBytes else { return (.full, nil) }
            return (.queued, Self.queue(&state, line: line))
        }
        wakeup?.resume()
        return queued
    }

    /// Queues a line (the outbox is open): written at once on this thread when nothing is queued
    /// or being written, else queued behind the rest; returns the flush to schedule, if any.
    private static func queue(_ state: inout State, line: [UInt8]) -> Wakeup? {
        var line = line
        if let writeThrough = state.writeThrough, state.chunks.isEmpty, state.inFlight == 0 {
            switch writeThrough.write(line) {
            case .all: return nil
            case .part(let count): line.removeFirst(count)
            }
        }
        state.lineBytes += line.count
        state.chunks.append(.line(line))
        return Self.scheduleFlush(&state)
    }

    /// The event loop finished writing a batch of `bytes` that `take()` returned.
    func written(bytes: Int) {
        let waiters = self.state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.inFlight -= 1
            state.inFlightBytes -= bytes
            state.writtenBytes &+= bytes
            return Self.takeRoomWaiters(&state, bound: self.limits.maxBytes)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Every byte written to the socket so far.
    var writtenBytes: Int { self.state.withLock { $0.writtenBytes } }

    // MARK: Backpressure

    /// Whether the connection's unwritten output is below the bound (or the outbox is closing, when
    /// nothing more will be written anyway): the handler reads from the socket only then.
    ///
    /// Asked by the event loop before every read, so it does not wait for the lock: while the
    /// session's thread holds it (writing a response through to the socket, the common case), the
    /// answer is yes. Waiting there cost every request two context switches (the single-row
    /// round trip went from ~33 to ~80 µs). The bound still holds: the session runs no request
    /// while the output is at it (`waitForRoom`, which does wait), and what the handler reads
    /// meanwhile is bounded by the inbox (`--max-pending-requests`).
    var hasRoom: Bool {
        self.state.withLockIfAvailable { $0.closing || $0.unwrittenBytes < self.limits.maxBytes } ?? true
    }

    /// Waits until the connection's unwritten output is below the bound (or the outbox closes):
    /// the session runs its next request only then. Returns at once when it is.
    func waitForRoom() async {
        let room = self.state.withLock { $0.closing || $0.unwrittenBytes < self.limits.maxBytes }
        guard !room else { return }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = self.state.withLock { state -> Bool in
                if state.closing || state.unwrittenBytes < self.limits.maxBytes { return true }
                state.roomWaiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    /// The waiters to resume, when the output has fallen below `bound` (or the outbox is closing).
    private static func takeRoomWaiters(_ state: inout State, bound: Int) -> [CheckedContinuation<Void, Never>] {
        guard !state.roomWaiters.isEmpty, state.closing || state.unwrittenBytes < bound else { return [] }
        defer { state.roomWaiters = [] }
        return state.roomWaiters
    }

    /// Queues an event for `subscription`, applying its overflow policy when the queue is full.
    ///
    /// Returns the flush to schedule, if none is: the caller runs it after releasing its own
    /// locks (see `EventBus.publish`).
    func enqueue(event: QueuedEvent, policy: OverflowPolicy) -> Wakeup? {
        self.state.withLock { state -> Wakeup? in
            guard !state.closing else { return nil }
            let queued = state.queuedEvents[event.subscription, default: 0] + state.parkedEvents[event.subscription, default: 0]
            if queued >= self.limits.maxEventsPerSubscription || state.queuedBytes + event.byteCount > self.limits.maxBytes {
                return self.overflow(&state, subscription: event.subscription, policy: policy, queued: queued, from: event.seq, to: event.seq)
            }
            return self.append(&state, .event(event), subscription: event.subscription, events: 1, bytes: event.byteCount)
        }
    }

    /// Queues a run's events for their subscription: those that fit, then (when the queue is
    /// full) the subscription's overflow policy for the rest, as if they came one at a time.
    func enqueue(run: RunDelivery, policy: OverflowPolicy) -> Wakeup? {
        guard run.count > 0 else { return nil }
        return self.state.withLock { state -> Wakeup? in
            guard !state.closing else { return nil }
            let subscription = run.subscription
            let queued = state.queuedEvents[subscription, default: 0] + state.parkedEvents[subscription, default: 0]
            var fits = min(run.count, max(0, self.limits.maxEventsPerSubscription - queued))
            let bytes = run.byteCount
            if fits == run.count, state.queuedBytes + bytes <= self.limits.maxBytes {
                return self.append(&state, .run(run), subscription: subscription, events: run.count, bytes: bytes)
            }
            // Events take about the same room each: as many as the bytes left allow.
            let room = self.limits.maxBytes - state.queuedBytes
            fits = min(fits, room <= 0 ? 0 : Int(Int64(room) * Int64(run.count) / Int64(max(1, bytes))))
            var wakeup: Wakeup?
            if fits > 0 {
                let part = run.prefix(fits)
                wakeup = self.append(&state, .run(part), subscription: subscription, events: fits, bytes: part.byteCount)
            }
            let more = self.overflow(
                &state, subscription: subscription, policy: policy, queued: queued + fits, from: run.firstSeq + Int64(fits),
                to: run.lastSeq, count: run.count - fits)
            return wakeup ?? more
        }
    }

    /// Queues a chunk of events that fit (parked while the subscription's replay runs).
    private func append(_ state: inout State, _ chunk: OutboundChunk, subscription: Int, events: Int, bytes: Int) -> Wakeup? {
        if state.parked[subscription] != nil {
            state.parked[subscription]!.append(chunk)
            state.parkedEvents[subscription, default: 0] += events
            state.queuedBytes += bytes
            state.parkedBytes += bytes
            return nil
        }
        if let record = state.drops.removeValue(forKey: subscription) {
            let notice: JSONValue = [
                "type": "notice", "code": "lagged", "subscription": .integer(subscription),
                "dropped": .integer(record.count), "from": .int(record.from), "to": .int(record.to),
            ]
            Self.appendLine(&state, notice.jsonBytes + [0x0a])
        }
        state.chunks.append(chunk)
        state.queuedEvents[subscription, default: 0] += events
        state.queuedBytes += bytes
        self.stats.delivered.add(events, ordering: .relaxed)
        return Self.scheduleFlush(&state)
    }

    /// A subscription's queue is full for events `from...to` (`count` of them): its overflow
    /// policy decides. `queued`: how many of its events are queued.
    private func overflow(
        _ state: inout State, subscription: Int, policy: OverflowPolicy, queued: Int, from: Int64, to: Int64, count: Int = 1
    ) -> Wakeup? {
        switch policy {
        case .disconnect:
            self.stats.laggedDisconnects.add(1, ordering: .relaxed)
            self.stats.dropped.add(queued + count, ordering: .relaxed)
            // Drop the queued events (the client resumes with `since`), keep responses, say why, close.
            // Nothing delivered yet: `last_seq` is the seq before the first event it misses,
            // so that resuming with `since: last_seq` still misses nothing.
            let parkedFirst = state.parked[subscription]?.lazy.compactMap { $0.firstEvent?.seq }.first
            let firstMissed =
                state.chunks.lazy.compactMap { chunk -> Int64? in
                    guard let first = chunk.firstEvent, first.subscription == subscription else { return nil }
                    return first.seq
                }.first ?? parkedFirst ?? from
            let last = state.lastDelivered[subscription] ?? firstMissed - 1
            state.chunks.removeAll { if case .line = $0 { return false } else { return true } }
            state.queuedEvents = [:]
            state.queuedBytes = 0
            state.parked = [:]
            state.parkedEvents = [:]
            state.parkedBytes = 0
            let notice: JSONValue = [
                "type": "notice", "code": "lagged", "subscription": .integer(subscription), "last_seq": .int(last),
            ]
            Self.appendLine(&state, notice.jsonBytes + [0x0a])
            state.closing = true
            state.writeThrough = nil
            state.laggedOut = true
            // Resuming only schedules the watcher's and the waiters' tasks, so it is safe under the lock.
            state.closeWatcher?.resume(returning: true)
            state.closeWatcher = nil
            for waiter in Self.takeRoomWaiters(&state, bound: self.limits.maxBytes) { waiter.resume() }
            return Self.scheduleFlush(&state)
        case .drop:
            self.stats.dropped.add(count, ordering: .relaxed)
            if var record = state.drops[subscription] {
                record.count += count
                record.to = to
                state.drops[subscription] = record
            } else {
                state.drops[subscription] = DropRecord(count: count, from: from, to: to)
            }
            return nil
        }
    }

    // MARK: Replay

    /// Holds `subscription`'s live events back while its replay runs; `since` counts as delivered
    /// (what `lagged` reports if it overflows before the replay delivered anything).
    func park(_ subscription: Int, after since: Int64) {
        self.state.withLock { state in
            state.parked[subscription] = []
            state.parkedEvents[subscription] = 0
            state.lastDelivered[subscription] = since
        }
    }

    /// Queues a page of replayed events (bounded by the replay itself, which waits in `drained()`).
    func enqueue(replayed page: any ReplayedEvents) {
        guard page.count > 0 else { return }
        let wakeup = self.state.withLock { state -> Wakeup? in
            guard !state.closing else { return nil }
            state.chunks.append(.events(page))
            state.queuedBytes += page.bytes.count
            self.stats.delivered.add(page.count, ordering: .relaxed)
            return Self.scheduleFlush(&state)
        }
        wakeup?.resume()
    }

    /// The replay is over: the live events held back for `subscription` follow it.
    func unpark(_ subscription: Int) {
        let wakeup = self.state.withLock { state -> Wakeup? in
            let events = state.parkedEvents.removeValue(forKey: subscription) ?? 0
            guard let parked = state.parked.removeValue(forKey: subscription), !parked.isEmpty else { return nil }
            for chunk in parked {
                state.chunks.append(chunk)
                state.parkedBytes -= chunk.byteCount
            }
            state.queuedEvents[subscription, default: 0] += events
            self.stats.delivered.add(events, ordering: .relaxed)
            return Self.scheduleFlush(&state)
        }
        wakeup?.resume()
    }

    /// Waits until everything queued has been handed to the connection (or the outbox closed):
    /// a replay's backpressure.
    func drained() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = self.state.withLock { state -> Bool in
                if state.closing || state.chunks.isEmpty { return true }
                state.drainWaiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    /// Stops accepting output; the connection closes once what is queued is written.
    func close() {
        let (wakeup, watcher, laggedOut, waiters) = self.state.withLock { state in
            state.closing = true
            state.writeThrough = nil
            let watcher = state.closeWatcher
            state.closeWatcher = nil
            let waiters = state.drainWaiters + Self.takeRoomWaiters(&state, bound: self.limits.maxBytes)
            state.drainWaiters = []
            return (Self.scheduleFlush(&state), watcher, state.laggedOut, waiters)
        }
        wakeup?.resume()
        watcher?.resume(returning: laggedOut)
        for waiter in waiters { waiter.resume() }
    }

    /// The peer is gone: closes the outbox and lets go of everything queued for it (nothing can
    /// be written any more), so that what a listener that never read had queued — vetoes and
    /// events up to the bound — is freed when it dies, not when its session ends.
    func discard() {
        self.close()
        self.state.withLock { state in
            state.chunks = []
            state.queuedEvents = [:]
            state.queuedBytes = 0
            state.lineBytes = 0
            state.parked = [:]
            state.parkedEvents = [:]
            state.parkedBytes = 0
            state.drops = [:]
        }
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

    /// Takes everything queued, for the event loop's flush. Output queued after this schedules
    /// the next flush.
    func take() -> Take {
        let (take, drainWaiters) = self.state.withLock { state -> (Take, [CheckedContinuation<Void, Never>]) in
            state.flushScheduled = false
            guard !state.chunks.isEmpty else { return (state.closing ? .close : .idle, []) }
            let chunks = Array(state.chunks)
            state.chunks.removeAll(keepingCapacity: true)
            var bytes = 0
            for chunk in chunks {
                bytes += chunk.byteCount
                switch chunk {
                case .event(let event): state.lastDelivered[event.subscription] = event.seq
                case .events(let page): state.lastDelivered[page.subscription] = page.lastSeq
                case .run(let run): state.lastDelivered[run.subscription] = run.lastSeq
                case .line: break
                }
            }
            state.queuedEvents.removeAll(keepingCapacity: true)
            state.queuedBytes = state.parkedBytes
            state.lineBytes = 0
            state.inFlight += 1
            state.inFlightBytes += bytes
            defer { state.drainWaiters = [] }
            return (.batch(chunks, bytes: bytes, closeAfter: state.closing), state.drainWaiters)
        }
        for waiter in drainWaiters { waiter.resume() }
        return take
    }

    /// Queues a line the outbox makes itself (a notice), counting its bytes.
    private static func appendLine(_ state: inout State, _ line: [UInt8]) {
        state.lineBytes += line.count
        state.chunks.append(.line(line))
    }

    /// Marks a flush scheduled unless one already is; returns it, to run once the caller's locks
    /// are released (see `EventBus.publish`).
    private static func scheduleFlush(_ state: inout State) -> Wakeup? {
        guard !state.flushScheduled, let flush = state.flush else { return nil }
        state.flushScheduled = true
        return Wakeup(flush: flush)
    }

    /// A flush to schedule once the caller's locks are released.
    struct Wakeup {
        let flush: @Sendable () -> Void
        func resume() { self.flush() }
    }
}

/// Daemon-wide delivery counters for `stats`.
public final class DeliveryStats: Sendable {
    let delivered = Atomic<Int>(0)
    let dropped = Atomic<Int>(0)
    let laggedDisconnects = Atomic<Int>(0)
    public init() {}
}
