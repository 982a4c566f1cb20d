import EvdClient
import Foundation
import Synchronization
import Testing

@testable import EvdDaemon

/// An event without its subscription number: what a replay must reproduce byte for byte.
private func withoutSubscription(_ event: JSONObject) -> JSONObject {
    var event = event
    event.removeValue(forKey: "subscription")
    return event
}

/// Subscribes with `arguments` and `since`, and expects the replay to be `delivered` (the same
/// subscription's live events) event for event, apart from the subscription number, in seq order.
private func expectReplay(
    _ daemon: RunningDaemon,
    _ arguments: JSONObject,
    since: Int64,
    equals delivered: [JSONObject],
    sourceLocation: SourceLocation = #_sourceLocation
) async throws {
    try await daemon.withClient { evd in
        var arguments = arguments
        arguments["since"] = .int(since)
        try await evd.request("subscribe", arguments)
        let (replayed, notices) = await collect(evd, events: delivered.count)
        #expect(notices.isEmpty, sourceLocation: sourceLocation)
        let seqs = replayed.compactMap { $0["seq"]?.intValue }
        #expect(seqs == seqs.sorted() && Set(seqs).count == seqs.count, sourceLocation: sourceLocation)
        #expect(replayed.count == delivered.count, sourceLocation: sourceLocation)
        // The first event that differs, if any (not the whole lists: thousands of events).
        let differs = zip(replayed, delivered).enumerated().first { withoutSubscription($1.0) != withoutSubscription($1.1) }
        #expect(
            differs == nil,
            "event \(differs?.offset ?? 0): replayed \(differs?.element.0 ?? [:]), delivered \(differs?.element.1 ?? [:])",
            sourceLocation: sourceLocation
        )
    }
}

/// The events of a subscription that follow its response, with any notices among them, until
/// `count` events arrived (or nothing more comes within `seconds`).
private func collect(
    _ evd: EvdConnection,
    events count: Int,
    within seconds: Double = 20
) async -> (
    events: [JSONObject], notices: [JSONObject]
) {
    var events: [JSONObject] = []
    var notices: [JSONObject] = []
    while events.count < count, let message = await evd.nextMessage(ofType: nil, within: seconds) {
        switch message["type"]?.stringValue {
        case "event": events.append(message)
        case "notice": notices.append(message)
        default: break
        }
    }
    return (events, notices)
}

/// The codes of `notices`: a replay that meets no gap ends with exactly one `caught_up`.
private func codes(_ notices: [JSONObject]) -> [String?] { notices.map { $0["code"]?.stringValue } }

@Suite("Journal and replay")
struct JournalTests {
    @Test("committed events survive a restart: since 0 replays them as they were delivered, and seqs go on above them")
    func replayAfterRestart() async throws {
        try await withTemporaryDirectory { directory in
            let names = ["insert-rows", "update-row", "delete-row", "create-table", "app.*"]
            let live: [JSONObject] = try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    _ = try await subscribeEvents(evd, names)
                    try await evd.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
                    try await evd.request(.execute(.init(sql: "insert into dogs(name) values ('Rex'), ('Fido')")))
                    try await evd.request(.execute(.init(sql: "update dogs set name = upper(name)")))
                    try await evd.request(.execute(.init(sql: "delete from dogs where id = 1")))
                    try await evd.request("emit", ["event": "app.deployed", "data": ["version": 3]])
                    return try await collectEvents(evd, until: "app.deployed")
                }
            }
            #expect(
                live.map { $0["event"] } == [
                    "create-table", "insert-rows", "update-row", "update-row", "delete-row", "app.deployed",
                ]
            )
            let lastSeq = try #require(live.last?["seq"]?.intValue)
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    #expect((evd.hello["seq"]?.intValue ?? 0) >= lastSeq)
                    _ = try await subscribeEvents(evd, names, ["since": 0])
                    let replayed = try await collectEvents(evd, until: "app.deployed")
                    #expect(replayed.map(withoutSubscription) == live.map(withoutSubscription))
                    try await evd.request("emit", ["event": "app.after"])
                    let after = try #require(await evd.nextMessage(ofType: "event"))
                    #expect(after["event"] == "app.after")
                    #expect((after["seq"]?.intValue ?? 0) > lastSeq)
                }
            }
        }
    }

    @Test(
        "emits pipelined from several connections at once: unique seqs rising per connection; each event once, in seq order, live, replayed and after a restart"
    )
    func pipelinedEmitsFromManyConnections() async throws {
        let publishers = 4
        let emitsEach = 1000
        try await withTemporaryDirectory { directory in
            let answered: [[Int64]] = try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { subscriber in
                    let (_, head) = try await subscribeEvents(subscriber, ["burst.*"])
                    let answered = try await withThrowingTaskGroup(of: (Int, [Int64]).self) { group in
                        for publisher in 0..<publishers {
                            group.addTask {
                                try await daemon.withClient { evd in
                                    (publisher, try await pipelineEmits(evd, publisher: publisher, count: emitsEach))
                                }
                            }
                        }
                        var answered = Array(repeating: [Int64](), count: publishers)
                        for try await (publisher, seqs) in group { answered[publisher] = seqs }
                        return answered
                    }
                    checkAnswers(answered, count: emitsEach)
                    let (live, notices) = await collect(subscriber, events: publishers * emitsEach)
                    #expect(notices.isEmpty)
                    checkEvents(live, answered)
                    // A replay from before the burst on a new connection: the same, from the journal.
                    try await daemon.withClient { reader in
                        _ = try await subscribeEvents(reader, ["burst.*"], ["since": .int(head)])
                        let (replayed, notices) = await collect(reader, events: publishers * emitsEach)
                        #expect(notices.isEmpty)
                        checkEvents(replayed, answered)
                        #expect(replayed.map(withoutSubscription) == live.map(withoutSubscription))
                    }
                    return answered
                }
            }
            // Every answered emit is in the journal after a restart, once.
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    _ = try await subscribeEvents(evd, ["burst.*"], ["since": 0])
                    let (replayed, notices) = await collect(evd, events: publishers * emitsEach)
                    #expect(notices.isEmpty)
                    checkEvents(replayed, answered)
                    let extra = await evd.nextMessage(ofType: "event", within: 0.5)
                    #expect(extra == nil)
                }
            }
        }
    }

    @Test("a pipelined run of emits with refused ones and other requests among them is answered in request order")
    func pipelinedEmitsWithRefusals() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let (_, head) = try await subscribeEvents(evd, ["run.*"])
                // ok, ok, refused (a catalog event), ok, a ping, ok, refused (a wildcard), refused (bad JSON), ok
                let lines = [
                    #"{"op":"emit","id":1,"event":"run.a","data":{"n":1}}"#,
                    #"{"op":"emit","id":2,"event":"run.a","data":{"n":2}}"#,
                    #"{"op":"emit","id":3,"event":"checkout"}"#,
                    #"{"op":"emit","id":4,"event":"run.b","data":{"n":4}}"#,
                    #"{"op":"ping","id":5}"#,
                    #"{"op":"emit","id":6,"event":"run.a","data":{"n":6}}"#,
                    #"{"op":"emit","id":7,"event":"run.*"}"#,
                    #"{"op":"emit","id":8,"#,
                    #"{"op":"emit","id":9,"event":"run.b","data":{"n":9}}"#,
                ]
                try await evd.sendRaw(Array((lines.joined(separator: "\n") + "\n").utf8))
                var responses: [JSONObject] = []
                var events: [JSONObject] = []
                while responses.count < lines.count, let message = await evd.nextMessage(ofType: nil, within: 10) {
                    if message["type"] == "response" {
                        responses.append(message)
                    } else if message["type"] == "event" {
                        events.append(message)
                    }
                }
                #expect(responses.map { $0["id"] } == [1, 2, 3, 4, 5, 6, 7, .null, 9])
                #expect(responses.map { $0["ok"] } == [true, true, false, true, true, true, false, false, true])
                let seqs = responses.compactMap { $0["result"]?["seq"]?.intValue }
                #expect(seqs == Array((head + 1)...(head + 5)))
                // Each event before its emit's answer, in seq order.
                while events.count < 5, let event = await evd.nextMessage(ofType: "event", within: 10) { events.append(event) }
                #expect(events.map { $0["seq"]?.intValue } == seqs.map { $0 })
                #expect(events.map { $0["n"] } == [1, 2, 4, 6, 9])
            }
        }
    }

    @Test(
        "since replays exactly what follows it, then goes live: no gap and no duplicate while a writer is busy; caught_up once, between the two"
    )
    func replayThenLiveUnderWrites() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, n integer)")))
            let writes = 300
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    try await daemon.withClient { writer in
                        for n in 0..<writes {
                            try await writer.request("execute", ["sql": "insert into t(n) values (?)", "params": [.integer(n)]])
                        }
                    }
                }
                // Subscribe once the writer is well under way, so the replay and live events meet.
                let deadline = ContinuousClock.now + .seconds(60)
                while ContinuousClock.now < deadline {
                    let count = try await daemon.request(.execute(.init(sql: "select count(*) from t")))
                    if (count["rows"]?.arrayValue?.first?.arrayValue?.first?.intValue ?? 0) >= Int64(writes / 4) { break }
                    try await Task.sleep(for: .milliseconds(5))
                }
                try await daemon.withClient { reader in
                    let (subscription, stable) = try await subscribeEvents(reader, ["insert-rows"], ["since": 0, "rows": true])
                    // Every message in the order it arrives, until every insert's event is in.
                    var order: [JSONObject] = []
                    while order.filter({ $0["type"] == "event" }).count < writes,
                        let message = await reader.nextMessage(ofType: nil, within: 20)
                    {
                        order.append(message)
                    }
                    let events = order.filter { $0["type"] == "event" }
                    let notices = order.filter { $0["type"] == "notice" }
                    #expect(codes(notices) == ["caught_up"])
                    // caught_up: at the response's seq, after every replayed event, before every live one.
                    let at = try #require(order.firstIndex { $0["code"] == "caught_up" })
                    #expect(order[at]["seq"]?.intValue == stable && order[at]["subscription"]?.intValue == subscription)
                    let replayed = order[..<at].compactMap { $0["seq"]?.intValue }
                    #expect(!replayed.isEmpty && replayed.allSatisfy { $0 <= stable })
                    #expect(order[(at + 1)...].compactMap { $0["seq"]?.intValue }.allSatisfy { $0 > stable })
                    #expect(events.count == writes)
                    let seqs = events.compactMap { $0["seq"]?.intValue }
                    #expect(seqs == seqs.sorted() && Set(seqs).count == seqs.count)
                    // Rows in the order they were written: each n exactly once.
                    let ns = events.compactMap { $0["num_rows"] == 1 ? $0["rows"]?.arrayValue?.first?["n"]?.intValue : nil }
                    #expect(ns == (0..<Int64(writes)).map { $0 })
                }
                try await group.waitForAll()
            }
        }
    }

    @Test("since while a big transaction's events go out in batches: what went out already is replayed, the rest follows live")
    func sinceDuringBatchedDelivery() async throws {
        // Queues big enough that no subscriber lags out: this is about the switch, not overflow.
        try await withRunningDaemon(configure: { $0.outboxLimits = OutboxLimits(maxEventsPerSubscription: 1 << 20, maxBytes: 1 << 30) }) {
            daemon in
            let rows = 10000  // about twenty of the bus's delivery batches
            try await daemon.request(.execute(.init(sql: "create table big(id integer primary key, v integer)")))
            try await daemon.request(
                "execute",
                [
                    "sql": .string(
                        "insert into big(id, v) with recursive c(x) as (select 1 union all select x + 1 from c where x < \(rows)) select x, 0 from c"
                    )
                ]
            )
            let since = try #require(try await daemon.request("stats")["seq"]?.intValue)
            final class Flag: Sendable { let value = Atomic<Bool>(false) }
            let updated = Flag()
            let delivering = Flag()
            // Each subscriber returns the seqs of the update-row events it got after `since`.
            let subscriber = { @Sendable (_ first: Bool) async throws -> [Int64] in
                try await daemon.withClient { reader in
                    _ = try await subscribeEvents(reader, ["update-row"], ["since": .int(since)])
                    var (events, notices) = await collect(reader, events: first ? 1 : rows)
                    if first {
                        delivering.value.store(true, ordering: .relaxed)  // the batches are going out
                        let rest = await collect(reader, events: rows - 1)
                        events += rest.events
                        notices += rest.notices
                    }
                    if notices.isEmpty, let next = await reader.nextMessage(ofType: nil, within: 10) {
                        // Everything was replayed: caught_up comes after the last of it.
                        notices.append(next)
                    }
                    #expect(codes(notices) == ["caught_up"], "\(notices)")
                    return events.compactMap { $0["seq"]?.intValue }
                }
            }
            let (first, later) = try await withThrowingTaskGroup(of: (Int, [Int64]).self) { group in
                // There before the UPDATE: the changes are recorded, and this one gets them all live.
                group.addTask { (0, try await subscriber(true)) }
                group.addTask {
                    try await daemon.request(.execute(.init(sql: "update big set v = v + 1")))
                    updated.value.store(true, ordering: .relaxed)
                    return (2, [])
                }
                // Subscribers that arrive while the batches go out, until the UPDATE has answered.
                while !delivering.value.load(ordering: .relaxed) && !updated.value.load(ordering: .relaxed) {
                    try await Task.sleep(for: .milliseconds(1))
                }
                var started = 0
                while !updated.value.load(ordering: .relaxed) && started < 10 {
                    group.addTask { (1, try await subscriber(false)) }
                    started += 1
                    await Task.yield()
                }
                var first: [Int64] = []
                var later: [[Int64]] = []
                for try await (role, seqs) in group {
                    if role == 0 { first = seqs } else if role == 1 { later.append(seqs) }
                }
                return (first, later)
            }
            let complete = first.count == rows && first == first.sorted() && Set(first).count == rows
            #expect(complete, "the subscriber there from the start got \(first.count) of \(rows)")
            for seqs in later {
                // Every one of them, once, in order: none lost at the switch from replay to live.
                #expect(seqs.count == rows, "got \(seqs.count) of \(rows)")
                let same = seqs == first  // (compared outside #expect, which would print both lists)
                #expect(same, "not the same events in the same order: \(seqs.first ?? -1)...\(seqs.last ?? -1)")
            }
        }
    }

    @Test(
        "a replay of several pages merges the state journal's events with the database's in seq order, as delivered live, with where and rows"
    )
    func replayAcrossPagesAndSources() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, n integer, s text)")))
            try await daemon.request(
                "execute",
                [
                    "sql":
                        "insert into t(id, n, s) with recursive c(x) as (select 1 union all select x + 1 from c where x < 3000) select x, 0, 'é' || x from c"
                ]
            )
            let all: JSONObject = ["events": ["update-row", "insert-rows", "app.*"]]
            let filtered: JSONObject = ["events": ["update-row"], "where": ["table": "t"], "rows": true]
            // More events than a replay page holds, custom ones (the state journal) between them.
            let work = { @Sendable in
                try await daemon.withClient { writer in
                    try await writer.request("emit", ["event": "app.a"])
                    try await writer.request(.execute(.init(sql: "update t set n = n + 1")))
                    try await writer.request("emit", ["event": "app.b"])
                    try await writer.request(.execute(.init(sql: "create table u(id integer primary key, n integer)")))
                    try await writer.request(.execute(.init(sql: "insert into u(n) values (1), (2), (3)")))
                    try await writer.request(.execute(.init(sql: "update u set n = n * 2")))
                    try await writer.request(.execute(.init(sql: "update t set n = n + 1, s = s || '\"' where id % 2 = 0")))
                    try await writer.request("emit", ["event": "app.c"])
                }
            }
            let expected = (all: 3 + 3000 + 1 + 3 + 1500, filtered: 3000 + 1500)
            let (live, head) = try await daemon.withClient { a in
                try await daemon.withClient { b in
                    let (_, head) = try await subscribeEvents(a, ["update-row", "insert-rows", "app.*"])
                    _ = try await subscribeEvents(b, ["update-row"], ["where": ["table": "t"], "rows": true])
                    try await work()
                    let all = await collect(a, events: expected.all)
                    let filtered = await collect(b, events: expected.filtered)
                    return ((all.events, filtered.events), head)
                }
            }
            #expect(live.0.count == expected.all && live.1.count == expected.filtered)
            // Live too, a transaction's events (more than one batch of the bus) arrive in seq order.
            for delivered in [live.0, live.1] {
                let seqs = delivered.compactMap { $0["seq"]?.intValue }
                #expect(seqs == seqs.sorted())
            }
            for (arguments, delivered) in [(all, live.0), (filtered, live.1)] {
                try await expectReplay(daemon, arguments, since: head, equals: delivered)
            }
        }
    }

    @Test("a transaction of more events than are made at once: delivered in seq order, as journaled, with where and rows")
    func transactionOfSeveralChunks() async throws {
        // More than two chunks (`PooledConnection.eventChunk`): journaled a chunk at a time, then made
        // again for publishing — only the events someone wants (nobody subscribes to delete-row).
        let rows = 2 * PooledConnection.eventChunk + 500
        let deletes = rows / 1000
        try await withRunningDaemon(configure: { $0.outboxLimits.maxEventsPerSubscription = 100_000 }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, n integer, s text)")))
            try await daemon.request(.execute(.init(sql: "create table u(a text, b integer, primary key (a, b)) without rowid")))
            try await daemon.request(
                "execute",
                [
                    "sql": .string(
                        "insert into t(id, n, s) with recursive c(x) as (select 1 union all select x + 1 from c where x < \(rows)) select x, 0, 'é' || x from c"
                    )
                ]
            )
            try await daemon.request(.execute(.init(sql: "insert into u values ('x', 1), ('y', 2)")))
            // One transaction: every row of t, an insert (one insert-rows), rows of a WITHOUT ROWID
            // table, a schema change, deletes.
            let transaction = """
                update t set n = n + 1, s = s || '"'; insert into t(n) values (1), (2); update u set b = b * 10;
                create table v(x); delete from t where id % 1000 = 0
                """
            let all: JSONObject = ["events": ["update-row", "insert-rows", "create-table"]]
            let filtered: JSONObject = ["events": ["update-row"], "where": ["table": "t"], "rows": true]
            let expected = (all: rows + 1 + 2 + 1, filtered: rows)
            let (live, head) = try await daemon.withClient { a in
                try await daemon.withClient { b in
                    let (_, head) = try await subscribeEvents(a, ["update-row", "insert-rows", "create-table"])
                    _ = try await subscribeEvents(b, ["update-row"], ["where": ["table": "t"], "rows": true])
                    try await daemon.request("execute", ["sql": .string(transaction)])
                    let all = await collect(a, events: expected.all)
                    let filtered = await collect(b, events: expected.filtered)
                    #expect(all.notices.isEmpty && filtered.notices.isEmpty)
                    return ((all.events, filtered.events), head)
                }
            }
            #expect(live.0.count == expected.all && live.1.count == expected.filtered)
            // The transaction's events have consecutive seqs, its deletes last; each arrives in order.
            let first = try #require(live.0.first?["seq"]?.intValue)
            let seqs = live.0.compactMap { $0["seq"]?.intValue }
            let consecutive = seqs == Array(first..<(first + Int64(expected.all)))
            #expect(consecutive)
            let filteredSeqs = live.1.compactMap { $0["seq"]?.intValue }
            let filteredConsecutive = filteredSeqs == Array(first..<(first + Int64(rows)))
            #expect(filteredConsecutive)
            let names = live.0.map { $0["event"]?.stringValue ?? "" }
            let inOrder =
                names == Array(repeating: "update-row", count: rows) + ["insert-rows", "update-row", "update-row", "create-table"]
            #expect(inOrder)
            #expect(live.0[rows]["num_rows"] == 2)
            #expect(live.0[rows + 1]["table"] == "u" && live.0[rows + 1]["pks"] == ["x", 1])
            #expect(live.0[rows - 1]["pks"] == .array([.int(Int64(rows))]) && live.0[rows - 1]["before"] == nil)
            let last = try #require(live.1.last)
            #expect(last["pks"] == .array([.int(Int64(rows))]))
            #expect(last["before"]?["s"] == .string("é\(rows)") && last["after"]?["s"] == .string("é\(rows)\""))
            #expect(last["after"]?["n"] == 1)
            // A replay gives what was delivered, byte for byte, and the deletes nobody received live.
            for (arguments, delivered) in [(all, live.0), (filtered, live.1)] {
                try await expectReplay(daemon, arguments, since: head, equals: delivered)
            }
            try await daemon.withClient { evd in
                try await evd.request("subscribe", ["events": ["delete-row"], "since": .int(head)])
                let (replayed, _) = await collect(evd, events: deletes)
                #expect(replayed.map { $0["pks"] } == (1...deletes).map { .array([.int(Int64($0 * 1000))]) })
                #expect(replayed.map { $0["seq"]?.intValue } == (0..<deletes).map { first + Int64(expected.all + $0) })
            }
        }
    }

    @Test("a subscription from the head, or with a since beyond what was journaled, replays nothing and goes live")
    func sinceAtHead() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("emit", ["event": "app.before"])
                let result = try await evd.request("subscribe", ["events": ["app.*"], "since": .int(Int64(Int32.max))])
                let stable = try #require(result["seq"]?.intValue)
                // Nothing to replay: caught up at once, at the subscription's own seq.
                let caughtUp = try #require(await evd.nextMessage(ofType: nil, within: 10))
                #expect(caughtUp["code"] == "caught_up" && caughtUp["seq"]?.intValue == stable)
                try await evd.request("emit", ["event": "app.now"])
                let event = try #require(await evd.nextMessage(ofType: nil, within: 10))
                #expect(event["event"] == "app.now")
            }
        }
    }

    @Test("work that rolls back leaves nothing in the journal: rollback, a denied commit, a failed statement")
    func rolledBackWorkIsNotJournaled() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(id integer primary key, v text unique)")))
                try await evd.request("begin")
                try await evd.request(.execute(.init(sql: "insert into t(v) values ('rolled back')")))
                try await evd.request("rollback")
                _ = try await evd.expectError("execute", ["sql": "insert into t(v) values ('a'), ('a')"])
                try await daemon.withClient { listener in
                    try await listener.request("subscribe", ["veto": ["commit"], "name": "gate"])
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        group.addTask {
                            let veto = try #require(await listener.nextMessage(ofType: "veto"))
                            try await listener.send(["op": "reply", "seq": veto["seq"] ?? .null, "action": "deny"])
                        }
                        let error = try await evd.expectError("execute", ["sql": "insert into t(v) values ('denied')"])
                        #expect(error.code == "vetoed")
                        try await group.waitForAll()
                    }
                }
                // The gate's session ends once the daemon has seen its connection close; until
                // then it would be asked (and, gone, deny) this commit too.
                try await waitUntilStats(daemon, "the gate to leave") { $0["veto_listeners"] == 0 }
                try await evd.request(.execute(.init(sql: "insert into t(v) values ('kept')")))
            }
            try await daemon.withClient { evd in
                _ = try await subscribeEvents(evd, ["insert-rows"], ["since": 0, "rows": true])
                let (events, notices) = await collect(evd, events: 2, within: 3)
                #expect(codes(notices) == ["caught_up"])
                #expect(events.count == 1)
                #expect(events.first?["rows"] == [["id": 1, "v": "kept"]] || events.first?["rows"] == nil)
            }
            let journal = try await daemon.request(.execute(.init(sql: "select event from _evd_journal")))
            #expect(journal["rows"] == [["create-table"], ["insert-rows"]])
        }
    }

    @Test("client SQL may read the journal but not change it: permission_denied naming the table")
    func journalIsProtected() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("emit", ["event": "app.x"])
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                for sql in [
                    "delete from _evd_journal", "update _evd_journal set event = 'forged'",
                    "insert into _evd_journal(seq, event, time, body) values (999999, 'forged', '', x'')",
                    "drop table _evd_journal", "alter table _evd_journal add column y",
                    "create index forged on _evd_journal(event)",
                    "create trigger forged after insert on _evd_journal begin select 1; end",
                ] {
                    let error = try await evd.expectError("execute", ["sql": .string(sql)])
                    #expect(error.code == "permission_denied", "\(sql): \(error)")
                    #expect(error.extra["table"] == "_evd_journal", "\(sql)")
                }
                let insert = try await evd.expectError("insert", ["table": "_evd_journal", "rows": [["seq": 1]]])
                #expect(insert.code == "permission_denied")
                let read = try await evd.request(.execute(.init(sql: "select count(*) from _evd_journal")))
                #expect(read["rows"] == [[1]])
            }
        }
    }

    @Test("retention keeps the newest events; a replay from before them gets notice gap first, then what is kept")
    func retentionAndGap() async throws {
        try await withRunningDaemon(configure: {
            $0.journal.keepEvents = 5
            $0.journal.pruneIntervalMs = 20
        }) { daemon in
            try await daemon.withClient { evd in
                for n in 0..<20 { try await evd.request("emit", ["event": "app.n", "data": ["n": .integer(Int64(n))]]) }
            }
            // Retention runs in the background: wait until a replay from 0 starts with a gap.
            let deadline = ContinuousClock.now + .seconds(30)
            var checked = false
            while !checked && ContinuousClock.now < deadline {
                try await daemon.withClient { evd in
                    _ = try await subscribeEvents(evd, ["app.*"], ["since": 0])
                    guard let first = await evd.nextMessage(ofType: nil, within: 10), first["type"] == "notice" else { return }
                    #expect(first["code"] == "gap")
                    #expect(first["from"] == 1)
                    let floor = try #require(first["to"]?.intValue)
                    var events: [JSONObject] = []
                    while let event = await evd.nextMessage(ofType: nil, within: 2), event["type"] == "event" {
                        events.append(event)
                        if event["n"] == 19 { break }
                    }
                    // What is kept is the newest: a run ending with the last event, all above the floor.
                    let ns = events.compactMap { $0["n"]?.intValue }
                    #expect(!ns.isEmpty && ns.last == 19)
                    #expect(ns == Array((ns.first ?? 0)...19))
                    #expect(events.allSatisfy { ($0["seq"]?.intValue ?? 0) > floor })
                    checked = true
                }
                if !checked { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(checked, "retention never removed anything")
        }
    }

    @Test("retention by count cuts exactly after the newest keepEvents of a window, also in a run and between other windows' seqs")
    func retentionCutsExactly() async throws {
        try await withRunningDaemon(configure: {
            $0.journal.keepEvents = 100
            $0.journal.pruneIntervalMs = 20
        }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, n integer)")))
            // Every database event's seq, as delivered live; emits in between take seqs of the
            // state database's window, so the database's seqs are not consecutive.
            let seqs: [Int64] = try await daemon.withClient { watcher in
                _ = try await subscribeEvents(watcher, ["insert-rows", "update-row"])
                try await daemon.withClient { evd in
                    for n in 0..<30 {
                        try await evd.request(.execute(.init(sql: "insert into t(n) values (\(n))")))
                        try await evd.request("emit", ["event": "app.n", "data": ["n": .integer(Int64(n))]])
                    }
                    try await evd.request(.execute(.init(sql: "update t set n = n + 1")))  // one run of 30 events
                    try await evd.request(
                        .execute(
                            .init(
                                sql:
                                    "insert into t(n) with recursive c(x) as (select 1 union all select x + 1 from c where x < 300) select x from c"
                            )
                        )
                    )
                    try await evd.request(.execute(.init(sql: "update t set n = n + 1 where id > 30")))  // 300 events, one run
                    for n in 0..<40 {
                        try await evd.request(.execute(.init(sql: "insert into t(n) values (\(n))")))
                        try await evd.request("emit", ["event": "app.n", "data": ["n": .integer(Int64(n))]])
                    }
                }
                var seqs: [Int64] = []
                while seqs.count < 30 + 30 + 1 + 300 + 40, let event = await watcher.nextMessage(ofType: "event", within: 10) {
                    if let seq = event["seq"]?.intValue { seqs.append(seq) }
                }
                return seqs
            }
            // The newest 100 database events are kept: the floor is the seq of the 101st newest.
            let expected = seqs.sorted()[seqs.count - 101]
            var floor: Int64?
            let deadline = ContinuousClock.now + .seconds(30)
            while floor != expected && ContinuousClock.now < deadline {
                floor = try await daemon.withClient { evd in
                    _ = try await subscribeEvents(evd, ["insert-rows", "update-row"], ["since": 0])
                    guard let first = await evd.nextMessage(ofType: nil, within: 10), first["code"] == "gap" else { return nil }
                    return first["to"]?.intValue
                }
                if floor != expected { try await Task.sleep(for: .milliseconds(50)) }
            }
            #expect(floor == expected, "the floor is \(String(describing: floor)); the 101st newest database event is \(expected)")
        }
    }

    @Test("retention by age drops what is older than keepSeconds, in every window, and keeps what is newer")
    func retentionByAge() async throws {
        try await withRunningDaemon(configure: {
            $0.journal.keepEvents = 0
            $0.journal.keepSeconds = 3  // (what comes after must be replayed within it: a loaded machine is slow)
            $0.journal.pruneIntervalMs = 20
        }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key)")))
            let inserted = try #require(
                try await daemon.withClient { try await $0.requestWithSeq(.execute(.init(sql: "insert into t values (1), (2)"))) }.seq
            )
            let old = try #require(try await daemon.request("emit", ["event": "app.old"])["seq"]?.intValue)
            // Past 3 s, both windows' old events go; what comes after stays.
            var floors: (database: Int64?, state: Int64?) = (nil, nil)
            let deadline = ContinuousClock.now + .seconds(30)
            while ContinuousClock.now < deadline, (floors.database ?? 0) < inserted || (floors.state ?? 0) < old {
                try await Task.sleep(for: .milliseconds(200))
                floors.database = try await Self.gapFloor(daemon, ["insert-rows", "create-table"])
                floors.state = try await Self.gapFloor(daemon, ["app.*"])
            }
            #expect((floors.database ?? 0) >= inserted && (floors.state ?? 0) >= old, "floors \(floors), old seqs \(inserted), \(old)")
            let fresh = try #require(try await daemon.request("emit", ["event": "app.new"])["seq"]?.intValue)
            let replayed = try await daemon.withClient { evd in
                _ = try await subscribeEvents(evd, ["app.*"], ["since": 0])
                var names: [String] = []
                while let message = await evd.nextMessage(ofType: nil, within: 2) {
                    if message["code"] == "caught_up" { break }
                    if let name = message["event"]?.stringValue { names.append(name) }
                }
                return names
            }
            #expect(replayed == ["app.new"], "replayed \(replayed) after the floor, new seq \(fresh)")
        }
    }

    /// The `to` of the gap notice a `since: 0` replay of `events` starts with (nil: none).
    static func gapFloor(_ daemon: RunningDaemon, _ events: [String]) async throws -> Int64? {
        try await daemon.withClient { evd in
            _ = try await subscribeEvents(evd, events, ["since": 0])
            guard let first = await evd.nextMessage(ofType: nil, within: 10), first["code"] == "gap" else { return nil }
            return first["to"]?.intValue
        }
    }

    @Test("evtail --since replays journaled events as NDJSON")
    func evtailSince() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                for n in 1...3 { try await evd.request("emit", ["event": "app.n", "data": ["n": .integer(Int64(n))]]) }
            }
            let result = try await runProcess(
                binaryPath("evtail"),
                ["--socket", daemon.socketPath, "--since", "0", "--count", "3", "app.n"]
            )
            #expect(result.status == 0, "\(result.stderr)")
            let lines = result.stdout.split(separator: "\n").map { try? JSONValue(parsing: Array($0.utf8)) }
            #expect(lines.map { $0?["n"] } == [1, 2, 3])
        }
    }
}

@Suite("evtail --resume")
struct EvtailResumeTests {
    @Test("evtail --name N --resume starts after the last event it printed, across runs, and keeps its position in a file")
    func resume() async throws {
        try await withRunningDaemon { daemon in
            let environment = ["XDG_STATE_HOME": daemon.directory + "/xdg"]
            func emit(_ n: Int) async throws {
                try await daemon.request("emit", ["event": "app.n", "data": ["n": .integer(Int64(n))]])
            }
            func evtail(count: Int) async throws -> [Int64?] {
                let result = try await runProcess(
                    binaryPath("evtail"),
                    ["--socket", daemon.socketPath, "--name", "audit", "--resume", "--since", "0", "--count", "\(count)", "app.n"],
                    environment: environment
                )
                #expect(result.status == 0, "\(result.stderr)")
                return result.stdout.split(separator: "\n").map { try? JSONValue(parsing: Array($0.utf8))["n"]?.intValue ?? nil }
            }
            for n in 1...3 { try await emit(n) }
            // The first run has no position: --since 0 applies.
            #expect(try await evtail(count: 2) == [1, 2])
            let saved = try String(contentsOfFile: daemon.directory + "/xdg/evtail/audit.seq", encoding: .utf8)
            #expect(Int64(saved.trimmingCharacters(in: .whitespacesAndNewlines)) != nil)
            for n in 4...5 { try await emit(n) }
            // Later runs start after the saved position (--since is ignored once there is one).
            #expect(try await evtail(count: 3) == [3, 4, 5])
            try await emit(6)
            #expect(try await evtail(count: 1) == [6])
        }
    }

    @Test("evtail --resume without --name or --position-file is refused")
    func resumeNeedsName() async throws {
        let result = try await runProcess(binaryPath("evtail"), ["--resume", "--socket", "/nonexistent"])
        #expect(result.status != 0)
        #expect(result.stderr.contains("--resume needs --name"))
    }
}

/// Sends `count` emits of `burst.p<publisher>` (data `i`) in one write, ids `<publisher>-<i>`,
/// and returns the seqs of their answers, checking that each is OK and they come in order.
private func pipelineEmits(_ evd: EvdConnection, publisher: Int, count: Int) async throws -> [Int64] {
    var bytes: [UInt8] = []
    for i in 0..<count {
        let request: JSONValue = [
            "op": "emit", "id": .string("\(publisher)-\(i)"), "event": .string("burst.p\(publisher)"),
            "data": ["i": .integer(i)],
        ]
        bytes += request.jsonBytes + [0x0a]
    }
    try await evd.sendRaw(bytes)
    var seqs: [Int64] = []
    while seqs.count < count, let response = await evd.nextMessage(ofType: "response", within: 30) {
        #expect(response["ok"] == true, "\(response)")
        #expect(response["id"] == .string("\(publisher)-\(seqs.count)"))
        seqs.append(response["result"]?["seq"]?.intValue ?? -1)
    }
    return seqs
}

/// Every emit answered, with a seq of its own, rising in the order each connection was answered.
private func checkAnswers(_ answered: [[Int64]], count: Int, sourceLocation: SourceLocation = #_sourceLocation) {
    for seqs in answered {
        #expect(seqs.count == count, sourceLocation: sourceLocation)
        #expect(zip(seqs, seqs.dropFirst()).allSatisfy { $0 < $1 }, "not rising: \(seqs)", sourceLocation: sourceLocation)
    }
    let all = answered.flatMap { $0 }
    #expect(Set(all).count == all.count, "a seq was answered twice", sourceLocation: sourceLocation)
}

/// The events are exactly the answered emits, once each, in seq order, each with the seq its
/// emit was answered with.
private func checkEvents(_ events: [JSONObject], _ answered: [[Int64]], sourceLocation: SourceLocation = #_sourceLocation) {
    let seqs = events.map { $0["seq"]?.intValue ?? -1 }
    #expect(zip(seqs, seqs.dropFirst()).allSatisfy { $0 < $1 }, "not in seq order", sourceLocation: sourceLocation)
    #expect(seqs.sorted() == answered.flatMap { $0 }.sorted(), sourceLocation: sourceLocation)
    for event in events {
        guard let name = event["event"]?.stringValue, name.hasPrefix("burst.p"), let publisher = Int(name.dropFirst(7)),
            publisher < answered.count, let i = event["i"]?.intValue, i >= 0, Int(i) < answered[publisher].count
        else {
            Issue.record("unexpected event \(event)", sourceLocation: sourceLocation)
            continue
        }
        #expect(event["seq"]?.intValue == answered[publisher][Int(i)], sourceLocation: sourceLocation)
    }
}
