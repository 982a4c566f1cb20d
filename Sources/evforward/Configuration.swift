/// What the forwarder is told to do (the command line, checked).
struct ForwarderConfiguration: Sendable {
    /// The NATS servers, tried in turn.
    var servers: [NATSAddress]
    /// The JetStream stream.
    var stream: String
    /// The first token(s) of every subject.
    var subjectPrefix: String
    /// The evd cursor's name.
    var cursor: String
    /// evd's socket.
    var socketPath: String
    /// The token to log in with, if any.
    var token: String?
    /// The most messages sent and not yet acknowledged.
    var maxInFlight: Int
    /// The stream's duplicate window, when the forwarder creates it.
    var duplicateWindow: Duration
    /// The stream's replicas, when the forwarder creates it.
    var replicas: Int
    /// The events subscribed to (names or globs).
    var events: [String]
    /// This host's name, for `ce-source`.
    var host: String
    /// How long to wait for a NATS or evd answer.
    var timeout: Duration = .seconds(10)
    /// The most messages in one write to NATS.
    var batchSize: Int = 1024
    /// How often (at most) the evd cursor is acknowledged, and after how many events at least.
    var ackInterval: Duration = .milliseconds(100)
    var ackEvents: Int = 10_000
    /// How often progress is logged.
    var progressInterval: Duration = .seconds(10)
}

/// A `nats://host:port` server address.
struct NATSAddress: Sendable, Equatable, CustomStringConvertible {
    var host: String
    var port: Int

    var description: String { "nats://\(self.host.contains(":") ? "[\(self.host)]" : self.host):\(self.port)" }

    /// Parses `nats://host[:port]` (or `host[:port]`); the port defaults to 4222.
    init(parsing text: String) throws(ForwarderError) {
        var rest = Substring(text)
        if let range = rest.range(of: "://") {
            let scheme = rest[..<range.lowerBound].lowercased()
            guard scheme == "nats" else {
                throw .usage("--nats \(text): only nats:// URLs are supported (no TLS, no websocket)")
            }
            rest = rest[range.upperBound...]
        }
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard !rest.contains("@") else {
            throw .usage("--nats \(text): credentials in the URL are not supported")
        }
        guard !rest.contains("/"), !rest.contains("?") else { throw .usage("--nats \(text): a URL with a path or query") }
        var host = rest
        var port = 4222
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw .usage("--nats \(text): an unclosed [") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":"), let value = Int(after.dropFirst()) else { throw .usage("--nats \(text): a bad port") }
                port = value
            }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            guard let value = Int(rest[rest.index(after: colon)...]) else { throw .usage("--nats \(text): a bad port") }
            port = value
        }
        guard !host.isEmpty else { throw .usage("--nats \(text): no host") }
        guard (1...65535).contains(port) else { throw .usage("--nats \(text): the port must be 1-65535") }
        self.host = String(host)
        self.port = port
    }
}

/// The failures that end the forwarder instead of making it start over.
enum ForwarderError: Error, CustomStringConvertible {
    /// Another forwarder is at work: exit code 3, and systemd does not restart.
    case fenced(String)
    /// A setting or a permission that retrying cannot fix.
    case fatal(String)
    /// A bad command line.
    case usage(String)

    var description: String {
        switch self {
        case .fenced(let text), .fatal(let text), .usage(let text): text
        }
    }
}
