import ArgumentParser
import EvdClient
import EvdDaemon
import Logging
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

    @Option(help: "The configuration file (TOML).")
    var config: String?

    @Option(help: "SQLite connections per database.")
    var poolSize: Int = 4

    @Option(help: "The socket file's mode, in octal.")
    var socketMode: String = "0600"

    @Option(help: "The longest request line accepted, in bytes.")
    var maxLineBytes: Int = 1 << 20

    @Option(help: "The most time one operation's vetoes may take in all, in milliseconds.")
    var vetoBudgetMs: Int = 5000

    @Option(help: "The most client connections served at once.")
    var maxConnections: Int = 1024

    @Option(help: "The most client connections served at once for one peer uid (root and evd's own uid included).")
    var maxConnectionsPerUid: Int = 256

    @Option(help: "The most subscriptions one connection may hold.")
    var maxSubscriptions: Int = 256

    @Option(help: "The most requests one connection may have queued; evd stops reading from it until one finishes.")
    var maxPendingRequests: Int = 256

    @Option(help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"

    @Flag(help: "Do not journal committed events (subscribe with since can then replay nothing).")
    var noJournal = false

    @Flag(help: "Journal row images only while a rows: true subscription exists (cheaper writes; replays may lack rows).")
    var noJournalRows = false

    @Option(help: "Keep at least the newest N journaled events (0: no limit by count).")
    var journalKeepEvents: Int = 1_000_000

    @Option(help: "Drop journaled events older than this many seconds (0: no limit by age).")
    var journalKeepSeconds: Int = 7 * 86_400

    func validate() throws {
        guard (1...256).contains(self.poolSize) else { throw ValidationError("--pool-size must be between 1 and 256") }
        guard UInt32(self.socketMode, radix: 8).map({ $0 <= 0o777 }) == true else {
            throw ValidationError("--socket-mode must be an octal mode such as 0600, not '\(self.socketMode)'")
        }
        guard self.maxLineBytes >= 1024 else { throw ValidationError("--max-line-bytes must be at least 1024") }
        guard (1...600_000).contains(self.vetoBudgetMs) else { throw ValidationError("--veto-budget-ms must be between 1 and 600000") }
        guard self.maxConnections >= 1 else { throw ValidationError("--max-connections must be at least 1") }
        guard self.journalKeepEvents >= 0 else { throw ValidationError("--journal-keep-events must be 0 or more") }
        guard self.journalKeepSeconds >= 0 else { throw ValidationError("--journal-keep-seconds must be 0 or more") }
        guard self.maxConnectionsPerUid >= 1 else { throw ValidationError("--max-connections-per-uid must be at least 1") }
        guard self.maxSubscriptions >= 1 else { throw ValidationError("--max-subscriptions must be at least 1") }
        guard (1...65_536).contains(self.maxPendingRequests) else {
            throw ValidationError("--max-pending-requests must be between 1 and 65536")
        }
        guard Logger.Level(rawValue: self.logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
        for spec in self.databases {
            guard let eq = spec.firstIndex(of: "="), eq != spec.startIndex, spec.index(after: eq) != spec.endIndex else {
                throw ValidationError("--db takes NAME=PATH, not '\(spec)'")
            }
        }
    }

    func run() async throws {
        let environment = SocketPath.processEnvironment
        let level = Logger.Level(rawValue: self.logLevel)!
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "evd")

        let stateDirectory = self.stateDir ?? EvdConfiguration.defaultStateDirectory(environment: environment)
        var databases: [DatabaseConfig] = []
        for spec in self.databases {
            let eq = spec.firstIndex(of: "=")!
            let name = String(spec[..<eq])
            guard !databases.contains(where: { $0.name == name }) else {
                throw ValidationError("--db: database '\(name)' is given twice")
            }
            databases.append(DatabaseConfig(name: name, path: String(spec[spec.index(after: eq)...])))
        }
        if databases.isEmpty { databases = [DatabaseConfig(name: "main", path: stateDirectory + "/main.db")] }

        var configuration = EvdConfiguration(
            socketPath: SocketPath.resolve(explicit: self.socket, environment: environment),
            databases: databases, stateDirectory: stateDirectory)
        configuration.listenFD = Systemd.listenFD(environment: environment)
        configuration.poolSize = self.poolSize
        configuration.socketMode = mode_t(UInt32(self.socketMode, radix: 8)!)
        configuration.maxLineBytes = self.maxLineBytes
        configuration.vetoBudgetMs = self.vetoBudgetMs
        configuration.maxSessions = self.maxConnections
        configuration.journal.enabled = !self.noJournal
        configuration.journal.rowImages = !self.noJournalRows
        configuration.journal.keepEvents = self.journalKeepEvents
        configuration.journal.keepSeconds = self.journalKeepSeconds
        configuration.maxSessionsPerUID = self.maxConnectionsPerUid
        configuration.maxSubscriptions = self.maxSubscriptions
        configuration.maxPipelinedRequests = self.maxPendingRequests
        if let path = self.config {
            do {
                configuration.grants = try ConfigFile.load(path).grants
            } catch {
                // A policy read wrongly would let someone in: not valid means not starting.
                throw ValidationError("--config: \(error)")
            }
        }

        signal(SIGPIPE, SIG_IGN)
        let daemon = Daemon(configuration: configuration, logger: logger, environment: environment)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: daemon)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        do {
            try await group.run()
        } catch let error as Daemon.StartupError {
            FileHandleStderr.write("evd: \(error.description)\n")
            throw ExitCode(1)
        } catch {
            FileHandleStderr.write("evd: \(error)\n")
            throw ExitCode(1)
        }
    }
}

/// Writes to standard error without Foundation.
enum FileHandleStderr {
    static func write(_ text: String) {
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress, $0.count) }
    }
}
