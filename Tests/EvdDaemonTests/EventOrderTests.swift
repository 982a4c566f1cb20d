import EvdClient
import Testing

@testable import EvdDaemon

/// Events exactly where the seeds fire them (issue 19, items 6–10): SQLAlchemy 2.x's engine and
/// pool, Datasette 1.0a41's events, and evd's own `reply`.
@Suite("Event order against the seeds")
struct EventOrderTests {
    /// The pool events and `engine_disposed`, for the dispose and detach tests.
    static let poolEvents = [
        "first_connect", "connect", "checkout", "checkin", "reset", "close", "detach", "close_detached", "engine_disposed",
    ]

    // MARK: Item 6: dispose

    @Test("dispose closes the idle connections before engine_disposed; the new pool's first connection fires first_connect")
    func disposeOrderAndFirstConnect() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeEvents(listener, Self.poolEvents)
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "select 1")))  // connection 1, then idle
                    let first = try await collectEvents(listener, until: "checkin")
                    #expect(eventNames(first) == ["first_connect", "connect", "checkout", "reset", "checkin"])

                    // SQLAlchemy's Engine.dispose: pool.dispose() (closes the idle ones), recreate(), engine_disposed.
                    try await evd.request("dispose")
                    let disposed = try await collectEvents(listener, until: "engine_disposed")
                    #expect(eventNames(disposed) == ["close", "engine_disposed"])
                    #expect(eventProperties(disposed[0]) == ["database": "main", "connection": 1])

                    // The recreated pool's first connect fires first_connect (a new pool, a new exec_once).
                    try await evd.request(.execute(.init(sql: "select 1")))
                    let fresh = try await collectEvents(listener, until: "checkin")
                    #expect(eventNames(fresh) == ["first_connect", "connect", "checkout", "reset", "checkin"])
                    #expect(fresh[0]["connection"] == 2)

                    // Only the first connection of each pool: a second one fires connect alone.
                    try await daemon.withClient { other in
                        try await other.request("begin")
                        try await evd.request(.execute(.init(sql: "select 1")))
                        try await other.request("commit")
                    }
                    let more = try await collectEvents(listener, until: "checkin", occurrence: 2)
                    #expect(eventNames(more).filter { $0.hasSuffix("connect") } == ["connect"])
                }
            }
        }
    }

    // MARK: Item 7: detach

    @Test("a detached connection's return fires reset and close_detached, never checkin")
    func detachedReturnFiresNoCheckin() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeEvents(listener, Self.poolEvents)
                try await daemon.withClient { holder in
                    try await holder.request("begin")
                    _ = try await collectEvents(listener, until: "checkout")
                    try await daemon.request("dispose")
                    let disposed = try await collectEvents(listener, until: "engine_disposed")
                    #expect(eventNames(disposed) == ["detach", "engine_disposed"])
                    #expect(eventProperties(disposed[0]) == ["database": "main", "connection": 1])

                    try await holder.request("commit")
                    let returned = try await collectEvents(listener, until: "close_detached")
                    #expect(eventNames(returned) == ["reset", "close_detached"])
                    #expect(eventProperties(returned.last) == ["database": "main", "connection": 1])

                    // Nothing else came for it: the next event is the next request's.
                    try await holder.request(.execute(.init(sql: "select 1")))
                    let next = try await collectEvents(listener, until: "checkin")
                    #expect(eventNames(next) == ["first_connect", "connect", "checkout", "reset", "checkin"])
                    #expect(next[0]["connection"] == 2)
                }
            }
        }
    }

    // MARK: Item 8: rename-table

    @Test("rename-table carries Datasette's old_table and new_table")
    func renameTableProperties() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key)")))
            try await daemon.withClient { evd in
                _ = try await subscribeEvents(evd, ["rename-table"])
                try await evd.request(.execute(.init(sql: "alter table t rename to u")))
                let events = try await collectEvents(evd, until: "rename-table")
                #expect(eventProperties(events.last) == ["database": "main", "old_table": "t", "new_table": "u"])

                let catalog = try await evd.request("events")
                let entry = catalog["events"]?.arrayValue?.first { $0["name"] == "rename-table" }
                let properties = try #require(entry?["properties"]?.objectValue)
                #expect(Set(properties.keys) == ["tx", "tx_last", "database", "old_table", "new_table", "tx_end"])
            }
        }
    }

    // MARK: Item 9: commit_twophase before the committed events

    @Test("commit_twophase of a session's own unprepared transaction precedes its committed events")
    func commitTwoPhaseOnePhaseOrder() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key)")))
            try await daemon.withClient { evd in
                _ = try await subscribeEvents(evd, ["commit_twophase", "insert-rows"])
                try await evd.request("begin_twophase", ["xid": "one"])
                try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                try await evd.request("commit_twophase", ["xid": "one"])
                let events = try await collectEvents(evd, until: "insert-rows")
                try Self.expectCommitFirst(events, isPrepared: false)
            }
        }
    }

    @Test("commit_twophase of a prepared transaction precedes its committed events")
    func commitTwoPhasePreparedOrder() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key)")))
            try await daemon.withClient { watcher in
                _ = try await subscribeEvents(watcher, ["commit_twophase", "insert-rows"])
                try await daemon.withClient { evd in
                    try await evd.request("begin_twophase", ["xid": "two"])
                    try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                    try await evd.request("prepare_twophase", ["xid": "two"])
                }
                try await daemon.request("commit_twophase", ["xid": "two"])
                let events = try await collectEvents(watcher, until: "insert-rows")
                try Self.expectCommitFirst(events, isPrepared: true)
            }
        }
    }

    @Test("commit_twophase of a transaction recovered after a restart precedes its committed events")
    func commitTwoPhaseRecoveredOrder() async throws {
        try await withTemporaryDirectory { directory in
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(id integer primary key)")))
                    try await evd.request("begin_twophase", ["xid": "kept"])
                    try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                    try await evd.request("prepare_twophase", ["xid": "kept"])
                }
            }
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    #expect(try await evd.request("recover") == ["xids": ["kept"]])
                    _ = try await subscribeEvents(evd, ["commit_twophase", "insert-rows"])
                    try await evd.request("commit_twophase", ["xid": "kept"])
                    let events = try await collectEvents(evd, until: "insert-rows")
                    try Self.expectCommitFirst(events, isPrepared: true)
                }
            }
        }
    }

    /// `commit_twophase`, then the transaction's `insert-rows`, with the lower seq.
    static func expectCommitFirst(
        _ events: [JSONObject],
        isPrepared: Bool,
        sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        #expect(eventNames(events) == ["commit_twophase", "insert-rows"], sourceLocation: sourceLocation)
        guard events.count == 2 else { return }
        #expect(events[0]["is_prepared"] == .bool(isPrepared), sourceLocation: sourceLocation)
        let commitSeq = try #require(events[0]["seq"]?.intValue)
        let insertSeq = try #require(events[1]["seq"]?.intValue)
        #expect(commitSeq < insertSeq, sourceLocation: sourceLocation)
    }

    // MARK: Item 10: reply without action

    @Test("a reply without action is a bad_request naming action, whether or not its seq is pending")
    func replyWithoutAction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.send(["op": "reply", "id": "r1", "seq": 12345])
                let unknown = try #require(await evd.nextMessage(ofType: "response"))
                #expect(unknown["id"] == "r1")
                #expect(unknown["error"]?["code"] == "bad_request")
                #expect(unknown["error"]?["field"] == "action")
                #expect(unknown["error"]?["message"]?.stringValue?.contains("action") == true)
            }
            try await daemon.withClient { vetoer in
                try await vetoer.request("subscribe", ["veto": ["checkout"], "timeout_ms": 20000, "on_timeout": "allow"])
                try await daemon.withClient { evd in
                    async let running = evd.request(.execute(.init(sql: "select 1")))
                    let veto = try #require(await vetoer.nextMessage(ofType: "veto"))
                    try await vetoer.send(["op": "reply", "id": "r2", "seq": veto["seq"] ?? nil])
                    let pending = try #require(await vetoer.nextMessage(ofType: "response"))
                    #expect(pending["id"] == "r2")
                    #expect(pending["error"]?["code"] == "bad_request")
                    #expect(pending["error"]?["field"] == "action")
                    // It counted as no answer: on_timeout (allow) decided it.
                    #expect(try await running["rows"] == [[1]])
                }
            }
        }
    }
}
