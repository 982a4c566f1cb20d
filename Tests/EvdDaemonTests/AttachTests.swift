import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// Runs `sql` on `evd` and returns its result.
@discardableResult
private func run(_ evd: EvdConnection, _ sql: String, _ more: JSONObject = [:]) async throws -> JSONObject {
    var arguments = more
    arguments["sql"] = .string(sql)
    return try await evd.request("execute", arguments)
}

/// Runs `sql` on `evd`, expecting it to fail, and returns the error.
private func failing(_ evd: EvdConnection, _ sql: String, _ more: JSONObject = [:]) async throws -> EvdError {
    var arguments = more
    arguments["sql"] = .string(sql)
    return try await evd.expectError("execute", arguments)
}

/// Whether `error` is SQLite's "no such table" for `table`: the schema it names is not attached.
private func isNoSuchTable(_ error: EvdError, _ table: String) -> Bool {
    error.code == "sql_error" && error.message.contains("no such table: \(table)")
}

/// A database file `name` in the daemon's directory with a table `t` holding one row (`1`),
/// made by root in one request of a session of its own.
private func makeSideDatabase(_ daemon: RunningDaemon, _ name: String) async throws -> String {
    let path = daemon.directory + "/" + name
    try await daemon.request(
        "execute",
        ["sql": .string("attach database '\(path)' as side; create table side.t(x); insert into side.t values (1)")]
    )
    return path
}

/// A session's ATTACH lasts for the session, as on one SQLite connection (docs/protocol.md,
/// "Attached databases"; docs/security.md): attached again at each checkout, judged each time by
/// the session's actor, never inherited by another session, cleared by login and logout.
@Suite("Attached databases")
struct AttachTests {
    @Test("an ATTACH lasts for the session: later requests, a begin/commit transaction and begin_twophase all see the schema")
    func attachLastsForTheSession() async throws {
        try await withRunningDaemon { daemon in
            let path = daemon.directory + "/s.db"
            try await daemon.withClient { evd in
                try await run(evd, "attach database '\(path)' as s")
                try await run(evd, "create table s.t(x)")
                try await run(evd, "insert into s.t values (1)")
                try await evd.request("executemany", ["sql": "insert into s.t values (?)", "params": [[2], [3]]])
                #expect(try await run(evd, "select x from s.t order by x")["rows"] == [[1], [2], [3]])

                try await evd.request("begin")
                try await run(evd, "insert into s.t values (4)")
                #expect(try await run(evd, "select count(*) from s.t")["rows"] == [[4]])
                try await evd.request("commit")
                #expect(try await run(evd, "select count(*) from s.t")["rows"] == [[4]])

                // A rolled-back transaction's writes to the attached schema roll back with it.
                try await evd.request("begin")
                try await run(evd, "delete from s.t")
                try await evd.request("rollback")
                #expect(try await run(evd, "select count(*) from s.t")["rows"] == [[4]])

                try await evd.request("begin_twophase", ["xid": "x1"])
                #expect(try await run(evd, "select count(*) from s.t")["rows"] == [[4]])
                try await evd.request("rollback_twophase", ["xid": "x1"])

                let list = try await run(evd, "select name from pragma_database_list order by seq")
                #expect(list["rows"] == [["main"], ["s"]])
            }
            // The pool's own database never got the table.
            let main = try await daemon.request("execute", ["sql": "select count(*) from sqlite_schema where name = 't'"])
            #expect(main["rows"] == [[0]])
        }
    }

    @Test("a file whose name has URI characters (?, #, %) is attached again as itself")
    func uriCharactersInTheFileName() async throws {
        try await withRunningDaemon { daemon in
            let path = try await makeSideDatabase(daemon, "we?ird#na%25me.db")
            try await daemon.withClient { evd in
                try await run(evd, "attach database '\(path)' as s")
                #expect(try await run(evd, "select x from s.t")["rows"] == [[1]])
                #expect(try await run(evd, "select file from pragma_database_list where name = 's'")["rows"] == [[.string(path)]])
            }
        }
    }

    @Test("two-phase still refuses a transaction that wrote to a re-attached database")
    func twoPhaseRefusesAttachedWrites() async throws {
        try await withRunningDaemon { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            try await daemon.withClient { evd in
                try await run(evd, "attach database '\(path)' as s")
                try await evd.request("begin_twophase", ["xid": "x1"])
                try await run(evd, "insert into s.t values (2)")
                let refused = try await evd.expectError("prepare_twophase", ["xid": "x1"])
                #expect(refused.code == "bad_request")
                #expect(refused.message.contains("attached database 's'"), "\(refused)")
            }
        }
    }

    @Test("DETACH ends the attachment for the session; a request that fails leaves the attachments as they were")
    func detachEndsIt() async throws {
        try await withRunningDaemon { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            try await daemon.withClient { evd in
                try await run(evd, "attach database '\(path)' as s")
                // The DETACH ran, but its request failed: the session keeps s.
                let failed = try await failing(evd, "detach database s; select * from no_such_table")
                #expect(isNoSuchTable(failed, "no_such_table"), "\(failed)")
                #expect(try await run(evd, "select x from s.t")["rows"] == [[1]])

                try await run(evd, "detach database s")
                let gone = try await failing(evd, "select x from s.t")
                #expect(isNoSuchTable(gone, "s.t"), "\(gone)")
                // Not attached again later either, nor in a transaction.
                try await evd.request("begin")
                let inTransaction = try await failing(evd, "select x from s.t")
                #expect(isNoSuchTable(inTransaction, "s.t"), "\(inTransaction)")
                try await evd.request("rollback")
                #expect(try await run(evd, "select count(*) from pragma_database_list")["rows"] == [[1]])
            }
        }
    }

    @Test("another session never sees an attachment, even on a pool of one connection")
    func otherSessionsNeverInherit() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            try await daemon.withClient { attacher in
                try await daemon.withClient { other in
                    try await run(attacher, "attach database '\(path)' as s")
                    let first = try await failing(other, "select x from s.t")
                    #expect(isNoSuchTable(first, "s.t"), "\(first)")
                    #expect(try await run(attacher, "select x from s.t")["rows"] == [[1]])
                    #expect(try await run(other, "select name from pragma_database_list")["rows"] == [["main"]])
                    try await attacher.request("begin")
                    #expect(try await run(attacher, "select x from s.t")["rows"] == [[1]])
                    try await attacher.request("commit")
                    let again = try await failing(other, "select x from s.t")
                    #expect(isNoSuchTable(again, "s.t"), "\(again)")
                    #expect(try await run(attacher, "select x from s.t")["rows"] == [[1]])
                }
            }
        }
    }

    @Test("another uid with execute-sql and view-table only: ATTACH is refused, and the session has no attachment")
    func restrictedActorCannotAttach() async throws {
        let grants = [Grant(who: .uid(65534), actions: [.executeSQL, .viewTable], database: "main")]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            let got = responses(
                try await messages(
                    try asNobody(
                        daemon,
                        [
                            execute("attach database '\(path)' as s"), execute("select x from s.t"), ["op": "begin"],
                            execute("select x from s.t"),
                        ]
                    )
                )
            )
            #expect(got[1]?["error"]?["code"] == "permission_denied", "\(String(describing: got[1]))")
            #expect(got[1]?["error"]?["action"] == "admin")
            for number: Int64 in [2, 4] {
                let message = got[number]?["error"]?["message"]?.stringValue ?? ""
                #expect(message.contains("no such table: s.t"), "\(String(describing: got[number]))")
            }
            #expect(got[3]?["result"] != nil)
        }
    }

    @Test(
        "attachments are judged again at each checkout by the session's actor: refused on a database where it is no admin, the request fails with permission_denied naming the schema and the session keeps none"
    )
    func reattachIsJudgedAgain() async throws {
        let grants = [
            Grant(who: .uid(65534), actions: [.executeSQL, .viewTable, .admin], database: "main"),
            Grant(who: .uid(65534), actions: [.executeSQL, .viewTable], database: "other"),
        ]
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: grants)
            $0.databases.append(DatabaseConfig(name: "other", path: ($0.socketPath as NSString).deletingLastPathComponent + "/other.db"))
        }) { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            let attach = execute("attach database '\(path)' as s")
            let select = execute("select x from s.t")
            var elsewhere = execute("select 1")
            elsewhere["database"] = "other"
            // A request on the other database, and a begin there.
            for refusedThere in [elsewhere, ["op": "begin", "database": "other"]] {
                let got = responses(try await messages(try asNobody(daemon, [attach, select, refusedThere, select])))
                #expect(got[1]?["result"] != nil, "\(String(describing: got[1]))")
                #expect(got[2]?["result"]?["rows"] == [[1]], "\(String(describing: got[2]))")
                let refused = got[3]?["error"]
                #expect(refused?["code"] == "permission_denied", "\(String(describing: got[3]))")
                #expect(refused?["action"] == "admin")
                #expect(refused?["database"] == "other")
                #expect(refused?["schema"] == "s")
                #expect(refused?["message"]?.stringValue?.contains("'s'") == true)
                let message = got[4]?["error"]?["message"]?.stringValue ?? ""
                #expect(message.contains("no such table: s.t"), "\(String(describing: got[4]))")
            }
        }
    }

    @Test("the policy judges an attached schema's tables by their names: a grant on table t of the pool's database reaches s.t, not s.u")
    func policyGoesByTableName() async throws {
        let grants = [
            Grant(who: .uid(65534), actions: [.executeSQL, .admin], database: "main"),
            Grant(who: .uid(65534), actions: [.viewTable], database: "main", table: "t"),
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            try await daemon.request(
                "execute",
                ["sql": .string("attach database '\(path)' as side; create table side.u(y); insert into side.u values (2)")]
            )
            let got = responses(
                try await messages(
                    try asNobody(
                        daemon,
                        [execute("attach database '\(path)' as s"), execute("select x from s.t"), execute("select y from s.u")]
                    )
                )
            )
            #expect(got[2]?["result"]?["rows"] == [[1]], "\(String(describing: got[2]))")
            #expect(got[3]?["error"]?["code"] == "permission_denied", "\(String(describing: got[3]))")
            #expect(got[3]?["error"]?["table"] == "u")
        }
    }

    @Test("login and logout clear the session's attachments; inside a transaction, its connection keeps them until it ends")
    func loginAndLogoutClear() async throws {
        try await withRunningDaemon { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            let token = try await createToken(daemon, [:])
            try await daemon.withClient { evd in
                try await run(evd, "attach database '\(path)' as s")
                #expect(try await run(evd, "select x from s.t")["rows"] == [[1]])
                try await evd.login(token: token)
                let afterLogin = try await failing(evd, "select x from s.t")
                #expect(isNoSuchTable(afterLogin, "s.t"), "\(afterLogin)")

                try await run(evd, "attach database '\(path)' as s")
                #expect(try await run(evd, "select x from s.t")["rows"] == [[1]])
                try await evd.request("logout")
                let afterLogout = try await failing(evd, "select x from s.t")
                #expect(isNoSuchTable(afterLogout, "s.t"), "\(afterLogout)")

                try await run(evd, "attach database '\(path)' as s")
                try await evd.request("begin")
                try await evd.login(token: token)
                #expect(try await run(evd, "select x from s.t")["rows"] == [[1]])
                try await evd.request("commit")
                let afterTransaction = try await failing(evd, "select x from s.t")
                #expect(isNoSuchTable(afterTransaction, "s.t"), "\(afterTransaction)")
            }
        }
    }

    @Test(
        "an attached file deleted since: the next request fails with sql_error naming the schema (SQLITE_CANTOPEN), the one after runs without the attachment"
    )
    func deletedFile() async throws {
        try await withRunningDaemon { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            let kept = try await makeSideDatabase(daemon, "kept.db")
            try await daemon.withClient { evd in
                try await run(evd, "attach database '\(path)' as s")
                try await run(evd, "attach database '\(kept)' as k")
                #expect(unlink(path) == 0)
                let failed = try await failing(evd, "select x from k.t")
                #expect(failed.code == "sql_error", "\(failed)")
                #expect(failed.extra["sqlite_code"] == "SQLITE_CANTOPEN", "\(failed)")
                #expect(failed.extra["schema"] == "s")
                #expect(failed.message.contains("'s'") && failed.message.contains("no longer attached"), "\(failed)")
                // The deleted file was not made again, empty.
                #expect(!FileManager.default.fileExists(atPath: path))
                #expect(try await run(evd, "select x from k.t")["rows"] == [[1]])
                let gone = try await failing(evd, "select x from s.t")
                #expect(isNoSuchTable(gone, "s.t"), "\(gone)")
            }
        }
    }

    @Test(
        "an attached file that is no longer a database: begin fails with sql_error (SQLITE_NOTADB), the session is in no transaction, and the next begin works"
    )
    func notADatabaseAtBegin() async throws {
        try await withRunningDaemon { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            try await daemon.withClient { evd in
                try await run(evd, "attach database '\(path)' as s")
                let garbage = Data(repeating: 0x41, count: 8192)
                try garbage.write(to: URL(fileURLWithPath: path))
                let failed = try await evd.expectError("begin")
                #expect(failed.code == "sql_error", "\(failed)")
                #expect(failed.extra["sqlite_code"] == "SQLITE_NOTADB", "\(failed)")
                #expect(failed.extra["schema"] == "s")
                let notIn = try await evd.expectError("commit")
                #expect(notIn.code == "not_in_transaction")
                try await evd.request("begin")
                let gone = try await failing(evd, "select x from s.t")
                #expect(isNoSuchTable(gone, "s.t"), "\(gone)")
                try await evd.request("rollback")
            }
        }
    }

    @Test("an in-memory attachment lasts only for its request; a read-only one is attached read-only again")
    func inMemoryAndReadOnly() async throws {
        try await withRunningDaemon { daemon in
            let path = try await makeSideDatabase(daemon, "side.db")
            try await daemon.withClient { evd in
                try await run(evd, "attach database ':memory:' as m; create table m.t(x); insert into m.t values (1)")
                let memory = try await failing(evd, "select x from m.t")
                #expect(isNoSuchTable(memory, "m.t"), "\(memory)")

                try await run(evd, "attach database 'file:\(path)?mode=ro' as r")
                #expect(try await run(evd, "select x from r.t")["rows"] == [[1]])
                let readOnly = try await failing(evd, "insert into r.t values (2)")
                #expect(readOnly.extra["sqlite_code"]?.stringValue?.hasPrefix("SQLITE_READONLY") == true, "\(readOnly)")
            }
        }
    }

    @Test(
        "writes through an attached schema make no row or schema events and no journal entries (their connection events fire): only the pool's own database's do"
    )
    func attachedWritesMakeNoRowEvents() async throws {
        try await withRunningDaemon { daemon in
            let path = daemon.directory + "/s.db"
            try await daemon.withClient { listener in
                try await subscribeEvents(listener, ["create-table", "insert-rows", "after_cursor_execute"])
                try await daemon.withClient { evd in
                    try await run(evd, "attach database '\(path)' as s")
                    try await run(evd, "create table s.t(x)")
                    try await run(evd, "insert into s.t values (1)")
                    try await run(evd, "create table mine(x)")
                    try await run(evd, "insert into mine values (1)")
                }
                let all = try await collectEvents(listener, until: "insert-rows")
                // The connection events of a write through the attached schema fire as for any other.
                let attachedInsert = all.first { $0["statement"] == "insert into s.t values (1)" }
                #expect(attachedInsert?["event"] == "after_cursor_execute")
                #expect(attachedInsert?["database"] == "main")
                let events = all.filter { $0["event"] != "after_cursor_execute" }
                #expect(events.map { $0["event"] } == ["create-table", "insert-rows"])
                #expect(events.allSatisfy { $0["table"] == "mine" || $0["target"]?["name"] == "mine" }, "\(events)")
            }
            let journaled = try await daemon.request(
                "execute",
                ["sql": "select event from _evd_journal where event in ('create-table', 'insert-rows') order by seq"]
            )
            #expect(journaled["rows"] == [["create-table"], ["insert-rows"]])
        }
    }
}
