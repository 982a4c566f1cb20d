import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Faults of the connection layer that outside testers provoked on a real `evd` process: a daemon
/// that grew with every connection, and one that spun on `accept` at its file-descriptor limit.
///
/// Each test runs the built binary (`EVD_BIN_DIR`), so that its resident size and CPU time are its
/// own and not those of the test process. Their bounds are resources, not timings, and generous:
/// the faults overshoot them many times over.
@Suite("Connection faults", .serialized)
struct ConnectionFaultTests {
    /// Connections churned after the warm-up.
    static let churned = 10_000

    @Test("a connection that reads hello and closes leaves nothing behind: RSS grows < 1 KB per connection over 10,000")
    func connectionChurnLeavesNothing() async throws {
        try await withEvd(["--no-journal"]) { evd in
            // The warm-up: the allocator's arenas, NIO's pools and the registry's tables reach
            // their working size.
            #expect(await churn(evd.socketPath, 2_000) == 2_000)
            try #require(await evd.settled())
            let before = try #require(residentKB(of: evd.pid))
            #expect(await churn(evd.socketPath, Self.churned) == Self.churned)
            try #require(await evd.settled())
            let after = try #require(residentKB(of: evd.pid))
            let perConnection = Double(after - before) / Double(Self.churned)
            print(
                "connection churn: evd's RSS \(before) kB → \(after) kB after \(Self.churned) connections: \(String(format: "%.2f", perConnection)) KB per connection"
            )
            // Each session left ~5.5 KB behind before the fix (a reference cycle).
            #expect(perConnection < 1, "evd grew by \(after - before) kB over \(Self.churned) connections")
            #expect(try await evd.ping())
        }
    }

    @Test("at its file-descriptor limit evd pauses accepting instead of spinning, says so once, and serves again once fds are free")
    func descriptorLimitBacksOff() async throws {
        // 64 descriptors: evd's own (databases, journal, epoll, eventfds) take a couple of dozen.
        try await withEvd([], nofile: 64, logLevel: "notice") { evd in
            var held: [Int32] = []
            defer { for fd in held { close(fd) } }
            // Far more than the limit: the rest wait in the listen backlog, each a failing accept.
            for _ in 0..<120 {
                guard let fd = connectNonBlocking(evd.socketPath) else { break }
                held.append(fd)
            }
            #expect(held.count >= 100, "only \(held.count) connections could be made")
            // evd has hit its limit: it accepted what it could.
            try await Task.sleep(for: .milliseconds(500))
            let start = try #require(cpuTicks(of: evd.pid))
            let clock = ContinuousClock.now
            try await Task.sleep(for: .seconds(2))
            let used = try #require(cpuTicks(of: evd.pid)) - start
            let wall =
                Double((ContinuousClock.now - clock).components.attoseconds) / 1e18
                + Double((ContinuousClock.now - clock).components.seconds)
            let share = Double(used) / Double(sysconf(Int32(_SC_CLK_TCK))) / wall
            print("at the fd limit: evd used \(Int(share * 100))% of a core over \(String(format: "%.1f", wall)) s")
            // A spin on accept took 97-99%.
            #expect(share < 0.5, "evd used \(Int(share * 100))% of a core while at its descriptor limit")
            for fd in held { close(fd) }
            held = []
            // Fds free again: a new client is served (within the pause and some).
            let served = await eventually(within: 20) { (try? await evd.ping()) == true }
            #expect(served, "evd does not serve again after the connections closed")
            // The episode ends once accepting has gone a pause (1 s) without hitting the limit;
            // draining the backlog of closed clients may touch it again meanwhile.
            let resumed = await eventually(within: 20) { evd.stderr().contains("accepting connections again") }
            let log = evd.stderr()
            #expect(resumed, "\(log.suffix(2000))")
            let warnings = log.components(separatedBy: "out of file descriptors").count - 1
            #expect(warnings == 1, "one warning per episode, got \(warnings): \(log.suffix(2000))")
            // Clients that hung up while waiting in the backlog are not the daemon's fault.
            #expect(!log.contains("could not read peer credentials"), "\(log.suffix(2000))")
        }
    }
}

// MARK: A real evd

private struct RunningEvd: Sendable {
    let child: EvdChild
    let socketPath: String
    let stderrPath: String
    var pid: Int32 { self.child.process.processIdentifier }

    /// Whether a ping on a fresh connection is answered.
    func ping() async throws -> Bool {
        try await EvdConnection.withConnection(socketPath: self.socketPath) { try await $0.request("ping") } == [:]
    }

    /// Waits (bounded) until evd holds no session but the asking one: every churned session ended.
    func settled() async -> Bool {
        await eventually(within: 60) {
            let current = try? await EvdConnection.withConnection(socketPath: self.socketPath) {
                try await $0.request("stats")["sessions"]?["current"]?.intValue
            }
            return current == 1
        }
    }

    func stderr() -> String {
        String(decoding: FileManager.default.contents(atPath: self.stderrPath) ?? Data(), as: UTF8.self)
    }
}

/// Starts `evd` (the built binary) with `arguments` and `logLevel` in a fresh directory, under a descriptor
/// limit of `nofile` when given (`prlimit`, which then runs evd itself: same pid); stops it after
/// `body`.
private func withEvd(
    _ arguments: [String],
    nofile: Int? = nil,
    logLevel: String = "warning",
    _ body: (RunningEvd) async throws -> Void
) async throws {
    try await withTemporaryDirectory { directory in
        let all =
            [
                "--socket", directory + "/evd.sock", "--state-dir", directory + "/state", "--db",
                "main=\(directory)/main.db", "--log-level", logLevel,
            ] + arguments
        let child: EvdChild
        if let nofile {
            child = try EvdChild("/usr/bin/prlimit", ["--nofile=\(nofile):\(nofile)", binaryPath("evd")] + all, directory: directory)
        } else {
            child = try EvdChild(binaryPath("evd"), all, directory: directory)
        }
        defer { child.kill() }
        let evd = RunningEvd(child: child, socketPath: directory + "/evd.sock", stderrPath: directory + "/child.stderr")
        let ready = await eventually(within: 60) {
            guard child.process.isRunning else { return true }
            return (try? await evd.ping()) == true
        }
        try #require(ready && child.process.isRunning, "evd did not start: \(evd.stderr())")
        try await body(evd)
        child.signal(SIGTERM)
        let result = try await child.finish(within: 30)
        #expect(result.status == 0, "\(result.stderr)")
    }
}

/// Opens `count` connections one after another, each reading the first byte of `hello` and
/// closing, on a thread of its own (blocking calls); returns how many read their byte.
private func churn(_ socketPath: String, _ count: Int) async -> Int {
    await withCheckedContinuation { (continuation: CheckedContinuation<Int, Never>) in
        Thread.detachNewThread {
            var served = 0
            for _ in 0..<count {
                let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
                guard fd >= 0 else { break }
                var timeout = timeval(tv_sec: 10, tv_usec: 0)
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                var byte: UInt8 = 0
                if connectUnixSocket(fd, to: socketPath) == 0 {
                    var got = recv(fd, &byte, 1, 0)
                    while got < 0 && errno == EINTR { got = recv(fd, &byte, 1, 0) }
                    if got == 1 { served += 1 }
                }
                close(fd)
            }
            continuation.resume(returning: served)
        }
    }
}

/// A connection to `socketPath` that does not wait for evd to accept it (it may sit in the
/// listen backlog); nil when even the backlog is full.
private func connectNonBlocking(_ socketPath: String) -> Int32? {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
    guard fd >= 0 else { return nil }
    guard connectUnixSocket(fd, to: socketPath) == 0 else {
        close(fd)
        return nil
    }
    return fd
}

/// The resident set size of process `pid` (`VmRSS`), in kB.
private func residentKB(of pid: Int32) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return line.split(separator: " ").dropFirst().first.flatMap { Int($0) }
    }
    return nil
}

/// The CPU time process `pid` has used, user and system (`/proc/PID/stat` fields 14 and 15), in
/// clock ticks.
private func cpuTicks(of pid: Int32) -> Int? {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
        let close = stat.lastIndex(of: ")")
    else { return nil }
    // After the command's ")": field 3 (state) on; utime and stime are fields 14 and 15.
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
    return user + system
}
