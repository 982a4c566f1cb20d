import EvdClient
import Foundation
import Logging
import Synchronization
import Testing

@testable import EvdDaemon

/// evd as systemd runs it: the built binary, with `NOTIFY_SOCKET` on a datagram socket the test
/// owns, under `systemd-socket-activate`, and with `JOURNAL_STREAM`. Every wait is a generous
/// deadline against a hang, never a measure of speed.
@Suite("evd under systemd: notify, watchdog, socket activation, journal logging")
struct SystemdTests {
    let evd = binaryPath("evd")

    // MARK: The notify protocol

    @Test("NOTIFY_SOCKET (a path): READY=1 once the socket accepts, STATUS= with live counts, STOPPING=1 on SIGTERM, exit 0")
    func notifyPath() async throws {
        try await withTemporaryDirectory { directory in
            let socket = directory + "/evd.sock"
            let listener = try NotifyListener(address: directory + "/notify.sock", probing: socket)
            defer { listener.stop() }
            let daemon = try EvdChild(
                self.evd,
                Self.arguments(directory),
                directory: directory,
                environment: ["NOTIFY_SOCKET": listener.address]
            )
            defer { daemon.kill() }

            #expect(await listener.wait { $0.contains { $0.lines.contains("READY=1") } })
            // The listener tried to connect the moment READY=1 arrived: evd had bound and was listening.
            #expect(listener.readyProbe == 0, "connect right after READY=1 failed: \(String(cString: strerror(listener.readyProbe ?? 0)))")
            #expect(listener.messages.first?.lines.contains("READY=1") == true, "\(listener.messages)")
            let pong = try await EvdConnection.withConnection(socketPath: socket) { try await $0.request("ping") }
            #expect(pong == [:])

            // Live counts: one session holding a subscription and a veto listener, and events.
            let status = try await EvdConnection.withConnection(socketPath: socket) { evd in
                _ = try await evd.request("subscribe", ["events": ["myapp.*"]])
                _ = try await evd.request("subscribe", ["veto": ["before_cursor_execute"], "timeout_ms": 1000])
                var last: Int64 = 0
                for i in 0..<50 {
                    last = try await evd.request("emit", ["event": "myapp.tick", "data": ["i": .integer(i)]])["seq"]?.intValue ?? 0
                }
                let seen = await listener.wait { messages in
                    messages.compactMap(\.status).contains { $0.counts.seq >= last && $0.counts.subscriptions == 2 }
                }
                #expect(seen, "\(listener.messages)")
                return listener.messages.compactMap(\.status).last { $0.counts.seq >= last }
            }
            #expect(status?.counts.sessions == 1)
            #expect(status?.counts.subscriptions == 2)
            #expect(status?.counts.vetoListeners == 1)
            // 50 events in at most two intervals: some line reports them (rounded, so > 0).
            #expect(listener.messages.compactMap(\.status).contains { $0.eventsPerSecond > 0 }, "\(listener.messages)")
            // Every STATUS= after READY is a count line, in the documented form.
            for message in listener.messages.dropFirst() {
                for line in message.lines where line.hasPrefix("STATUS=") && !line.hasPrefix("STATUS=stopping") {
                    #expect(NotifyMessage.parseStatus(line) != nil, "\(line)")
                }
            }

            daemon.signal(SIGTERM)
            #expect(await listener.wait { $0.contains { $0.lines.contains("STOPPING=1") } })
            let result = try await daemon.finish()
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.reason == .exit)
            // No WATCHDOG_USEC, no pings; READY=1 and STOPPING=1 once each.
            let lines = listener.messages.flatMap(\.lines)
            #expect(!lines.contains("WATCHDOG=1"))
            #expect(lines.filter { $0 == "READY=1" }.count == 1)
            #expect(lines.filter { $0 == "STOPPING=1" }.count == 1)
            #expect(!FileManager.default.fileExists(atPath: socket), "evd removes the socket file it made")
        }
    }

    @Test("NOTIFY_SOCKET in the abstract namespace (@name) with WATCHDOG_USEC: READY=1, WATCHDOG=1 pings, STOPPING=1 on SIGINT, exit 0")
    func notifyAbstractWithWatchdog() async throws {
        try await withTemporaryDirectory { directory in
            let socket = directory + "/evd.sock"
            let name = "@evd-test-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            let listener = try NotifyListener(address: name, probing: socket)
            defer { listener.stop() }
            // WATCHDOG_PID unset: the pings are for whoever reads WATCHDOG_USEC (sd_watchdog_enabled(3)).
            let daemon = try EvdChild(
                self.evd,
                Self.arguments(directory),
                directory: directory,
                environment: ["NOTIFY_SOCKET": name, "WATCHDOG_USEC": "400000"]
            )
            defer { daemon.kill() }

            #expect(await listener.wait { $0.contains { $0.lines.contains("READY=1") } })
            #expect(listener.readyProbe == 0)
            let pings = await listener.wait { messages in
                messages.filter { $0.lines.contains("WATCHDOG=1") }.count >= 3
            }
            #expect(pings, "\(listener.messages)")

            daemon.signal(SIGINT)
            #expect(await listener.wait { $0.contains { $0.lines.contains("STOPPING=1") } })
            let result = try await daemon.finish()
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.reason == .exit)
        }
    }

    @Test("WATCHDOG_PID naming another process turns the pings off; WATCHDOG_USEC is halved")
    func watchdogInterval() {
        #expect(Systemd.watchdogInterval(environment: [:]) == nil)
        #expect(Systemd.watchdogInterval(environment: ["WATCHDOG_USEC": "400000"]) == .milliseconds(200))
        #expect(Systemd.watchdogInterval(environment: ["WATCHDOG_USEC": "400000", "WATCHDOG_PID": "\(getpid())"]) == .milliseconds(200))
        #expect(Systemd.watchdogInterval(environment: ["WATCHDOG_USEC": "400000", "WATCHDOG_PID": "\(getpid() + 1)"]) == nil)
        #expect(Systemd.watchdogInterval(environment: ["WATCHDOG_USEC": "0"]) == nil)
    }

    @Test("the STATUS= line: counts, singular for one, events/s rounded from the seqs used")
    func statusLine() {
        let counts = StatusReporter.Counts(sessions: 12, subscriptions: 30, vetoListeners: 2, seq: 48812)
        #expect(
            StatusReporter.line(counts, eventsPerSecond: 1520)
                == "12 sessions, 30 subscriptions, 2 veto listeners, 1520 events/s, seq 48812"
        )
        let one = StatusReporter.Counts(sessions: 1, subscriptions: 1, vetoListeners: 1, seq: 0)
        #expect(StatusReporter.line(one, eventsPerSecond: 0) == "1 session, 1 subscription, 1 veto listener, 0 events/s, seq 0")
        #expect(StatusReporter.rate(from: 100, to: 3140, over: .seconds(2)) == 1520)
        #expect(StatusReporter.rate(from: 100, to: 101, over: .seconds(2)) == 1)  // 0.5 rounds up
        #expect(StatusReporter.rate(from: 100, to: 100, over: .seconds(2)) == 0)
        #expect(StatusReporter.rate(from: 100, to: 200, over: .zero) == 0)
        #expect(NotifyMessage.parseStatus("STATUS=" + StatusReporter.line(counts, eventsPerSecond: 1520))?.counts == counts)
    }

    // MARK: Socket activation

    @Test("under systemd-socket-activate: evd serves the passed fd and leaves its path alone")
    func socketActivation() async throws {
        let activate = try #require(
            ["/usr/bin/systemd-socket-activate", "/lib/systemd/systemd-socket-activate"].first {
                FileManager.default.isExecutableFile(atPath: $0)
            },
            "systemd-socket-activate is not installed"
        )
        try await withTemporaryDirectory { directory in
            let socket = directory + "/activated.sock"
            // --socket names a path evd must not use: the passed fd wins.
            let unused = directory + "/unused.sock"
            let daemon = try EvdChild(
                activate,
                ["-l", socket, self.evd] + Self.arguments(directory, socket: unused),
                directory: directory
            )
            defer { daemon.kill() }
            // systemd-socket-activate binds and listens, then waits for the first connection
            // before it execs evd (same pid) with the socket as fd 3.
            #expect(await eventually { Self.inode(socket) != nil })
            let before = try #require(Self.inode(socket))

            try await EvdConnection.withConnection(socketPath: socket) { writer in
                #expect(try await writer.request("ping") == [:])
                try await EvdConnection.withConnection(socketPath: socket) { subscriber in
                    let subscribed = try await subscriber.request("subscribe", ["events": ["insert-rows"]])
                    #expect(subscribed["subscription"]?.intValue != nil)
                    _ = try await writer.request(
                        "create_table",
                        ["table": "dogs", "columns": [["name": "id", "type": "integer"], ["name": "name"]], "pk": "id"]
                    )
                    let inserted = try await writer.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
                    #expect(inserted["inserted"] == 1)
                    let event = await subscriber.nextMessage(ofType: "event", within: 60)
                    #expect(event?["event"] == "insert-rows")
                    #expect(event?["table"] == "dogs")
                }
                let rows = try await writer.request(.execute(.init(sql: "select name from dogs")))
                #expect(rows["rows"] == [["Rex"]])
            }
            #expect(Self.inode(socket) == before)

            daemon.signal(SIGTERM)
            let result = try await daemon.finish()
            #expect(result.status == 0, "\(result.stderr)")
            #expect(result.stderr.contains("socket=fd 3"), "\(result.stderr)")
            // Neither unlinked nor made anew: the socket unit still owns the same file.
            #expect(Self.inode(socket) == before)
            #expect(!FileManager.default.fileExists(atPath: unused))
        }
    }

    // MARK: Logging

    enum Journal: String, CaseIterable, Sendable {
        /// `JOURNAL_STREAM` names evd's stderr.
        case connected
        /// Not set.
        case unset
        /// Set, but evd's stderr is another file (inherited by a child whose stderr was redirected).
        case elsewhere
    }

    @Test(
        "with JOURNAL_STREAM naming stderr, log lines carry a <N> priority and no timestamp; otherwise a timestamp",
        arguments: Journal.allCases
    )
    func journalLogging(journal: Journal) async throws {
        try await withTemporaryDirectory { directory in
            let socket = directory + "/evd.sock"
            let stderrPath = directory + "/evd.stderr"
            #expect(FileManager.default.createFile(atPath: stderrPath, contents: nil))
            let identity = try #require(Self.inode(stderrPath))
            var environment: [String: String] = [:]
            switch journal {
            case .connected: environment["JOURNAL_STREAM"] = "\(identity.device):\(identity.inode)"
            case .unset: break
            case .elsewhere: environment["JOURNAL_STREAM"] = "\(identity.device):\(identity.inode + 1)"
            }
            let daemon = try EvdChild(
                self.evd,
                Self.arguments(directory),
                directory: directory,
                environment: environment,
                stderr: stderrPath
            )
            defer { daemon.kill() }
            #expect(await Self.serves(socket))
            daemon.signal(SIGTERM)
            let result = try await daemon.finish()
            #expect(result.status == 0, "\(result.stderr)")

            let lines = result.stderr.split(separator: "\n").map(String.init)
            #expect(lines.contains { $0.contains("evd is ready") }, "\(result.stderr)")
            #expect(lines.contains { $0.contains("evd stopped") }, "\(result.stderr)")
            let stamped = lines.filter(Self.startsWithTimestamp)
            switch journal {
            case .connected:
                #expect(stamped.isEmpty, "\(result.stderr)")
                #expect(lines.allSatisfy(Self.startsWithPriority), "\(result.stderr)")
                #expect(lines.contains { $0.hasPrefix("<6>evd is ready") }, "\(result.stderr)")
            case .unset, .elsewhere:
                #expect(stamped.count == lines.count, "\(result.stderr)")
                #expect(!lines.contains(where: Self.startsWithPriority), "\(result.stderr)")
            }
        }
    }

    @Test("the journal format: a priority per line, metadata after the message, sorted")
    func journalFormat() {
        #expect(
            JournalLogHandler.format(level: .info, message: "evd is ready", metadata: ["socket": "fd 3", "databases": "main=/x"])
                == "<6>evd is ready databases=main=/x socket=fd 3\n"
        )
        #expect(JournalLogHandler.format(level: .warning, message: "two\nlines", metadata: [:]) == "<4>two\n<4>lines\n")
        #expect(Logger.Level.allCases.map(JournalLogHandler.priority) == [7, 7, 6, 5, 4, 3, 2])
        #expect(!Systemd.stderrIsJournal(environment: [:]))
        #expect(!Systemd.stderrIsJournal(environment: ["JOURNAL_STREAM": "not:numbers"]))
    }

    // MARK: Signals

    @Test("SIGTERM and SIGINT: a graceful stop with exit status 0", arguments: [SIGTERM, SIGINT])
    func signals(signal: Int32) async throws {
        try await withTemporaryDirectory { directory in
            let socket = directory + "/evd.sock"
            let daemon = try EvdChild(self.evd, Self.arguments(directory), directory: directory)
            defer { daemon.kill() }
            #expect(await Self.serves(socket))
            daemon.signal(signal)
            let result = try await daemon.finish()
            #expect(result.reason == .exit, "signal \(signal)")
            #expect(result.status == 0, "signal \(signal): \(result.stderr)")
            #expect(result.stderr.contains("evd stopped"))
            #expect(!FileManager.default.fileExists(atPath: socket))
        }
    }

    // MARK: Helpers

    /// evd's flags for a daemon whose files all live in `directory`.
    static func arguments(_ directory: String, socket: String? = nil) -> [String] {
        [
            "--socket", socket ?? directory + "/evd.sock", "--state-dir", directory + "/state",
            "--db", "main=\(directory)/main.db",
        ]
    }

    /// The device and inode of `path` (not following a symbolic link), or nil if it does not exist.
    static func inode(_ path: String) -> FileIdentity? {
        var info = stat()
        guard lstat(path, &info) == 0 else { return nil }
        return FileIdentity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
    }

    /// Which file a path names: the same pair means the same file, not one made anew.
    struct FileIdentity: Equatable {
        let device: UInt64
        let inode: UInt64
    }

    /// Waits (bounded) until a daemon at `socket` answers `ping`.
    static func serves(_ socket: String) async -> Bool {
        await eventually {
            let pong = try? await EvdConnection.withConnection(socketPath: socket) { try await $0.request("ping") }
            return pong != nil
        }
    }

    /// `2025-05-29T12:00:00+0000 info evd: ...`: swift-log's `StreamLogHandler`.
    static func startsWithTimestamp(_ line: String) -> Bool {
        let bytes = Array(line.utf8.prefix(19))
        guard bytes.count == 19 else { return false }
        let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
        return digits.allSatisfy { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[$0]) }
            && bytes[4] == UInt8(ascii: "-") && bytes[10] == UInt8(ascii: "T") && bytes[13] == UInt8(ascii: ":")
    }

    /// `<N>` with N a syslog priority, 0...7.
    static func startsWithPriority(_ line: String) -> Bool {
        let bytes = Array(line.utf8.prefix(3))
        return bytes.count == 3 && bytes[0] == UInt8(ascii: "<") && (UInt8(ascii: "0")...UInt8(ascii: "7")).contains(bytes[1])
            && bytes[2] == UInt8(ascii: ">")
    }
}

/// Polls `condition` every 20 ms until it holds, for at most `seconds`.
private func eventually(within seconds: Double = 60, _ condition: () async -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if await condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return await condition()
}

/// One datagram evd sent to `NOTIFY_SOCKET`.
struct NotifyMessage: Sendable, CustomStringConvertible {
    let text: String
    var lines: [String] { self.text.split(separator: "\n").map(String.init) }
    var description: String { self.text.debugDescription }

    /// Its `STATUS=` line with counts, parsed.
    var status: (counts: StatusReporter.Counts, eventsPerSecond: Int64)? {
        self.lines.lazy.compactMap(Self.parseStatus).first
    }

    /// `STATUS=12 sessions, 30 subscriptions, 2 veto listeners, 1520 events/s, seq 48812`, or nil.
    static func parseStatus(_ line: String) -> (counts: StatusReporter.Counts, eventsPerSecond: Int64)? {
        guard line.hasPrefix("STATUS=") else { return nil }
        let parts = line.dropFirst("STATUS=".count).components(separatedBy: ", ").map { $0.split(separator: " ") }
        guard parts.count == 5, parts.allSatisfy({ $0.count >= 2 }) else { return nil }
        func number(_ part: [Substring], _ singular: String) -> Int? {
            let noun = part.dropFirst().joined(separator: " ")
            guard let n = Int(part[0]), noun == (n == 1 ? singular : singular + "s") else { return nil }
            return n
        }
        guard let sessions = number(parts[0], "session"), let subscriptions = number(parts[1], "subscription"),
            let vetoListeners = number(parts[2], "veto listener"),
            parts[3].count == 2, parts[3][1] == "events/s", let rate = Int64(parts[3][0]),
            parts[4].count == 2, parts[4][0] == "seq", let seq = Int64(parts[4][1])
        else { return nil }
        return (StatusReporter.Counts(sessions: sessions, subscriptions: subscriptions, vetoListeners: vetoListeners, seq: seq), rate)
    }
}

/// A datagram socket playing systemd's end of `NOTIFY_SOCKET`: a path, or an abstract name
/// (`@name`). A thread of its own receives (a blocking `recv` must not hold a thread of the
/// concurrency pool) and, the moment `READY=1` arrives, tries to connect to the daemon's socket.
final class NotifyListener: Sendable {
    /// What `NOTIFY_SOCKET` is set to.
    let address: String
    private let fd: Int32
    private let state = Mutex(State())

    private struct State {
        var messages: [NotifyMessage] = []
        /// `connect`'s errno (0: connected) at the moment READY=1 arrived.
        var readyProbe: Int32?
        var stopped = false
    }

    init(address: String, probing socketPath: String) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw RawUnixSocket.Failure(description: "socket: \(String(cString: strerror(errno)))") }
        var name = sockaddr_un()
        name.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(address.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
        withUnsafeMutableBytes(of: &name.sun_path) { raw in
            for (i, byte) in bytes.prefix(raw.count - 1).enumerated() { raw[i] = byte }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let bound = withUnsafePointer(to: &name) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard bound == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw RawUnixSocket.Failure(description: "bind \(address): \(reason)")
        }
        // Wake up now and then to see whether the test has finished with it.
        var timeout = timeval(tv_sec: 0, tv_usec: 100_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        self.address = address
        self.fd = fd
        Thread.detachNewThread { [self] in self.receive(probing: socketPath) }
    }

    private func receive(probing socketPath: String) {
        defer { close(self.fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !self.state.withLock({ $0.stopped }) {
            let count = buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { continue }  // the timeout, or a signal
            let message = NotifyMessage(text: String(decoding: buffer[..<count], as: UTF8.self))
            let probe = message.lines.contains("READY=1") ? Self.connectErrno(socketPath) : nil
            self.state.withLock { state in
                state.messages.append(message)
                if let probe, state.readyProbe == nil { state.readyProbe = probe }
            }
        }
    }

    /// 0 if a stream connection to `path` succeeds now, else the errno.
    private static func connectErrno(_ path: String) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return errno }
        defer { close(fd) }
        return connectUnixSocket(fd, to: path) == 0 ? 0 : errno
    }

    var messages: [NotifyMessage] { self.state.withLock { $0.messages } }
    var readyProbe: Int32? { self.state.withLock { $0.readyProbe } }

    /// Waits (bounded) until the messages so far satisfy `condition`.
    func wait(within seconds: Double = 60, _ condition: ([NotifyMessage]) -> Bool) async -> Bool {
        await eventually(within: seconds) { condition(self.messages) }
    }

    /// Lets the receiving thread finish (it closes the socket).
    func stop() { self.state.withLock { $0.stopped = true } }
}

/// A program started with exactly the environment given (no variable of the test process's,
/// so a `NOTIFY_SOCKET` or `JOURNAL_STREAM` of the test runner cannot leak in), its output in
/// files in `directory`.
final class EvdChild: Sendable {
    struct Result {
        let status: Int32
        let reason: ChildProcess.TerminationReason
        let stderr: String
    }

    let process: ChildProcess
    private let stdoutPath: String
    private let stderrPath: String

    init(
        _ path: String,
        _ arguments: [String],
        directory: String,
        environment: [String: String] = [:],
        stderr: String? = nil
    ) throws {
        self.stdoutPath = directory + "/child.stdout"
        self.stderrPath = stderr ?? directory + "/child.stderr"
        var env = ["PATH": "/usr/bin:/bin", "HOME": directory]
        for (key, value) in environment { env[key] = value }
        self.process = try ChildProcess(
            path: path,
            arguments: arguments,
            environment: env,
            stdout: self.stdoutPath,
            stderr: self.stderrPath
        )
    }

    func signal(_ signal: Int32) {
        if self.process.isRunning { Glibc.kill(self.process.processIdentifier, signal) }
    }

    /// Ends the process at once if a test left it running (a failed expectation).
    func kill() { self.signal(SIGKILL) }

    /// Waits (bounded) for the process to exit.
    func finish(within seconds: Double = 60) async throws -> Result {
        let exited = await eventually(within: seconds) { !self.process.isRunning }
        if !exited {
            Issue.record("\(self.process.path) did not exit in time")
            self.kill()
            while self.process.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        }
        let stderr = FileManager.default.contents(atPath: self.stderrPath) ?? Data()
        return Result(
            status: self.process.terminationStatus,
            reason: self.process.terminationReason,
            stderr: String(decoding: stderr, as: UTF8.self)
        )
    }
}
