import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

private func grant(_ actions: Set<Action>, database: String? = "main", table: String? = nil) -> Grant {
    Grant(who: .uid(65534), actions: actions, database: database, table: table)
}

/// The attacks of issue 17's "identity and events", each performed by another uid (nobody,
/// through `setpriv`).
@Suite("Identity and events (another uid)")
struct IdentitySecurityTests {
    @Test("a subscription is judged as the actor that made it: logout does not save it from its token's expiry")
    func logoutKeepsNoExpiredSubscription() async throws {
        try await withRunningDaemon(configure: { openUp(&$0) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(name)")))
            let token = try #require(
                try await daemon.request(
                    "create_token",
                    ["expires_after": 12, "restrict_all": ["subscribe", "view-table", "veto"]]
                )["token"]?.stringValue
            )
            // The token expires at ceil(the daemon's now + 12), at the latest this.
            let expires = (Date().timeIntervalSince1970 + 12).rounded(.up)
            try await daemon.withClient { root in
                try await root.request("subscribe", ["events": ["logout"]])
                // Nobody logs in with root's short-lived token, watches and vetoes, then logs out.
                let listener = try asNobody(
                    daemon,
                    [
                        ["op": "login", "token": .string(token)],
                        ["op": "subscribe", "events": ["insert-rows"], "veto": ["before_execute"], "on_timeout": "allow"],
                        ["op": "logout"],
                    ],
                    until: "insert-rows",
                    linger: 15,
                    reply: ["action": "deny", "reason": "mine now"]
                )
                var loggedOut = false
                while !loggedOut, let event = await root.nextMessage(ofType: "event", within: 20) {
                    loggedOut = event["actor"]?["token"] != nil
                }
                try #require(loggedOut, "nobody never logged out of the token's session (did the token expire first?)")
                try await Task.sleep(for: .seconds(max(0, expires - Date().timeIntervalSince1970) + 0.5))
                try await daemon.request("insert", ["table": "dogs", "rows": [["name": "Rex"]]])
                let got = try await messages(listener)
                #expect(!got.contains { $0["type"] == "veto" }, "asked after its token expired: \(got)")
                #expect(!got.contains { $0["event"] == "insert-rows" }, "an event after its token expired: \(got)")
            }
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from dogs")))["rows"] == [[1]])
        }
    }

    @Test("a listener is asked only where its veto grant reaches: not about another database")
    func vetoOnlyWhereGranted() async throws {
        let grants = [
            grant([.subscribe, .veto, .viewTable], table: "dogs"), grant([.subscribe, .viewTable], database: "other"),
        ]
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: grants)
            $0.databases.append(DatabaseConfig(name: "other", path: ($0.socketPath as NSString).deletingLastPathComponent + "/other.db"))
        }) { daemon in
            try await daemon.request("execute", ["sql": "create table t(x)", "database": "other"])
            try await daemon.request("execute", ["sql": "create table secret(x)", "database": "other"])
            try await daemon.request("execute", ["sql": "insert into secret values (1)", "database": "other"])
            let listener = try await asNobodyRewriter(daemon, to: "DELETE FROM secret")
            try await daemon.request("execute", ["sql": "insert into t values (1)", "database": "other"])
            try await daemon.request("emit", ["event": "app.stop"])
            let got = try await messages(listener)
            #expect(!got.contains { $0["type"] == "veto" }, "\(got)")
            #expect(try await daemon.request("execute", ["sql": "select count(*) from secret", "database": "other"])["rows"] == [[1]])
            #expect(try await daemon.request("execute", ["sql": "select count(*) from t", "database": "other"])["rows"] == [[1]])
        }
    }

    @Test("a listener's rewrite runs only if it stays within what the listener may see")
    func rewriteStaysWithinTheListener() async throws {
        try await withRunningDaemon(configure: { openUp(&$0, grants: [grant([.subscribe, .veto, .viewTable])]) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(name)")))
            let listener = try await asNobodyRewriter(daemon, to: "SELECT file FROM pragma_database_list")
            let error = await #expect(throws: EvdError.self) {
                try await daemon.request(.execute(.init(sql: "select name from dogs")))
            }
            #expect(error?.code == "permission_denied", "\(String(describing: error))")
            #expect(error?.extra["action"] == "admin")
            try await daemon.request("emit", ["event": "app.stop"])
            _ = try await messages(listener)
        }
    }

    @Test("a request a before_execute listener rewrote is checked again for the requester (describe)")
    func rewrittenRequestIsCheckedAgain() async throws {
        let grants = [grant([.viewTable], table: "dogs")]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(name)")))
            try await daemon.request(.execute(.init(sql: "create table secret(password)")))
            try await daemon.withClient { root in
                try await root.request("subscribe", ["veto": ["before_execute"], "timeout_ms": 30000])
                let requester = try asNobody(daemon, [["op": "describe", "table": "dogs"]])
                let veto = try #require(await root.nextMessage(ofType: "veto", within: 20))
                var request = try #require(veto["request"]?.objectValue)
                request["table"] = "secret"
                try await root.send(["op": "reply", "seq": veto["seq"] ?? .null, "action": "modify", "set": ["request": .object(request)]])
                let got = responses(try await messages(requester))
                #expect(got[1]?["error"]?["code"] == "permission_denied", "\(String(describing: got[1]))")
                #expect(got[1]?["result"] == nil)
            }
        }
    }

    @Test("a prepared transaction is decided by the actor that prepared it or an admin; recover lists only those")
    func twoPhaseBelongsToItsMaker() async throws {
        let grants = [grant([.executeSQL, .viewTable])]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table ledger(x)")))
            try await daemon.withClient { root in
                try await root.request("begin_twophase", ["xid": "root-1"])
                try await root.request(.execute(.init(sql: "insert into ledger values (1)")))
                try await root.request("prepare_twophase", ["xid": "root-1"])
            }
            let got = try responses(
                await messages(
                    asNobody(
                        daemon,
                        [
                            ["op": "recover"], ["op": "rollback_twophase", "xid": "root-1"], ["op": "commit_twophase", "xid": "root-1"],
                            ["op": "begin_twophase", "xid": "mine"],
                        ]
                    )
                )
            )
            #expect(got[1]?["result"]?["xids"] == [], "\(String(describing: got[1]))")
            #expect(got[2]?["error"]?["code"] == "permission_denied", "\(String(describing: got[2]))")
            #expect(got[3]?["error"]?["code"] == "permission_denied", "\(String(describing: got[3]))")
            // No write right anywhere: no transaction that takes the write lock and keeps it.
            #expect(got[4]?["error"]?["code"] == "permission_denied", "\(String(describing: got[4]))")
            #expect(try await daemon.request("recover")["xids"] == ["root-1"])
            try await daemon.request("commit_twophase", ["xid": "root-1"])
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from ledger")))["rows"] == [[1]])
        }
    }

    @Test("execution options (a logging_token) reach only their own user and admins")
    func executionOptionsArePrivate() async throws {
        try await withRunningDaemon(configure: { openUp(&$0, grants: [grant([.subscribe], database: nil)]) }) { daemon in
            let watcher = try asNobody(
                daemon,
                [["op": "subscribe", "events": ["set_connection_execution_options", "app.done"]]],
                until: "app.done",
                linger: 30
            )
            try await waitForStats(daemon) { $0["subscriptions"] == 1 }
            try await daemon.withClient { root in
                try await root.request("execution_options", ["options": ["logging_token": "root-secret-token"]])
            }
            try await daemon.request("emit", ["event": "app.done"])
            let got = try await messages(watcher)
            #expect(got.contains { $0["event"] == "app.done" })
            #expect(!got.contains { $0["event"] == "set_connection_execution_options" }, "\(got)")
        }
    }
}
