import EvdClient
import Foundation
import Logging
import Testing

@testable import EvdDaemon

@Suite("Lifecycle")
struct LifecycleTests {
    @Test("a second daemon on a live socket refuses to start with a clear reason; the first keeps serving")
    func secondDaemonRefused() async throws {
        try await withRunningDaemon { daemon in
            var configuration = daemon.configuration
            configuration.stateDirectory = daemon.directory + "/second-state"
            configuration.databases = [DatabaseConfig(name: "main", path: daemon.directory + "/second.db")]
            let logger = Logger(label: "evd-test", factory: { _ in SwiftLogNoOpLogHandler() })
            do {
                try await Daemon(configuration: configuration, logger: logger).run()
                Issue.record("a second daemon started on a live socket")
            } catch let error as Daemon.StartupError {
                #expect(error.description == "another evd is already serving \(daemon.socketPath)")
            }
            let pong = try await daemon.request("ping")
            #expect(pong == [:])
        }
    }

    @Test("a stale socket file (nobody listening) is replaced")
    func staleSocketReplaced() async throws {
        try await withTemporaryDirectory { directory in
            // A socket file whose listener is gone: bound, then closed without unlinking.
            let path = directory + "/evd.sock"
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
            }
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            #expect(bound == 0)
            close(fd)
            #expect(FileManager.default.fileExists(atPath: path))
            try await withDaemon(in: directory) { daemon, _ in
                let pong = try await daemon.request("ping")
                #expect(pong == [:])
            }
            // It created the socket, so it removed it on the way out.
            #expect(!FileManager.default.fileExists(atPath: path))
        }
    }

    @Test("graceful shutdown: a pending veto resolves by its on_timeout at once, in-flight work finishes and commits, clients get notice shutdown")
    func shutdownWithInFlightWorkAndPendingVeto() async throws {
        try await withTemporaryDirectory { directory in
            try await withDaemon(in: directory) { daemon, stop in
                try await daemon.request("execute", ["sql": "create table t(id integer primary key)"])
                try await daemon.withClient { listener in
                    try await listener.request(
                        "subscribe",
                        ["veto": ["before_cursor_execute"], "name": "silent", "timeout_ms": 60000, "on_timeout": "allow"])
                    try await daemon.withClient { writer in
                        let inFlight = VetoInFlight { try await writer.rawRequest("execute", ["sql": "insert into t values (1)"]) }
                        // The veto is pending: the listener never answers it.
                        _ = try #require(await listener.nextMessage(ofType: "veto", within: 20))
                        await stop()
                        // Not after 60 s: shutdown resolves it by on_timeout (allow), and the insert commits.
                        let response = try #require(try await inFlight.value(within: 20))
                        #expect(response["ok"] == true, "\(response)")
                        let notice = try #require(await writer.nextMessage(ofType: "notice", within: 20))
                        #expect(notice["code"] == "shutdown")
                    }
                }
            }
            // The next daemon finds the committed row and its journaled event.
            try await withDaemon(in: directory) { daemon, _ in
                let rows = try await daemon.request("execute", ["sql": "select id from t"])
                #expect(rows["rows"] == [[1]])
                let journal = try await daemon.request("execute", ["sql": "select event from _evd_journal where event = 'insert-rows'"])
                #expect(journal["rows"] == [["insert-rows"]])
            }
        }
    }
}

/// Many plain subscriber sockets, read (or deliberately not read) by one thread with `poll`.
private final class SubscriberSockets: @unchecked Sendable {
    // @unchecked Sendable: the fds are set up before the reader thread starts; `received` is only
    // touched under `lock`.
    let fds: [Int32]
    private let lock = NSLock()
    private var received: [Int32: [UInt8]] = [:]
    private var ended: Set<Int32> = []
    private var stopped = false

    init(count: Int, path: String, subscribe: (Int) -> String) throws {
        var fds: [Int32] = []
        for index in 0..<count {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0, connectUnixSocket(fd, to: path) == 0 else {
                throw RawUnixSocket.Failure(description: "connect #\(index): \(String(cString: strerror(errno)))")
            }
            let line = Array((subscribe(index) + "\n").utf8)
            guard line.withUnsafeBytes({ Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == line.count else {
                throw RawUnixSocket.Failure(description: "send #\(index)")
            }
            fds.append(fd)
        }
        self.fds = fds
    }

    /// Stops the reading thread.
    func stopDraining() {
        self.lock.lock()
        self.stopped = true
        self.lock.unlock()
    }

    private var isStopped: Bool {
        self.lock.lock()
        defer { self.lock.unlock() }
        return self.stopped
    }

    /// Reads `readers` on a thread of its own until `stopDraining`.
    func drain(_ readers: [Int32]) {
        Thread.detachNewThread {
            var polled = readers.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            var buffer = [UInt8](repeating: 0, count: 65536)
            while !self.isStopped {
                guard poll(&polled, nfds_t(polled.count), 100) > 0 else { continue }
                for index in polled.indices where polled[index].revents != 0 && polled[index].fd >= 0 {
                    let fd = polled[index].fd
                    let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    self.lock.lock()
                    if count > 0 { self.received[fd, default: []] += buffer[0..<count] } else { self.ended.insert(fd) }
                    self.lock.unlock()
                    if count <= 0 { polled[index].fd = -1 }
                }
            }
        }
    }

    /// How many times `needle` occurs in what `fd` received so far.
    func count(_ needle: String, in fd: Int32) -> Int {
        self.lock.lock()
        defer { self.lock.unlock() }
        let text = String(decoding: self.received[fd] ?? [], as: UTF8.self)
        return text.components(separatedBy: needle).count - 1
    }

    func hasEnded(_ fd: Int32) -> Bool {
        self.lock.lock()
        defer { self.lock.unlock() }
        return self.ended.contains(fd)
    }

    func closeAll() { for fd in self.fds { close(fd) } }
}

/// A process's resident memory in KiB, from /proc.
private func residentKiB(_ pid: Int32) -> Int {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
        let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
    else { return 0 }
    return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
}

@Suite("Many subscribers")
struct ManySubscribersTests {
    @Test("1000 subscribers, ten of which never read: the others get every event, the stalled ones lag out, evd's memory stays bounded")
    func thousandSubscribers() async throws {
        try await withTemporaryDirectory { directory in
            let socketPath = directory + "/evd.sock"
            let evd = try Spawned(
                binaryPath("evd"),
                [
                    "--socket", socketPath, "--state-dir", directory + "/state", "--db", "main=\(directory)/main.db",
                    "--max-connections", "2000", "--max-connections-per-uid", "2000", "--log-level", "error",
                ])
            defer { evd.process.terminate() }
            let pid = evd.process.processIdentifier
            var connected = false
            for _ in 0..<500 where !connected {
                connected = (try? await EvdConnection.withConnection(socketPath: socketPath) { _ in true }) ?? false
                if !connected { try await Task.sleep(for: .milliseconds(20)) }
            }
            try #require(connected, "evd did not start")
            let idle = residentKiB(pid)

            let stalledCount = 10
            let total = 1000
            let sockets = try SubscriberSockets(count: total, path: socketPath) { index in
                index < stalledCount
                    ? #"{"op":"subscribe","events":["app.*"],"name":"stalled"}"#
                    : #"{"op":"subscribe","events":["app.tick"],"name":"reader"}"#
            }
            defer {
                sockets.stopDraining()
                sockets.closeAll()
            }
            let readers = Array(sockets.fds[stalledCount...])
            sockets.drain(readers)
            try await EvdConnection.withConnection(socketPath: socketPath) { evd in
                let deadline = ContinuousClock.now + .seconds(60)
                while (try await evd.request("stats"))["subscriptions"] != .integer(total), ContinuousClock.now < deadline {
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
            let subscribed = residentKiB(pid)

            // A flood only the stalled subscribers asked for, with a few ticks everyone gets.
            let payload = String(repeating: "x", count: 200)
            var peak = subscribed
            let ticks = 20
            try await EvdConnection.withConnection(socketPath: socketPath) { evd in
                for n in 0..<15_000 {
                    try await evd.request("emit", ["event": "app.flood", "data": ["n": .integer(Int64(n)), "pad": .string(payload)]])
                    if n % 750 == 0 {
                        try await evd.request("emit", ["event": "app.tick", "data": ["n": .integer(Int64(n / 750))]])
                        peak = max(peak, residentKiB(pid))
                    }
                }
            }
            // Every reader gets every tick; every stalled subscriber is told it lagged and is cut off.
            let deadline = ContinuousClock.now + .seconds(60)
            while ContinuousClock.now < deadline,
                readers.contains(where: { sockets.count(#""event":"app.tick""#, in: $0) < ticks })
            {
                try await Task.sleep(for: .milliseconds(50))
            }
            sockets.stopDraining()
            let short = readers.filter { sockets.count(#""event":"app.tick""#, in: $0) != ticks }
            #expect(short.isEmpty, "\(short.count) readers missed ticks")
            // A stalled subscriber's queue overflowed: evd cut it off (it could not even take its
            // `lagged` notice, its socket being full), so reading it now ends in EOF, not a timeout.
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var timeout = timeval(tv_sec: 20, tv_usec: 0)
            for fd in sockets.fds[..<stalledCount] {
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                var last = 0
                repeat { last = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } } while last > 0
                #expect(last == 0, "a stalled subscriber was not disconnected: \(String(cString: strerror(errno)))")
            }
            let stats = try await EvdConnection.withConnection(socketPath: socketPath) { try await $0.request("stats") }
            #expect(stats["lagged_disconnects"] == .integer(stalledCount))
            peak = max(peak, residentKiB(pid))
            print("evd RSS: idle \(idle / 1024) MiB, 1000 subscribers \(subscribed / 1024) MiB, peak during the flood \(peak / 1024) MiB")
            // Bounded: ten stalled queues (10,000 events each at most) and 1000 sessions, not the flood.
            #expect(peak < 512 * 1024, "evd grew to \(peak / 1024) MiB")
            evd.process.terminate()
            let result = try await evd.finish(within: 30)
            #expect(result.status == 0, "\(result.stderr)")
        }
    }
}
