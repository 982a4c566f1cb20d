import DequeModule
import Synchronization

/// A bounded first-in first-out queue between one producer and one consumer task.
///
/// `push` waits while the queue is full, so a fast producer (a socket reader) is slowed to the pace of
/// its consumer instead of growing memory; `pop` waits while it is empty and returns `nil` once the
/// queue is finished and drained. A producer that cannot wait (an event loop) uses `offer` instead,
/// which never waits: it says when the queue is full, and `onRoom` tells it when to go on (the
/// daemon's request inbox: the reader stops reading the socket meanwhile).
public final class AsyncQueue<Element: Sendable>: Sendable {
    private struct State {
        var items: Deque<Element> = []
        var finished = false
        var consumer: CheckedContinuation<Element?, Never>?
        var producer: CheckedContinuation<Void, Never>?
        /// Whether an `offer` filled the queue, until a `pop` makes room.
        var full = false
        var onRoom: (@Sendable () -> Void)?

        /// Takes the oldest item, with what the taking wakes: a waiting `push`, or `onRoom` when it
        /// ended a full spell of `offer`s.
        mutating func take() -> PopStep? {
            guard let item = self.items.popFirst() else { return nil }
            let producer = self.producer
            self.producer = nil
            return .item(item, producer, self.madeRoom())
        }

        mutating func madeRoom() -> (@Sendable () -> Void)? {
            guard self.full else { return nil }
            self.full = false
            return self.onRoom
        }
    }

    private enum PushStep {
        case delivered(CheckedContinuation<Element?, Never>?)
        case full, finished
    }

    private enum PopStep {
        case item(Element, CheckedContinuation<Void, Never>?, (@Sendable () -> Void)?)
        case end
        case wait
    }

    private let state = Mutex(State())
    /// The most items held before `push` waits.
    public let capacity: Int

    /// Creates a queue holding at most `capacity` items.
    public init(capacity: Int) {
        precondition(capacity > 0)
        self.capacity = capacity
    }

    /// Appends `element`, waiting while the queue is full. Returns `false` if the queue was finished.
    @discardableResult
    public func push(_ element: Element) async -> Bool {
        while true {
            let step: PushStep = self.state.withLock { state in
                if state.finished { return .finished }
                if let consumer = state.consumer {
                    state.consumer = nil
                    return .delivered(consumer)
                }
                if state.items.count < self.capacity {
                    state.items.append(element)
                    return .delivered(nil)
                }
                return .full
            }
            switch step {
            case .finished:
                return false
            case .delivered(let consumer):
                consumer?.resume(returning: element)
                return true
            case .full:
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = self.state.withLock { state in
                        if state.finished || state.items.count < self.capacity { return true }
                        state.producer = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            }
        }
    }

    /// Appends `element` without waiting (for a producer that cannot wait: it pauses instead).
    /// Returns `false` when the queue is now full: the producer should stop until `onRoom` calls it.
    /// Past the capacity the queue still takes what is offered, so a producer that has already read
    /// an item never loses it. A finished queue drops it (and returns `true`).
    public func offer(_ element: Element) -> Bool {
        let (consumer, room) = self.state.withLock { state -> (CheckedContinuation<Element?, Never>?, Bool) in
            guard !state.finished else { return (nil, true) }
            if let consumer = state.consumer {
                state.consumer = nil
                return (consumer, true)
            }
            state.items.append(element)
            state.full = state.items.count >= self.capacity
            return (nil, !state.full)
        }
        consumer?.resume(returning: element)
        return room
    }

    /// What to call when a `pop` ends a full spell of `offer`s (from the popping task: hop to the
    /// producer's own thread in it).
    public func onRoom(_ callback: @escaping @Sendable () -> Void) {
        self.state.withLock { $0.onRoom = callback }
    }

    /// Takes the items at the front of the queue for as long as they satisfy `wanted`, without
    /// waiting: a run of items the consumer handles together (none if the first does not).
    public func popQueued(while wanted: (Element) -> Bool) -> [Element] {
        let (items, producer, room) = self.state.withLock {
            state -> ([Element], CheckedContinuation<Void, Never>?, (@Sendable () -> Void)?) in
            var items: [Element] = []
            while let first = state.items.first, wanted(first) {
                items.append(first)
                state.items.removeFirst()
            }
            guard !items.isEmpty else { return ([], nil, nil) }
            let producer = state.producer
            state.producer = nil
            return (items, producer, state.madeRoom())
        }
        producer?.resume()
        room?()
        return items
    }

    /// Takes the oldest item, waiting while the queue is empty; `nil` once finished and drained, or
    /// when the waiting task is cancelled (so a caller can bound its wait with a task group).
    public func pop() async -> Element? {
        let step: PopStep = self.state.withLock { state in
            if let taken = state.take() { return taken }
            return state.finished ? .end : .wait
        }
        switch step {
        case .item(let item, let producer, let room):
            producer?.resume()
            room?()
            return item
        case .end:
            return nil
        case .wait:
            return await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Element?, Never>) in
                    let now: PopStep = self.state.withLock { state in
                        if let taken = state.take() { return taken }
                        // Checked under the lock: a cancellation after this finds the consumer parked.
                        if state.finished || Task.isCancelled { return .end }
                        state.consumer = continuation
                        return .wait
                    }
                    switch now {
                    case .item(let item, let producer, let room):
                        producer?.resume()
                        room?()
                        continuation.resume(returning: item)
                    case .end:
                        continuation.resume(returning: nil)
                    case .wait:
                        break
                    }
                }
            } onCancel: {
                let consumer = self.state.withLock { state in
                    defer { state.consumer = nil }
                    return state.consumer
                }
                consumer?.resume(returning: nil)
            }
        }
    }

    /// Ends the queue: waiting pushes return `false`, and `pop` returns `nil` once drained.
    public func finish() {
        let (consumer, producer) = self.state.withLock { state in
            state.finished = true
            let consumer = state.items.isEmpty ? state.consumer : nil
            if consumer != nil { state.consumer = nil }
            let producer = state.producer
            state.producer = nil
            return (consumer, producer)
        }
        consumer?.resume(returning: nil)
        producer?.resume()
    }
}
