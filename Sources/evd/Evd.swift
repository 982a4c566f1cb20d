import ArgumentParser
import EvdClient
import EvdDaemon
import Logging
import Metrics
import Prometheus
import ServiceLifecycle
import UnixSignals

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The evd daemon: parses flags, builds the configuration, runs the service until SIGTERM/SIGINT.
@main
struct Evd: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evd",
        abstract: "Serve SQLite databases and their events over a Unix socket (newline-delimited JSON).",
        version: evdVersion
    )

    @Option(help: "The socket path (default: $EVD_SOCKET, $RUNTIME_DIRECTORY/evd.sock, $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock).")
    var socket: String?

    @Option(name: .customLong("db"), help: "A database as NAME=PATH (repeatable; the first is the default).")
    var databases: [String] = []

    @Option(help: "The state directory (default: $STATE_DIRECTORY, $XDG_STATE_HOME/evd, ~/.local/state/evd).")
    var stateDir: String?

    @Option(help: "The configuration file (TOML; default under systemd: /etc/evd/evd.toml if it exists). Flags win over it.")
    var config: String?

    @Flag(help: "Check the configuration (file and flags), print the effective settings as JSON, and exit.")
    var checkConfig = false

    @Option(help: "SQLite connections per database (default 4).")
    var poolSize: Int?

    @Option(help: "The socket file's mode, in octal (default 0600).")
    var socketMode: String?

    @Option(help: "The longest request line accepted, in bytes (default 1048576).")
    var maxLineBytes: Int?

    @Option(help: "The most time one operation's vetoes may take in all, in milliseconds (default 5000).")
    var vetoBudgetMs: Int?

    @Option(help: "The most client connections served at once (default 1024).")
    var maxConnections: Int?

    @Option(help: "The most client connections served at once for one peer uid, root and evd's own included (default 256).")
    var maxConnectionsPerUid: Int?

    @Option(help: "The most subscriptions one connection may hold (default 256).")
    var maxSubscriptions: Int?

    @Option(help: "The most durable cursors evd keeps (0-1000000; default 1024).")
    var maxCursors: Int?

    @Option(help: "The most durable cursors one actor may make (0-1000000; default 32).")
    var maxCursorsPerActor: Int?

    @Option(
        help:
            "Keep at most this many events of a retention window beyond retention for durable cursors that have not acknowledged them; past it a cursor's replay gets notice gap (0: cursors keep nothing; default 10000000)."
    )
    var cursorMaxRetainedEvents: Int?

    @Option(help: "The most requests one connection may have queued; evd stops reading from it until one finishes (default 256).")
    var maxPendingRequests: Int?

    @Option(help: "The most events queued for one subscription before its overflow policy applies (default 10000).")
    var maxQueuedEvents: Int?

    @Option(
        help:
            "One connection's output bound: the most bytes of events queued before the overflow policy applies, and of unwritten output (responses included) before evd stops reading the connection (at least 65536; default 16777216)."
    )
    var maxQueuedBytes: Int?

    @Option(
        help: "The largest response sent, in bytes; a larger one is refused with response_too_large (at least 65536; default 67108864)."
    )
    var maxResponseBytes: Int?

    @Option(help: "The most values one subscription's where filter may list in all (1...1000000; default 1024).")
    var maxFilterValues: Int?

    @Option(
        help:
            "The longest one client statement may run before it is interrupted with timeout, in milliseconds (0: no limit; default 30000)."
    )
    var maxStatementMs: Int?

    @Option(
        help:
            "The longest a transaction (begin) may wait for its next request before it is rolled back and its connection closed, in milliseconds (0: no limit; default 60000)."
    )
    var idleTransactionMs: Int?

    @Option(
        help:
            "The most connections of a database's pool one uid may hold at once; root and evd's own uid are not limited (default: the pool size minus one, at least 1)."
    )
    var maxPoolShare: Int?

    @Option(help: "trace, debug, info, notice, warning, error or critical (default info).")
    var logLevel: String?

    @Flag(help: "Do not journal committed events (subscribe with since can then replay nothing).")
    var noJournal = false

    @Flag(help: "Journal row images only while a rows: true subscription exists (cheaper writes; replays may lack rows).")
    var noJournalRows = false

    @Flag(
        help:
            "Write every line from the connection's event loop, never from the thread that made it (a diagnostic: scripts/bench measures what writing through saves)."
    )
    var noWriteThrough = false

    @Option(
        help:
            "Keep at least the newest N journaled events of each retention window: each database's, logins and logouts, other events of evd's own (0: no limit by count; default 1000000)."
    )
    var journalKeepEvents: Int?

    @Option(help: "Drop journaled events older than this many seconds (0: no limit by age; default 604800).")
    var journalKeepSeconds: Int?

    @Option(help: ArgumentHelp("Serve Prometheus metrics (GET /metrics) over HTTP on this Unix socket.", valueName: "path"))
    var metricsSocket: String?

    @Option(
        help: ArgumentHelp(
            "Serve Prometheus metrics (GET /metrics) over HTTP on this TCP address, e.g. 127.0.0.1:9187.",
            valueName: "host:port"
        )
    )
    var metricsListen: String?

    @Option(help: "How long a metrics connection may take to send a whole request before it is closed, in milliseconds (default 5000).")
    var metricsRequestTimeoutMs: Int?

    func validate() throws {
        if let poolSize, !(1...256).contains(poolSize) { throw ValidationError("--pool-size must be between 1 and 256") }
        if let socketMode, UInt32(socketMode, radix: 8).map({ $0 <= 0o777 }) != true {
            throw ValidationError("--socket-mode must be an octal mode such as 0600, not '\(socketMode)'")
        }
        if let maxLineBytes, maxLineBytes < 1024 { throw ValidationError("--max-line-bytes must be at least 1024") }
        if let vetoBudgetMs, !(1...600_000).contains(vetoBudgetMs) {
            throw ValidationError("--veto-budget-ms must be between 1 and 600000")
        }
        if let maxConnections, maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
        if let journalKeepEvents, journalKeepEvents < 0 { throw ValidationError("--journal-keep-events must be 0 or more") }
        if let journalKeepSeconds, journalKeepSeconds < 0 { throw ValidationError("--journal-keep-seconds must be 0 or more") }
        if let maxConnectionsPerUid, maxConnectionsPerUid < 1 { throw ValidationError("--max-connections-per-uid must be at least 1") }
        if let maxSubscriptions, maxSubscriptions < 1 { throw ValidationError("--max-subscriptions must be at least 1") }
        for (flag, value) in [("--max-cursors", self.maxCursors), ("--max-cursors-per-actor", self.maxCursorsPerActor)] {
            if let value, !(0...1_000_000).contains(value) { throw ValidationError("\(flag) must be 0 to 1000000") }
        }
        if let cursorMaxRetainedEvents, cursorMaxRetainedEvents < 0 {
            throw ValidationError("--cursor-max-retained-events must be 0 or more")
        }
        if let maxPendingRequests, !(1...65_536).contains(maxPendingRequests) {
            throw ValidationError("--max-pending-requests must be between 1 and 65536")
        }
        if let maxQueuedEvents, !OutboxLimits.eventsRange.contains(maxQueuedEvents) {
            throw ValidationError("--max-queued-events must be at least 1")
        }
        if let maxQueuedBytes, !OutboxLimits.bytesRange.contains(maxQueuedBytes) {
            throw ValidationError("--max-queued-bytes must be at least 65536")
        }
        if let maxResponseBytes, !EvdConfiguration.responseBytesRange.contains(maxResponseBytes) {
            throw ValidationError("--max-response-bytes must be at least 65536")
        }
        if let maxStatementMs, !(0...86_400_000).contains(maxStatementMs) {
            throw ValidationError("--max-statement-ms must be between 0 (no limit) and 86400000")
        }
        if let idleTransactionMs, !(0...86_400_000).contains(idleTransactionMs) {
            throw ValidationError("--idle-transaction-ms must be between 0 (no limit) and 86400000")
        }
        if let maxPoolShare, !(1...256).contains(maxPoolShare) { throw ValidationError("--max-pool-share must be between 1 and 256") }
        if let maxFilterValues, !EvdConfiguration.filterValuesRange.contains(maxFilterValues) {
            throw ValidationError("--max-filter-values must be between 1 and 1000000")
        }
        if let logLevel, Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
        if let metricsRequestTimeoutMs, !MetricsSettings.requestTimeoutRange.contains(metricsRequestTimeoutMs) {
            let range = MetricsSettings.requestTimeoutRange
            throw ValidationError("--metrics-request-timeout-ms must be between \(range.lowerBound) and \(range.upperBound)")
        }
        if let metricsSocket, metricsSocket.isEmpty { throw ValidationError("--metrics-socket needs a path") }
        if let metricsListen, HostPort(parsing: metricsListen) == nil {
            throw ValidationError(
                "--metrics-listen takes HOST:PORT such as 127.0.0.1:9187 (an IPv6 host in brackets), not '\(metricsListen)'"
            )
        }
        for spec in self.databases {
            guard let eq = spec.firstIndex(of: "="), eq != spec.startIndex, spec.index(after: eq) != spec.endIndex else {
                throw ValidationError("--db takes NAME=PATH, not '\(spec)'")
            }
        }
    }

    func run() async throws {
        let environment = SocketPath.processEnvironment
        let file = try self.loadConfigFile(environment: environment)
        let configuration = try self.configuration(file: file, environment: environment)
        if self.checkConfig {
            print(String(decoding: Self.describe(configuration, file: self.configPath(environment: environment)).jsonBytes, as: UTF8.self))
            return
        }
        let level = Logger.Level(rawValue: self.logLevel ?? file.logLevel ?? "info")!
        // Under systemd the journal stamps each line itself: no timestamps, a priority prefix instead.
        let journal = Systemd.stderrIsJournal(environment: environment)
        LoggingSystem.bootstrap { label in
            var handler: any LogHandler =
                journal ? JournalLogHandler(label: label) : StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "evd")

        signal(SIGPIPE, SIG_IGN)
        // The daemon reports into a registry of its own (tests run many daemons in one process, and
        // swift-metrics' global system can be bootstrapped only once). Here, in the one process
        // the real daemon has, swift-metrics is pointed at the same registry, so that whatever
        // reports through swift-metrics shows on the same /metrics.
        let registry = PrometheusCollectorRegistry()
        if configuration.metrics.isEnabled { MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry)) }
        let daemon = Daemon(
            configuration: configuration,
            logger: logger,
            supervisor: .systemd(environment: environment),
            metrics: registry
        )
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: daemon)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
        )
        do {
            try await group.run()
        } catch let error as Daemon.StartupError {
            FileHandleStderr.write("\(journal ? "<3>" : "")evd: \(error.description)\n")
            throw ExitCode(1)
        } catch {
            FileHandleStderr.write("\(journal ? "<3>" : "")evd: \(error)\n")
            throw ExitCode(1)
        }
    }
}

extension Evd {
    /// The config file to read: `--config`, else /etc/evd/evd.toml when systemd started evd and it exists.
    func configPath(environment: [String: String]) -> String? {
        if let config = self.config { return config }
        let systemdDefault = "/etc/evd/evd.toml"
        if environment["INVOCATION_ID"] != nil, access(systemdDefault, F_OK) == 0 { return systemdDefault }
        return nil
    }

    func loadConfigFile(environment: [String: String]) throws -> ConfigFile {
        guard let path = self.configPath(environment: environment) else { return ConfigFile() }
        do {
            return try ConfigFile.load(path)
        } catch {
            // A policy or a path read wrongly would do harm: not valid means not starting.
            throw ValidationError("--config: \(error)")
        }
    }

    /// The effective configuration: flags win over the environment (socket, state directory),
    /// which wins over the file, which wins over the defaults.
    func configuration(file: ConfigFile, environment: [String: String]) throws -> EvdConfiguration {
        let stateDirectory =
            self.stateDir ?? EvdConfiguration.stateDirectory(fromEnvironment: environment) ?? file.stateDirectory
            ?? EvdConfiguration.defaultStateDirectory(environment: environment)
        var databases: [DatabaseConfig] = []
        for spec in self.databases {
            let eq = spec.firstIndex(of: "=")!
            let name = String(spec[..<eq])
            guard !databases.contains(where: { $0.name == name }) else {
                throw ValidationError("--db: database '\(name)' is given twice")
            }
            databases.append(DatabaseConfig(name: name, path: String(spec[spec.index(after: eq)...])))
        }
        if databases.isEmpty { databases = file.databases ?? [DatabaseConfig(name: "main", path: stateDirectory + "/main.db")] }
        let socket = self.socket ?? SocketPath.fromEnvironment(environment) ?? file.socket

        var configuration = EvdConfiguration(
            socketPath: SocketPath.resolve(explicit: socket, environment: environment),
            databases: databases,
            stateDirectory: stateDirectory
        )
        configuration.listenFD = Systemd.listenFD(environment: environment)
        configuration.grants = file.grants
        if let value = self.poolSize ?? file.poolSize { configuration.poolSize = value }
        if let value = self.socketMode.flatMap({ UInt32($0, radix: 8) }).map({ mode_t($0) }) ?? file.socketMode {
            configuration.socketMode = value
        }
        if let value = self.maxLineBytes ?? file.maxLineBytes { configuration.maxLineBytes = value }
        if let value = self.vetoBudgetMs ?? file.vetoBudgetMs { configuration.vetoBudgetMs = value }
        if let value = self.maxConnections ?? file.maxConnections { configuration.maxSessions = value }
        if let value = self.maxConnectionsPerUid ?? file.maxConnectionsPerUID { configuration.maxSessionsPerUID = value }
        if let value = self.maxSubscriptions ?? file.maxSubscriptions { configuration.maxSubscriptions = value }
        if let value = self.maxCursors ?? file.maxCursors { configuration.maxCursors = value }
        if let value = self.maxCursorsPerActor ?? file.maxCursorsPerActor { configuration.maxCursorsPerActor = value }
        if let value = self.cursorMaxRetainedEvents ?? file.cursorMaxRetainedEvents {
            configuration.journal.cursorMaxRetainedEvents = value
        }
        if let value = self.maxPendingRequests ?? file.maxPendingRequests { configuration.maxPipelinedRequests = value }
        if let value = self.maxQueuedEvents ?? file.maxQueuedEvents {
            configuration.outboxLimits.maxEventsPerSubscription = value
        }
        if let value = self.maxQueuedBytes ?? file.maxQueuedBytes { configuration.outboxLimits.maxBytes = value }
        if let value = self.maxResponseBytes ?? file.maxResponseBytes { configuration.maxResponseBytes = value }
        if let value = self.maxFilterValues ?? file.maxFilterValues { configuration.maxFilterValues = value }
        if let value = self.maxStatementMs ?? file.maxStatementMs { configuration.maxStatementMs = value }
        if let value = self.idleTransactionMs ?? file.idleTransactionMs { configuration.idleTransactionMs = value }
        if let value = self.maxPoolShare ?? file.maxPoolShare { configuration.maxPoolShare = value }
        configuration.journal.enabled = !self.noJournal && (file.journalEnabled ?? true)
        configuration.journal.rowImages = !self.noJournalRows && (file.journalRows ?? true)
        configuration.writeThrough = !self.noWriteThrough
        if let value = self.journalKeepEvents ?? file.journalKeepEvents { configuration.journal.keepEvents = value }
        if let value = self.journalKeepSeconds ?? file.journalKeepSeconds { configuration.journal.keepSeconds = value }
        configuration.metrics.socketPath = self.metricsSocket ?? file.metricsSocket
        configuration.metrics.listen = self.metricsListen.flatMap(HostPort.init(parsing:)) ?? file.metricsListen
        if let value = self.metricsRequestTimeoutMs ?? file.metricsRequestTimeoutMs {
            configuration.metrics.requestTimeoutMs = value
        }
        return configuration
    }

    /// The effective configuration as `--check-config` prints it.
    static func describe(_ configuration: EvdConfiguration, file: String?) -> JSONValue {
        let grants: [JSONValue] = configuration.grants.map { grant in
            var object: JSONObject = [:]
            switch grant.who {
            case .uid(let uid): object["uid"] = .integer(uid)
            case .user(let user): object["user"] = .string(user)
            case .group(let name, let gid):
                object["group"] = .string(name)
                object["gid"] = .integer(gid)
            }
            object["actions"] = .array(grant.actions.map(\.rawValue).sorted().map(JSONValue.string))
            if let database = grant.database { object["database"] = .string(database) }
            if let table = grant.table { object["table"] = .string(table) }
            return .object(object)
        }
        return [
            "config_file": file.map(JSONValue.string) ?? .null,
            "socket": configuration.listenFD.map { .string("fd \($0)") } ?? .string(configuration.socketPath),
            "socket_mode": .string("0" + String(configuration.socketMode, radix: 8)),
            "state_dir": .string(configuration.stateDirectory),
            "database": .array(configuration.databases.map { ["name": .string($0.name), "path": .string($0.path)] }),
            "pool_size": .integer(configuration.poolSize),
            "max_line_bytes": .integer(configuration.maxLineBytes),
            "veto_budget_ms": .integer(configuration.vetoBudgetMs),
            "limits": [
                "max_connections": .integer(configuration.maxSessions),
                "max_connections_per_uid": .integer(configuration.maxSessionsPerUID),
                "max_subscriptions": .integer(configuration.maxSubscriptions),
                "max_cursors": .integer(configuration.maxCursors),
                "max_cursors_per_actor": .integer(configuration.maxCursorsPerActor),
                "max_pending_requests": .integer(configuration.maxPipelinedRequests),
                "max_queued_events": .integer(configuration.outboxLimits.maxEventsPerSubscription),
                "max_queued_bytes": .integer(configuration.outboxLimits.maxBytes),
                "max_response_bytes": .integer(configuration.maxResponseBytes),
                "max_filter_values": .integer(configuration.maxFilterValues),
                "max_statement_ms": .integer(configuration.maxStatementMs),
                "idle_transaction_ms": .integer(configuration.idleTransactionMs),
                "max_pool_share": .integer(configuration.poolShare),
            ],
            "journal": [
                "enabled": .bool(configuration.journal.enabled), "rows": .bool(configuration.journal.rowImages),
                "keep_events": .integer(configuration.journal.keepEvents),
                "keep_seconds": .integer(configuration.journal.keepSeconds),
                "cursor_max_retained_events": .integer(configuration.journal.cursorMaxRetainedEvents),
            ],
            "metrics": [
                "socket": configuration.metrics.socketPath.map(JSONValue.string) ?? .null,
                "listen": configuration.metrics.listen.map { .string($0.description) } ?? .null,
                "request_timeout_ms": .integer(configuration.metrics.requestTimeoutMs),
            ],
            "grant": .array(grants),
        ]
    }
}

/// Writes to standard error without Foundation.
enum FileHandleStderr {
    static func write(_ text: String) {
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress, $0.count) }
    }
}
