import EvdClient
import NIOPosix
import OrderedCollections

/// What the session sends: responses (bounded by `--max-response-bytes`), hello, notices, and how it closes.
extension Session {
    /// What a request produced.
    enum Outcome {
        /// `seq`: the last event the request committed, if it committed any (the response's `seq`,
        /// beside its result: read your writes).
        case result(JSONValue, seq: Int64? = nil)
        case failure(EvdError)
        /// The handler queued its response itself (`subscribe`, so no event can overtake it).
        case responded
    }

    /// Queues the response to a request. One larger than `--max-response-bytes` is replaced by
    /// `response_too_large`.
    func respond(id: JSONValue, _ outcome: Outcome) {
        switch outcome {
        case .responded:
            return
        case .result(let result, let seq):
            let line = WireLines.response(id: id, result: result, seq: seq)
            let max = self.core.configuration.maxResponseBytes
            guard line.count <= max else {
                self.outbox.enqueue(line: WireLines.response(id: id, error: .responseTooLarge(max: max)))
                return
            }
            self.outbox.enqueue(line: line)
        case .failure(let error):
            self.outbox.enqueue(line: WireLines.response(id: id, error: error))
        }
    }

    func helloLine() -> [UInt8] {
        WireLines.hello(
            version: evdVersion,
            session: self.id,
            actor: self.actor,
            databases: Array(self.core.pools.keys),
            seq: self.core.bus.headSeq,
            epoch: self.core.bus.epoch
        )
    }

    /// Tells the client the daemon is stopping.
    func noticeShutdown() {
        self.outbox.enqueue(line: WireLines.shutdownNotice())
    }

    /// Ends the session: what is queued is written, then the connection closes.
    func close() {
        self.outbox.close()
    }

    /// Closes the connection now, dropping unwritten output: for a peer that stopped reading, whose
    /// writer would otherwise wait on a full socket forever.
    func forceClose() {
        self.outbox.close()
        self.channel.withLock { $0 }?.close(promise: nil)
    }

    /// Any error as the wire's error. The session's own work throws `EvdError` (or SQLite's, which
    /// maps to it); the only others that reach here are the ones of a daemon stopping (its thread
    /// pools refuse work, its tasks are cancelled): `shutting_down`. Anything else is a failure evd
    /// did not foresee: `internal_error`, which the session logs (`execute`).
    static func wireError(_ error: any Error) -> EvdError {
        switch error {
        case let error as EvdError: return error
        case let error as SQLiteError: return error.evdError
        case is CancellationError, is NIOThreadPoolError.ThreadPoolInactive:
            return EvdError(.shuttingDown, "the request could not run: evd is shutting down")
        default: return EvdError(.internalError, "the request failed unexpectedly (\(type(of: error))): \(error)")
        }
    }
}
