import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// A client that reads the daemon's lines as bytes: to compare a replay with live delivery byte
/// for byte (the client library hands out parsed objects). Its reads block, so they run on a
/// thread of their own (`offPool`): the daemon runs in this process, on the same cooperative
/// threads as the tests.
///
/// `@unchecked Sendable`: one test uses it, one call at a time. (Also used by FramingTests.)
final class LineClient: @unchecked Sendable {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    private let fd: Int32
    private var buffer: [UInt8] = []
    /// Where the unread part of `buffer` starts.
    private var start = 0
    /// The lines read, for a failure's message.
    private(set) var seen = 0

    init(path: String) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: \(String(cString: strerror(errno)))") }
        guard connectUnixSocket(fd, to: path) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw Failure(description: "connect \(path): \(reason)")
        }
        self.fd = fd
    }

    deinit { close(self.fd) }

    func send(_ message: JSONValue) throws {
        var bytes = message.jsonBytes + [0x0a]
        while !bytes.isEmpty {
            let written = bytes.withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard written > 0 else { throw Failure(description: "send: \(String(cString: strerror(errno)))") }
            bytes.removeFirst(written)
        }
    }

    /// Runs blocking reads off the cooperative thread pool.
    private func offPool<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            DispatchQueue.global().async { continuation.resume(returning: body()) }
        }
    }

    /// The next line, without its newline; `nil` when none comes within `seconds`.
    func nextLine(within seconds: Double = 20) async -> [UInt8]? {
        await self.offPool { self.blockingNextLine(within: seconds) }
    }

    private func blockingNextLine(within seconds: Double) -> [UInt8]? {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while true {
            if let end = self.buffer[self.start...].firstIndex(of: 0x0a) {
                let line = Array(self.buffer[self.start..<end])
                self.start = end + 1
                self.seen += 1
                return line
            }
            self.buffer.removeSubrange(..<self.start)
            self.start = 0
            let left = deadline - .now
            guard left > .zero else { return nil }
            var poll = pollfd(fd: self.fd, events: Int16(POLLIN), revents: 0)
            let milliseconds = Int32(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000)
            guard Glibc.poll(&poll, 1, max(1, milliseconds)) > 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            let count = chunk.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { return nil }
            self.buffer += chunk[..<count]
        }
    }

    /// Reads lines until one is the response; returns its object.
    func response() async throws -> JSONObject {
        let line = await self.offPool { () -> [UInt8]? in
            while let line = self.blockingNextLine(within: 20) {
                if line.starts(with: Array(#"{"type":"response""#.utf8)) { return line }
            }
            return nil
        }
        guard let line, let object = try JSONValue(parsing: line).objectValue else {
            throw Failure(description: "no response after \(self.seen) lines")
        }
        return object
    }

    /// Subscribes with `arguments`; returns the response's `seq`.
    func subscribe(_ arguments: JSONObject) async throws -> Int64 {
        var request = arguments
        request["op"] = "subscribe"
        request["id"] = 1
        try self.send(.object(request))
        let response = try await self.response()
        guard response["ok"] == true, let seq = response["result"]?["seq"]?.intValue else {
            throw Failure(description: "subscribe failed: \(response)")
        }
        return seq
    }

    /// The next `count` event lines (fewer if none comes for `seconds`).
    func events(_ count: Int, within seconds: Double = 20) async -> [[UInt8]] {
        await self.offPool {
            var lines: [[UInt8]] = []
            while lines.count < count, let line = self.blockingNextLine(within: seconds) {
                if line.starts(with: Array(#"{"type":"event""#.utf8)) { lines.append(line) }
            }
            return lines
        }
    }
}

/// A line with its subscription number taken out: what a replay must reproduce byte for byte.
private func withoutSubscription(_ line: [UInt8]) -> [UInt8] {
    let key = Array(#","subscription":"#.utf8)
    guard let start = (0...(line.count - key.count)).first(where: { line[$0..<($0 + key.count)].elementsEqual(key) }) else {
        return line
    }
    var end = start + key.count
    while end < line.count, line[end] >= UInt8(ascii: "0"), line[end] <= UInt8(ascii: "9") { end += 1 }
    return Array(line[..<start] + line[end...])
}

/// The first line that differs between `replayed` and `delivered`, apart from the subscription
/// number, and whether their counts match.
private func firstDifference(_ replayed: [[UInt8]], _ delivered: [[UInt8]]) -> String? {
    if replayed.count != delivered.count { return "replayed \(replayed.count) lines, delivered \(delivered.count)" }
    for (index, (a, b)) in zip(replayed, delivered).enumerated() where withoutSubscription(a) != withoutSubscription(b) {
        return "line \(index): replayed \(String(decoding: a, as: UTF8.self)), delivered \(String(decoding: b, as: UTF8.self))"
    }
    return nil
}

@Suite("Journal runs")
struct JournalRunTests {
    @Test("a replay writes every event byte for byte as live delivery did, plain, with rows and with where, also after a restart")
    func replayIsByteIdentical() async throws {
        let events: JSONValue = ["update-row", "delete-row", "insert-rows", "create-table", "alter-table"]
        let subscriptions: [JSONObject] = [
            ["events": events], ["events": events, "rows": true], ["events": events, "rows": true, "where": ["table": "t"]],
        ]
        try await withTemporaryDirectory { directory in
            let configure: @Sendable (inout EvdConfiguration) -> Void = { $0.outboxLimits.maxEventsPerSubscription = 100_000 }
            let (delivered, head) = try await withDaemon(in: directory, configure: configure) { daemon, _ in
                try await daemon.request(
                    .execute(.init(sql: "create table t(id integer primary key, n integer, r real, s text, b blob, z)"))
                )
                try await daemon.request(.execute(.init(sql: "create table u(a text, b integer, primary key (a, b)) without rowid")))
                let clients = try subscriptions.map { _ in try LineClient(path: daemon.socketPath) }
                var head: Int64 = 0
                for (client, arguments) in zip(clients, subscriptions) { head = try await client.subscribe(arguments) }
                // Values of every kind, text that needs escaping and text that is not ASCII.
                try await daemon.request(
                    "execute",
                    [
                        "sql": """
                        insert into t values (1, -5, 0.1, 'plain', x'00ff', null),
                          (2, 9223372036854775806, -0.0, 'é "quoted" \\ back', x'', 1.5),
                          (3, -9223372036854775808, 1e300, 'line' || char(10) || 'break' || char(9, 1) || '中文', null, 'text');
                        insert into t(id, n, r, s) with recursive c(x) as (select 4 union all select x + 1 from c where x < 3000)
                          select x, x * 7, x / 3.0, 'row ' || x from c
                        """
                    ]
                )
                // One transaction: runs of several tables, a schema change between two updates of
                // one table (its images change columns), deletes, a new table.
                try await daemon.request(
                    "execute",
                    [
                        "sql": """
                        update t set n = n + 1, s = s || '!'; insert into u values ('x', 1), ('y', 2); update u set b = b * 10;
                        alter table t add column w; update t set w = id where id <= 10; delete from t where id % 500 = 0;
                        create table v(x)
                        """
                    ]
                )
                let expected = 2 + 3000 + 1 + 2 + 1 + 10 + 6 + 1
                let plain = await clients[0].events(expected)
                let rows = await clients[1].events(expected)
                #expect(plain.count == expected && rows.count == expected)
                let aboutT = plain.filter { (try? JSONValue(parsing: $0))?["table"] == "t" }.count
                let filtered = await clients[2].events(aboutT)
                #expect(filtered.count == aboutT)
                // The images, as JSON.
                let parsed = rows.compactMap { try? JSONValue(parsing: $0) }
                let first = try #require(parsed.first { $0["event"] == "update-row" && $0["pks"] == [1] })
                #expect(first["before"]?["s"] == "plain" && first["after"]?["s"] == "plain!")
                #expect(first["after"]?["b"] == ["$base64": "AP8="] && first["after"]?["r"] == 0.1 && first["after"]?["z"] == .null)
                let second = try #require(parsed.first { $0["event"] == "update-row" && $0["pks"] == [2] })
                #expect(second["after"]?["n"] == .int(Int64.max) && second["after"]?["s"] == "é \"quoted\" \\ back!")
                let widened = try #require(parsed.last { $0["event"] == "update-row" && $0["pks"] == [10] })
                #expect(widened["before"]?["w"] == .null && widened["after"]?["w"] == 10)
                let deleted = try #require(parsed.first { $0["event"] == "delete-row" })
                #expect(deleted["pks"] == [500] && deleted["before"]?["w"] == .null && deleted["after"] == nil)
                let inserted = try #require(parsed.first { $0["event"] == "insert-rows" && $0["table"] == "u" })
                #expect(inserted["rows"] == [["a": "x", "b": 1], ["a": "y", "b": 2]])
                // stats counts every journaled event of the database, a run's too.
                let stats = try await daemon.request("stats")
                let main = stats["journal"]?["sources"]?.arrayValue?.first { $0["database"] == "main" }
                #expect(main?["events"] == .integer(expected + 2))
                // Replayed now.
                for (index, arguments) in subscriptions.enumerated() {
                    let client = try LineClient(path: daemon.socketPath)
                    var arguments = arguments
                    arguments["since"] = .int(head)
                    _ = try await client.subscribe(arguments)
                    let live = [plain, rows, filtered][index]
                    let difference = firstDifference(await client.events(live.count), live)
                    #expect(difference == nil, "\(arguments): \(difference ?? "")")
                }
                return ([plain, rows, filtered], head)
            }
            // And after a restart, from the journal on disk.
            try await withDaemon(in: directory, configure: configure) { daemon, _ in
                for (index, arguments) in subscriptions.enumerated() {
                    let client = try LineClient(path: daemon.socketPath)
                    var arguments = arguments
                    arguments["since"] = .int(head)
                    _ = try await client.subscribe(arguments)
                    let difference = firstDifference(await client.events(delivered[index].count), delivered[index])
                    #expect(difference == nil, "after a restart, \(arguments): \(difference ?? "")")
                }
            }
        }
    }

    @Test("a replay that starts inside a run, and pages that end inside one, give every event once in order")
    func replayInsideRuns() async throws {
        let rows = 3 * Journal.maxRunEvents + 100
        try await withRunningDaemon(configure: { $0.outboxLimits.maxEventsPerSubscription = 100_000 }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, n integer)")))
            try await daemon.request(
                "execute",
                [
                    "sql": .string(
                        "insert into t(id, n) with recursive c(x) as (select 1 union all select x + 1 from c where x < \(rows)) select x, 0 from c"
                    )
                ]
            )
            let client = try LineClient(path: daemon.socketPath)
            _ = try await client.subscribe(["events": ["update-row"]])
            try await daemon.request(.execute(.init(sql: "update t set n = n + 1")))
            let live = await client.events(rows)
            #expect(live.count == rows)
            let seqs = live.compactMap { (try? JSONValue(parsing: $0))?["seq"]?.intValue }
            #expect(seqs == Array(seqs[0]..<(seqs[0] + Int64(rows))))
            // From the middle of the first run, and of a later one: the rest, in order.
            for skip in [1, 17, Journal.maxRunEvents + 5] {
                let replay = try LineClient(path: daemon.socketPath)
                _ = try await replay.subscribe(["events": ["update-row"], "since": .int(seqs[skip - 1])])
                let difference = firstDifference(await replay.events(rows - skip), Array(live[skip...]))
                #expect(difference == nil, "since the seq of event \(skip - 1): \(difference ?? "")")
            }
        }
    }

    @Test("retention keeps the newest events of a run it cuts: a replay from before gets notice gap, then the rest of the run")
    func retentionCutsARun() async throws {
        let rows = 1000
        try await withRunningDaemon(configure: {
            $0.journal.keepEvents = 100
            $0.journal.pruneIntervalMs = 20
        }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, n integer)")))
            try await daemon.request(
                "execute",
                [
                    "sql": .string(
                        "insert into t(id, n) with recursive c(x) as (select 1 union all select x + 1 from c where x < \(rows)) select x, 0 from c"
                    )
                ]
            )
            try await daemon.request(.execute(.init(sql: "update t set n = n + 1")))
            let deadline = ContinuousClock.now + .seconds(30)
            var checked = false
            while !checked && ContinuousClock.now < deadline {
                let client = try LineClient(path: daemon.socketPath)
                _ = try await client.subscribe(["events": ["update-row"], "since": 0])
                guard let line = await client.nextLine(within: 10), let notice = try JSONValue(parsing: line).objectValue,
                    notice["type"] == "notice"
                else {
                    try await Task.sleep(for: .milliseconds(50))
                    continue
                }
                #expect(notice["code"] == "gap" && notice["from"] == 1)
                let floor = try #require(notice["to"]?.intValue)
                let events = await client.events(rows, within: 2).compactMap { try? JSONValue(parsing: $0) }
                // At least the newest 100, consecutive, up to the last row, all above the floor.
                let seqs = events.compactMap { $0["seq"]?.intValue }
                #expect(seqs.count >= 100 && seqs.first == floor + 1)
                #expect(seqs == Array((floor + 1)...(floor + Int64(seqs.count))))
                #expect(events.last?["pks"] == .array([.int(Int64(rows))]))
                checked = true
            }
            #expect(checked, "retention never removed anything")
        }
    }
}
