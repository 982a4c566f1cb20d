import EvdClient
import NIOCore
import NIOPosix
import Synchronization

/// A connection to evd made for forwarding: events arrive as located lines (`EventLine`), never
/// parsed into JSON values, in one batch per socket read; everything else (hello, responses,
/// notices) is parsed as `EvdConnection` does.
///
/// `EvdConnection` hands over one parsed `JSONObject` per message, which is what most clients
/// want but costs more than the rest of forwarding together; this one is its fast sibling for one
/// subscription. Responses are matched to their requests on the event loop, so a response is never
/// stuck behind unread events: `send(_:_:)` with a callback is safe while events pile up.
/// Backpressure: at most `batchCapacity` read batches wait in `events`; then reading stops until
/// the consumer takes one.
final class EvdLineConnection: Sendable {
    /// What the socket carried besides responses, in order.
    enum Item: Sendable {
        /// An `event` line.
        case event(EventLine)
        /// A notice (or any other message that is not a response).
        case message(JSONObject)
    }

    /// The connection could not be made, or ended.
    struct ConnectionError: Error, CustomStringConvertible {
        var description: String
    }

    /// The daemon's `hello`.
    let hello: JSONObject
    /// The events and notices, a batch per socket read.
    let events: AsyncQueue<[Item]>
    private let channel: any Channel
    private let responses: ResponseRouter

    private init(hello: JSONObject, channel: any Channel, events: AsyncQueue<[Item]>, responses: ResponseRouter) {
        self.hello = hello
        self.channel = channel
        self.events = events
        self.responses = responses
    }

    /// Connects to evd at `socketPath` (after `SocketDirectory`'s check of its directory, as every
    /// client does), waits for the hello, logs in with `token` when given, runs `body`, closes.
    static func withConnection<Result: Sendable>(
        socketPath: String,
        token: String?,
        batchCapacity: Int = 32,
        _ body: (EvdLineConnection) async throws -> Result
    ) async throws -> Result {
        do {
            try SocketDirectory.checkParent(of: socketPath, rule: SocketDirectory.clientRule(for: socketPath))
        } catch {
            throw EvdLineConnection.ConnectionError(description: "not connecting to \(socketPath): \(error)")
        }
        let events = AsyncQueue<[Item]>(capacity: batchCapacity)
        let responses = ResponseRouter()
        let channel: any Channel
        let helloPromise: EventLoopPromise<JSONObject>
        do {
            let loop = MultiThreadedEventLoopGroup.singleton.next()
            helloPromise = loop.makePromise(of: JSONObject.self)
            let promise = helloPromise
            channel = try await ClientBootstrap(group: loop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            ByteToMessageHandler(LineFrameDecoder(maxLineBytes: 1 << 30))
                        )
                        try channel.pipeline.syncOperations.addHandler(
                            EvdLineHandler(events: events, responses: responses, hello: promise)
                        )
                    }
                }
                .connect(unixDomainSocketPath: socketPath)
                .get()
        } catch {
            throw EvdLineConnection.ConnectionError(description: "cannot connect to evd at \(socketPath): \(error)")
        }
        let connection: EvdLineConnection
        do {
            let hello = try await helloPromise.futureResult.get()
            connection = EvdLineConnection(hello: hello, channel: channel, events: events, responses: responses)
        } catch {
            try? await channel.close()
            throw error
        }
        do {
            if let token { try await connection.request(.login(token: token)) }
            let result = try await body(connection)
            connection.close()
            return result
        } catch {
            connection.close()
            throw error
        }
    }

    /// Sends `operation` and returns its `result`; an error response is thrown as `EvdError`.
    @discardableResult
    func request(_ operation: EvdOperation) async throws -> JSONObject {
        try await withCheckedThrowingContinuation { continuation in
            self.send(operation) { continuation.resume(with: $0) }
        }
    }

    /// Sends `operation`; `completion` gets its `result` (or the `EvdError`, or the connection's
    /// end) on the event loop. Never waits, so it is safe while events are not being read.
    func send(_ operation: EvdOperation, _ completion: @escaping @Sendable (Result<JSONObject, any Error>) -> Void) {
        guard let id = self.responses.register(completion) else {
            completion(.failure(EvdLineConnection.ConnectionError(description: "the connection to evd is closed")))
            return
        }
        var request = operation.request
        request["id"] = .int(id)
        var bytes = JSONValue.object(request).jsonBytes
        bytes.append(0x0a)
        let responses = self.responses
        self.channel.writeAndFlush(ByteBuffer(bytes: bytes)).whenFailure { error in
            responses.complete(id, .failure(EvdLineConnection.ConnectionError(description: "cannot send to evd: \(error)")))
        }
    }

    /// Closes the connection; pending requests fail and `events` finishes once drained.
    func close() {
        self.channel.close(promise: nil)
    }
}

/// The requests waiting for their responses, by id.
final class ResponseRouter: Sendable {
    private struct State {
        var nextID: Int64 = 1
        var waiting: [Int64: @Sendable (Result<JSONObject, any Error>) -> Void] = [:]
        var closed = false
    }

    private let state = Mutex(State())

    /// A new request id with its completion; `nil` once the connection has closed.
    func register(_ completion: @escaping @Sendable (Result<JSONObject, any Error>) -> Void) -> Int64? {
        self.state.withLock { state in
            guard !state.closed else { return nil }
            defer { state.nextID += 1 }
            state.waiting[state.nextID] = completion
            return state.nextID
        }
    }

    /// Completes request `id` (a second completion is ignored).
    func complete(_ id: Int64, _ result: Result<JSONObject, any Error>) {
        self.state.withLock { $0.waiting.removeValue(forKey: id) }?(result)
    }

    /// A response: its `result`, or its error as `EvdError`; `false` when no request has its id.
    func deliver(_ response: JSONObject) -> Bool {
        guard let id = response["id"]?.intValue,
            let completion = self.state.withLock({ $0.waiting.removeValue(forKey: id) })
        else { return false }
        if response["ok"] == true {
            completion(.success(response["result"]?.objectValue ?? [:]))
        } else {
            completion(.failure(EvdError(object: response["error"]?.objectValue ?? [:])))
        }
        return true
    }

    /// Fails every waiting request: the connection ended.
    func closeAll() {
        let waiting = self.state.withLock { state in
            state.closed = true
            defer { state.waiting = [:] }
            return state.waiting
        }
        for completion in waiting.values {
            completion(.failure(EvdLineConnection.ConnectionError(description: "the connection to evd closed")))
        }
    }
}

/// Sorts evd's lines: the hello to its promise, responses to their requests, events (located, not
/// parsed) and notices into the batch of the current read, pushed when the read completes.
final class EvdLineHandler: ChannelInboundHandler {
    typealias InboundIn = LineFrame

    private let events: AsyncQueue<[EvdLineConnection.Item]>
    private let responses: ResponseRouter
    private var hello: EventLoopPromise<JSONObject>?
    private var batch: [EvdLineConnection.Item] = []

    init(events: AsyncQueue<[EvdLineConnection.Item]>, responses: ResponseRouter, hello: EventLoopPromise<JSONObject>) {
        self.events = events
        self.responses = responses
        self.hello = hello
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let channel = context.channel
        // Called from the consumer's task once it made room: resume reading on the event loop.
        self.events.onRoom {
            channel.eventLoop.execute {
                channel.setOption(ChannelOptions.autoRead, value: true).whenSuccess { channel.read() }
            }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .line(let line) = Self.unwrapInboundIn(data), line.readableBytes > 0 else { return }
        if isEventLine(line), let event = try? EventLine(line) {
            self.batch.append(.event(event))
            return
        }
        guard let message = line.withUnsafeReadableBytes({ try? JSONValue(parsing: $0) })?.objectValue else { return }
        switch message["type"]?.stringValue {
        case "hello" where self.hello != nil:
            self.hello?.succeed(message)
            self.hello = nil
        case "response":
            if !self.responses.deliver(message) { self.batch.append(.message(message)) }
        default:
            self.batch.append(.message(message))
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.flushBatch(context: context)
        context.fireChannelReadComplete()
    }

    private func flushBatch(context: ChannelHandlerContext) {
        guard !self.batch.isEmpty else { return }
        let batch = self.batch
        self.batch = []
        self.batch.reserveCapacity(batch.count)
        if !self.events.offer(batch) {
            context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.flushBatch(context: context)
        self.hello?.fail(EvdLineConnection.ConnectionError(description: "evd closed the connection without a hello"))
        self.hello = nil
        self.responses.closeAll()
        self.events.finish()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
