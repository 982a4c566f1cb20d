import EvdClient
import Foundation
import OrderedCollections
import Testing

@testable import EvdDaemon

/// Committed events carry their transaction (`tx`, `tx_last`, `tx_end`) and row events the schema
/// version they were committed under (docs/protocol.md, "Transactions").
@Suite("Transaction ids")
struct TransactionIdsTests {
    /// Every committed event the writers below make.
    static let committed = [
        "create-table", "alter-table", "insert-rows", "upsert-rows", "update-row", "delete-row", "login", "logout", "app.*",
    ]

    /// Groups `events` (every committed event of a range of seqs, in seq order) by `tx` and checks
    /// that each group is a whole transaction: consecutive seqs from `tx` through `tx_last`, and
    /// `tx_end` on exactly its last event. Returns the groups' event names, in order.
    static func transactions(_ events: [JSONObject], sourceLocation: SourceLocation = #_sourceLocation) -> [[String]] {
        var groups: OrderedDictionary<Int64, [JSONObject]> = [:]
        for event in events {
            guard let tx = event["tx"]?.intValue else {
                Issue.record("an event without tx: \(event)", sourceLocation: sourceLocation)
                continue
            }
            groups[tx, default: []].append(event)
        }
        for (tx, group) in groups {
            let seqs = group.compactMap { $0["seq"]?.intValue }
            let last = tx + Int64(group.count) - 1
            #expect(seqs == Array(tx...last), "transaction \(tx): seqs \(seqs)", sourceLocation: sourceLocation)
            #expect(group.allSatisfy { $0["tx_last"] == .int(last) }, "transaction \(tx): tx_last", sourceLocation: sourceLocation)
            let ends = group.map { $0["tx_end"] == .bool(true) }
            #expect(
                ends == Array(repeating: false, count: group.count - 1) + [true],
                "transaction \(tx): tx_end",
                sourceLocation: sourceLocation
            )
        }
        return groups.values.map { $0.compactMap { $0["event"]?.stringValue } }
    }

    /// An event as a replay must give it again: without its subscription number.
    static func replayed(_ events: [JSONObject]) -> [JSONObject] {
        events.map { event in
            var event = event
            event.removeValue(forKey: "subscription")
            return event
        }
    }

    /// Whether an event shows a row written by rolled-back work (`what` = "rb").
    static func showsRolledBack(_ event: JSONObject) -> Bool {
        let images = (event["rows"]?.arrayValue ?? []) + [event["after"] ?? .null, event["before"] ?? .null]
        return images.contains { $0["what"] == "rb" }
    }

    /// One writer's work, `rounds` times: a multi-statement transaction with an emit inside it, a
    /// rolled-back transaction, an implicit insert, a structured insert, an emit, an implicit delete.
    static func write(_ evd: EvdConnection, writer: Int, rounds: Int) async throws {
        // Each writer's transactions hold the write lock for several requests while the others
        // queue for it: on a loaded machine one may wait longer than the default busy timeout.
        try await evd.request("execution_options", ["options": ["busy_timeout_ms": 60000]])
        for round in 0..<rounds {
            let key: [JSONValue] = [.integer(writer), .integer(round)]
            try await evd.request("begin")
            try await evd.request("execute", ["sql": "INSERT INTO t (w, r, what) VALUES (?, ?, 'a')", "params": .array(key)])
            try await evd.request("execute", ["sql": "INSERT INTO t (w, r, what) VALUES (?, ?, 'b')", "params": .array(key)])
            try await evd.request("emit", ["event": "app.inside", "data": ["w": .integer(writer), "r": .integer(round)]])
            try await evd.request(
                "execute",
                ["sql": "UPDATE t SET what = 'a2' WHERE w = ? AND r = ? AND what = 'a'", "params": .array(key)]
            )
            try await evd.request("commit")

            try await evd.request("begin")
            try await evd.request("execute", ["sql": "INSERT INTO t (w, r, what) VALUES (?, ?, 'rb')", "params": .array(key)])
            try await evd.request(
                "execute",
                ["sql": "UPDATE t SET what = 'rb' WHERE w = ? AND r = ? AND what = 'b'", "params": .array(key)]
            )
            try await evd.request("rollback")

            try await evd.request(
                "execute",
                ["sql": "INSERT INTO t (w, r, what) VALUES (?, ?, 'i1'), (?, ?, 'i2')", "params": .array(key + key)]
            )
            try await evd.request("insert", ["table": "t", "rows": [["w": .integer(writer), "r": .integer(round), "what": "s"]]])
            try await evd.request("emit", ["event": "app.outside", "data": ["w": .integer(writer)]])
            try await evd.request("execute", ["sql": "DELETE FROM t WHERE w = ? AND r = ? AND what = 'i1'", "params": .array(key)])
        }
    }

    @Test(
        "under concurrent writers every committed event carries its transaction, live, replayed, and replayed after kill -9 and a restart"
    )
    func concurrentWritersAndKill() async throws {
        try await withTemporaryDirectory { directory in
            let socket = directory + "/evd.sock"
            let arguments = [
                "--socket", socket, "--state-dir", directory + "/state", "--db", "main=\(directory)/main.db", "--log-level", "warning",
            ]
            func start() async throws -> EvdChild {
                let child = try EvdChild(binaryPath("evd"), arguments, directory: directory)
                let ready = await eventually(within: 60) {
                    guard child.process.isRunning else { return true }
                    return (try? await EvdConnection.withConnection(socketPath: socket) { try await $0.request("ping") }) != nil
                }
                try #require(ready && child.process.isRunning, "evd did not start")
                return child
            }
            let writers = 4
            let rounds = 25
            let first = try await start()
            defer { first.kill() }
            let (since, live) = try await EvdConnection.withConnection(socketPath: socket) { subscriber in
                let (_, head) = try await subscribeEvents(subscriber, Self.committed, ["rows": true])
                try await subscriber.request("execute", ["sql": "CREATE TABLE t (id INTEGER PRIMARY KEY, w, r, what)"])
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for writer in 0..<writers {
                        group.addTask {
                            try await EvdConnection.withConnection(socketPath: socket) { evd in
                                try await Self.write(evd, writer: writer, rounds: rounds)
                            }
                        }
                    }
                    try await group.waitForAll()
                }
                try await subscriber.request("emit", ["event": "app.end"])
                return (head, try await collectEvents(subscriber, until: "app.end", within: 60))
            }
            let groups = Self.transactions(live)
            let multi = ["insert-rows", "insert-rows", "update-row"]
            #expect(groups.filter { $0 == multi }.count == writers * rounds)
            #expect(groups.filter { $0 == ["app.inside"] }.count == writers * rounds)
            #expect(groups.filter { $0 == ["app.outside"] }.count == writers * rounds)
            #expect(groups.filter { $0 == ["insert-rows"] }.count == 2 * writers * rounds)
            #expect(groups.filter { $0 == ["delete-row"] }.count == writers * rounds)
            #expect(groups.allSatisfy { $0.count == 1 || $0 == multi }, "\(groups.filter { $0.count > 1 && $0 != multi })")
            #expect(!live.contains(where: Self.showsRolledBack))
            let rowEvents = live.filter { ["insert-rows", "update-row", "delete-row"].contains($0["event"]?.stringValue) }
            #expect(rowEvents.allSatisfy { $0["schema_version"]?.intValue != nil })

            // A replay from the journal gives the same events, byte for byte but the subscription.
            func replay() async throws -> [JSONObject] {
                try await EvdConnection.withConnection(socketPath: socket) { evd in
                    _ = try await subscribeEvents(evd, Self.committed, ["rows": true, "since": .int(since)])
                    return try await collectEvents(evd, until: "app.end", within: 60)
                }
            }
            let replayed = try await replay()
            #expect(Self.replayed(replayed) == Self.replayed(live))

            first.signal(SIGKILL)
            _ = try await first.finish(within: 30)
            let second = try await start()
            defer { second.kill() }
            let afterRestart = try await replay()
            #expect(Self.replayed(afterRestart) == Self.replayed(live))
            second.signal(SIGTERM)
            #expect(try await second.finish(within: 30).status == 0)
        }
    }

    @Test("an ALTER TABLE ADD COLUMN between two inserts: the second insert-rows carries a greater schema_version, live and replayed")
    func schemaVersion() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let (_, head) = try await subscribeEvents(evd, ["insert-rows", "alter-table"])
                try await evd.request("execute", ["sql": "CREATE TABLE s (a)"])
                try await evd.request("execute", ["sql": "INSERT INTO s VALUES (1)"])
                try await evd.request("execute", ["sql": "ALTER TABLE s ADD COLUMN b"])
                try await evd.request("execute", ["sql": "INSERT INTO s VALUES (2, 3)"])
                // Within one transaction: the insert before the ALTER carries the version at the
                // commit, as the one after it does.
                try await evd.request("begin")
                try await evd.request("execute", ["sql": "INSERT INTO s VALUES (4, 5)"])
                try await evd.request("execute", ["sql": "ALTER TABLE s ADD COLUMN c"])
                try await evd.request("execute", ["sql": "INSERT INTO s VALUES (6, 7, 8)"])
                try await evd.request("commit")
                let live = try await collectEvents(evd, until: "insert-rows", occurrence: 4)
                #expect(
                    live.map { $0["event"] } == ["insert-rows", "alter-table", "insert-rows", "insert-rows", "alter-table", "insert-rows"]
                )
                #expect(live.filter { $0["event"] == "alter-table" }.allSatisfy { $0["schema_version"] == nil })
                let versions = live.filter { $0["event"] == "insert-rows" }.compactMap { $0["schema_version"]?.intValue }
                #expect(versions.count == 4)
                #expect(versions[0] < versions[1] && versions[1] < versions[2] && versions[2] == versions[3], "\(versions)")
                let pragma = try await evd.request("execute", ["sql": "PRAGMA schema_version"])
                #expect(pragma["rows"] == [[.int(versions[3])]])
                _ = Self.transactions(live)

                try await daemon.withClient { replayer in
                    _ = try await subscribeEvents(replayer, ["insert-rows", "alter-table"], ["since": .int(head)])
                    let replayed = try await collectEvents(replayer, until: "insert-rows", occurrence: 4)
                    #expect(Self.replayed(replayed) == Self.replayed(live))
                }
            }
        }
    }

    @Test("a subscription that filters knows where each transaction ends by tx_last, journal off too")
    func filteredWithoutJournal() async throws {
        try await withRunningDaemon(configure: { $0.journal.enabled = false }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request("execute", ["sql": "CREATE TABLE f (id INTEGER PRIMARY KEY, x)"])
                _ = try await subscribeEvents(evd, ["update-row"])
                try await evd.request("begin")
                try await evd.request("execute", ["sql": "INSERT INTO f (x) VALUES (1), (2)"])
                try await evd.request("execute", ["sql": "UPDATE f SET x = x + 10"])
                try await evd.request("execute", ["sql": "INSERT INTO f (x) VALUES (3)"])
                try await evd.request("commit")
                try await evd.request("execute", ["sql": "UPDATE f SET x = 0 WHERE id = 3"])
                let events = try await collectEvents(evd, until: "update-row", occurrence: 3)
                let seqs = events.compactMap { $0["seq"]?.intValue }
                // The transaction's events: insert-rows, update-row, update-row, insert-rows.
                #expect(seqs.count == 3 && seqs[1] == seqs[0] + 1)
                #expect(events[0]["tx"] == .int(seqs[0] - 1) && events[1]["tx"] == .int(seqs[0] - 1))
                #expect(events[0]["tx_last"] == .int(seqs[1] + 1) && events[1]["tx_last"] == .int(seqs[1] + 1))
                #expect(events[0]["tx_end"] == nil && events[1]["tx_end"] == nil)
                // The next transaction: one event.
                #expect(events[2]["tx"] == .int(seqs[2]) && events[2]["tx_last"] == .int(seqs[2]) && events[2]["tx_end"] == true)
            }
        }
    }

    @Test("a transaction of more events than are made at a time (journaled in chunks, runs split) is still one")
    func largeTransaction() async throws {
        try await withRunningDaemon { daemon in
            let count = PooledConnection.eventChunk + Journal.maxRunEvents / 2
            try await daemon.request("execute", ["sql": "CREATE TABLE big (id INTEGER PRIMARY KEY, x)"])
            try await daemon.request(
                "execute",
                [
                    "sql": .string(
                        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < \(count)) INSERT INTO big (x) SELECT i FROM n"
                    )
                ]
            )
            // The subscriber reads while the transaction commits (its events are many).
            let (head, live) = try await daemon.withClient { subscriber in
                let (_, head) = try await subscribeEvents(subscriber, ["update-row", "delete-row"], ["rows": true])
                async let collected = collectEvents(subscriber, until: "delete-row", within: 60)
                try await daemon.withClient { evd in
                    try await evd.request("begin")
                    try await evd.request("execute", ["sql": "UPDATE big SET x = x + 1"])
                    try await evd.request("execute", ["sql": "DELETE FROM big WHERE id = 1"])
                    try await evd.request("commit")
                }
                return (head, try await collected)
            }
            #expect(live.count == count + 1)
            #expect(Self.transactions(live).count == 1)
            let replayed = try await daemon.withClient { replayer in
                _ = try await subscribeEvents(replayer, ["update-row", "delete-row"], ["rows": true, "since": .int(head)])
                return try await collectEvents(replayer, until: "delete-row", within: 60)
            }
            #expect(Self.replayed(replayed) == Self.replayed(live))
        }
    }

    @Test("where matches the transaction's keys, live and replayed")
    func whereOnTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let (_, head) = try await subscribeEvents(evd, ["insert-rows", "update-row", "app.*"], ["where": ["tx_end": true]])
                try await evd.request("execute", ["sql": "CREATE TABLE w (x)"])
                try await evd.request("begin")
                try await evd.request("execute", ["sql": "INSERT INTO w VALUES (1), (2)"])
                try await evd.request("execute", ["sql": "UPDATE w SET x = x + 1"])
                try await evd.request("commit")
                try await evd.request("emit", ["event": "app.done"])
                let live = try await collectEvents(evd, until: "app.done")
                // The transaction's last update-row, and the emit (a transaction of its own).
                #expect(live.map { $0["event"] } == ["update-row", "app.done"])
                #expect(live.allSatisfy { $0["tx_end"] == true && $0["seq"] == $0["tx_last"] })
                try await daemon.withClient { replayer in
                    _ = try await subscribeEvents(
                        replayer,
                        ["insert-rows", "update-row", "app.*"],
                        ["where": ["tx_end": true], "since": .int(head)]
                    )
                    let replayed = try await collectEvents(replayer, until: "app.done")
                    #expect(Self.replayed(replayed) == Self.replayed(live))
                }
            }
        }
    }

    @Test("a filtering subscriber that got part of a transaction has all of it once wait for its tx_last answers")
    func waitForTransactionEnd() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("execute", ["sql": "CREATE TABLE e (id INTEGER PRIMARY KEY, x)"])
                try await evd.request("execute", ["sql": "CREATE TABLE other (y)"])
                _ = try await subscribeEvents(evd, ["update-row"], ["where": ["table": "e"]])
                try await daemon.withClient { writer in
                    try await writer.request("execute", ["sql": "INSERT INTO e (x) VALUES (1), (2), (3)"])
                    try await writer.request("begin")
                    try await writer.request("execute", ["sql": "UPDATE e SET x = x + 1"])
                    try await writer.request("execute", ["sql": "INSERT INTO other VALUES (1)"])
                    try await writer.request("commit")
                }
                let first = try #require(await evd.nextMessage(ofType: "event", within: 10))
                let last = try #require(first["tx_last"]?.intValue)
                #expect(first["tx_end"] == nil)  // the transaction ends with insert-rows into other
                // Sent, not awaited: its answer is read in order with the events.
                try await evd.send(["op": "wait", "id": "w", "seq": .int(last), "timeout_ms": 10000])
                var before: [JSONObject] = [first]
                var answered = false
                while let message = await evd.nextMessage(ofType: nil, within: 10) {
                    if message["type"] == "response" {
                        answered = message["id"] == "w" && message["ok"] == true
                        break
                    }
                    if message["type"] == "event" { before.append(message) }
                }
                #expect(answered)
                // The subscription's whole part came before the answer: three update-rows of one
                // transaction, which goes on past them.
                #expect(before.map { $0["event"] } == ["update-row", "update-row", "update-row"])
                #expect(before.allSatisfy { $0["tx"] == first["tx"] && $0["tx_last"] == .int(last) && $0["tx_end"] == nil })
                #expect(before.last?["seq"]?.intValue.map { $0 < last } == true)
                let after = await evd.nextMessage(ofType: "event", within: 0.3)
                #expect(after == nil)
            }
        }
    }

    @Test("emit data with a transaction key is bad_request")
    func emitTransactionKeys() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                for key in ["tx", "tx_last", "tx_end", "schema_version"] {
                    let error = try await evd.expectError("emit", ["event": "app.x", "data": [key: 1]])
                    #expect(error.code == "bad_request")
                    #expect(error.extra["field"] == .string("data." + key))
                }
                let (_, _) = try await subscribeEvents(evd, ["app.*"])
                let seq = try #require(try await evd.request("emit", ["event": "app.x", "data": ["n": 1]])["seq"]?.intValue)
                let event = try #require(await evd.nextMessage(ofType: "event", within: 10))
                #expect(event["tx"] == .int(seq) && event["tx_last"] == .int(seq) && event["tx_end"] == true)
                #expect(event["n"] == 1 && event["schema_version"] == nil)
            }
        }
    }
}
