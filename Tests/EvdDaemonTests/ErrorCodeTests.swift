import EvdClient
import Foundation
import Logging
import OrderedCollections
import ServiceLifecycle
import Testing

@testable import EvdDaemon

/// PROTOCOL.md §7: each error code this evd can produce, provoked for real.
///
/// Not here: `permission_denied` (needs another uid), `vetoed` (no veto listeners yet),
/// `no_such_table` and `no_such_row` (structured ops), `token_invalid`/`token_expired` (login).
@Suite("Error codes")
struct ErrorCodeTests {
    @Test("bad_json: id null, connection usable")
    func badJSON() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.sendRaw(Array(#"{"op":"ping","id":1"#.utf8) + [0x0a])
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == .null)
                #expect(response["ok"] == false)
                #expect(response["error"]?["code"] == "bad_json")
                #expect(response["error"]?["message"]?.stringValue?.isEmpty == false)
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test("line_too_long: id null, connection usable")
    func lineTooLong() async throws {
        try await withRunningDaemon(configure: { $0.maxLineBytes = 4096 }) { daemon in
            try await daemon.withClient { evd in
                let line = #"{"op":"ping","id":"x","pad":""# + String(repeating: "z", count: 5000) + #""}"#
                try await evd.sendRaw(Array(line.utf8) + [0x0a])
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == .null)
                #expect(response["error"]?["code"] == "line_too_long")
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    /// One faulty request and the argument its `bad_request` must name.
    struct BadRequestCase: Sendable, CustomTestStringConvertible {
        let op: String
        let arguments: JSONObject
        let field: String
        var testDescription: String { "\(self.op) \(JSONValue.object(self.arguments).jsonString) → \(self.field)" }

        init(_ op: String, _ arguments: JSONObject, field: String) {
            self.op = op
            self.arguments = arguments
            self.field = field
        }
    }

    static let badRequests: [BadRequestCase] = [
        // Missing required arguments.
        .init("execute", [:], field: "sql"),
        .init("execute", ["sql": .null], field: "sql"),
        .init("executemany", ["sql": "select ?"], field: "params"),
        .init("executemany", ["params": [[1]]], field: "sql"),
        .init("savepoint", [:], field: "name"),
        .init("release_savepoint", [:], field: "name"),
        .init("rollback_savepoint", [:], field: "name"),
        .init("execution_options", [:], field: "options"),
        .init("emit", [:], field: "event"),
        .init("unsubscribe", [:], field: "subscription"),
        .init("subscribe", [:], field: "events"),
        .init("subscribe", ["name": "no events"], field: "events"),
        // Wrong types.
        .init("execute", ["sql": 5], field: "sql"),
        .init("execute", ["sql": "select 1", "params": "x"], field: "params"),
        .init("execute", ["sql": "select ?", "params": [[1]]], field: "params[0]"),
        .init("execute", ["sql": "select :a", "params": ["a": ["b": 1]]], field: "params.a"),
        .init("execute", ["sql": "select ?", "params": [["$base64": "not base64!"]]], field: "params[0]"),
        .init("execute", ["sql": "select ?", "params": [["$base64": "AA==", "x": 1]]], field: "params[0]"),
        .init("execute", ["sql": "select 1", "database": 1], field: "database"),
        .init("executemany", ["sql": "select ?", "params": [1, 2]], field: "params[0]"),
        .init("executemany", ["sql": "select ?", "params": ["a": 1]], field: "params"),
        .init("subscribe", ["events": 5], field: "events"),
        .init("subscribe", ["events": [5]], field: "events"),
        .init("subscribe", ["events": ["app.x"], "rows": "yes"], field: "rows"),
        .init("subscribe", ["events": ["app.x"], "where": ["color": ["nested": 1]]], field: "where.color"),
        .init("subscribe", ["events": ["app.x"], "where": "color"], field: "where"),
        .init("subscribe", ["events": ["app.x"], "mode": "bogus"], field: "mode"),
        .init("subscribe", ["events": ["app.x"], "on_timeout": "maybe"], field: "on_timeout"),
        .init("subscribe", ["events": ["app.x"], "on_overflow": "explode"], field: "on_overflow"),
        .init("subscribe", ["events": ["app.x"], "priority": 1.5], field: "priority"),
        .init("subscribe", ["events": ["app.x"], "name": 7], field: "name"),
        .init("unsubscribe", ["subscription": "1"], field: "subscription"),
        .init("emit", ["event": "app.x", "data": [1]], field: "data"),
        .init("execution_options", ["options": ["query_only": "yes"]], field: "options.query_only"),
        .init("execution_options", ["options": ["busy_timeout_ms": -1]], field: "options.busy_timeout_ms"),
        .init("execution_options", ["options": ["busy_timeout_ms": "5"]], field: "options.busy_timeout_ms"),
        .init("execution_options", ["options": [:], "scope": "galaxy"], field: "scope"),
        // Out of range: rejected, never clamped.
        .init("subscribe", ["events": ["app.x"], "timeout_ms": 0], field: "timeout_ms"),
        .init("subscribe", ["events": ["app.x"], "timeout_ms": 60001], field: "timeout_ms"),
        .init("subscribe", ["events": ["app.x"], "since": -1], field: "since"),
        // Unknown arguments.
        .init("ping", ["bogus": 1], field: "bogus"),
        .init("execute", ["sql": "select 1", "param": [1]], field: "param"),
        .init("events", ["all": true], field: "all"),
        .init("stats", ["verbose": true], field: "verbose"),
        // Parameters that do not fit the SQL.
        .init("execute", ["sql": "select ?, ?", "params": [1]], field: "params"),
        .init("execute", ["sql": "select ?", "params": [1, 2]], field: "params"),
        .init("execute", ["sql": "select 1", "params": [1]], field: "params"),
        .init("execute", ["sql": "select ?"], field: "params"),
        .init("execute", ["sql": "select :a, :b", "params": ["a": 1]], field: "params"),
        .init("execute", ["sql": "select ?", "params": ["a": 1]], field: "params"),
        .init("executemany", ["sql": "select ?", "params": [[1], [1, 2]]], field: "params[1]"),
        // executemany takes one statement.
        .init("executemany", ["sql": "select ?; select ?", "params": [[1, 2]]], field: "sql"),
        // Transaction control belongs to the ops.
        .init("execute", ["sql": "BEGIN"], field: "sql"),
        .init("execute", ["sql": "commit"], field: "sql"),
        .init("execute", ["sql": "SAVEPOINT x"], field: "sql"),
        .init("execute", ["sql": "select 1; ROLLBACK"], field: "sql"),
        .init("executemany", ["sql": "BEGIN IMMEDIATE", "params": [[]]], field: "sql"),
        .init("execute", ["sql": "END"], field: "sql"),
        .init("execute", ["sql": "RELEASE sp"], field: "sql"),
        .init("execute", ["sql": "ROLLBACK TO sp"], field: "sql"),
        // Execution-option pragmas belong to execution_options (a raw one would outlive the session).
        .init("execute", ["sql": "PRAGMA query_only = 0"], field: "sql"),
        .init("execute", ["sql": "select 1; pragma main.QUERY_ONLY=1"], field: "sql"),
        .init("execute", ["sql": "PRAGMA busy_timeout = 1"], field: "sql"),
        // emit: envelope keys in data, and names that are not custom event names.
        .init("emit", ["event": "app.x", "data": ["seq": 1]], field: "data.seq"),
        .init("emit", ["event": "app.x", "data": ["ok": 1, "type": "x"]], field: "data.type"),
        .init("emit", ["event": "app.x", "data": ["event": "y"]], field: "data.event"),
        .init("emit", ["event": "app.x", "data": ["time": "now"]], field: "data.time"),
        .init("emit", ["event": "app.x", "data": ["subscription": 1]], field: "data.subscription"),
        .init("emit", ["event": "app.x", "data": ["session": 1]], field: "data.session"),
        .init("emit", ["event": "app.x", "data": ["actor": "me"]], field: "data.actor"),
        .init("emit", ["event": "checkin"], field: "event"),
        .init("emit", ["event": "app.*"], field: "event"),
    ]

    @Test("bad_request names the argument at fault", arguments: badRequests)
    func badRequest(_ fault: BadRequestCase) async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let error = try await evd.expectError(fault.op, fault.arguments)
                #expect(error.code == "bad_request")
                #expect(error.extra["field"] == .string(fault.field), "\(error)")
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test("bad_request for a missing or mistyped op")
    func badRequestOp() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                for line in [#"{"id":"a"}"#, #"{"id":"b","op":7}"#, #"{"id":"c","op":null}"#] {
                    try await evd.sendRaw(Array(line.utf8) + [0x0a])
                    let response = try #require(await evd.nextMessage(ofType: "response"))
                    #expect(response["error"]?["code"] == "bad_request", "\(line)")
                    #expect(response["error"]?["field"] == "op", "\(line)")
                }
            }
        }
    }

    @Test("bad_request for an empty savepoint name inside a transaction")
    func badRequestEmptySavepoint() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("begin")
                let error = try await evd.expectError("savepoint", ["name": ""])
                #expect(error.code == "bad_request")
                #expect(error.extra["field"] == "name")
            }
        }
    }

    @Test("a bad_request leaves the database untouched")
    func badRequestRunsNothing() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("execute", ["sql": "create table t(x)"])
                let error = try await evd.expectError(
                    "execute",
                    ["sql": "insert into t values (1); insert into t values (?)", "params": []]
                )
                #expect(error.code == "bad_request")
                #expect(error.extra["field"] == "params")
                let control = try await evd.expectError("execute", ["sql": "insert into t values (1); COMMIT"])
                #expect(control.extra["field"] == "sql")
                #expect(try await evd.request("execute", ["sql": "select count(*) from t"])["rows"] == [[0]])
            }
        }
    }

    @Test("unknown_op")
    func unknownOp() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let error = try await evd.expectError("frobnicate")
                #expect(error.code == "unknown_op")
                #expect(error.message.contains("frobnicate"))
                let empty = try await evd.expectError("")
                #expect(empty.code == "unknown_op")
            }
        }
    }

    @Test("unknown_event with a suggestion when a catalog name is close")
    func unknownEventSuggestion() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let error = try await evd.expectError("subscribe", ["events": ["before_cursor_exec"]])
                #expect(error.code == "unknown_event")
                #expect(error.extra["suggestion"] == "before_cursor_execute")
                #expect(error.extra["event"] == "before_cursor_exec")
                #expect(error.extra["field"] == "events")
                let dashed = try await evd.expectError("subscribe", ["events": ["app.ok", "insert_rows"]])
                #expect(dashed.code == "unknown_event")
                #expect(dashed.extra["suggestion"] == "insert-rows")
                let veto = try await evd.expectError("subscribe", ["veto": ["before_cursor_exec"]])
                #expect(veto.code == "unknown_event")
                #expect(veto.extra["field"] == "veto")
                #expect(veto.extra["suggestion"] == "before_cursor_execute")
            }
        }
    }

    @Test("unknown_event for a name with no namespace that is not in the catalog")
    func unknownEventNoNamespace() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let error = try await evd.expectError("subscribe", ["events": ["deployed"]])
                #expect(error.code == "unknown_event")
                #expect(error.extra["event"] == "deployed")
                let far = try await evd.expectError("subscribe", ["events": ["qqqqqqqqqqqqqqqqqqqq"]])
                #expect(far.code == "unknown_event")
                #expect(far.extra["suggestion"] == nil)
                // Nothing was subscribed by the failed requests.
                #expect(try await evd.request("stats")["subscriptions"] == 0)
            }
        }
    }

    @Test("unknown_event for emit of a name without a namespace")
    func unknownEventEmit() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let error = try await evd.expectError("emit", ["event": "deployed"])
                #expect(error.code == "unknown_event")
                #expect(error.extra["event"] == "deployed")
                let names = try await evd.request("events")["events"]?.arrayValue?.compactMap {
                    $0["name"]?.stringValue
                }
                #expect(names?.contains("deployed") == false)
            }
        }
    }

    @Test("not_vetoable when veto names only events that cannot be vetoed")
    func notVetoable() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                for names: JSONValue in [["checkin"], ["after_*"], ["insert-rows"], ["checkout", "logout"]] {
                    let error = try await evd.expectError("subscribe", ["veto": names])
                    #expect(error.code == "not_vetoable", "\(names)")
                }
                let error = try await evd.expectError("subscribe", ["veto": ["checkin"]])
                #expect(error.extra["event"] == "checkin")
                #expect(error.extra["field"] == "veto")
            }
        }
    }

    @Test("sql_error with sqlite_code SQLITE_CONSTRAINT_UNIQUE on a unique index violation")
    func sqlErrorUnique() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(
                    "execute",
                    ["sql": "create table dogs(name text); create unique index dogs_name on dogs(name)"]
                )
                try await evd.request("execute", ["sql": "insert into dogs values ('Rex')"])
                let error = try await evd.expectError("execute", ["sql": "insert into dogs values ('Rex')"])
                #expect(error.code == "sql_error")
                #expect(error.extra["sqlite_code"] == "SQLITE_CONSTRAINT_UNIQUE")
                #expect(error.message.contains("UNIQUE"))
                let many = try await evd.expectError(
                    "executemany",
                    ["sql": "insert into dogs values (?)", "params": [["Fido"], ["Rex"]]]
                )
                #expect(many.code == "sql_error")
                #expect(many.extra["sqlite_code"] == "SQLITE_CONSTRAINT_UNIQUE")
                // The whole executemany rolled back: Fido is not there.
                #expect(try await evd.request("execute", ["sql": "select name from dogs"])["rows"] == [["Rex"]])
            }
        }
    }

    @Test("sql_error (not no_such_table) for raw SQL on a missing table, and for bad syntax")
    func sqlErrorMissingTable() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let error = try await evd.expectError("execute", ["sql": "select * from no_such_thing"])
                #expect(error.code == "sql_error")
                #expect(error.extra["sqlite_code"] == "SQLITE_ERROR")
                #expect(error.message.contains("no_such_thing"))
                let insert = try await evd.expectError("execute", ["sql": "insert into no_such_thing values (1)"])
                #expect(insert.code == "sql_error")
                let syntax = try await evd.expectError("execute", ["sql": "selec 1"])
                #expect(syntax.code == "sql_error")
                #expect(syntax.extra["sqlite_code"] == "SQLITE_ERROR")
            }
        }
    }

    @Test("no_such_database")
    func noSuchDatabase() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let execute = try await evd.expectError("execute", ["sql": "select 1", "database": "nope"])
                #expect(execute.code == "no_such_database")
                #expect(execute.message.contains("nope"))
                let many = try await evd.expectError(
                    "executemany",
                    ["sql": "select ?", "params": [[1]], "database": "nope"]
                )
                #expect(many.code == "no_such_database")
                let begin = try await evd.expectError("begin", ["database": "nope"])
                #expect(begin.code == "no_such_database")
                // The failed begin opened nothing.
                #expect(try await evd.expectError("commit").code == "not_in_transaction")
            }
        }
    }

    @Test("not_in_transaction for commit, rollback and the savepoint ops without begin")
    func notInTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                for op in ["commit", "rollback"] {
                    #expect(try await evd.expectError(op).code == "not_in_transaction", "\(op)")
                }
                for op in ["savepoint", "release_savepoint", "rollback_savepoint"] {
                    #expect(try await evd.expectError(op, ["name": "sp"]).code == "not_in_transaction", "\(op)")
                }
                try await evd.request("begin")
                try await evd.request("commit")
                #expect(try await evd.expectError("commit").code == "not_in_transaction")
            }
        }
    }

    @Test("already_in_transaction for a second begin")
    func alreadyInTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("begin")
                let error = try await evd.expectError("begin")
                #expect(error.code == "already_in_transaction")
                // The first transaction is still open and usable.
                #expect(try await evd.request("commit") == [:])
            }
        }
    }

    @Test("timeout when no pooled connection frees up in time")
    func timeout() async throws {
        try await withRunningDaemon(configure: {
            $0.poolSize = 1
            $0.checkoutTimeoutMs = 300
        }) { daemon in
            try await daemon.withClient { holder in
                try await holder.request("begin")
                try await daemon.withClient { waiter in
                    let error = try await waiter.expectError("execute", ["sql": "select 1"])
                    #expect(error.code == "timeout")
                    let begin = try await waiter.expectError("begin")
                    #expect(begin.code == "timeout")
                    try await holder.request("commit")
                    #expect(try await waiter.request("execute", ["sql": "select 1"])["rows"] == [[1]])
                }
            }
        }
    }

    @Test("busy when another session holds the write lock and busy_timeout_ms is 0")
    func busy() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": "create table t(x)"])
            try await daemon.withClient { a in
                try await daemon.withClient { b in
                    try await a.request("begin")
                    try await a.request("execute", ["sql": "insert into t values (1)"])
                    try await b.request("execution_options", ["options": ["busy_timeout_ms": 0]])
                    let error = try await b.expectError("execute", ["sql": "insert into t values (2)"])
                    #expect(error.code == "busy")
                    #expect(error.extra["sqlite_code"]?.stringValue?.hasPrefix("SQLITE_BUSY") == true)
                    // Reads still work under WAL, and once the lock is gone so do writes.
                    #expect(try await b.request("execute", ["sql": "select count(*) from t"])["rows"] == [[0]])
                    try await a.request("commit")
                    try await b.request("execute", ["sql": "insert into t values (2)"])
                    #expect(
                        try await b.request("execute", ["sql": "select x from t order by x"])["rows"] == [[1], [2]]
                    )
                }
            }
        }
    }

    @Test("too_many_connections: the refused connection gets the error with id null, then EOF")
    func tooManyConnections() async throws {
        try await withRunningDaemon(configure: { $0.maxSessions = 1 }) { daemon in
            try await daemon.withClient { first in
                #expect(try await first.request("ping") == [:])
                let (bytes, sawEOF) = await plainSocketExchange(socketPath: daemon.socketPath, send: [], halfClose: false)
                #expect(sawEOF)
                let lines = bytes.split(separator: 0x0a)
                #expect(lines.count == 1)
                let line = try #require(lines.first)
                let message = try JSONValue(parsing: Array(line))
                #expect(message["type"] == "response")
                #expect(message["id"] == .null)
                #expect(message["ok"] == false)
                #expect(message["error"]?["code"] == "too_many_connections")
                // The admitted session is unaffected.
                #expect(try await first.request("ping") == [:])
            }
            // Once the first session has gone, a new one is admitted (bounded wait for its cleanup).
            var admitted = false
            for _ in 0..<500 where !admitted {
                admitted = (try? await daemon.withClient { try await $0.request("ping") }) != nil
                if !admitted { try await Task.sleep(for: .milliseconds(10)) }
            }
            #expect(admitted)
        }
    }

    @Test("shutting_down for a request that arrives once shutdown has begun")
    func shuttingDown() async throws {
        try await withStoppableDaemon(configure: {
            $0.poolSize = 1
            $0.checkoutTimeoutMs = 60_000
            $0.shutdownGraceMs = 60_000
        }) { daemon, stop in
            try await daemon.withClient { waiter in
                try await daemon.withClient { holder in
                    // The holder takes the only connection; the waiter's request waits for it, so
                    // the waiter's session stays busy and shutdown keeps the sessions open.
                    try await holder.request("begin")
                    try await waiter.sendRaw(Array(#"{"op":"execute","id":"w","sql":"select 7"}"#.utf8) + [0x0a])
                    var waiting: JSONValue? = nil
                    for _ in 0..<1000 {
                        waiting = try await holder.request("stats")["pools"]?["main"]?["waiting"]
                        if waiting == 1 { break }
                        try await Task.sleep(for: .milliseconds(10))
                    }
                    try #require(waiting == 1)
                    await stop()
                    let notice = try #require(await holder.nextMessage(ofType: "notice"))
                    #expect(notice["code"] == "shutdown")
                    let error = try await holder.expectError("ping")
                    #expect(error.code == "shutting_down")
                    let commit = try await holder.expectError("commit")
                    #expect(commit.code == "shutting_down")
                }
                // The holder left: its transaction rolled back, its connection went to the waiter,
                // whose in-flight request completes.
                var response: JSONObject? = nil
                while response == nil, let message = await waiter.nextMessage() {
                    if message["type"] == "response" { response = message }
                }
                let finished = try #require(response)
                #expect(finished["id"] == "w")
                #expect(finished["result"]?["rows"] == [[7]])
            }
        }
    }
}

@Suite("Shutdown notice")
struct ShutdownNoticeTests {
    @Test("on graceful shutdown every connected client gets notice shutdown", arguments: 0..<3)
    func noticeReachesIdleClients(_ round: Int) async throws {
        try await withStoppableDaemon(configure: { _ in }) { daemon, stop in
            try await daemon.withClient { first in
                try await daemon.withClient { second in
                    _ = try await first.request("subscribe", ["events": ["app.*"]])
                    #expect(try await second.request("ping") == [:])
                    await stop()
                    for client in [first, second] {
                        let notice = try #require(await client.nextMessage(ofType: "notice"))
                        #expect(notice == ["type": "notice", "code": "shutdown"])
                    }
                }
            }
        }
    }
}
