import EvdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Everything evd needs to start: what `evd`'s flags (and later its config file) produce.
public struct EvdConfiguration: Sendable {
    /// The socket path to bind (ignored when `listenFD` is set).
    public var socketPath: String
    /// A listening socket inherited from systemd (`LISTEN_FDS`): served instead of binding.
    public var listenFD: Int32?
    /// The databases; the first is the default.
    public var databases: [DatabaseConfig]
    public var stateDirectory: String
    /// Connections per database pool.
    public var poolSize: Int = 4
    /// The socket file's mode.
    public var socketMode: mode_t = 0o600
    public var maxLineBytes: Int = 1 << 20
    public var vetoBudgetMs: Int = 5000
    /// Concurrent client connections before new ones get `too_many_connections`.
    public var maxSessions: Int = 1024
    /// Concurrent client connections one peer uid may hold before its new ones get
    /// `too_many_connections` (root and the daemon's own uid included).
    public var maxSessionsPerUID: Int = 256
    /// Subscriptions one connection may hold at once; the `subscribe` beyond it gets `bad_request`.
    public var maxSubscriptions: Int = 256
    /// Durable cursors evd keeps in all, and per actor; the `subscribe` that would make one more
    /// gets `bad_request` naming the limit.
    public var maxCursors: Int = 1024
    public var maxCursorsPerActor: Int = 32
    /// Requests a connection may have queued (pipelined) before evd stops reading from it.
    public var maxPipelinedRequests: Int = 256
    /// Values one subscription's `where` may list in all; a longer filter gets `bad_request`.
    public var maxFilterValues: Int = 1024
    /// What `--max-filter-values` accepts.
    public static let filterValuesRange = 1...1_000_000
    public var outboxLimits = OutboxLimits()
    /// The largest response evd sends; a request whose response would be larger gets
    /// `response_too_large` (a query's rows stop being read once they pass it).
    public var maxResponseBytes: Int = 64 << 20
    /// What `--max-response-bytes` accepts: at least 64 KiB, which the `events` catalog needs.
    public static let responseBytesRange = (64 << 10)...Int.max
    /// WAL pages past which a database's WAL is checkpointed in the background (`Checkpointer`);
    /// a tuning knob without a flag (tests set it lower).
    public var checkpointPages: Int = 4000
    /// How long a SQLite statement waits for another connection's lock.
    public var busyTimeoutMs: Int32 = 5000
    /// How long a request waits for a free pooled connection before it gets `timeout`.
    public var checkoutTimeoutMs: Int = 30_000
    /// How long one client statement may run before it is interrupted with `timeout` (0: no limit).
    public var maxStatementMs: Int = 30_000
    /// Whether a line (a response, a veto, a notice) made on a database thread is written to the
    /// socket there when nothing is queued ahead of it (`WriteThrough`), instead of by the
    /// connection's event loop. `--no-write-through` turns it off, for `scripts/bench`'s row that
    /// measures what it earns.
    public var writeThrough = true
    /// How long a transaction a client opened (`begin`) may sit without a request before it is
    /// rolled back and the connection closed (0: no limit).
    public var idleTransactionMs: Int = 60_000
    /// How many of a pool's connections one uid may hold at once (root and evd's own uid are not
    /// limited); `nil`: all but one (at least one).
    public var maxPoolShare: Int?

    /// `maxPoolShare`, or its default for `poolSize`.
    public var poolShare: Int { self.maxPoolShare ?? max(1, self.poolSize - 1) }
    /// How long in-flight requests may run once shutdown begins.
    public var shutdownGraceMs: Int = 5000
    /// Whether and how long committed events are kept for replay.
    public var journal = JournalSettings()
    /// The policy: who besides root and the daemon's own uid may do what (the config file's `[[grant]]`s).
    public var grants: [Grant] = []
    /// Where the Prometheus endpoint listens, if anywhere (`--metrics-socket`, `--metrics-listen`).
    public var metrics = MetricsSettings()

    public init(socketPath: String, databases: [DatabaseConfig], stateDirectory: String) {
        self.socketPath = socketPath
        self.databases = databases
        self.stateDirectory = stateDirectory
    }

    /// The state directory of PROTOCOL.md §9: `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/evd`,
    /// else `~/.local/state/evd`.
    public static func defaultStateDirectory(environment: [String: String]) -> String {
        self.stateDirectory(fromEnvironment: environment)
            ?? (environment["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? "/root") + "/.local/state/evd"
    }

    /// The state directory the environment names (`$STATE_DIRECTORY`, `$XDG_STATE_HOME/evd`), if any:
    /// it wins over the config file's.
    public static func stateDirectory(fromEnvironment environment: [String: String]) -> String? {
        if let dir = environment["STATE_DIRECTORY"], !dir.isEmpty {
            return dir.split(separator: ":", maxSplits: 1).first.map(String.init) ?? dir
        }
        if let dir = environment["XDG_STATE_HOME"], !dir.isEmpty { return dir + "/evd" }
        return nil
    }
}

/// Where evd serves `GET /metrics` (Prometheus text format); nowhere unless one is set. Both may be.
public struct MetricsSettings: Sendable, Equatable {
    /// A Unix socket to serve HTTP on (created with the main socket's mode, removed at exit).
    public var socketPath: String?
    /// A TCP address to serve HTTP on, e.g. 127.0.0.1:9187 (port 0: any free port, logged).
    public var listen: HostPort?
    /// How long a connection may take to send a whole request (from its start, or from the end
    /// of the previous response) before it is answered 408 and closed
    /// (`--metrics-request-timeout-ms`, `[metrics] request_timeout_ms`).
    public var requestTimeoutMs: Int = 5000

    /// The range `requestTimeoutMs` may take.
    public static let requestTimeoutRange = 100...600_000

    public init(socketPath: String? = nil, listen: HostPort? = nil) {
        self.socketPath = socketPath
        self.listen = listen
    }

    /// Whether the endpoint is served at all.
    public var isEnabled: Bool { self.socketPath != nil || self.listen != nil }
}

/// A TCP listening address: `HOST:PORT`, with an IPv6 host in brackets (`[::1]:9187`).
public struct HostPort: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    /// Reads `HOST:PORT`; nil when either part is missing or the port is not in 0...65535.
    public init?(parsing text: String) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (0...65_535).contains(port)
        else { return nil }
        var host = Substring(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") && host.count > 2 {
            host = host.dropFirst().dropLast()
        } else if host.contains(":") || host.contains("[") || host.contains("]") {
            return nil  // an IPv6 address needs its brackets
        }
        guard !host.isEmpty, !host.contains(where: { $0 == " " || $0 == "/" }) else { return nil }
        self.host = String(host)
        self.port = port
    }

    public var description: String { self.host.contains(":") ? "[\(self.host)]:\(self.port)" : "\(self.host):\(self.port)" }
}
