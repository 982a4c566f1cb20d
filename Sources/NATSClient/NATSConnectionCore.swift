import DequeModule
import EvdClient
import NIOCore
import Synchronization

/// The state a connection shares with its channel handler: who waits for what.
///
/// The handler (on the event loop) delivers frames here; callers (on any thread) register waiters.
/// All of it sits in one `Mutex`; continuations are resumed and streams fed outside the lock.
final class NATSConnectionCore: Sendable {
    struct PongWaiter {
        var id: Int
        /// `nil` once the flush timed out: its PONG is still expected, and then ignored.
        var continuation: CheckedContinuation<Void, any Error>?
        var timer: Scheduled<Void>?
    }

    struct Request {
        /// Called once, with the reply or why there is none.
        var resume: @Sendable (Result<NATSMessage, any Error>) -> Void
        var timer: Scheduled<Void>?
    }

    struct State {
        var info: JSONObject?
        var infoWaiter: CheckedContinuation<JSONObject, any Error>?
        /// Why the connection ended; `nil` while open.
        var closed: NATSError?
        var lastServerError: String?
        var pongWaiters = Deque<PongWaiter>()
        var nextPongID = 1
        var subscriptions: [Int: (AsyncStream<NATSMessage>.Continuation, DropCounter)] = [:]
        var nextSid = 1
        var inboxSid: Int?
        var requests: [Int: Request] = [:]
        var nextRequest = 1
        var pingsAnswered = 0
    }

    let state = Mutex(State())

    // MARK: From callers

    func awaitInfo(on eventLoop: any EventLoop, timeout: Duration) async throws -> JSONObject {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<JSONObject, any Error>) in
            let ready: Result<JSONObject, NATSError>? = self.state.withLock { state in
                if let info = state.info { return .success(info) }
                if let closed = state.closed { return .failure(closed) }
                state.infoWaiter = continuation
                return nil
            }
            if let ready {
                continuation.resume(with: ready)
                return
            }
            eventLoop.scheduleTask(in: timeout.timeAmount) {
                let waiter = self.state.withLock { state in
                    defer { state.infoWaiter = nil }
                    return state.infoWaiter
                }
                waiter?.resume(throwing: NATSError.timeout)
            }
        }
    }

    func reserveInbox() -> Int {
        self.state.withLock { state in
            defer { state.nextSid += 1 }
            state.inboxSid = state.nextSid
            return state.nextSid
        }
    }

    func checkOpen() throws(NATSError) {
        if let closed = self.state.withLock({ $0.closed }) { throw closed }
    }

    func closedError() -> NATSError {
        self.state.withLock { $0.closed } ?? .connectionClosed("closed")
    }

    func addSubscription(_ continuation: AsyncStream<NATSMessage>.Continuation, counter: DropCounter) -> Int? {
        self.state.withLock { state in
            guard state.closed == nil else { return nil }
            defer { state.nextSid += 1 }
            state.subscriptions[state.nextSid] = (continuation, counter)
            return state.nextSid
        }
    }

    func removeSubscription(_ sid: Int) -> AsyncStream<NATSMessage>.Continuation? {
        self.state.withLock { $0.subscriptions.removeValue(forKey: sid)?.0 }
    }

    func nextRequestToken() -> Int {
        self.state.withLock { state in
            defer { state.nextRequest += 1 }
            return state.nextRequest
        }
    }

    func addRequest(_ token: Int, _ resume: @escaping @Sendable (Result<NATSMessage, any Error>) -> Void) -> Bool {
        self.state.withLock { state in
            guard state.closed == nil else { return false }
            state.requests[token] = Request(resume: resume)
            return true
        }
    }

    func setRequestTimer(_ token: Int, _ timer: Scheduled<Void>) {
        let orphan = self.state.withLock { state -> Bool in
            guard state.requests[token] != nil else { return true }
            state.requests[token]?.timer = timer
            return false
        }
        if orphan { timer.cancel() }
    }

    func removeRequest(_ token: Int) -> (@Sendable (Result<NATSMessage, any Error>) -> Void)? {
        let request = self.state.withLock { $0.requests.removeValue(forKey: token) }
        request?.timer?.cancel()
        return request?.resume
    }

    func addPongWaiter(_ continuation: CheckedContinuation<Void, any Error>) -> Int? {
        self.state.withLock { state in
            guard state.closed == nil else { return nil }
            defer { state.nextPongID += 1 }
            state.pongWaiters.append(PongWaiter(id: state.nextPongID, continuation: continuation))
            return state.nextPongID
        }
    }

    func setPongTimer(_ id: Int, _ timer: Scheduled<Void>) {
        let orphan = self.state.withLock { state -> Bool in
            guard let index = state.pongWaiters.firstIndex(where: { $0.id == id }),
                state.pongWaiters[index].continuation != nil
            else { return true }
            state.pongWaiters[index].timer = timer
            return false
        }
        if orphan { timer.cancel() }
    }

    func timeOutPongWaiter(_ id: Int) {
        let continuation = self.state.withLock { state -> CheckedContinuation<Void, any Error>? in
            guard let index = state.pongWaiters.firstIndex(where: { $0.id == id }) else { return nil }
            defer { state.pongWaiters[index].continuation = nil }
            return state.pongWaiters[index].continuation
        }
        continuation?.resume(throwing: NATSError.timeout)
    }

    /// Ends the connection's state: every waiter fails with `error` (or the server's last `-ERR`), every
    /// subscription finishes. Only the first call counts.
    func fail(_ error: NATSError) {
        let taken = self.state.withLock { state -> (NATSError, State)? in
            guard state.closed == nil else { return nil }
            let reason = state.lastServerError.map { NATSError.server($0) } ?? error
            state.closed = reason
            let old = state
            state.infoWaiter = nil
            state.pongWaiters = []
            state.subscriptions = [:]
            state.requests = [:]
            return (reason, old)
        }
        guard let (reason, old) = taken else { return }
        old.infoWaiter?.resume(throwing: reason)
        for waiter in old.pongWaiters {
            waiter.timer?.cancel()
            waiter.continuation?.resume(throwing: reason)
        }
        for request in old.requests.values {
            request.timer?.cancel()
            request.resume(.failure(reason))
        }
        for (continuation, _) in old.subscriptions.values { continuation.finish() }
    }

    // MARK: From the channel handler

    func received(_ frame: NATSFrame) {
        switch frame {
        case .info(let info):
            let waiter = self.state.withLock { state in
                defer { state.infoWaiter = nil }
                if state.info == nil { state.info = info }
                return state.infoWaiter
            }
            waiter?.resume(returning: info)
        case .pong:
            let waiter = self.state.withLock { $0.pongWaiters.popFirst() }
            waiter?.timer?.cancel()
            waiter?.continuation?.resume()
        case .ping:
            self.state.withLock { $0.pingsAnswered += 1 }
        case .ok:
            break
        case .error(let text):
            self.state.withLock { $0.lastServerError = text }
        case .message(let sidText, let message):
            guard let sid = Int(sidText) else { return }
            enum Target {
                case request(Request)
                case subscription(AsyncStream<NATSMessage>.Continuation, DropCounter)
            }
            let target = self.state.withLock { state -> Target? in
                if sid == state.inboxSid {
                    guard let dot = message.subject.utf8.lastIndex(of: UInt8(ascii: ".")),
                        let token = Int(message.subject[message.subject.utf8.index(after: dot)...]),
                        let request = state.requests.removeValue(forKey: token)
                    else { return nil }
                    return .request(request)
                }
                return state.subscriptions[sid].map { .subscription($0.0, $0.1) }
            }
            switch target {
            case .request(let request):
                request.timer?.cancel()
                request.resume(.success(message))
            case .subscription(let continuation, let counter):
                if case .dropped = continuation.yield(message) { counter.count.add(1, ordering: .relaxed) }
            case nil:
                break
            }
        }
    }
}

/// Answers the server's `PING`s and hands every frame to the connection's core.
final class NATSInboundHandler: ChannelInboundHandler {
    typealias InboundIn = NATSFrame
    typealias OutboundOut = ByteBuffer

    private let core: NATSConnectionCore

    init(core: NATSConnectionCore) {
        self.core = core
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        if case .ping = frame {
            context.writeAndFlush(Self.wrapOutboundOut(ByteBuffer(string: "PONG\r\n")), promise: nil)
        }
        self.core.received(frame)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.core.fail((error as? NATSError) ?? .connectionClosed("\(error)"))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.core.fail(.connectionClosed("the server closed the connection"))
        context.fireChannelInactive()
    }
}
