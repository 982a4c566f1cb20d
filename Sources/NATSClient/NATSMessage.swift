/// A message's NATS headers (`NATS/1.0` block): ordered, and a name may repeat.
///
/// Names are compared case-sensitively, as the server does; `subscript` returns the first value.
public struct NATSHeaders: Sendable, Equatable, ExpressibleByDictionaryLiteral {
    /// The header lines in the order they were written.
    public var fields: [(name: String, value: String)]

    /// Creates headers from `(name, value)` pairs, in that order.
    public init(_ fields: [(name: String, value: String)] = []) {
        self.fields = fields
    }

    public init(dictionaryLiteral elements: (String, String)...) {
        self.fields = elements.map { (name: $0.0, value: $0.1) }
    }

    /// The first value of header `name`; setting it replaces every value of that name.
    public subscript(name: String) -> String? {
        get { self.fields.first { $0.name == name }?.value }
        set {
            self.fields.removeAll { $0.name == name }
            if let newValue { self.fields.append((name: name, value: newValue)) }
        }
    }

    /// Whether there are no header lines.
    public var isEmpty: Bool { self.fields.isEmpty }

    public static func == (lhs: NATSHeaders, rhs: NATSHeaders) -> Bool {
        lhs.fields.elementsEqual(rhs.fields) { $0.name == $1.name && $0.value == $1.value }
    }

    /// The header block as sent in `HPUB`: `NATS/1.0\r\n`, one `Name: value\r\n` per field, `\r\n`.
    ///
    /// A name with a `:`, space or control byte, or a value with CR or LF, would change the block's
    /// shape; such headers are a `NATSError.invalidHeader`.
    func encoded() throws(NATSError) -> [UInt8] {
        var bytes = Array("NATS/1.0\r\n".utf8)
        for (name, value) in self.fields {
            guard !name.isEmpty, name.utf8.allSatisfy({ $0 > 0x20 && $0 != 0x7f && $0 != UInt8(ascii: ":") }) else {
                throw .invalidHeader("header name \(name.debugDescription) is empty or has a ':', space or control byte")
            }
            guard !value.utf8.contains(where: { $0 == 0x0d || $0 == 0x0a }) else {
                throw .invalidHeader("the value of header \(name) has a CR or LF")
            }
            bytes += name.utf8
            bytes += ": ".utf8
            bytes += value.utf8
            bytes += "\r\n".utf8
        }
        bytes += "\r\n".utf8
        return bytes
    }

    /// Parses a header block (`NATS/1.0[ status[ description]]\r\n` then fields, then an empty line).
    ///
    /// Returns the headers and the status line's code and description (`503`, "No Responders"), if any.
    static func parse(_ block: some Collection<UInt8>) throws(NATSError) -> (NATSHeaders, status: Int?, statusText: String?) {
        let text = String(decoding: block, as: UTF8.self)
        var lines = text.split(separator: "\r\n", omittingEmptySubsequences: false)[...]
        guard let first = lines.popFirst(), first.hasPrefix("NATS/1.0") else {
            throw .protocolViolation("a header block does not start with NATS/1.0")
        }
        let statusPart = first.dropFirst("NATS/1.0".count).drop { $0 == " " }
        var status: Int?
        var statusText: String?
        if !statusPart.isEmpty {
            let code = statusPart.prefix { $0 != " " }
            status = Int(code)
            let rest = statusPart.dropFirst(code.count).drop { $0 == " " }
            statusText = rest.isEmpty ? nil : String(rest)
        }
        var headers = NATSHeaders()
        for line in lines where !line.isEmpty {
            guard let colon = line.firstIndex(of: ":") else {
                throw .protocolViolation("a header line has no ':'")
            }
            let name = String(line[..<colon])
            let value = String(line[line.index(after: colon)...].drop { $0 == " " || $0 == "\t" })
            headers.fields.append((name: name, value: value))
        }
        return (headers, status, statusText)
    }
}

/// A message delivered to a subscription (`MSG` or `HMSG`).
public struct NATSMessage: Sendable {
    /// The subject it was published to.
    public var subject: String
    /// The subject a reply should be published to, if the publisher asked for one.
    public var replyTo: String?
    /// Its headers (empty for a `MSG`).
    public var headers: NATSHeaders
    /// The status code of an `HMSG`'s `NATS/1.0 503` line (503: no responders), if any.
    public var status: Int?
    /// The status line's description, if any.
    public var statusDescription: String?
    /// The payload.
    public var payload: [UInt8]

    /// Creates a message.
    public init(
        subject: String,
        replyTo: String? = nil,
        headers: NATSHeaders = NATSHeaders(),
        status: Int? = nil,
        statusDescription: String? = nil,
        payload: [UInt8]
    ) {
        self.subject = subject
        self.replyTo = replyTo
        self.headers = headers
        self.status = status
        self.statusDescription = statusDescription
        self.payload = payload
    }
}

/// The NATS client's failures.
public enum NATSError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The server sent something that is not the NATS protocol (or exceeds a bound).
    case protocolViolation(String)
    /// A message (headers and payload) larger than the server's `max_payload`.
    case payloadTooLarge(size: Int, limit: Int)
    /// A subject that is empty or has whitespace (a publish or subscribe would be malformed).
    case invalidSubject(String)
    /// A header that cannot be written in a `NATS/1.0` block.
    case invalidHeader(String)
    /// The server's `-ERR` (the connection's last one, when it closed because of it).
    case server(String)
    /// A request got a 503 status: nobody subscribes to its subject.
    case noResponders(subject: String)
    /// No reply or `PONG` within the time allowed.
    case timeout
    /// The connection is closed (or could not be made); the text says why.
    case connectionClosed(String)

    public var description: String {
        switch self {
        case .protocolViolation(let text): "NATS protocol violation: \(text)"
        case .payloadTooLarge(let size, let limit): "message of \(size) bytes exceeds the server's max_payload of \(limit)"
        case .invalidSubject(let subject): "invalid NATS subject \(subject.debugDescription)"
        case .invalidHeader(let text): "invalid NATS header: \(text)"
        case .server(let text): "NATS server error: \(text)"
        case .noResponders(let subject): "no responders on \(subject)"
        case .timeout: "NATS request timed out"
        case .connectionClosed(let text): "NATS connection closed: \(text)"
        }
    }
}
