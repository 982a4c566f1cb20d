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

/// Clients that misbehave or crowd in: the daemon keeps its promises (PROTOCOL.md §3, §5) and keeps serving.
@Suite("Robustness")
struct RobustnessTests {
    /// Small queues, so that a subscriber falls behind after a few hundred events.
    static let smallOutbox: @Sendable (inout EvdConfiguration) -> Void = {
        $0.outboxLimits = OutboxLimits(maxEventsPerSubscription: 100, maxBytes: 64 << 10)
    }

    @Test("a session that disconnects inside a transaction has it rolled back")
    func disconnectRollsBack() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": "create table t(id integer primary key, v text)"])
            try await daemon.withClient { listener in
                try await subscribeEvents(listener, ["reset", "checkin", "commit", "rollback"])
                let session = try await daemon.withClient { evd in
                    try await evd.request("begin")
                    let inserted = try await evd.request("execute", ["sql": "insert into t(v) values ('lost')"])
                    #expect(inserted["changes"] == 1)
                    return evd.hello["session"]
                }
                let events = try await collectEvents(listener, until: "checkin")
                #expect(eventNames(events) == ["reset", "checkin"])
                #expect(events.first?["rolled_back"] == true)
                #expect(events.first?["session"] == session)
                #expect(events.last?["session"] == session)
            }
            let rows = try await daemon.request("execute", ["sql": "select count(*) from t"])
            #expect(rows["rows"] == [[0]])
            // The connection went back clean: a new transaction on it works and commits.
            try await daemon.withClient { evd in
                try await evd.request("begin")
                try await evd.request("execute", ["sql": "insert into t(v) values ('kept')"])
                try await evd.request("commit")
            }
            let after = try await daemon.request("execute", ["sql": "select v from t"])
            #expect(after["rows"] == [["kept"]])
        }
    }

    @Test("50 concurrent writer sessions all succeed and every row is there")
    func concurrentWriters() async throws {
        let writers = 50
        let rowsEach = 20
        // Seventeen of the writers hold the write lock across 21 round trips each; on a loaded
        // two-core machine the others can wait longer than the default 5 s busy timeout, and this
        // test is about everyone succeeding, not about the timeout.
        try await withRunningDaemon(configure: { $0.busyTimeoutMs = 60_000 }) { daemon in
            try await daemon.request(
                "execute",
                ["sql": "create table t(id integer primary key, writer integer, n integer)"]
            )
            let failures = try await runWithDeadline(seconds: 120, "50 writers") {
                try await withThrowingTaskGroup(of: [String].self) { group in
                    for writer in 0..<writers {
                        group.addTask {
                            try await daemon.withClient { evd in
                                var failures: [String] = []
                                let explicit = writer % 3 == 0
                                do {
                                    if explicit { try await evd.request("begin") }
                                    for n in 0..<rowsEach {
                                        let result = try await evd.request(
                                            "execute",
                                            [
                                                "sql": "insert into t(writer, n) values (?, ?)",
                                                "params": [.integer(writer), .integer(n)],
                                            ]
                                        )
                                        if result["changes"] != 1 { failures.append("writer \(writer): \(result)") }
                                    }
                                    if explicit { try await evd.request("commit") }
                                } catch {
                                    failures.append("writer \(writer): \(error)")
                                }
                                return failures
                            }
                        }
                    }
                    var all: [String] = []
                    for try await failures in group { all += failures }
                    return all
                }
            }
            #expect(failures == [])
            let count = try await daemon.request("execute", ["sql": "select count(*) from t"])
            #expect(count["rows"] == [[.integer(writers * rowsEach)]])
            let perWriterSQL = "select count(*), min(c), max(c) from (select writer, count(*) c from t group by writer)"
            let perWriter = try await daemon.request("execute", ["sql": .string(perWriterSQL)])
            #expect(perWriter["rows"] == [[.integer(writers), .integer(rowsEach), .integer(rowsEach)]])
            let stats = try await daemon.request("stats")
            #expect(stats["pools"]?["main"]?["in_use"] == 0)
        }
    }

    @Test("a subscriber that never reads slows nobody: thousands of inserts finish, it lags out")
    func nonReadingSubscriber() async throws {
        try await withRunningDaemon(configure: Self.smallOutbox) { daemon in
            let raw = try RawUnixSocket(path: daemon.socketPath, receiveBuffer: 4096)
            defer { raw.close() }
            try raw.send(#"{"op":"subscribe","events":["*"]}"# + "\n")
            try await waitUntilStats(daemon, "the raw subscription") { $0["subscriptions"] == 1 }

            let inserts = 2000
            try await runWithDeadline(seconds: 120, "\(inserts) inserts beside a stuck subscriber") {
                try await daemon.withClient { evd in
                    try await evd.request("execute", ["sql": "create table t(id integer primary key, v integer)"])
                    for n in 0..<inserts {
                        try await evd.request(
                            "execute",
                            ["sql": "insert into t(v) values (?)", "params": [.integer(n)]]
                        )
                    }
                }
            }
            let stats = try await daemon.request("stats")
            #expect(stats["lagged_disconnects"] == 1)
            #expect((stats["drops"]?.intValue ?? 0) >= 1)
            // Still serving new clients.
            try await daemon.withClient { evd in
                #expect(try await evd.request("ping") == [:])
                let count = try await evd.request("execute", ["sql": "select count(*) from t"])
                #expect(count["rows"] == [[.integer(inserts)]])
            }
            // The lagged connection is closed even though its peer still does not read.
            try await waitUntilStats(daemon, "the lagged session to end") {
                $0["sessions"]?["current"] == 1 && $0["subscriptions"] == 0
            }
        }
    }

    /// After a lagged disconnect the notice is the last thing written before the close; a close
    /// that did not wait for earlier writes dropped it (and the events before it) whenever the
    /// outbox drained while they still waited for a slow reader's socket. One UPDATE of many rows
    /// overruns the default queue at once, with much written but not yet read.
    @Test("a slow reader that lags out gets every event up to last_seq and the notice before the connection ends")
    func laggedNoticeReachesASlowReader() async throws {
        try await withRunningDaemon { daemon in
            let rows = 40_000
            try await daemon.request("execute", ["sql": "create table big(id integer primary key, v integer)"])
            try await daemon.request(
                "execute",
                [
                    "sql": .string(
                        "insert into big with recursive c(x) as (select 1 union all select x + 1 from c where x < \(rows)) select x, 0 from c"
                    )
                ]
            )
            let raw = try RawUnixSocket(path: daemon.socketPath, receiveBuffer: 4096)
            defer { raw.close() }
            try raw.send(#"{"op":"subscribe","events":["update-row"]}"# + "\n")
            try await waitUntilStats(daemon, "the raw subscription") { $0["subscriptions"] == 1 }
            // Reads throughout, slower than the UPDATE makes events.
            let reader = Task.detached { raw.receiveSlowly(chunk: 8192, pauseMicroseconds: 500, seconds: 60) }
            try await daemon.request("execute", ["sql": "update big set v = v + 1"])
            let bytes = await reader.value
            let lines = bytes.split(separator: 0x0a)
            let messages = try lines.map { line in try #require(try JSONValue(parsing: Array(line)).objectValue) }
            let notice = try #require(messages.last)
            #expect(notice["type"] == "notice" && notice["code"] == "lagged", "the last message: \(notice)")
            let seqs = messages.filter { $0["type"] == "event" }.compactMap { $0["seq"]?.intValue }
            if let last = seqs.last {
                #expect(notice["last_seq"] == .int(last))
            } else {
                // On a loaded machine the queue can overflow before the event loop wrote a single
                // event: the notice then names a seq from before the UPDATE's first event (other
                // events, such as connections' login and logout, may lie between), which a replay
                // of update-row from the start shows.
                let first = try await daemon.withClient { evd -> Int64 in
                    try await evd.request("subscribe", ["events": ["update-row"], "since": 0])
                    let event = try #require(await evd.nextMessage(ofType: "event", within: 10))
                    return try #require(event["seq"]?.intValue)
                }
                #expect((notice["last_seq"]?.intValue ?? .max) < first)
            }
            #expect(zip(seqs, seqs.dropFirst()).allSatisfy { $0 + 1 == $1 }, "events up to last_seq arrive with no hole")
        }
    }

    @Test("a lagging subscriber gets notice lagged with last_seq, the last event it received, then the connection ends")
    func laggedNotice() async throws {
        try await withRunningDaemon(configure: Self.smallOutbox) { daemon in
            try await EvdConnection.withConnection(socketPath: daemon.socketPath, messageCapacity: 1) { listener in
                let (subscription, head) = try await subscribeEvents(listener, ["*"])
                try await floodUntil(daemon, "a lagged disconnect") { $0["lagged_disconnects"] == 1 }

                let messages = try await runWithDeadline(seconds: 60, "reading the backlog") {
                    var messages: [JSONObject] = []
                    while let message = await listener.nextMessage() { messages.append(message) }
                    return messages
                }
                let notice = try #require(messages.last)
                let events = messages.dropLast()
                #expect(events.allSatisfy { $0["type"] == "event" })
                #expect(notice["type"] == "notice")
                #expect(notice["code"] == "lagged")
                #expect(notice["subscription"] == .int(subscription))
                let seqs = events.map { $0["seq"]?.intValue ?? -1 }
                #expect(!seqs.isEmpty)
                #expect(notice["last_seq"] == .int(seqs.last ?? -1))
                // Everything up to last_seq arrived, in order, with no hole.
                #expect(seqs == Array((head + 1)..<(head + 1 + Int64(seqs.count))))
                #expect(Set(notice.keys) == ["type", "code", "subscription", "last_seq"])
            }
            #expect(try await daemon.request("ping") == [:])
        }
    }

    @Test("on_overflow drop: later a notice lagged with dropped, from and to; the connection stays open")
    func droppedNotice() async throws {
        try await withRunningDaemon(configure: Self.smallOutbox) { daemon in
            try await EvdConnection.withConnection(socketPath: daemon.socketPath, messageCapacity: 1) { listener in
                let (subscription, head) = try await subscribeEvents(listener, ["*"], ["on_overflow": "drop"])
                try await floodUntil(daemon, "a drop") { ($0["drops"]?.intValue ?? 0) >= 1 }

                // Read the backlog while new events keep coming, until the notice and the event after it.
                let done = RobustnessFlag()
                let messages = try await runWithDeadline(seconds: 60, "the lagged notice") {
                    try await withThrowingTaskGroup(of: [JSONObject].self) { group in
                        group.addTask {
                            defer { done.set() }
                            var messages: [JSONObject] = []
                            var noticed = false
                            while let message = await listener.nextMessage() {
                                messages.append(message)
                                if message["type"] == "notice" { noticed = true } else if noticed { break }
                            }
                            return messages
                        }
                        group.addTask {
                            try await daemon.withClient { evd in
                                while !done.isSet {
                                    try await evd.request("execute", ["sql": "select 1"])
                                }
                            }
                            return []
                        }
                        var collected: [JSONObject] = []
                        for try await messages in group { collected += messages }
                        return collected
                    }
                }
                let noticeIndex = try #require(messages.firstIndex { $0["type"] == "notice" })
                let notice = messages[noticeIndex]
                #expect(notice["code"] == "lagged")
                #expect(notice["subscription"] == .int(subscription))
                #expect(Set(notice.keys) == ["type", "code", "subscription", "dropped", "from", "to"])
                let from = try #require(notice["from"]?.intValue)
                let to = try #require(notice["to"]?.intValue)
                #expect(notice["dropped"] == .int(to - from + 1))
                // Received and dropped seqs together are every seq since the subscription, once each.
                let before = messages[..<noticeIndex].map { $0["seq"]?.intValue ?? -1 }
                #expect(before == Array((head + 1)..<from))
                #expect(messages.last?["type"] == "event")
                #expect(messages.last?["seq"] == .int(to + 1))
                #expect(messages.count == noticeIndex + 2)

                // The connection is still open. (Its responses queue behind the unread events, so
                // keep reading those meanwhile.)
                let stats = try await runWithDeadline(seconds: 30, "requests after the drop") {
                    try await withThrowingTaskGroup(of: JSONObject.self) { group in
                        group.addTask {
                            while await listener.nextMessage() != nil {}
                            return [:]
                        }
                        #expect(try await listener.request("ping") == [:])
                        let stats = try await listener.request("stats")
                        group.cancelAll()
                        return stats
                    }
                }
                #expect(stats["lagged_disconnects"] == 0)
                #expect((stats["drops"]?.intValue ?? 0) >= to - from + 1)
                #expect(stats["subscriptions"] == 1)
            }
        }
    }

    @Test("clients vanishing mid-request leave the daemon serving; an open transaction of theirs rolls back")
    func vanishingClients() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": "create table t(id integer primary key, v integer)"])
            try await runWithDeadline(seconds: 60, "vanishing clients") {
                for n in 0..<20 {
                    let raw = try RawUnixSocket(path: daemon.socketPath)
                    let request: String
                    if n % 2 == 0 {
                        request = #"{"op":"execute","id":1,"sql":"insert into t(v) values (1)"}"# + "\n"
                    } else {
                        request =
                            #"{"op":"begin","id":1}"# + "\n"
                            + #"{"op":"execute","id":2,"sql":"insert into t(v) values (2)"}"# + "\n"
                            + #"{"op":"execute","id":3,"sql":"select * from t, t, t, t, t"}"# + "\n"
                    }
                    try raw.send(request)
                    raw.close()
                }
            }
            try await waitUntilStats(daemon, "the vanished sessions to end") {
                $0["sessions"]?["current"] == 1 && $0["pools"]?["main"]?["in_use"] == 0
            }
            try await daemon.withClient { evd in
                let uncommitted = try await evd.request("execute", ["sql": "select count(*) from t where v = 2"])
                #expect(uncommitted["rows"] == [[0]])
                let inserted = try await evd.request("execute", ["sql": "insert into t(v) values (3)"])
                #expect(inserted["changes"] == 1)
                try await evd.request("begin")
                try await evd.request("execute", ["sql": "insert into t(v) values (4)"])
                try await evd.request("commit")
                let kept = try await evd.request("execute", ["sql": "select count(*) from t where v in (3, 4)"])
                #expect(kept["rows"] == [[2]])
            }
        }
    }

    @Test("shutdown completes while a subscriber that never reads is still connected")
    func shutdownWithStuckSubscriber() async throws {
        // The socket outlives the daemon: it is open, and unread, through the whole shutdown.
        let raw = try await runWithDeadline(seconds: 60, "a daemon with a stuck subscriber to stop") {
            try await withRunningDaemon(configure: { $0.shutdownGraceMs = 500 }) { daemon in
                let raw = try RawUnixSocket(path: daemon.socketPath, receiveBuffer: 4096)
                try raw.send(#"{"op":"subscribe","events":["*"],"on_overflow":"drop"}"# + "\n")
                try await waitUntilStats(daemon, "the raw subscription") { $0["subscriptions"] == 1 }
                try await daemon.withClient { evd in
                    try await evd.request("execute", ["sql": "create table t(id integer primary key, v text)"])
                    let blob = String(repeating: "x", count: 4000)
                    for _ in 0..<200 {
                        try await evd.request(
                            "execute",
                            ["sql": "insert into t(v) values (?)", "params": [.string(blob)]]
                        )
                    }
                }
                return raw
            }
        }
        raw.close()
    }

    /// Requests run on the database threads, one per pooled connection and two more
    /// (`DatabaseThreads`); a thread blocks while its SQLite work waits for the write lock. With
    /// every other connection waiting, the lock holder must still commit and everyone else be served.
    @Test("while every other pooled connection waits for the write lock, other sessions are served and the holder commits")
    func blockedConnectionsDoNotStarveOthers() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 3 }) { daemon in
            try await daemon.request("execute", ["sql": "create table t(x)"])
            try await daemon.withClient { holder in
                try await holder.request("begin")
                try await holder.request("execute", ["sql": "insert into t values (0)"])
                try await withThrowingTaskGroup(of: Void.self) { group in
                    // The two other connections wait for the lock (up to 120 s: a loaded run is slow) on their threads.
                    // (Not as one commit group, which would wait on one connection, the other request queued.)
                    for value in 1...2 {
                        group.addTask {
                            try await daemon.withClient { waiter in
                                try await waiter.request(
                                    "execution_options",
                                    ["options": ["busy_timeout_ms": 120_000, "group_commit": false]]
                                )
                                try await waiter.request("execute", ["sql": "insert into t values (?)", "params": [.integer(value)]])
                            }
                        }
                    }
                    try await waitUntilStats(daemon, "both waiters to hold a connection") {
                        $0["pools"]?["main"]?["in_use"]?.intValue == 3
                    }
                    // Requests that need no connection are answered meanwhile, from other sessions.
                    for _ in 0..<20 { #expect(try await daemon.request("ping") == [:]) }
                    try await holder.request("commit")
                    try await group.waitForAll()
                }
                #expect(try await holder.request("execute", ["sql": "select x from t order by x"])["rows"] == [[0], [1], [2]])
            }
        }
    }
}

// MARK: Helpers

/// Polls `stats` (on fresh connections) until `condition` holds; fails the test after `seconds`.
func waitUntilStats(
    _ daemon: RunningDaemon,
    _ what: String,
    within seconds: Double = 20,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ condition: (JSONObject) -> Bool
) async throws {
    let deadline = ContinuousClock.now + .seconds(seconds)
    var stats: JSONObject = [:]
    while ContinuousClock.now < deadline {
        stats = try await daemon.request("stats")
        if condition(stats) { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    Issue.record("waited \(seconds)s for \(what); stats: \(JSONValue.object(stats))", sourceLocation: sourceLocation)
    throw DeadlineExceeded(description: "waiting for \(what)")
}

/// Runs lone inserts (each fires a dozen events) until `stats` satisfies `condition`, at most 20000 requests.
func floodUntil(
    _ daemon: RunningDaemon,
    _ what: String,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ condition: @escaping @Sendable (JSONObject) -> Bool
) async throws {
    let reached = try await runWithDeadline(seconds: 120, "flooding until \(what)") {
        try await daemon.withClient { evd in
            try await evd.request(
                "execute",
                ["sql": "create table if not exists flood(id integer primary key, v text)"]
            )
            for round in 0..<20_000 {
                try await evd.request("execute", ["sql": "insert into flood(v) values ('some text to make it longer')"])
                if round % 20 == 19, condition(try await evd.request("stats")) { return true }
            }
            return false
        }
    }
    #expect(reached, "20000 requests never caused \(what)", sourceLocation: sourceLocation)
}

/// A flag one task raises and another polls.
final class RobustnessFlag: Sendable {
    private let raised = Atomic<Bool>(false)
    var isSet: Bool { self.raised.load(ordering: .relaxed) }
    func set() { self.raised.store(true, ordering: .relaxed) }
}

/// A bare Unix stream socket, for peers the client library would never be: ones that never read,
/// or vanish mid-request.
final class RawUnixSocket: Sendable {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    private let fd: Int32
    private let closed = Atomic<Bool>(false)

    /// Connects to `path`; `receiveBuffer` shrinks `SO_RCVBUF` so that the socket fills up sooner.
    init(path: String, receiveBuffer: Int32? = nil) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        if var size = receiveBuffer {
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        let connected = connectUnixSocket(fd, to: path)
        guard connected == 0 else {
            let reason = String(cString: strerror(errno))
            Glibc.close(fd)
            throw Failure(description: "connect \(path): \(reason)")
        }
        self.fd = fd
    }

    /// Writes all of `text`.
    func send(_ text: String) throws {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let written = bytes.withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard written > 0 else { throw Failure(description: "send: \(String(cString: strerror(errno)))") }
            bytes = bytes.dropFirst(written)
        }
    }

    /// Reads until the daemon closes the connection (or `seconds` pass), `chunk` bytes at a time
    /// with a pause after each: a slow reader. Blocks: call it off the cooperative pool.
    func receiveSlowly(chunk: Int, pauseMicroseconds: UInt32, seconds: Double) -> [UInt8] {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: chunk)
        while ContinuousClock.now < deadline {
            var poll = pollfd(fd: self.fd, events: Int16(POLLIN), revents: 0)
            guard Glibc.poll(&poll, 1, 100) >= 0 else { break }
            if poll.revents == 0 { continue }
            let count = buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            received += buffer[..<count]
            usleep(pauseMicroseconds)
        }
        return received
    }

    /// Closes the socket (once).
    func close() {
        if !self.closed.exchange(true, ordering: .relaxed) { Glibc.close(self.fd) }
    }

    deinit { self.close() }
}
