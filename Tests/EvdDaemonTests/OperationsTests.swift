import EvdClient
import Foundation
import OrderedCollections
import Synchronization
import Testing

@testable import EvdDaemon

/// PROTOCOL.md §3: every op this evd implements, against a real daemon.
@Suite("Operations")
struct OperationsTests {
    // MARK: ping, events

    @Test("ping answers {}")
    func ping() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let response = try await evd.rawRequest("ping")
                #expect(response["type"] == "response")
                #expect(response["ok"] == true)
                #expect(response["result"] == [:])
                #expect(response["error"] == nil)
            }
        }
    }

    /// The catalog of PROTOCOL.md §6, family by family.
    static let catalogFamilies: [String: [String]] = [
        "pool": [
            "connect", "first_connect", "checkout", "checkin", "reset", "invalidate", "soft_invalidate", "close",
            "detach", "close_detached",
        ],
        "connection": [
            "engine_connect", "before_execute", "after_execute", "before_cursor_execute", "after_cursor_execute",
            "begin", "commit", "rollback", "savepoint", "release_savepoint", "rollback_savepoint", "begin_twophase",
            "prepare_twophase", "commit_twophase", "rollback_twophase", "handle_error", "dbapi_error",
            "engine_disposed", "set_connection_execution_options", "set_engine_execution_options",
        ],
        "dialect": ["do_connect", "do_execute", "do_execute_no_params", "do_executemany"],
        "ddl": [
            "before_create", "after_create", "before_drop", "after_drop", "before_parent_attach",
            "after_parent_attach", "column_reflect",
        ],
        "datasette": [
            "login", "logout", "create-token", "create-table", "drop-table", "alter-table", "insert-rows",
            "upsert-rows", "update-row", "delete-row", "rename-table",
        ],
    ]

    /// The vetoable events of §4/§6 and their mutable properties.
    static let vetoable: [String: [String]] = [
        "checkout": [], "before_execute": ["request"], "before_cursor_execute": ["statement", "parameters"],
        "begin": [], "commit": [], "savepoint": [], "handle_error": ["error"], "do_connect": ["pragmas"],
        "do_execute": [], "do_execute_no_params": [], "do_executemany": [], "before_create": [], "before_drop": [],
        "before_parent_attach": [], "column_reflect": ["column"],
    ]

    @Test("events returns the whole catalog of §6, each entry complete")
    func eventsCatalog() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let events = try #require(try await evd.request("events")["events"]?.arrayValue)
                let expectedCount = Self.catalogFamilies.values.reduce(0) { $0 + $1.count }
                #expect(expectedCount == 52)
                #expect(events.count == expectedCount)
                var byName: [String: JSONValue] = [:]
                for entry in events {
                    let object = try #require(entry.objectValue)
                    #expect(Set(object.keys) == ["name", "family", "vetoable", "mutable", "properties", "description"])
                    let name = try #require(object["name"]?.stringValue)
                    #expect(byName[name] == nil, "duplicate \(name)")
                    byName[name] = entry
                    #expect(object["vetoable"]?.boolValue != nil, "\(name)")
                    #expect(object["mutable"]?.arrayValue != nil, "\(name)")
                    #expect(object["properties"]?.objectValue != nil, "\(name)")
                    #expect(object["description"]?.stringValue?.isEmpty == false, "\(name)")
                }
                for (family, names) in Self.catalogFamilies {
                    for name in names {
                        #expect(byName[name]?["family"] == .string(family), "\(name)")
                    }
                }
                for (name, entry) in byName {
                    let mutable = entry["mutable"]?.arrayValue?.compactMap(\.stringValue) ?? []
                    if let expected = Self.vetoable[name] {
                        #expect(entry["vetoable"] == true, "\(name)")
                        #expect(Set(mutable) == Set(expected), "\(name)")
                    } else {
                        #expect(entry["vetoable"] == false, "\(name)")
                        #expect(mutable.isEmpty, "\(name)")
                    }
                    // A mutable property is one of the event's properties.
                    for property in mutable { #expect(entry["properties"]?[property] != nil, "\(name).\(property)") }
                }
                let cursor = try #require(byName["before_cursor_execute"]?["properties"]?.objectValue)
                for property in ["database", "connection", "statement", "parameters", "executemany"] {
                    #expect(cursor[property] != nil, "before_cursor_execute.\(property)")
                }
                let after = try #require(byName["after_cursor_execute"]?["properties"]?.objectValue)
                #expect(after["rowcount"] != nil)
                #expect(after["duration_us"] != nil)
            }
        }
    }

    @Test("events lists custom events once emitted")
    func eventsListsCustom() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let before = try #require(try await evd.request("events")["events"]?.arrayValue)
                #expect(!before.contains { $0["name"] == "myapp.deployed" })
                try await evd.request("emit", ["event": "myapp.deployed"])
                let after = try #require(try await evd.request("events")["events"]?.arrayValue)
                #expect(after.count == before.count + 1)
                let custom = try #require(after.first { $0["name"] == "myapp.deployed" })
                #expect(custom["family"] == "custom")
                #expect(custom["vetoable"] == false)
                // Its data is its own; the catalog names the transaction's keys it carries.
                #expect(custom["properties"]?.objectValue.map { Array($0.keys) } == ["tx", "tx_last", "tx_end"])
            }
        }
    }

    // MARK: subscribe, unsubscribe

    @Test("subscribe's result: subscription, the catalog names matched now, veto [], seq = head")
    func subscribeResult() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("emit", ["event": "test.one"])
                let head = try #require(try await evd.request("stats")["seq"]?.intValue)
                let result = try await evd.request("subscribe", ["events": ["before_*", "checkin", "app.custom"]])
                #expect(Set(result.keys) == ["subscription", "events", "veto", "seq"])
                #expect(result["subscription"]?.intValue != nil)
                #expect(result["veto"] == [])
                #expect(result["seq"]?.intValue == head)
                #expect(
                    result["events"] == [
                        "checkin", "before_execute", "before_cursor_execute", "before_create", "before_drop",
                        "before_parent_attach", "app.custom",
                    ]
                )

                let all = try await evd.request("subscribe", ["events": "*"])
                let allNames = try #require(all["events"]?.arrayValue)
                #expect(allNames.count == 53)  // 52 catalog events + test.one, emitted before
                #expect(allNames.contains("test.one"))
                #expect(all["subscription"]?.intValue != result["subscription"]?.intValue)

                let single = try await evd.request("subscribe", ["events": ["commit"]])
                #expect(single["events"] == ["commit"])
                let question = try await evd.request("subscribe", ["events": ["c?ose"]])
                #expect(question["events"] == ["close"])
            }
        }
    }

    @Test("where filters by a property's value or a list of values")
    func subscribeWhere() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                let one = try await listener.request(
                    "subscribe",
                    ["events": ["app.paint"], "where": ["color": "red"], "name": "reds"]
                )
                let many = try await listener.request(
                    "subscribe",
                    ["events": ["app.*"], "where": ["color": ["red", "green"], "size": 2]]
                )
                try await daemon.withClient { emitter in
                    for (n, color) in ["blue", "red", "green", "red"].enumerated() {
                        try await emitter.request(
                            "emit",
                            ["event": "app.paint", "data": ["n": .integer(n), "color": .string(color), "size": 2]]
                        )
                    }
                    try await emitter.request(
                        "emit",
                        ["event": "app.paint", "data": ["n": 4, "color": "green", "size": 3]]
                    )
                    try await emitter.request("emit", ["event": "app.done", "data": ["color": "red", "size": 2]])
                }
                let events = await listener.events(until: "app.done")
                let forOne = events.filter { $0["subscription"] == one["subscription"] }.map { $0["n"] }
                let forMany = events.filter { $0["subscription"] == many["subscription"] }.map { $0["n"] }
                #expect(forOne == [1, 3])
                #expect(forMany == [1, 2, 3, nil])
            }
        }
    }

    @Test("where on the envelope keys event and session; numbers compare by value")
    func subscribeWhereEnvelope() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let session = try #require(evd.hello["session"])
                let byName = try await evd.request("subscribe", ["events": ["app.*"], "where": ["event": "app.b"]])
                let bySession = try await evd.request(
                    "subscribe",
                    ["events": ["app.*"], "where": ["session": session]]
                )
                let byNumber = try await evd.request("subscribe", ["events": ["app.*"], "where": ["size": 2.0]])
                _ = try await daemon.withClient { other in
                    try await other.request("emit", ["event": "app.a", "data": ["size": 2]])
                }
                try await evd.request("emit", ["event": "app.b", "data": ["size": 3]])
                try await evd.request("emit", ["event": "app.end"])
                let events = await evd.events(until: "app.end")
                func names(_ subscription: JSONObject) -> [String] {
                    events.filter { $0["subscription"] == subscription["subscription"] }.compactMap {
                        $0["event"]?.stringValue
                    }
                }
                #expect(names(byName) == ["app.b"])
                #expect(names(bySession) == ["app.b", "app.end"])
                #expect(names(byNumber) == ["app.a"])
            }
        }
    }

    @Test("a namespaced custom name is accepted before it exists; emit reaches it and *")
    func subscribeCustomBeforeItExists() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                let exact = try await listener.request("subscribe", ["events": ["myapp.deployed"]])
                #expect(exact["events"] == ["myapp.deployed"])
                let slash = try await listener.request("subscribe", ["events": ["myapp/other"]])
                #expect(slash["events"] == ["myapp/other"])
                let star = try await listener.request("subscribe", ["events": ["*"]])
                let emitted = try await daemon.withClient { emitter in
                    try await emitter.request("emit", ["event": "myapp.deployed", "data": ["version": "1.2"]])
                }
                let seq = try #require(emitted["seq"]?.intValue)
                var got: [JSONValue: JSONObject] = [:]
                while got.count < 2 {
                    let event = try #require(await listener.nextMessage(ofType: "event"))
                    if event["event"] == "myapp.deployed" { got[event["subscription"]!] = event }
                }
                let toExact = try #require(got[exact["subscription"]!])
                let toStar = try #require(got[star["subscription"]!])
                for event in [toExact, toStar] {
                    #expect(event["seq"]?.intValue == seq)
                    #expect(event["version"] == "1.2")
                }
            }
        }
    }

    @Test("the subscribe response arrives before any of its events")
    func subscribeResponseFirst() async throws {
        try await withRunningDaemon { daemon in
            let stop = StopFlag()
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    try await daemon.withClient { emitter in
                        var n = 0
                        while !stop.isSet && n < 20_000 {
                            try await emitter.request("emit", ["event": "app.tick", "data": ["n": .integer(n)]])
                            n += 1
                        }
                    }
                }
                try await daemon.withClient { listener in
                    // Let the emitter get going, so events are flowing when we subscribe again.
                    let first = try await listener.request("subscribe", ["events": ["app.tick"]])
                    let firstID = try #require(first["subscription"])
                    _ = try #require(await listener.nextMessage(ofType: "event"))
                    try await listener.sendRaw(
                        Array(#"{"op":"subscribe","id":"second","events":["app.tick"]}"#.utf8) + [0x0a]
                    )
                    var response: JSONObject? = nil
                    var laterEvents = 0
                    while laterEvents < 3 {
                        let message = try #require(await listener.nextMessage())
                        if message["type"] == "response" {
                            #expect(message["id"] == "second")
                            #expect(response == nil)
                            response = message
                            continue
                        }
                        guard message["type"] == "event", message["subscription"] != firstID else { continue }
                        // An event of the new subscription: its response must have come first.
                        let result = try #require(
                            response?["result"],
                            "an event of the new subscription came before its response"
                        )
                        #expect(message["subscription"] == result["subscription"])
                        #expect((message["seq"]?.intValue ?? 0) > (result["seq"]?.intValue ?? .max))
                        laterEvents += 1
                    }
                }
                stop.set()
                try await group.waitForAll()
            }
        }
    }

    @Test("subscribe with since: without a journal, a gap notice follows the response, then caught_up")
    func subscribeSinceGap() async throws {
        try await withRunningDaemon(configure: { $0.journal.enabled = false }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request("emit", ["event": "app.a"])
                let result = try await evd.request("subscribe", ["events": ["app.*"], "since": 0])
                let head = try #require(result["seq"]?.intValue)
                let notice = try #require(await evd.nextMessage(ofType: "notice"))
                #expect(notice["code"] == "gap")
                #expect(notice["from"] == 1)
                #expect(notice["to"]?.intValue == head)
                // Then it is live: caught up at the subscription's seq.
                let caughtUp = try #require(await evd.nextMessage(ofType: "notice"))
                #expect(caughtUp["code"] == "caught_up" && caughtUp["seq"]?.intValue == head)
            }
        }
    }

    @Test("subscribe with since at the head gets no gap notice")
    func subscribeSinceHead() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("emit", ["event": "app.a"])
                let head = try #require(try await evd.request("stats")["seq"])
                try await evd.request("subscribe", ["events": ["app.*"], "since": head])
                let caughtUp = try #require(await evd.nextMessage())
                #expect(caughtUp["code"] == "caught_up")  // and no gap before it
                try await evd.request("emit", ["event": "app.b"])
                let next = try #require(await evd.nextMessage())
                #expect(next["type"] == "event")
                #expect(next["event"] == "app.b")
            }
        }
    }

    @Test("after unsubscribe, no more events for that subscription")
    func unsubscribe() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let first = try await evd.request("subscribe", ["events": ["app.*"]])
                try await evd.request("emit", ["event": "app.a"])
                let a = try #require(await evd.nextMessage(ofType: "event"))
                #expect(a["event"] == "app.a")
                #expect(a["subscription"] == first["subscription"])
                #expect(try await evd.request("unsubscribe", ["subscription": first["subscription"]!]) == [:])
                let marker = try await evd.request("subscribe", ["events": ["other.marker"]])
                try await evd.request("emit", ["event": "app.b"])
                try await evd.request("emit", ["event": "other.marker"])
                let next = try #require(await evd.nextMessage(ofType: "event"))
                #expect(next["event"] == "other.marker")
                #expect(next["subscription"] == marker["subscription"])
                // Unsubscribing twice: the subscription is gone.
                let again = try await evd.expectError("unsubscribe", ["subscription": first["subscription"]!])
                #expect(again.code == "bad_request")
                #expect(again.extra["field"] == "subscription")
            }
        }
    }

    @Test("unsubscribe of an unknown id, or another session's, is bad_request (field subscription)")
    func unsubscribeUnknown() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let error = try await evd.expectError("unsubscribe", ["subscription": 999])
                #expect(error.code == "bad_request")
                #expect(error.extra["field"] == "subscription")
                let missing = try await evd.expectError("unsubscribe")
                #expect(missing.code == "bad_request")
                #expect(missing.extra["field"] == "subscription")
                let other = try await daemon.withClient { try await $0.request("subscribe", ["events": ["app.x"]]) }
                let foreign = try await evd.expectError("unsubscribe", ["subscription": other["subscription"]!])
                #expect(foreign.code == "bad_request")
                #expect(foreign.extra["field"] == "subscription")
            }
        }
    }

    // MARK: execute, executemany

    @Test("execute: values round-trip with their SQLite types")
    func executeTypes() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let blob: JSONValue = ["$base64": "AP8QgA=="]
                let result = try await evd.request(
                    "execute",
                    [
                        "sql": "select ?, typeof(?), ?, typeof(?), ?, ?, typeof(?), ?, typeof(?), length(?), ?, ?, ?",
                        "params": [
                            9_223_372_036_854_775_807, 1, 1.5, 2.0, "héllo 🐕", .null, .null, blob, blob, blob, true,
                            false, -7,
                        ],
                    ]
                )
                let expected: [JSONValue] = [
                    9_223_372_036_854_775_807, "integer", 1.5, "real", "héllo 🐕", .null, "null",
                    blob, "blob", 4, 1, 0, -7,
                ]
                #expect(result["rows"] == [.array(expected)])
                #expect(result["columns"]?.arrayValue?.count == 13)
                let literals = try await evd.request(
                    "execute",
                    ["sql": "select 2.0 as r, 2 as i, x'00ff10' as b, '' as e"]
                )
                #expect(literals["columns"] == ["r", "i", "b", "e"])
                #expect(literals["rows"] == [[.double(2.0), .int(2), ["$base64": "AP8Q"], ""]])
                #expect(literals["changes"] == 0)
            }
        }
    }

    @Test("execute: stored values come back as stored, blobs included")
    func executeStoredRoundTrip() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table v(id integer primary key, x)")))
                let values: [JSONValue] = [42, 0.25, "text", .null, ["$base64": "3q2+7w=="], true]
                for value in values {
                    try await evd.request("execute", ["sql": "insert into v(x) values (?)", "params": [value]])
                }
                let rows = try await evd.request(.execute(.init(sql: "select x from v order by id")))
                #expect(rows["rows"] == [[42], [0.25], ["text"], [.null], [["$base64": "3q2+7w=="]], [1]])
            }
        }
    }

    @Test("execute: named parameters :n @n $n bind by the key without its prefix")
    func executeNamedParameters() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let result = try await evd.request(
                    "execute",
                    ["sql": "select :a, @b, $c, :a + @b", "params": ["a": 1, "b": "two", "c": 3.5]]
                )
                #expect(result["rows"] == [[1, "two", 3.5, 1]])
                let positional = try await evd.request("execute", ["sql": "select ?, ?1, ?2", "params": [5, 6]])
                #expect(positional["rows"] == [[5, 5, 6]])
            }
        }
    }

    @Test("execute: several statements in one sql; changes sum and last_insert_rowid")
    func executeMultipleStatements() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let created = try await evd.request(
                    "execute",
                    [
                        "sql": """
                        create table dogs(id integer primary key, name text);
                        insert into dogs(name) values (?);
                        insert into dogs(name) values (?), (?);
                        select id, name from dogs order by id;
                        """,
                        "params": ["Rex", "Fido", "Spot"],
                    ]
                )
                #expect(created["columns"] == ["id", "name"])
                #expect(created["rows"] == [[1, "Rex"], [2, "Fido"], [3, "Spot"]])
                #expect(created["changes"] == 3)
                #expect(created["last_insert_rowid"] == 3)
                let update = try await evd.request(
                    "execute",
                    ["sql": "update dogs set name = upper(name) where id > 1"]
                )
                #expect(update["changes"] == 2)
                #expect(update["columns"] == [])
                #expect(update["rows"] == [])
                let insert = try await evd.request(.execute(.init(sql: "insert into dogs(id, name) values (10, 'Ten')")))
                #expect(insert["changes"] == 1)
                #expect(insert["last_insert_rowid"] == 10)
                let delete = try await evd.request(.execute(.init(sql: "delete from dogs")))
                #expect(delete["changes"] == 4)
            }
        }
    }

    @Test("execute: last_insert_rowid is this session's, never another session's insert on the same pooled connection")
    func lastInsertRowidIsPerSession() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                let insert = try await evd.request(.execute(.init(sql: "insert into t values (1), (2)")))
                #expect(insert["last_insert_rowid"] == 2)
            }
            try await daemon.withClient { other in
                #expect(try await other.request(.execute(.init(sql: "select 1")))["last_insert_rowid"] == 0)
                try await other.request("begin")
                try await other.request(.execute(.init(sql: "insert into t values (3)")))
                #expect(try await other.request(.execute(.init(sql: "select 1")))["last_insert_rowid"] == 3)
                try await other.request("commit")
            }
        }
    }

    @Test("execution_options: query_only is readable with PRAGMA and does not outlive the session")
    func queryOnlyPragma() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            try await daemon.withClient { evd in
                #expect(try await evd.request(.execute(.init(sql: "pragma query_only")))["rows"] == [[0]])
                // Setting it in SQL is refused before SQLite applies it (it would outlive the session).
                let refused = try await evd.expectError("execute", ["sql": "pragma query_only = 1"])
                #expect(refused.code == "bad_request")
                #expect(refused.extra["field"] == "sql")
                #expect(try await evd.request(.execute(.init(sql: "pragma query_only")))["rows"] == [[0]])
                try await evd.request("execution_options", ["options": ["query_only": true]])
                #expect(try await evd.request(.execute(.init(sql: "pragma query_only")))["rows"] == [[1]])
                let unset = try await evd.expectError("execute", ["sql": "pragma query_only = 0; create table t(x)"])
                #expect(unset.extra["field"] == "sql")
                #expect(try await evd.request(.execute(.init(sql: "pragma query_only")))["rows"] == [[1]])
            }
            try await daemon.withClient { other in
                #expect(try await other.request(.execute(.init(sql: "pragma query_only")))["rows"] == [[0]])
                try await other.request(.execute(.init(sql: "create table t(x)")))
            }
        }
    }

    @Test("execute: a failing statement rolls back the whole request")
    func executeIsOneTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x integer unique)")))
                let error = try await evd.expectError(
                    "execute",
                    ["sql": "insert into t values (1); insert into t values (1)"]
                )
                #expect(error.code == "sql_error")
                let count = try await evd.request(.execute(.init(sql: "select count(*) from t")))
                #expect(count["rows"] == [[0]])
            }
        }
    }

    @Test("executemany: arrays of arrays and of objects; changes is the sum")
    func executemany() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(a, b)")))
                let arrays = try await evd.request(
                    "executemany",
                    ["sql": "insert into t values (?, ?)", "params": [[1, "x"], [2, "y"], [3, .null]]]
                )
                #expect(arrays == ["changes": 3])
                let objects = try await evd.request(
                    "executemany",
                    ["sql": "insert into t values (:a, $b)", "params": [["a": 4, "b": "z"], ["a": 5, "b": true]]]
                )
                #expect(objects == ["changes": 2])
                let update = try await evd.request(
                    "executemany",
                    ["sql": "update t set b = 'u' where a <= ?", "params": [[2], [4]]]
                )
                #expect(update == ["changes": 6])  // 2 rows, then 4 rows
                let rows = try await evd.request(.execute(.init(sql: "select a, b from t order by a")))
                #expect(rows["rows"] == [[1, "u"], [2, "u"], [3, "u"], [4, "u"], [5, 1]])
                let none = try await evd.request("executemany", ["sql": "insert into t values (?, ?)", "params": []])
                #expect(none == ["changes": 0])
            }
        }
    }

    // MARK: transactions

    @Test("begin/commit: committed rows are visible to another session; rolled-back ones never")
    func beginCommitRollback() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await daemon.withClient { a in
                try await daemon.withClient { b in
                    #expect(try await a.request("begin") == [:])
                    try await a.request(.execute(.init(sql: "insert into t values (1)")))
                    #expect(try await a.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[1]])
                    #expect(try await b.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[0]])
                    #expect(try await a.request("commit") == [:])
                    #expect(try await b.request(.execute(.init(sql: "select x from t")))["rows"] == [[1]])

                    try await a.request("begin", ["database": "main"])
                    try await a.request(.execute(.init(sql: "insert into t values (2)")))
                    #expect(try await a.request("rollback", ["database": "main"]) == [:])
                    #expect(try await b.request(.execute(.init(sql: "select x from t")))["rows"] == [[1]])
                    #expect(try await a.request(.execute(.init(sql: "select x from t")))["rows"] == [[1]])
                }
            }
        }
    }

    @Test("when SQLite rolls a begun transaction back itself, the session's transaction ends with it")
    func sqliteEndsTheTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(
                    "execute",
                    [
                        "sql": """
                        create table t(x); create table u(y);
                        create trigger refuse before insert on t begin select raise(rollback, 'refused'); end;
                        """
                    ]
                )
                try await evd.request("begin")
                try await evd.request(.execute(.init(sql: "insert into u values (1)")))
                let error = try await evd.expectError("execute", ["sql": "insert into t values (1)"])
                #expect(error.code == "sql_error")
                #expect(error.extra["sqlite_code"] == "SQLITE_CONSTRAINT_TRIGGER")
                // The transaction is gone, and the op says so rather than pretending to roll back.
                #expect(try await evd.expectError("rollback").code == "not_in_transaction")
                #expect(try await evd.request(.execute(.init(sql: "select count(*) from u")))["rows"] == [[0]])
                // A still-open transaction survives an ordinary statement error.
                try await evd.request("begin")
                try await evd.request(.execute(.init(sql: "insert into u values (2)")))
                #expect(try await evd.expectError("execute", ["sql": "select * from missing"]).code == "sql_error")
                try await evd.request("commit")
                #expect(try await evd.request(.execute(.init(sql: "select y from u")))["rows"] == [[2]])
            }
        }
    }

    @Test("a two-phase transaction SQLite rolls back itself ends with rollback_twophase, not rollback")
    func sqliteEndsATwoPhaseTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(
                "execute",
                [
                    "sql": """
                    create table t(x); create table u(y);
                    create trigger refuse before insert on t begin select raise(rollback, 'refused'); end;
                    """
                ]
            )
            try await daemon.withClient { listener in
                _ = try await subscribeEvents(listener, ["rollback", "rollback_twophase"])
                try await daemon.withClient { evd in
                    try await evd.request("begin_twophase", ["xid": "x1"])
                    try await evd.request(.execute(.init(sql: "alter table u add column z")))
                    let error = try await evd.expectError("execute", ["sql": "insert into t values (1)"])
                    #expect(error.message.contains("no longer in a transaction"))
                    // The column added inside it went with it.
                    #expect(try await evd.expectError("execute", ["sql": "insert into u(z) values (1)"]).code == "sql_error")
                }
                let ended = try #require(await listener.nextMessage(ofType: "event"))
                #expect(ended["event"] == "rollback_twophase")
                #expect(ended["xid"] == "x1")
            }
        }
    }

    @Test("a session that disconnects inside a transaction has it rolled back")
    func disconnectRollsBack() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await daemon.withClient { a in
                try await a.request("begin")
                try await a.request(.execute(.init(sql: "insert into t values (1)")))
            }
            try await daemon.withClient { b in
                // The write lock is released once the session is gone; the default busy timeout waits for it.
                try await b.request(.execute(.init(sql: "insert into t values (2)")))
                #expect(try await b.request(.execute(.init(sql: "select x from t")))["rows"] == [[2]])
            }
        }
    }

    @Test("begin holds one pooled connection until commit")
    func beginHoldsAConnection() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { a in
                try await daemon.withClient { b in
                    try await a.request(.execute(.init(sql: "select 1")))  // opens a connection, then gives it back
                    #expect(try await b.request("stats")["pools"]?["main"]?["in_use"] == 0)
                    try await a.request("begin")
                    #expect(try await b.request("stats")["pools"]?["main"]?["in_use"] == 1)
                    try await a.request(.execute(.init(sql: "select 1")))
                    #expect(try await b.request("stats")["pools"]?["main"]?["in_use"] == 1)
                    try await a.request("commit")
                    #expect(try await b.request("stats")["pools"]?["main"]?["in_use"] == 0)
                }
            }
        }
    }

    @Test("rolling back to a savepoint undoes only the work after it")
    func savepoints() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                try await evd.request("begin")
                try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                #expect(try await evd.request("savepoint", ["name": "sp1"]) == [:])
                try await evd.request(.execute(.init(sql: "insert into t values (2)")))
                try await evd.request("savepoint", ["name": "inner \"quoted\""])
                try await evd.request(.execute(.init(sql: "insert into t values (3)")))
                #expect(try await evd.request("release_savepoint", ["name": "inner \"quoted\""]) == [:])
                #expect(try await evd.request("rollback_savepoint", ["name": "sp1"]) == [:])
                try await evd.request(.execute(.init(sql: "insert into t values (4)")))
                try await evd.request("release_savepoint", ["name": "sp1"])
                try await evd.request("commit")
                #expect(try await evd.request(.execute(.init(sql: "select x from t order by x")))["rows"] == [[1], [4]])
                let unknown = try await daemon.withClient { other in
                    try await other.request("begin")
                    return try await other.expectError("rollback_savepoint", ["name": "never"])
                }
                #expect(unknown.code == "sql_error")
            }
        }
    }

    @Test("several databases: each request uses its database; a transaction stays on its own")
    func severalDatabases() async throws {
        try await withRunningDaemon(configure: { configuration in
            configuration.databases.append(
                DatabaseConfig(name: "other", path: SocketDirectory.parent(of: configuration.databases[0].path) + "/other.db")
            )
        }) { daemon in
            try await daemon.withClient { evd in
                #expect(evd.hello["databases"] == ["main", "other"])
                try await evd.request("execute", ["sql": "create table t(x)", "database": "other"])
                try await evd.request("execute", ["sql": "insert into t values ('o')", "database": "other"])
                let missing = try await evd.expectError("execute", ["sql": "select x from t"])
                #expect(missing.code == "sql_error")
                #expect(
                    try await evd.request("execute", ["sql": "select x from t", "database": "other"])["rows"] == [["o"]]
                )

                try await evd.request("begin", ["database": "other"])
                #expect(try await evd.request(.execute(.init(sql: "select x from t")))["rows"] == [["o"]])
                let elsewhere = try await evd.expectError("execute", ["sql": "select 1", "database": "main"])
                #expect(elsewhere.code == "bad_request")
                #expect(elsewhere.extra["field"] == "database")
                let commitElsewhere = try await evd.expectError("commit", ["database": "main"])
                #expect(commitElsewhere.extra["field"] == "database")
                #expect(
                    try await evd.expectError("execute", ["sql": "select 1", "database": "nope"]).code
                        == "no_such_database"
                )
                #expect(try await evd.request("commit", ["database": "other"]) == [:])
                let stats = try await evd.request("stats")
                #expect(stats["pools"]?["main"]?["size"] == 4)
                #expect(stats["pools"]?["other"]?["size"] == 4)
            }
        }
    }

    // MARK: execution_options

    @Test("execution_options: query_only makes writes fail with SQLITE_READONLY*, and can be undone")
    func queryOnly() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                let set = try await evd.request("execution_options", ["options": ["query_only": true]])
                #expect(set == ["options": ["query_only": true]])
                let error = try await evd.expectError("execute", ["sql": "insert into t values (1)"])
                #expect(error.code == "sql_error")
                #expect(error.extra["sqlite_code"]?.stringValue?.hasPrefix("SQLITE_READONLY") == true)
                #expect(try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[0]])
                // Other sessions are not affected, even on the same pooled connection.
                try await daemon.request(.execute(.init(sql: "insert into t values (1)")))
                let unset = try await evd.request("execution_options", ["options": ["query_only": false]])
                #expect(unset == ["options": ["query_only": false]])
                try await evd.request(.execute(.init(sql: "insert into t values (2)")))
                #expect(try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[2]])
            }
        }
    }

    @Test("execution_options: query_only applies inside a begun transaction too")
    func queryOnlyInTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                try await evd.request("begin")
                try await evd.request("execution_options", ["options": ["query_only": true]])
                let error = try await evd.expectError("execute", ["sql": "insert into t values (1)"])
                #expect(error.code == "sql_error")
                #expect(error.extra["sqlite_code"]?.stringValue?.hasPrefix("SQLITE_READONLY") == true)
                try await evd.request("rollback")
            }
        }
    }

    @Test("execution_options: the result echoes the session's options, unknown keys kept and sent with before_execute")
    func executionOptionsEcho() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let first = try await evd.request(
                    "execution_options",
                    ["options": ["logging_token": "abc", "busy_timeout_ms": 100]]
                )
                #expect(first == ["options": ["logging_token": "abc", "busy_timeout_ms": 100]])
                let second = try await evd.request(
                    "execution_options",
                    ["options": ["query_only": false], "scope": "connection"]
                )
                #expect(second["options"]?["logging_token"] == "abc")
                #expect(second["options"]?["busy_timeout_ms"] == 100)
                #expect(second["options"]?["query_only"] == false)

                let subscription = try await evd.request(
                    "subscribe",
                    ["events": ["before_execute", "set_connection_execution_options"]]
                )
                try await evd.request("execution_options", ["options": ["logging_token": "def"]])
                let setEvent = try #require(await evd.nextMessage(ofType: "event"))
                #expect(setEvent["event"] == "set_connection_execution_options")
                #expect(setEvent["options"] == ["logging_token": "def"])
                #expect(setEvent["subscription"] == subscription["subscription"])
                try await evd.request(.execute(.init(sql: "select 1")))
                let event = try #require(await evd.nextMessage(ofType: "event"))
                #expect(event["event"] == "before_execute")
                #expect(event["execution_options"]?["logging_token"] == "def")
                #expect(event["request"]?["sql"] == "select 1")
                #expect(event["database"] == "main")
            }
        }
    }

    @Test("execution_options with scope engine applies to every session")
    func engineScope() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { admin in
                let events = try await admin.request("subscribe", ["events": ["set_engine_execution_options"]])
                let set = try await admin.request(
                    "execution_options",
                    ["options": ["logging_token": "engine"], "scope": "engine"]
                )
                #expect(set["options"]?["logging_token"] == "engine")
                let event = try #require(await admin.nextMessage(ofType: "event"))
                #expect(event["event"] == "set_engine_execution_options")
                #expect(event["options"] == ["logging_token": "engine"])
                #expect(event["subscription"] == events["subscription"])
                try await daemon.withClient { other in
                    let mine = try await other.request("execution_options", ["options": ["x": 1]])
                    #expect(mine == ["options": ["logging_token": "engine", "x": 1]])
                    let overridden = try await other.request("execution_options", ["options": ["logging_token": "own"]])
                    #expect(overridden["options"]?["logging_token"] == "own")
                }
                try await admin.request("execution_options", ["options": ["query_only": true], "scope": "engine"])
                let error = try await daemon.withClient { other in
                    try await other.expectError("execute", ["sql": "create table t(x)"])
                }
                #expect(error.code == "sql_error")
                #expect(error.extra["sqlite_code"]?.stringValue?.hasPrefix("SQLITE_READONLY") == true)
            }
        }
    }

    // MARK: stats, emit, logout, reply, admin ops

    @Test("stats has its counters")
    func stats() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request("subscribe", ["events": ["app.*"]])
                let emitted = try await evd.request("emit", ["event": "app.counted"])
                _ = await evd.nextMessage(ofType: "event")
                let stats = try await evd.request("stats")
                #expect(stats["seq"]?.intValue == emitted["seq"]?.intValue)
                #expect(stats["events"]?["app.counted"] == 1)
                #expect((stats["deliveries"]?.intValue ?? 0) >= 1)
                #expect(stats["pools"]?["main"]?["size"] == 4)
                #expect((stats["sessions"]?["current"]?.intValue ?? 0) >= 1)
                #expect((stats["sessions"]?["total"]?.intValue ?? 0) >= 1)
                #expect(stats["subscriptions"] == 1)
                #expect(stats["drops"]?.intValue != nil)
                #expect(stats["vetoes"]?.objectValue != nil)
            }
        }
    }

    @Test("emit returns its seq; data sits beside the envelope")
    func emit() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                let subscription = try await listener.request("subscribe", ["events": ["myapp.deployed"]])
                let (result, hello) = try await daemon.withClient { emitter in
                    (
                        try await emitter.request(
                            "emit",
                            ["event": "myapp.deployed", "data": ["version": "2.0", "ok": true, "n": 3]]
                        ),
                        emitter.hello
                    )
                }
                #expect(Set(result.keys) == ["seq"])
                let seq = try #require(result["seq"]?.intValue)
                let event = try #require(await listener.nextMessage(ofType: "event"))
                #expect(event["type"] == "event")
                #expect(event["event"] == "myapp.deployed")
                #expect(event["seq"]?.intValue == seq)
                #expect(event["subscription"] == subscription["subscription"])
                #expect(event["session"] == hello["session"])
                #expect(event["actor"] == hello["actor"])
                #expect(event["time"]?.stringValue?.hasSuffix("Z") == true)
                #expect(event["version"] == "2.0")
                #expect(event["ok"] == true)
                #expect(event["n"] == 3)
                #expect(event["data"] == nil)
                let next = try await daemon.withClient { try await $0.request("emit", ["event": "myapp.deployed"]) }
                #expect((next["seq"]?.intValue ?? 0) > seq)
            }
        }
    }

    @Test("connecting emits login (peercred); logout and disconnecting emit logout")
    func loginLogout() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                try await listener.request("subscribe", ["events": ["login", "logout"]])
                let session = try await daemon.withClient { other in
                    let result = try await other.request("logout")
                    #expect(result == [:])
                    return other.hello["session"]
                }
                let login = try #require(await listener.nextMessage(ofType: "event"))
                #expect(login["event"] == "login")
                #expect(login["method"] == "peercred")
                #expect(login["session"] == session)
                let logout = try #require(await listener.nextMessage(ofType: "event"))
                #expect(logout["event"] == "logout")
                #expect(logout["session"] == session)
                let disconnect = try #require(await listener.nextMessage(ofType: "event"))
                #expect(disconnect["event"] == "logout")
                #expect(disconnect["session"] == session)
            }
        }
    }

    @Test("an invalid reply gets an error response carrying the reply's id")
    func invalidReply() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.send(["op": "reply", "id": "r1", "seq": 12345, "action": "allow"])
                let unknown = try #require(await evd.nextMessage(ofType: "response"))
                #expect(unknown["id"] == "r1")
                #expect(unknown["error"]?["code"] == "bad_request")
                #expect(unknown["error"]?["field"] == "seq")
                try await evd.send(["op": "reply", "id": 2.5, "action": "allow"])
                let missing = try #require(await evd.nextMessage(ofType: "response"))
                #expect(missing["id"] == 2.5)
                #expect(missing["error"]?["code"] == "bad_request")
                #expect(missing["error"]?["field"] == "seq")
            }
        }
    }

    @Test("an invalid reply is answered at once, ahead of the request the connection has running")
    func replyOvertakesRunningRequest() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            try await daemon.withClient { holder in
                try await holder.request("begin")
                try await daemon.withClient { evd in
                    // This execute waits for the only connection, so it is still running when the reply arrives.
                    try await evd.sendRaw(Array(#"{"op":"execute","id":"slow","sql":"select 1"}"#.utf8) + [0x0a])
                    try await evd.send(["op": "reply", "id": "r", "seq": 999_999, "action": "deny"])
                    let first = try #require(await evd.nextMessage(ofType: "response"))
                    #expect(first["id"] == "r")
                    #expect(first["error"]?["code"] == "bad_request")
                    try await holder.request("commit")
                    let second = try #require(await evd.nextMessage(ofType: "response"))
                    #expect(second["id"] == "slow")
                    #expect(second["result"]?["rows"] == [[1]])
                }
            }
        }
    }

    @Test("the admin ops invalidate and dispose leave the pool usable")
    func invalidateAndDispose() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                let invalidated = try await evd.request("invalidate")
                #expect(invalidated["invalidated"] == [1])
                try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                #expect(try await evd.request("dispose") == [:])
                #expect(try await evd.request(.execute(.init(sql: "select x from t")))["rows"] == [[1]])
            }
        }
    }
}

/// A flag one task sets and another polls (cancelling the emitter instead would fail its in-flight request).
private final class StopFlag: Sendable {
    private let state = Mutex(false)
    var isSet: Bool { self.state.withLock { $0 } }
    func set() { self.state.withLock { $0 = true } }
}
