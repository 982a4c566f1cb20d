import Foundation
import NATSTestSupport
import Testing

/// Waits (bounded) until `condition` holds; whether it did.
func eventually(within seconds: Double = 60, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(50))
    }
    return try await condition()
}

/// A temporary directory (short, for socket paths), removed after `body`.
func withTemporaryDirectory<T>(_ body: (String) async throws -> T) async throws -> T {
    var template = Array("/tmp/evf-test-XXXXXX".utf8CString)
    let path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    defer { try? FileManager.default.removeItem(atPath: path) }
    return try await body(path)
}

/// A running program (the built evforward or evd), started with exactly the environment given
/// (`PATH`, `HOME` and `environment`), its stderr in a file.
///
/// `posix_spawn`, not Foundation's `Process`: its `run()` crashes when the test process has file
/// descriptors above about 1024 open, which the whole suite reaches (see Spawned.swift).
final class Child: Sendable {
    let process: Spawned
    let stderrPath: String

    init(_ path: String, _ arguments: [String], stderr: String, environment: [String: String] = [:]) throws {
        self.stderrPath = stderr
        var env = ["PATH": "/usr/bin:/bin", "HOME": NSTemporaryDirectory()]
        for (key, value) in environment { env[key] = value }
        self.process = try Spawned(path, arguments, stdout: "/dev/null", stderr: stderr, environment: env)
    }

    var processIdentifier: pid_t { self.process.processIdentifier }

    /// Whether it has not exited yet.
    var isRunning: Bool { self.process.isRunning }

    /// The exit status, or 128 + the signal that ended it; nil while running.
    var exitStatus: Int32? { self.process.exitStatus }

    /// What it wrote to stderr so far.
    var stderr: String { self.process.errorSoFar }

    /// Sends `signal` while it runs.
    func signal(_ signal: Int32) { self.process.signal(signal) }

    /// Waits (bounded) for the exit; its status (nil: it did not exit in time, and was killed).
    func finish(within seconds: Double = 60) async -> Int32? {
        guard await eventually(within: seconds, { !self.isRunning }) else {
            self.signal(SIGKILL)
            while self.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
            return nil
        }
        return self.exitStatus
    }

    deinit {
        if self.process.isRunning {
            kill(self.process.processIdentifier, SIGKILL)
            var raw: Int32 = 0
            waitpid(self.process.processIdentifier, &raw, 0)
        }
    }
}

/// Runs evforward with `arguments` to completion (bounded); its status and stderr.
func runEvforward(_ arguments: [String]) async throws -> (status: Int32?, stderr: String) {
    try await withTemporaryDirectory { directory in
        let child = try Child(binaryPath("evforward"), arguments, stderr: directory + "/stderr")
        let status = await child.finish(within: 30)
        return (status, child.stderr)
    }
}

extension Processes {
    @Suite("evforward's command line and error paths")
    struct CommandLineTests {
        @Test(
            "Bad options are refused with a clear message and exit status 64",
            arguments: [
                (["--nats", "tls://127.0.0.1:4222", "--stream", "S"], "only nats:// URLs"),
                (["--nats", "nats://127.0.0.1:99999", "--stream", "S"], "port must be 1-65535"),
                (["--nats", "nats://u:p@127.0.0.1", "--stream", "S"], "credentials"),
                (["--nats", "nats://127.0.0.1", "--stream", "A.B"], "--stream must be"),
                (["--nats", "nats://127.0.0.1", "--stream", "S", "--subject-prefix", "evd.>"], "--subject-prefix"),
                (["--nats", "nats://127.0.0.1", "--stream", "S", "--duplicate-window", "60"], "at least 600"),
                (["--nats", "nats://127.0.0.1", "--stream", "S", "--replicas", "7"], "--replicas"),
                (["--nats", "nats://127.0.0.1", "--stream", "S", "--max-in-flight", "0"], "--max-in-flight"),
                (["--nats", "nats://127.0.0.1", "--stream", "S", "--metrics-listen", "nowhere"], "HOST:PORT"),
                (["--stream", "S"], "--nats"),
            ]
        )
        func badOptions(_ arguments: [String], _ message: String) async throws {
            let (status, stderr) = try await runEvforward(arguments)
            #expect(status == 64, "\(stderr)")
            #expect(stderr.contains(message), "\(stderr)")
        }

        @Test("Unreachable NATS: it retries with back-off and logs each failure, and SIGTERM ends it cleanly")
        func unreachableNATS() async throws {
            try await withTemporaryDirectory { directory in
                // A port nobody listens on: bind one, note it, close it.
                let port = try freePort()
                let child = try Child(
                    binaryPath("evforward"),
                    ["--nats", "nats://127.0.0.1:\(port)", "--stream", "S", "--socket", directory + "/evd.sock"],
                    stderr: directory + "/stderr"
                )
                let retried = await eventually(within: 30) {
                    child.stderr.components(separatedBy: "forwarding interrupted; retrying").count > 3
                }
                #expect(retried, "\(child.stderr)")
                #expect(child.isRunning)
                #expect(child.stderr.contains("cannot connect to 127.0.0.1:\(port)"), "\(child.stderr)")
                child.signal(SIGTERM)
                #expect(await child.finish() == 0, "\(child.stderr)")
            }
        }
    }
}
