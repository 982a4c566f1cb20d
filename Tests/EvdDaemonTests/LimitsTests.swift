import EvdClient
import Foundation
import OrderedCollections
import Synchronization
import Testing

@testable import EvdDaemon

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The limits against abuse (docs/protocol.md, "Limits"): connections in all and per uid,
/// subscriptions per connection, pending requests per connection, and their flags.
@Suite("Limits")
struct LimitsTests {
    var evd: String { binaryPath("evd") }

    // MARK: Connections per uid

    @Test("per uid: the connection beyond --max-connections-per-uid gets too_many_connections naming it; closing one frees a slot")
    func connectionsPerUID() async throws {
        try await withRunningDaemon(configure: { $0.maxSessionsPerUID = 3 }) { daemon in
            try await withClients(daemon, count: 2) { held in
                try await daemon.withClient { third in
                    #expect(try await third.request("ping") == [:])
                    // Over the limit: one error response with id null and no hello, then EOF.
                    let message = try await refusalOnTheWire(daemon)
                    #expect(message["error"]?["code"] == "too_many_connections")
                    #expect(message["error"]?["limit"] == "max-connections-per-uid")
                    #expect(message["error"]?["max"] == 3)
                    #expect(message["error"]?["message"]?.stringValue?.contains("--max-connections-per-uid") == true)
                    // The client library reports the refusal as the daemon's error.
                    let refused = await refusal(daemon)
                    #expect(refused?.code == "too_many_connections")
                    #expect(refused?.extra["limit"] == "max-connections-per-uid")
                    // The admitted sessions are unaffected.
                    for evd in held + [third] { #expect(try await evd.request("ping") == [:]) }
                }
                // The third has gone: a new connection takes its slot, and the limit still holds.
                let readmitted = try await withAdmittedClient(daemon) { (again: EvdConnection) async throws in
                    #expect(try await again.request("ping") == [:])
                    #expect(await refusal(daemon)?.extra["limit"] == "max-connections-per-uid")
                }
                #expect(readmitted)
                for evd in held { #expect(try await evd.request("ping") == [:]) }
            }
        }
    }

    @Test("per uid: the global limit still answers first, naming --max-connections")
    func globalLimitNamed() async throws {
        try await withRunningDaemon(configure: {
            $0.maxSessions = 1
            $0.maxSessionsPerUID = 5
        }) { daemon in
            try await daemon.withClient { first in
                let message = try await refusalOnTheWire(daemon)
                #expect(message["error"]?["code"] == "too_many_connections")
                #expect(message["error"]?["limit"] == "max-connections")
                #expect(message["error"]?["message"]?.stringValue?.contains("--max-connections") == true)
                #expect(try await first.request("ping") == [:])
            }
        }
    }

    @Test(
        "per uid: another uid is served while one uid is at its limit",
        .enabled(
            if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")
                && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"),
            "needs root, setpriv and /usr/bin/python3 to connect as another uid"
        )
    )
    func otherUIDServed() async throws {
        try await withRunningDaemon(configure: {
            $0.maxSessionsPerUID = 1
            $0.socketMode = 0o666
        }) { daemon in
            #expect(chmod(daemon.directory, 0o755) == 0)
            try await daemon.withClient { _ in
                #expect(await refusal(daemon)?.extra["limit"] == "max-connections-per-uid")
                let script = """
                    import socket, sys
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(sys.argv[1])
                    sys.stdout.write(s.makefile("rb").readline().decode())
                    """
                let nobody = try await runProcess(
                    "/usr/bin/setpriv",
                    ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script, daemon.socketPath]
                )
                #expect(nobody.status == 0, "\(nobody.stderr)")
                let hello = try #require(jsonLines(nobody.stdout).first)
                #expect(hello["type"] == "hello")
                #expect(hello["actor"]?["uid"] == 65534)
            }
        }
    }

    @Test("per uid: admission counts each uid apart and a removed session frees its uid's slot")
    func registryCountsPerUID() {
        let registry = SessionRegistry()
        let a1 = registry.admit(uid: 1000, limit: 4, perUIDLimit: 2)
        let a2 = registry.admit(uid: 1000, limit: 4, perUIDLimit: 2)
        #expect(registry.admit(uid: 1000, limit: 4, perUIDLimit: 2) == .failure(.perUID(limit: 2)))
        let b1 = registry.admit(uid: 1001, limit: 4, perUIDLimit: 2)
        let b2 = registry.admit(uid: 1001, limit: 4, perUIDLimit: 2)
        // Four admitted in all: the global limit refuses everyone, whatever their uid.
        #expect(registry.admit(uid: 1002, limit: 4, perUIDLimit: 2) == .failure(.total(limit: 4)))
        for admitted in [a1, a2, b1, b2] { #expect((try? admitted.get()) != nil) }
        registry.remove(try! a1.get())
        #expect(registry.admit(uid: 1001, limit: 4, perUIDLimit: 2) == .failure(.perUID(limit: 2)))
        #expect((try? registry.admit(uid: 1000, limit: 4, perUIDLimit: 2).get()) != nil)
    }

    // MARK: Subscriptions per connection

    @Test("subscriptions: the subscribe beyond --max-subscriptions is bad_request naming it, registers nothing; unsubscribe frees a slot")
    func subscriptionsPerConnection() async throws {
        try await withRunningDaemon(configure: { $0.maxSubscriptions = 2 }) { daemon in
            try await daemon.withClient { evd in
                let plain = try #require(try await evd.request("subscribe", ["events": ["myapp.one"]])["subscription"])
                // A veto subscription is a subscription too.
                _ = try await evd.request("subscribe", ["veto": ["checkout"], "timeout_ms": 1])
                let error = try await evd.expectError("subscribe", ["events": ["myapp.three"]])
                #expect(error.code == "bad_request")
                #expect(error.extra["limit"] == "max-subscriptions")
                #expect(error.extra["max"] == 2)
                #expect(error.message.contains("--max-subscriptions"))
                // Nothing was registered, and the connection goes on.
                #expect(try await daemon.request("stats")["subscriptions"] == 2)
                #expect(try await evd.request("ping") == [:])
                // The limit is per connection: another one has its own.
                try await daemon.withClient { other in
                    _ = try await other.request("subscribe", ["events": ["myapp.one"]])
                    _ = try await other.request("subscribe", ["events": ["myapp.two"]])
                    #expect(try await other.expectError("subscribe", ["events": ["myapp.three"]]).code == "bad_request")
                }
                // Unsubscribing frees a slot: the same subscribe now succeeds and delivers.
                try await evd.request("unsubscribe", ["subscription": plain])
                let third = try await evd.request("subscribe", ["events": ["myapp.three"]])["subscription"]
                #expect(third != nil)
                try await evd.request("emit", ["event": "myapp.three"])
                let event = await evd.nextMessage(ofType: "event")
                #expect(event?["event"] == "myapp.three")
                #expect(event?["subscription"] == third)
                #expect(try await evd.expectError("subscribe", ["events": ["myapp.four"]]).extra["limit"] == "max-subscriptions")
            }
        }
    }

    // MARK: Pending requests per connection

    @Test("pending requests: with room for one, a pipelined burst is read in turns and every request answered in order")
    func pendingRequests() async throws {
        try await withRunningDaemon(configure: { $0.maxPipelinedRequests = 1 }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key)")))
            // Far more than one read of the socket takes (NIO reads at most 64 KiB at a time), so
            // reading pauses and resumes many times.
            let count = 2000
            var lines = ""
            for id in 1...count {
                lines +=
                    id % 10 == 0
                    ? #"{"op":"execute","id":\#(id),"sql":"insert into t(id) values (\#(id))"}"# + "\n"
                    : #"{"op":"ping","id":\#(id)}"# + "\n"
            }
            let (bytes, _) = await plainSocketExchange(
                socketPath: daemon.socketPath,
                send: Array(lines.utf8),
                halfClose: true,
                until: { received in received.reduce(0) { $0 + ($1 == 0x0a ? 1 : 0) } > count }
            )
            let messages = try bytes.split(separator: 0x0a).map { try JSONValue(parsing: Array($0)) }
            #expect(messages.first?["type"] == "hello")
            let responses = messages.dropFirst()
            #expect(responses.map { $0["id"]?.intValue } == (1...count).map { Int64?(Int64($0)) })
            #expect(responses.allSatisfy { $0["ok"] == true })
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[.integer(count / 10)]])
        }
    }

    @Test("pending requests: the inbox reports full at its capacity and calls back once there is room")
    func inboxCapacity() async {
        let inbox = RequestInbox(capacity: 2)
        let rooms = Counter()
        inbox.onRoom { rooms.value.add(1, ordering: .relaxed) }
        #expect(inbox.offer(.request(Session.Request(["op": "ping"]))))
        #expect(!inbox.offer(.request(Session.Request(["op": "ping"]))))  // full: the reader pauses
        #expect(rooms.value.load(ordering: .relaxed) == 0)
        _ = await inbox.pop()
        #expect(rooms.value.load(ordering: .relaxed) == 1)  // room again: the reader resumes
        _ = await inbox.pop()
        #expect(rooms.value.load(ordering: .relaxed) == 1)
    }

    // MARK: Flags

    @Test(
        "flags: an out-of-range limit stops evd from starting, with a message naming the flag",
        arguments: [
            (["--max-connections", "0"], "--max-connections must be at least 1"),
            (["--max-connections-per-uid", "0"], "--max-connections-per-uid must be at least 1"),
            (["--max-connections-per-uid=-3"], "--max-connections-per-uid must be at least 1"),
            (["--max-subscriptions", "0"], "--max-subscriptions must be at least 1"),
            (["--max-pending-requests", "0"], "--max-pending-requests must be between 1 and 65536"),
            (["--max-pending-requests", "65537"], "--max-pending-requests must be between 1 and 65536"),
            (["--max-subscriptions", "lots"], "--max-subscriptions"),
            (["--max-queued-events", "0"], "--max-queued-events must be at least 1"),
            (["--max-queued-bytes", "4096"], "--max-queued-bytes must be at least 65536"),
        ]
    )
    func badFlag(flag: [String], message: String) async throws {
        try await withTemporaryDirectory { directory in
            let result = try await runProcess(
                self.evd,
                ["--socket", directory + "/evd.sock", "--state-dir", directory + "/state"] + flag,
                timeout: 30
            )
            #expect(result.status != 0)
            #expect(result.stderr.contains(message), "\(result.stderr)")
            #expect(!FileManager.default.fileExists(atPath: directory + "/evd.sock"))
        }
    }

    @Test("flags: --max-connections-per-uid, --max-subscriptions and --max-pending-requests reach the daemon")
    func flagsReachTheDaemon() async throws {
        try await withTemporaryDirectory { directory in
            let socket = directory + "/evd.sock"
            let daemon = try Spawned(
                self.evd,
                [
                    "--socket", socket, "--state-dir", directory + "/state", "--db", "main=\(directory)/main.db",
                    "--max-connections-per-uid", "1", "--max-subscriptions", "1", "--max-pending-requests", "1",
                    "--log-level", "error",
                ]
            )
            defer { if daemon.process.isRunning { daemon.process.terminate() } }
            var served = false
            // Bounded wait for the daemon to listen; the first connection made is the test's.
            for _ in 0..<1500 where !served {
                do {
                    try await EvdConnection.withConnection(socketPath: socket) { evd in
                        served = true
                        let refused = await refusalAt(socket)
                        #expect(refused?.code == "too_many_connections")
                        #expect(refused?.extra["limit"] == "max-connections-per-uid")
                        _ = try await evd.request("subscribe", ["events": ["myapp.one"]])
                        let error = try await evd.expectError("subscribe", ["events": ["myapp.two"]])
                        #expect(error.extra["limit"] == "max-subscriptions")
                        // Pipelined on one connection with room for one pending request: all answered.
                        let pongs = try await withThrowingTaskGroup(of: JSONObject.self) { group in
                            for _ in 0..<20 { group.addTask { try await evd.request("ping") } }
                            return try await group.reduce(into: 0) { count, _ in count += 1 }
                        }
                        #expect(pongs == 20)
                    }
                } catch is EvdConnection.ConnectionError where !served {
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
            #expect(served)
            daemon.process.terminate()
            let result = try await daemon.finish()
            #expect(result.status == 0, "\(result.stderr)")
        }
    }

    // MARK: Queued events

    @Test("queued events: with a small --max-queued-events, a subscriber that never reads lags out of a burst the default queue holds")
    func smallQueueLagsSooner() async throws {
        // Fewer events than the default 10,000 per subscription, and about 3 MB: under the default
        // 16 MiB. With 10 queued events allowed, the socket's buffers (a few hundred KB) take a few
        // hundred of these and the queue the next ten: the burst must overflow it.
        let burst = 3000
        let roomy = try await self.laggedDisconnects(flags: [], burst: burst)
        #expect(roomy == 0)
        let small = try await self.laggedDisconnects(flags: ["--max-queued-events", "10"], burst: burst)
        #expect(small == 1)
    }

    /// Runs the evd binary with `flags`, subscribes a connection that never reads to `myapp.*`,
    /// emits `burst` events of about 1 KiB from another, and returns `stats.lagged_disconnects`.
    /// (An overflow is counted as the event is queued, before its emit is answered.)
    private func laggedDisconnects(flags: [String], burst: Int) async throws -> Int64? {
        try await self.withSpawnedDaemon(flags) { socket in
            let stuck = try RawUnixSocket(path: socket, receiveBuffer: 4096)
            defer { stuck.close() }
            try stuck.send(#"{"op":"subscribe","events":["myapp.*"]}"# + "\n")
            return try await EvdConnection.withConnection(socketPath: socket) { evd in
                var subscribed = false
                for _ in 0..<1000 where !subscribed {
                    subscribed = try await evd.request("stats")["subscriptions"] == 1
                    if !subscribed { try await Task.sleep(for: .milliseconds(10)) }
                }
                try #require(subscribed, "the stuck subscriber's subscribe never registered")
                let padding = JSONValue.string(String(repeating: "x", count: 1000))
                try await runWithDeadline(seconds: 120, "\(burst) emits beside a stuck subscriber") {
                    for n in 0..<burst {
                        try await evd.request("emit", ["event": "myapp.tick", "data": ["n": .integer(n), "padding": padding]])
                    }
                }
                return try await evd.request("stats")["lagged_disconnects"]?.intValue
            }
        }
    }

    /// Runs the evd binary with `flags` on a fresh directory while `body` gets its socket path,
    /// then stops it with SIGTERM and expects a clean exit.
    private func withSpawnedDaemon<T: Sendable>(_ flags: [String], _ body: (String) async throws -> T) async throws -> T {
        try await withTemporaryDirectory { directory in
            let socket = directory + "/evd.sock"
            let daemon = try Spawned(
                self.evd,
                ["--socket", socket, "--state-dir", directory + "/state", "--db", "main=\(directory)/main.db", "--log-level", "error"]
                    + flags
            )
            defer { if daemon.process.isRunning { daemon.process.terminate() } }
            // Bounded wait for the daemon to listen.
            var listening = false
            for _ in 0..<1500 where !listening {
                do {
                    try await EvdConnection.withConnection(socketPath: socket) { _ in }
                    listening = true
                } catch is EvdConnection.ConnectionError {
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
            try #require(listening, "evd \(flags) did not start listening")
            let result = try await body(socket)
            daemon.process.terminate()
            let exit = try await daemon.finish()
            #expect(exit.status == 0, "\(exit.stderr)")
            return result
        }
    }
}

/// A counter a `@Sendable` callback can bump.
private final class Counter: Sendable {
    let value = Atomic<Int>(0)
}

/// Opens `count` connections, one inside the other, and runs `body` with them all open.
private func withClients<T: Sendable>(
    _ daemon: RunningDaemon,
    count: Int,
    _ body: ([EvdConnection]) async throws -> T
) async throws -> T {
    guard count > 0 else { return try await body([]) }
    return try await daemon.withClient { first in
        try await withClients(daemon, count: count - 1) { rest in try await body([first] + rest) }
    }
}

/// Connects until the daemon admits the connection, then runs `body`; `false` if never admitted.
/// A closed session frees its slot a moment after the client closes, so the first tries may be
/// refused; the wait is bounded.
private func withAdmittedClient(
    _ daemon: RunningDaemon,
    _ body: (EvdConnection) async throws -> Void
) async throws -> Bool {
    for _ in 0..<500 {
        do {
            try await daemon.withClient(body)
            return true
        } catch let error as EvdError where error.code == "too_many_connections" {
            try await Task.sleep(for: .milliseconds(20))
        }
    }
    return false
}

/// The error of a connection the daemon refuses, or `nil` if it is admitted.
private func refusal(_ daemon: RunningDaemon) async -> EvdError? {
    await refusalAt(daemon.socketPath)
}

private func refusalAt(_ socketPath: String) async -> EvdError? {
    do {
        try await EvdConnection.withConnection(socketPath: socketPath) { _ in }
        return nil
    } catch {
        return error as? EvdError
    }
}

/// Connects with a plain socket and returns the one message a refused connection gets, checking
/// the wire: a response with id null and no hello, then EOF.
private func refusalOnTheWire(_ daemon: RunningDaemon) async throws -> JSONValue {
    let (bytes, sawEOF) = await plainSocketExchange(socketPath: daemon.socketPath, send: [], halfClose: false)
    #expect(sawEOF)
    let lines = bytes.split(separator: 0x0a)
    #expect(lines.count == 1)
    let message = try JSONValue(parsing: Array(try #require(lines.first)))
    #expect(message["type"] == "response")
    #expect(message["id"] == .null)
    #expect(message["ok"] == false)
    return message
}
