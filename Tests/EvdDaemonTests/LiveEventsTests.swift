import EvdClient
import Foundation
import OrderedCollections
import Synchronization
import Testing

@testable import EvdDaemon

/// Every live event (PROTOCOL.md §6.1–6.3) fired by a real daemon, with its envelope (§2) and its
/// catalog properties, in SQLAlchemy's causal order.
@Suite("Live events")
struct LiveEventsTests {
    // MARK: One request, start to end

    @Test("a lone execute fires pool, connection and dialect events in causal order, with the catalog's properties")
    func loneExecute() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                let (subscription, head) = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { evd in
                    let create = "create table t(id integer primary key, name text)"
                    try await evd.request("execute", ["sql": .string(create)])
                    let first = try await collectEvents(listener, until: "checkin")
                    #expect(
                        eventNames(first) == [
                            "do_connect", "first_connect", "connect", "checkout", "engine_connect", "before_execute",
                            "begin", "before_cursor_execute", "do_execute_no_params", "after_cursor_execute",
                            "after_execute", "commit", "reset", "checkin",
                        ]
                    )
                    let byName = indexByName(first)
                    #expect(
                        eventProperties(byName["do_connect"]) == [
                            "database": "main", "path": .string(daemon.databasePath),
                            "flags": ["SQLITE_OPEN_READWRITE", "SQLITE_OPEN_CREATE", "SQLITE_OPEN_URI"],
                            "pragmas": [
                                "journal_mode": "wal", "synchronous": "normal", "foreign_keys": "on",
                                "busy_timeout": 5000,
                            ],
                        ]
                    )
                    #expect(eventProperties(byName["first_connect"]) == ["database": "main", "connection": 1])
                    #expect(eventProperties(byName["connect"]) == ["database": "main", "connection": 1])
                    #expect(
                        eventProperties(byName["do_execute_no_params"]) == [
                            "database": "main", "connection": 1, "statement": .string(create), "parameters": [],
                        ]
                    )
                    #expect(byName["after_cursor_execute"]?["rowcount"] == 0)

                    let insert = "insert into t(name) values (?)"
                    let result = try await evd.request("execute", ["sql": .string(insert), "params": ["Rex"]])
                    #expect(result["changes"] == 1)
                    let second = try await collectEvents(listener, until: "checkin")
                    #expect(
                        eventNames(second) == [
                            "checkout", "engine_connect", "before_execute", "begin", "before_cursor_execute",
                            "do_execute", "after_cursor_execute", "after_execute", "commit", "reset", "checkin",
                        ]
                    )
                    let events = indexByName(second)
                    let pool: [String: JSONValue] = ["database": "main", "connection": 1]
                    let request: JSONValue = ["sql": .string(insert), "params": ["Rex"], "op": "execute", "id": 2]
                    #expect(eventProperties(events["checkout"]) == pool)
                    #expect(eventProperties(events["engine_connect"]) == pool.merging(["branch": false]) { $1 })
                    #expect(eventProperties(events["before_execute"]) == ["database": "main", "request": request])
                    #expect(
                        eventProperties(events["after_execute"]) == [
                            "database": "main", "request": request, "changes": 1,
                        ]
                    )
                    #expect(eventProperties(events["begin"]) == pool.merging(["implicit": true]) { $1 })
                    let cursor = pool.merging(["statement": .string(insert), "parameters": ["Rex"]]) { $1 }
                    #expect(
                        eventProperties(events["before_cursor_execute"])
                            == cursor.merging(["executemany": false]) { $1 }
                    )
                    #expect(eventProperties(events["do_execute"]) == cursor)
                    var after = eventProperties(events["after_cursor_execute"])
                    let removed = after.removeValue(forKey: "duration_us")
                    let duration = try #require(removed?.intValue)
                    #expect(duration >= 0)
                    #expect(after == cursor.merging(["executemany": false, "rowcount": 1]) { $1 })
                    #expect(eventProperties(events["commit"]) == pool.merging(["implicit": true]) { $1 })
                    #expect(eventProperties(events["reset"]) == pool.merging(["rolled_back": false]) { $1 })
                    #expect(eventProperties(events["checkin"]) == pool)

                    // The subscription sees increasing seqs (the journaled insert-rows, which it
                    // did not ask for, takes one too).
                    let seqs = (first + second).map { $0["seq"]?.intValue ?? -1 }
                    #expect(seqs == seqs.sorted() && Set(seqs).count == seqs.count && seqs.first! > head)
                    for event in first + second { expectEnvelope(event, subscription: subscription, causedBy: evd) }
                }
            }
        }
    }

    @Test("session and actor are those of the client whose work caused the event")
    func envelopeNamesTheCause() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                let (subscription, _) = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { one in
                    try await daemon.withClient { two in
                        #expect(one.hello["session"] != two.hello["session"])
                        try await one.request(.execute(.init(sql: "select 1")))
                        let ofOne = try await collectEvents(listener, until: "checkin")
                        try await two.request(.execute(.init(sql: "select 2")))
                        let ofTwo = try await collectEvents(listener, until: "checkin")
                        #expect(ofOne.count == 14)  // the first request also opens the connection
                        #expect(ofTwo.count == 11)
                        for event in ofOne { expectEnvelope(event, subscription: subscription, causedBy: one) }
                        for event in ofTwo { expectEnvelope(event, subscription: subscription, causedBy: two) }
                        let times = (ofOne + ofTwo).compactMap { $0["time"]?.stringValue }
                        #expect(times == times.sorted())
                    }
                }
            }
        }
    }

    // MARK: Transactions

    @Test("begin and commit ops fire begin and commit with implicit false, around the statements")
    func explicitTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(id integer primary key, name text)")))
                    _ = try await collectEvents(listener, until: "checkin")
                    try await evd.request("begin")
                    let begun = try await collectEvents(listener, until: "begin")
                    #expect(eventNames(begun) == ["checkout", "engine_connect", "begin"])
                    #expect(eventProperties(begun.last) == ["database": "main", "connection": 1, "implicit": false])
                    try await evd.request(.execute(.init(sql: "insert into t(name) values ('a')")))
                    let statement = try await collectEvents(listener, until: "after_execute")
                    #expect(
                        eventNames(statement) == [
                            "before_execute", "before_cursor_execute", "do_execute_no_params", "after_cursor_execute",
                            "after_execute",
                        ]
                    )
                    try await evd.request("commit")
                    let committed = try await collectEvents(listener, until: "checkin")
                    #expect(eventNames(committed) == ["commit", "reset", "checkin"])
                    #expect(
                        eventProperties(committed.first) == ["database": "main", "connection": 1, "implicit": false]
                    )
                    #expect(committed[1]["rolled_back"] == false)
                    let rows = try await evd.request(.execute(.init(sql: "select count(*) from t")))
                    #expect(rows["rows"] == [[1]])
                }
            }
        }
    }

    @Test("the rollback op fires rollback with implicit false, and the work is gone")
    func explicitRollback() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(id integer primary key, name text)")))
                    _ = try await collectEvents(listener, until: "checkin")
                    try await evd.request("begin")
                    try await evd.request(.execute(.init(sql: "insert into t(name) values ('a')")))
                    try await evd.request("rollback")
                    let events = try await collectEvents(listener, until: "checkin")
                    #expect(Array(eventNames(events).suffix(3)) == ["rollback", "reset", "checkin"])
                    #expect(!eventNames(events).contains("commit"))
                    let rollback = events[events.count - 3]
                    #expect(eventProperties(rollback) == ["database": "main", "connection": 1, "implicit": false])
                    #expect(events[events.count - 2]["rolled_back"] == false)
                    let rows = try await evd.request(.execute(.init(sql: "select count(*) from t")))
                    #expect(rows["rows"] == [[0]])
                }
            }
        }
    }

    @Test("a failing statement fires dbapi_error, handle_error and an implicit rollback")
    func failingStatement() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(id integer primary key)")))
                    try await evd.request("execute", ["sql": "insert into t(id) values (?)", "params": [1]])
                    _ = try await collectEvents(listener, until: "checkin", occurrence: 2)

                    let error = try await evd.expectError(
                        "execute",
                        ["sql": "insert into t(id) values (?)", "params": [1]]
                    )
                    #expect(error.code == "sql_error")
                    #expect(error.extra["sqlite_code"] == "SQLITE_CONSTRAINT_PRIMARYKEY")
                    let events = try await collectEvents(listener, until: "checkin")
                    #expect(
                        eventNames(events) == [
                            "checkout", "engine_connect", "before_execute", "begin", "before_cursor_execute",
                            "do_execute", "dbapi_error", "handle_error", "rollback", "reset", "checkin",
                        ]
                    )
                    let byName = indexByName(events)
                    let expected: [String: JSONValue] = [
                        "database": "main", "connection": 1, "statement": "insert into t(id) values (?)",
                        "parameters": [1],
                        "error": [
                            "code": "sql_error", "message": .string(error.message),
                            "sqlite_code": "SQLITE_CONSTRAINT_PRIMARYKEY",
                        ],
                    ]
                    #expect(eventProperties(byName["dbapi_error"]) == expected)
                    #expect(eventProperties(byName["handle_error"]) == expected)
                    #expect(
                        eventProperties(byName["rollback"]) == ["database": "main", "connection": 1, "implicit": true]
                    )
                    #expect(byName["reset"]?["rolled_back"] == false)

                    // SQL that does not even prepare: SQLAlchemy's order still, since the cursor
                    // events come before evd prepares (a listener may rewrite the statement).
                    let missing = try await evd.expectError("execute", ["sql": "select * from nosuch"])
                    #expect(missing.code == "sql_error")
                    #expect(missing.extra["sqlite_code"] == "SQLITE_ERROR")
                    let unprepared = try await collectEvents(listener, until: "checkin")
                    #expect(
                        eventNames(unprepared) == [
                            "checkout", "engine_connect", "before_execute", "begin", "before_cursor_execute",
                            "do_execute_no_params", "dbapi_error", "handle_error", "rollback", "reset", "checkin",
                        ]
                    )
                    #expect(
                        indexByName(unprepared)["handle_error"]?["error"]
                            == [
                                "code": "sql_error", "message": .string(missing.message), "sqlite_code": "SQLITE_ERROR",
                            ]
                    )
                }
            }
        }
    }

    @Test("savepoint, rollback_savepoint and release_savepoint carry the savepoint's name")
    func savepoints() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(id integer primary key)")))
                    _ = try await collectEvents(listener, until: "checkin")
                    try await evd.request("begin")
                    try await evd.request("savepoint", ["name": "sp one"])
                    try await evd.request(.execute(.init(sql: "insert into t(id) values (1)")))
                    try await evd.request("rollback_savepoint", ["name": "sp one"])
                    try await evd.request("release_savepoint", ["name": "sp one"])
                    try await evd.request("commit")
                    let events = try await collectEvents(listener, until: "checkin")
                    let names = eventNames(events)
                    let marks = names.filter { $0.contains("savepoint") }
                    #expect(marks == ["savepoint", "rollback_savepoint", "release_savepoint"])
                    for event in events where event["event"]?.stringValue?.contains("savepoint") == true {
                        #expect(eventProperties(event) == ["database": "main", "connection": 1, "name": "sp one"])
                    }
                    #expect(names.firstIndex(of: "savepoint")! < names.firstIndex(of: "before_execute")!)
                    #expect(names.firstIndex(of: "after_execute")! < names.firstIndex(of: "rollback_savepoint")!)
                    let rows = try await evd.request(.execute(.init(sql: "select count(*) from t")))
                    #expect(rows["rows"] == [[0]])
                }
            }
        }
    }

    // MARK: Dialect events

    @Test("do_execute, do_execute_no_params and do_executemany each fire for their kind of statement")
    func dialectEvents() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(id integer primary key, name text)")))
                    _ = try await collectEvents(listener, until: "checkin")

                    let many = "insert into t(name) values (?)"
                    let sets: JSONValue = [["a"], ["b"], ["c"]]
                    let result = try await evd.request("executemany", ["sql": .string(many), "params": sets])
                    #expect(result["changes"] == 3)
                    let manyEvents = try await collectEvents(listener, until: "checkin")
                    let cursorNames = eventNames(manyEvents).filter { $0.hasPrefix("do_") || $0.contains("cursor") }
                    #expect(cursorNames == ["before_cursor_execute", "do_executemany", "after_cursor_execute"])
                    let byName = indexByName(manyEvents)
                    let cursor: [String: JSONValue] = [
                        "database": "main", "connection": 1, "statement": .string(many), "parameters": sets,
                    ]
                    #expect(
                        eventProperties(byName["before_cursor_execute"]) == cursor.merging(["executemany": true]) { $1 }
                    )
                    #expect(eventProperties(byName["do_executemany"]) == cursor)
                    #expect(byName["after_cursor_execute"]?["executemany"] == true)
                    #expect(byName["after_cursor_execute"]?["rowcount"] == 3)
                    #expect(byName["after_execute"]?["changes"] == 3)

                    let named = "select name from t where id = :id"
                    let select = try await evd.request("execute", ["sql": .string(named), "params": ["id": 2]])
                    #expect(select["rows"] == [["b"]])
                    let namedEvents = indexByName(try await collectEvents(listener, until: "checkin"))
                    #expect(
                        eventProperties(namedEvents["do_execute"]) == [
                            "database": "main", "connection": 1, "statement": .string(named), "parameters": ["id": 2],
                        ]
                    )
                    #expect(namedEvents["after_cursor_execute"]?["rowcount"] == -1)
                    #expect(namedEvents["after_cursor_execute"]?["executemany"] == false)

                    try await evd.request(.execute(.init(sql: "select count(*) from t")))
                    let plain = eventNames(try await collectEvents(listener, until: "checkin"))
                    #expect(plain.filter { $0.hasPrefix("do_") } == ["do_execute_no_params"])
                }
            }
        }
    }

    // MARK: Execution options

    @Test("execution_options fires set_connection/engine_execution_options; options travel with before_execute")
    func executionOptions() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { evd in
                    let set = try await evd.request("execution_options", ["options": ["logging_token": "tok"]])
                    #expect(set["options"] == ["logging_token": "tok"])
                    let connection = try await collectEvents(listener, until: "set_connection_execution_options")
                    #expect(eventNames(connection) == ["set_connection_execution_options"])
                    #expect(eventProperties(connection.first) == ["options": ["logging_token": "tok"]])
                    expectEnvelope(connection[0], subscription: nil, causedBy: evd)

                    let engine = try await evd.request(
                        "execution_options",
                        ["options": ["busy_timeout_ms": 250], "scope": "engine"]
                    )
                    #expect(engine["options"] == ["busy_timeout_ms": 250, "logging_token": "tok"])
                    let engineEvents = try await collectEvents(listener, until: "set_engine_execution_options")
                    #expect(eventNames(engineEvents) == ["set_engine_execution_options"])
                    #expect(eventProperties(engineEvents.first) == ["options": ["busy_timeout_ms": 250]])

                    try await evd.request(.execute(.init(sql: "select 1")))
                    let events = indexByName(try await collectEvents(listener, until: "checkin"))
                    let options: JSONValue = ["busy_timeout_ms": 250, "logging_token": "tok"]
                    #expect(events["before_execute"]?["execution_options"] == options)
                    #expect(events["after_execute"]?["execution_options"] == options)
                }
            }
        }
    }

    // MARK: Pool management

    @Test("first_connect fires exactly once per database's pool, connect once per opened connection")
    func firstConnectOncePerDatabase() async throws {
        try await withRunningDaemon(configure: { configuration in
            let directory = String(configuration.socketPath.dropLast("/evd.sock".count))
            configuration.databases.append(DatabaseConfig(name: "other", path: directory + "/other.db"))
        }) { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeEvents(listener, ["first_connect", "connect", "checkin"])
                try await daemon.withClient { one in
                    try await daemon.withClient { two in
                        // Two transactions at once: two connections of main.
                        try await one.request("begin")
                        try await two.request("begin")
                        try await one.request("commit")
                        try await two.request("commit")
                        let main = try await collectEvents(listener, until: "checkin", occurrence: 2)
                        #expect(eventNames(main) == ["first_connect", "connect", "connect", "checkin", "checkin"])
                        #expect(eventProperties(main[0]) == ["database": "main", "connection": 1])
                        #expect(eventProperties(main[1]) == ["database": "main", "connection": 1])
                        #expect(eventProperties(main[2]) == ["database": "main", "connection": 2])

                        try await one.request("execute", ["sql": "select 1", "database": "other"])
                        let other = try await collectEvents(listener, until: "checkin")
                        #expect(eventNames(other) == ["first_connect", "connect", "checkin"])
                        #expect(eventProperties(other[0]) == ["database": "other", "connection": 1])

                        // A dispose makes a new pool (SQLAlchemy's `recreate`): its first connection
                        // fires first_connect again, once.
                        try await one.request("dispose")
                        try await one.request(.execute(.init(sql: "select 1")))
                        let again = try await collectEvents(listener, until: "checkin")
                        #expect(eventNames(again) == ["first_connect", "connect", "checkin"])
                        #expect(eventProperties(again[0]) == ["database": "main", "connection": 3])
                    }
                }
            }
        }
    }

    @Test("the invalidate op closes an idle connection: invalidate then close, or soft_invalidate then close")
    func invalidateIdle() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "select 1")))
                    _ = try await collectEvents(listener, until: "checkin")

                    let hard = try await evd.request("invalidate", ["connection": 1])
                    #expect(hard["invalidated"] == [1])
                    let closed = try await collectEvents(listener, until: "close")
                    #expect(eventNames(closed) == ["invalidate", "close"])
                    var invalidate = eventProperties(closed.first)
                    let removed = invalidate.removeValue(forKey: "error")
                    let error = try #require(removed)
                    #expect(invalidate == ["database": "main", "connection": 1])
                    #expect(error["code"] == "invalidated")
                    #expect(error["sqlite_code"] == .null)
                    #expect(error["message"]?.stringValue?.isEmpty == false)
                    #expect(eventProperties(closed.last) == ["database": "main", "connection": 1])
                    for event in closed { expectEnvelope(event, subscription: nil, causedBy: evd) }

                    // The next request opens a new connection (and it is not the first connect).
                    try await evd.request(.execute(.init(sql: "select 1")))
                    let reopened = try await collectEvents(listener, until: "checkin")
                    #expect(Array(eventNames(reopened).prefix(3)) == ["do_connect", "connect", "checkout"])
                    #expect(reopened[2]["connection"] == 2)

                    let soft = try await evd.request("invalidate", ["soft": true])
                    #expect(soft["invalidated"] == [2])
                    let softClosed = try await collectEvents(listener, until: "close")
                    #expect(eventNames(softClosed) == ["soft_invalidate", "close"])
                    #expect(softClosed.first?["connection"] == 2)
                    #expect(softClosed.first?["error"]?["code"] == "invalidated")
                    #expect(softClosed.last?["connection"] == 2)

                    let none = try await evd.request("invalidate", ["connection": 7])
                    #expect(none["invalidated"] == [])
                }
            }
        }
    }

    @Test("invalidating a connection held by a transaction closes it when the session checks it in")
    func invalidateCheckedOut() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { holder in
                    try await daemon.withClient { admin in
                        for soft in [false, true] {
                            try await holder.request("begin")
                            let begun = try await collectEvents(listener, until: "begin")
                            let number = try #require(begun.last?["connection"]?.intValue)
                            let result = try await admin.request("invalidate", ["soft": .bool(soft)])
                            #expect(result["invalidated"] == [.int(number)])
                            let marked = try await collectEvents(
                                listener,
                                until: soft ? "soft_invalidate" : "invalidate"
                            )
                            #expect(eventNames(marked) == [soft ? "soft_invalidate" : "invalidate"])
                            #expect(marked.first?["connection"] == .int(number))
                            expectEnvelope(marked[0], subscription: nil, causedBy: admin)

                            try await holder.request(.execute(.init(sql: "select 1")))
                            try await holder.request("commit")
                            let ended = try await collectEvents(listener, until: "close")
                            #expect(Array(eventNames(ended).suffix(4)) == ["commit", "reset", "checkin", "close"])
                            #expect(ended.last?["connection"] == .int(number))
                            expectEnvelope(ended.last!, subscription: nil, causedBy: holder)
                        }
                        let stats = try await admin.request("stats")
                        #expect(stats["pools"]?["main"]?["open"] == 0)
                        #expect(stats["pools"]?["main"]?["in_use"] == 0)
                    }
                }
            }
        }
    }

    @Test("invalidate reaches a connection whose checkout is still undecided (a checkout veto holds it)")
    func invalidateDuringCheckout() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { vetoer in
                    try await vetoer.request(
                        "subscribe",
                        ["veto": ["checkout"], "timeout_ms": 20000, "on_timeout": "allow"]
                    )
                    try await daemon.withClient { evd in
                        try await daemon.withClient { admin in
                            async let running = evd.request(.execute(.init(sql: "select 1")))
                            let veto = try #require(await vetoer.nextMessage(ofType: "veto"))
                            let number = try #require(veto["connection"]?.intValue)
                            let invalidated = try await admin.request("invalidate", ["connection": .int(number)])
                            #expect(invalidated["invalidated"] == [.int(number)])
                            try await vetoer.send(["op": "reply", "seq": veto["seq"] ?? nil, "action": "allow"])
                            #expect(try await running["rows"] == [[1]])
                            let events = try await collectEvents(listener, until: "close")
                            let names = eventNames(events)
                            #expect(names.firstIndex(of: "invalidate")! < names.firstIndex(of: "checkout")!)
                            #expect(Array(names.suffix(3)) == ["reset", "checkin", "close"])
                            #expect(events.last?["connection"] == .int(number))
                            let stats = try await admin.request("stats")
                            #expect(stats["pools"]?["main"]?["open"] == 0)
                        }
                    }
                }
            }
        }
    }

    @Test("dispose: close for idle connections, detach for held ones, then engine_disposed; close_detached (no checkin) at their return")
    func dispose() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeToLiveEvents(listener)
                try await daemon.withClient { holder in
                    try await daemon.withClient { admin in
                        try await holder.request("begin")  // connection 1
                        try await admin.request(.execute(.init(sql: "select 1")))  // connection 2, then idle
                        _ = try await collectEvents(listener, until: "checkin")

                        try await admin.request("dispose")
                        let disposed = try await collectEvents(listener, until: "engine_disposed")
                        #expect(eventNames(disposed) == ["close", "detach", "engine_disposed"])
                        #expect(eventProperties(disposed[0]) == ["database": "main", "connection": 2])
                        #expect(eventProperties(disposed[1]) == ["database": "main", "connection": 1])
                        #expect(eventProperties(disposed[2]) == ["database": "main"])
                        for event in disposed { expectEnvelope(event, subscription: nil, causedBy: admin) }

                        try await holder.request("commit")
                        let detached = try await collectEvents(listener, until: "close_detached")
                        #expect(eventNames(detached) == ["commit", "reset", "close_detached"])
                        #expect(eventProperties(detached.last) == ["database": "main", "connection": 1])
                        expectEnvelope(detached.last!, subscription: nil, causedBy: holder)

                        let stats = try await admin.request("stats")
                        #expect(stats["pools"]?["main"]?["open"] == 0)
                        try await admin.request(.execute(.init(sql: "select 1")))
                        let fresh = try await collectEvents(listener, until: "checkin")
                        #expect(Array(eventNames(fresh).prefix(4)) == ["do_connect", "first_connect", "connect", "checkout"])
                        #expect(fresh[3]["connection"] == 3)
                    }
                }
            }
        }
    }

    // MARK: Login and logout

    @Test("connecting fires login (method peercred); the logout op and disconnecting fire logout")
    func loginLogout() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                let (subscription, _) = try await subscribeEvents(listener, ["login", "logout"])
                let (session, actor) = try await daemon.withClient { evd in
                    try await evd.request("logout")
                    return (evd.hello["session"], evd.hello["actor"])
                }
                let events = try await collectEvents(listener, until: "logout", occurrence: 2)
                #expect(eventNames(events) == ["login", "logout", "logout"])
                #expect(eventProperties(events.first) == ["method": "peercred"])
                #expect(eventProperties(events[1]) == [:])
                #expect(eventProperties(events[2]) == [:])
                for event in events {
                    #expect(event["subscription"] == .int(subscription))
                    #expect(event["session"] == session)
                    #expect(event["actor"] == actor)
                }
            }
        }
    }

    // MARK: Sequence numbers

    @Test("seq comes from one daemon-wide counter; a live event nobody wants takes no seq and no count")
    func daemonWideSeq() async throws {
        // Without the journal, so that no committed event (login, logout) takes a seq either.
        try await withRunningDaemon(configure: { $0.journal.enabled = false }) { daemon in
            try await daemon.withClient { checkouts in
                try await daemon.withClient { commits in
                    _ = try await subscribeEvents(checkouts, ["checkout"])
                    _ = try await subscribeEvents(commits, ["commit"])
                    let last = try await daemon.withClient { evd in
                        try await evd.request(.execute(.init(sql: "select 1")))
                        try await evd.request(.execute(.init(sql: "select 2")))
                        let out = try await collectEvents(checkouts, until: "checkout", occurrence: 2)
                        let committed = try await collectEvents(commits, until: "commit", occurrence: 2)
                        let a = out.map { $0["seq"]?.intValue ?? 0 }
                        let b = committed.map { $0["seq"]?.intValue ?? 0 }
                        #expect(a.count == 2 && b.count == 2)
                        #expect(a[1] == a[0] + 2 && b[0] == a[0] + 1 && b[1] == a[0] + 3)

                        let stats = try await evd.request("stats")
                        #expect(stats["events"] == ["checkout": 2, "commit": 2])
                        #expect(stats["seq"] == .int(b[1]))
                        return b[1]
                    }
                    // A new client's hello names the head: nothing since (its own login is unwanted).
                    try await daemon.withClient { late in
                        #expect(late.hello["seq"] == .int(last))
                    }
                    let stats = try await daemon.request("stats")
                    #expect(stats["seq"] == .int(last))
                }
            }
        }
    }
}

// MARK: Helpers shared by the live-event and robustness suites

/// The catalog's live events (pool, connection and dialect families).
let liveEventNames: [String] = EventKind.allCases
    .filter { [.pool, .connection, .dialect].contains($0.spec.family) }
    .map(\.name)

/// The envelope's keys, in wire order (PROTOCOL.md §2).
let envelopeKeys = ["type", "seq", "epoch", "event", "time", "subscription", "session", "actor"]

/// The transaction's members committed events carry beside their properties (docs/protocol.md,
/// "Transactions"; `TransactionIdsTests` checks them).
let transactionKeys = ["tx", "tx_last", "tx_end", "schema_version"]

/// Subscribes to `events` and returns the subscription number and the head seq.
@discardableResult
func subscribeEvents(_ evd: EvdConnection, _ events: [String], _ more: JSONObject = [:]) async throws -> (Int64, Int64) {
    var arguments = more
    arguments["events"] = .array(events.map(JSONValue.string))
    let result = try await evd.request("subscribe", arguments)
    let subscription = try #require(result["subscription"]?.intValue)
    let head = try #require(result["seq"]?.intValue)
    return (subscription, head)
}

/// Subscribes to every live event.
func subscribeToLiveEvents(_ evd: EvdConnection) async throws -> (Int64, Int64) {
    try await subscribeEvents(evd, liveEventNames)
}

/// Events until the `occurrence`th one named `last` (inclusive); fails the test if it does not come.
func collectEvents(
    _ evd: EvdConnection,
    until last: String,
    occurrence: Int = 1,
    within seconds: Double = 10,
    sourceLocation: SourceLocation = #_sourceLocation
) async throws -> [JSONObject] {
    var collected: [JSONObject] = []
    var seen = 0
    while let event = await evd.nextMessage(ofType: "event", within: seconds) {
        collected.append(event)
        if event["event"]?.stringValue == last {
            seen += 1
            if seen == occurrence { return collected }
        }
    }
    Issue.record(
        "no \(last) (#\(occurrence)) within \(seconds)s; got \(eventNames(collected))",
        sourceLocation: sourceLocation
    )
    throw DeadlineExceeded(description: "waiting for \(last)")
}

/// The events' names, in order.
func eventNames(_ events: [JSONObject]) -> [String] {
    events.map { $0["event"]?.stringValue ?? "?" }
}

/// The events by name (the last of each name wins).
func indexByName(_ events: [JSONObject]) -> [String: JSONObject] {
    var index: [String: JSONObject] = [:]
    for event in events { index[event["event"]?.stringValue ?? "?"] = event }
    return index
}

/// An event's own properties (everything beside the envelope and its transaction), order aside.
func eventProperties(_ event: JSONObject?) -> [String: JSONValue] {
    guard let event else { return ["missing": "event"] }
    var properties: [String: JSONValue] = [:]
    for (key, value) in event where !envelopeKeys.contains(key) && !transactionKeys.contains(key) { properties[key] = value }
    return properties
}

/// Checks the envelope: its keys in order, `type`, the subscription, the time's format, and that
/// `session` and `actor` are those of `client` (from its hello).
func expectEnvelope(
    _ event: JSONObject,
    subscription: Int64?,
    causedBy client: EvdConnection,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(Array(event.keys.prefix(envelopeKeys.count)) == envelopeKeys, sourceLocation: sourceLocation)
    #expect(event["type"] == "event", sourceLocation: sourceLocation)
    #expect(event["seq"]?.intValue != nil, sourceLocation: sourceLocation)
    if let subscription { #expect(event["subscription"] == .int(subscription), sourceLocation: sourceLocation) }
    #expect(event["session"] == client.hello["session"], sourceLocation: sourceLocation)
    #expect(event["actor"] == client.hello["actor"], sourceLocation: sourceLocation)
    #expect(event["actor"]?["pid"] == .int(Int64(getpid())), sourceLocation: sourceLocation)
    #expect(event["actor"]?["id"] == .string("uid:\(getuid())"), sourceLocation: sourceLocation)
    let time = event["time"]?.stringValue ?? ""
    #expect(
        time.wholeMatch(of: /\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z/) != nil,
        "time \(time)",
        sourceLocation: sourceLocation
    )
}

/// Raised by `runWithDeadline` when its body runs too long.
struct DeadlineExceeded: Error, CustomStringConvertible {
    let description: String
}

/// Runs `body`, failing with `DeadlineExceeded` if it has not finished within `seconds` — even when
/// the body is stuck somewhere that ignores cancellation (it is then cancelled and abandoned).
func runWithDeadline<T: Sendable>(
    seconds: Double,
    _ what: String,
    _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    let once = DeadlineResumeOnce<T>()
    return try await withCheckedThrowingContinuation { continuation in
        once.set(continuation)
        let timer = Task { try await Task.sleep(for: .seconds(seconds)) }
        let work = Task {
            defer { timer.cancel() }
            do { once.resume(with: .success(try await body())) } catch { once.resume(with: .failure(error)) }
        }
        Task {
            guard (try? await timer.value) != nil else { return }
            once.resume(with: .failure(DeadlineExceeded(description: "\(what) did not finish within \(seconds)s")))
            work.cancel()
        }
    }
}

/// A continuation resumed by whichever of two tasks comes first.
private final class DeadlineResumeOnce<T: Sendable>: Sendable {
    private let continuation = Mutex<CheckedContinuation<T, any Error>?>(nil)

    func set(_ continuation: CheckedContinuation<T, any Error>) {
        self.continuation.withLock { $0 = continuation }
    }

    func resume(with result: Result<T, any Error>) {
        let continuation = self.continuation.withLock { stored in
            defer { stored = nil }
            return stored
        }
        continuation?.resume(with: result)
    }
}
