import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// Issue 19, item 5: `before_cursor_execute` fires before evd prepares a statement, as SQLAlchemy's
/// fires before the DBAPI sees it. A listener may rewrite a statement SQLite cannot prepare into
/// one it can; a statement nobody fixes still fires `begin`, `before_cursor_execute` and
/// `do_execute*` before its errors; and the authorizer judges what really runs, within the
/// requester's grants.
@Suite("before_cursor_execute before the prepare")
struct PrepareVetoTests {
    /// Rewrites the statements of `fixes` (by their text) and allows the rest.
    private static func rewriting(_ fixes: [String: String]) -> VetoDecider {
        { veto, _ in
            guard let text = veto["statement"]?.stringValue, let fixed = fixes[text] else { return VetoAnswer.allow }
            return VetoAnswer.modify(["statement": .string(fixed)])
        }
    }

    @Test("a script is split into statements before anything is prepared: strings, names, comments and trigger bodies keep their ;")
    func scriptSplitting() {
        func split(_ text: String) -> [String] {
            let sql = SQLText(text)
            var offset = 0
            var statements: [String] = []
            while let range = sql.nextStatement(from: offset) {
                statements.append(String(decoding: sql.utf8[range], as: UTF8.self))
                offset = range.upperBound
            }
            return statements
        }
        #expect(split("select 1") == ["select 1"])
        #expect(split("  select 1;  select 2  ") == ["select 1;", "select 2  "])
        #expect(split("select ';'; select \"a;b\", [c;d], `e;f`") == ["select ';';", "select \"a;b\", [c;d], `e;f`"])
        #expect(split("select 1 -- a;b\n; /* c;d */ select 2;") == ["select 1 -- a;b\n;", "/* c;d */ select 2;"])
        #expect(split(";; select 1;;; -- only a comment\n") == ["select 1;"])
        #expect(split("   -- nothing\n /* at all */ ") == [])
        let trigger = "create trigger g after insert on t begin insert into u values (1); delete from v; end;"
        #expect(split(trigger + " selec broken") == [trigger, "selec broken"])
        #expect(split("select 'unterminated; select 2") == ["select 'unterminated; select 2"])
        // A trigger whose body has "end;" that does not end it; then one that does.
        let tricky = "create temp trigger h after insert on t begin select 1 end; select [end]; select 'end'; end ;"
        #expect(split(tricky + "select 3") == [tricky, "select 3"])
        #expect(
            split("explain create trigger k after insert on t begin select 1; end; select 4") == [
                "explain create trigger k after insert on t begin select 1; end;", "select 4",
            ]
        )
        // A long trigger body is split in one pass (sqlite3_complete is not asked at each of its `;`).
        let body = String(repeating: "select 1;", count: 50_000)
        let long = "create trigger l after insert on t begin " + body + " end;"
        #expect(split(long + " select 5").count == 2)
    }

    @Test("a statement with a syntax error, or on a table that does not exist yet, rewritten into a valid one, runs")
    func brokenStatementRewritten() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await daemon.request(.execute(.init(sql: "insert into t values (7)")))
            let decide = Self.rewriting([
                "selec x fro t": "select x from t",
                "select x from t_next": "select x + 1 from t",
                "insert into t_next values (?)": "insert into t values (?)",
                "selec 1;": "select 'second'",
            ])
            try await withVetoTestClient(daemon, ["veto": ["before_cursor_execute"], "name": "fixer"], decide: decide) {
                listener in
                try await daemon.withClient { evd in
                    #expect(try await evd.request(.execute(.init(sql: "selec x fro t")))["rows"] == [[7]])
                    #expect(try await evd.request(.execute(.init(sql: "select x from t_next")))["rows"] == [[8]])
                    // The client's parameters go with the rewritten statement.
                    let inserted = try await evd.request("execute", ["sql": "insert into t_next values (?)", "params": [9]])
                    #expect(inserted["changes"] == 1)
                    // A script: each statement is shown, and may be fixed, before it is prepared.
                    let script = try await evd.request(.execute(.init(sql: "insert into t values (10); selec 1;")))
                    #expect(script["rows"] == [["second"]])
                    #expect(try await evd.request(.execute(.init(sql: "select x from t order by x")))["rows"] == [[7], [9], [10]])
                    // executemany too.
                    let many = try await evd.request(
                        "executemany",
                        ["sql": "insert into t_next values (?)", "params": [[11], [12]]]
                    )
                    #expect(many["changes"] == 2)
                }
                let statements = listener.vetoes.compactMap { $0["statement"]?.stringValue }
                #expect(statements.contains("selec x fro t"))
                #expect(statements.contains("insert into t values (10);"))
                #expect(statements.contains("selec 1;"))
                let parameters = listener.vetoes.first { $0["statement"] == "insert into t_next values (?)" }?["parameters"]
                #expect(parameters == [9])
            }
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[5]])
        }
    }

    @Test("a statement nobody fixes: begin, before_cursor_execute and do_execute fire, then dbapi_error, handle_error, rollback")
    func brokenStatementNotFixed() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "select 1")))  // the pool's connection is open
            try await withVetoTestClient(
                daemon,
                ["veto": ["before_cursor_execute"], "name": "watcher"],
                decide: VetoAnswer.always(VetoAnswer.allow)
            ) {
                listener in
                try await daemon.withClient { events in
                    _ = try await subscribeToLiveEvents(events)
                    try await daemon.withClient { evd in
                        let error = try await evd.expectError("execute", ["sql": "select * from nosuch"])
                        #expect(error.code == "sql_error")
                        #expect(error.extra["sqlite_code"] == "SQLITE_ERROR")
                        #expect(error.message.contains("nosuch"))
                        let got = try await collectEvents(events, until: "checkin")
                        #expect(
                            eventNames(got) == [
                                "checkout", "engine_connect", "before_execute", "begin", "before_cursor_execute",
                                "do_execute_no_params", "dbapi_error", "handle_error", "rollback", "reset", "checkin",
                            ]
                        )
                        let byName = indexByName(got)
                        #expect(byName["handle_error"]?["statement"] == "select * from nosuch")
                        #expect(byName["handle_error"]?["error"]?["code"] == "sql_error")
                        #expect(byName["do_execute_no_params"]?["statement"] == "select * from nosuch")
                        #expect(byName["rollback"]?["implicit"] == true)

                        // With parameters: do_execute, and they ride on the error events.
                        let syntax = try await evd.expectError("execute", ["sql": "selec ?", "params": [1]])
                        #expect(syntax.code == "sql_error")
                        let second = try await collectEvents(events, until: "checkin")
                        #expect(
                            eventNames(second) == [
                                "checkout", "engine_connect", "before_execute", "begin", "before_cursor_execute",
                                "do_execute", "dbapi_error", "handle_error", "rollback", "reset", "checkin",
                            ]
                        )
                        #expect(indexByName(second)["handle_error"]?["parameters"] == [1])
                    }
                }
                let statements = listener.vetoes.compactMap { $0["statement"]?.stringValue }
                #expect(statements == ["select * from nosuch", "selec ?"])
            }
        }
    }

    @Test("inside a begin transaction a broken statement fires before_cursor_execute and do_execute; the transaction goes on")
    func brokenStatementInTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            let decide = Self.rewriting(["insert into t valus (1)": "insert into t values (1)"])
            try await withVetoTestClient(
                daemon,
                ["veto": ["before_cursor_execute"], "events": ["do_execute_no_params", "handle_error"]],
                decide: decide
            ) {
                listener in
                try await daemon.withClient { evd in
                    try await evd.request("begin")
                    try await evd.request(.execute(.init(sql: "insert into t valus (1)")))
                    let error = try await evd.expectError("execute", ["sql": "insert into t valus (2)"])
                    #expect(error.code == "sql_error")
                    try await evd.request("commit")
                }
                try await listener.sync()
                #expect(
                    listener.events.map { $0["event"]?.stringValue ?? "" } == [
                        "do_execute_no_params", "do_execute_no_params", "handle_error",
                    ]
                )
                #expect(listener.events.first?["statement"] == "insert into t values (1)")
            }
            #expect(try await daemon.request(.execute(.init(sql: "select x from t")))["rows"] == [[1]])
        }
    }

    @Test("a rewrite is judged as the requester (another uid): what it may not do is refused, what it may runs")
    func rewriteJudgedAsRequester() async throws {
        let grants = [
            Grant(who: .uid(65534), actions: [.executeSQL], database: "main", table: nil),
            Grant(who: .uid(65534), actions: [.viewTable, .insertRow], database: "main", table: "mine"),
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table mine(x)")))
            try await daemon.request(.execute(.init(sql: "create table secret(x)")))
            try await daemon.request(.execute(.init(sql: "insert into secret values ('the secret')")))
            try await daemon.request(.execute(.init(sql: "insert into mine values ('mine')")))
            let decide = Self.rewriting([
                "selec x fro mine": "select x from secret",
                "insert into mine valus (1)": "delete from mine",
                "select x from secret": "select x from mine",
            ])
            try await withVetoTestClient(daemon, ["veto": ["before_cursor_execute"], "name": "root-rewriter"], decide: decide) {
                _ in
                let got = responses(
                    try await messages(
                        try asNobody(
                            daemon,
                            [
                                execute("selec x fro mine"),
                                execute("insert into mine valus (1)"),
                                execute("select x from secret"),
                            ]
                        )
                    )
                )
                // A broken statement rewritten into a read of a table nobody may not view.
                #expect(got[1]?["error"]?["code"] == "permission_denied", "\(String(describing: got[1]))")
                #expect(got[1]?["error"]?["action"] == "view-table")
                #expect(got[1]?["error"]?["table"] == "secret")
                // Into a delete nobody may not do.
                #expect(got[2]?["error"]?["code"] == "permission_denied", "\(String(describing: got[2]))")
                #expect(got[2]?["error"]?["action"] == "delete-row")
                // What runs is what is judged: a statement nobody may not run, rewritten into one it may.
                #expect(got[3]?["result"]?["rows"] == [["mine"]], "\(String(describing: got[3]))")
            }
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from mine")))["rows"] == [[1]])
        }
    }

    @Test("a broken statement rewritten by a listener that is another uid stays within what the listener may do")
    func rewriteJudgedAsListener() async throws {
        let grants = [Grant(who: .uid(65534), actions: [.subscribe, .veto, .viewTable], database: "main", table: nil)]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(name)")))
            let listener = try await asNobodyRewriter(daemon, to: "SELECT file FROM pragma_database_list")
            // Root may read the database list; the listener (no admin) may not put that in place.
            let error = await #expect(throws: EvdError.self) {
                try await daemon.request(.execute(.init(sql: "selec name fro dogs")))
            }
            #expect(error?.code == "permission_denied", "\(String(describing: error))")
            #expect(error?.extra["action"] == "admin")
            #expect(error?.message.contains("a veto listener rewrote") == true, "\(String(describing: error))")
            try await daemon.request("emit", ["event": "app.stop"])
            let got = try await messages(listener)
            #expect(got.contains { $0["type"] == "veto" && $0["statement"] == "selec name fro dogs" }, "\(got)")
        }
    }
}
