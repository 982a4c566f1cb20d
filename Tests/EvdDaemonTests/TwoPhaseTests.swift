import CSQLite
import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// Two-phase commit (PROTOCOL.md §3): prepare, decide from any session, and a prepared transaction
/// that outlives its session and the daemon. The kill -9 case is `scripts/crash-test`'s; here a
/// graceful restart (which also drops the open transaction) exercises the same redo at start-up.
@Suite("Two-phase commit")
struct TwoPhaseTests {
    /// Every row of `table`, ordered by its first column.
    private func rows(_ evd: EvdConnection, _ table: String) async throws -> [JSONValue] {
        let result = try await evd.request("execute", ["sql": .string("select * from \(table) order by 1")])
        return result["rows"]?.arrayValue ?? []
    }

    /// Runs `setup`, then prepares a two-phase transaction `xid` of `work` in a daemon on
    /// `directory`, and stops that daemon: the next one there must hold it prepared again.
    private func prepareThenStop(in directory: String, setup: [String], xid: String, work: [String]) async throws {
        try await withDaemon(in: directory) { daemon, _ in
            try await daemon.withClient { evd in
                for sql in setup { try await evd.request("execute", ["sql": .string(sql)]) }
                try await evd.request("begin_twophase", ["xid": .string(xid)])
                for sql in work { try await evd.request("execute", ["sql": .string(sql)]) }
                try await evd.request("prepare_twophase", ["xid": .string(xid)])
            }
        }
    }

    @Test("prepared changes stay invisible until another session commits them; the 2PC events say is_prepared")
    func commitFromAnotherSession() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, v text)")))
            try await daemon.withClient { watcher in
                _ = try await subscribeEvents(watcher, ["begin_twophase", "prepare_twophase", "commit_twophase", "insert-rows"])
                try await daemon.withClient { a in
                    try await a.request("begin_twophase", ["xid": "tx-1"])
                    try await a.request(.execute(.init(sql: "insert into t(v) values ('a'), ('b')")))
                    try await a.request("prepare_twophase", ["xid": "tx-1"])
                    // The session is no longer in the transaction: it can do other work.
                    let outside = try await a.expectError("commit")
                    #expect(outside.code == "not_in_transaction")
                }
                try await daemon.withClient { b in
                    let pending = try await b.request("recover")
                    #expect(pending == ["xids": ["tx-1"]])
                    try await b.request("commit_twophase", ["xid": "tx-1"])
                    let tRows = try await self.rows(b, "t")
                    #expect(tRows == [[1, "a"], [2, "b"]])
                    let pending2 = try await b.request("recover")
                    #expect(pending2 == ["xids": []])
                }
                let events = try await collectEvents(watcher, until: "insert-rows")
                #expect(events.map { $0["event"] } == ["begin_twophase", "prepare_twophase", "commit_twophase", "insert-rows"])
                #expect(events[0]["xid"] == "tx-1")
                #expect(events[1]["xid"] == "tx-1")
                #expect(events[2]["is_prepared"] == true)
                #expect(events[3]["num_rows"] == 2)
            }
        }
    }

    @Test("a prepared transaction survives its session and a restart, holding the write lock until the decision")
    func survivesRestart() async throws {
        try await withTemporaryDirectory { directory in
            let schema = [
                "create table plain(id integer primary key, n real, b blob, s text)",
                "create table nokey(a, b)",
                "create table pairs(k1 text, k2 integer, v, primary key (k1, k2)) without rowid",
                "create table parent(id integer primary key)",
                "create table child(id integer primary key, parent integer references parent(id) on delete cascade)",
                "create table audit(what text)",
                "create trigger plain_audit after insert on plain begin insert into audit values ('plain ' || new.id); end",
            ]
            let lastSeq: Int64 = try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    for sql in schema { try await evd.request("execute", ["sql": .string(sql)]) }
                    try await evd.request(.execute(.init(sql: "insert into nokey values (1, 'one'), (2, 'two')")))
                    try await evd.request(.execute(.init(sql: "insert into pairs values ('x', 1, 'old')")))
                    try await evd.request(.execute(.init(sql: "insert into parent values (1), (2)")))
                    try await evd.request(.execute(.init(sql: "insert into child values (10, 1), (20, 2)")))
                    let mark = try await evd.request("emit", ["event": "app.mark"])
                    try await evd.request("begin_twophase", ["xid": "survivor"])
                    try await evd.request(
                        "execute",
                        ["sql": "insert into plain(n, b, s) values (?, ?, ?)", "params": [1.0, ["$base64": "AP8="], "é"]]
                    )
                    try await evd.request(.execute(.init(sql: "update nokey set b = 'uno', rowid = 7 where a = 1")))
                    try await evd.request(.execute(.init(sql: "delete from nokey where a = 2")))
                    try await evd.request(.execute(.init(sql: "update pairs set k2 = 2, v = 'new' where k1 = 'x'")))
                    try await evd.request(.execute(.init(sql: "delete from parent where id = 1")))
                    try await evd.request("prepare_twophase", ["xid": "survivor"])
                    return try #require(mark["seq"]?.intValue)
                }
            }
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    let pending = try await evd.request("recover")
                    #expect(pending == ["xids": ["survivor"]])
                    // The re-prepared transaction holds the write lock: a writer times out.
                    try await evd.request("execution_options", ["options": ["busy_timeout_ms": 100]])
                    let blocked = try await evd.expectError("execute", ["sql": "insert into audit values ('late')"])
                    #expect(blocked.code == "busy")
                    let plainRows = try await self.rows(evd, "plain")
                    #expect(plainRows == [])
                    _ = try await subscribeEvents(evd, ["insert-rows", "update-row", "delete-row"], ["since": .int(lastSeq)])
                    try await evd.request("commit_twophase", ["xid": "survivor"])
                    let plainRows2 = try await self.rows(evd, "plain")
                    #expect(plainRows2 == [[1, 1.0, ["$base64": "AP8="], "é"]])
                    let result = try await evd.request(.execute(.init(sql: "select rowid, * from nokey")))["rows"]
                    #expect(result == [[7, 1, "uno"]])
                    let pairsRows = try await self.rows(evd, "pairs")
                    #expect(pairsRows == [["x", 2, "new"]])
                    let childRows = try await self.rows(evd, "child")
                    #expect(childRows == [[20, 2]])
                    // The trigger ran once, at the original insert: the redo does not run it again.
                    let auditRows = try await self.rows(evd, "audit")
                    #expect(auditRows == [["plain 1"]])
                    let events = try await collectEvents(evd, until: "delete-row", occurrence: 3)
                    #expect(
                        events.map { $0["event"] } == [
                            "insert-rows", "insert-rows", "update-row", "delete-row", "update-row", "delete-row", "delete-row",
                        ]
                    )
                    #expect(events[0]["table"] == "plain")
                    #expect(events[1]["table"] == "audit")
                    // Re-prepared after the restart, it is still one transaction: its id is the
                    // seq of its first event, and its last ends it.
                    let first = try #require(events.first?["seq"]?.intValue)
                    let last = try #require(events.last?["seq"]?.intValue)
                    #expect(events.map { $0["seq"]?.intValue } == (first...last).map { $0 })
                    #expect(events.allSatisfy { $0["tx"] == .int(first) && $0["tx_last"] == .int(last) })
                    #expect(events.map { $0["tx_end"] == .bool(true) } == Array(repeating: false, count: events.count - 1) + [true])
                    #expect(events.allSatisfy { $0["schema_version"]?.intValue != nil })
                }
            }
            // Decided: a third start has nothing to recover, and the data stays.
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    let pending2 = try await evd.request("recover")
                    #expect(pending2 == ["xids": []])
                    let plainRows3 = try await self.rows(evd, "plain").count
                    #expect(plainRows3 == 1)
                    let evdTwophaseRows = try await self.rows(evd, "_evd_twophase")
                    #expect(evdTwophaseRows == [])
                }
            }
        }
    }

    @Test("rollback_twophase of a prepared transaction: nothing visible, no committed events, nothing after a restart")
    func rollbackPrepared() async throws {
        try await withTemporaryDirectory { directory in
            try await self.prepareThenStop(
                in: directory,
                setup: ["create table t(id integer primary key)"],
                xid: "doomed",
                work: ["insert into t values (1)"]
            )
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    _ = try await subscribeEvents(evd, ["rollback_twophase", "insert-rows", "app.done"])
                    try await evd.request("rollback_twophase", ["xid": "doomed"])
                    try await evd.request("emit", ["event": "app.done"])
                    let events = try await collectEvents(evd, until: "app.done")
                    #expect(events.map { $0["event"] } == ["rollback_twophase", "app.done"])
                    #expect(events[0]["is_prepared"] == true)
                    let tRows = try await self.rows(evd, "t")
                    #expect(tRows == [])
                    let again = try await evd.expectError("commit_twophase", ["xid": "doomed"])
                    #expect(again.code == "bad_request")
                    #expect(again.extra["field"] == "xid")
                }
            }
            try await withDaemon(in: directory) { daemon, _ in
                let pending = try await daemon.request("recover")
                #expect(pending == ["xids": []])
            }
        }
    }

    @Test("commit_twophase and rollback_twophase before prepare end the session's own transaction in one phase")
    func onePhase() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key)")))
            try await daemon.withClient { evd in
                _ = try await subscribeEvents(evd, ["commit_twophase", "rollback_twophase"])
                try await evd.request("begin_twophase", ["xid": "one"])
                try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                try await evd.request("commit_twophase", ["xid": "one"])
                try await evd.request("begin_twophase", ["xid": "two"])
                try await evd.request(.execute(.init(sql: "insert into t values (2)")))
                try await evd.request("rollback_twophase", ["xid": "two"])
                let events = try await collectEvents(evd, until: "rollback_twophase")
                #expect(events.map { $0["event"] } == ["commit_twophase", "rollback_twophase"])
                #expect(events.map { $0["is_prepared"] } == [false, false])
                let tRows = try await self.rows(evd, "t")
                #expect(tRows == [[1]])
            }
        }
    }

    @Test("what cannot be prepared is refused, and the transaction stays open to commit or roll back")
    func refusals() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table parent(id integer primary key)")))
                try await evd.request(
                    "execute",
                    [
                        "sql":
                            "create table child(id integer primary key, parent integer references parent(id) deferrable initially deferred)"
                    ]
                )

                let missing = try await evd.expectError("begin_twophase", [:])
                #expect(missing.code == "bad_request")
                #expect(missing.extra["field"] == "xid")
                let none = try await evd.expectError("prepare_twophase", ["xid": "x"])
                #expect(none.code == "not_in_transaction")
                let unknown = try await evd.expectError("commit_twophase", ["xid": "never"])
                #expect(unknown.code == "bad_request")
                #expect(unknown.extra["field"] == "xid")

                try await evd.request("begin_twophase", ["xid": "fk"])
                let nested = try await evd.expectError("begin_twophase", ["xid": "other"])
                #expect(nested.code == "already_in_transaction")
                let wrong = try await evd.expectError("prepare_twophase", ["xid": "other"])
                #expect(wrong.extra["field"] == "xid")
                try await evd.request(.execute(.init(sql: "insert into child values (1, 99)")))
                let dangling = try await evd.expectError("prepare_twophase", ["xid": "fk"])
                #expect(dangling.code == "sql_error")
                #expect(dangling.extra["sqlite_code"] == "SQLITE_CONSTRAINT_FOREIGNKEY")
                // Still open and unprepared: fix it, then prepare.
                try await evd.request(.execute(.init(sql: "insert into parent values (99)")))
                try await evd.request("prepare_twophase", ["xid": "fk"])
                let taken = try await evd.expectError("begin_twophase", ["xid": "fk"])
                #expect(taken.extra["field"] == "xid")
                try await evd.request("commit_twophase", ["xid": "fk"])

                try await evd.request("begin_twophase", ["xid": "ddl"])
                try await evd.request(.execute(.init(sql: "create table late(x)")))
                let ddl = try await evd.expectError("prepare_twophase", ["xid": "ddl"])
                #expect(ddl.code == "bad_request")
                #expect(ddl.message.contains("schema"))
                try await evd.request("rollback_twophase", ["xid": "ddl"])
                let childRows = try await self.rows(evd, "child")
                #expect(childRows == [[1, 99]])
            }
        }
    }

    @Test("a transaction that committed just before a crash (its marker in the database) is not applied again")
    func committedBeforeCrash() async throws {
        try await withTemporaryDirectory { directory in
            try await self.prepareThenStop(
                in: directory,
                setup: ["create table t(id integer primary key)"],
                xid: "done",
                work: ["insert into t values (1)"]
            )
            // What a crash between the COMMIT and forgetting the log leaves: the changes and the
            // marker committed, the log entry still there.
            let log = try SQLiteConnection(path: directory + "/state/twophase.db", flags: SQLITE_OPEN_READWRITE)
            let token = try #require(try log.scalarInt("SELECT token FROM prepared"))
            let database = try SQLiteConnection(path: directory + "/main.db", flags: SQLITE_OPEN_READWRITE)
            try database.exec(PooledConnection.markerTableSQL)
            try database.exec("BEGIN; INSERT INTO t VALUES (1); INSERT INTO _evd_twophase VALUES (\(token), 'done'); COMMIT")
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    let pending = try await evd.request("recover")
                    #expect(pending == ["xids": []])
                    let tRows = try await self.rows(evd, "t")
                    #expect(tRows == [[1]])
                    let evdTwophaseRows = try await self.rows(evd, "_evd_twophase")
                    #expect(evdTwophaseRows == [])
                }
            }
            let remaining = try log.scalarInt("SELECT count(*) FROM prepared")
            #expect(remaining == 0)
        }
    }

    @Test("a logged transaction whose changes no longer apply is listed by recover and can only be rolled back")
    func unrecoverable() async throws {
        try await withTemporaryDirectory { directory in
            try await self.prepareThenStop(
                in: directory,
                setup: ["create table t(id integer primary key, v)", "insert into t values (1, 'a')"],
                xid: "stale",
                work: ["update t set v = 'b' where id = 1"]
            )
            // Changed outside evd while it was down: the row the transaction updated is gone.
            let database = try SQLiteConnection(path: directory + "/main.db", flags: SQLITE_OPEN_READWRITE)
            try database.exec("DELETE FROM t")
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    let pending = try await evd.request("recover")
                    #expect(pending == ["xids": ["stale"]])
                    let refused = try await evd.expectError("commit_twophase", ["xid": "stale"])
                    #expect(refused.extra["field"] == "xid")
                    #expect(refused.message.contains("roll it back"))
                    try await evd.request("rollback_twophase", ["xid": "stale"])
                    let pending2 = try await evd.request("recover")
                    #expect(pending2 == ["xids": []])
                    // Nothing holds the lock.
                    try await evd.request(.execute(.init(sql: "insert into t values (2, 'c')")))
                }
            }
        }
    }
}
