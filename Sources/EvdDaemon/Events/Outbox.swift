import DequeModule
import EvdClient
import NIOCore
import OrderedCollections
import Synchronization

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

    /// The outbox's state: its lifecycle is `phase` (an enum whose two transitions are
    /// `adopt(_:)` and `close(laggedOut:)`); the queue, counts and waiters are data every phase has.
    ///
    /// - **detached** (`flush == nil`): output is queued; `attach` schedules the first flush.
    /// - **open** (`Phase.open`): a flush is scheduled or not (`flushScheduled`); lines are
    ///   written through on the caller's thread (`writeThrough`, set by `adopt`) when nothing is
    ///   queued or in flight.
    /// - **closing** (`Phase.closing`, for good): `close`, `discard` or a `disconnect` overflow
    ///   (`laggedOut: true`) enter it; nothing is written through or accepted any more, `take`
    ///   drains what is queued and then answers `.close`.
    ///
    /// Orthogonal to these: a subscription whose replay runs is **parked** (`parked[id]`), and the
    /// connection is **held** while a subscription is registered (`held != nil`, `holds > 0`).
    /// An outbox's lifecycle: open (accepting output), then closing, for good.
    private enum Phase {
        /// Output is accepted; lines are written through `writeThrough` (once `adopt` gave one)
        /// when nothing is queued or in flight.
        case open(writeThrough: WriteThrough?)
        /// No more output is accepted and nothing is written through; what is queued is written,
        /// then the connection closes. `laggedOut`: a `disconnect` overflow closed it.
        case closing(laggedOut: Bool)
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
        /// Open or closing (see `Phase`); changed only by `adopt(_:)` and `close(laggedOut:)`.
        private(set) var phase = Phase.open(writeThrough: nil)
        /// The session's watcher, waiting in `closed()`.
        var closeWatcher: CheckedContinuation<Bool, Never>?
        /// Live events of subscriptions whose replay is running: they follow the replay (`event`
        /// and `run` chunks).
        var parked: [Int: Deque<OutboundChunk>] = [:]
        /// How many events `parked` holds, per subscription.
        var parkedEvents: [Int: Int] = [:]
        /// The bytes of `parked` (part of `queuedBytes`).
        var parkedBytes = 0
        /// Waits of `drained(withinMs:)` (a replay's, a snapshot's) for the queue to be taken, by
        /// number: each is resumed once, by whichever comes first, the drain (true) or its timer
        /// (false), which takes it out under this lock.
        var drainWaiters: [Int: DrainWaiter] = [:]
        var nextDrainWaiter = 0
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
        /// Events and vetoes held back while a subscription is registered (`hold()`, `release()`),
        /// in the order they came; `nil`: none is. Lines (`enqueue(line:)`) go on meanwhile: the
        /// `subscribe` response precedes them.
        var held: Deque<OutboundChunk>?
        /// How many `hold()`s are not yet released.
        var holds = 0
        /// How many events `held` holds, per subscription.
        var heldEvents: [Int: Int] = [:]
        /// The bytes of the events in `held` (part of `queuedBytes`), and of its lines.
        var heldEventBytes = 0
        var heldLineBytes = 0

        /// No more output is accepted; the connection closes after what is queued is written.
        var closing: Bool {
            if case .closing = self.phase { return true }
            return false
        }

        /// A subscription overflowed with `on_overflow: disconnect` (and so the outbox is closing).
        var laggedOut: Bool {
            if case .closing(let laggedOut) = self.phase { return laggedOut }
            return false
        }

        /// Where a line is written at once by whoever queues it, when nothing is ahead of it.
        var writeThrough: WriteThrough? {
            if case .open(let writeThrough) = self.phase { return writeThrough }
            return nil
        }

        /// Lets lines be written through (an open outbox only: a closing one stays closing).
        mutating func adopt(_ writeThrough: WriteThrough) {
            if case .open = self.phase { self.phase = .open(writeThrough: writeThrough) }
        }

        /// Closes for good; a lagged-out outbox stays lagged out.
        mutating func close(laggedOut: Bool) {
            self.phase = .closing(laggedOut: laggedOut || self.laggedOut)
        }

        /// Every byte of output not yet written to the socket: lines and events queued (parked
        /// ones included) and batches being written.
        var unwrittenBytes: Int { self.lineBytes + self.heldLineBytes + self.queuedBytes + self.inFlightBytes }
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
            state.adopt(writeThrough)
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
            if state.held != nil {
                state.held!.append(.line(line))
                state.heldLineBytes += line.count
                return (.queued, nil)
            }
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
            let queued =
                state.queuedEvents[event.subscription, default: 0] + state.parkedEvents[event.subscription, default: 0]
                + (state.held == nil ? 0 : state.heldEvents[event.subscription, default: 0])  // held: rarely
            if queued >= self.limits.maxEventsPerSubscription || state.queuedBytes + event.byteCount > self.limits.maxBytes {
                return self.overflow(
                    &state,
                    subscription: event.subscription,
                    policy: policy,
                    queued: queued,
                    from: event.seq,
                    to: event.seq
                )
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
            let queued =
                state.queuedEvents[subscription, default: 0] + state.parkedEvents[subscription, default: 0]
                + (state.held == nil ? 0 : state.heldEvents[subscription, default: 0])  // held: rarely
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
                &state,
                subscription: subscription,
                policy: policy,
                queued: queued + fits,
                from: run.firstSeq + Int64(fits),
                to: run.lastSeq,
                count: run.count - fits
            )
            return wakeup ?? more
        }
    }

    /// Queues a chunk of events that fit (held while a subscription is registered, parked while
    /// the subscription's replay runs).
    private func append(_ state: inout State, _ chunk: OutboundChunk, subscription: Int, events: Int, bytes: Int) -> Wakeup? {
        if state.held != nil {
            // The notice of what was dropped goes where the chunk goes, just before it.
            if state.parked[subscription] == nil, let record = state.drops.removeValue(forKey: subscription) {
                let notice = WireLines.laggedDroppedNotice(
                    subscription: subscription,
                    dropped: record.count,
                    from: record.from,
                    to: record.to
                )
                state.held!.append(.line(notice))
                state.heldLineBytes += notice.count
            }
            state.held!.append(chunk)
            state.heldEvents[subscription, default: 0] += events
            state.heldEventBytes += bytes
            state.queuedBytes += bytes
            return nil
        }
        if state.parked[subscription] != nil {
            state.parked[subscription]!.append(chunk)
            state.parkedEvents[subscription, default: 0] += events
            state.queuedBytes += bytes
            state.parkedBytes += bytes
            return nil
        }
        if let record = state.drops.removeValue(forKey: subscription) {
            Self.appendLine(
                &state,
                WireLines.laggedDroppedNotice(subscription: subscription, dropped: record.count, from: record.from, to: record.to)
            )
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
        _ state: inout State,
        subscription: Int,
        policy: OverflowPolicy,
        queued: Int,
        from: Int64,
        to: Int64,
        count: Int = 1
    ) -> Wakeup? {
        switch policy {
        case .disconnect:
            self.stats.laggedDisconnects.add(1, ordering: .relaxed)
            // Every event queued for the connection is discarded, every subscription's: all are
            // drops (`queued` is the lagging subscription's share of them).
            let discarded =
                state.queuedEvents.values.reduce(0, +) + state.parkedEvents.values.reduce(0, +)
                + (state.held == nil ? 0 : state.heldEvents.values.reduce(0, +))
            assert(discarded >= queued)
            self.stats.dropped.add(discarded + count, ordering: .relaxed)
            // Drop the queued events (the client resumes with `since`), keep responses, say why, close.
            // Nothing delivered yet: `last_seq` is the seq before the first event it misses,
            // so that resuming with `since: last_seq` still misses nothing.
            let parkedFirst = state.parked[subscription]?.lazy.compactMap { $0.firstEvent?.seq }.first
            let heldFirst = state.held?.lazy.compactMap { chunk -> Int64? in
                guard let first = chunk.firstEvent, first.subscription == subscription else { return nil }
                return first.seq
            }.first
            let firstMissed =
                state.chunks.lazy.compactMap { chunk -> Int64? in
                    guard let first = chunk.firstEvent, first.subscription == subscription else { return nil }
                    return first.seq
                }.first ?? parkedFirst ?? heldFirst ?? from
            let last = state.lastDelivered[subscription] ?? firstMissed - 1
            state.chunks.removeAll { if case .line = $0 { return false } else { return true } }
            state.queuedEvents = [:]
            state.queuedBytes = 0
            state.parked = [:]
            state.parkedEvents = [:]
            state.parkedBytes = 0
            state.held?.removeAll { if case .line = $0 { return false } else { return true } }
            state.heldEvents = [:]
            state.heldEventBytes = 0
            Self.appendLine(&state, WireLines.laggedDisconnectNotice(subscription: subscription, lastSeq: last))
            state.close(laggedOut: true)
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

    // MARK: Holding output while a subscription is registered

    /// Holds events and vetoes back, in order, until `release()`; lines still go out. The bus
    /// calls it under its lock when it adds a subscription of this connection, and releases it
    /// once the `subscribe` response (written outside the bus's lock) is queued: so that response
    /// precedes the new subscription's first event and its first veto. Holds nest.
    func hold() {
        self.state.withLock { state in
            state.holds += 1
            if state.held == nil { state.held = [] }
        }
    }

    /// Ends a `hold()`; at the last one, what was held is queued as if it came now (events of a
    /// subscription parked meanwhile go to its parked queue).
    func release() {
        let wakeup = self.state.withLock { state -> Wakeup? in
            precondition(state.holds > 0, "an outbox releases only what it holds")
            state.holds -= 1
            guard state.holds == 0, let held = state.held else { return nil }
            state.held = nil
            state.heldEvents = [:]
            state.queuedBytes -= state.heldEventBytes
            state.heldEventBytes = 0
            state.heldLineBytes = 0
            var wakeup: Wakeup?
            for chunk in held {
                switch chunk {
                case .line(let line):
                    if state.closing {
                        Self.appendLine(&state, line)
                    } else if let flush = Self.queue(&state, line: line) {
                        wakeup = flush
                    }
                case .event, .run, .events:
                    guard !state.closing, let first = chunk.firstEvent else { continue }
                    let events: Int
                    switch chunk {
                    case .run(let run): events = run.count
                    case .events(let page): events = page.count
                    default: events = 1
                    }
                    if let flush = self.append(&state, chunk, subscription: first.subscription, events: events, bytes: chunk.byteCount) {
                        wakeup = flush
                    }
                }
            }
            return wakeup ?? (state.chunks.isEmpty ? nil : Self.scheduleFlush(&state))
        }
        wakeup?.resume()
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

    /// A wait of `drained(withinMs:)`.
    struct DrainWaiter {
        let continuation: CheckedContinuation<Bool, Never>
        /// Cancelled when the drain comes first (set once the timer exists; none for a wait
        /// without a bound).
        var timer: Task<Void, Never>?

        /// The drain came first.
        func drained() {
            self.continuation.resume(returning: true)
            self.timer?.cancel()
        }
    }

    /// Waits until everything queued has been handed to the connection (or the outbox closed):
    /// true; or until `milliseconds` passed first (0: no bound): false, and the wait is gone. A
    /// snapshot's backpressure with a bound (`--idle-transaction-ms`): a client that reads nothing
    /// must not keep the pooled connection the snapshot reads on.
    ///
    /// Whichever comes first takes the waiter out of the state under the lock and answers; the
    /// other finds nothing. (The session raced a drain against a timer of its own: the drain
    /// cancelled the timer, whose cancelled sleep returned at once and answered false, sometimes
    /// before the drain answered true: a snapshot failed with `timeout` while its client read.)
    func drained(withinMs milliseconds: Int) async -> Bool {
        await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let number = self.state.withLock { state -> Int? in
                if state.closing || state.chunks.isEmpty { return nil }
                state.nextDrainWaiter += 1
                state.drainWaiters[state.nextDrainWaiter] = DrainWaiter(continuation: continuation)
                return state.nextDrainWaiter
            }
            guard let number else { return continuation.resume(returning: true) }
            guard milliseconds > 0 else { return }
            let timer = Task {
                guard (try? await Task.sleep(for: .milliseconds(milliseconds))) != nil else { return }  // drained first
                self.state.withLock { $0.drainWaiters.removeValue(forKey: number) }?.continuation.resume(returning: false)
            }
            let waiting = self.state.withLock { state -> Bool in
                guard state.drainWaiters[number] != nil else { return false }
                state.drainWaiters[number]?.timer = timer
                return true
            }
            if !waiting { timer.cancel() }
        }
    }

    /// Waits until everything queued has been handed to the connection (or the outbox closed):
    /// a replay's backpressure.
    func drained() async {
        _ = await self.drained(withinMs: 0)
    }

    /// Stops accepting output; the connection closes once what is queued is written.
    func close() {
        let (wakeup, watcher, laggedOut, waiters) = self.state.withLock { state in
            state.close(laggedOut: false)
            let watcher = state.closeWatcher
            state.closeWatcher = nil
            let waiters = (Self.takeRoomWaiters(&state, bound: self.limits.maxBytes), Array(state.drainWaiters.values))
            state.drainWaiters = [:]
            return (Self.scheduleFlush(&state), watcher, state.laggedOut, waiters)
        }
        wakeup?.resume()
        watcher?.resume(returning: laggedOut)
        for waiter in waiters.0 { waiter.resume() }
        for waiter in waiters.1 { waiter.drained() }
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
            if state.held != nil { state.held = [] }
            state.heldEvents = [:]
            state.heldEventBytes = 0
            state.heldLineBytes = 0
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
        let (take, drainWaiters) = self.state.withLock { state -> (Take, [DrainWaiter]) in
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
            state.queuedBytes = state.parkedBytes + state.heldEventBytes
            state.lineBytes = 0
            state.inFlight += 1
            state.inFlightBytes += bytes
            defer { state.drainWaiters = [:] }
            return (.batch(chunks, bytes: bytes, closeAfter: state.closing), Array(state.drainWaiters.values))
        }
        for waiter in drainWaiters { waiter.drained() }
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
