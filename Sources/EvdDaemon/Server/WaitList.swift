import Synchronization

/// Tasks waiting for a condition on state that another lock guards, woken by the state's owner after
/// each change that may make it true (`wakeAll`): waiting without polling. A waiter checks the
/// condition and registers under this list's lock, and the owner wakes under it after its change,
/// so no wake-up is missed. A cancelled task stops waiting.
final class WaitList: Sendable {
    private struct State {
        var waiting: [UInt64: CheckedContinuation<Bool, Never>] = [:]
        var next: UInt64 = 0
    }

    private let state = Mutex(State())

    /// Returns once `ready()` is true (at once if it is), or when the task is cancelled. `ready` may
    /// take the state's own lock (the order is this list's, then the state's; the owner never holds
    /// its lock while it calls `wakeAll`).
    func wait(until ready: () -> Bool) async {
        while true {
            let id = self.state.withLock { state in
                defer { state.next += 1 }
                return state.next
            }
            // true: done (ready, or cancelled); false: woken, so check again.
            let done = await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                    let now = self.state.withLock { state -> Bool in
                        // Checked under the lock: a cancellation after this finds the waiter registered.
                        if Task.isCancelled || ready() { return true }
                        state.waiting[id] = continuation
                        return false
                    }
                    if now { continuation.resume(returning: true) }
                }
            } onCancel: {
                self.state.withLock { $0.waiting.removeValue(forKey: id) }?.resume(returning: true)
            }
            if done { return }
        }
    }

    /// Wakes every waiter to check its condition again.
    func wakeAll() {
        let woken = self.state.withLock { state in
            defer { state.waiting = [:] }
            return Array(state.waiting.values)
        }
        for continuation in woken { continuation.resume(returning: false) }
    }
}
