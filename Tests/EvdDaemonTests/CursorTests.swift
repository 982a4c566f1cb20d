import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

#if canImport(Glibc)
import Glibc
#endif

/// Durable cursors (docs/protocol.md, "Durable cursors") and the journal's epoch, on a real daemon:
/// ack and resume across restarts and a kill -9, retention pinned and capped, one follower at a
/// time, permissions as another uid, `stats` and the errors.
@Suite("Durable cursors")
struct CursorTests {
    /// Inserts `count` rows into `t`, one request (one transaction, one `insert-rows`) each.
    static func insert(_ count: Int, into daemon: RunningDaemon, from start: Int = 0) async throws {
        try await daemon.withClient { evd in
            for i in start..<(start + count) { try await evd.request("execute", ["sql": .string("INSERT INTO t VALUES (\(i))")]) }
        }
    }

    /// The next `count` events on `evd` (failing the test if they do not come).
    static func events(_ count: Int, on evd: EvdConnection) async -> [JSONObject] {
        var events: [JSONObject] = []
        while events.count < count, let event = await evd.nextMessage(ofType: "event", within: 20) { events.append(event) }
        #expect(events.count == count, "got \(events.count) of \(count) events")
        return events
    }

    static func seqs(_ events: [JSONObject]) -> [Int64] { events.compactMap { $0["seq"]?.intValue } }

    @Test("ack and resume across a restart: replay starts after the acknowledged seq, every later event once, in order")
    func ackAndResume() async throws {
        try await withTemporaryDirectory { directory in
            let (acked, delivered, epoch) = try await withDaemon(in: directory) { daemon, _ in
                try await daemon.request("execute", ["sql": "CREATE TABLE t (x)"])
                return try await daemon.withClient { evd in
                    let response = try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "audit")))
                    #expect(response["cursor"]?["name"] == "audit")
                    #expect(response["cursor"]?["position"] == response["seq"])
                    try await Self.insert(10, into: daemon)
                    let events = await Self.events(10, on: evd)
                    let subscription = try #require(response["subscription"]?.intValue)
                    let ack = try await evd.request(.ack(subscription: subscription, seq: Self.seqs(events)[5]))
                    #expect(ack == ["cursor": "audit", "position": .int(Self.seqs(events)[5])])
                    // Acknowledging less than the position changes nothing.
                    #expect(try await evd.request(.ack(subscription: subscription, seq: 1))["position"] == .int(Self.seqs(events)[5]))
                    return (Self.seqs(events)[5], Self.seqs(events), events[0]["epoch"]?.stringValue)
                }
            }
            try await withDaemon(in: directory) { daemon, _ in
                try await Self.insert(5, into: daemon, from: 10)
                try await daemon.withClient { evd in
                    let response = try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "audit")))
                    #expect(response["cursor"]?["position"] == .int(acked))
                    let events = await Self.events(9, on: evd)
                    let seqs = Self.seqs(events)
                    // The four delivered but not acknowledged come again, then the five new ones.
                    #expect(Array(seqs.prefix(4)) == Array(delivered.suffix(4)))
                    #expect(seqs == seqs.sorted() && Set(seqs).count == 9 && seqs.allSatisfy { $0 > acked })
                    #expect(events.allSatisfy { $0["epoch"]?.stringValue == epoch }, "the epoch survives a restart")
                    // Nothing more: no duplicate.
                    #expect(await evd.nextMessage(ofType: "event", within: 0.5) == nil)
                }
            }
        }
    }

    @Test("an ack is answered as it arrives, while the cursor's replay is still being sent (it holds the request queue)")
    func ackDuringReplay() async throws {
        try await withRunningDaemon { daemon in
            let rows = 30_000
            try await daemon.withClient { evd in
                try await evd.request("execute", ["sql": "CREATE TABLE t (x)"])
                try await evd.request(
                    "execute",
                    [
                        "sql": .string(
                            "INSERT INTO t WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < \(rows)) SELECT x FROM c"
                        )
                    ]
                )
                try await evd.request("execute", ["sql": "UPDATE t SET x = x + 1"])  // one update-row per row
            }
            try await daemon.withClient { evd in
                let response = try await evd.request(.subscribe(.init(events: ["update-row"], since: 0, cursor: "r")))
                let first = try #require(await evd.nextMessage(ofType: "event"))
                try await evd.send(["op": "ack", "id": "a1", "subscription": response["subscription"]!, "seq": first["seq"]!])
                var before = 0
                var answer: JSONObject?
                while let message = await evd.nextMessage(ofType: nil) {
                    if message["type"] == "event" { before += 1 }
                    if message["type"] == "response" && message["id"] == "a1" {
                        answer = message
                        break
                    }
                }
                #expect(answer?["result"]?["position"] == first["seq"], "\(answer ?? [:])")
                // Answered long before the replay's last event, which waits for this client to read.
                #expect(before < rows - 1, "the ack was answered after \(before) more events")
            }
        }
    }

    @Test("acks waiting to be stored are bounded by --max-pending-requests: one more is busy at once; each gets one answer")
    func acksBounded() async throws {
        try await withRunningDaemon(configure: { $0.maxPipelinedRequests = 1 }) { daemon in
            try await daemon.withClient { evd in
                let response = try await evd.request(.subscribe(.init(events: ["app.*"], cursor: "b")))
                let subscription = response["subscription"]!.intValue!
                let seq = try await evd.request("emit", ["event": "app.x"])["seq"]!.intValue!
                // In one write: the first is being stored while the others arrive.
                var lines: [UInt8] = []
                for i in 0..<20 {
                    lines +=
                        JSONValue.object(["op": "ack", "id": .string("k\(i)"), "subscription": .int(subscription), "seq": .int(seq)])
                        .jsonBytes
                    lines.append(0x0a)
                }
                try await evd.sendRaw(lines)
                var answers: [String: JSONObject] = [:]
                while answers.count < 20, let message = await evd.nextMessage(ofType: "response") {
                    if let id = message["id"]?.stringValue { answers[id] = message }
                }
                #expect(answers.count == 20)
                let busy = answers.values.filter { $0["error"]?["code"] == "busy" }
                #expect(!busy.isEmpty && busy.allSatisfy { $0["error"]?["limit"] == "max-pending-requests" })
                #expect(answers["k0"]?["result"]?["position"] == .int(seq))
                #expect(answers.values.allSatisfy { $0["ok"] == true || $0["error"]?["code"] == "busy" })
            }
        }
    }

    @Test("kill -9 right after an ack: the restarted evd resumes the cursor after it")
    func ackSurvivesKill() async throws {
        try await withTemporaryDirectory { directory in
            let arguments = [
                "--socket", directory + "/evd.sock", "--state-dir", directory + "/state", "--db", "main=\(directory)/main.db",
                "--log-level", "warning",
            ]
            func start() async throws -> EvdChild {
                let child = try EvdChild(binaryPath("evd"), arguments, directory: directory)
                let ready = await eventually(within: 60) {
                    guard child.process.isRunning else { return true }
                    return (try? await EvdConnection.withConnection(socketPath: directory + "/evd.sock") { try await $0.request("ping") })
                        != nil
                }
                try #require(ready && child.process.isRunning, "evd did not start")
                return child
            }
            let socket = directory + "/evd.sock"
            let first = try await start()
            defer { first.kill() }
            let acked: Int64 = try await EvdConnection.withConnection(socketPath: socket) { evd in
                try await evd.request("execute", ["sql": "CREATE TABLE t (x)"])
                let response = try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "k")))
                for i in 0..<20 { try await evd.request("execute", ["sql": .string("INSERT INTO t VALUES (\(i))")]) }
                let events = await Self.events(20, on: evd)
                let seq = Self.seqs(events)[11]
                _ = try await evd.request(.ack(subscription: response["subscription"]!.intValue!, seq: seq))
                first.signal(SIGKILL)  // at once: the answer said the position is on disk
                return seq
            }
            _ = try await first.finish(within: 30)
            let second = try await start()
            defer { second.kill() }
            try await EvdConnection.withConnection(socketPath: socket) { evd in
                let response = try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "k")))
                #expect(response["cursor"]?["position"] == .int(acked))
                let events = await Self.events(8, on: evd)
                #expect(Self.seqs(events).allSatisfy { $0 > acked })
                #expect(Set(Self.seqs(events)).count == 8)
            }
            second.signal(SIGTERM)
            #expect(try await second.finish(within: 30).status == 0)
        }
    }

    @Test("a cursor keeps what it has not acknowledged from retention, up to the cap; past the cap its replay gets notice gap")
    func retention() async throws {
        try await withRunningDaemon(configure: {
            $0.journal.keepEvents = 5
            $0.journal.pruneIntervalMs = 20
            $0.journal.cursorMaxRetainedEvents = 20
        }) { daemon in
            try await daemon.request("execute", ["sql": "CREATE TABLE t (x)"])
            // Made (at the head) and left: nothing acknowledged.
            let start = try await daemon.request(.subscribe(.init(events: ["insert-rows"], cursor: "slow")))
            let position = try #require(start["cursor"]?["position"]?.intValue)
            try await Self.insert(30, into: daemon)
            // Retention keeps the newest 5 of the window; the cursor keeps more, up to the cap:
            // the window settles at its newest 20 events.
            let settled = try await eventually(within: 30) { try await Self.mainSource(daemon)["events"] == 20 }
            let source = try await Self.mainSource(daemon)
            #expect(settled, "\(source)")
            try await daemon.withClient { evd in
                try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "slow")))
                let gap = try #require(await evd.nextMessage(ofType: "notice", within: 10))
                #expect(gap["code"] == "gap" && gap["from"] == .int(position + 1) && gap["to"] == source["floor"])
                let seqs = Self.seqs(await Self.events(20, on: evd))
                #expect(seqs.first == source["first_seq"]?.intValue && seqs.last == source["last_seq"]?.intValue)
                #expect(await evd.nextMessage(ofType: "event", within: 0.5) == nil)
            }
        }
    }

    @Test("a cursor that has not acknowledged pins its database's window: retention drops nothing after its position")
    func pinned() async throws {
        try await withRunningDaemon(configure: {
            $0.journal.keepEvents = 5
            $0.journal.pruneIntervalMs = 20
        }) { daemon in
            try await daemon.request("execute", ["sql": "CREATE TABLE t (x)"])
            let start = try await daemon.request(.subscribe(.init(events: ["insert-rows"], cursor: "pin")))
            let position = try #require(start["cursor"]?["position"]?.intValue)
            try await Self.insert(30, into: daemon)
            // Retention runs: custom events (not the cursor's window) are pruned to 5, twice over,
            // so a whole pass over every window ran after the inserts.
            for round in 0..<2 {
                let before = try await Self.stateFloor(daemon)
                try await daemon.withClient { evd in
                    for i in 0..<10 { try await evd.request("emit", ["event": "app.tick", "data": ["i": .integer(round * 10 + i)]]) }
                }
                #expect(try await eventually(within: 30) { try await Self.stateFloor(daemon) > before })
            }
            #expect(try await Self.mainFloor(daemon) <= position)
            try await daemon.withClient { evd in
                try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "pin")))
                let events = await Self.events(30, on: evd)
                #expect(Self.seqs(events).first! > position)
            }
        }
    }

    static func mainFloor(_ daemon: RunningDaemon) async throws -> Int64 {
        try await Self.mainSource(daemon)["floor"]?.intValue ?? 0
    }

    /// The main database's journal figures in `stats`.
    static func mainSource(_ daemon: RunningDaemon) async throws -> JSONValue {
        let stats = try await daemon.request("stats")
        return stats["journal"]?["sources"]?.arrayValue?.first { $0["database"] == "main" } ?? .null
    }

    static func stateFloor(_ daemon: RunningDaemon) async throws -> Int64 {
        let stats = try await daemon.request("stats")
        return stats["journal"]?["sources"]?.arrayValue?.first { $0["database"] == .null }?["floor"]?.intValue ?? 0
    }

    @Test("one follower at a time: a second subscription to a cursor gets cursor_in_use until the first ends")
    func oneFollower() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { first in
                let response = try await first.request(.subscribe(.init(events: ["insert-rows"], cursor: "solo")))
                try await daemon.withClient { second in
                    let error = try await second.expectError("subscribe", ["events": ["insert-rows"], "cursor": "solo"])
                    #expect(error.code == "cursor_in_use" && error.extra["field"] == "cursor")
                    // Nor may it be deleted while followed.
                    #expect(try await second.expectError("delete_cursor", ["cursor": "solo"]).code == "cursor_in_use")
                }
                try await first.request(.unsubscribe(subscription: response["subscription"]!.intValue!))
            }
            // Unsubscribed: free again; and a session that ends frees it too.
            try await daemon.withClient { evd in try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "solo"))) }
            try await daemon.withClient { evd in
                _ = try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "solo")))
            }
            #expect(try await daemon.request(.deleteCursor(cursor: "solo")) == [:])
            #expect(try await daemon.withClient { try await $0.expectError("delete_cursor", ["cursor": "solo"]) }.code == "no_such_cursor")
        }
    }

    @Test("a cursor's subscription gets journaled events only: '*' lists and delivers no live event")
    func journaledOnly() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let response = try await evd.request(.subscribe(.init(events: ["*"], cursor: "all")))
                let names = Set(response["events"]?.arrayValue?.compactMap(\.stringValue) ?? [])
                #expect(names.contains("insert-rows") && names.contains("login") && names.contains("create-token"))
                #expect(!names.contains("checkout") && !names.contains("before_execute") && !names.contains("commit"))
                try await daemon.request("execute", ["sql": "CREATE TABLE t (x)"])
                try await daemon.request("execute", ["sql": "INSERT INTO t VALUES (1)"])
                var seen: [String] = []
                while let event = await evd.nextMessage(ofType: "event", within: 1) { seen.append(event["event"]?.stringValue ?? "") }
                #expect(seen.contains("create-table") && seen.contains("insert-rows"))
                #expect(seen.allSatisfy { EventKind(name: $0)?.spec.family.isCommitted ?? true }, "\(seen)")
            }
        }
    }

    @Test("a cursor belongs to its maker: another uid may not follow, acknowledge or delete it; admin may delete")
    func ownership() async throws {
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: [Grant(who: .uid(65534), actions: [.subscribe])])
            $0.maxCursorsPerActor = 2
        }) { daemon in
            try await daemon.request(.subscribe(.init(events: ["insert-rows"], cursor: "roots")))
            let nobody = try asNobody(
                daemon,
                [
                    ["op": "subscribe", "events": ["insert-rows"], "cursor": "roots"],
                    ["op": "delete_cursor", "cursor": "roots"],
                    ["op": "subscribe", "events": ["insert-rows"], "cursor": "mine1"],
                    ["op": "subscribe", "events": ["insert-rows"], "cursor": "mine2"],
                    ["op": "subscribe", "events": ["insert-rows"], "cursor": "mine3"],
                ],
                linger: 20
            )
            let got = responses(try await messages(nobody))
            #expect(got[1]?["error"]?["code"] == "permission_denied", "\(got[1] ?? [:])")
            #expect(got[2]?["error"]?["code"] == "permission_denied", "\(got[2] ?? [:])")
            #expect(got[3]?["result"]?["cursor"]?["name"] == "mine1", "\(got[3] ?? [:])")
            #expect(got[4]?["ok"] == true)
            #expect(got[5]?["error"]?["limit"] == "max-cursors-per-actor", "\(got[5] ?? [:])")
            // The cursors stay nobody's; root (admin) may delete them once nobody follows them.
            let stats = try await daemon.request("stats")
            let owners = Dictionary(
                uniqueKeysWithValues: (stats["cursors"]?.arrayValue ?? []).map { ($0["name"]!.stringValue!, $0["owner"]!.stringValue!) }
            )
            #expect(owners == ["roots": "uid:0", "mine1": "uid:65534", "mine2": "uid:65534"])
            // Nobody may view nothing in main: its cursors keep none of main's journal.
            let databases = Dictionary(
                uniqueKeysWithValues: (stats["cursors"]?.arrayValue ?? []).map { ($0["name"]!.stringValue!, $0["databases"]!) }
            )
            #expect(databases == ["roots": .null, "mine1": [], "mine2": []])
            #expect(try await daemon.request(.deleteCursor(cursor: "mine1")) == [:])
        }
    }

    @Test("another uid cannot acknowledge a cursor another session follows: its ack names no subscription of its own")
    func ackAsAnotherUID() async throws {
        try await withRunningDaemon(configure: { openUp(&$0, grants: [Grant(who: .uid(65534), actions: [.subscribe])]) }) { daemon in
            try await daemon.withClient { evd in
                let response = try await evd.request(.subscribe(.init(events: ["app.*"], cursor: "held")))
                let start = try #require(response["cursor"]?["position"])
                let seq = try await evd.request("emit", ["event": "app.x"])["seq"]!
                let nobody = try asNobody(daemon, [["op": "ack", "subscription": response["subscription"]!, "seq": seq]], linger: 20)
                let got = responses(try await messages(nobody))
                #expect(got[1]?["error"]?["code"] == "bad_request" && got[1]?["error"]?["field"] == "subscription", "\(got[1] ?? [:])")
                let cursor = try await daemon.request("stats")["cursors"]?.arrayValue?.first
                #expect(cursor?["position"] == start)
            }
        }
    }

    @Test("stats lists each cursor with its position, lag and follower; the metrics carry position and lag")
    func statistics() async throws {
        try await withRunningDaemon(configure: {
            let directory = ($0.stateDirectory as NSString).deletingLastPathComponent
            $0.databases.append(DatabaseConfig(name: "logs", path: directory + "/logs.db"))
            $0.metrics.socketPath = directory + "/metrics.sock"
        }) { daemon in
            try await daemon.request("execute", ["sql": "CREATE TABLE t (x)"])
            try await daemon.withClient { evd in
                let response = try await evd.request(.subscribe(.init(events: ["insert-rows"], where: ["database": "main"], cursor: "c")))
                try await Self.insert(4, into: daemon)
                let events = await Self.events(4, on: evd)
                try await evd.request(.ack(subscription: response["subscription"]!.intValue!, seq: Self.seqs(events)[1]))
                let stats = try await daemon.request("stats")
                let cursor = try #require(stats["cursors"]?.arrayValue?.first)
                #expect(cursor["name"] == "c" && cursor["live"] == true && cursor["owner"] == "uid:0")
                #expect(cursor["position"] == .int(Self.seqs(events)[1]))
                #expect(cursor["lag"]?.intValue ?? 0 >= 2)
                #expect(cursor["events"] == ["insert-rows"] && cursor["databases"] == ["main"])
                #expect(cursor["acked"]?.stringValue != nil)
                #expect(stats["epoch"]?.stringValue?.count == 16)
                let reply = try await httpRequest(.unix(daemon.directory + "/metrics.sock"), "GET /metrics")
                let families = try await parseWithPrometheusClient(reply.body)
                #expect(families.value("evd_cursor_position", ["cursor": "c"]) == Double(Self.seqs(events)[1]))
                #expect((families.value("evd_cursor_lag_events", ["cursor": "c"]) ?? 0) >= 2)
                #expect(families.value("evd_cursors") == 1)
                // A name with what the exposition format escapes is a label like any other.
                try await daemon.withClient { other in
                    try await other.request(.subscribe(.init(events: ["insert-rows"], cursor: #"we"ird\ {name}"#)))
                    let text = try await httpRequest(.unix(daemon.directory + "/metrics.sock"), "GET /metrics").body
                    let parsed = try await parseWithPrometheusClient(text)
                    #expect(parsed.value("evd_cursor_position", ["cursor": #"we"ird\ {name}"#]) != nil, "\(text)")
                    #expect(parsed.value("evd_cursors") == 2)
                }
            }
            let stats = try await daemon.request("stats")
            #expect(stats["cursors"]?.arrayValue?.first?["live"] == false)
            // A deleted cursor leaves the metrics.
            try await daemon.request(.deleteCursor(cursor: "c"))
            let families = try await parseWithPrometheusClient(
                try await httpRequest(.unix(daemon.directory + "/metrics.sock"), "GET /metrics").body
            )
            #expect(families.value("evd_cursor_position", ["cursor": "c"]) == nil)
            #expect(families.value("evd_cursors") == 1)
        }
    }

    @Test("errors: ack of a plain subscription or beyond the head, a bad name, a cursor with veto, with --no-journal")
    func errors() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let plain = try await evd.request(.subscribe(.init(events: ["insert-rows"])))
                var error = try await evd.expectError("ack", ["subscription": plain["subscription"]!, "seq": 0])
                #expect(error.code == "bad_request" && error.extra["field"] == "subscription")
                let cursor = try await evd.request(.subscribe(.init(events: ["insert-rows"], cursor: "e")))
                error = try await evd.expectError("ack", ["subscription": cursor["subscription"]!, "seq": .int(1 << 40)])
                #expect(error.code == "bad_request" && error.extra["field"] == "seq")
                for name: JSONValue in ["", .string(String(repeating: "x", count: 129)), "a\u{1}b"] {
                    error = try await evd.expectError("subscribe", ["events": ["insert-rows"], "cursor": name])
                    #expect(error.code == "bad_request" && error.extra["field"] == "cursor")
                }
                error = try await evd.expectError("subscribe", ["events": ["insert-rows"], "veto": ["before_execute"], "cursor": "v"])
                #expect(error.code == "bad_request" && error.extra["field"] == "veto")
                error = try await evd.expectError("delete_cursor", ["cursor": "nope"])
                #expect(error.code == "no_such_cursor")
            }
            // The refused subscribes made no cursor.
            #expect(try await daemon.request("stats")["cursors"]?.arrayValue?.count == 1)
        }
        try await withRunningDaemon(configure: { $0.journal.enabled = false }) { daemon in
            let error = try await daemon.withClient { try await $0.expectError("subscribe", ["events": ["*"], "cursor": "x"]) }
            #expect(error.code == "bad_request" && error.extra["field"] == "cursor")
        }
    }

    @Test("the epoch: hello and every event carry it; it survives a restart and a lost state directory; a wiped journal gets a new one")
    func epoch() async throws {
        try await withTemporaryDirectory { directory in
            func helloEpoch() async throws -> String {
                try await withDaemon(in: directory) { daemon, _ in
                    try await daemon.withClient { evd in
                        let epoch = try #require(evd.hello["epoch"]?.stringValue)
                        try await evd.request(.subscribe(.init(events: ["app.e"])))
                        try await evd.request("emit", ["event": "app.e"])
                        let event = try #require(await evd.nextMessage(ofType: "event"))
                        #expect(event["epoch"]?.stringValue == epoch)
                        #expect(Array(event.keys.prefix(4)) == ["type", "seq", "epoch", "event"])
                        return epoch
                    }
                }
            }
            let first = try await helloEpoch()
            #expect(first.count == 16 && first.allSatisfy(\.isHexDigit) && first == first.lowercased())
            #expect(try await helloEpoch() == first)
            // The state directory lost: the database's journal goes on, and so does its epoch.
            try FileManager.default.removeItem(atPath: directory + "/state")
            #expect(try await helloEpoch() == first)
            // Everything wiped: a new history, a new epoch.
            try FileManager.default.removeItem(atPath: directory + "/state")
            try FileManager.default.removeItem(atPath: directory + "/main.db")
            #expect(try await helloEpoch() != first)
        }
    }
}
