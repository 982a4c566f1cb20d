import EvdClient
import Foundation
import Logging
import OrderedCollections
import ServiceLifecycle
import Testing

@testable import EvdDaemon

/// A daemon running for one test: its socket, its directory, its configuration.
struct RunningDaemon: Sendable {
    let socketPath: String
    let directory: String
    let configuration: EvdConfiguration

    /// The default database's file.
    var databasePath: String { self.configuration.databases[0].path }

    /// Opens a client connection for `body`.
    func withClient<T: Sendable>(_ body: (EvdConnection) async throws -> T) async throws -> T {
        try await EvdConnection.withConnection(socketPath: self.socketPath, body)
    }

    /// Sends one operation on a fresh connection and returns its result.
    @discardableResult
    func request(_ operation: EvdOperation) async throws -> JSONObject {
        try await self.withClient { try await $0.request(operation) }
    }

    /// Sends one request by its op's name and arguments (for what `EvdOperation` cannot express: a
    /// test of the wire itself) on a fresh connection and returns its result.
    @discardableResult
    func request(_ op: String, _ arguments: JSONObject = [:]) async throws -> JSONObject {
        try await self.withClient { try await $0.request(op, arguments) }
    }
}

/// A fresh temporary directory, removed after `body`.
func withTemporaryDirectory<T>(_ body: (String) async throws -> T) async throws -> T {
    var template = Array("/tmp/evd-test-XXXXXX".utf8CString)
    let path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    defer { try? FileManager.default.removeItem(atPath: path) }
    return try await body(path)
}

/// Runs a real evd (in-process, on a real Unix socket in a temporary directory, with a real
/// SQLite file) for the duration of `body`, then shuts it down gracefully.
func withRunningDaemon<T: Sendable>(
    configure: (inout EvdConfiguration) -> Void = { _ in },
    _ body: @Sendable (RunningDaemon) async throws -> T
) async throws -> T {
    try await withStoppableDaemon(configure: configure) { daemon, _ in try await body(daemon) }
}

/// Like `withRunningDaemon`, but `body` may also begin the graceful shutdown itself (`stop`).
func withStoppableDaemon<T: Sendable>(
    configure: (inout EvdConfiguration) -> Void = { _ in },
    _ body: @Sendable (RunningDaemon, _ stop: @Sendable () async -> Void) async throws -> T
) async throws -> T {
    try await withTemporaryDirectory { directory in
        try await withDaemon(in: directory, configure: configure, body)
    }
}

/// Runs a real evd whose socket, database and state live in `directory`: a later daemon started
/// on the same directory finds the same files (restart tests).
func withDaemon<T: Sendable>(
    in directory: String,
    configure: (inout EvdConfiguration) -> Void = { _ in },
    logger: Logger? = nil,
    _ body: @Sendable (RunningDaemon, _ stop: @Sendable () async -> Void) async throws -> T
) async throws -> T {
    var configuration = EvdConfiguration(
        socketPath: directory + "/evd.sock",
        databases: [DatabaseConfig(name: "main", path: directory + "/main.db")],
        stateDirectory: directory + "/state"
    )
    configuration.poolSize = 4
    configure(&configuration)
    let logger = logger ?? Logger(label: "evd-test", factory: { _ in SwiftLogNoOpLogHandler() })
    let daemon = Daemon(configuration: configuration, logger: logger)
    let group = ServiceGroup(services: [daemon], logger: logger)
    let running = RunningDaemon(socketPath: configuration.socketPath, directory: directory, configuration: configuration)
    return try await withThrowingTaskGroup(of: T?.self) { tasks in
        tasks.addTask {
            try await group.run()
            return nil
        }
        try await daemon.waitUntilReady()
        let result: T
        do {
            result = try await body(running) { await group.triggerGracefulShutdown() }
        } catch {
            await group.triggerGracefulShutdown()
            try? await tasks.waitForAll()
            throw error
        }
        await group.triggerGracefulShutdown()
        try await tasks.waitForAll()
        return result
    }
}

/// What `work` returns, or `nil` if it has not finished within `seconds` (it is then cancelled).
func firstValue<T: Sendable>(within seconds: Double, _ work: @escaping @Sendable () async -> T?) async -> T? {
    await withTaskGroup(of: T?.self) { group in
        group.addTask { await work() }
        group.addTask {
            try? await Task.sleep(for: .seconds(seconds))
            return nil
        }
        let first = await group.next() ?? nil
        group.cancelAll()
        return first
    }
}

extension EvdConnection {
    /// Sends a request expected to fail and returns its error.
    func expectError(_ op: String, _ arguments: JSONObject = [:]) async throws -> EvdError {
        do {
            let result = try await self.request(op, arguments)
            Issue.record("expected \(op) to fail, got \(result)")
            return EvdError(.badRequest, "no error")
        } catch let error as EvdError {
            return error
        }
    }

    /// The next message of `type` (skipping others; `nil`: of any type), or nil if none arrives
    /// within `seconds`.
    func nextMessage(ofType type: String?, within seconds: Double = 30) async -> JSONObject? {
        await firstValue(within: seconds) {
            while let message = await self.nextMessage() {
                if type == nil || message["type"]?.stringValue == type { return message }
            }
            return nil
        }
    }

    /// Collects events until one named `last` arrives (inclusive), within `seconds`.
    func events(until last: String, within seconds: Double = 30) async -> [JSONObject] {
        var collected: [JSONObject] = []
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            let remaining = Double((deadline - ContinuousClock.now).components.seconds) + 1
            guard let event = await self.nextMessage(ofType: "event", within: remaining) else { break }
            collected.append(event)
            if event["event"]?.stringValue == last { break }
        }
        return collected
    }
}

/// Where the built executables are: `$EVD_BIN_DIR` (scripts/test sets it), else `.build/debug`.
func binaryPath(_ name: String) -> String {
    if let dir = ProcessInfo.processInfo.environment["EVD_BIN_DIR"], !dir.isEmpty { return dir + "/" + name }
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
    return root.appendingPathComponent(".build/debug/\(name)").path
}

/// The repository's root directory.
let repositoryRoot: String = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

/// The outcome of a finished process.
struct ProcessResult: Sendable {
    let status: Int32
    let stdout: String
    let stderr: String
}

/// Runs a program to completion and captures its output.
func runProcess(
    _ path: String,
    _ arguments: [String],
    environment: [String: String] = [:],
    timeout: Double = 60
)
    async throws -> ProcessResult
{
    try await Spawned(path, arguments, environment: environment).finish(within: timeout)
}

/// A spawned process whose output goes to temporary files.
///
/// Files, not pipes: reading a pipe blocks a thread, and blocking the cooperative pool (two threads
/// on a two-core machine) would starve the in-process daemon the process is talking to. Waiting is
/// a polling sleep for the same reason.
final class Spawned: @unchecked Sendable {
    // @unchecked Sendable: `process` is only started, signalled and polled; the files are read once
    // after it exits.
    let process: ChildProcess
    private let stdoutPath: String
    private let stderrPath: String

    init(_ path: String, _ arguments: [String], environment: [String: String] = [:]) throws {
        let base = NSTemporaryDirectory() + "evd-spawn-\(UInt64.random(in: 0...UInt64.max))"
        self.stdoutPath = base + ".out"
        self.stderrPath = base + ".err"
        var env = ProcessInfo.processInfo.environment
        for (key, value) in environment { env[key] = value }
        self.process = try ChildProcess(
            path: path,
            arguments: arguments,
            environment: env,
            stdout: self.stdoutPath,
            stderr: self.stderrPath
        )
    }

    /// Waits (bounded) for the process to exit and returns its status and output.
    func finish(within seconds: Double = 30) async throws -> ProcessResult {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while self.process.isRunning && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        if self.process.isRunning {
            self.process.terminate()
            Issue.record("\(self.process.path.split(separator: "/").last ?? "process") did not exit in time")
            while self.process.isRunning { try await Task.sleep(for: .milliseconds(20)) }
        }
        defer {
            try? FileManager.default.removeItem(atPath: self.stdoutPath)
            try? FileManager.default.removeItem(atPath: self.stderrPath)
        }
        let stdout = FileManager.default.contents(atPath: self.stdoutPath) ?? Data()
        let stderr = FileManager.default.contents(atPath: self.stderrPath) ?? Data()
        return ProcessResult(
            status: self.process.terminationStatus,
            stdout: String(decoding: stdout, as: UTF8.self),
            stderr: String(decoding: stderr, as: UTF8.self)
        )
    }
}

/// Connects with a plain socket, sends `send` (then half-closes if asked) and reads until EOF or
/// until `until` is satisfied, on a thread of its own (so a blocking read never holds a thread of
/// the concurrency pool the daemon runs on); gives up after 10 s without data.
///
/// A signal that interrupts a blocking call is not the end of the exchange: the call is retried.
/// This matters because the test process gets such signals: when any thread crashes (another
/// test's `Process.run`, say), the Swift runtime's crash handler pauses every other thread with
/// SIGUSR1/SIGUSR2/SIGPROF, installed without `SA_RESTART`; and a `read` on a socket with
/// `SO_RCVTIMEO` fails with `EINTR` even under `SA_RESTART`. Taking that `EINTR` for the end of
/// the stream made "a subscriber that half-closes its input still gets its events" flaky: the
/// daemon wrote the event, but the reader had already given up after `hello` and the response.
func plainSocketExchange(
    socketPath: String,
    send: [UInt8],
    halfClose: Bool,
    until: @escaping @Sendable ([UInt8]) -> Bool = { _ in false }
) async -> ([UInt8], Bool) {
    await withCheckedContinuation { (continuation: CheckedContinuation<([UInt8], Bool), Never>) in
        Thread.detachNewThread {
            continuation.resume(returning: blockingExchange(socketPath, send, halfClose, until))
        }
    }
}

private func blockingExchange(
    _ socketPath: String,
    _ send: [UInt8],
    _ halfClose: Bool,
    _ until: ([UInt8]) -> Bool
) -> ([UInt8], Bool) {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return ([], false) }
    defer { close(fd) }
    let connected = connectUnixSocket(fd, to: socketPath)
    guard connected == 0 else { return ([], false) }
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var offset = 0
    while offset < send.count {
        let written = send[offset...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else { return ([], false) }
        offset += written
    }
    if halfClose { shutdown(fd, Int32(SHUT_WR)) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while !until(bytes) {
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count == 0 { return (bytes, true) }
        if count < 0 && errno == EINTR { continue }
        if count < 0 { return (bytes, false) }  // the 10 s without data ran out (EAGAIN), or a real error
        bytes += buffer[0..<count]
    }
    return (bytes, false)
}

/// A child process started with `posix_spawn`, with the part of Foundation's `Process` API the
/// tests use.
///
/// Not Foundation's `Process`: its `run()` crashes (a memmove in its spawn setup) when the test
/// process has file descriptors numbered above about 1024 open — which happens here, with many
/// in-process daemons and their connections running in parallel.
final class ChildProcess: @unchecked Sendable {
    // @unchecked Sendable: `status` is only touched under `lock`.
    enum TerminationReason { case exit, uncaughtSignal }

    let processIdentifier: Int32
    /// The program's path.
    let path: String
    private let lock = NSLock()
    private var status: Int32?

    init(path: String, arguments: [String], environment: [String: String], stdout: String, stderr: String) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, stderr, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        // The child keeps nothing else of the tests' (sockets, NIO's epoll and eventfds), as
        // Foundation's Process does.
        let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        for fd in open.compactMap(Int32.init) where fd > 2 {
            posix_spawn_file_actions_addclose(&actions, fd)
        }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, argv, envp)
        guard rc == 0 else {
            throw RawUnixSocket.Failure(description: "posix_spawn \(path): \(String(cString: strerror(rc)))")
        }
        self.processIdentifier = pid
        self.path = path
    }

    /// The raw wait status once the child has exited (reaping it on first sight).
    private func poll() -> Int32? {
        self.lock.lock()
        defer { self.lock.unlock() }
        if let status = self.status { return status }
        var raw: Int32 = 0
        if waitpid(self.processIdentifier, &raw, WNOHANG) == self.processIdentifier { self.status = raw }
        return self.status
    }

    var isRunning: Bool { self.poll() == nil }

    /// The exit status, or the signal that ended it.
    var terminationStatus: Int32 {
        guard let raw = self.poll() else { return -1 }
        return raw & 0x7f == 0 ? (raw >> 8) & 0xff : raw & 0x7f
    }

    var terminationReason: TerminationReason {
        guard let raw = self.poll() else { return .exit }
        return raw & 0x7f == 0 ? .exit : .uncaughtSignal
    }

    /// Sends SIGTERM.
    func terminate() {
        if self.isRunning { kill(self.processIdentifier, SIGTERM) }
    }
}
