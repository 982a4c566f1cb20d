import CSQLite
import EvdClient
import Testing

@testable import EvdDaemon

/// A bare SQLite connection on a file in a temporary directory with a `ChangeCapture` installed on
/// it, as `PooledConnection` does, and no daemon: statements run as the daemon runs one (shapes
/// loaded, a unit begun with the statement's intent, the unit failed when the statement fails).
private final class Bench {
    let sqlite: SQLiteConnection
    let schema = SchemaCache()
    let capture: ChangeCapture

    init(_ path: String, schema sql: String) throws {
        self.sqlite = try SQLiteConnection(path: path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
        try self.sqlite.exec(sql)
        self.capture = ChangeCapture(connection: self.sqlite, schema: self.schema)
        self.capture.active = true
    }

    /// Runs one statement as a unit of captured changes.
    func run(_ sql: String, writes tables: [String]) throws {
        self.capture.loadShapes(of: tables)
        self.capture.beginUnit(SQLScanner.intent(of: sql))
        do {
            try self.sqlite.exec(sql)
        } catch {
            self.capture.failUnit()
            throw error
        }
    }

    /// The committed events of what was recorded, as `event name` + properties.
    func events() -> [JSONObject] {
        self.capture.committedEvents(database: "main").all.map { event in
            var object: JSONObject = ["event": .string(event.kind.name)]
            for (key, value) in event.properties { object[key] = value }
            return object
        }
    }

    /// The row images of the committed events, as the JSON members they add to each event.
    func images() -> [String?] {
        self.capture.committedEvents(database: "main").all.map { $0.images.map { String(decoding: $0, as: UTF8.self) } }
    }

    func count(_ table: String) throws -> Int64? { try self.sqlite.scalarInt("select count(*) from \(table)") }
}

private func withBench<T>(_ schema: String, _ body: (Bench) throws -> T) async throws -> T {
    try await withTemporaryDirectory { directory in
        let bench = try Bench(directory + "/unit.db", schema: schema)
        return try withExtendedLifetime(bench) { try body(bench) }
    }
}

@Suite("ChangeCapture on a bare connection")
struct ChangeCaptureUnitTests {
    @Test("INSERT, UPDATE and DELETE: every row is recorded; the events are one insert-rows and one event per updated or deleted row")
    func insertUpdateDelete() async throws {
        try await withBench("create table t(id integer primary key, name text)") { bench in
            try bench.sqlite.exec("BEGIN IMMEDIATE")
            try bench.run("insert into t(name) values ('a'), ('b'), ('c')", writes: ["t"])
            try bench.run("update t set name = upper(name) where id >= 2", writes: ["t"])
            try bench.run("delete from t where id = 1", writes: ["t"])
            #expect(bench.capture.recordedCount == 6)
            #expect(
                bench.events() == [
                    ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 3, "ignore": false, "replace": false],
                    ["event": "update-row", "database": "main", "table": "t", "pks": [2]],
                    ["event": "update-row", "database": "main", "table": "t", "pks": [3]],
                    ["event": "delete-row", "database": "main", "table": "t", "pks": [1]],
                ]
            )
            // No images asked for: none made.
            #expect(bench.images() == [nil, nil, nil, nil])
            try bench.sqlite.exec("COMMIT")
            bench.capture.discardAll()
            #expect(bench.capture.isEmpty)
            #expect(bench.events().isEmpty)
        }
    }

    @Test("a deferred transaction records whole rows (shapes unknown until it has read); the events are the same")
    func deferredTransaction() async throws {
        try await withBench("create table t(k text primary key, v integer) without rowid") { bench in
            try bench.sqlite.exec("BEGIN")
            try bench.run("insert into t values ('x', 1), ('y', 2)", writes: ["t"])
            try bench.run("update t set v = v + 1 where k = 'y'", writes: ["t"])
            try bench.run("delete from t where k = 'x'", writes: ["t"])
            #expect(
                bench.events() == [
                    ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 2, "ignore": false, "replace": false],
                    ["event": "update-row", "database": "main", "table": "t", "pks": ["y"]],
                    ["event": "delete-row", "database": "main", "table": "t", "pks": ["x"]],
                ]
            )
            try bench.sqlite.exec("COMMIT")
        }
    }

    @Test("with images: the redo log holds every row change whole, in order; the events carry the rows")
    func imagesAndRedoLog() async throws {
        try await withBench("create table dogs(id integer primary key, name text, weight real)") { bench in
            bench.capture.images = true
            try bench.sqlite.exec("BEGIN IMMEDIATE")
            try bench.run("insert into dogs values (1, 'Rex', 30), (2, 'Fido', 12.5)", writes: ["dogs"])
            try bench.run("update dogs set name = 'REX' where id = 1", writes: ["dogs"])
            try bench.run("delete from dogs where id = 2", writes: ["dogs"])
            let redo = try #require(bench.capture.redoLog())
            #expect(redo.columns == ["dogs": ["id", "name", "weight"]])
            #expect(
                redo.changes == [
                    RedoChange(table: "dogs", operation: .insert, rowid: 1, newRowid: 1, before: nil, after: [1, "Rex", 30.0]),
                    RedoChange(table: "dogs", operation: .insert, rowid: 2, newRowid: 2, before: nil, after: [2, "Fido", 12.5]),
                    RedoChange(
                        table: "dogs",
                        operation: .update,
                        rowid: 1,
                        newRowid: 1,
                        before: [1, "Rex", 30.0],
                        after: [1, "REX", 30.0]
                    ),
                    RedoChange(table: "dogs", operation: .delete, rowid: 2, newRowid: 2, before: [2, "Fido", 12.5], after: nil),
                ]
            )
            #expect(
                bench.images() == [
                    #","rows":[{"id":1,"name":"Rex","weight":30.0},{"id":2,"name":"Fido","weight":12.5}]"#,
                    #","before":{"id":1,"name":"Rex","weight":30.0},"after":{"id":1,"name":"REX","weight":30.0}"#,
                    #","before":{"id":2,"name":"Fido","weight":12.5}"#,
                ]
            )
            try bench.sqlite.exec("COMMIT")
        }
    }

    @Test("ROLLBACK TO a savepoint drops exactly the changes made since it; RELEASE keeps them")
    func savepoints() async throws {
        try await withBench("create table t(id integer primary key)") { bench in
            try bench.sqlite.exec("BEGIN IMMEDIATE")
            try bench.run("insert into t values (1)", writes: ["t"])
            try bench.sqlite.exec("SAVEPOINT a")
            bench.capture.savepoint("a")
            try bench.run("insert into t values (2)", writes: ["t"])
            try bench.sqlite.exec("SAVEPOINT B")
            bench.capture.savepoint("B")
            try bench.run("delete from t where id = 1", writes: ["t"])
            #expect(bench.capture.recordedCount == 3)
            // Names are case-insensitive, as SQLite's.
            try bench.sqlite.exec("ROLLBACK TO A")
            bench.capture.rollback(to: "A")
            #expect(bench.capture.recordedCount == 1)
            try bench.run("insert into t values (3)", writes: ["t"])
            try bench.sqlite.exec("RELEASE a")
            bench.capture.release("a")
            #expect(try bench.count("t") == 2)
            #expect(
                bench.events() == [
                    ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 1, "ignore": false, "replace": false],
                    ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 1, "ignore": false, "replace": false],
                ]
            )
            try bench.sqlite.exec("COMMIT")
        }
    }

    @Test("a failed statement's changes are dropped (SQLite undid them); under OR FAIL the rows before the failure stay")
    func failedStatements() async throws {
        try await withBench("create table t(id integer primary key, v text); insert into t values (1, 'old')") { bench in
            try bench.sqlite.exec("BEGIN IMMEDIATE")
            #expect(throws: SQLiteError.self) { try bench.run("insert into t values (5, 'x'), (1, 'dup')", writes: ["t"]) }
            #expect(bench.capture.recordedCount == 0)
            #expect(throws: SQLiteError.self) { try bench.run("insert or fail into t values (6, 'y'), (1, 'dup')", writes: ["t"]) }
            #expect(bench.capture.recordedCount == 1)
            #expect(try bench.count("t") == 2)
            #expect(
                bench.events() == [
                    ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 1, "ignore": false, "replace": false]
                ]
            )
            try bench.sqlite.exec("COMMIT")
        }
    }

    @Test("triggers and cascades are recorded for their own tables, in the order SQLite made them (the parent row before its cascade)")
    func triggersAndCascades() async throws {
        let schema = """
            pragma foreign_keys = on;
            create table parent(id integer primary key);
            create table child(id integer primary key, parent_id integer references parent(id) on delete cascade);
            create table audit(what text);
            create trigger log_parent after insert on parent begin insert into audit values ('parent ' || new.id); end;
            """
        try await withBench(schema) { bench in
            try bench.sqlite.exec("BEGIN IMMEDIATE")
            try bench.run("insert into parent values (1), (2)", writes: ["parent", "audit"])
            try bench.run("insert into child values (10, 1), (11, 1), (12, 2)", writes: ["child"])
            bench.capture.discardAll()
            try bench.run("delete from parent where id = 1", writes: ["parent", "child"])
            #expect(
                bench.events() == [
                    ["event": "delete-row", "database": "main", "table": "parent", "pks": [1]],
                    ["event": "delete-row", "database": "main", "table": "child", "pks": [10]],
                    ["event": "delete-row", "database": "main", "table": "child", "pks": [11]],
                ]
            )
            try bench.sqlite.exec("COMMIT")
            #expect(try bench.count("child") == 1)
        }
        try await withBench(schema) { bench in
            try bench.sqlite.exec("BEGIN IMMEDIATE")
            try bench.run("insert into parent values (1), (2)", writes: ["parent", "audit"])
            #expect(bench.events().map { $0["table"] } == ["parent", "audit"])
            #expect(bench.events().map { $0["num_rows"] } == [2, 2])
            try bench.sqlite.exec("COMMIT")
        }
    }

    @Test("nothing is recorded while inactive, inside withoutRecording, or for temp tables")
    func notRecorded() async throws {
        try await withBench("create table t(x)") { bench in
            try bench.sqlite.exec("create temp table scratch(x)")
            try bench.sqlite.exec("BEGIN IMMEDIATE")
            bench.capture.active = false
            try bench.run("insert into t values (1)", writes: ["t"])
            #expect(bench.capture.recordedCount == 0)
            bench.capture.active = true
            try bench.capture.withoutRecording { try bench.run("insert into t values (2)", writes: ["t"]) }
            #expect(bench.capture.recordedCount == 0)
            #expect(bench.capture.active)
            try bench.run("insert into scratch values (3)", writes: ["scratch"])
            #expect(bench.capture.recordedCount == 0)
            try bench.run("insert into t values (4)", writes: ["t"])
            #expect(bench.capture.recordedCount == 1)
            try bench.sqlite.exec("COMMIT")
        }
    }
}
