import DequeModule
import EvdClient
import NIOCore
import NIOPosix
import Synchronization

/// A connection to a NATS server over TCP: publish, subscribe, request/reply, flush.
///
/// ```swift
/// let nats = try await NATSConnection.connect(host: "127.0.0.1", port: 4222)
/// let replies = try await nats.subscribe(subject: "greet.*")
/// try await nats.publish(subject: "greet.joe", headers: ["k": "v"], payload: Array("hello".utf8))
/// let reply = try await nats.request(subject: "svc", payload: [], timeout: .seconds(2))
/// try await nats.close()
/// ```
///
/// The server's `PING`s are answered with `PONG` on the event loop, so a connection kept idle stays
/// open. Each subscription buffers up to `subscriptionCapacity` messages; past that the newest are
/// dropped and counted in `NATSSubscription.dropped` (the NATS "slow consumer" rule, on our side).
public final class NATSConnection: Sendable {
    /// The server's `INFO` when the connection was made.
    public let info: JSONObject
    /// The largest message (headers plus payload) the server accepts.
    public var maxPayload: Int { Int(self.info["max_payload"]?.intValue ?? 1024 * 1024) }
    /// How many of the server's `PING`s this connection answered.
    public var pingsAnswered: Int { self.core.state.withLock { $0.pingsAnswered } }

    let channel: any Channel
    let core: NATSConnectionCore
    let inboxPrefix: String
    private let subscriptionCapacity: Int

    private init(channel: any Channel, core: NATSConnectionCore, info: JSONObject, subscriptionCapacity: Int) {
        self.channel = channel
        self.core = core
        self.info = info
        self.inboxPrefix = "_INBOX.\(NATSConnection.randomToken())"
        self.subscriptionCapacity = subscriptionCapacity
    }

    /// Connects to `host:port`, waits for `INFO`, sends `CONNECT` and a `PING`, and returns once the
    /// server's `PONG` shows the `CONNECT` was accepted (an `-ERR` instead is thrown as `NATSError.server`).
    public static func connect(
        host: String,
        port: Int,
        timeout: Duration = .seconds(5),
        subscriptionCapacity: Int = 65_536
    ) async throws -> NATSConnection {
        let core = NATSConnectionCore()
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(timeout.timeAmount)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(NATSFrameDecoder()))
                        try channel.pipeline.syncOperations.addHandler(NATSInboundHandler(core: core))
                    }
                }
                .connect(host: host, port: port)
                .get()
        } catch {
            throw NATSError.connectionClosed("cannot connect to \(host):\(port): \(error)")
        }
        do {
            let info = try await core.awaitInfo(on: channel.eventLoop, timeout: timeout)
            let connection = NATSConnection(
                channel: channel,
                core: core,
                info: info,
                subscriptionCapacity: subscriptionCapacity
            )
            var connect: JSONObject = [
                "verbose": false, "pedantic": false, "headers": true, "no_responders": true,
                "lang": "swift", "version": "0.1.0",
            ]
            connect["protocol"] = 1
            // One wildcard inbox serves every request; it is subscribed before any request is sent.
            let inboxSid = core.reserveInbox()
            let handshake = "CONNECT \(JSONValue.object(connect).jsonString)\r\nSUB \(connection.inboxPrefix).* \(inboxSid)\r\n"
            try await channel.writeAndFlush(ByteBuffer(string: handshake))
            try await connection.flush(timeout: timeout)
            return connection
        } catch {
            try? await channel.close()
            throw error
        }
    }

    /// Publishes `payload` to `subject`: `HPUB` when there are headers, `PUB` otherwise.
    ///
    /// A message larger than `maxPayload` is a `NATSError.payloadTooLarge` and is not sent (the
    /// server would close the connection for it).
    public func publish(subject: String, replyTo: String? = nil, headers: NATSHeaders = [:], payload: [UInt8]) async throws {
        let bytes = try self.encodePublish(subject: subject, replyTo: replyTo, headers: headers, payload: payload)
        try self.core.checkOpen()
        try await self.channel.writeAndFlush(bytes)
    }

    private func encodePublish(subject: String, replyTo: String?, headers: NATSHeaders, payload: [UInt8]) throws -> ByteBuffer {
        try Self.checkSubject(subject)
        if let replyTo { try Self.checkSubject(replyTo) }
        let reply = replyTo.map { " \($0)" } ?? ""
        var buffer: ByteBuffer
        if headers.isEmpty {
            guard payload.count <= self.maxPayload else {
                throw NATSError.payloadTooLarge(size: payload.count, limit: self.maxPayload)
            }
            buffer = ByteBuffer(string: "PUB \(subject)\(reply) \(payload.count)\r\n")
        } else {
            let block = try headers.encoded()
            let total = block.count + payload.count
            guard total <= self.maxPayload else { throw NATSError.payloadTooLarge(size: total, limit: self.maxPayload) }
            buffer = ByteBuffer(string: "HPUB \(subject)\(reply) \(block.count) \(total)\r\n")
            buffer.writeBytes(block)
        }
        buffer.writeBytes(payload)
        buffer.writeString("\r\n")
        return buffer
    }

    /// Subscribes to `subject` (wildcards allowed), in `queueGroup` if given.
    ///
    /// The messages arrive on the subscription's `messages` until `unsubscribe()` or the
    /// connection's end finishes it.
    public func subscribe(subject: String, queueGroup: String? = nil) async throws -> NATSSubscription {
        try Self.checkSubject(subject)
        if let queueGroup { try Self.checkSubject(queueGroup) }
        let (stream, continuation) = AsyncStream.makeStream(
            of: NATSMessage.self,
            bufferingPolicy: .bufferingOldest(self.subscriptionCapacity)
        )
        let counter = DropCounter()
        guard let sid = self.core.addSubscription(continuation, counter: counter) else {
            throw self.core.closedError()
        }
        let queue = queueGroup.map { " \($0)" } ?? ""
        do {
            try await self.channel.writeAndFlush(ByteBuffer(string: "SUB \(subject)\(queue) \(sid)\r\n"))
        } catch {
            self.core.removeSubscription(sid)?.finish()
            throw NATSError.connectionClosed("cannot send SUB: \(error)")
        }
        return NATSSubscription(sid: sid, subject: subject, messages: stream, counter: counter, connection: self)
    }

    /// Ends subscription `sid`: `UNSUB` to the server, and its stream finishes.
    func unsubscribe(sid: Int) async throws {
        guard let continuation = self.core.removeSubscription(sid) else { return }
        continuation.finish()
        try self.core.checkOpen()
        try await self.channel.writeAndFlush(ByteBuffer(string: "UNSUB \(sid)\r\n"))
    }

    /// Sends a request and waits for its one reply, at most `timeout`.
    ///
    /// The reply subject is `_INBOX.<random>.<n>`, under the connection's one wildcard inbox
    /// subscription. A 503 status reply (no subscriber on `subject`) is `NATSError.noResponders`.
    public func request(
        subject: String,
        headers: NATSHeaders = [:],
        payload: [UInt8],
        timeout: Duration = .seconds(5)
    ) async throws -> NATSMessage {
        let token = self.core.nextRequestToken()
        let replyTo = "\(self.inboxPrefix).\(token)"
        let bytes = try self.encodePublish(subject: subject, replyTo: replyTo, headers: headers, payload: payload)
        let reply = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<NATSMessage, any Error>) in
            guard self.core.addRequest(token, { continuation.resume(with: $0) }) else {
                continuation.resume(throwing: self.core.closedError())
                return
            }
            let timer = self.channel.eventLoop.scheduleTask(in: timeout.timeAmount) { () -> Void in
                self.core.removeRequest(token)?(.failure(NATSError.timeout))
            }
            self.core.setRequestTimer(token, timer)
            self.channel.writeAndFlush(bytes).whenFailure { error in
                self.core.removeRequest(token)?(.failure(NATSError.connectionClosed("cannot send: \(error)")))
            }
        }
        if reply.status == 503 { throw NATSError.noResponders(subject: subject) }
        return reply
    }

    /// One request of a batch (`requests(_:timeout:)`).
    public struct OutgoingRequest: Sendable {
        public var subject: String
        public var headers: NATSHeaders
        public var payload: [UInt8]

        public init(subject: String, headers: NATSHeaders = [:], payload: [UInt8]) {
            self.subject = subject
            self.headers = headers
            self.payload = payload
        }
    }

    /// Sends several requests at once, in order, in one write (pipelined: none waits for another's
    /// reply), and returns each one's reply or failure, in the same order. The server reads them
    /// in the order given, so a JetStream stream stores them in that order. A request that cannot
    /// be encoded (too large, a bad subject or header) throws before anything is sent.
    public func requests(_ batch: [OutgoingRequest], timeout: Duration = .seconds(5)) async throws -> [Result<NATSMessage, any Error>] {
        guard !batch.isEmpty else { return [] }
        var tokens: [Int] = []
        tokens.reserveCapacity(batch.count)
        var bytes = self.channel.allocator.buffer(capacity: batch.reduce(0) { $0 + $1.payload.count + 96 })
        for request in batch {
            let token = self.core.nextRequestToken()
            tokens.append(token)
            var one = try self.encodePublish(
                subject: request.subject,
                replyTo: "\(self.inboxPrefix).\(token)",
                headers: request.headers,
                payload: request.payload
            )
            bytes.writeBuffer(&one)
        }
        let sent = tokens  // a constant for the write's failure callback
        let replies = try await withCheckedThrowingContinuation {
            (continuation: CheckedContinuation<[Result<NATSMessage, any Error>], any Error>) in
            let collector = ReplyCollector(count: batch.count, continuation: continuation)
            for (index, token) in sent.enumerated() {
                guard self.core.addRequest(token, { collector.set(index, $0) }) else {
                    collector.set(index, .failure(self.core.closedError()))
                    continue
                }
                let timer = self.channel.eventLoop.scheduleTask(in: timeout.timeAmount) { () -> Void in
                    self.core.removeRequest(token)?(.failure(NATSError.timeout))
                }
                self.core.setRequestTimer(token, timer)
            }
            self.channel.writeAndFlush(bytes).whenFailure { error in
                for token in sent {
                    self.core.removeRequest(token)?(.failure(NATSError.connectionClosed("cannot send: \(error)")))
                }
            }
        }
        return zip(batch, replies).map { request, reply in
            if case .success(let message) = reply, message.status == 503 {
                return .failure(NATSError.noResponders(subject: request.subject))
            }
            return reply
        }
    }

    /// Sends `PING` and waits for the server's `PONG`: everything sent before has been processed.
    public func flush(timeout: Duration = .seconds(5)) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            guard let id = self.core.addPongWaiter(continuation) else {
                continuation.resume(throwing: self.core.closedError())
                return
            }
            // On time-out the waiter is emptied, not removed: a late PONG still answers its own PING.
            let timer = self.channel.eventLoop.scheduleTask(in: timeout.timeAmount) {
                self.core.timeOutPongWaiter(id)
            }
            self.core.setPongTimer(id, timer)
            self.channel.writeAndFlush(ByteBuffer(string: "PING\r\n")).whenFailure { error in
                self.core.fail(NATSError.connectionClosed("cannot send PING: \(error)"))
            }
        }
    }

    /// Closes the connection: pending requests and flushes fail, subscriptions finish.
    public func close() async throws {
        self.core.fail(NATSError.connectionClosed("closed by the client"))
        try? await self.channel.close()
    }

    /// Whether the connection has ended (closed by either side).
    public var isClosed: Bool { self.core.state.withLock { $0.closed != nil } }

    static func checkSubject(_ subject: String) throws(NATSError) {
        guard !subject.isEmpty, !subject.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7f }) else {
            throw .invalidSubject(subject)
        }
    }

    static func randomToken() -> String {
        let alphabet = Array("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".utf8)
        var generator = SystemRandomNumberGenerator()
        return String(decoding: (0..<22).map { _ in alphabet.randomElement(using: &generator)! }, as: UTF8.self)
    }
}

/// A subscription: its messages, and the way to end it.
public struct NATSSubscription: Sendable {
    /// The subscription id on this connection.
    public let sid: Int
    /// The subject (or wildcard) subscribed to.
    public let subject: String
    /// The messages, in the order the server delivered them.
    public let messages: AsyncStream<NATSMessage>
    let counter: DropCounter
    let connection: NATSConnection

    /// How many messages were dropped because the buffer was full.
    public var dropped: Int { self.counter.count.load(ordering: .relaxed) }

    /// Sends `UNSUB` and finishes `messages`.
    public func unsubscribe() async throws {
        try await self.connection.unsubscribe(sid: self.sid)
    }
}

/// Counts a subscription's dropped messages.
final class DropCounter: Sendable {
    let count = Atomic<Int>(0)
}

extension Duration {
    var timeAmount: TimeAmount {
        let (seconds, attoseconds) = self.components
        return .nanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
    }
}

/// Gathers the replies of a batch of requests, in order, and resumes its caller once each has one.
private final class ReplyCollector: Sendable {
    private struct State {
        var replies: [Result<NATSMessage, any Error>?]
        var remaining: Int
        var continuation: CheckedContinuation<[Result<NATSMessage, any Error>], any Error>?
    }

    private let state: Mutex<State>

    init(count: Int, continuation: CheckedContinuation<[Result<NATSMessage, any Error>], any Error>) {
        self.state = Mutex(State(replies: Array(repeating: nil, count: count), remaining: count, continuation: continuation))
    }

    /// The reply (or failure) of request `index`; a second one for the same index is ignored.
    func set(_ index: Int, _ reply: Result<NATSMessage, any Error>) {
        let done = self.state.withLock {
            state -> (CheckedContinuation<[Result<NATSMessage, any Error>], any Error>, [Result<NATSMessage, any Error>])? in
            guard state.replies[index] == nil else { return nil }
            state.replies[index] = reply
            state.remaining -= 1
            guard state.remaining == 0, let continuation = state.continuation else { return nil }
            state.continuation = nil
            return (continuation, state.replies.map { $0! })
        }
        if let (continuation, replies) = done { continuation.resume(returning: replies) }
    }
}
