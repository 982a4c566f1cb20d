import ArgumentParser
import EvdCLI
import EvdClient
import Foundation
import OrderedCollections
import Synchronization

/// evtail: watch evd's events, like `journalctl -f`.
@main
struct Evtail: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evtail",
        abstract: "Print evd's events as they happen: NDJSON into a pipe, one readable line each on a terminal.",
        discussion: """
            EVENT may be a name (insert-rows), a glob (before_*) or a custom name (myapp.deployed); default *.
            Examples:
              evtail 'before_*' checkout
              evtail insert-rows --where table=dogs --count 1
              evtail --json '*' | jq .event
              evtail --name audit --resume insert-rows >> audit.ndjson

            With --cursor NAME, evd keeps the position (a durable cursor): evtail acknowledges what it
            printed (every 200 ms and at exit), and the next run with the same --cursor starts after
            it, with nothing journaled missed; only journaled (committed) events are shown.
              evtail --cursor audit insert-rows >> audit.ndjson

            With --resume, evtail keeps the seq of the last event it printed in a file
            ($XDG_STATE_HOME/evtail/NAME.seq, or --position-file) and starts after it next time:
            a pipeline that restarts misses nothing journaled (it may see the last event twice).

            As a policy listener, --veto EVENT (repeatable) with --exec CMD or --deny REASON:
              evtail --veto before_drop --deny 'no drops on Fridays'
              evtail --veto before_cursor_execute --exec ./policy.sh
            CMD runs with /bin/sh -c, the veto's JSON on its stdin: exit 0 allows, non-zero denies
            with its stdout as the reason, a JSON object with "set" on stdout modifies.

            From the JetStream stream evforward fills, on any host (the same lines as a local evtail):
              evtail --nats nats://nats1:4222,nats://nats2:4222 --stream EVD_MAIN --since 1200 insert-rows
            --since is an evd seq; without it, events stored from now on. Only --since, --count and
            --json go with --nats.
            """
    )

    @Argument(help: "Events to watch: names or globs (* and ?).")
    var events: [String] = []

    @Option(
        help: "The daemon's socket (default: $EVD_SOCKET, $RUNTIME_DIRECTORY/evd.sock, $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock)."
    )
    var socket: String?

    @Option(help: ArgumentHelp("Log in with this token first (default: $EVD_TOKEN).", valueName: "token"))
    var token: String?

    @Option(name: .customLong("where"), help: "Only events whose property K equals V (repeatable; V is JSON or a string).")
    var filters: [String] = []

    @Option(help: "Replay journaled events after this seq first.")
    var since: Int64?

    @Option(help: "Exit after this many events.")
    var count: Int?

    @Option(help: "A name for this subscription.")
    var name: String?

    @Flag(help: "Start after the last event a previous run printed, and keep the position (needs --name or --position-file).")
    var resume = false

    @Option(help: "Follow evd's durable cursor NAME: start after what it acknowledged, acknowledge what is printed.")
    var cursor: String?

    @Option(help: "Where --resume keeps its position (default: $XDG_STATE_HOME/evtail/NAME.seq).")
    var positionFile: String?

    @Flag(help: "Print raw NDJSON even on a terminal.")
    var json = false

    @Option(name: .customLong("veto"), help: "Decide this vetoable event (repeatable; names or globs).")
    var vetoEvents: [String] = []

    @Option(name: .customLong("exec"), help: "Decide each veto by running this command (/bin/sh -c).")
    var command: String?

    @Option(name: .customLong("deny"), help: "Deny every veto with this reason.")
    var denyReason: String?

    @Option(help: "How long the daemon waits for each decision, in milliseconds (1-60000).")
    var timeoutMs: Int?

    @Option(help: "What the daemon does without a decision in time: allow or deny.")
    var onTimeout: String?

    @Option(help: "Listeners with a higher priority are asked first.")
    var priority: Int?

    @Flag(help: "Record decisions without enforcing them.")
    var dryRun = false

    @Option(help: "Read the events from this NATS server's JetStream stream instead (nats://host:port, comma-separated for several).")
    var nats: String?

    @Option(help: "The JetStream stream evforward writes (with --nats).")
    var stream: String?

    func validate() throws {
        if let count, count < 1 { throw ValidationError("--count must be at least 1") }
        if let nats {
            guard let stream, !stream.isEmpty else { throw ValidationError("--nats needs --stream NAME") }
            guard !stream.contains(where: { $0 == "." || $0 == "*" || $0 == ">" || $0 == " " }) else {
                throw ValidationError("--stream takes a stream name: no '.', '*', '>' or spaces")
            }
            if self.socket != nil || self.token != nil || !self.filters.isEmpty || self.name != nil || self.resume
                || !self.vetoEvents.isEmpty || self.cursor != nil
            {
                throw ValidationError("--nats goes only with --stream, --since, --count and --json (and event names)")
            }
            if let since, since < 0 { throw ValidationError("--since must be 0 or more") }
            do { _ = try NATSTail.servers(nats) } catch { throw ValidationError("--nats: \(error)") }
        } else if self.stream != nil {
            throw ValidationError("--stream needs --nats URL")
        }
        for filter in self.filters where !filter.contains("=") {
            throw ValidationError("--where takes K=V, not '\(filter)'")
        }
        if self.vetoEvents.isEmpty {
            if self.command != nil || self.denyReason != nil || self.timeoutMs != nil || self.onTimeout != nil
                || self.priority != nil || self.dryRun
            {
                throw ValidationError("--exec, --deny, --timeout-ms, --on-timeout, --priority and --dry-run need --veto")
            }
        } else if (self.command == nil) == (self.denyReason == nil) {
            throw ValidationError("--veto needs exactly one of --exec CMD and --deny REASON")
        }
        if let onTimeout, onTimeout != "allow" && onTimeout != "deny" {
            throw ValidationError("--on-timeout must be allow or deny")
        }
        if self.resume && self.name == nil && self.positionFile == nil {
            throw ValidationError("--resume needs --name NAME (or --position-file PATH) to know where it left off")
        }
        if self.positionFile != nil && !self.resume { throw ValidationError("--position-file needs --resume") }
        if self.cursor != nil && (self.resume || !self.vetoEvents.isEmpty) {
            throw ValidationError("--cursor keeps the position in evd: not with --resume, nor with --veto")
        }
        if let name, self.resume, name.contains("/") || name.hasPrefix(".") {
            throw ValidationError("--name used with --resume names a file: no '/', not starting with '.'")
        }
    }

    /// Where `--resume` keeps the last printed seq.
    private func positionPath() -> String? {
        guard self.resume else { return nil }
        if let positionFile { return positionFile }
        let environment = ProcessInfo.processInfo.environment
        let base =
            environment["XDG_STATE_HOME"].flatMap { $0.isEmpty ? nil : $0 }
            ?? (environment["HOME"] ?? "/tmp") + "/.local/state"
        return base + "/evtail/" + self.name! + ".seq"
    }

    func run() async throws {
        Terminal.exitQuietlyOnSignals()
        if let nats, let stream {
            let tail = NATSTail(
                servers: try NATSTail.servers(nats),
                stream: stream,
                since: self.since,
                count: self.count,
                readable: !self.json && Terminal.stdoutIsTerminal,
                patterns: self.events
            )
            let status = await tail.run()
            if status != 0 { throw ExitCode(status) }
            return
        }
        let socketPath = SocketPath.resolve(explicit: self.socket, environment: SocketPath.processEnvironment)
        var subscribe = EvdOperation.Subscribe()
        if !self.events.isEmpty || self.vetoEvents.isEmpty {
            subscribe.events = self.events.isEmpty ? ["*"] : self.events
        }
        if !self.vetoEvents.isEmpty {
            subscribe.veto = self.vetoEvents
            subscribe.timeoutMs = self.timeoutMs.map(Int64.init)
            subscribe.onTimeout = self.onTimeout.flatMap(EvdOperation.Subscribe.OnTimeout.init)
            subscribe.priority = self.priority.map(Int64.init)
            if self.dryRun { subscribe.mode = .dryRun }
        }
        var filter = JSONObject()
        for item in self.filters {
            let eq = item.firstIndex(of: "=")!
            let key = String(item[..<eq])
            let value = Terminal.argumentValue(String(item[item.index(after: eq)...]))
            switch filter[key] {
            case nil: filter[key] = value
            case .array(let values)?: filter[key] = .array(values + [value])
            case let existing?: filter[key] = .array([existing, value])
            }
        }
        if !filter.isEmpty { subscribe.where = filter }
        let position = self.positionPath().map(ResumePosition.init)
        subscribe.since = try position?.load() ?? self.since
        subscribe.name = self.name
        subscribe.cursor = self.cursor
        let policy: VetoPolicyRunner? =
            self.vetoEvents.isEmpty ? nil : VetoPolicyRunner(command: self.command, denyReason: self.denyReason)

        let token = TokenSource.resolve(explicit: self.token, environment: SocketPath.processEnvironment)
        let outcome: Int32
        do {
            outcome = try await self.follow(socketPath: socketPath, subscribe: subscribe, token: token, policy: policy, position: position)
        } catch let error as EvdConnection.ConnectionError {
            // No daemon: said as evctl says it (EX_UNAVAILABLE), not as an uncaught error.
            Terminal.writeStderr("evtail: \(error)")
            throw ExitCode(69)
        }
        if outcome != 0 { throw ExitCode(outcome) }
    }

    /// Subscribes on a connection to `socketPath` and prints what arrives until `--count`, a
    /// `shutdown` notice or the connection's end; returns the exit status.
    private func follow(
        socketPath: String,
        subscribe: EvdOperation.Subscribe,
        token: String?,
        policy: VetoPolicyRunner?,
        position: ResumePosition?
    ) async throws -> Int32 {
        let readable = !self.json && Terminal.stdoutIsTerminal
        let limit = self.count
        return try await EvdConnection.withConnection(socketPath: socketPath) { evd in
            let subscription: Int64
            do {
                if let token { try await evd.login(token: token) }
                subscription = try await evd.request(.subscribe(subscribe))["subscription"]?.intValue ?? 0
            } catch let error as EvdError {
                Terminal.writeStderr("evtail: \(error)")
                return 1
            }
            // With --cursor, what was printed is acknowledged now and then, and once more at the end.
            let acker = self.cursor.map { _ in CursorAcker(connection: evd, subscription: subscription) }
            let acking = acker.map { acker in
                Task {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .milliseconds(200))
                        await acker.flush()
                    }
                }
            }
            defer { acking?.cancel() }
            var seen = 0
            let status: Int32 = await withDiscardingTaskGroup { deciders in
                while let message = await evd.nextMessage() {
                    if message["type"] == "veto", let policy {
                        // Each veto is decided in its own task: a slow or hung script delays only its own
                        // answer (and is killed at the veto's deadline), never evtail.
                        let veto = Veto(message: message, connection: evd)
                        deciders.addTask { await policy.decide(veto) }
                    }
                    let type = message["type"]?.stringValue
                    if readable {
                        Terminal.writeStdout(Array((EventFormatter.line(message) + "\n").utf8))
                    } else {
                        Terminal.writeStdout(JSONValue.object(message).jsonBytes + [0x0a])
                    }
                    if type == "notice" && message["code"] == "shutdown" { return 0 }
                    if type == "notice" && message["code"] == "gap" {
                        Terminal.writeStderr(
                            "evtail: events \(message["from"]?.intValue ?? 0)...\(message["to"]?.intValue ?? 0) are no longer journaled"
                        )
                    }
                    if type == "event", let acker, let seq = message["seq"]?.intValue { acker.printed(seq) }
                    if type == "event", let position, let seq = message["seq"]?.intValue {
                        // After the event is written: a crash in between shows it again, never loses it.
                        do { try position.save(seq) } catch {
                            Terminal.writeStderr("evtail: cannot save the position: \(error)")
                            return 1
                        }
                    }
                    if type == "event" || type == "veto" {
                        seen += 1
                        if let limit, seen >= limit { return 0 }
                    }
                }
                Terminal.writeStderr("evtail: evd closed the connection")
                return 1
            }
            acking?.cancel()
            await acker?.flush()
            return status
        }
    }
}

/// Decides vetoes for `evtail --veto`: a fixed denial, or a command's verdict.
struct VetoPolicyRunner: Sendable {
    let command: String?
    let denyReason: String?

    func decide(_ veto: Veto) async {
        do {
            guard let command else {
                try await veto.deny(self.denyReason)
                return
            }
            // Leave a little of the deadline for the reply to travel.
            let budget = Duration.milliseconds(max(1, veto.deadlineMs - max(5, veto.deadlineMs / 20)))
            guard let outcome = await ScriptRun.run(command: command, input: JSONValue.object(veto.message).jsonBytes, timeout: budget)
            else {
                Terminal.writeStderr("evtail: '\(command)' gave no answer for seq \(veto.seq) in time; the daemon's on_timeout decides")
                return
            }
            let text = String(decoding: outcome.stdout, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            if outcome.status == 0 {
                if let object = try? JSONValue(parsing: text).objectValue, let set = object["set"]?.objectValue {
                    try await veto.modify(set)
                } else {
                    try await veto.allow()
                }
            } else {
                try await veto.deny(text.isEmpty ? "'\(command)' exited with status \(outcome.status)" : text)
            }
        } catch {
            Terminal.writeStderr("evtail: could not answer veto \(veto.seq): \(error)")
        }
    }
}

/// Runs a policy script with `/bin/sh -c`, input on stdin, without blocking any cooperative thread:
/// completion arrives through the termination handler, output through a readability handler.
enum ScriptRun {
    struct Outcome: Sendable {
        let status: Int32
        let stdout: [UInt8]
    }

    /// The script's status and output, or `nil` if it ran past `timeout` (it is then killed).
    static func run(command: String, input: [UInt8], timeout: Duration) async -> Outcome? {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        let stdin = Pipe()
        let stdout = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        let collected = CollectedOutput()
        stdout.fileHandleForReading.readabilityHandler = { handle in
            let data = handle.availableData
            collected.append(data)
        }
        return await withCheckedContinuation { (continuation: CheckedContinuation<Outcome?, Never>) in
            let once = ResumeOnce(continuation)
            process.terminationHandler = { process in
                stdout.fileHandleForReading.readabilityHandler = nil
                let rest = stdout.fileHandleForReading.readDataToEndOfFile()
                collected.append(rest)
                once.resume(Outcome(status: process.terminationStatus, stdout: collected.bytes))
            }
            do {
                try process.run()
            } catch {
                once.resume(Outcome(status: 127, stdout: Array("cannot run /bin/sh: \(error)".utf8)))
                return
            }
            // A script that does not read its input must not block us: write on a background queue.
            DispatchQueue.global().async {
                try? stdin.fileHandleForWriting.write(contentsOf: Data(input))
                try? stdin.fileHandleForWriting.close()
            }
            let pid = process.processIdentifier
            let (seconds, attoseconds) = timeout.components
            DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(Int(seconds * 1_000_000_000 + attoseconds / 1_000_000_000))) {
                if once.resume(nil) { kill(pid, SIGKILL) }
            }
        }
    }

    /// Output gathered from a readability handler.
    final class CollectedOutput: @unchecked Sendable {
        // @unchecked Sendable: every access holds `lock`.
        private let lock = NSLock()
        private var data = Data()
        func append(_ more: Data) { self.lock.withLock { self.data.append(more) } }
        var bytes: [UInt8] { self.lock.withLock { Array(self.data) } }
    }

    /// Resumes a continuation once, whoever comes first (the script or its deadline).
    final class ResumeOnce: @unchecked Sendable {
        // @unchecked Sendable: every access holds `lock`.
        private let lock = NSLock()
        private var continuation: CheckedContinuation<Outcome?, Never>?
        init(_ continuation: CheckedContinuation<Outcome?, Never>) { self.continuation = continuation }
        @discardableResult
        func resume(_ value: Outcome?) -> Bool {
            let continuation = self.lock.withLock { () -> CheckedContinuation<Outcome?, Never>? in
                defer { self.continuation = nil }
                return self.continuation
            }
            continuation?.resume(returning: value)
            return continuation != nil
        }
    }
}

/// The seq of the last event `evtail --resume` printed, kept in a file (replaced atomically).
struct ResumePosition: Sendable {
    let path: String

    init(_ path: String) { self.path = path }

    /// The saved seq, or `nil` when there is no file yet (the first run); creates its directory.
    func load() throws -> Int64? {
        let directory = (self.path as NSString).deletingLastPathComponent
        if !directory.isEmpty { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        guard let data = FileManager.default.contents(atPath: self.path) else { return nil }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard let seq = Int64(text), seq >= 0 else {
            throw ValidationError("\(self.path) does not hold a seq ('\(text)'); remove it to start from the live head")
        }
        return seq
    }

    /// Saves `seq`: written to a temporary file, then renamed over the old one.
    func save(_ seq: Int64) throws {
        let temporary = self.path + ".tmp"
        guard FileManager.default.createFile(atPath: temporary, contents: Data("\(seq)\n".utf8)) else {
            throw ValidationError("cannot write \(temporary)")
        }
        guard rename(temporary, self.path) == 0 else { throw ValidationError("cannot replace \(self.path)") }
    }
}

/// Acknowledges what `evtail --cursor` printed: the newest printed seq, when it has moved since the
/// last ack. A failed ack is reported and tried again at the next flush (evd then shows the events
/// after the last acknowledged one again: at-least-once).
final class CursorAcker: Sendable {
    let connection: EvdConnection
    let subscription: Int64
    private let state = Mutex<(printed: Int64, acknowledged: Int64)>((0, 0))

    init(connection: EvdConnection, subscription: Int64) {
        self.connection = connection
        self.subscription = subscription
    }

    func printed(_ seq: Int64) { self.state.withLock { $0.printed = max($0.printed, seq) } }

    func flush() async {
        let (printed, acknowledged) = self.state.withLock { $0 }
        guard printed > acknowledged else { return }
        do {
            try await self.connection.request(.ack(subscription: self.subscription, seq: printed))
            self.state.withLock { $0.acknowledged = max($0.acknowledged, printed) }
        } catch {
            Terminal.writeStderr("evtail: cannot acknowledge seq \(printed): \(error)")
        }
    }
}
