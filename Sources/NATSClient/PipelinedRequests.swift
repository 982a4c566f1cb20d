import NIOCore
import Synchronization

extension NATSConnection {
    /// The reply subject of one request of a batch, written straight into the batch's buffer.
    public struct ReplySubject: Sendable {
        let prefix: String
        let token: Int

        /// Appends the subject (`_INBOX.<random>.<token>`) to `buffer`.
        public func write(into buffer: inout ByteBuffer) {
            buffer.writeString(self.prefix)
            buffer.writeInteger(UInt8(ascii: "."))
            buffer.writeString(String(self.token))
        }
    }

    /// Requests already written to the server whose replies are still to come.
    ///
    /// `replies()` may be awaited later, and other batches sent meanwhile: this is what lets a
    /// publisher keep several batches in flight while the server stores them in the order sent.
    public struct PendingReplies: Sendable {
        let future: EventLoopFuture<[Result<NATSMessage, any Error>]>
        /// How many requests the batch holds.
        public let count: Int

        /// Each request's reply or failure, in the order they were sent.
        public func replies() async throws -> [Result<NATSMessage, any Error>] {
            try await self.future.get()
        }
    }

    /// Writes `count` requests in one write, each encoded by `encode(index, replyTo, &buffer)` as a
    /// complete `PUB`/`HPUB` with the given reply subject, and returns at once with the pending
    /// replies: the caller's own ordering of calls is the order the server reads them in.
    ///
    /// One timer covers the whole batch: after `timeout` every reply still missing fails with
    /// `NATSError.timeout`. `encode` writes exactly one protocol message and returns `true`, or
    /// writes nothing and returns `false` (a message over `maxPayload`, which the server would close
    /// the connection for, is the encoder's to refuse); a request not written fails at once with
    /// `NATSError.payloadTooLarge` (size 0: the encoder knows the real size).
    public func sendRequests(
        count: Int,
        timeout: Duration = .seconds(5),
        encode: (_ index: Int, _ replyTo: ReplySubject, _ buffer: inout ByteBuffer) throws -> Bool
    ) throws -> PendingReplies {
        guard count > 0 else {
            return PendingReplies(future: self.channel.eventLoop.makeSucceededFuture([]), count: 0)
        }
        try self.core.checkOpen()
        let first = self.core.reserveRequestTokens(count)
        var bytes = self.channel.allocator.buffer(capacity: count * 512)
        var unsent: [Int] = []
        for index in 0..<count {
            if try !encode(index, ReplySubject(prefix: self.inboxPrefix, token: first + index), &bytes) {
                unsent.append(first + index)
            }
        }
        // Made only now that nothing can throw any more: a promise must not be dropped unfulfilled.
        let promise = self.channel.eventLoop.makePromise(of: [Result<NATSMessage, any Error>].self)
        let collector = BatchCollector(count: count, promise: promise)
        let tokens = first..<(first + count)
        guard self.core.addRequests(tokens, { index, reply in collector.set(index, reply) }) else {
            promise.fail(self.core.closedError())
            return PendingReplies(future: promise.futureResult, count: count)
        }
        let core = self.core
        for token in unsent {
            core.removeRequest(token)?(.failure(NATSError.payloadTooLarge(size: 0, limit: self.maxPayload)))
        }
        let timer = self.channel.eventLoop.scheduleTask(in: timeout.timeAmount) { () -> Void in
            for token in tokens { core.removeRequest(token)?(.failure(NATSError.timeout)) }
        }
        promise.futureResult.whenComplete { _ in timer.cancel() }
        self.channel.writeAndFlush(bytes).whenFailure { error in
            for token in tokens {
                core.removeRequest(token)?(.failure(NATSError.connectionClosed("cannot send: \(error)")))
            }
        }
        return PendingReplies(future: promise.futureResult, count: count)
    }
}

extension NATSConnectionCore {
    /// Reserves `count` consecutive request tokens and returns the first.
    func reserveRequestTokens(_ count: Int) -> Int {
        self.state.withLock { state in
            defer { state.nextRequest += count }
            return state.nextRequest
        }
    }

    /// Registers every token of `tokens` under one lock; `resume(index, reply)` is told the
    /// token's position in the range. `false` when the connection has closed.
    func addRequests(
        _ tokens: Range<Int>,
        _ resume: @escaping @Sendable (Int, Result<NATSMessage, any Error>) -> Void
    ) -> Bool {
        self.state.withLock { state in
            guard state.closed == nil else { return false }
            state.requests.reserveCapacity(state.requests.count + tokens.count)
            for token in tokens {
                let index = token - tokens.lowerBound
                state.requests[token] = Request(resume: { resume(index, $0) })
            }
            return true
        }
    }
}

/// Gathers a batch's replies, in order, and fulfils its promise once each has one.
private final class BatchCollector: Sendable {
    private struct State {
        var replies: [Result<NATSMessage, any Error>?]
        var remaining: Int
    }

    private let state: Mutex<State>
    private let promise: EventLoopPromise<[Result<NATSMessage, any Error>]>

    init(count: Int, promise: EventLoopPromise<[Result<NATSMessage, any Error>]>) {
        self.state = Mutex(State(replies: Array(repeating: nil, count: count), remaining: count))
        self.promise = promise
    }

    /// The reply (or failure) of request `index`; a second one for the same index is ignored.
    func set(_ index: Int, _ reply: Result<NATSMessage, any Error>) {
        let done = self.state.withLock { state -> [Result<NATSMessage, any Error>]? in
            guard state.replies[index] == nil else { return nil }
            state.replies[index] = reply
            state.remaining -= 1
            guard state.remaining == 0 else { return nil }
            return state.replies.map { $0! }
        }
        if let done { self.promise.succeed(done) }
    }
}

extension JetStream {
    /// Parses a PubAck reply (or throws the API's error reply); a fast path reads nats-server's
    /// usual `{"stream":"S","seq":N}` without building a JSON value.
    public static func parsePubAck(_ payload: [UInt8]) throws -> PubAck {
        if let quick = Self.quickPubAck(payload) { return quick }
        return try Self.pubAck(payload)
    }

    /// `{"stream":"NAME","seq":N}` exactly (spaces allowed after `,` and `:`, as nats-server writes
    /// `{"stream":"S", "seq":5}`; no escapes, no other member), else `nil`.
    private static func quickPubAck(_ payload: [UInt8]) -> PubAck? {
        let head = Array(#"{"stream":""#.utf8)
        guard payload.count > head.count + 9, payload.starts(with: head) else { return nil }
        var index = head.count
        let nameStart = index
        while index < payload.count, payload[index] != UInt8(ascii: "\"") {
            if payload[index] == UInt8(ascii: "\\") { return nil }
            index += 1
        }
        let nameEnd = index
        func skipSpaces() { while index < payload.count, payload[index] == UInt8(ascii: " ") { index += 1 } }
        func expect(_ text: String) -> Bool {
            let bytes = Array(text.utf8)
            guard payload.count >= index + bytes.count, payload[index..<(index + bytes.count)].elementsEqual(bytes) else {
                return false
            }
            index += bytes.count
            return true
        }
        guard expect("\",") else { return nil }
        skipSpaces()
        guard expect("\"seq\":") else { return nil }
        skipSpaces()
        var seq: UInt64 = 0
        var digits = 0
        while index < payload.count, payload[index] >= UInt8(ascii: "0"), payload[index] <= UInt8(ascii: "9"), digits < 19 {
            seq = seq * 10 + UInt64(payload[index] - UInt8(ascii: "0"))
            index += 1
            digits += 1
        }
        guard digits > 0, index == payload.count - 1, payload[index] == UInt8(ascii: "}") else { return nil }
        let name = String(decoding: payload[nameStart..<nameEnd], as: UTF8.self)
        return PubAck(stream: name, seq: seq, duplicate: false)
    }
}
