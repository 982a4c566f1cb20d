import EvdClient

/// Reading a stream: an ephemeral pull consumer that follows it live, and a binary search for where
/// to start.
///
/// Why a pull consumer and not a push one: `NATSConnection` buffers each subscription up to a fixed
/// number of messages and drops the newest past that (the NATS "slow consumer" rule). A push
/// consumer with `ack_policy: none` sends as fast as the server can; its flow control bounds bytes
/// in flight, not messages, and only once its requests are answered, so a reader that is slower than
/// the stream (a terminal, a paused pipe) would overflow the buffer and lose messages. A pull consumer
/// sends at most `batch` messages per `$JS.API.CONSUMER.MSG.NEXT` request, and the next request goes
/// out only when the batch is complete or the request ended (`408 Request Timeout`): what is in flight
/// is bounded by construction, nothing is dropped, no flow-control replies are needed, and the
/// request's `idle_heartbeat` (nats-server 2.9 and later) tells a live but quiet stream from a dead
/// consumer. With `ack_policy: none` nothing is acknowledged: the consumer is a cursor of the reader,
/// in memory on the server, deleted when the reader is done (or `inactiveThreshold` after it vanished).
///
/// Like the clients' "ordered consumer", it delivers each stream message at most once and in stream
/// order: it remembers the last stream sequence delivered, and when the consumer is lost (deleted,
/// a leadership change, silence past three heartbeats, a gap in the consumer's own sequence) it makes
/// a new one starting right after it.
extension JetStream {
    /// Where a consumer starts reading.
    public enum ConsumerStart: Sendable, Equatable {
        /// At the stream's first message.
        case all
        /// At stream sequence `n` (or the first message after it, if `n` was deleted).
        case sequence(UInt64)
        /// After the stream's last message: only what is stored from now on.
        case new
    }

    /// What `consume` does after a message was handled.
    public enum ConsumeStep: Sendable, Equatable {
        /// Wait for the next message.
        case next
        /// Stop: delete the consumer and return.
        case stop
    }

    /// How `consume` reads.
    public struct ConsumeOptions: Sendable {
        /// Only messages on this subject (wildcards allowed); `nil`: all of the stream's.
        public var filterSubject: String?
        /// Where to start.
        public var start: ConsumerStart
        /// The most messages one pull request asks for (and so the most in flight).
        public var batch: Int
        /// How long one pull request waits on the server before it ends with `408` and a new one is sent.
        public var expires: Duration
        /// The server's idle heartbeat during a pull request; three missed ones make a new consumer.
        public var heartbeat: Duration
        /// How long the server keeps the consumer without pull requests (a reader that died).
        public var inactiveThreshold: Duration

        /// Options with the usual values: a batch of 256, 10 s requests, 1 s heartbeats, 60 s threshold.
        public init(
            filterSubject: String? = nil,
            start: ConsumerStart = .all,
            batch: Int = 256,
            expires: Duration = .seconds(10),
            heartbeat: Duration = .seconds(1),
            inactiveThreshold: Duration = .seconds(60)
        ) {
            self.filterSubject = filterSubject
            self.start = start
            self.batch = batch
            self.expires = expires
            self.heartbeat = heartbeat
            self.inactiveThreshold = inactiveThreshold
        }
    }

    /// Reads stream `stream` through an ephemeral pull consumer and calls `handle` with each message,
    /// in stream order, until `handle` returns `.stop` (or throws), the task is cancelled (a clean
    /// return) or the connection ends (`NATSError.connectionClosed`). A missing stream is an
    /// `APIError` (404, err_code 10059). The consumer is deleted before this returns.
    ///
    /// Following live is the default: when the stream has no more messages, the pull request waits on
    /// the server, and messages stored later arrive as they are stored. The messages' `time` is `nil`:
    /// a pull delivery carries the stored time only as nanoseconds in its reply subject.
    public func consume(
        stream: String,
        options: ConsumeOptions = ConsumeOptions(),
        _ handle: (StoredMessage) async throws -> ConsumeStep
    ) async throws {
        guard options.batch >= 1 else { throw NATSError.protocolViolation("a pull batch must be at least 1") }
        let inbox = "_INBOX.\(NATSConnection.randomToken())"
        let subscription = try await self.connection.subscribe(subject: "\(inbox).*")
        var pull = PullState(inbox: inbox, options: options)
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                let (events, sink) = AsyncStream.makeStream(of: PullEvent.self)
                group.addTask {
                    for await message in subscription.messages { sink.yield(.message(message)) }
                    sink.yield(.closed)
                }
                let tick = options.heartbeat
                group.addTask {
                    while (try? await Task.sleep(for: tick)) != nil { sink.yield(.tick) }
                }
                defer { group.cancelAll() }
                try await self.startConsumer(stream: stream, &pull)
                for await event in events {
                    switch event {
                    case .message(let message):
                        guard try await self.received(message, stream: stream, &pull, handle) == .next else { return }
                    case .tick:
                        if ContinuousClock.now - pull.lastActivity > options.heartbeat * 3 {
                            if self.connection.isClosed { throw self.connectionEnded() }
                            try await self.restartConsumer(stream: stream, &pull)
                        }
                    case .closed:
                        // Our own cancellation ends the subscription's stream too: that is a clean stop.
                        if Task.isCancelled { return }
                        throw self.connectionEnded()
                    }
                }
            }
        } catch {
            await self.deleteConsumer(stream: stream, pull.consumer)
            try? await subscription.unsubscribe()
            throw error
        }
        await self.deleteConsumer(stream: stream, pull.consumer)
        try? await subscription.unsubscribe()
    }

    /// The first message at stream sequence `seq` or after it, or `nil` when there is none.
    ///
    /// `STREAM.MSG.GET` with `{"seq":N,"next_by_subj":">"}` (nats-server 2.9 and later).
    public func message(stream: String, atOrAfter seq: UInt64) async throws -> StoredMessage? {
        do {
            return try Self.storedMessage(
                try await self.api("STREAM.MSG.GET.\(stream)", ["seq": .integer(seq), "next_by_subj": ">"])
            )
        } catch let error as APIError where error.errCode == 10037 {
            return nil
        }
    }

    /// The first stream sequence whose message satisfies `isAtOrPast`, by binary search with
    /// `STREAM.MSG.GET` over the stream's first…last sequence (about log2(messages) requests).
    ///
    /// `isAtOrPast` must be monotone over the stream: false for a prefix of its messages and true for
    /// the rest (for evd's forwarded events: "its evd seq is greater than S", since they are stored in
    /// seq order). When it holds for no message, the result is the stream's last sequence + 1 (what
    /// is stored next). Deleted sequences count as the message after them.
    public func firstSequence(stream: String, where isAtOrPast: (StoredMessage) throws -> Bool) async throws -> UInt64 {
        let info = try await self.streamInfo(name: stream)
        // The answer lies in low...high; high == lastSeq + 1 stands for "no message".
        var low = max(info.firstSeq, 1)
        var high = info.lastSeq + 1
        while low < high {
            let middle = low + (high - low) / 2
            guard let message = try await self.message(stream: stream, atOrAfter: middle), message.seq < high else {
                high = middle
                continue
            }
            if try isAtOrPast(message) {
                high = middle
            } else {
                low = message.seq + 1
            }
        }
        return low
    }

    // MARK: The pull loop

    private enum PullEvent: Sendable {
        case message(NATSMessage)
        case tick
        case closed
    }

    /// The pull loop's state: which consumer, which request, how far it got.
    private struct PullState {
        let inbox: String
        let options: ConsumeOptions
        /// The consumer now in use (`nil` before the first is made).
        var consumer: String?
        /// The last stream sequence handed to the caller (or, before any, the one the consumer starts after).
        var position: UInt64 = 0
        /// Whether `position` is known (a consumer was made).
        var started = false
        /// The consumer sequence of the last message received from the current consumer.
        var consumerSeq: UInt64 = 0
        /// The current pull request's number (its reply subject is `inbox.<number>`).
        var request = 0
        /// Messages the current pull request delivered so far.
        var delivered = 0
        /// When something last came from the server, or the caller last finished with a message.
        var lastActivity = ContinuousClock.now

        init(inbox: String, options: ConsumeOptions) {
            self.inbox = inbox
            self.options = options
        }
    }

    /// Handles one frame of the pull inbox: a stream message, or a status of a pull request.
    private func received(
        _ message: NATSMessage,
        stream: String,
        _ pull: inout PullState,
        _ handle: (StoredMessage) async throws -> ConsumeStep
    ) async throws -> ConsumeStep {
        pull.lastActivity = .now
        if let status = message.status {
            // Statuses come on the request's own reply subject: an old request's are stale.
            guard message.subject == "\(pull.inbox).\(pull.request)" else { return .next }
            switch status {
            case 100:
                break  // idle heartbeat: the consumer is alive and has nothing
            case 404, 408:
                try await self.sendPull(stream: stream, &pull)  // no messages / the request expired
            case 409 where Self.consumerWasLost(message.statusDescription):
                try await self.restartConsumer(stream: stream, &pull)
            case 409 where (message.statusDescription ?? "").lowercased().contains("server shutdown"):
                // The connection is about to end: say so as its end, which a reader may retry.
                throw NATSError.connectionClosed("the server is shutting down")
            default:
                let text = message.statusDescription ?? ""
                throw APIError(code: status, errCode: 0, errorDescription: "pull request refused: \(status) \(text)")
            }
            return .next
        }
        guard let replyTo = message.replyTo, let meta = AckMetadata(replyTo) else {
            throw NATSError.protocolViolation("a consumer's message without a $JS.ACK reply subject")
        }
        guard meta.consumer == pull.consumer else { return .next }  // from a consumer given up on
        guard meta.consumerSeq == pull.consumerSeq + 1 else {
            // A gap in the consumer's own sequence: something was lost on the way; start over after
            // the last message handled.
            try await self.restartConsumer(stream: stream, &pull)
            return .next
        }
        pull.consumerSeq = meta.consumerSeq
        pull.delivered += 1
        if pull.delivered >= pull.options.batch { try await self.sendPull(stream: stream, &pull) }
        guard meta.streamSeq > pull.position else { return .next }
        pull.position = meta.streamSeq
        let stored = StoredMessage(
            subject: message.subject,
            seq: meta.streamSeq,
            headers: message.headers,
            payload: message.payload,
            time: nil
        )
        let step = try await handle(stored)
        pull.lastActivity = .now
        return step
    }

    /// Whether a 409 status means the consumer is gone (rather than a refused request).
    private static func consumerWasLost(_ description: String?) -> Bool {
        let text = (description ?? "").lowercased()
        return text.contains("consumer deleted") || text.contains("leadership change")
    }

    /// Makes the first consumer, from `options.start`.
    private func startConsumer(stream: String, _ pull: inout PullState) async throws {
        var config: JSONObject = [
            "ack_policy": "none",
            "replay_policy": "instant",
            "inactive_threshold": .integer(pull.options.inactiveThreshold.nanoseconds),
            "num_replicas": 1,
            "mem_storage": true,
        ]
        if pull.started {
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = .integer(pull.position + 1)
        } else {
            switch pull.options.start {
            case .all:
                config["deliver_policy"] = "all"
            case .sequence(let seq):
                config["deliver_policy"] = "by_start_sequence"
                config["opt_start_seq"] = .integer(max(seq, 1))
            case .new:
                config["deliver_policy"] = "new"
            }
        }
        if let filter = pull.options.filterSubject { config["filter_subject"] = .string(filter) }
        let reply = try await self.api("CONSUMER.CREATE.\(stream)", ["stream_name": .string(stream), "config": .object(config)])
        guard let name = reply["name"]?.stringValue else {
            throw NATSError.protocolViolation("a CONSUMER.CREATE reply without name")
        }
        if !pull.started {
            // The stream sequence the consumer starts after: where a replacement must start too.
            pull.position = UInt64(reply["delivered"]?["stream_seq"]?.intValue ?? 0)
            pull.started = true
        }
        pull.consumer = name
        pull.consumerSeq = 0
        try await self.sendPull(stream: stream, &pull)
    }

    /// Gives up the current consumer and makes a new one starting after the last message handled.
    private func restartConsumer(stream: String, _ pull: inout PullState) async throws {
        await self.deleteConsumer(stream: stream, pull.consumer)
        pull.consumer = nil
        try await self.startConsumer(stream: stream, &pull)
    }

    /// Sends the next pull request.
    private func sendPull(stream: String, _ pull: inout PullState) async throws {
        guard let consumer = pull.consumer else { return }
        pull.request += 1
        pull.delivered = 0
        pull.lastActivity = .now
        let body: JSONObject = [
            "batch": .integer(pull.options.batch),
            "expires": .integer(pull.options.expires.nanoseconds),
            "idle_heartbeat": .integer(pull.options.heartbeat.nanoseconds),
        ]
        try await self.connection.publish(
            subject: "$JS.API.CONSUMER.MSG.NEXT.\(stream).\(consumer)",
            replyTo: "\(pull.inbox).\(pull.request)",
            payload: JSONValue.object(body).jsonBytes
        )
    }

    /// Deletes a consumer, best effort (it goes away by itself after its inactive threshold anyway).
    private func deleteConsumer(stream: String, _ name: String?) async {
        guard let name, !self.connection.isClosed else { return }
        _ = try? await self.api("CONSUMER.DELETE.\(stream).\(name)", nil)
    }

    private func connectionEnded() -> NATSError {
        .connectionClosed("the connection ended while reading the stream")
    }
}

/// What a JetStream message's reply subject says about it.
///
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time ns>.<pending>` (9
/// tokens), or the newer form with a domain and an account hash after `ACK` (12 or more).
struct AckMetadata: Equatable {
    var stream: String
    var consumer: String
    var streamSeq: UInt64
    var consumerSeq: UInt64
    var pending: UInt64

    init(stream: String, consumer: String, streamSeq: UInt64, consumerSeq: UInt64, pending: UInt64) {
        self.stream = stream
        self.consumer = consumer
        self.streamSeq = streamSeq
        self.consumerSeq = consumerSeq
        self.pending = pending
    }

    init?(_ replyTo: String) {
        let tokens = replyTo.split(separator: ".", omittingEmptySubsequences: false)
        guard tokens.count >= 9, tokens[0] == "$JS", tokens[1] == "ACK" else { return nil }
        let base = tokens.count == 9 ? 2 : 4
        guard tokens.count == 9 || tokens.count >= 11,
            let streamSeq = UInt64(tokens[base + 3]),
            let consumerSeq = UInt64(tokens[base + 4]),
            let pending = UInt64(tokens[base + 6])
        else { return nil }
        self.stream = String(tokens[base])
        self.consumer = String(tokens[base + 1])
        self.streamSeq = streamSeq
        self.consumerSeq = consumerSeq
        self.pending = pending
    }
}

extension Duration {
    /// The duration in whole nanoseconds (JetStream's unit for durations).
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = self.components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}
