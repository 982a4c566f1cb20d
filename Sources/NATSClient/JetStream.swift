import EvdClient

/// The JetStream API over a `NATSConnection`: streams, publishing with acknowledgement, reading
/// stored messages. Each call is a request to `$JS.API.…` whose JSON reply is decoded here.
public struct JetStream: Sendable {
    /// An error reply of the JetStream API: `{"error":{"code":…,"err_code":…,"description":…}}`.
    public struct APIError: Error, Sendable, Equatable, CustomStringConvertible {
        /// The HTTP-like status (400, 404, 503…).
        public var code: Int
        /// JetStream's own error code (10058: stream name in use, 10070: wrong last msg id…).
        public var errCode: Int
        /// The server's text.
        public var errorDescription: String

        public var description: String { "JetStream error \(code)/\(errCode): \(errorDescription)" }
    }

    /// The acknowledgement of a stored message.
    public struct PubAck: Sendable, Equatable {
        /// The stream that stored it.
        public var stream: String
        /// Its sequence number in the stream (for a duplicate: the original's).
        public var seq: UInt64
        /// Whether the stream already held a message with this `Nats-Msg-Id` (inside its duplicate window).
        public var duplicate: Bool

        /// Creates an ack (tests compare against one).
        public init(stream: String, seq: UInt64, duplicate: Bool) {
            self.stream = stream
            self.seq = seq
            self.duplicate = duplicate
        }
    }

    /// What `$JS.API.STREAM.INFO` says about a stream.
    public struct StreamInfo: Sendable {
        /// The stream's name.
        public var name: String
        /// How many messages it holds.
        public var messages: UInt64
        /// The first and last sequence numbers it holds (0 when it never held any).
        public var firstSeq: UInt64
        /// The last sequence number stored.
        public var lastSeq: UInt64
        /// The whole reply, for what the fields above leave out (`config`, `state`, `cluster`).
        public var raw: JSONObject
    }

    /// A message read back from a stream.
    public struct StoredMessage: Sendable {
        /// Its subject.
        public var subject: String
        /// Its sequence number in the stream.
        public var seq: UInt64
        /// Its headers (from the API's base64 `hdrs`).
        public var headers: NATSHeaders
        /// Its payload (from the API's base64 `data`).
        public var payload: [UInt8]
        /// When the stream stored it (RFC 3339 text, as the server wrote it).
        public var time: String?
    }

    /// How a stream stores its messages.
    public enum Storage: String, Sendable {
        case file
        case memory
    }

    /// The connection the requests go through.
    public let connection: NATSConnection
    /// The longest wait for each API reply.
    public var timeout: Duration

    /// A JetStream view of `connection`.
    public init(connection: NATSConnection, timeout: Duration = .seconds(5)) {
        self.connection = connection
        self.timeout = timeout
    }

    /// Creates stream `name` over `subjects` (the server accepts an identical existing one).
    @discardableResult
    public func createStream(
        name: String,
        subjects: [String],
        storage: Storage = .file,
        duplicateWindow: Duration = .seconds(120),
        replicas: Int = 1
    ) async throws -> StreamInfo {
        let (seconds, attoseconds) = duplicateWindow.components
        let config: JSONObject = [
            "name": .string(name),
            "subjects": .array(subjects.map { .string($0) }),
            "storage": .string(storage.rawValue),
            "retention": "limits",
            "discard": "old",
            "duplicate_window": .int(seconds * 1_000_000_000 + attoseconds / 1_000_000_000),
            "num_replicas": .integer(replicas),
        ]
        return Self.streamInfo(try await self.api("STREAM.CREATE.\(name)", config))
    }

    /// The stream's state; a missing stream is an `APIError` (404, err_code 10059).
    public func streamInfo(name: String) async throws -> StreamInfo {
        Self.streamInfo(try await self.api("STREAM.INFO.\(name)", nil))
    }

    /// Publishes `messages` in order, pipelined (all sent in one write before any ack is awaited),
    /// and returns each one's `PubAck` or error, in the same order: the stream stores them in the
    /// order given. One message's refusal (a wrong `Nats-Expected-Last-Msg-Id`, say) is its own
    /// element's `APIError`; the others are unaffected.
    public func publish(_ messages: [NATSConnection.OutgoingRequest]) async throws -> [Result<PubAck, any Error>] {
        try await self.connection.requests(messages, timeout: self.timeout).map { reply in
            reply.flatMap { message in Result { try Self.pubAck(message.payload) } }
        }
    }

    /// Publishes to a subject a stream captures and returns its `PubAck`.
    ///
    /// `Nats-Msg-Id` in `headers` makes a retry inside the duplicate window a `duplicate` ack;
    /// `Nats-Expected-Last-Msg-Id` (and the other `Nats-Expected-*`) make a mismatch an `APIError`.
    /// No stream on `subject` is `NATSError.noResponders`.
    public func publish(subject: String, headers: NATSHeaders = [:], payload: [UInt8]) async throws -> PubAck {
        let reply = try await self.connection.request(subject: subject, headers: headers, payload: payload, timeout: self.timeout)
        return try Self.pubAck(reply.payload)
    }

    /// A PubAck's JSON (or the API's error reply, thrown).
    static func pubAck(_ payload: [UInt8]) throws -> PubAck {
        let object = try Self.decode(payload)
        guard let stream = object["stream"]?.stringValue, let seq = object["seq"]?.intValue else {
            throw NATSError.protocolViolation("a PubAck without stream and seq")
        }
        return PubAck(stream: stream, seq: UInt64(seq), duplicate: object["duplicate"]?.boolValue ?? false)
    }

    /// The stream's message `seq`; a missing one is an `APIError` (404, err_code 10037).
    public func getMessage(stream: String, seq: UInt64) async throws -> StoredMessage {
        try Self.storedMessage(try await self.api("STREAM.MSG.GET.\(stream)", ["seq": .integer(seq)]))
    }

    /// The stream's last message, or `nil` when it holds none.
    ///
    /// One `STREAM.MSG.GET` with `{"last_by_subj":">"}` (the last message on any subject; nats-server
    /// 2.9.10 accepts the wildcard there); "no message found" (err_code 10037) is `nil`.
    ///
    /// It is asked only once `STREAM.INFO` shows a message: nats-server before 2.9.15 registers a new
    /// stream before it has made its store, and a `MSG.GET` that arrives in between dereferences the
    /// missing store and crashes the server (fixed in 2.9.15, which makes the store first). A stream
    /// that holds a message is past that point; `STREAM.INFO` itself is safe in it.
    public func lastMessage(stream: String) async throws -> StoredMessage? {
        guard try await self.streamInfo(name: stream).messages > 0 else { return nil }
        do {
            return try Self.storedMessage(try await self.api("STREAM.MSG.GET.\(stream)", ["last_by_subj": ">"]))
        } catch let error as APIError where error.errCode == 10037 {
            return nil
        }
    }

    /// Sends one API request and returns its reply object; an `error` member is thrown as `APIError`.
    func api(_ suffix: String, _ body: JSONObject?) async throws -> JSONObject {
        let payload = body.map { JSONValue.object($0).jsonBytes } ?? []
        let reply = try await self.connection.request(subject: "$JS.API.\(suffix)", payload: payload, timeout: self.timeout)
        return try Self.decode(reply.payload)
    }

    static func decode(_ payload: [UInt8]) throws -> JSONObject {
        guard let object = (try? JSONValue(parsing: payload))?.objectValue else {
            throw NATSError.protocolViolation("a JetStream reply that is not a JSON object")
        }
        if let error = object["error"]?.objectValue {
            throw APIError(
                code: Int(error["code"]?.intValue ?? 0),
                errCode: Int(error["err_code"]?.intValue ?? 0),
                errorDescription: error["description"]?.stringValue ?? ""
            )
        }
        return object
    }

    private static func streamInfo(_ object: JSONObject) -> StreamInfo {
        let state = object["state"]?.objectValue ?? [:]
        return StreamInfo(
            name: object["config"]?["name"]?.stringValue ?? "",
            messages: UInt64(state["messages"]?.intValue ?? 0),
            firstSeq: UInt64(state["first_seq"]?.intValue ?? 0),
            lastSeq: UInt64(state["last_seq"]?.intValue ?? 0),
            raw: object
        )
    }

    static func storedMessage(_ object: JSONObject) throws -> StoredMessage {
        guard let message = object["message"]?.objectValue, let subject = message["subject"]?.stringValue,
            let seq = message["seq"]?.intValue
        else {
            throw NATSError.protocolViolation("a STREAM.MSG.GET reply without message")
        }
        var headers = NATSHeaders()
        if let text = message["hdrs"]?.stringValue {
            guard let block = Base64.decode(text) else { throw NATSError.protocolViolation("hdrs is not base64") }
            headers = try NATSHeaders.parse(block).0
        }
        var payload: [UInt8] = []
        if let text = message["data"]?.stringValue {
            guard let bytes = Base64.decode(text) else { throw NATSError.protocolViolation("data is not base64") }
            payload = bytes
        }
        return StoredMessage(subject: subject, seq: UInt64(seq), headers: headers, payload: payload, time: message["time"]?.stringValue)
    }
}
