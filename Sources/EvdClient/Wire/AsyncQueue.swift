import DequeModule
import Synchronization

/// A bounded first-in first-out queue between one producer and one consumer task.
///
/// `push` waits while the queue is full, so a fast producer (a socket reader) is slowed to the pace of
/// its consumer instead of growing memory; `pop` waits while it is empty and returns `nil` once the
/// queue is finished and drained.
public final class AsyncQueue<Element: Sendable>: Sendable {
    private struct State {
        var items: Deque<Element> = []
        var finished = false
        var consumer: CheckedContinuation<Element?, Never>?
        var producer: CheckedContinuation<Void, Never>?
    }

    private enum PushStep {
        case delivered(CheckedContinuation<Element?, Never>?)
        case full, finished
    }

    private enum PopStep {
        case item(Element, CheckedContinuation<Void, Never>?)
        case end, wait
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

    /// Takes the oldest item, waiting while the queue is empty; `nil` once finished and drained, or
    /// when the waiting task is cancelled (so a caller can bound its wait with a task group).
    public func pop() async -> Element? {
        let step: PopStep = self.state.withLock { state in
            if let item = state.items.popFirst() {
                let producer = state.producer
                state.producer = nil
                return .item(item, producer)
            }
            return state.finished ? .end : .wait
        }
        switch step {
        case .item(let item, let producer):
            producer?.resume()
            return item
        case .end:
            return nil
        case .wait:
            return await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Element?, Never>) in
                    let now: PopStep = self.state.withLock { state in
                        if let item = state.items.popFirst() {
                            let producer = state.producer
                            state.producer = nil
                            return .item(item, producer)
                        }
                        // Checked under the lock: a cancellation after this finds the consumer parked.
                        if state.finished || Task.isCancelled { return .end }
                        state.consumer = continuation
                        return .wait
                    }
                    switch now {
                    case .item(let item, let producer):
                        producer?.resume()
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
