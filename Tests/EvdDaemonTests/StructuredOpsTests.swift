import EvdClient
import Foundation
import OrderedCollections
import Testing

@testable import EvdDaemon

// MARK: Helpers

/// A table with an INTEGER PRIMARY KEY, a NOT NULL column and a column with a DEFAULT.
private let dogsSQL = "create table dogs(id integer primary key, name text not null, age integer default 3)"
/// `dogsSQL` as `sqlite_schema` keeps it (SQLite spells the keywords `CREATE TABLE`).
private let dogsSchema = "CREATE TABLE" + dogsSQL.dropFirst("create table".count)
/// A table with a composite primary key.
private let pairsSQL = "create table pairs(a text, b integer, v text, primary key (a, b))"

/// Runs `body` against a real daemon with one client connection, after running `setup` SQL on it.
private func withStructuredClient(
    _ setup: String? = nil,
    _ body: @Sendable @escaping (RunningDaemon, EvdConnection) async throws -> Void
) async throws {
    try await withRunningDaemon { daemon in
        try await daemon.withClient { evd in
            if let setup { try await evd.request("execute", ["sql": .string(setup)]) }
            try await body(daemon, evd)
        }
    }
}

extension EvdConnection {
    /// The rows of a query (`execute`'s `rows`).
    fileprivate func rows(_ sql: String) async throws -> JSONValue {
        try await self.request("execute", ["sql": .string(sql)])["rows"] ?? .null
    }

    /// The names of the database's tables, sorted.
    fileprivate func tableNames() async throws -> JSONValue {
        try await self.rows("select name from sqlite_schema where type = 'table' and name not like '\\_evd\\_%' escape '\\' order by name")
    }
}

/// Asserts a `bad_request` naming `field`, whose message contains `message` when given.
private func expectBadRequest(
    _ error: EvdError,
    field: String,
    message: String? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(error.code == "bad_request", "\(error)", sourceLocation: sourceLocation)
    #expect(error.extra["field"] == .string(field), "\(error)", sourceLocation: sourceLocation)
    if let message {
        #expect(error.message.contains(message), "\(error.message) should contain \(message)", sourceLocation: sourceLocation)
    }
}

/// `describe`'s column objects.
private func describeColumns(_ evd: EvdConnection, _ table: String) async throws -> [JSONValue] {
    try await evd.request("describe", ["table": .string(table)])["columns"]?.arrayValue ?? []
}

/// One column as `describe` gives it.
private func column(_ name: String, _ type: String, notnull: Bool = false, default value: JSONValue = .null, pk: Int = 0) -> JSONValue {
    ["name": .string(name), "type": .string(type), "notnull": .bool(notnull), "default": value, "pk": .integer(pk)]
}

/// The committed change events of the structured ops (PROTOCOL.md §6.5).
private let changeEventNames: JSONValue = [
    "create-table", "drop-table", "alter-table", "rename-table", "insert-rows", "upsert-rows", "update-row", "delete-row",
]

/// An event without its envelope and its transaction: its name and its properties, in wire order.
private func withoutEnvelope(_ event: JSONObject) -> JSONObject {
    var properties = event
    for key in envelopeKeys + transactionKeys where key != "event" { properties.removeValue(forKey: key) }
    return properties
}

/// A connection subscribed to the committed change events.
private struct ChangeListener: Sendable {
    let client: VetoTestClient

    /// Runs `step`, then returns the committed events it caused (without their envelope), in order.
    func events(during step: () async throws -> Void) async throws -> [JSONObject] {
        try await self.client.sync()
        let before = self.client.events.count
        try await step()
        try await self.client.sync()
        return self.client.events.dropFirst(before).map(withoutEnvelope)
    }

    /// Every event received so far, without its envelope (after a sync).
    func all() async throws -> [JSONObject] {
        try await self.client.sync()
        return self.client.events.map(withoutEnvelope)
    }
}

/// Subscribes a connection to the committed change events (with row images if `rows`) for `body`.
private func withChangeListener<T: Sendable>(
    _ daemon: RunningDaemon,
    rows: Bool = false,
    _ body: (ChangeListener) async throws -> T
) async throws -> T {
    try await withVetoTestClient(daemon, ["events": changeEventNames, "rows": .bool(rows)]) { client in
        try await body(ChangeListener(client: client))
    }
}

/// The names of the live DDL events.
private let ddlEventNames: JSONValue = [
    "before_create", "after_create", "before_parent_attach", "after_parent_attach", "before_drop", "after_drop",
]

/// A `create_table` request that must be refused, and how.
struct CreateTableRejection: Sendable, CustomTestStringConvertible {
    let testDescription: String
    let arguments: JSONObject
    let field: String
    let message: String
}

/// A column's values and the type `create_table` infers from them.
struct TypeInference: Sendable, CustomTestStringConvertible {
    let values: [JSONValue]
    let type: String
    var testDescription: String {
        "\(String(decoding: JSONValue.array(self.values).jsonBytes, as: UTF8.self)) → \(self.type)"
    }
}

// MARK: The tests

/// The structured ops of PROTOCOL.md §3 (`create_table`, `insert`, `upsert`, `update`, `delete`,
/// `drop_table`, `describe`) with Datasette's semantics and evd's documented differences, against a
/// real daemon; their committed events (§6.5) and DDL events (§6.4).
@Suite("Structured ops")
struct StructuredOpsTests {
    // MARK: create_table

    @Test("create_table from columns: text/integer/float/blob map to TEXT/INTEGER/REAL/BLOB, pk is an inline INTEGER PRIMARY KEY")
    func createFromColumns() async throws {
        try await withStructuredClient { _, evd in
            let result = try await evd.request(
                "create_table",
                [
                    "table": "dogs", "pk": "id",
                    "columns": [
                        ["name": "id", "type": "integer"], ["name": "name", "type": "text"], ["name": "weight", "type": "float"],
                        ["name": "photo", "type": "blob"],
                    ],
                ]
            )
            let schema =
                "CREATE TABLE \"dogs\" (\n   \"id\" INTEGER PRIMARY KEY,\n   \"name\" TEXT,\n   \"weight\" REAL,\n   \"photo\" BLOB\n)"
            #expect(result == ["table": "dogs", "schema": .string(schema), "created": true, "inserted": 0])
            #expect(try await evd.rows("select sql from sqlite_schema where name = 'dogs'") == [[.string(schema)]])
            #expect(
                try await describeColumns(evd, "dogs") == [
                    column("id", "INTEGER", pk: 1), column("name", "TEXT"), column("weight", "REAL"), column("photo", "BLOB"),
                ]
            )
        }
    }

    @Test(
        "create_table: each column type maps to its SQLite type (a missing type is text)",
        arguments: [
            ("text", "TEXT"), ("integer", "INTEGER"), ("float", "REAL"), ("blob", "BLOB"), ("INTEGER", "INTEGER"), (nil, "TEXT"),
        ] as [(String?, String)]
    )
    func columnTypes(given: String?, stored: String) async throws {
        try await withStructuredClient { _, evd in
            var spec: JSONObject = ["name": "c"]
            if let given { spec["type"] = .string(given) }
            try await evd.request("create_table", ["table": "t", "columns": [.object(spec)]])
            #expect(try await describeColumns(evd, "t") == [column("c", stored)])
        }
    }

    @Test("create_table with pks: a composite PRIMARY KEY clause, columns keep their types")
    func createWithCompositeKey() async throws {
        try await withStructuredClient { _, evd in
            let result = try await evd.request(
                "create_table",
                [
                    "table": "pairs", "pks": ["a", "b"],
                    "columns": [["name": "a", "type": "text"], ["name": "b", "type": "integer"], ["name": "v"]],
                ]
            )
            let schema = "CREATE TABLE \"pairs\" (\n   \"a\" TEXT,\n   \"b\" INTEGER,\n   \"v\" TEXT,\n   PRIMARY KEY (\"a\", \"b\")\n)"
            #expect(result["schema"] == .string(schema))
            #expect(result["created"] == true)
            #expect(
                try await describeColumns(evd, "pairs") == [column("a", "TEXT", pk: 1), column("b", "INTEGER", pk: 2), column("v", "TEXT")]
            )
        }
    }

    @Test("create_table from rows: columns in first-appearance order, types inferred, values stored as SQLite keeps them")
    func createFromRows() async throws {
        try await withStructuredClient { _, evd in
            let result = try await evd.request(
                "create_table",
                [
                    "table": "typed",
                    "rows": [
                        [
                            "i": 1, "f": 1.5, "m": 1, "b": true, "n": nil, "s": "x", "o": ["k": [1, 2]],
                            "blob": ["$base64": "AAEC"],
                        ],
                        ["i": 2, "f": 2.5, "m": 2.5, "b": false, "n": nil, "s": "y", "o": ["k": 3], "blob": ["$base64": "AwQ="]],
                    ],
                ]
            )
            let schema =
                "CREATE TABLE \"typed\" (\n   \"i\" INTEGER,\n   \"f\" REAL,\n   \"m\" REAL,\n   \"b\" INTEGER,\n   \"n\" TEXT,\n"
                + "   \"s\" TEXT,\n   \"o\" TEXT,\n   \"blob\" BLOB\n)"
            #expect(result == ["table": "typed", "schema": .string(schema), "created": true, "inserted": 2])
            #expect(
                try await evd.rows("select i, f, m, b, n, s, o, blob, typeof(o), typeof(blob) from typed order by rowid") == [
                    [1, 1.5, 1.0, 1, nil, "x", #"{"k":[1,2]}"#, ["$base64": "AAEC"], "text", "blob"],
                    [2, 2.5, 2.5, 0, nil, "y", #"{"k":3}"#, ["$base64": "AwQ="], "text", "blob"],
                ]
            )
        }
    }

    @Test(
        "create_table from rows infers a column's type from its values",
        arguments: [
            TypeInference(values: [1, 2], type: "INTEGER"),
            TypeInference(values: [1.5, 2.5], type: "REAL"),
            TypeInference(values: [1, 2.5], type: "REAL"),
            TypeInference(values: [true, false], type: "INTEGER"),
            TypeInference(values: [1, true], type: "INTEGER"),
            TypeInference(values: [nil, nil], type: "TEXT"),
            TypeInference(values: [nil, 3], type: "INTEGER"),
            TypeInference(values: ["x", "y"], type: "TEXT"),
            TypeInference(values: ["x", 3], type: "TEXT"),
            TypeInference(values: [["nested": ["a": 1]]], type: "TEXT"),
            TypeInference(values: [[1, 2]], type: "TEXT"),
            TypeInference(values: [["$base64": "AAEC"]], type: "BLOB"),
        ]
    )
    func typeInference(_ inference: TypeInference) async throws {
        try await withStructuredClient { _, evd in
            let rows = inference.values.map { JSONValue.object(["v": $0]) }
            let result = try await evd.request("create_table", ["table": "t", "rows": .array(rows)])
            #expect(result["inserted"] == .integer(rows.count))
            #expect(try await describeColumns(evd, "t") == [column("v", inference.type)])
        }
    }

    @Test("create_table from rows: a nested object is stored as its JSON text, a bool as 0/1")
    func nestedAndBoolValues() async throws {
        try await withStructuredClient { _, evd in
            try await evd.request(
                "create_table",
                ["table": "t", "rows": [["o": ["a": ["b": "c"]], "flag": true], ["o": ["x"], "flag": false]]]
            )
            #expect(
                try await evd.rows("select o, json_valid(o), flag from t order by rowid") == [
                    [#"{"a":{"b":"c"}}"#, 1, 1], [#"["x"]"#, 1, 0],
                ]
            )
        }
    }

    @Test("create_table from rows with a pk not among the rows' keys adds it first as INTEGER PRIMARY KEY")
    func createAddsMissingKey() async throws {
        try await withStructuredClient { _, evd in
            let result = try await evd.request(
                "create_table",
                ["table": "dogs", "pk": "id", "rows": [["name": "Rex", "v": 3], ["name": "Fido", "v": 4]]]
            )
            let schema = "CREATE TABLE \"dogs\" (\n   \"id\" INTEGER PRIMARY KEY,\n   \"name\" TEXT,\n   \"v\" INTEGER\n)"
            #expect(result == ["table": "dogs", "schema": .string(schema), "created": true, "inserted": 2])
            #expect(try await evd.rows("select id, name, v from dogs order by id") == [[1, "Rex", 3], [2, "Fido", 4]])
        }
    }

    @Test("create_table with rows on an existing table inserts them: created false, inserted N, the schema unchanged")
    func createOnExistingInserts() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let result = try await evd.request(
                "create_table",
                ["table": "dogs", "pk": "id", "rows": [["id": 1, "name": "Rex"], ["id": 2, "name": "Fido", "age": 9]]]
            )
            #expect(result == ["table": "dogs", "schema": .string(dogsSchema), "created": false, "inserted": 2])
            #expect(try await evd.rows("select id, name, age from dogs order by id") == [[1, "Rex", 3], [2, "Fido", 9]])
        }
    }

    @Test("create_table with columns on an existing table is bad_request (field table), and changes nothing")
    func createColumnsOnExisting() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let error = try await evd.expectError("create_table", ["table": "dogs", "columns": [["name": "x"]]])
            expectBadRequest(error, field: "table", message: #"table "dogs" already exists"#)
            #expect(try await evd.rows("select sql from sqlite_schema where name = 'dogs'") == [[.string(dogsSchema)]])
        }
    }

    @Test("create_table on an existing table with a different pk is bad_request: pk cannot be changed")
    func createChangesKey() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let error = try await evd.expectError("create_table", ["table": "dogs", "pk": "name", "rows": [["id": 1, "name": "Rex"]]])
            expectBadRequest(error, field: "pk", message: "pk cannot be changed for existing table")
            #expect(try await evd.rows("select count(*) from dogs") == [[0]])
        }
    }

    static let createTableRejections: [CreateTableRejection] = [
        .init(
            testDescription: "missing table",
            arguments: ["rows": [["a": 1]]],
            field: "table",
            message: "missing required argument 'table'"
        ),
        .init(testDescription: "empty table", arguments: ["table": "", "rows": [["a": 1]]], field: "table", message: "Table is required"),
        .init(
            testDescription: "sqlite_ prefix",
            arguments: ["table": "sqlite_mine", "rows": [["a": 1]]],
            field: "table",
            message: "Invalid table name"
        ),
        .init(
            testDescription: "neither columns nor rows",
            arguments: ["table": "t"],
            field: "columns",
            message: "columns or rows is required"
        ),
        .init(
            testDescription: "both columns and rows",
            arguments: ["table": "t", "columns": [["name": "a"]], "rows": [["a": 1]]],
            field: "columns",
            message: "Cannot specify columns with rows"
        ),
        .init(testDescription: "rows: []", arguments: ["table": "t", "rows": []], field: "rows", message: "columns or rows is required"),
        .init(
            testDescription: "columns: []",
            arguments: ["table": "t", "columns": []],
            field: "columns",
            message: "columns or rows is required"
        ),
        .init(
            testDescription: "duplicate column",
            arguments: ["table": "t", "columns": [["name": "a"], ["name": "b"], ["name": "a"]]],
            field: "columns",
            message: "Duplicate column name: a"
        ),
        .init(
            testDescription: "bad column type",
            arguments: ["table": "t", "columns": [["name": "a", "type": "varchar"]]],
            field: "columns[0].type",
            message: "Unsupported column type: varchar"
        ),
        .init(
            testDescription: "column not an object",
            arguments: ["table": "t", "columns": [["name": "a"], "b"]],
            field: "columns[1]",
            message: "columns must be a list of objects"
        ),
        .init(
            testDescription: "pk and pks",
            arguments: ["table": "t", "rows": [["a": 1]], "pk": "a", "pks": ["a"]],
            field: "pks",
            message: "Cannot specify both pk and pks"
        ),
        .init(
            testDescription: "ignore and replace",
            arguments: ["table": "t", "rows": [["a": 1]], "pk": "a", "ignore": true, "replace": true],
            field: "replace",
            message: "ignore and replace are mutually exclusive"
        ),
        .init(
            testDescription: "ignore without pk",
            arguments: ["table": "t", "rows": [["a": 1]], "ignore": true],
            field: "ignore",
            message: "ignore and replace require pk or pks"
        ),
        .init(
            testDescription: "replace without pk",
            arguments: ["table": "t", "rows": [["a": 1]], "replace": true],
            field: "replace",
            message: "ignore and replace require pk or pks"
        ),
        .init(
            testDescription: "ignore without rows",
            arguments: ["table": "t", "columns": [["name": "a"]], "pk": "a", "ignore": true],
            field: "ignore",
            message: "ignore and replace require rows"
        ),
        .init(
            testDescription: "unknown argument",
            arguments: ["table": "t", "rows": [["a": 1]], "return": true],
            field: "return",
            message: "unknown argument 'return'"
        ),
    ]

    @Test("create_table validation: bad_request naming the field, and no table is created", arguments: Self.createTableRejections)
    func createTableRejected(_ rejection: CreateTableRejection) async throws {
        try await withStructuredClient { _, evd in
            let error = try await evd.expectError("create_table", rejection.arguments)
            expectBadRequest(error, field: rejection.field, message: rejection.message)
            #expect(try await evd.tableNames() == [])
        }
    }

    // MARK: insert

    @Test("insert: rows are stored (a row without a column gets its DEFAULT) and readable with execute")
    func insert() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let result = try await evd.request(
                "insert",
                ["table": "dogs", "rows": [["id": 1, "name": "Rex", "age": 5], ["id": 2, "name": "Fido"], ["name": "Auto"]]]
            )
            #expect(result == ["inserted": 3])
            #expect(try await evd.rows("select id, name, age from dogs order by id") == [[1, "Rex", 5], [2, "Fido", 3], [3, "Auto", 3]])
        }
    }

    @Test(
        "insert: every kind of value is stored as written, from rows the parser reads flat (escapes, empty and non-ASCII text, bools, numbers) and from rows it does not (a blob, a nested value)"
    )
    func insertValueKinds() async throws {
        try await withStructuredClient("create table v (id integer primary key, t)") { _, evd in
            // Written by hand, with the escapes a client may write.
            let flat =
                #"{"op":"insert","id":"flat","table":"v","rows":[{"id":1,"t":"a\"b\\c\n\u00e9"},{"id":2,"t":""},"#
                + #"{"id":3,"t":"é😀"},{"id":4,"t":true},{"id":5,"t":null},{"id":6,"t":-2.5},{"id":7,"t":9007199254740993},"#
                + #"{"t":"no id","id":8}]}"#
            let nested =
                #"{"op":"insert","id":"nested","table":"v","rows":[{"id":9,"t":{"$base64":"AAEC"}},"#
                + #"{"id":10,"t":{"a":[1,"x"]}},{"id":11,"t":"plain"}]}"#
            try await evd.sendRaw(Array((flat + "\n" + nested + "\n").utf8))
            for (id, inserted) in [("flat", 8), ("nested", 3)] as [(JSONValue, JSONValue)] {
                let response = try #require(await evd.nextMessage(ofType: "response", within: 10))
                #expect(response["id"] == id)
                #expect(response["result"] == ["inserted": inserted])
            }
            #expect(
                try await evd.rows("select id, typeof(t), t from v order by id") == [
                    [1, "text", "a\"b\\c\né"], [2, "text", ""], [3, "text", "é😀"], [4, "integer", 1], [5, "null", nil],
                    [6, "real", -2.5], [7, "integer", 9_007_199_254_740_993], [8, "text", "no id"],
                    [9, "blob", ["$base64": "AAEC"]], [10, "text", #"{"a":[1,"x"]}"#], [11, "text", "plain"],
                ]
            )
        }
    }

    @Test("insert with return: the rows as stored, defaults and assigned keys included")
    func insertReturn() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let result = try await evd.request(
                "insert",
                ["table": "dogs", "return": true, "rows": [["name": "Rex"], ["id": 7, "name": "Fido", "age": 1]]]
            )
            #expect(
                result == [
                    "inserted": 2, "rows": [["id": 1, "name": "Rex", "age": 3], ["id": 7, "name": "Fido", "age": 1]],
                ]
            )
        }
    }

    @Test("insert with ignore: a duplicate key is skipped, inserted counts what SQLite inserted")
    func insertIgnore() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
            let result = try await evd.request(
                "insert",
                ["table": "dogs", "ignore": true, "rows": [["id": 1, "name": "Other"], ["id": 2, "name": "New"]]]
            )
            #expect(result == ["inserted": 1])
            #expect(try await evd.rows("select id, name from dogs order by id") == [[1, "Rex"], [2, "New"]])
        }
    }

    @Test("insert with replace: the row is replaced; one insert-rows with replace true and no delete-row")
    func insertReplace() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            try await daemon.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex", "age": 5]]])
            try await withChangeListener(daemon) { watcher in
                let events = try await watcher.events {
                    let result = try await daemon.request(
                        "insert",
                        ["table": "dogs", "replace": true, "rows": [["id": 1, "name": "Max"]]]
                    )
                    #expect(result == ["inserted": 1])
                }
                #expect(
                    events == [
                        ["event": "insert-rows", "database": "main", "table": "dogs", "num_rows": 1, "ignore": false, "replace": true]
                    ]
                )
            }
            // REPLACE deletes and inserts: the column not given gets its default again.
            #expect(try await daemon.request(.execute(.init(sql: "select id, name, age from dogs")))["rows"] == [[1, "Max", 3]])
        }
    }

    @Test("insert of an unknown column without alter: bad_request (field rows) naming each row and column; nothing inserted")
    func insertUnknownColumn() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let error = try await evd.expectError(
                "insert",
                ["table": "dogs", "rows": [["name": "a", "color": "x"], ["name": "b"], ["name": "c", "zzz": 1, "color": "y"]]]
            )
            expectBadRequest(error, field: "rows", message: "Row 0 has invalid columns: color; Row 2 has invalid columns: color, zzz")
            #expect(try await evd.rows("select count(*) from dogs") == [[0]])
            #expect(try await describeColumns(evd, "dogs").count == 3)
        }
    }

    @Test("insert with alter: the column is added (describe shows it), alter-table comes before insert-rows")
    func insertAlter() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            try await withChangeListener(daemon) { watcher in
                let events = try await watcher.events {
                    let result = try await daemon.request(
                        "insert",
                        ["table": "dogs", "alter": true, "rows": [["name": "Rex", "color": "brown"]]]
                    )
                    #expect(result == ["inserted": 1])
                }
                #expect(
                    events == [
                        [
                            "event": "alter-table", "database": "main", "table": "dogs", "before_schema": .string(dogsSchema),
                            "after_schema": .string(dogsSchema.dropLast() + #", "color" TEXT)"#),
                        ],
                        ["event": "insert-rows", "database": "main", "table": "dogs", "num_rows": 1, "ignore": false, "replace": false],
                    ]
                )
            }
            try await daemon.withClient { evd in
                let columns = try await describeColumns(evd, "dogs")
                #expect(columns.last == column("color", "TEXT"))
                #expect(try await evd.rows("select name, color from dogs") == [["Rex", "brown"]])
            }
        }
    }

    @Test("insert with alter adding two columns: both added, one alter-table from the schema before to the schema after")
    func insertAlterTwoColumns() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            try await withChangeListener(daemon) { watcher in
                let events = try await watcher.events {
                    let result = try await daemon.request(
                        "insert",
                        ["table": "dogs", "alter": true, "rows": [["name": "Rex", "color": "brown", "weight": 4.5]]]
                    )
                    #expect(result == ["inserted": 1])
                }
                // Datasette reports the op's schema change as one alter-table.
                #expect(eventNames(events) == ["alter-table", "insert-rows"])
                let alter = try #require(events.first)
                #expect(alter["before_schema"] == .string(dogsSchema))
                #expect(alter["after_schema"] == .string(dogsSchema.dropLast() + #", "color" TEXT, "weight" REAL)"#))
            }
            try await daemon.withClient { evd in
                let columns = try await describeColumns(evd, "dogs")
                #expect(columns.suffix(2) == [column("color", "TEXT"), column("weight", "REAL")])
                #expect(try await evd.rows("select name, color, weight from dogs") == [["Rex", "brown", 4.5]])
            }
        }
    }

    @Test("insert with ignore and replace together is bad_request (field replace)")
    func insertIgnoreAndReplace() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let error = try await evd.expectError(
                "insert",
                ["table": "dogs", "ignore": true, "replace": true, "rows": [["id": 1, "name": "Rex"]]]
            )
            expectBadRequest(error, field: "replace", message: #"Cannot use "ignore" and "replace" at the same time"#)
        }
    }

    @Test("insert of rows that are not objects is bad_request naming rows[i]")
    func insertRowsNotObjects() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let error = try await evd.expectError("insert", ["table": "dogs", "rows": [["name": "a"], 5]])
            expectBadRequest(error, field: "rows[1]", message: "rows must be a list of objects")
            let missing = try await evd.expectError("insert", ["table": "dogs"])
            expectBadRequest(missing, field: "rows")
            #expect(try await evd.rows("select count(*) from dogs") == [[0]])
        }
    }

    @Test("insert into a table that does not exist is no_such_table")
    func insertNoSuchTable() async throws {
        try await withStructuredClient { _, evd in
            let error = try await evd.expectError("insert", ["table": "nope", "rows": [["a": 1]]])
            #expect(error.code == "no_such_table", "\(error)")
            #expect(error.extra["table"] == "nope")
            #expect(try await evd.tableNames() == [])
        }
    }

    @Test("insert of a duplicate primary key is sql_error with sqlite_code SQLITE_CONSTRAINT_PRIMARYKEY")
    func insertDuplicateKey() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
            let error = try await evd.expectError("insert", ["table": "dogs", "rows": [["id": 1, "name": "Again"]]])
            #expect(error.code == "sql_error", "\(error)")
            #expect(error.extra["sqlite_code"] == "SQLITE_CONSTRAINT_PRIMARYKEY", "\(error)")
        }
    }

    @Test("a batch that fails part-way inserts none of its rows (its earlier statements are undone too)")
    func insertBatchIsAtomic() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
            // Two runs of keys: the first statement succeeds, the second fails on its last row.
            let error = try await evd.expectError(
                "insert",
                [
                    "table": "dogs",
                    "rows": [["id": 10, "name": "a"], ["id": 11, "name": "b", "age": 1], ["id": 1, "name": "dup", "age": 2]],
                ]
            )
            #expect(error.code == "sql_error", "\(error)")
            #expect(try await evd.rows("select id from dogs order by id") == [[1]])
        }
    }

    @Test("inside begin/commit, a failing insert leaves the session's earlier rows and none of its own")
    func insertBatchInTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            try await daemon.withClient { evd in
                try await evd.request("begin")
                try await evd.request("insert", ["table": "dogs", "rows": [["id": 5, "name": "early"]]])
                let error = try await evd.expectError(
                    "insert",
                    [
                        "table": "dogs",
                        "rows": [["id": 6, "name": "x"], ["id": 7, "name": "y", "age": 1], ["id": 5, "name": "dup", "age": 1]],
                    ]
                )
                #expect(error.code == "sql_error", "\(error)")
                #expect(try await evd.rows("select id from dogs order by id") == [[5]])
                try await evd.request("insert", ["table": "dogs", "rows": [["id": 8, "name": "late"]]])
                #expect(try await evd.request("commit") == [:])
            }
            #expect(try await daemon.request(.execute(.init(sql: "select id from dogs order by id")))["rows"] == [[5], [8]])
        }
    }

    // MARK: upsert

    @Test("upsert: rows with a new key are inserted, existing ones updated; only the given columns change")
    func upsert() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request(
                "insert",
                ["table": "dogs", "rows": [["id": 1, "name": "Rex", "age": 5], ["id": 2, "name": "Fido", "age": 7]]]
            )
            let result = try await evd.request(
                "upsert",
                ["table": "dogs", "rows": [["id": 1, "name": "Rex2"], ["id": 3, "name": "New", "age": 1]]]
            )
            #expect(result == ["upserted": 2])
            #expect(
                try await evd.rows("select id, name, age from dogs order by id") == [[1, "Rex2", 5], [2, "Fido", 7], [3, "New", 1]]
            )
        }
    }

    @Test("upsert: a row missing a column keeps its value for it, even beside rows that have it")
    func upsertKeepsMissingColumns() async throws {
        // No NOT NULL column here: SQLite checks NOT NULL before it sees the conflict.
        try await withStructuredClient("create table pets(id integer primary key, name text, age integer)") { _, evd in
            try await evd.request(
                "insert",
                ["table": "pets", "rows": [["id": 1, "name": "Rex", "age": 5], ["id": 2, "name": "Fido", "age": 7]]]
            )
            let result = try await evd.request(
                "upsert",
                ["table": "pets", "rows": [["id": 1, "name": "A"], ["id": 2, "age": 9], ["id": 1, "age": 6]]]
            )
            #expect(result == ["upserted": 3])
            #expect(try await evd.rows("select id, name, age from pets order by id") == [[1, "A", 6], [2, "Fido", 9]])
        }
    }

    @Test(
        "upsert: a row without its primary key, or with a null one, is bad_request with Datasette's message",
        arguments: [
            ([["name": "x"]], #"Row 0 is missing primary key column(s): "id""#),
            ([["id": 1, "name": "x"], ["id": nil, "name": "y"]], #"Row 1 has null primary key column(s): "id""#),
            (
                [["name": "x"], ["id": nil]],
                #"Row 0 is missing primary key column(s): "id"; Row 1 has null primary key column(s): "id""#
            ),
        ] as [(JSONValue, String)]
    )
    func upsertWithoutKey(rows: JSONValue, message: String) async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let error = try await evd.expectError("upsert", ["table": "dogs", "rows": rows])
            expectBadRequest(error, field: "rows", message: message)
            #expect(try await evd.rows("select count(*) from dogs") == [[0]])
        }
    }

    @Test("upsert on a composite key names the missing key column")
    func upsertCompositeMissing() async throws {
        try await withStructuredClient(pairsSQL) { _, evd in
            let error = try await evd.expectError("upsert", ["table": "pairs", "rows": [["a": "x", "v": "1"]]])
            expectBadRequest(error, field: "rows", message: #"Row 0 is missing primary key column(s): "b""#)
            let result = try await evd.request("upsert", ["table": "pairs", "rows": [["a": "x", "b": 1, "v": "one"]]])
            #expect(result == ["upserted": 1])
            try await evd.request("upsert", ["table": "pairs", "rows": [["a": "x", "b": 1, "v": "uno"]]])
            #expect(try await evd.rows("select a, b, v from pairs") == [["x", 1, "uno"]])
        }
    }

    @Test("upsert rejects ignore and replace (even false)", arguments: ["ignore", "replace"])
    func upsertRejectsConflictModes(flag: String) async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            for value: JSONValue in [true, false] {
                let error = try await evd.expectError("upsert", ["table": "dogs", "rows": [["id": 1, "name": "a"]], flag: value])
                expectBadRequest(error, field: flag, message: "Upsert does not support ignore or replace")
            }
            #expect(try await evd.rows("select count(*) from dogs") == [[0]])
        }
    }

    @Test("upsert on a rowid table: rows carry \"rowid\"; an existing rowid is updated, a new one inserted")
    func upsertRowidTable() async throws {
        try await withStructuredClient("create table notes(body text, n integer); insert into notes values ('one', 1), ('two', 2)") {
            _,
            evd in
            let missing = try await evd.expectError("upsert", ["table": "notes", "rows": [["body": "x"]]])
            expectBadRequest(missing, field: "rows", message: #"Row 0 is missing primary key column(s): "rowid""#)
            let result = try await evd.request(
                "upsert",
                ["table": "notes", "rows": [["rowid": 1, "body": "changed"], ["rowid": 5, "body": "new"]]]
            )
            #expect(result == ["upserted": 2])
            #expect(
                try await evd.rows("select rowid, body, n from notes order by rowid") == [
                    [1, "changed", 1], [2, "two", 2], [5, "new", nil],
                ]
            )
        }
    }

    @Test("upsert with return: the rows as stored after the upsert")
    func upsertReturn() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex", "age": 5]]])
            let result = try await evd.request(
                "upsert",
                ["table": "dogs", "return": true, "rows": [["id": 1, "name": "R"], ["id": 4, "name": "Four"]]]
            )
            #expect(
                result == ["upserted": 2, "rows": [["id": 1, "name": "R", "age": 5], ["id": 4, "name": "Four", "age": 3]]]
            )
        }
    }

    // MARK: update

    @Test("update by a single primary key changes only the given columns")
    func update() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex", "age": 5], ["id": 2, "name": "Fido"]]])
            let result = try await evd.request("update", ["table": "dogs", "pks": [1], "update": ["name": "Max"]])
            #expect(result == ["updated": 1])
            #expect(try await evd.rows("select id, name, age from dogs order by id") == [[1, "Max", 5], [2, "Fido", 3]])
        }
    }

    @Test("update by a composite primary key, its values in key order")
    func updateComposite() async throws {
        try await withStructuredClient(pairsSQL + "; insert into pairs values ('x', 1, 'old'), ('x', 2, 'other'), ('y', 1, 'third')") {
            _,
            evd in
            let result = try await evd.request("update", ["table": "pairs", "pks": ["x", 1], "update": ["v": "new"]])
            #expect(result == ["updated": 1])
            #expect(
                try await evd.rows("select a, b, v from pairs order by a, b") == [["x", 1, "new"], ["x", 2, "other"], ["y", 1, "third"]]
            )
        }
    }

    @Test("update with return: the row as stored after the update")
    func updateReturn() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
            let result = try await evd.request("update", ["table": "dogs", "pks": [1], "update": ["age": 6], "return": true])
            #expect(result == ["updated": 1, "rows": [["id": 1, "name": "Rex", "age": 6]]])
        }
    }

    @Test("update with alter adds the unknown column (describe shows it) and sets it")
    func updateAlter() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
            let result = try await evd.request("update", ["table": "dogs", "pks": [1], "update": ["color": "brown"], "alter": true])
            #expect(result == ["updated": 1])
            #expect(try await describeColumns(evd, "dogs").last == column("color", "TEXT"))
            #expect(try await evd.rows("select color from dogs") == [["brown"]])
        }
    }

    @Test("update of a row that does not exist is no_such_row")
    func updateNoSuchRow() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let error = try await evd.expectError("update", ["table": "dogs", "pks": [99], "update": ["name": "x"]])
            #expect(error.code == "no_such_row", "\(error)")
            #expect(error.extra["pks"] == [99])
            #expect(error.extra["table"] == "dogs")
        }
    }

    @Test("update with the wrong number of key values is bad_request (field pks)", arguments: [[1, 2], []] as [JSONValue])
    func updateWrongKeyCount(pks: JSONValue) async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
            let error = try await evd.expectError("update", ["table": "dogs", "pks": pks, "update": ["name": "x"]])
            expectBadRequest(error, field: "pks")
            #expect(try await evd.rows("select name from dogs") == [["Rex"]])
        }
    }

    @Test("update of an unknown column without alter is bad_request naming the column; the row is unchanged")
    func updateUnknownColumn() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
            let error = try await evd.expectError("update", ["table": "dogs", "pks": [1], "update": ["name": "Max", "nope": 1]])
            expectBadRequest(error, field: "update.nope", message: "no such column: nope")
            #expect(try await evd.rows("select name from dogs") == [["Rex"]])
        }
    }

    // MARK: delete

    @Test("delete removes the row with that primary key")
    func delete() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"], ["id": 2, "name": "Fido"]]])
            #expect(try await evd.request("delete", ["table": "dogs", "pks": [1]]) == ["deleted": 1])
            #expect(try await evd.rows("select id from dogs") == [[2]])
        }
    }

    @Test("delete of a row that does not exist is no_such_row")
    func deleteNoSuchRow() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            let error = try await evd.expectError("delete", ["table": "dogs", "pks": [42]])
            #expect(error.code == "no_such_row", "\(error)")
            #expect(error.extra["pks"] == [42])
        }
    }

    @Test("delete by a composite primary key")
    func deleteComposite() async throws {
        try await withStructuredClient(pairsSQL + "; insert into pairs values ('x', 1, 'a'), ('x', 2, 'b')") { _, evd in
            #expect(try await evd.request("delete", ["table": "pairs", "pks": ["x", 1]]) == ["deleted": 1])
            #expect(try await evd.rows("select a, b from pairs") == [["x", 2]])
            let error = try await evd.expectError("delete", ["table": "pairs", "pks": ["x", 1]])
            #expect(error.code == "no_such_row", "\(error)")
        }
    }

    // MARK: drop_table

    @Test("drop_table drops the table")
    func dropTable() async throws {
        try await withStructuredClient(dogsSQL) { _, evd in
            #expect(try await evd.request("drop_table", ["table": "dogs"]) == [:])
            #expect(try await evd.tableNames() == [])
            let error = try await evd.expectError("describe", ["table": "dogs"])
            #expect(error.code == "no_such_table", "\(error)")
        }
    }

    @Test("drop_table of a table that does not exist is no_such_table")
    func dropNoSuchTable() async throws {
        try await withStructuredClient { _, evd in
            let error = try await evd.expectError("drop_table", ["table": "nope"])
            #expect(error.code == "no_such_table", "\(error)")
        }
    }

    @Test("a veto listener denying before_drop keeps the table; the request gets vetoed")
    func dropVetoed() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            try await withVetoTestClient(
                daemon,
                ["veto": ["before_drop"], "name": "keeper"],
                decide: VetoAnswer.always(VetoAnswer.deny("no"))
            ) { listener in
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("drop_table", ["table": "dogs"])
                    vetoExpectVetoed(error, event: "before_drop", by: "keeper", reason: "no")
                    #expect(try await evd.tableNames() == [["dogs"]])
                }
                #expect(listener.vetoes.first?["target"] == ["kind": "table", "name": "dogs"])
            }
        }
    }

    // MARK: describe

    @Test("describe: each column's name, type, notnull, default and pk")
    func describe() async throws {
        try await withStructuredClient(
            "create table t(id integer primary key, name text not null default 'anon', score real default 1.5, note)"
        ) { _, evd in
            let columns = try await describeColumns(evd, "t")
            #expect(
                columns == [
                    column("id", "INTEGER", pk: 1), column("name", "TEXT", notnull: true, default: "'anon'"),
                    column("score", "REAL", default: "1.5"), column("note", ""),
                ]
            )
        }
    }

    @Test("describe: a column_reflect listener that modifies column changes what describe returns")
    func describeReflectModified() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            let rename: VetoDecider = { veto, _ in
                guard var column = veto["column"]?.objectValue, column["name"] == "name" else { return VetoAnswer.allow }
                column["type"] = "VARCHAR(20)"
                column["default"] = "'?'"
                return VetoAnswer.modify(["column": .object(column)])
            }
            try await withVetoTestClient(daemon, ["veto": ["column_reflect"]], decide: rename) { listener in
                try await daemon.withClient { evd in
                    let columns = try await describeColumns(evd, "dogs")
                    #expect(
                        columns == [
                            column("id", "INTEGER", pk: 1), column("name", "VARCHAR(20)", notnull: true, default: "'?'"),
                            column("age", "INTEGER", default: "3"),
                        ]
                    )
                }
                #expect(listener.vetoes.count == 3)
                #expect(listener.vetoes.first?["table"] == "dogs")
                #expect(listener.vetoes.first?["database"] == "main")
            }
        }
    }

    @Test("describe of a table that does not exist is no_such_table")
    func describeNoSuchTable() async throws {
        try await withStructuredClient("create view v as select 1 as x") { _, evd in
            for table in ["nope", "v"] {
                let error = try await evd.expectError("describe", ["table": .string(table)])
                #expect(error.code == "no_such_table", "\(table): \(error)")
            }
        }
    }

    // MARK: Committed events

    @Test("create_table fires create-table with the schema; with rows, insert-rows after it")
    func createTableEvents() async throws {
        try await withRunningDaemon { daemon in
            try await withChangeListener(daemon) { watcher in
                let fromColumns = try await watcher.events {
                    try await daemon.request("create_table", ["table": "a", "columns": [["name": "x", "type": "integer"]]])
                }
                #expect(
                    fromColumns == [
                        ["event": "create-table", "database": "main", "table": "a", "schema": "CREATE TABLE \"a\" (\n   \"x\" INTEGER\n)"]
                    ]
                )
                let fromRows = try await watcher.events {
                    try await daemon.request("create_table", ["table": "b", "pk": "id", "rows": [["id": 1], ["id": 2]]])
                }
                #expect(
                    fromRows == [
                        [
                            "event": "create-table", "database": "main", "table": "b",
                            "schema": "CREATE TABLE \"b\" (\n   \"id\" INTEGER PRIMARY KEY\n)",
                        ],
                        ["event": "insert-rows", "database": "main", "table": "b", "num_rows": 2, "ignore": false, "replace": false],
                    ]
                )
                // On an existing table, only the rows: insert-rows counts the rows given, ignored ones included.
                let existing = try await watcher.events {
                    let result = try await daemon.request(
                        "create_table",
                        ["table": "b", "pk": "id", "ignore": true, "rows": [["id": 2], ["id": 3]]]
                    )
                    #expect(result["created"] == false)
                    #expect(result["inserted"] == 1)
                }
                #expect(
                    existing == [
                        ["event": "insert-rows", "database": "main", "table": "b", "num_rows": 2, "ignore": true, "replace": false]
                    ]
                )
            }
        }
    }

    @Test("insert fires one insert-rows per op: num_rows is the rows given (ignored ones included), with ignore and replace")
    func insertEvents() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            try await withChangeListener(daemon) { watcher in
                let plain = try await watcher.events {
                    try await daemon.request(
                        "insert",
                        ["table": "dogs", "rows": [["id": 1, "name": "Rex"], ["name": "Fido", "age": 2]]]
                    )
                }
                #expect(
                    plain == [
                        ["event": "insert-rows", "database": "main", "table": "dogs", "num_rows": 2, "ignore": false, "replace": false]
                    ]
                )
                let ignored = try await watcher.events {
                    let result = try await daemon.request(
                        "insert",
                        [
                            "table": "dogs", "ignore": true,
                            "rows": [["id": 1, "name": "x"], ["id": 2, "name": "y"], ["id": 3, "name": "z"]],
                        ]
                    )
                    #expect(result == ["inserted": 1])
                }
                #expect(
                    ignored == [
                        ["event": "insert-rows", "database": "main", "table": "dogs", "num_rows": 3, "ignore": true, "replace": false]
                    ]
                )
                let allIgnored = try await watcher.events {
                    let result = try await daemon.request("insert", ["table": "dogs", "ignore": true, "rows": [["id": 1, "name": "x"]]])
                    #expect(result == ["inserted": 0])
                }
                #expect(
                    allIgnored == [
                        ["event": "insert-rows", "database": "main", "table": "dogs", "num_rows": 1, "ignore": true, "replace": false]
                    ]
                )
                let failed = try await watcher.events {
                    _ = try await daemon.withClient {
                        try await $0.expectError("insert", ["table": "dogs", "rows": [["id": 1, "name": "x"]]])
                    }
                }
                #expect(failed.isEmpty)
            }
        }
    }

    @Test("upsert fires one upsert-rows with num_rows, and no update-row or insert-rows")
    func upsertEvents() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            try await daemon.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])
            try await withChangeListener(daemon) { watcher in
                let events = try await watcher.events {
                    try await daemon.request(
                        "upsert",
                        ["table": "dogs", "rows": [["id": 1, "name": "R"], ["id": 2, "name": "New", "age": 4]]]
                    )
                }
                #expect(events == [["event": "upsert-rows", "database": "main", "table": "dogs", "num_rows": 2]])
            }
        }
    }

    @Test("update fires update-row and delete fires delete-row, pks the row's key values in key order")
    func updateDeleteEvents() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL + "; " + pairsSQL)])
            try await daemon.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"], ["id": 2, "name": "Fido"]]])
            try await daemon.request("insert", ["table": "pairs", "rows": [["a": "x", "b": 1, "v": "old"]]])
            try await withChangeListener(daemon) { watcher in
                /// The committed events of one request.
                func eventsOf(_ op: String, _ arguments: JSONObject) async throws -> [JSONObject] {
                    try await watcher.events { _ = try await daemon.request(op, arguments) }
                }
                let updated = try await eventsOf("update", ["table": "dogs", "pks": [1], "update": ["age": 9]])
                #expect(updated == [["event": "update-row", "database": "main", "table": "dogs", "pks": [1]]])
                let updatedPair = try await eventsOf("update", ["table": "pairs", "pks": ["x", 1], "update": ["v": "new"]])
                #expect(updatedPair == [["event": "update-row", "database": "main", "table": "pairs", "pks": ["x", 1]]])
                let deleted = try await eventsOf("delete", ["table": "dogs", "pks": [2]])
                #expect(deleted == [["event": "delete-row", "database": "main", "table": "dogs", "pks": [2]]])
                let deletedPair = try await eventsOf("delete", ["table": "pairs", "pks": ["x", 1]])
                #expect(deletedPair == [["event": "delete-row", "database": "main", "table": "pairs", "pks": ["x", 1]]])
            }
        }
    }

    @Test("drop_table fires drop-table; insert with alter fires alter-table with before_schema and after_schema")
    func dropAndAlterEvents() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(a text)")))
            try await withChangeListener(daemon) { watcher in
                let altered = try await watcher.events {
                    try await daemon.request("insert", ["table": "t", "alter": true, "rows": [["a": "x", "n": 1]]])
                }
                #expect(
                    altered == [
                        [
                            "event": "alter-table", "database": "main", "table": "t", "before_schema": "CREATE TABLE t(a text)",
                            "after_schema": #"CREATE TABLE t(a text, "n" INTEGER)"#,
                        ],
                        ["event": "insert-rows", "database": "main", "table": "t", "num_rows": 1, "ignore": false, "replace": false],
                    ]
                )
                let dropped = try await watcher.events { _ = try await daemon.request("drop_table", ["table": "t"]) }
                #expect(dropped == [["event": "drop-table", "database": "main", "table": "t"]])
            }
        }
    }

    @Test("rows: true adds rows to insert-rows, before/after to update-row, before to delete-row; without it they are absent")
    func rowImages() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request("execute", ["sql": .string(dogsSQL)])
            try await withChangeListener(daemon) { plain in
                try await withChangeListener(daemon, rows: true) { images in
                    try await daemon.request(
                        "insert",
                        ["table": "dogs", "rows": [["id": 1, "name": "Rex"], ["id": 2, "name": "Fido", "age": 7]]]
                    )
                    try await daemon.request("update", ["table": "dogs", "pks": [1], "update": ["name": "Max"]])
                    try await daemon.request("delete", ["table": "dogs", "pks": [2]])
                    try await daemon.request(
                        "upsert",
                        ["table": "dogs", "rows": [["id": 1, "name": "Max", "age": 4], ["id": 5, "name": "Five"]]]
                    )
                    let withImages = try await images.all()
                    #expect(eventNames(withImages) == ["insert-rows", "update-row", "delete-row", "upsert-rows"])
                    guard withImages.count == 4 else { return }
                    #expect(withImages[0]["rows"] == [["id": 1, "name": "Rex", "age": 3], ["id": 2, "name": "Fido", "age": 7]])
                    #expect(withImages[1]["before"] == ["id": 1, "name": "Rex", "age": 3])
                    #expect(withImages[1]["after"] == ["id": 1, "name": "Max", "age": 3])
                    #expect(withImages[2]["before"] == ["id": 2, "name": "Fido", "age": 7])
                    #expect(withImages[2]["after"] == nil)
                    #expect(withImages[3]["rows"] == [["id": 1, "name": "Max", "age": 4], ["id": 5, "name": "Five", "age": 3]])
                    let without = try await plain.all()
                    #expect(eventNames(without) == eventNames(withImages))
                    #expect(without.allSatisfy { $0["rows"] == nil && $0["before"] == nil && $0["after"] == nil })
                    #expect(without.map { $0["pks"] } == withImages.map { $0["pks"] })
                    #expect(without.map { $0["num_rows"] } == withImages.map { $0["num_rows"] })
                }
            }
        }
    }

    // MARK: DDL live events

    @Test("create_table fires before_create, before_/after_parent_attach per column, after_create; drop_table before_/after_drop")
    func ddlEvents() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClient(daemon, ["events": ddlEventNames]) { listener in
                try await daemon.request(
                    "create_table",
                    ["table": "dogs", "pk": "id", "columns": [["name": "id", "type": "integer"], ["name": "name", "type": "text"]]]
                )
                try await listener.sync()
                let created = listener.events
                #expect(
                    eventNames(created) == [
                        "before_create", "before_parent_attach", "before_parent_attach", "after_parent_attach", "after_parent_attach",
                        "after_create",
                    ]
                )
                let sql = "CREATE TABLE \"dogs\" (\n   \"id\" INTEGER PRIMARY KEY,\n   \"name\" TEXT\n)"
                for event in created where ["before_create", "after_create"].contains(event["event"]?.stringValue) {
                    #expect(event["target"] == ["kind": "table", "name": "dogs"], "\(event)")
                    #expect(event["database"] == "main")
                    #expect(event["sql"] == .string(sql))
                }
                let attached = created.filter { $0["event"] == "after_parent_attach" }
                #expect(
                    attached.map { $0["target"] } == [
                        ["kind": "column", "name": "id", "type": "INTEGER"], ["kind": "column", "name": "name", "type": "TEXT"],
                    ]
                )
                #expect(attached.allSatisfy { $0["parent"] == ["kind": "table", "name": "dogs"] })
                #expect(
                    created.filter { $0["event"] == "before_parent_attach" }.map { $0["target"]?["name"] } == ["id", "name"]
                )

                try await daemon.request("drop_table", ["table": "dogs"])
                try await listener.sync()
                let dropped = Array(listener.events.dropFirst(created.count))
                #expect(eventNames(dropped) == ["before_drop", "after_drop"])
                #expect(dropped.allSatisfy { $0["target"] == ["kind": "table", "name": "dogs"] && $0["database"] == "main" })
            }
        }
    }

    // The structured ops read the schema through a per-connection cache (`SchemaCache`): these
    // change the schema every way a cached read could go stale, and check what the ops then see.

    @Test("the structured ops see a schema change made by raw SQL, by another connection, and after a rolled-back one")
    func schemaChangesReachTheOps() async throws {
        try await withStructuredClient(dogsSQL) { daemon, evd in
            #expect(try await evd.request("insert", ["table": "dogs", "rows": [["id": 1, "name": "Rex"]]])["inserted"] == 1)
            // A column added by raw SQL is known to the next insert.
            try await evd.request(.execute(.init(sql: "alter table dogs add column color text")))
            #expect(
                try await evd.request("insert", ["table": "dogs", "rows": [["id": 2, "name": "Fido", "color": "red"]]])["inserted"] == 1
            )
            // A table created and rolled back in a transaction: the insert into it fails afterwards.
            try await evd.request("begin")
            try await evd.request(.execute(.init(sql: "create table cats(id integer primary key, name text)")))
            #expect(try await evd.request("insert", ["table": "cats", "rows": [["id": 1, "name": "Tom"]]])["inserted"] == 1)
            try await evd.request("rollback")
            let gone = try await evd.expectError("insert", ["table": "cats", "rows": [["id": 1, "name": "Tom"]]])
            #expect(gone.code == "no_such_table", "\(gone)")
            // Another connection creates a different table (the schema cookie reaches the value the
            // rolled-back one had): this connection's ops see that one, not the rolled-back one.
            try await daemon.withClient { other in
                try await other.request(.execute(.init(sql: "create table birds(id integer primary key, song text)")))
            }
            #expect(try await evd.request("insert", ["table": "birds", "rows": [["id": 1, "song": "tweet"]]])["inserted"] == 1)
            let stillGone = try await evd.expectError("insert", ["table": "cats", "rows": [["id": 2, "name": "Tom"]]])
            #expect(stillGone.code == "no_such_table", "\(stillGone)")
            // A savepoint rolled back inside a transaction takes its column with it.
            try await evd.request("begin")
            try await evd.request("savepoint", ["name": "s"])
            try await evd.request(.execute(.init(sql: "alter table birds add column wings integer")))
            #expect(try await evd.request("insert", ["table": "birds", "rows": [["id": 2, "song": "caw", "wings": 2]]])["inserted"] == 1)
            try await evd.request("rollback_savepoint", ["name": "s"])
            let noColumn = try await evd.expectError("insert", ["table": "birds", "rows": [["id": 3, "song": "coo", "wings": 2]]])
            #expect(noColumn.code == "bad_request" && noColumn.message.contains("wings"), "\(noColumn)")
            try await evd.request("commit")
            #expect(try await describeColumns(evd, "birds").count == 2)
            #expect(try await evd.rows("select id, name, color from dogs order by id") == [[1, "Rex", .null], [2, "Fido", "red"]])
        }
    }
}
