import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A finished process's status and output.
public struct ToolResult {
    public var status: Int32
    public var stdout: String
    public var stderr: String
}

/// A child process started with `posix_spawn`, its standard output and error in files.
///
/// Not Foundation's `Process`: its `run()` crashes (a memmove in its spawn setup) when the test
/// process has file descriptors numbered above about 1024 open, which the whole suite reaches with
/// its in-process daemons (EvdDaemonTests' `ChildProcess` says the same). Waiting polls with
/// `Task.sleep`: reading a pipe or `waitpid` without `WNOHANG` would block a thread of the small
/// cooperative pool.
public final class Spawned: @unchecked Sendable {
    // @unchecked Sendable: `status` is only touched under `lock`; the rest is immutable.
    public let processIdentifier: pid_t
    private let stdoutPath: String
    private let stderrPath: String
    private let ownsFiles: Bool
    private let lock = NSLock()
    private var status: Int32?

    /// Starts `path` with `arguments`, standard input from /dev/null; output into temporary files, or
    /// both standard output and error appended to `log` when given. The test process's environment.
    public convenience init(_ path: String, _ arguments: [String], log: String? = nil) throws {
        let base = NSTemporaryDirectory() + "evtail-nats-\(UUID().uuidString)"
        try self.init(
            path,
            arguments,
            stdout: log ?? base + ".out",
            stderr: log ?? base + ".err",
            append: log != nil,
            ownsFiles: log == nil
        )
    }

    /// Starts `path` with `arguments` and exactly `environment` (nil: the test process's), standard
    /// input from /dev/null, standard output and error into the files given (the same file: both
    /// appended to it), which the caller keeps.
    public convenience init(
        _ path: String,
        _ arguments: [String],
        stdout: String,
        stderr: String,
        environment: [String: String]?
    ) throws {
        try self.init(path, arguments, stdout: stdout, stderr: stderr, append: stdout == stderr, ownsFiles: false, environment: environment)
    }

    private init(
        _ path: String,
        _ arguments: [String],
        stdout: String,
        stderr: String,
        append: Bool,
        ownsFiles: Bool,
        environment: [String: String]? = nil
    ) throws {
        self.stdoutPath = stdout
        self.stderrPath = stderr
        self.ownsFiles = ownsFiles
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        if append {
            posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        } else {
            posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            posix_spawn_file_actions_addopen(&actions, 2, stderr, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        }
        // The child keeps nothing else of the tests' (sockets, NIO's epoll and eventfds).
        let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        for fd in open.compactMap(Int32.init) where fd > 2 {
            posix_spawn_file_actions_addclose(&actions, fd)
        }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = (environment ?? ProcessInfo.processInfo.environment).map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, argv, envp)
        guard rc == 0 else { throw NATSServer.StartFailed(description: "posix_spawn \(path): \(String(cString: strerror(rc)))") }
        self.processIdentifier = pid
    }

    /// The raw wait status once the child has exited (reaping it on first sight).
    private func poll() -> Int32? {
        self.lock.withLock {
            if let status = self.status { return status }
            var raw: Int32 = 0
            if waitpid(self.processIdentifier, &raw, WNOHANG) == self.processIdentifier { self.status = raw }
            return self.status
        }
    }

    public var isRunning: Bool { self.poll() == nil }

    /// The exit status, or the number of the signal that ended it; -1 while running.
    public var terminationStatus: Int32 {
        guard let raw = self.poll() else { return -1 }
        return raw & 0x7f == 0 ? (raw >> 8) & 0xff : raw & 0x7f
    }

    /// The exit status, or 128 + the signal that ended it (as a shell says); nil while running.
    public var exitStatus: Int32? {
        guard let raw = self.poll() else { return nil }
        return raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + raw & 0x7f
    }

    /// What the process wrote to standard error so far.
    public var errorSoFar: String { (try? String(contentsOfFile: self.stderrPath, encoding: .utf8)) ?? "" }

    /// What the process wrote to standard output so far.
    public var outputSoFar: String { (try? String(contentsOfFile: self.stdoutPath, encoding: .utf8)) ?? "" }

    /// Sends `signal` while it runs.
    public func signal(_ signal: Int32) {
        if self.isRunning { kill(self.processIdentifier, signal) }
    }

    /// Sends SIGTERM while it runs.
    public func terminate() { self.signal(SIGTERM) }

    /// Waits (bounded; then SIGKILL) for the exit and returns the status and output.
    public func finish(within seconds: Int) async throws -> ToolResult {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while self.isRunning && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(20)) }
        if self.isRunning {
            kill(self.processIdentifier, SIGKILL)
            while self.isRunning { try await Task.sleep(for: .milliseconds(10)) }
        }
        let result = ToolResult(
            status: self.terminationStatus,
            stdout: (try? String(contentsOfFile: self.stdoutPath, encoding: .utf8)) ?? "",
            stderr: (try? String(contentsOfFile: self.stderrPath, encoding: .utf8)) ?? ""
        )
        if self.ownsFiles {
            try? FileManager.default.removeItem(atPath: self.stdoutPath)
            try? FileManager.default.removeItem(atPath: self.stderrPath)
        }
        return result
    }
}
