import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A connection to evd: requests with their responses, and the stream of events, vetoes and notices.
///
/// Open one with `EvdConnection.withConnection(socketPath:_:)`; it is closed when the closure returns.
///
/// ```swift
/// try await EvdConnection.withConnection(socketPath: path) { evd in
///     _ = try await evd.request("subscribe", ["events": ["insert-rows"]])
///     while let event = await evd.nextMessage() { print(event["table"] ?? nil) }
/// }
/// ```
public final class EvdConnection: Sendable {
    /// Raised when the connection ends before a response arrives, or cannot be made.
    public struct ConnectionError: Error, CustomStringConvertible {
        public let description: String
    }

    /// What a person can act on when connecting failed: the path, the system's reason, and what
    /// to do about it (`evctl: cannot connect to evd at PATH: No such file or directory (is evd
    /// running? ...)`), not the socket call's own text.
    static func connectFailure(_ socketPath: String, _ error: any Error) -> String {
        guard let code = (error as? IOError)?.errnoCode else { return "cannot connect to evd at \(socketPath): \(error)" }
        let reason = String(cString: strerror(code))
        let hint: String
        switch code {
        case ENOENT:
            hint = "is evd running? scripts/run, or systemctl start evd.socket; or set --socket / $EVD_SOCKET"
        case ECONNREFUSED:
            hint =
                "nothing answers there: evd is not running and this is a stale socket (or not a socket); start evd: scripts/run, or systemctl start evd.socket"
        case EACCES, EPERM:
            hint =
                "this user may not open evd's socket: under systemd, members of the group evd may (usermod -aG evd $USER, then log in again)"
        case ENOTDIR:
            hint = "a part of the path is not a directory: check --socket / $EVD_SOCKET"
        case EAGAIN:
            hint = "evd's listen queue is full: it is overloaded or out of file descriptors; try again"
        default:
            hint = "errno \(code)"
        }
        return "cannot connect to evd at \(socketPath): \(reason) (\(hint))"
    }

    /// The daemon's `hello`.
    public var hello: JSONObject { self.helloState.withLock { $0 ?? [:] } }
    private let helloState = Mutex<JSONObject?>(nil)
    private let channel: any Channel
    private let pending = Mutex<PendingState>(PendingState())
    private let messages: AsyncQueue<JSONObject>
    private let helloSignal = AsyncQueue<Bool>(capacity: 1)

    private struct PendingState {
        var nextID: Int64 = 1
        var waiting: [Int64: CheckedContinuation<JSONObject, any Error>] = [:]
        var closed = false
    }

    private init(channel: any Channel, messageCapacity: Int) {
        self.channel = channel
        self.messages = AsyncQueue(capacity: messageCapacity)
    }

    /// Connects to the daemon at `socketPath`, waits for its `hello`, logs in with `token` if one
    /// is given (a refused token is thrown as `EvdError`), runs `body`, then closes.
    ///
    /// First the socket's directory is checked (`SocketDirectory.clientRule(for:)`): a socket in a
    /// directory that another user could have made or can write may be theirs, and this connection
    /// would hand them its token and requests. Such a directory is a `ConnectionError` naming it.
    ///
    /// Events, vetoes and notices are buffered up to `messageCapacity`; beyond that the connection
    /// stops reading (and so, in time, the daemon's overflow policy applies), so a subscriber should
    /// keep calling `nextMessage()`.
    public static func withConnection<Result: Sendable>(
        socketPath: String,
        token: String? = nil,
        messageCapacity: Int = 4096,
        _ body: (EvdConnection) async throws -> Result
    ) async throws -> Result {
        do {
            try SocketDirectory.checkParent(of: socketPath, rule: SocketDirectory.clientRule(for: socketPath))
        } catch {
            throw ConnectionError(description: "not connecting to \(socketPath): \(error)")
        }
        let asyncChannel: NIOAsyncChannel<LineFrame, ByteBuffer>
        do {
            asyncChannel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .connect(unixDomainSocketPath: socketPath) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        // Responses can be far larger than a request: allow 1 GiB lines.
                        try channel.pipeline.syncOperations.addHandler(
                            ByteToMessageHandler(LineFrameDecoder(maxLineBytes: 1 << 30))
                        )
                        return try NIOAsyncChannel<LineFrame, ByteBuffer>(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            throw ConnectionError(description: Self.connectFailure(socketPath, error))
        }
        let connection = EvdConnection(channel: asyncChannel.channel, messageCapacity: messageCapacity)
        return try await asyncChannel.executeThenClose { inbound, _ in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    await connection.readLoop(inbound)
                }
                // Nobody takes messages once `body` ends: finishing the queue frees a read loop
                // waiting for room in it, so closing cannot hang on unread events.
                defer {
                    connection.messages.finish()
                    asyncChannel.channel.close(promise: nil)
                }
                guard await connection.helloSignal.pop() == true else {
                    // A refused connection (too_many_connections) gets one error response instead.
                    if let refusal = await connection.messages.pop(), refusal["type"] == "response",
                        let error = refusal["error"]?.objectValue
                    {
                        throw EvdError(object: error)
                    }
                    throw ConnectionError(description: "evd at \(socketPath) closed the connection without a hello")
                }
                if let token { try await connection.login(token: token) }
                let result = try await body(connection)
                connection.messages.finish()
                asyncChannel.channel.close(promise: nil)
                try await group.waitForAll()
                return result
            }
        }
    }

    private static func decode(_ line: ByteBuffer) -> JSONObject? {
        line.withUnsafeReadableBytes { try? JSONValue(parsing: $0) }?.objectValue
    }

    private func readLoop(_ inbound: NIOAsyncChannelInboundStream<LineFrame>) async {
        do {
            for try await frame in inbound {
                guard case .line(let line) = frame, let message = Self.decode(line) else { continue }
                if message["type"] == "hello" && self.helloState.withLock({ $0 == nil }) {
                    self.helloState.withLock { $0 = message }
                    await self.helloSignal.push(true)
                    continue
                }
                if message["type"] == "response" {
                    let continuation = self.pending.withLock { state in
                        message["id"]?.intValue.flatMap { state.waiting.removeValue(forKey: $0) }
                    }
                    if let continuation {
                        continuation.resume(returning: message)
                        continue
                    }
                }
                await self.messages.push(message)
            }
        } catch {}
        let waiting = self.pending.withLock { state in
            state.closed = true
            defer { state.waiting = [:] }
            return state.waiting
        }
        for (_, continuation) in waiting {
            continuation.resume(throwing: ConnectionError(description: "the connection to evd closed"))
        }
        self.messages.finish()
        self.helloSignal.finish()
    }

    /// Sends an operation and returns its `result`; an error response is thrown as `EvdError`.
    ///
    /// ```swift
    /// let result = try await evd.request(.execute(.init(sql: "select 1")))
    /// ```
    @discardableResult
    public func request(_ operation: EvdOperation) async throws -> JSONObject {
        try Self.result(of: try await self.rawRequest(members: operation.request))
    }

    /// Sends an operation and returns the whole response object (`ok`, `result` or `error`).
    public func rawRequest(_ operation: EvdOperation) async throws -> JSONObject {
        try await self.rawRequest(members: operation.request)
    }

    /// Sends a request by its op's name and arguments, as they are: for what `EvdOperation` cannot
    /// express (a test's malformed request, an op of a newer daemon). Returns its `result`; an
    /// error response is thrown as `EvdError`.
    @discardableResult
    public func request(_ op: String, _ arguments: JSONObject = [:]) async throws -> JSONObject {
        try Self.result(of: try await self.rawRequest(op, arguments))
    }

    /// Sends a request by its op's name and arguments and returns the whole response object.
    public func rawRequest(_ op: String, _ arguments: JSONObject = [:]) async throws -> JSONObject {
        var members = arguments
        members["op"] = .string(op)
        return try await self.rawRequest(members: members)
    }

    /// Sends an operation and returns its result with the response's `seq`: the seq of the last
    /// event the request committed (nil when it committed none). An error response is thrown.
    public func requestWithSeq(_ operation: EvdOperation) async throws -> (result: JSONObject, seq: Int64?) {
        let response = try await self.rawRequest(members: operation.request)
        return (try Self.result(of: response), response["seq"]?.intValue)
    }

    private static func result(of response: JSONObject) throws -> JSONObject {
        if response["ok"] == true {
            return response["result"]?.objectValue ?? [:]
        }
        throw EvdError(object: response["error"]?.objectValue ?? [:])
    }

    /// Sends a request's members (with `op`; the connection adds `id`) and waits for its response.
    private func rawRequest(members: JSONObject) async throws -> JSONObject {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<JSONObject, any Error>) in
            let id: Int64? = self.pending.withLock { state in
                guard !state.closed else { return nil }
                defer { state.nextID += 1 }
                state.waiting[state.nextID] = continuation
                return state.nextID
            }
            guard let id else {
                continuation.resume(throwing: ConnectionError(description: "the connection to evd is closed"))
                return
            }
            var request = members
            request["id"] = .int(id)
            var bytes = JSONValue.object(request).jsonBytes
            bytes.append(0x0a)
            self.channel.writeAndFlush(ByteBuffer(bytes: bytes)).whenFailure { error in
                let continuation = self.pending.withLock { $0.waiting.removeValue(forKey: id) }
                continuation?.resume(throwing: ConnectionError(description: "cannot send to evd: \(error)"))
            }
        }
    }

    /// Logs in with a token (`login`): the session acts as the token's actor from now on, until
    /// `logout`. Returns that actor; a refused token is thrown as `EvdError` (`token_invalid`,
    /// `token_expired`).
    @discardableResult
    public func login(token: String) async throws -> JSONObject {
        try await self.request(.login(token: token))["actor"]?.objectValue ?? [:]
    }

    /// Sends a message that gets no response when valid (a veto `reply`).
    public func send(_ message: JSONObject) async throws {
        var bytes = JSONValue.object(message).jsonBytes
        bytes.append(0x0a)
        try await self.channel.writeAndFlush(ByteBuffer(bytes: bytes))
    }

    /// Sends raw bytes as they are (tests use it for malformed input).
    public func sendRaw(_ bytes: [UInt8]) async throws {
        try await self.channel.writeAndFlush(ByteBuffer(bytes: bytes))
    }

    /// The next event, veto or notice (or a response to a request not sent with `request`);
    /// `nil` once the connection has closed.
    public func nextMessage() async -> JSONObject? {
        await self.messages.pop()
    }
}
