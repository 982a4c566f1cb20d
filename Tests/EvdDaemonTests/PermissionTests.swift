import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

@Suite("Permissions (another uid)")
struct PermissionTests {
    @Test("the socket is 0600 by default: another uid cannot even connect")
    func socketMode() async throws {
        try await withRunningDaemon(configure: { openUp(&$0, socketMode: 0o600) }) { daemon in
            let got = try await messages(try asNobody(daemon, [["op": "ping"]]))
            #expect(got.first?["connect_error"] == .integer(Int(EACCES)))
        }
    }

    @Test("no grant: ping and events work, everything else is permission_denied with the action")
    func deniedByDefault() async throws {
        try await withRunningDaemon(configure: { openUp(&$0) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
            let got = responses(
                try await messages(
                    try asNobody(
                        daemon,
                        [
                            ["op": "ping"], ["op": "events"], execute("select 1"), ["op": "subscribe", "events": ["*"]],
                            ["op": "emit", "event": "app.x"], ["op": "insert", "table": "dogs", "rows": [["name": "Rex"]]],
                            ["op": "stats"], ["op": "begin"],
                        ]
                    )
                )
            )
            #expect(got[1]?["ok"] == true)
            #expect(got[2]?["ok"] == true)
            let expected: [Int64: String] = [3: "execute-sql", 4: "subscribe", 5: "emit", 6: "insert-row", 7: "admin", 8: "execute-sql"]
            for (number, action) in expected {
                #expect(got[number]?["error"]?["code"] == "permission_denied", "request \(number)")
                #expect(got[number]?["error"]?["action"] == .string(action), "request \(number)")
            }
        }
    }

    @Test("grants by uid, user and group, table by table, for raw SQL and structured ops, tricks included")
    func perTableSQL() async throws {
        let grants = [
            Grant(who: .uid(65534), actions: [.executeSQL], database: "main"),
            Grant(who: .user("nobody"), actions: [.viewTable, .insertRow], database: "main", table: "dogs"),
            Grant(who: .group(name: "nogroup", gid: 65534), actions: [.updateRow, .deleteRow], table: "dogs"),
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            for sql in [
                "create table dogs(id integer primary key, name text)", "create table cats(id integer primary key, name text)",
                "insert into cats(name) values ('Tom')", "create view dogcats as select * from cats",
                "create table log(what text)",
                "create trigger dog_log after delete on dogs begin insert into log values (old.name); end",
            ] {
                try await daemon.request("execute", ["sql": .string(sql)])
            }
            let requests: [(JSONObject, String?, String?)] = [
                (execute("insert into dogs(name) values ('Rex')"), nil, nil),
                (execute("select name from dogs"), nil, nil),
                (execute("update dogs set name = 'REX'"), nil, nil),
                (["op": "insert", "table": "dogs", "rows": [["name": "Fido"]]], nil, nil),
                (execute("pragma table_info(dogs)"), nil, nil),
                (execute("select * from cats"), "view-table", "cats"),
                (execute("insert into cats(name) values ('Felix')"), "insert-row", "cats"),
                (["op": "insert", "table": "cats", "rows": [["name": "Felix"]]], "insert-row", "cats"),
                (execute("select * from dogcats"), "view-table", "cats"),  // a view reads what it reads
                (execute("delete from dogs where name = 'Fido'"), "insert-row", "log"),  // so does a trigger
                (execute("create table mine(x)"), "create-table", "mine"),
                (execute("alter table dogs add column age integer"), "alter-table", "dogs"),
                (execute("create index dog_names on dogs(name)"), "alter-table", "dogs"),
                (execute("drop table dogs"), "drop-table", "dogs"),
                (execute("attach database '/tmp/evd-attach.db' as other"), "admin", nil),
                (execute("pragma journal_mode"), "admin", nil),
                (execute("pragma table_info(cats)"), "view-table", "cats"),
                (execute("select load_extension('/nonexistent')"), "admin", nil),
                (execute("select * from _evd_journal"), "admin", nil),
                (execute("select * from dogs", ), nil, nil),
                (["op": "execute", "sql": "select 1", "database": "other"], nil, nil),
            ]
            let got = responses(try await messages(try asNobody(daemon, requests.map(\.0))))
            for (index, (request, action, table)) in requests.enumerated() {
                let response = got[Int64(index + 1)]
                let label = "\(request["sql"] ?? request["op"] ?? "?")"
                if request["database"] == "other" {
                    #expect(response?["error"]?["code"] == "no_such_database", "\(label)")
                } else if let action {
                    #expect(response?["error"]?["code"] == "permission_denied", "\(label): \(response ?? [:])")
                    #expect(response?["error"]?["action"] == .string(action), "\(label)")
                    #expect(response?["error"]?["table"] == table.map(JSONValue.string), "\(label)")
                } else {
                    #expect(response?["ok"] == true, "\(label): \(response ?? [:])")
                }
            }
            // What was denied did not happen.
            let cats = try await daemon.request(.execute(.init(sql: "select name from cats")))
            #expect(cats["rows"] == [["Tom"]])
            let dogs = try await daemon.request(.execute(.init(sql: "select name from dogs order by id")))
            #expect(dogs["rows"] == [["REX"], ["Fido"]])
        }
    }

    @Test("inside a transaction, a request that names no database is checked on the transaction's database, not the default one")
    func transactionDatabase() async throws {
        // execute-sql on `second` only: the default database (`main`) is not the actor's.
        let grants = [Grant(who: .uid(65534), actions: [.executeSQL, .viewTable, .insertRow], database: "second")]
        try await withRunningDaemon(configure: { configuration in
            configuration.databases.append(
                DatabaseConfig(name: "second", path: SocketDirectory.parent(of: configuration.databases[0].path) + "/second.db")
            )
            openUp(&configuration, grants: grants)
        }) { daemon in
            try await daemon.request("execute", ["sql": "create table t(x)", "database": "second"])
            try await daemon.request(.execute(.init(sql: "create table m(x)")))
            let requests: [JSONObject] = [
                execute("insert into m values (1)"),  // main, outside a transaction: not the actor's
                ["op": "begin", "database": "second"],
                execute("insert into t values (1)"),  // runs on `second`, the transaction's
                ["op": "insert", "table": "t", "rows": [["x": 2]]],
                execute("select count(*) from t"),
                ["op": "commit"],
            ]
            let got = responses(try await messages(try asNobody(daemon, requests)))
            #expect(got[1]?["error"]?["code"] == "permission_denied")
            #expect(got[1]?["error"]?["database"] == "main")
            for id in Int64(2)...6 { #expect(got[id]?["ok"] == true, "request \(id): \(got[id] ?? [:])") }
            #expect(got[5]?["result"]?["rows"] == [[2]])
            let rows = try await daemon.request("execute", ["sql": "select x from t order by x", "database": "second"])
            #expect(rows["rows"] == [[1], [2]])
        }
    }

    @Test("a subscriber sees only what it may view: live and replayed, with rows, statements included")
    func eventFiltering() async throws {
        let grants = [Grant(who: .uid(65534), actions: [.subscribe, .viewTable], database: "main", table: "dogs")]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
            try await daemon.request(.execute(.init(sql: "create table cats(id integer primary key, name text)")))
            let live = try asNobody(daemon, [["op": "subscribe", "events": ["*"], "rows": true]], until: "test.end")
            // Wait until its subscription exists.
            for _ in 0..<250 {
                let stats = try await daemon.request("stats")
                if stats["subscriptions"] == 1 { break }
                try await Task.sleep(for: .milliseconds(20))
            }
            try await daemon.request(.execute(.init(sql: "insert into dogs(name) values ('Rex')")))
            try await daemon.request(.execute(.init(sql: "insert into cats(name) values ('Tom')")))
            try await daemon.request(.execute(.init(sql: "update cats set name = 'TOM'")))
            try await daemon.request(.execute(.init(sql: "create table secret(x)")))
            try await daemon.request("emit", ["event": "test.end"])
            let seen = try await messages(live).filter { $0["type"] == "event" }
            let replay = try await messages(
                try asNobody(daemon, [["op": "subscribe", "events": ["*"], "rows": true, "since": 0]], until: "test.end")
            )
            for (label, events) in [("live", seen), ("replay", replay.filter { $0["type"] == "event" })] {
                #expect(events.contains { $0["event"] == "insert-rows" && $0["table"] == "dogs" }, "\(label)")
                #expect(events.contains { $0["event"] == "test.end" }, "\(label)")
                let leaked = events.filter { event in
                    event["table"] == "cats" || event["table"] == "secret" || event["statement"] != nil
                        || event["database"] != nil && event["table"] == nil
                }
                #expect(leaked.isEmpty, "\(label): \(leaked)")
            }
        }
    }

    @Test("another uid's token: it may narrow its own rights, never widen them; forged and expired ones are refused")
    func tokensAsNobody() async throws {
        let grants = [
            Grant(who: .uid(65534), actions: [.createToken]),  // a daemon-wide action: a grant without database
            Grant(who: .uid(65534), actions: [.executeSQL, .viewTable, .insertRow], database: "main"),
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
            // nobody makes a read-only token, and one asking for admin (which it does not hold).
            let made = responses(
                try await messages(
                    try asNobody(
                        daemon,
                        [
                            ["op": "create_token", "restrict_all": ["view-table", "execute-sql"]],
                            ["op": "create_token", "restrict_all": ["admin"], "expires_after": 1],
                        ]
                    )
                )
            )
            let readOnly = try #require(made[1]?["result"]?["token"]?.stringValue)
            let adminToken = try #require(made[2]?["result"]?["token"]?.stringValue)
            var forged = Array(readOnly.utf8)
            forged[8] = forged[8] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
            let got = responses(
                try await messages(
                    try asNobody(
                        daemon,
                        [
                            ["op": "login", "token": .string(readOnly)],
                            execute("select count(*) from dogs"),
                            execute("insert into dogs(name) values ('Rex')"),
                            ["op": "login", "token": .string(adminToken)],
                            ["op": "stats"],
                            ["op": "login", "token": .string(String(decoding: forged, as: UTF8.self))],
                        ]
                    )
                )
            )
            #expect(got[1]?["result"]?["actor"]?["uid"] == 65534)
            #expect(got[2]?["ok"] == true)
            #expect(got[3]?["error"]?["code"] == "permission_denied", "\(got[3] ?? [:])")
            // A token never holds more than its maker: admin stays denied (or the token expired).
            let stats = got[5]?["error"]?["code"]
            #expect(stats == "permission_denied" || stats == "token_expired", "\(got[5] ?? [:])")
            #expect(got[6]?["error"]?["code"] == "token_invalid")
        }
    }

    @Test("the config file: grants parsed; anything not valid is refused with the reason")
    func configFile() throws {
        let config = try ConfigFile.parse(
            """
            [[grant]]
            user = "nobody"
            actions = ["subscribe", "view-table"]
            database = "main"
            table = "dogs"

            [[grant]]
            uid = 1000
            actions = ["admin"]

            [[grant]]
            group = "nogroup"
            actions = ["emit"]
            """
        )
        #expect(
            config.grants == [
                Grant(who: .user("nobody"), actions: [.subscribe, .viewTable], database: "main", table: "dogs"),
                Grant(who: .uid(1000), actions: [.admin]),
                Grant(who: .group(name: "nogroup", gid: 65534), actions: [.emit]),
            ]
        )
        let invalid: [(String, String)] = [
            ("[[grant]]\nuser = \"nobody\"\nuid = 3\nactions = []", "exactly one"),
            ("[[grant]]\nuser = \"nobody\"\nactions = [\"fly\"]", "unknown action 'fly'"),
            ("[[grant]]\ngroup = \"no-such-group-here\"\nactions = []", "no group"),
            ("[[grant]]\nuser = \"nobody\"\nactions = []\ncolour = 1", "unknown key 'colour'"),
            ("grants = 1", "unknown setting 'grants'"),
            ("[[grant]\n", "not valid TOML"),
        ]
        for (text, reason) in invalid {
            #expect(throws: ConfigFile.Invalid.self, "\(text)") { try ConfigFile.parse(text) }
            do {
                _ = try ConfigFile.parse(text)
            } catch {
                #expect(error.description.contains(reason), "\(error)")
            }
        }
    }

    @Test("evd refuses to start with a config file that is not valid, and says why")
    func invalidConfigStopsEvd() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/evd.toml"
            try "[[grant]]\nuser = \"nobody\"\nactions = [\"fly\"]\n".write(toFile: path, atomically: true, encoding: .utf8)
            let result = try await runProcess(
                binaryPath("evd"),
                ["--config", path, "--socket", directory + "/evd.sock", "--state-dir", directory + "/state"],
                timeout: 30
            )
            #expect(result.status != 0)
            #expect(result.stderr.contains("unknown action 'fly'"), "\(result.stderr)")
        }
    }
}
