import ArgumentParser
import EvdCLI
import EvdClient
import Foundation
import Logging
import NATSClient
import ServiceLifecycle
import UnixSignals

/// evforward: forward evd's journaled events into a NATS JetStream stream, effectively once.
@main
struct Evforward: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evforward",
        abstract: "Forward evd's journaled events into a NATS JetStream stream, effectively once.",
        discussion: """
            EVENT may be a name (insert-rows) or a glob (*); default * (a cursor receives journaled events only).

            Examples:
              evforward --nats nats://127.0.0.1:4222 --stream EVD_MAIN
              evforward --nats nats://a,nats://b --stream S --replicas 3 'insert-*'

            Each event becomes one message on PREFIX.<database>.<event>[.<table>], with Nats-Msg-Id <epoch>:<seq> \
            and CloudEvents headers (docs/forwarding.md). evforward resumes after the stream's last message, and \
            acknowledges evd's durable cursor as JetStream acknowledges the messages.

            Exit status 3: another forwarder holds the cursor or published to the stream (fenced off); restarting \
            will not help. 64: a bad option. 1: evd refused the token or the subscription.
            """
    )

    @Argument(help: "Events to forward: names or globs (* and ?).")
    var events: [String] = []

    @Option(help: ArgumentHelp("NATS server URLs, comma-separated (nats://host:port).", valueName: "urls"))
    var nats: String

    @Option(help: "The JetStream stream (created if missing).")
    var stream: String

    @Option(help: "The first subject token(s).")
    var subjectPrefix: String = "evd"

    @Option(help: "The evd durable cursor's name (default: evforward.STREAM).")
    var cursor: String?

    @Option(
        help: "The daemon's socket (default: $EVD_SOCKET, $RUNTIME_DIRECTORY/evd.sock, $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock)."
    )
    var socket: String?

    @Option(help: ArgumentHelp("Log in with this token first (default: $EVD_TOKEN).", valueName: "token"))
    var token: String?

    @Option(help: "The most messages published and not yet acknowledged by JetStream.")
    var maxInFlight: Int = 4096

    @Option(help: "The stream's duplicate window in seconds, when evforward creates it (at least 600).")
    var duplicateWindow: Int = 600

    @Option(help: "The stream's replicas, when evforward creates it (1-5).")
    var replicas: Int = 1

    @Option(help: ArgumentHelp("Serve Prometheus metrics at http://HOST:PORT/metrics.", valueName: "host:port"))
    var metricsListen: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    /// Checks every option before anything starts: a mistake is a usage error (exit 64) naming it.
    func validate() throws {
        do {
            _ = try self.servers()
        } catch {
            throw ValidationError(error.description)
        }
        guard Self.isStreamName(self.stream) else {
            throw ValidationError("--stream must be 1-255 characters without spaces, '.', '*', '>', '/' or '\\'")
        }
        guard Self.isSubjectPrefix(self.subjectPrefix) else {
            throw ValidationError("--subject-prefix must be one or more subject tokens (no spaces, '*' or '>', no empty token)")
        }
        let cursor = self.cursorName
        guard (1...128).contains(cursor.count), cursor.unicodeScalars.allSatisfy({ $0.value > 0x20 && $0.value != 0x7f }) else {
            throw ValidationError("--cursor must be 1-128 printable characters")
        }
        guard (1...1_000_000).contains(self.maxInFlight) else { throw ValidationError("--max-in-flight must be 1-1000000") }
        guard self.duplicateWindow >= 600 else {
            throw ValidationError("--duplicate-window must be at least 600 seconds (a retry after an outage must still be recognised)")
        }
        guard (1...5).contains(self.replicas) else { throw ValidationError("--replicas must be 1-5") }
        if let metricsListen { _ = try Self.hostPort(metricsListen) }
        guard Logger.Level(rawValue: self.logLevel) != nil else {
            throw ValidationError("--log-level must be trace, debug, info, notice, warning, error or critical")
        }
        for event in self.events where event.isEmpty { throw ValidationError("an EVENT cannot be empty") }
    }

    private var cursorName: String { self.cursor ?? "evforward.\(self.stream)" }

    private func servers() throws(ForwarderError) -> [NATSAddress] {
        let parts = self.nats.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        guard !parts.isEmpty else { throw .usage("--nats needs at least one nats://host:port") }
        return try parts.map { (text: String) throws(ForwarderError) in try NATSAddress(parsing: text) }
    }

    /// A JetStream stream name: no whitespace, `.`, `*`, `>`, path separators.
    static func isStreamName(_ name: String) -> Bool {
        (1...255).contains(name.utf8.count)
            && !name.utf8.contains {
                $0 <= 0x20 || $0 == 0x7f || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "*") || $0 == UInt8(ascii: ">")
                    || $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "\\")
            }
    }

    /// Subject tokens joined by `.`: no empty token, no wildcard, no whitespace.
    static func isSubjectPrefix(_ prefix: String) -> Bool {
        let tokens = prefix.split(separator: ".", omittingEmptySubsequences: false)
        return !prefix.isEmpty
            && tokens.allSatisfy { token in
                !token.isEmpty && token != "*" && token != ">" && !token.utf8.contains { $0 <= 0x20 || $0 == 0x7f }
            }
    }

    /// `HOST:PORT` (`[::1]:9465` for IPv6).
    static func hostPort(_ text: String) throws -> (host: String, port: Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port)
        else { throw ValidationError("--metrics-listen takes HOST:PORT, not '\(text)'") }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw ValidationError("--metrics-listen takes HOST:PORT, not '\(text)'") }
        return (host, port)
    }

    /// Bootstraps logging, serves metrics if asked, and runs the forwarder in a service group that
    /// stops it gracefully on SIGTERM and SIGINT; a fenced forwarder exits 3.
    func run() async throws {
        // A write to a connection the peer closed (nats-server stopping, evd restarting) must be an
        // EPIPE error the session handles, not a signal that kills the process.
        signal(SIGPIPE, SIG_IGN)
        let level = Logger.Level(rawValue: self.logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "evforward")
        let environment = SocketPath.processEnvironment
        let configuration = ForwarderConfiguration(
            servers: try self.servers(),
            stream: self.stream,
            subjectPrefix: self.subjectPrefix,
            cursor: self.cursorName,
            socketPath: SocketPath.resolve(explicit: self.socket, environment: environment),
            token: TokenSource.resolve(explicit: self.token, environment: environment),
            maxInFlight: self.maxInFlight,
            duplicateWindow: .seconds(self.duplicateWindow),
            replicas: self.replicas,
            events: self.events.isEmpty ? ["*"] : self.events,
            host: ProcessInfo.processInfo.hostName
        )
        let metrics = ForwarderMetrics()
        var metricsServer: MetricsServer?
        if let metricsListen {
            let (host, port) = try Self.hostPort(metricsListen)
            do {
                metricsServer = try await MetricsServer.bind(host: host, port: port, metrics: metrics)
                logger.info(
                    "metrics endpoint is listening",
                    metadata: ["metrics.address": "\(metricsServer?.localAddress.map { "\($0)" } ?? metricsListen)"]
                )
            } catch {
                logger.critical("cannot serve metrics", metadata: ["metrics.address": "\(metricsListen)", "error": "\(error)"])
                throw ExitCode.failure
            }
        }
        let forwarder = Forwarder(configuration: configuration, metrics: metrics, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: forwarder)],
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
        )
        do {
            try await group.run()
            await metricsServer?.close()
        } catch let error as ForwarderError {
            await metricsServer?.close()
            switch error {
            case .fenced(let text):
                logger.critical("fenced off", metadata: ["reason": "\(text)"])
                FileHandle.standardError.write(Data("evforward: \(text)\n".utf8))
                throw ExitCode(3)
            case .fatal(let text), .usage(let text):
                logger.critical("cannot forward", metadata: ["reason": "\(text)"])
                FileHandle.standardError.write(Data("evforward: \(text)\n".utf8))
                throw ExitCode.failure
            }
        }
    }
}
