import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// A small deterministic generator (SplitMix64), so a failing statement can be found again.
private struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        self.state &+= 0x9E37_79B9_7F4A_7C15
        var z = self.state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Generates SQL mixing DML, DDL, triggers, views, CTEs, pragmas, functions and ATTACH over
/// tables the restricted user may and may not touch.
private struct SQLFuzzer {
    var random: SplitMix

    /// Every table and view the statements name: the user's, the read-only one, the write-only
    /// one, the secret ones, SQLite's and evd's own.
    static let tables = [
        "pub", "ro", "wo", "secret", "v_secret", "v_pub", "scratch", "sqlite_master", "sqlite_sequence", "_evd_journal",
        "temp.tt", "pragma_database_list", "dbstat", "counted",
    ]
    static let functions = [
        "upper(x)", "length(x)", "json_extract('{\"a\":1}', '$.a')", "fts3_tokenizer('simple')", "load_extension('x')",
        "sqlite_compileoption_get(0)", "typeof(x)", "hex(x)", "replace(x, 'a', 'b')", "printf('%s', x)",
        "coalesce(x, 1)", "quote(x)", "randomblob(4)", "last_insert_rowid()", "changes()",
    ]
    static let pragmas = [
        "table_info(secret)", "table_info(pub)", "database_list", "writable_schema = 1", "foreign_keys = off",
        "journal_mode = delete", "query_only = 1", "compile_options", "integrity_check", "index_list(secret)",
        "table_list", "function_list", "trusted_schema = 1", "recursive_triggers = 1", "schema_version",
    ]

    mutating func pick<T>(_ items: [T]) -> T { items[Int(self.random.next() % UInt64(items.count))] }
    mutating func table() -> String { self.pick(Self.tables) }
    mutating func chance(_ percent: UInt64) -> Bool { self.random.next() % 100 < percent }

    mutating func select() -> String {
        let source = self.table()
        switch self.random.next() % 9 {
        case 0: return "SELECT * FROM \(source)"
        case 1: return "SELECT x FROM pub WHERE x IN (SELECT x FROM \(source))"
        case 2: return "WITH c AS (SELECT * FROM \(source)) SELECT * FROM c"
        case 3: return "SELECT x FROM pub UNION ALL SELECT x FROM \(source)"
        case 4: return "SELECT \(self.pick(Self.functions)) FROM \(source)"
        case 5: return "SELECT (SELECT group_concat(x) FROM \(source)) AS leaked"
        case 6: return "SELECT value FROM json_each((SELECT json_group_array(x) FROM \(source)))"
        case 7: return "SELECT x, row_number() OVER (ORDER BY x) FROM \(source)"
        default: return "SELECT count(*) FROM \(source) WHERE EXISTS (SELECT 1 FROM \(self.table()))"
        }
    }

    mutating func statement() -> String {
        let target = self.table()
        switch self.random.next() % 25 {
        case 0, 1, 2: return self.select()
        case 3: return "INSERT INTO \(target)(x) VALUES ('fuzz')"
        case 4: return "INSERT INTO \(target)(x) \(self.select())"
        case 5: return "INSERT OR REPLACE INTO \(target)(id, x) VALUES (1, 'fuzz')"
        case 6: return "REPLACE INTO \(target)(id, x) VALUES (2, 'fuzz')"
        case 7: return "UPDATE \(target) SET x = (SELECT x FROM \(self.table()) LIMIT 1)"
        case 8: return "UPDATE OR REPLACE \(target) SET id = 1"
        case 9: return "DELETE FROM \(target) WHERE x IN (SELECT x FROM \(self.table()))"
        case 10: return "INSERT INTO \(target)(x) VALUES ('fuzz') RETURNING *"
        case 11: return "CREATE TABLE scratch AS \(self.select())"
        case 12: return "CREATE VIEW scratch AS \(self.select())"
        case 13: return "DROP TABLE \(target)"
        case 14: return "ALTER TABLE \(target) RENAME TO \(self.pick(["scratch", "pub", "stolen", "ro"]))"
        case 15: return "ALTER TABLE \(target) ADD COLUMN extra"
        case 16:
            return
                "CREATE TRIGGER t\(self.random.next() % 1000) AFTER INSERT ON \(self.pick(["pub", "scratch", "ro"])) BEGIN INSERT INTO pub(x) SELECT x FROM \(self.table()); END"
        case 17:
            return
                "CREATE TEMP TRIGGER tt\(self.random.next() % 1000) AFTER INSERT ON \(self.pick(["main.pub", "main.ro"])) BEGIN INSERT INTO pub(x) SELECT x FROM \(self.table()); END"
        case 18: return "CREATE TEMP TABLE \(self.pick(["tt", "pub", "secret"])) AS \(self.select())"
        case 19: return "PRAGMA \(self.pick(Self.pragmas))"
        case 20: return "ATTACH DATABASE '\(self.pick(["/tmp/evd-fuzz.db", ":memory:", "file:/etc/passwd?mode=ro"]))' AS other"
        case 21: return "CREATE INDEX i\(self.random.next() % 1000) ON \(target)(x)"
        case 22: return "DROP TRIGGER \(self.pick(["audit", "t1", "tt1"]))"
        case 23: return self.pick(["ANALYZE", "VACUUM", "VACUUM INTO '\(AuthorizerFuzzTests.leakPath)'", "REINDEX"])
        default: return "SELECT 1"
        }
    }
}

/// Issue 17's fuzz test: thousands of generated statements as a restricted uid, and an oracle of
/// what that uid may touch: it holds every row right on `pub` (and may create, alter and drop
/// `scratch`), may only read `ro` and only insert into `wo`, and holds nothing on `secret`.
@Suite("Authorizer fuzz (another uid)")
struct AuthorizerFuzzTests {
    static let marker = "SECRET-7f3a"
    /// Where a `VACUUM INTO` would copy the whole database, secrets and all.
    static let leakPath = "/tmp/evd-fuzz-leak.db"

    @Test("generated SQL as a restricted uid never reads or writes outside its grants", arguments: [UInt64(17), 4242])
    func fuzz(seed: UInt64) async throws {
        let grants = [
            Grant(who: .uid(65534), actions: [.executeSQL], database: "main"),
            Grant(who: .uid(65534), actions: [.viewTable, .insertRow, .updateRow, .deleteRow], database: "main", table: "pub"),
            Grant(who: .uid(65534), actions: [.viewTable], database: "main", table: "ro"),
            Grant(who: .uid(65534), actions: [.insertRow], database: "main", table: "wo"),
            Grant(
                who: .uid(65534),
                actions: [.viewTable, .insertRow, .updateRow, .deleteRow, .createTable, .alterTable, .dropTable],
                database: "main",
                table: "scratch"
            ),
        ]
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: grants)
            $0.poolSize = 2
        }) { daemon in
            let setup = [
                "create table pub(id integer primary key, x)", "create table ro(id integer primary key, x)",
                "create table wo(id integer primary key, x)", "create table secret(id integer primary key, x)",
                "create table audit(x)", "create table counted(id integer primary key autoincrement, x)",
                "insert into pub(x) values ('p1'), ('p2')", "insert into ro(x) values ('r1')",
                "insert into wo(x) values ('\(Self.marker)-wo')", "insert into secret(x) values ('\(Self.marker)')",
                "insert into counted(x) values (1)",
                "create view v_secret as select * from secret", "create view v_pub as select * from pub",
                // Root's trigger: writes nobody may not make itself.
                "create trigger audit after delete on pub begin insert into audit values (old.x); end",
            ]
            for sql in setup { try await daemon.request("execute", ["sql": .string(sql)]) }
            let before = try await Self.snapshot(daemon)

            var fuzzer = SQLFuzzer(random: SplitMix(state: seed))
            let statements = (0..<1500).map { _ in fuzzer.statement() }
            let got = responses(try await messages(try asNobody(daemon, statements.map(execute), linger: 120)))
            #expect(got.count == statements.count, "the client got \(got.count) of \(statements.count) responses")

            // Nothing secret in any response: not secret's rows, not wo's (insert-only).
            for (number, response) in got {
                let text = String(decoding: JSONValue.object(response).jsonBytes, as: UTF8.self)
                #expect(!text.contains(Self.marker), "statement \(number) leaked: \(statements[Int(number) - 1]) -> \(text)")
            }
            let after = try await Self.snapshot(daemon)
            #expect(after.secret == before.secret, "secret changed")
            #expect(after.readOnly == before.readOnly, "ro changed")
            #expect(after.writeOnly.starts(with: before.writeOnly), "wo lost or changed a row: \(after.writeOnly)")
            #expect(after.schema.filter { $0 != "scratch" } == before.schema, "the schema changed: \(after.schema)")
            #expect(after.triggers == ["audit"], "triggers: \(after.triggers)")
            #expect(after.sequence == before.sequence, "sqlite_sequence changed")
            // No copy of a secret landed where nobody could read it later.
            #expect(!after.pub.contains { $0.contains(Self.marker) }, "a secret was copied into pub")
            #expect(!after.writeOnly.dropFirst().contains { $0.contains(Self.marker) }, "a secret was copied into wo")
            #expect(try await daemon.request(.execute(.init(sql: "pragma foreign_keys")))["rows"] == [[1]])
            #expect(!FileManager.default.fileExists(atPath: Self.leakPath), "VACUUM INTO copied the database out")
        }
    }

    struct Snapshot: Equatable {
        var secret: [String] = []
        var readOnly: [String] = []
        var writeOnly: [String] = []
        var pub: [String] = []
        var schema: [String] = []
        var triggers: [String] = []
        var sequence: [String] = []
    }

    static func snapshot(_ daemon: RunningDaemon) async throws -> Snapshot {
        func column(_ sql: String) async throws -> [String] {
            (try await daemon.request("execute", ["sql": .string(sql)])["rows"]?.arrayValue ?? []).map {
                String(decoding: $0.jsonBytes, as: UTF8.self)
            }
        }
        var snapshot = Snapshot()
        snapshot.secret = try await column("select id, x from secret order by id")
        snapshot.readOnly = try await column("select id, x from ro order by id")
        snapshot.writeOnly = try await column("select x from wo order by id")
        snapshot.pub = try await column("select x from pub order by id")
        snapshot.schema = try await column(
            "select name from sqlite_master where type in ('table', 'view') and name not like 'sqlite_%' order by name"
        ).map { String($0.dropFirst(2).dropLast(2)) }
        snapshot.triggers = try await column("select name from sqlite_master where type = 'trigger' order by name").map {
            String($0.dropFirst(2).dropLast(2))
        }
        snapshot.sequence = try await column("select * from sqlite_sequence")
        return snapshot
    }
}
