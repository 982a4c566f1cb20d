import Synchronization

/// A one-way flag for "stop", with sleeps it cuts short.
final class StopSignal: Sendable {
    private struct State {
        var signalled = false
        var sleepers: [Int: CheckedContinuation<Void, Never>] = [:]
        var nextID = 0
    }

    private let state = Mutex(State())

    /// Whether `signal()` was called.
    var isSignalled: Bool { self.state.withLock { $0.signalled } }

    /// Sets the flag and wakes every sleeper.
    func signal() {
        let sleepers = self.state.withLock { state in
            state.signalled = true
            defer { state.sleepers = [:] }
            return state.sleepers
        }
        for sleeper in sleepers.values { sleeper.resume() }
    }

    /// Sleeps for `duration`, or until `signal()`.
    func sleep(for duration: Duration) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { try? await Task.sleep(for: duration) }
            group.addTask { await self.wait() }
            await group.next()
            group.cancelAll()
        }
    }

    private func wait() async {
        let id = self.state.withLock { state in
            defer { state.nextID += 1 }
            return state.nextID
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let now = self.state.withLock { state -> Bool in
                    if state.signalled || Task.isCancelled { return true }
                    state.sleepers[id] = continuation
                    return false
                }
                if now { continuation.resume() }
            }
        } onCancel: {
            let sleeper = self.state.withLock { $0.sleepers.removeValue(forKey: id) }
            sleeper?.resume()
        }
    }
}
