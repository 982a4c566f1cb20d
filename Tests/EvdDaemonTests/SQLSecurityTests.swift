import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// Runs `requests` as nobody (uid 65534) and returns the responses by request number.
private func nobodyResponses(_ daemon: RunningDaemon, _ requests: [JSONObject]) async throws -> [Int64: JSONObject] {
    responses(try await messages(try asNobody(daemon, requests)))
}

/// The rows of a root `execute` of `sql`.
private func rows(_ daemon: RunningDaemon, _ sql: String) async throws -> [JSONValue] {
    try await daemon.request("execute", ["sql": .string(sql)])["rows"]?.arrayValue ?? []
}

private func setUp(_ daemon: RunningDaemon, _ statements: [String]) async throws {
    for sql in statements { try await daemon.request("execute", ["sql": .string(sql)]) }
}

/// Whether a response is `permission_denied` for `action` (on `table`, when given).
private func denied(_ response: JSONObject?, _ action: String, table: String? = nil) -> Bool {
    guard let error = response?["error"], error["code"] == "permission_denied", error["action"] == .string(action) else {
        return false
    }
    return table.map { error["table"] == .string($0) } ?? true
}

private func grant(_ actions: Set<Action>, table: String? = nil) -> Grant {
    Grant(who: .uid(65534), actions: actions, database: "main", table: table)
}

/// The attacks of issue 17's "SQL runs outside the policy", each performed by another uid (nobody,
/// through `setpriv`) with the grants the finding names.
@Suite("SQL outside the policy (another uid)")
struct SQLSecurityTests {
    @Test("a statement SQLite compiles again after another connection's DDL is judged again (re-prepare)")
    func reprepareIsJudged() async throws {
        let grants = [
            grant([.executeSQL]), grant([.insertRow, .viewTable], table: "mine"), grant([.insertRow], table: "loot"),
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await setUp(
                daemon,
                [
                    "create table mine(x)", "create table loot(x)", "create table secret(x)",
                    "insert into secret values ('the secret')",
                ]
            )
            try await daemon.withClient { root in
                try await root.request("subscribe", ["events": ["begin"]])
                try await root.request("begin")
                // Root (an admin) plants a trigger that copies secret; it commits only once nobody's
                // INSERT has been prepared against the schema without it.
                try await root.request(
                    "execute",
                    ["sql": "create trigger copy after insert on mine begin insert into loot select x from secret; end"]
                )
                let attack = try asNobody(daemon, [execute("insert into mine values (1)")])
                var begun = false
                while !begun, let event = await root.nextMessage(ofType: "event", within: 20) {
                    begun = event["implicit"] == true
                }
                #expect(begun, "nobody's request never began its transaction")
                try await root.request("commit")
                let got = responses(try await messages(attack))
                #expect(denied(got[1], "view-table", table: "secret"), "\(String(describing: got[1]))")
            }
            #expect(try await rows(daemon, "select x from loot").isEmpty)
            #expect(try await rows(daemon, "select x from mine").isEmpty)
        }
    }

    @Test(
        "evd's own tables, _evd_meta (the seq bound, floors, checksum start) and _evd_journal, cannot be changed by a uid granted every other action"
    )
    func evdTablesAreProtected() async throws {
        let everything: Set<Action> = [
            .executeSQL, .viewTable, .insertRow, .updateRow, .deleteRow, .createTable, .alterTable, .dropTable,
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: [grant(everything)]) }) { daemon in
            try await setUp(daemon, ["create table t(x)", "insert into t values (1)"])
            let meta = try await rows(daemon, "select key, value from _evd_meta order by key")
            let journal = try await rows(daemon, "select seq, crc from _evd_journal order by seq")
            #expect(!meta.isEmpty && !journal.isEmpty)
            let attacks = [
                "update _evd_meta set value = 0",
                "delete from _evd_meta",
                "insert or replace into _evd_meta (key, value) values ('journal_unchecked_through', 9223372036854775807)",
                "drop table _evd_meta",
                "update _evd_journal set crc = null",
                "delete from _evd_journal",
                "alter table _evd_meta rename to x",
            ]
            let got = try await nobodyResponses(daemon, attacks.map(execute))
            for (index, sql) in attacks.enumerated() {
                let response = got[Int64(index + 1)]
                #expect(response?["error"]?["code"] == "permission_denied", "\(sql): \(String(describing: response))")
            }
            #expect(try await rows(daemon, "select key, value from _evd_meta order by key") == meta)
            #expect(try await rows(daemon, "select seq, crc from _evd_journal order by seq") == journal)
        }
    }

    @Test("only an admin may create or drop a trigger: one planted with alter-table would run as the next writer")
    func triggersNeedAdmin() async throws {
        let grants = [
            grant([.executeSQL, .createTable]), grant([.alterTable, .insertRow, .viewTable], table: "mine"),
            grant([.insertRow], table: "loot"),
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await setUp(
                daemon,
                [
                    "create table mine(x)", "create table loot(x)", "create table secret(x)", "insert into secret values ('s')",
                    "create table audit(x)", "create trigger keep after delete on secret begin insert into audit values (old.x); end",
                ]
            )
            let got = try await nobodyResponses(
                daemon,
                [
                    execute(
                        "create trigger steal after insert on mine begin insert into loot select x from secret; delete from secret; end"
                    ),
                    execute("create temp trigger steal2 after insert on mine begin insert into loot values (1); end"),
                    execute("drop trigger keep"),
                    execute("create index mine_x on mine(x)"),
                ]
            )
            #expect(denied(got[1], "admin"), "\(String(describing: got[1]))")
            #expect(got[2]?["ok"] == true, "a temporary trigger on a table one may alter: \(String(describing: got[2]))")
            #expect(denied(got[3], "admin"), "\(String(describing: got[3]))")
            #expect(got[4]?["ok"] == true, "\(String(describing: got[4]))")
            // Root's insert fires nothing of nobody's.
            try await daemon.request(.execute(.init(sql: "insert into mine values (2)")))
            #expect(try await rows(daemon, "select x from loot").isEmpty)
            #expect(try await rows(daemon, "select x from secret") == [["s"]])
        }
    }

    @Test("a pooled connection carries nothing of the last session: temp triggers, temp tables, attached databases")
    func pooledConnectionsStartClean() async throws {
        let grants = [grant([.executeSQL, .createTable, .viewTable, .insertRow, .alterTable])]
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: grants)
            $0.poolSize = 1
        }) { daemon in
            try await setUp(
                daemon,
                [
                    "create table orders(item)", "create table loot(x)", "create table secret(x)",
                    "insert into secret values ('s')",
                ]
            )
            let got = try await nobodyResponses(
                daemon,
                [
                    execute("create temp trigger spy after insert on main.orders begin insert into loot select x from secret; end"),
                    execute("create temp table orders(item)"),
                ]
            )
            #expect(got[1]?["ok"] == true, "\(String(describing: got[1]))")
            #expect(got[2]?["ok"] == true, "\(String(describing: got[2]))")
            // One connection in the pool: root's insert gets the connection nobody used.
            try await daemon.request(.execute(.init(sql: "insert into orders values ('book')")))
            #expect(try await rows(daemon, "select item from main.orders") == [["book"]])
            #expect(try await rows(daemon, "select x from loot").isEmpty)
            #expect(try await rows(daemon, "select count(*) from sqlite_temp_schema") == [[0]])
            // Root's own pragmas and attachments do not reach the next session either.
            try await daemon.request(.execute(.init(sql: "attach ':memory:' as other")))
            try await daemon.request(.execute(.init(sql: "pragma foreign_keys = off")))
            #expect(try await rows(daemon, "select name from pragma_database_list where name = 'other'").isEmpty)
            #expect(try await rows(daemon, "pragma foreign_keys") == [[1]])
        }
    }

    @Test("writable_schema cannot be switched on, so nobody rewrites sqlite_master")
    func writableSchemaIsOff() async throws {
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: [grant([.executeSQL, .viewTable])])
            $0.poolSize = 1
        }) {
            daemon in
            try await setUp(daemon, ["create table t(x)"])
            _ = try? await daemon.request(.execute(.init(sql: "pragma writable_schema = 1")))
            let got = try await nobodyResponses(
                daemon,
                [
                    execute("update sqlite_master set sql = 'create table t(x, y)' where name = 't'"),
                    execute("pragma writable_schema = 1"),
                ]
            )
            #expect(got[1]?["ok"] != true, "\(String(describing: got[1]))")
            #expect(denied(got[2], "admin"))
            #expect(try await rows(daemon, "select sql from sqlite_master where name = 't'") == [["CREATE TABLE t(x)"]])
        }
    }

    @Test("fts3_tokenizer and other functions that reach memory or files need admin; the tokenizer is off for everyone")
    func dangerousFunctions() async throws {
        try await withRunningDaemon(configure: { openUp(&$0, grants: [grant([.executeSQL, .viewTable])]) }) { daemon in
            try await setUp(daemon, ["create virtual table docs using fts4(body)", "insert into docs values ('hello world')"])
            let got = try await nobodyResponses(
                daemon,
                [
                    execute("select fts3_tokenizer('simple')"),
                    execute("select fts3_tokenizer('simple', x'4141414141414141')"),
                    execute("select load_extension('/tmp/x')"),
                    execute("select sqlite_compileoption_get(0)"),
                    execute("select upper('ok'), json_extract('{\"a\":1}', '$.a')"),
                ]
            )
            for number: Int64 in 1...4 { #expect(denied(got[number], "admin"), "request \(number): \(String(describing: got[number]))") }
            #expect(got[5]?["ok"] == true)
            // Root may call it, but the two-argument form (a pointer) is refused on every connection.
            await #expect(throws: EvdError.self) {
                try await daemon.request(.execute(.init(sql: "select fts3_tokenizer('simple', x'4141414141414141')")))
            }
            #expect(try await rows(daemon, "select body from docs where docs match 'hello'") == [["hello world"]])
        }
    }

    @Test("SQLite's own tables (sqlite_sequence) change only with DDL or for an admin")
    func sqliteTablesNeedAdmin() async throws {
        let grants = [grant([.executeSQL, .viewTable, .insertRow, .updateRow, .deleteRow, .createTable, .dropTable])]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await setUp(
                daemon,
                [
                    "create table counted(id integer primary key autoincrement, x)", "insert into counted(x) values (1)",
                ]
            )
            let got = try await nobodyResponses(
                daemon,
                [
                    execute("update sqlite_sequence set seq = 9223372036854775807"),
                    execute("delete from sqlite_sequence"),
                    execute("insert into sqlite_sequence values ('counted', 9223372036854775807)"),
                    execute("create table mine(id integer primary key autoincrement, x)"),
                    execute("insert into mine(x) values (1)"),
                    execute("drop table mine"),
                ]
            )
            for number: Int64 in 1...3 { #expect(denied(got[number], "admin"), "request \(number): \(String(describing: got[number]))") }
            for number: Int64 in 4...6 { #expect(got[number]?["ok"] == true, "request \(number): \(String(describing: got[number]))") }
            try await daemon.request(.execute(.init(sql: "insert into counted(x) values (2)")))
            #expect(try await rows(daemon, "select id from counted order by id") == [[1], [2]])
        }
    }

    @Test("a write that can replace needs insert-row, update-row and delete-row (OR REPLACE, REPLACE, ON CONFLICT REPLACE)")
    func replaceNeedsDelete() async throws {
        let grants = [
            grant([.executeSQL]), grant([.insertRow, .viewTable], table: "people"),
            grant([.insertRow, .viewTable], table: "tags"), grant([.updateRow, .viewTable], table: "notes"),
            grant([.insertRow, .updateRow, .deleteRow, .viewTable], table: "mine"),
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await setUp(
                daemon,
                [
                    "create table people(id integer primary key, name text)",
                    "insert into people values (1, 'alice'), (2, 'bob')",
                    "create table tags(name text unique on conflict replace, owner text)", "insert into tags values ('x', 'root')",
                    "create table notes(id integer primary key, body text unique)", "insert into notes values (1, 'a'), (2, 'b')",
                    "create table mine(id integer primary key, v)", "insert into mine values (1, 'a')",
                ]
            )
            let got = try await nobodyResponses(
                daemon,
                [
                    execute("insert or replace into people(id, name) values (1, 'mallory')"),
                    execute("replace into people(id, name) values (2, 'mallory')"),
                    execute("with n(v) as (select 1) insert or replace into people(id, name) select v, 'm' from n"),
                    execute("insert into tags values ('x', 'nobody')"),
                    execute("update or replace notes set body = 'b' where id = 1"),
                    execute("insert into people(name) values ('carol')"),
                    execute("insert or replace into mine values (1, 'b')"),
                    execute("select replace(name, 'a', 'b') from people"),
                ]
            )
            for number: Int64 in 1...4 {
                #expect(denied(got[number], "update-row"), "request \(number): \(String(describing: got[number]))")
            }
            #expect(denied(got[5], "delete-row", table: "notes"), "\(String(describing: got[5]))")
            for number: Int64 in 6...8 { #expect(got[number]?["ok"] == true, "request \(number): \(String(describing: got[number]))") }
            #expect(try await rows(daemon, "select name from people where id <= 2 order by id") == [["alice"], ["bob"]])
            #expect(try await rows(daemon, "select owner from tags") == [["root"]])
            #expect(try await rows(daemon, "select body from notes order by id") == [["a"], ["b"]])
        }
    }

    @Test("renaming a table needs rights on both names and gives no right over its rows the actor lacked")
    func renameTakesNothingOver() async throws {
        let grants = [
            grant([.executeSQL]), grant([.alterTable], table: "payroll"),
            grant([.viewTable, .insertRow, .updateRow, .deleteRow, .createTable, .alterTable, .dropTable], table: "mine"),
            grant([.viewTable, .alterTable, .dropTable], table: "drafts"), grant([.viewTable, .createTable, .alterTable], table: "final"),
        ]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            try await setUp(
                daemon,
                [
                    "create table payroll(name, salary)", "insert into payroll values ('ceo', 1000000)", "create table drafts(x)",
                ]
            )
            let got = try await nobodyResponses(
                daemon,
                [
                    execute("alter table payroll rename to mine"),
                    execute("alter table \"payroll\" rename to [mine]"),
                    execute("alter table payroll rename column salary to pay"),
                    execute("alter table drafts rename to final"),
                    execute("select * from mine"),
                ]
            )
            #expect(denied(got[1], "drop-table", table: "payroll"), "\(String(describing: got[1]))")
            #expect(denied(got[2], "drop-table", table: "payroll"), "\(String(describing: got[2]))")
            #expect(got[3]?["ok"] == true, "renaming a column stays within the table: \(String(describing: got[3]))")
            #expect(got[4]?["ok"] == true, "\(String(describing: got[4]))")
            #expect(got[5]?["ok"] != true)
            #expect(try await rows(daemon, "select count(*) from payroll") == [[1]])
        }
    }

    @Test("pragma functions need admin as the pragmas do, even on a connection where root used them")
    func pragmaFunctionsNeedAdmin() async throws {
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: [grant([.executeSQL, .viewTable])])
            $0.poolSize = 1
        }) {
            daemon in
            try await setUp(daemon, ["create table t(x)"])
            // Root's use connects the pragma's virtual table on the one pooled connection.
            _ = try await rows(daemon, "select * from pragma_database_list")
            _ = try await rows(daemon, "select * from pragma_compile_options")
            let got = try await nobodyResponses(
                daemon,
                [
                    execute("select * from pragma_database_list"),
                    execute("select count(*) from pragma_compile_options"),
                    execute("select * from pragma_integrity_check"),
                    execute("select name from pragma_function_list"),
                    execute("select * from dbstat"),
                    execute("select name from pragma_table_info('t')"),
                    execute("select name from pragma_table_list"),
                ]
            )
            for number: Int64 in 1...5 { #expect(denied(got[number], "admin"), "request \(number): \(String(describing: got[number]))") }
            #expect(got[6]?["result"]?["rows"] == [["x"]], "\(String(describing: got[6]))")
            #expect(got[7]?["ok"] == true, "\(String(describing: got[7]))")
        }
    }
}
