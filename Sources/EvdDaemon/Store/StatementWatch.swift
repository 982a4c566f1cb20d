import CSQLite
import EvdClient
import Synchronization

/// Interrupts a connection's running client statement (`sqlite3_interrupt`, which SQLite allows
/// from any thread) when it outlives the daemon's statement time limit, when its client goes
/// away, or when the daemon stops: an endless query must not keep a pooled connection, nor a
/// stopping daemon, forever.
///
/// The watch is armed only while a client's statement steps (`SQLRun`), and interrupting happens
/// under its lock, so an interrupt never reaches the next statement, another session's perhaps,
/// that the connection runs after this one ended (SQLite itself ignores an interrupt when no
/// statement runs).
final class StatementWatch: Sendable {
    /// Why the statement was interrupted.
    enum Reason: Sendable, Equatable {
        /// It ran longer than the time limit (`--max-statement-ms`).
        case timeLimit(milliseconds: Int)
        /// Its client closed the connection.
        case disconnected
        /// The daemon is stopping and the grace period is over.
        case shutdown
    }

    private struct State {
        var running = false
        var deadline: ContinuousClock.Instant?
        var interrupted: Reason?
        var limitMs = 0
    }

    /// The connection's handle, used for `sqlite3_interrupt` only.
    private nonisolated(unsafe) let handle: OpaquePointer
    private let state = Mutex(State())

    init(_ connection: SQLiteConnection) {
        self.handle = connection.handle
    }

    /// Arms the watch for a statement that may run `limitMs` milliseconds (0: no limit).
    func begin(limitMs: Int) {
        self.state.withLock { state in
            state.running = true
            state.limitMs = limitMs
            state.deadline = limitMs > 0 ? .now + .milliseconds(limitMs) : nil
            state.interrupted = nil
        }
    }

    /// Disarms the watch; returns why the statement was interrupted, if it was.
    @discardableResult
    func end() -> Reason? {
        self.state.withLock { state in
            state.running = false
            state.deadline = nil
            defer { state.interrupted = nil }
            return state.interrupted
        }
    }

    /// Interrupts the running statement, if one runs.
    func interrupt(_ reason: Reason) {
        self.state.withLock { state in
            guard state.running, state.interrupted == nil else { return }
            state.interrupted = reason
            sqlite3_interrupt(self.handle)
        }
    }

    /// Interrupts the running statement if it has run past its deadline.
    func interruptIfOverdue(now: ContinuousClock.Instant) {
        self.state.withLock { state in
            guard state.running, state.interrupted == nil, let deadline = state.deadline, now >= deadline else { return }
            state.interrupted = .timeLimit(milliseconds: state.limitMs)
            sqlite3_interrupt(self.handle)
        }
    }
}

extension StatementWatch.Reason {
    /// The error the client whose statement was interrupted receives.
    var evdError: EvdError {
        switch self {
        case .timeLimit(let milliseconds):
            return EvdError(
                .timeout,
                "the statement ran longer than \(milliseconds) ms (--max-statement-ms) and was interrupted",
                extra: ["limit": "max-statement-ms", "max": .integer(milliseconds)]
            )
        case .disconnected:
            return EvdError(.sqlError, "the statement was interrupted: its client went away", extra: ["sqlite_code": "SQLITE_INTERRUPT"])
        case .shutdown:
            return EvdError(.shuttingDown, "the daemon is stopping: the statement was interrupted")
        }
    }
}
