import EvdClient
import OrderedCollections
import Testing

@testable import EvdDaemon

// MARK: Helpers

/// A connection subscribed to every committed change event (the names with a dash), that tells
/// what each step changed.
struct ChangeWatcher: Sendable {
    let client: VetoTestClient
    let daemon: RunningDaemon

    /// Runs `step`, then returns the committed events it caused (event name and properties, the
    /// envelope removed), in order.
    func changes(_ step: () async throws -> Void) async throws -> [JSONObject] {
        try await self.client.sync()
        let before = self.client.events.count
        try await step()
        try await self.client.sync()
        return self.client.events.dropFirst(before).map(Self.strip)
    }

    /// `execute` of `sql` on a fresh connection, and the committed events it caused.
    func sql(_ sql: String, _ params: JSONValue? = nil) async throws -> [JSONObject] {
        try await self.changes {
            var arguments: JSONObject = ["sql": .string(sql)]
            if let params { arguments["params"] = params }
            try await self.daemon.request("execute", arguments)
        }
    }

    static func strip(_ event: JSONObject) -> JSONObject {
        var properties = event
        for key in ["type", "seq", "epoch", "time", "subscription", "session", "actor"] + transactionKeys {
            properties.removeValue(forKey: key)
        }
        return properties
    }
}

/// `watcher.sql(...)` as a free function: `#expect` cannot take a throwing method call apart.
func changes(of watcher: ChangeWatcher, _ sql: String, _ params: JSONValue? = nil) async throws -> [JSONObject] {
    try await watcher.sql(sql, params)
}

func withChangeWatcher<T: Sendable>(
    _ daemon: RunningDaemon,
    rows: Bool = false,
    _ body: (ChangeWatcher) async throws -> T
) async throws -> T {
    try await withVetoTestClient(daemon, ["events": ["*-*"], "rows": .bool(rows)]) { client in
        try await body(ChangeWatcher(client: client, daemon: daemon))
    }
}

/// Committed events (PROTOCOL.md §6.5) for raw SQL: every change that commits, from any client,
/// whatever made it — the statement, its triggers, foreign-key cascades, a REPLACE — and nothing
/// that rolls back.
@Suite("Committed change events from raw SQL")
struct CommittedEventsTests {
    @Test("a multi-row INSERT is one insert-rows; UPDATE and DELETE are one event per row with its key")
    func insertUpdateDelete() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, name text)")))
            try await withChangeWatcher(daemon) { watcher in
                let changed1 = try await changes(of: watcher, "insert into t(name) values ('a'), ('b'), ('c')")
                #expect(
                    changed1 == [
                        ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 3, "ignore": false, "replace": false]
                    ]
                )
                let changed2 = try await changes(of: watcher, "update t set name = upper(name) where id >= ?", [2])
                #expect(
                    changed2 == [
                        ["event": "update-row", "database": "main", "table": "t", "pks": [2]],
                        ["event": "update-row", "database": "main", "table": "t", "pks": [3]],
                    ]
                )
                let changed3 = try await changes(of: watcher, "delete from t where id = 1")
                #expect(
                    changed3 == [
                        ["event": "delete-row", "database": "main", "table": "t", "pks": [1]]
                    ]
                )
                // A read changes nothing.
                let changed4 = try await changes(of: watcher, "select * from t")
                #expect(changed4.isEmpty)
            }
        }
    }

    @Test("executemany of an INSERT is one insert-rows for all its parameter sets")
    func executemany() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await withChangeWatcher(daemon) { watcher in
                let events = try await watcher.changes {
                    try await daemon.request("executemany", ["sql": "insert into t values (?)", "params": [[1], [2], [3], [4]]])
                }
                #expect(events.map { $0["event"] } == ["insert-rows"])
                #expect(events.first?["num_rows"] == 4)
            }
        }
    }

    @Test("conflict clauses: OR IGNORE sets ignore, REPLACE sets replace, ON CONFLICT DO UPDATE is upsert-rows")
    func conflictClauses() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, v text)")))
            try await daemon.request(.execute(.init(sql: "insert into t values (1, 'a')")))
            try await withChangeWatcher(daemon) { watcher in
                let ignored = try await changes(of: watcher, "insert or ignore into t values (1, 'x'), (2, 'b')")
                #expect(
                    ignored == [
                        ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 1, "ignore": true, "replace": false]
                    ]
                )
                let nothing = try await changes(of: watcher, "insert into t values (2, 'y'), (3, 'c') on conflict do nothing")
                #expect(nothing.first?["ignore"] == true)
                // The row REPLACE put in place of the one with the same key is part of the insert, not a delete.
                let replaced = try await changes(of: watcher, "replace into t values (1, 'z')")
                #expect(
                    replaced == [
                        ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 1, "ignore": false, "replace": true]
                    ]
                )
                let upserted = try await changes(
                    of: watcher,
                    "insert into t values (1, 'u'), (9, 'n') on conflict(id) do update set v = excluded.v"
                )
                #expect(upserted == [["event": "upsert-rows", "database": "main", "table": "t", "num_rows": 2]])
                let withCTE = try await changes(of: watcher, "with s(x) as (select 10) insert or replace into t select x, 'w' from s")
                #expect(withCTE.first?["replace"] == true)
            }
        }
    }

    @Test("a REPLACE that removes a different row (another UNIQUE column) reports that row's delete-row")
    func replaceRemovesOtherRow() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, email text unique)")))
            try await daemon.request(.execute(.init(sql: "insert into t values (1, 'a@x'), (2, 'b@x')")))
            try await withChangeWatcher(daemon) { watcher in
                let events = try await changes(of: watcher, "replace into t values (3, 'a@x')")
                #expect(events.map { $0["event"] } == ["delete-row", "insert-rows"])
                #expect(events.first?["pks"] == [1])
                #expect(events.last?["replace"] == true)
            }
        }
    }

    @Test("keys: WITHOUT ROWID and composite keys give their key values in key order; a table without a key gives its rowid")
    func keys() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(
                "execute",
                ["sql": "create table pairs(b text, a integer, v, primary key (a, b)) without rowid"]
            )
            try await daemon.request(.execute(.init(sql: "create table plain(v)")))
            try await daemon.request(.execute(.init(sql: "create table named(code text primary key, v)")))
            try await daemon.request(.execute(.init(sql: "insert into pairs values ('x', 1, 0), ('y', 2, 0)")))
            try await daemon.request(.execute(.init(sql: "insert into plain values (10), (20)")))
            try await daemon.request(.execute(.init(sql: "insert into named values ('k1', 0)")))
            try await withChangeWatcher(daemon) { watcher in
                let changed11 = try await changes(of: watcher, "update pairs set v = 1 where a = 2")
                #expect(changed11.first?["pks"] == [2, "y"])
                let changed12 = try await changes(of: watcher, "delete from pairs where b = 'x'")
                #expect(changed12.first?["pks"] == [1, "x"])
                let changed13 = try await changes(of: watcher, "update plain set v = 0 where v = 20")
                #expect(changed13.first?["pks"] == [2])
                let changed14 = try await changes(of: watcher, "delete from named")
                #expect(changed14.first?["pks"] == ["k1"])
            }
        }
    }

    @Test("writes made by triggers and foreign-key cascades are reported for their own tables")
    func triggersAndCascades() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(
                "execute",
                [
                    "sql": """
                    create table parent(id integer primary key);
                    create table child(id integer primary key, parent_id integer references parent(id) on delete cascade);
                    create table audit(what text);
                    create trigger log_parent after insert on parent begin insert into audit values ('parent ' || new.id); end;
                    """
                ]
            )
            try await withChangeWatcher(daemon) { watcher in
                let inserted = try await changes(of: watcher, "insert into parent values (1), (2)")
                #expect(inserted.map { $0["table"] } == ["parent", "audit"])
                #expect(inserted.map { $0["num_rows"] } == [2, 2])
                try await daemon.request(.execute(.init(sql: "insert into child values (10, 1), (11, 1), (12, 2)")))
                let deleted = try await changes(of: watcher, "delete from parent where id = 1")
                #expect(deleted.map { $0["event"] } == ["delete-row", "delete-row", "delete-row"])
                #expect(
                    Set(deleted.map { "\($0["table"]?.stringValue ?? ""):\($0["pks"]?.arrayValue?.first?.intValue ?? 0)" }) == [
                        "parent:1", "child:10", "child:11",
                    ]
                )
            }
        }
    }

    @Test("nothing is reported before COMMIT, and nothing for ROLLBACK")
    func onlyCommitted() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await withChangeWatcher(daemon) { watcher in
                try await daemon.withClient { evd in
                    let pending = try await watcher.changes {
                        try await evd.request("begin")
                        try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                    }
                    #expect(pending.isEmpty)
                    let committed = try await watcher.changes { try await evd.request("commit") }
                    #expect(committed.map { $0["event"] } == ["insert-rows"])
                    let rolledBack = try await watcher.changes {
                        try await evd.request("begin")
                        try await evd.request(.execute(.init(sql: "insert into t values (2)")))
                        try await evd.request(.execute(.init(sql: "delete from t")))
                        try await evd.request("rollback")
                    }
                    #expect(rolledBack.isEmpty)
                }
                // A client that disconnects inside a transaction commits nothing.
                let abandoned = try await watcher.changes {
                    try await daemon.withClient { evd in
                        try await evd.request("begin")
                        try await evd.request(.execute(.init(sql: "insert into t values (3)")))
                    }
                    try await daemon.request("ping")
                }
                #expect(abandoned.isEmpty)
            }
        }
    }

    @Test("a rolled-back savepoint drops exactly its changes; a released one keeps them")
    func savepoints() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await withChangeWatcher(daemon) { watcher in
                let events = try await watcher.changes {
                    try await daemon.withClient { evd in
                        try await evd.request("begin")
                        try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                        try await evd.request("savepoint", ["name": "a"])
                        try await evd.request(.execute(.init(sql: "insert into t values (2), (3)")))
                        try await evd.request("savepoint", ["name": "b"])
                        try await evd.request(.execute(.init(sql: "delete from t")))
                        try await evd.request("rollback_savepoint", ["name": "b"])
                        try await evd.request("release_savepoint", ["name": "a"])
                        try await evd.request("savepoint", ["name": "c"])
                        try await evd.request(.execute(.init(sql: "insert into t values (4)")))
                        try await evd.request("rollback_savepoint", ["name": "c"])
                        try await evd.request("commit")
                    }
                }
                #expect(events.map { $0["event"] } == ["insert-rows", "insert-rows"])
                #expect(events.map { $0["num_rows"] } == [1, 2])
            }
        }
    }

    @Test("a statement that fails on a constraint reports none of the rows it had changed")
    func failedStatement() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key)")))
            try await daemon.request(.execute(.init(sql: "insert into t values (5)")))
            try await withChangeWatcher(daemon) { watcher in
                let events = try await watcher.changes {
                    try await daemon.withClient { evd in
                        try await evd.request("begin")
                        let failed = try await evd.rawRequest("execute", ["sql": "insert into t values (1), (2), (5)"])
                        #expect(failed["ok"] == false)
                        try await evd.request(.execute(.init(sql: "insert into t values (7)")))
                        try await evd.request("commit")
                    }
                }
                #expect(events.map { $0["num_rows"] } == [1])
                let count = try await daemon.request(.execute(.init(sql: "select count(*) from t")))
                #expect(count["rows"] == [[2]])
            }
        }
    }

    @Test("row images: rows: true gets rows, before and after; other subscribers get none of them")
    func rowImages() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, name text)")))
            try await withChangeWatcher(daemon) { plain in
                try await withChangeWatcher(daemon, rows: true) { images in
                    try await daemon.request(.execute(.init(sql: "insert into t values (1, 'a'), (2, 'b')")))
                    try await daemon.request(.execute(.init(sql: "update t set name = 'z' where id = 1")))
                    try await daemon.request(.execute(.init(sql: "delete from t where id = 2")))
                    try await images.client.sync()
                    try await plain.client.sync()
                    let withImages = images.client.events.map(ChangeWatcher.strip)
                    #expect(withImages[0]["rows"] == [["id": 1, "name": "a"], ["id": 2, "name": "b"]])
                    #expect(withImages[1]["before"] == ["id": 1, "name": "a"])
                    #expect(withImages[1]["after"] == ["id": 1, "name": "z"])
                    #expect(withImages[2]["before"] == ["id": 2, "name": "b"])
                    #expect(withImages[2]["after"] == nil)
                    let without = plain.client.events.map(ChangeWatcher.strip)
                    #expect(without.count == 3)
                    #expect(without.allSatisfy { $0["rows"] == nil && $0["before"] == nil && $0["after"] == nil })
                    // Everything else is the same event.
                    #expect(without[1]["pks"] == withImages[1]["pks"])
                }
            }
        }
    }

    /// A structured insert's after-images are written from the values bound where SQLite stores
    /// them as bound (`ChangeCapture.BoundImages`), and read back from SQLite everywhere else:
    /// either way they must be what the same rows inserted by raw SQL give, value for value.
    @Test("row images of a structured insert are those of the same raw INSERT, for every column type and value")
    func structuredInsertImages() async throws {
        try await withRunningDaemon { daemon in
            let columns = "(id integer primary key, i integer, r real, t text, n numeric, b blob, x, nn text not null default 'd')"
            try await daemon.request("execute", ["sql": .string("create table a \(columns); create table b \(columns)")])
            let names = ["id", "i", "r", "t", "n", "b", "x", "nn"]
            let rows: [[JSONValue]] = [
                [1, 5, 2.5, "s", 7, "text", 3.25, "v"],  // each stored as bound
                [2, "12", 3, 42, "3.0", 1.5, "y", "w"],  // converted by the column's affinity
                [3, 2.0, 4.0, -0.5, 2.5, nil, nil, "z"],  // whole reals: a REAL column keeps 4.0 as an integer
                [nil, nil, nil, "", nil, ["$base64": "AAEC"], true, "é😀"],  // a new rowid, a blob, a bool
                [5, .int(.max), -1e300, "a\"b\n", .int(.min), "", 1e-300, "q"],
                [6, -7, -0.001, "é😀\"\u{0}", .int(.min), "", -2.75, "ok"],  // as bound again
                [7, 0, 1e-300, "", nil, nil, nil, "x"],
            ]
            try await withChangeWatcher(daemon, rows: true) { watcher in
                let structured = try await watcher.changes {
                    let objects = rows.map { row in JSONValue.object(JSONObject(uniqueKeysWithValues: zip(names, row))) }
                    try await daemon.request("insert", ["table": "a", "rows": .array(objects)])
                    // Another order of the columns, and one left to its default: read back from SQLite.
                    try await daemon.request("insert", ["table": "a", "rows": [["t": "late", "id": 10, "r": 1.5]]])
                }
                let raw = try await watcher.changes {
                    let placeholders = names.map { _ in "?" }.joined(separator: ", ")
                    try await daemon.request(
                        "executemany",
                        [
                            "sql": .string("insert into b (\(names.joined(separator: ", "))) values (\(placeholders))"),
                            "params": .array(rows.map { .array($0) }),
                        ]
                    )
                    try await daemon.request(.execute(.init(sql: "insert into b (t, id, r) values ('late', 10, 1.5)")))
                }
                #expect(structured.count == 2 && raw.count == 2)
                for (ours, theirs) in zip(structured, raw) {
                    #expect(ours["event"] == "insert-rows")
                    #expect(ours["rows"] != nil)
                    #expect(ours["rows"] == theirs["rows"])
                }
            }
        }
    }

    /// SQLite's rules for a declared type's affinity (the first that applies): INT, then CHAR /
    /// CLOB / TEXT, then BLOB or no type, then REAL / FLOA / DOUB, else NUMERIC; any case.
    @Test(
        "the affinity a bound image assumes is SQLite's for the declared type",
        arguments: [
            ("INTEGER", "i"), ("bigint", "i"), ("FLOATING POINT", "i"), ("VarChar(10)", "t"), ("clob", "t"),
            ("CHARINT", "i"), ("text", "t"), ("", "b"), ("Blob", "b"), ("double precision", "r"), ("float", "r"),
            ("real", "r"), ("numeric", "n"), ("decimal(10,2)", "n"), ("boolean", "n"), ("date", "n"),
        ] as [(String, Character)]
    )
    func boundImageAffinity(type: String, affinity: Character) {
        let column = ChangeCapture.BoundColumn(ColumnInfo(name: "c", type: type, notNull: false, defaultValue: .null, pk: 0), key: 0)
        let expected: (integer: Bool, real: Bool, text: Bool) =
            switch affinity {
            case "i", "n": (true, true, false)
            case "t": (false, false, true)
            case "b": (true, true, true)
            default: (false, true, false)  // "r"
            }
        #expect(column.integer == expected.integer && column.real == expected.real && column.text == expected.text)
    }

    @Test("schema: raw CREATE, ALTER ... ADD COLUMN, RENAME and DROP give create-, alter-, rename- and drop-table")
    func schemaEvents() async throws {
        try await withRunningDaemon { daemon in
            try await withChangeWatcher(daemon) { watcher in
                let changed17 = try await changes(of: watcher, "create table t(a)")
                #expect(
                    changed17 == [
                        ["event": "create-table", "database": "main", "table": "t", "schema": "CREATE TABLE t(a)"]
                    ]
                )
                let changed18 = try await changes(of: watcher, "create table if not exists t(a)")
                #expect(changed18.isEmpty)
                let changed19 = try await changes(of: watcher, "alter table t add column b text")
                #expect(
                    changed19 == [
                        [
                            "event": "alter-table", "database": "main", "table": "t", "before_schema": "CREATE TABLE t(a)",
                            "after_schema": "CREATE TABLE t(a, b text)",
                        ]
                    ]
                )
                let changed20 = try await changes(of: watcher, "alter table t rename to u")
                #expect(
                    changed20 == [
                        ["event": "rename-table", "database": "main", "old_table": "t", "new_table": "u"]
                    ]
                )
                // Indexes, views and triggers are no table's committed schema change.
                let changed21 = try await changes(of: watcher, "create index ui on u(a); create view uv as select * from u")
                #expect(changed21.isEmpty)
                let changed22 = try await changes(of: watcher, "drop table u")
                #expect(changed22 == [["event": "drop-table", "database": "main", "table": "u"]])
                // A temp table is the connection's own: nothing is committed for anyone.
                let changed23 = try await changes(of: watcher, "create temp table scratch(x); insert into scratch values (1)")
                #expect(changed23.isEmpty)
            }
        }
    }
}

/// The DDL live events of PROTOCOL.md §6.4 for raw SQL: tables, indexes, views, triggers and
/// columns, and vetoes that stop them.
@Suite("DDL events from raw SQL")
struct DDLEventsTests {
    @Test("create and drop of a table, index, view and trigger fire before_/after_ with target.kind and the sql")
    func targets() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClient(daemon, ["events": ["before_create", "after_create", "before_drop", "after_drop"]]) { listener in
                let statements = [
                    "create table t(a)", "create index ti on t(a)", "create view tv as select a from t",
                    "create trigger tt after insert on t begin select 1; end", "drop trigger tt", "drop view tv",
                    "drop index ti", "drop table t",
                ]
                for sql in statements { try await daemon.request("execute", ["sql": .string(sql)]) }
                try await listener.sync()
                let seen = listener.events.map {
                    "\($0["event"]?.stringValue ?? "") \($0["target"]?["kind"]?.stringValue ?? "") \($0["target"]?["name"]?.stringValue ?? "")"
                }
                #expect(
                    seen == [
                        "before_create table t", "after_create table t", "before_create index ti", "after_create index ti",
                        "before_create view tv", "after_create view tv", "before_create trigger tt", "after_create trigger tt",
                        "before_drop trigger tt", "after_drop trigger tt", "before_drop view tv", "after_drop view tv",
                        "before_drop index ti", "after_drop index ti", "before_drop table t", "after_drop table t",
                    ]
                )
                #expect(listener.events.first?["sql"] == "create table t(a)")
                #expect(listener.events.first?["database"] == "main")
            }
        }
    }

    @Test("columns: CREATE TABLE and ALTER TABLE ADD COLUMN fire before_/after_parent_attach per new column")
    func parentAttach() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClient(daemon, ["events": ["*_parent_attach"]]) { listener in
                try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, name text)")))
                try await daemon.request(.execute(.init(sql: "alter table t add column score real")))
                try await listener.sync()
                let before = listener.events.filter { $0["event"] == "before_parent_attach" }
                #expect(before.map { $0["target"]?["name"] } == ["id", "name", "score"])
                #expect(before.last?["target"] == ["kind": "column", "name": "score", "type": "REAL"])
                #expect(before.last?["parent"] == ["kind": "table", "name": "t"])
                #expect(listener.events.filter { $0["event"] == "after_parent_attach" }.count == 3)
            }
        }
    }

    @Test("vetoes: a denied before_drop keeps the table, a denied before_create creates nothing, a denied column is not added")
    func vetoes() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table keep(a)")))
            let deny: VetoDecider = { veto, _ in
                let name = veto["target"]?["name"]?.stringValue ?? ""
                return ["keep", "forbidden", "secret"].contains(name) ? VetoAnswer.deny("policy") : VetoAnswer.allow
            }
            try await withVetoTestClient(daemon, ["veto": ["before_drop", "before_create", "before_parent_attach"]], decide: deny) { _ in
                try await withChangeWatcher(daemon) { watcher in
                    let events = try await watcher.changes {
                        let drop = try await daemon.withClient { try await $0.rawRequest("execute", ["sql": "drop table keep"]) }
                        #expect(drop["error"]?["code"] == "vetoed")
                        let create = try await daemon.withClient {
                            try await $0.rawRequest("execute", ["sql": "create table forbidden(a)"])
                        }
                        #expect(create["error"]?["code"] == "vetoed")
                        let add = try await daemon.withClient {
                            try await $0.rawRequest("execute", ["sql": "alter table keep add column secret text"])
                        }
                        #expect(add["error"]?["code"] == "vetoed")
                        #expect(add["error"]?["event"] == "before_parent_attach")
                    }
                    #expect(events.isEmpty)
                }
            }
            let tables = try await daemon.request(
                "execute",
                ["sql": "select name from sqlite_schema where type = 'table' and name not like '\\_evd\\_%' escape '\\' order by name"]
            )
            #expect(tables["rows"] == [["keep"]])
            let columns = try await daemon.request(.execute(.init(sql: "select name from pragma_table_info('keep')")))
            #expect(columns["rows"] == [["a"]])
        }
    }
}

/// The raw-SQL statement classifier behind insert-rows' `ignore`/`replace` and upsert-rows.
@Suite("SQL intent")
struct SQLIntentTests {
    @Test(
        "statements are classified by their top-level words",
        arguments: [
            ("INSERT INTO t VALUES (1)", StatementIntent.Kind.insert, false, false),
            ("insert or ignore into t values (1)", .insert, true, false),
            ("REPLACE INTO t VALUES (1)", .insert, false, true),
            ("insert or replace into t values (1)", .insert, false, true),
            ("insert into t values (1) on conflict do nothing", .insert, true, false),
            ("insert into t values (1) on conflict(id) do update set v = excluded.v", .upsert, false, false),
            ("with x as (select 'on conflict do update') insert into t select * from x", .insert, false, false),
            ("-- replace\n insert into \"replace\" values ('or ignore')", .insert, false, false),
            ("update t set v = 1", .other, false, false),
            ("select 'insert'", .other, false, false),
        ]
    )
    func classify(sql: String, kind: StatementIntent.Kind, ignore: Bool, replace: Bool) {
        let intent = SQLScanner.intent(of: sql)
        #expect(intent.kind == kind)
        #expect(intent.ignore == ignore)
        #expect(intent.replace == replace)
    }
}
