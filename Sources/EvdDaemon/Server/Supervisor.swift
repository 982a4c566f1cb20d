import CSQLite
import EvdClient
import Logging
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A one-shot "ready" (or "failed") signal that any number of tasks can wait for.
final class ReadySignal: Sendable {
    private enum State {
        case waiting([CheckedContinuation<Void, any Error>])
        case ready
        case failed(any Error)
    }

    private let state = Mutex(State.waiting([]))

    func wait() async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let outcome: Result<Void, any Error>? = self.state.withLock { state in
                switch state {
                case .waiting(var waiters):
                    waiters.append(continuation)
                    state = .waiting(waiters)
                    return nil
                case .ready:
                    return .success(())
                case .failed(let error):
                    return .failure(error)
                }
            }
            if let outcome { continuation.resume(with: outcome) }
        }
    }

    func signal() { self.finish(.ready) }
    func fail(_ error: any Error) { self.finish(.failed(error)) }

    private func finish(_ final: State) {
        let waiters = self.state.withLock { state -> [CheckedContinuation<Void, any Error>] in
            guard case .waiting(let waiters) = state else { return [] }
            state = final
            return waiters
        }
        for waiter in waiters {
            switch final {
            case .failed(let error): waiter.resume(throwing: error)
            default: waiter.resume()
            }
        }
    }
}

/// What the daemon tells whoever supervises it, and the work supervision adds while it serves. The
/// composition root fills it in (evd's main: systemd's notify protocol, `Supervisor.systemd`); the
/// daemon itself knows no supervisor.
public struct Supervisor: Sendable {
    /// Told once the socket accepts connections.
    let ready: @Sendable () -> Void
    /// Told when the daemon begins to stop.
    let stopping: @Sendable () -> Void
    /// Each runs while the daemon serves, until it begins to stop or the task is cancelled.
    let whileServing: [@Sendable (DaemonCore) async -> Void]

    init(
        ready: @escaping @Sendable () -> Void,
        stopping: @escaping @Sendable () -> Void,
        whileServing: [@Sendable (DaemonCore) async -> Void]
    ) {
        self.ready = ready
        self.stopping = stopping
        self.whileServing = whileServing
    }

    /// No supervisor: nothing is told, nothing runs.
    public static let none = Supervisor(ready: {}, stopping: {}, whileServing: [])
}
