import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// Group commit (`CommitGroups`, docs/protocol.md "Group commit"): concurrent requests that are each
/// their own transaction commit together, each in its own savepoint, with its own events and seqs.
@Suite("Commit groups")
struct CommitGroupTests {
    /// The pool's group figures: groups run, requests they held, requests queued for the next.
    static func figures(_ daemon: RunningDaemon) async throws -> (groups: Int64, requests: Int64, queued: Int64) {
        let pool = try await daemon.request("stats")["pools"]?["main"]
        return (pool?["commit_groups"]?.intValue ?? -1, pool?["grouped_requests"]?.intValue ?? -1, pool?["group_queue"]?.intValue ?? -1)
    }

    static let schema = """
        create table t(id integer primary key, v text unique);
        create table parent(id integer primary key);
        create table child(id integer primary key, parent integer references parent(id) deferrable initially deferred);
        create table boom(v text);
        create trigger boom_rollback before insert on boom when new.v = 'boom' begin select raise(rollback, 'boom says no'); end;
        insert into parent values (1);
        """

    /// Runs `body` while another session holds the write lock (an open transaction that wrote), so
    /// that the requests `body` sends queue behind the group that waits for it; the lock is let go
    /// after `body`.
    static func behindHeldLock<T: Sendable>(
        _ daemon: RunningDaemon,
        _ body: @Sendable () async throws -> T
    ) async throws -> T {
        try await daemon.withClient { holder in
            try await holder.request("begin")
            try await holder.request(.execute(.init(sql: "insert into parent values (100)")))
            let result = try await body()
            try await holder.request("commit")
            return result
        }
    }

    /// One answer: the result or the error, and the client's hello (its session).
    typealias Answer = (result: JSONObject?, error: EvdError?, hello: JSONObject)

    /// Forms a group behind a held write lock: a first insert waits for the lock as a group of its
    /// own, then each of `members` (`execute` arguments) queues behind it, in order; once the lock
    /// is let go the first commits alone and the members as one group. Returns the first's answer,
    /// then the members'.
    static func groupBehindHeldLock(_ daemon: RunningDaemon, _ members: [JSONObject]) async throws -> [Answer] {
        let tasks = try await Self.behindHeldLock(daemon) {
            let first = try await Self.queue(daemon, "execute", ["sql": "insert into t(v) values ('first')"], untilQueued: 0)
            try await Task.sleep(for: .milliseconds(100))
            var tasks = [first]
            for (index, member) in members.enumerated() {
                tasks.append(try await Self.queue(daemon, "execute", member, untilQueued: Int64(index + 1)))
            }
            return tasks
        }
        var answers: [Answer] = []
        for task in tasks { answers.append(try await task.value) }
        return answers
    }

    /// Sends `request` on its own connection (busy timeout 60 s) and returns once the group queue
    /// holds `queued` requests; the response comes through the returned task.
    static func queue(
        _ daemon: RunningDaemon,
        _ op: String,
        _ arguments: JSONObject,
        untilQueued queued: Int64
    ) async throws -> Task<(JSONObject?, EvdError?, JSONObject), any Error> {
        let task = Task {
            try await daemon.withClient { evd in
                try await evd.request("execution_options", ["options": ["busy_timeout_ms": 60000]])
                do {
                    let result = try await evd.request(op, arguments)
                    return (Optional(result), nil as EvdError?, evd.hello)
                } catch let error as EvdError {
                    return (nil as JSONObject?, Optional(error), evd.hello)
                }
            }
        }
        let deadline = ContinuousClock.now + .seconds(20)
        while try await Self.figures(daemon).queued < queued {
            guard ContinuousClock.now < deadline else {
                Issue.record("the group queue never held \(queued)")
                break
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        return task
    }

    /// The events that arrive until none has for half a second.
    static func drain(_ evd: EvdConnection) async -> [JSONObject] {
        var events: [JSONObject] = []
        while let event = await evd.nextMessage(ofType: "event", within: 0.5) { events.append(event) }
        return events
    }

    @Test("concurrent writers: every request answered with its own seq and tx, every row there, fewer COMMITs than requests")
    func concurrentWriters() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table w(id integer primary key, client int, n int, v text)")))
            try await daemon.withClient { watcher in
                try await watcher.request(.subscribe(.init(events: ["insert-rows", "update-row"])))
                let before = try await Self.figures(daemon)
                let clients = 8
                let rounds = 40
                // Each client: a raw insert, a structured insert, an update of its own first row.
                let answered = try await withThrowingTaskGroup(of: [(Int64, String, JSONValue?)].self) { group in
                    for client in 0..<clients {
                        group.addTask {
                            try await daemon.withClient { evd in
                                var seqs: [(Int64, String, JSONValue?)] = []
                                for n in 0..<rounds {
                                    let (raw, rawSeq) = try await evd.requestWithSeq(
                                        .execute(
                                            .init(
                                                sql: "insert into w(client, n, v) values (?, ?, 'raw')",
                                                params: .positional([.integer(Int64(client)), .integer(Int64(n))])
                                            )
                                        )
                                    )
                                    #expect(raw["changes"] == 1)
                                    seqs.append((try #require(rawSeq), "insert-rows", evd.hello["session"]))
                                    let (_, insertSeq) = try await evd.requestWithSeq(
                                        .structured(
                                            .insert(
                                                table: "w",
                                                rows: JSONRows(objects: [
                                                    ["client": .integer(Int64(client)), "n": .integer(Int64(n)), "v": "op"]
                                                ])!,
                                                ignore: false,
                                                replace: false,
                                                alter: false,
                                                returning: false
                                            ),
                                            database: nil
                                        )
                                    )
                                    seqs.append((try #require(insertSeq), "insert-rows", evd.hello["session"]))
                                    let (_, updateSeq) = try await evd.requestWithSeq(
                                        .execute(
                                            .init(
                                                sql: "update w set v = 'raw+' where client = ? and n = 0 and v != 'op'",
                                                params: .positional([.integer(Int64(client))])
                                            )
                                        )
                                    )
                                    seqs.append((try #require(updateSeq), "update-row", evd.hello["session"]))
                                }
                                return seqs
                            }
                        }
                    }
                    var all: [(Int64, String, JSONValue?)] = []
                    for try await seqs in group { all += seqs }
                    return all
                }
                #expect(answered.count == clients * rounds * 3)
                #expect(Set(answered.map(\.0)).count == answered.count, "two requests were answered the same seq")
                var events: [Int64: JSONObject] = [:]
                let last = try #require(answered.map(\.0).max())
                while (events.keys.max() ?? 0) < last {
                    guard let event = await watcher.nextMessage(ofType: "event", within: 20) else { break }
                    if let seq = event["seq"]?.intValue { events[seq] = event }
                }
                for (seq, name, session) in answered {
                    let event = try #require(events[seq], "no event with the answered seq \(seq)")
                    #expect(event["event"]?.stringValue == name)
                    #expect(event["session"] == session, "seq \(seq) is another session's")
                    // Each request is a transaction of its own: one event, its own tx.
                    #expect(event["tx"] == .int(seq) && event["tx_last"] == .int(seq) && event["tx_end"] == .bool(true))
                }
                #expect(events.count == answered.count)
                let rows = try await daemon.request(.execute(.init(sql: "select count(*), sum(v = 'raw+'), sum(v = 'op') from w")))
                #expect(
                    rows["rows"] == [[.integer(Int64(clients * rounds * 2)), .integer(Int64(clients)), .integer(Int64(clients * rounds))]]
                )
                let after = try await Self.figures(daemon)
                let requests = after.requests - before.requests
                let groups = after.groups - before.groups
                #expect(requests == Int64(clients * rounds * 3), "every write was grouped")
                #expect(groups < requests, "no group ever held more than one request: \(groups) groups")
            }
        }
    }

    @Test("a group formed behind a held lock: a duplicate key and a deferred foreign key fail alone, the rest commit once, in order")
    func membersFailAlone() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "select 1")))
            try await daemon.request(.execute(.init(sql: Self.schema)))
            try await daemon.request(.execute(.init(sql: "insert into t(v) values ('taken')")))
            try await daemon.withClient { watcher in
                try await watcher.request(.subscribe(.init(events: ["insert-rows", "rollback", "commit"])))
                let before = try await Self.figures(daemon)
                let results = try await Self.groupBehindHeldLock(
                    daemon,
                    [
                        ["sql": "insert into t(v) values ('b')"], ["sql": "insert into t(v) values ('taken')"],
                        ["sql": "insert into child values (1, 42)"], ["sql": "insert into t(v) values ('e')"],
                    ]
                )
                #expect(results[0].0?["changes"] == 1)
                #expect(results[1].0?["changes"] == 1)
                #expect(results[2].1?.code == "sql_error")
                #expect(results[2].1?.extra["sqlite_code"] == "SQLITE_CONSTRAINT_UNIQUE")
                #expect(results[3].1?.extra["sqlite_code"] == "SQLITE_CONSTRAINT_FOREIGNKEY", "\(String(describing: results[3].1))")
                #expect(results[4].0?["changes"] == 1)
                let after = try await Self.figures(daemon)
                #expect(after.groups - before.groups == 2, "the leader alone, then the four together")
                #expect(after.requests - before.requests == 5)
                let table = try await daemon.request(.execute(.init(sql: "select v from t order by id")))
                #expect(table["rows"] == [["taken"], ["first"], ["b"], ["e"]])
                #expect(try await daemon.request(.execute(.init(sql: "select count(*) from child")))["rows"] == [[0]])
                // Committed events: the holder's, then one insert-rows for each member that committed,
                // in the order they ran, each its own transaction.
                let events = try await collectEvents(watcher, until: "insert-rows", occurrence: 4)
                let inserts = events.filter { $0["event"] == "insert-rows" }
                #expect(inserts.map { $0["table"] } == ["parent", "t", "t", "t"])
                #expect(
                    inserts.dropFirst().map(\.["session"]) == [results[0].2["session"], results[1].2["session"], results[4].2["session"]]
                )
                #expect(inserts.allSatisfy { $0["tx"] == $0["seq"] && $0["tx_end"] == .bool(true) })
                // The failed members rolled back, each with its own session.
                let rest = await Self.drain(watcher)
                let rollbacks = (events + rest).filter { $0["event"] == "rollback" }.map(\.["session"])
                #expect(Set(rollbacks) == [results[2].2["session"], results[3].2["session"]])
            }
        }
    }

    @Test("a member that ends the whole transaction (RAISE(ROLLBACK)) costs nobody else: those before it run again alone and commit once")
    func transactionEndedByOne() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: Self.schema)))
            try await daemon.withClient { watcher in
                try await watcher.request(.subscribe(.init(events: ["insert-rows", "rollback"])))
                let results = try await Self.groupBehindHeldLock(
                    daemon,
                    [
                        ["sql": "insert into t(v) values ('b')"], ["sql": "insert into boom values ('ok')"],
                        ["sql": "insert into boom values ('boom')"], ["sql": "insert into t(v) values ('e')"],
                    ]
                )
                #expect(results[1].0?["changes"] == 1, "\(String(describing: results[1].1))")
                #expect(results[2].0?["changes"] == 1, "\(String(describing: results[2].1))")
                #expect(results[3].1?.code == "sql_error")
                #expect(results[3].1?.message.contains("boom says no") == true)
                #expect(results[4].0?["changes"] == 1)
                let table = try await daemon.request(.execute(.init(sql: "select v from t order by id")))["rows"]
                // 'b' was lost with the group's transaction and ran again alone, after the group.
                #expect(table == [["first"], ["e"], ["b"]], "\(String(describing: table)); \(results.map { $0.1 })")
                #expect(try await daemon.request(.execute(.init(sql: "select v from boom")))["rows"] == [["ok"]])
                // Each committed insert once; the two lost with the transaction rolled back, then ran
                // again alone.
                let events = try await collectEvents(watcher, until: "insert-rows", occurrence: 5)
                let rest = await Self.drain(watcher)
                let inserts = (events + rest).filter { $0["event"] == "insert-rows" }
                #expect(inserts.map(\.["table"]).filter { $0 == "t" }.count == 3)
                #expect(inserts.map(\.["table"]).filter { $0 == "boom" }.count == 1)
                let rollbacks = (events + rest).filter { $0["event"] == "rollback" }.map(\.["session"])
                #expect(
                    rollbacks.sorted { "\($0 ?? .null)" < "\($1 ?? .null)" }
                        == [results[1].2["session"], results[2].2["session"], results[3].2["session"]].sorted {
                            "\($0 ?? .null)" < "\($1 ?? .null)"
                        }
                )
                for (index, result) in results.enumerated() where result.0 != nil {
                    let mine = inserts.filter { $0["session"] == result.2["session"] }
                    #expect(mine.count == 1, "request \(index): \(mine.count) insert-rows")
                }
            }
        }
    }

    @Test(
        "not grouped: a session that sets group_commit false, a read, a script, while a veto listener other than before_execute's is subscribed"
    )
    func notGrouped() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, v text)")))
            var figures = try await Self.figures(daemon)
            try await daemon.request(.execute(.init(sql: "insert into t(v) values ('grouped')")))
            var now = try await Self.figures(daemon)
            #expect(now.requests == figures.requests + 1, "a plain insert is grouped (a group of one)")
            figures = now
            try await daemon.withClient { evd in
                try await evd.request("execution_options", ["options": ["group_commit": false]])
                try await evd.request(.execute(.init(sql: "insert into t(v) values ('alone')")))
            }
            try await daemon.request(.execute(.init(sql: "select count(*) from t")))
            try await daemon.request(.execute(.init(sql: "insert into t(v) values ('x'); insert into t(v) values ('y')")))
            now = try await Self.figures(daemon)
            #expect(now.requests == figures.requests)
            let error = await #expect(throws: EvdError.self) {
                try await daemon.request("execution_options", ["options": ["group_commit": "no"]])
            }
            #expect(error?.code == "bad_request")
            try await daemon.withClient { listener in
                try await listener.request(.subscribe(.init(veto: ["commit"], timeoutMs: 5000, onTimeout: .allow)))
                let insert = Task { try await daemon.request(.execute(.init(sql: "insert into t(v) values ('vetted')"))) }
                let veto = try #require(await listener.nextMessage(ofType: "veto", within: 10))
                try await listener.send(["op": "reply", "seq": veto["seq"] ?? .null, "action": "allow"])
                _ = try await insert.value
            }
            now = try await Self.figures(daemon)
            #expect(now.requests == figures.requests)
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[5]])
        }
    }

    @Test("another uid's grouped requests: its denied and failing members touch nobody else's")
    func anotherUID() async throws {
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: nobodyMayInsertInto("open"))
        }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table open(v text)")))
                try await evd.request(.execute(.init(sql: "create table closed(v text)")))
                try await evd.request(.execute(.init(sql: "create table mine(id integer primary key, n int)")))
                try await evd.request(
                    .execute(
                        .init(
                            sql:
                                "create trigger open_boom before insert on open when new.v = 'boom' begin select raise(rollback, 'no'); end"
                        )
                    )
                )
            }
            let before = try await Self.figures(daemon)
            var requests: [JSONObject] = []
            for n in 0..<150 {
                switch n % 3 {
                case 0: requests.append(execute("insert into closed values ('\(n)')"))
                case 1: requests.append(execute("insert into open values ('boom')"))
                default: requests.append(execute("insert into open values ('\(n)')"))
                }
            }
            let attacker = try asNobody(daemon, requests, linger: 60)
            let writers = 4
            let rounds = 150
            try await withThrowingTaskGroup(of: Void.self) { group in
                for writer in 0..<writers {
                    group.addTask {
                        try await daemon.withClient { evd in
                            for n in 0..<rounds {
                                let result = try await evd.request(
                                    .execute(
                                        .init(
                                            sql: "insert into mine(n) values (?)",
                                            params: .positional([.integer(Int64(writer * rounds + n))])
                                        )
                                    )
                                )
                                #expect(result["changes"] == 1)
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
            let got = responses(try await messages(attacker))
            for n in 0..<150 {
                let response = got[Int64(n + 1)]
                switch n % 3 {
                case 0: #expect(response?["error"]?["code"] == "permission_denied", "\(String(describing: response))")
                case 1: #expect(response?["error"]?["code"] == "sql_error", "\(String(describing: response))")
                default: #expect(response?["ok"] == true, "request \(n + 1): \(String(describing: response))")
                }
            }
            #expect(try await daemon.request(.execute(.init(sql: "select count(*), count(distinct n) from mine")))["rows"] == [[600, 600]])
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from open")))["rows"] == [[50]])
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from closed")))["rows"] == [[0]])
            let after = try await Self.figures(daemon)
            #expect(after.requests - before.requests >= 600)
        }
    }
}
