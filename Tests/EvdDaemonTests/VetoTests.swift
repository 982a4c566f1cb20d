import EvdClient
import Foundation
import OrderedCollections
import Synchronization
import Testing

@testable import EvdDaemon

// MARK: Helpers: listeners on real connections

/// How a test listener answers one veto: the reply's fields (`action`, `reason`, `set`), or `nil`
/// to stay silent. `index` counts the vetoes this listener got before this one.
typealias VetoDecider = @Sendable (_ veto: JSONObject, _ index: Int) -> JSONObject?

/// Reply bodies for `VetoDecider`s.
enum VetoAnswer {
    static let allow: JSONObject = ["action": "allow"]
    static func deny(_ reason: String? = nil) -> JSONObject {
        reason.map { ["action": "deny", "reason": .string($0)] } ?? ["action": "deny"]
    }
    static func modify(_ set: JSONObject) -> JSONObject { ["action": "modify", "set": .object(set)] }
    static let silent: VetoDecider = { _, _ in nil }
    static func always(_ reply: JSONObject) -> VetoDecider { { _, _ in reply } }
}

/// A real connection subscribed as a veto listener (or a plain subscriber): a task answers each veto
/// with its `VetoDecider` and records every message the connection gets.
final class VetoTestClient: Sendable {
    let connection: EvdConnection
    /// The `subscribe` result.
    let subscribed: JSONObject
    private let received = Mutex<[JSONObject]>([])
    private let syncs = Atomic<Int>(0)

    init(connection: EvdConnection, subscribed: JSONObject) {
        self.connection = connection
        self.subscribed = subscribed
    }

    var subscription: Int64 { self.subscribed["subscription"]?.intValue ?? -1 }
    var session: JSONValue { self.connection.hello["session"] ?? .null }
    var messages: [JSONObject] { self.received.withLock { $0 } }
    var vetoes: [JSONObject] { self.messages.filter { $0["type"] == "veto" } }
    var events: [JSONObject] { self.messages.filter { $0["type"] == "event" } }

    func record(_ message: JSONObject) { self.received.withLock { $0.append(message) } }

    /// Waits (bounded) until `predicate` holds for the messages received so far.
    @discardableResult
    func waitUntil(
        _ what: String,
        within seconds: Double = 10,
        _ predicate: ([JSONObject]) -> Bool
    ) async throws -> Bool {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            if predicate(self.messages) { return true }
            try await Task.sleep(for: .milliseconds(10))
        }
        Issue.record("timed out waiting for \(what)")
        return false
    }

    /// The first event named `name`, waiting for it (bounded).
    func event(_ name: String, within seconds: Double = 10) async throws -> JSONObject? {
        try await self.waitUntil("event \(name)", within: seconds) {
            $0.contains { $0["event"]?.stringValue == name && $0["type"] == "event" }
        }
        return self.events.first { $0["event"]?.stringValue == name }
    }

    /// Returns once every message the daemon queued for this connection before now has been recorded:
    /// a ping whose response comes back through the message stream, after them.
    func sync() async throws {
        let id = JSONValue.string("sync-\(self.syncs.add(1, ordering: .relaxed).newValue)")
        try await self.connection.send(["op": "ping", "id": id])
        try await self.waitUntil("the sync ping") { $0.contains { $0["type"] == "response" && $0["id"] == id } }
    }
}

/// Opens a connection, subscribes it with `subscribe`, and answers its vetoes with `decide` while
/// `body` runs; the connection closes when `body` returns.
func withVetoTestClient<T: Sendable>(
    _ daemon: RunningDaemon,
    _ subscribe: JSONObject,
    decide: @escaping VetoDecider = VetoAnswer.silent,
    _ body: (VetoTestClient) async throws -> T
) async throws -> T {
    var subscribe = subscribe
    if subscribe["veto"] != nil && subscribe["timeout_ms"] == nil {
        // A listener that answers must not lose to the default 1 s timeout on a loaded machine.
        subscribe["timeout_ms"] = 20000
    }
    let isListener = subscribe["veto"] != nil
    var listenersWithThis: Int64 = 0
    let result = try await daemon.withClient { connection in
        let subscribed = try await connection.request("subscribe", subscribe)
        if isListener { listenersWithThis = try await daemon.request("stats")["veto_listeners"]?.intValue ?? 0 }
        let client = VetoTestClient(connection: connection, subscribed: subscribed)
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                var index = 0
                while let message = await connection.nextMessage() {
                    client.record(message)
                    guard message["type"] == "veto" else { continue }
                    let decision = decide(message, index)
                    index += 1
                    guard var reply = decision else { continue }
                    reply["op"] = "reply"
                    reply["seq"] = message["seq"] ?? .null
                    try? await connection.send(reply)
                }
            }
            do {
                let value = try await body(client)
                group.cancelAll()
                return value
            } catch {
                group.cancelAll()
                throw error
            }
        }
    }
    // The daemon learns of the close a moment later; until then the listener is still asked, and
    // its veto resolves as `disconnected`. What the test does next must not race that.
    if isListener {
        try await waitUntilStats(daemon, "the listener's close to reach the daemon") {
            ($0["veto_listeners"]?.intValue ?? .max) < listenersWithThis
        }
    }
    return result
}

/// `withVetoTestClient` for several clients, subscribed in the order given.
func withVetoTestClients<T: Sendable>(
    _ daemon: RunningDaemon,
    _ specs: [(subscribe: JSONObject, decide: VetoDecider)],
    _ body: ([VetoTestClient]) async throws -> T
) async throws -> T {
    func open(_ index: Int, _ opened: [VetoTestClient]) async throws -> T {
        if index == specs.count { return try await body(opened) }
        return try await withVetoTestClient(daemon, specs[index].subscribe, decide: specs[index].decide) { client in
            try await open(index + 1, opened + [client])
        }
    }
    return try await open(0, [])
}

/// Work running in its own task, awaited with a bound: for requests that must finish even though
/// nothing in the test answers them directly.
final class VetoInFlight<T: Sendable>: Sendable {
    private let outcome = AsyncQueue<Result<T, any Error>>(capacity: 1)

    init(_ operation: @escaping @Sendable () async throws -> T) {
        let outcome = self.outcome
        Task {
            let result: Result<T, any Error>
            do { result = .success(try await operation()) } catch { result = .failure(error) }
            await outcome.push(result)
        }
    }

    /// The work's value; `nil` (and an issue) if it has not finished within `seconds`.
    func value(within seconds: Double = 20) async throws -> T? {
        let result = await firstValue(within: seconds) { await self.outcome.pop() }
        guard let result else {
            Issue.record("the work did not finish within \(seconds) s")
            return nil
        }
        return try result.get()
    }
}

/// The error object of a failed response (nil, and an issue, for a success).
func vetoResponseError(_ response: JSONObject?, _ comment: Comment? = nil) -> JSONObject {
    guard let response else { return [:] }
    if response["ok"] != false { Issue.record("expected an error response, got \(response) \(comment.map { "\($0)" } ?? "")") }
    return response["error"]?.objectValue ?? [:]
}

/// The daemon's `stats.vetoes`.
func vetoStatistics(_ daemon: RunningDaemon) async throws -> JSONObject {
    try await daemon.request("stats")["vetoes"]?.objectValue ?? [:]
}

/// Asserts a `vetoed` error with its `event`, `by` and (when given) `reason`.
func expectVetoed(
    _ error: JSONObject,
    event: String,
    by: String,
    reason: String?? = .none,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(error["code"] == "vetoed", "\(error)", sourceLocation: sourceLocation)
    #expect(error["event"] == .string(event), "\(error)", sourceLocation: sourceLocation)
    #expect(error["by"] == .string(by), "\(error)", sourceLocation: sourceLocation)
    if case .some(let reason) = reason {
        #expect(error["reason"] == (reason.map(JSONValue.string) ?? .null), "\(error)", sourceLocation: sourceLocation)
    }
}

func vetoExpectVetoed(
    _ error: EvdError,
    event: String,
    by: String,
    reason: String?? = .none,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    var object = error.extra
    object["code"] = .string(error.code)
    object["message"] = .string(error.message)
    expectVetoed(object, event: event, by: by, reason: reason, sourceLocation: sourceLocation)
}

// MARK: The tests

/// Vetoes (PROTOCOL.md §2, §4, §6), end to end: real listener connections over the real socket
/// deny, allow and modify what other clients do.
@Suite("Vetoes")
struct VetoTests {
    // MARK: before_cursor_execute

    @Test("before_cursor_execute: a modified statement is what runs, and the veto carries the cursor's properties")
    func cursorModifyStatement() async throws {
        try await withRunningDaemon { daemon in
            let decide: VetoDecider = { veto, _ in
                veto["statement"] == "select 1" ? VetoAnswer.modify(["statement": "select 2"]) : VetoAnswer.allow
            }
            try await withVetoTestClient(daemon, ["veto": ["before_cursor_execute"], "name": "rewriter"], decide: decide) {
                listener in
                #expect(listener.subscribed["veto"] == ["before_cursor_execute"])
                #expect(listener.subscribed["events"] == [])
                try await daemon.withClient { evd in
                    let result = try await evd.request(.execute(.init(sql: "select 1")))
                    #expect(result["rows"] == [[2]])
                    let veto = try #require(listener.vetoes.first)
                    #expect(veto["event"] == "before_cursor_execute")
                    #expect(veto["subscription"] == .int(listener.subscription))
                    #expect(veto["session"] == evd.hello["session"])
                    #expect(veto["actor"]?["uid"] == evd.hello["actor"]?["uid"])
                    #expect(veto["database"] == "main")
                    #expect(veto["statement"] == "select 1")
                    #expect(veto["parameters"] == [])
                    #expect(veto["executemany"] == false)
                    #expect(veto["connection"]?.intValue != nil)
                    #expect(veto["time"]?.stringValue != nil)
                    // The lesser of timeout_ms (20000 here) and the budget (5000).
                    let deadline = try #require(veto["deadline_ms"]?.intValue)
                    #expect(deadline > 0 && deadline <= 5000)
                    let seq = try #require(veto["seq"]?.intValue)
                    #expect(seq > (evd.hello["seq"]?.intValue ?? .max))
                }
            }
        }
    }

    @Test("before_cursor_execute: modified parameters (positional and named), and statement and parameters together")
    func cursorModifyParameters() async throws {
        try await withRunningDaemon { daemon in
            let decide: VetoDecider = { veto, _ in
                switch veto["statement"]?.stringValue {
                case "select ?": return VetoAnswer.modify(["parameters": [5]])
                case "select :n + 1": return VetoAnswer.modify(["parameters": ["n": 41]])
                case "select ? * 2": return VetoAnswer.modify(["statement": "select ? * 10", "parameters": [4]])
                default: return VetoAnswer.allow
                }
            }
            try await withVetoTestClient(daemon, ["veto": ["before_cursor_execute"]], decide: decide) { listener in
                try await daemon.withClient { evd in
                    let positional = try await evd.request("execute", ["sql": "select ?", "params": [1]])
                    #expect(positional["rows"] == [[5]])
                    let named = try await evd.request("execute", ["sql": "select :n + 1", "params": ["n": 1]])
                    #expect(named["rows"] == [[42]])
                    let both = try await evd.request("execute", ["sql": "select ? * 2", "params": [1]])
                    #expect(both["rows"] == [[40]])
                    #expect(listener.vetoes.map { $0["parameters"] } == [[1], ["n": 1], [1]])
                }
            }
        }
    }

    @Test("before_cursor_execute: deny fails the request with vetoed, event, reason and by; nothing it did stays")
    func cursorDeny() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            // A statement after the first of a request keeps its leading whitespace: trim before matching.
            let decide: VetoDecider = { veto, _ in
                (veto["statement"]?.stringValue ?? "").trimmingCharacters(in: .whitespacesAndNewlines).hasPrefix("insert")
                    ? VetoAnswer.deny("no inserts") : VetoAnswer.allow
            }
            try await withVetoTestClient(daemon, ["veto": ["before_cursor_execute"], "name": "guard"], decide: decide) { _ in
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "insert into t values (1)"])
                    vetoExpectVetoed(error, event: "before_cursor_execute", by: "guard", reason: "no inserts")
                    #expect(error.message.contains("guard") && error.message.contains("no inserts"))
                    // A multi-statement request: the first insert ran, the second was denied; the
                    // request is one transaction, so neither stays.
                    let two = try await evd.expectError(
                        "execute",
                        ["sql": "create table u(y); insert into t values (3)"]
                    )
                    vetoExpectVetoed(two, event: "before_cursor_execute", by: "guard", reason: "no inserts")
                    #expect(try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[0]])
                    let tables = try await evd.request(.execute(.init(sql: "select count(*) from sqlite_master where name = 'u'")))
                    #expect(tables["rows"] == [[0]])
                }
            }
        }
    }

    @Test("a deny without a name or reason: by is subscription:N, reason null")
    func denyWithoutNameOrReason() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClient(daemon, ["veto": ["before_cursor_execute"]], decide: VetoAnswer.always(VetoAnswer.deny())) {
                listener in
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    vetoExpectVetoed(
                        error,
                        event: "before_cursor_execute",
                        by: "subscription:\(listener.subscription)",
                        reason: .some(nil)
                    )
                }
            }
        }
    }

    // MARK: before_execute

    @Test("before_execute: a modified request (its sql) is what runs; deny fails it")
    func beforeExecute() async throws {
        try await withRunningDaemon { daemon in
            let decide: VetoDecider = { veto, _ in
                switch veto["request"]?["sql"]?.stringValue {
                case "select 1": return VetoAnswer.modify(["request": ["sql": "select 3"]])
                case "select ?": return VetoAnswer.modify(["request": ["sql": "select ? + 1", "params": [9]]])
                case "delete from nowhere": return VetoAnswer.deny("read-only hours")
                default: return VetoAnswer.allow
                }
            }
            try await withVetoTestClient(daemon, ["veto": ["before_execute"], "name": "gate"], decide: decide) { listener in
                try await daemon.withClient { evd in
                    #expect(try await evd.request(.execute(.init(sql: "select 1")))["rows"] == [[3]])
                    #expect(try await evd.request("execute", ["sql": "select ?", "params": [1]])["rows"] == [[10]])
                    let error = try await evd.expectError("execute", ["sql": "delete from nowhere"])
                    vetoExpectVetoed(error, event: "before_execute", by: "gate", reason: "read-only hours")
                    let first = try #require(listener.vetoes.first)
                    #expect(first["event"] == "before_execute")
                    #expect(first["database"] == "main")
                    #expect(first["request"]?["op"] == "execute")
                    #expect(first["request"]?["sql"] == "select 1")
                    #expect(first["request"]?["id"]?.intValue != nil)
                }
            }
        }
    }

    // MARK: checkout

    @Test("checkout: one deny invalidates that connection and another is tried; the request succeeds")
    func checkoutDenyOnce() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            let decide: VetoDecider = { _, index in index == 0 ? VetoAnswer.deny("stale") : VetoAnswer.allow }
            try await withVetoTestClients(
                daemon,
                [
                    (["events": ["invalidate", "close", "connect"]], VetoAnswer.silent),
                    (["veto": ["checkout"], "name": "pool-guard"], decide),
                ]
            ) { clients in
                let (watcher, listener) = (clients[0], clients[1])
                let result = try await daemon.request(.execute(.init(sql: "select 1")))
                #expect(result["rows"] == [[1]])
                let vetoes = listener.vetoes
                #expect(vetoes.count == 2)
                let first = try #require(vetoes.first?["connection"]?.intValue)
                let second = try #require(vetoes.last?["connection"]?.intValue)
                #expect(first != second)
                let invalidate = try #require(try await watcher.event("invalidate"))
                #expect(invalidate["connection"] == .int(first))
                #expect(invalidate["error"]?["code"] == "vetoed")
                #expect(invalidate["error"]?["by"] == "pool-guard")
                #expect(invalidate["error"]?["reason"] == "stale")
                try await watcher.waitUntil("close of the denied connection") {
                    $0.contains { $0["event"] == "close" && $0["connection"] == .int(first) }
                }
                #expect(watcher.events.filter { $0["event"] == "connect" }.map { $0["connection"] } == [.int(first), .int(second)])
            }
            // The pool's single slot was given back: the next request gets a connection.
            let after = try await daemon.request(.execute(.init(sql: "select 2")))
            #expect(after["rows"] == [[2]])
        }
    }

    @Test("checkout: denied every time, the request fails with vetoed after 2 attempts")
    func checkoutDenyAlways() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            try await withVetoTestClient(
                daemon,
                // A bound for a loaded machine: the listener answers at once.
                ["veto": ["checkout"], "name": "pool-guard", "timeout_ms": 30000],
                decide: VetoAnswer.always(VetoAnswer.deny("broken"))
            ) { listener in
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    vetoExpectVetoed(error, event: "checkout", by: "pool-guard", reason: "broken")
                }
                try await listener.sync()
                #expect(listener.vetoes.count == 2)
            }
            let after = try await daemon.request(.execute(.init(sql: "select 2")))
            #expect(after["rows"] == [[2]])
        }
    }

    // MARK: begin, commit, savepoint

    @Test("begin: a deny fails the begin op (no transaction) and an implicit transaction's request")
    func beginDeny() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await withVetoTestClient(
                daemon,
                ["veto": ["begin"], "name": "no-tx"],
                decide: VetoAnswer.always(VetoAnswer.deny("maintenance"))
            ) { listener in
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("begin")
                    vetoExpectVetoed(error, event: "begin", by: "no-tx", reason: "maintenance")
                    #expect(try await evd.expectError("commit").code == "not_in_transaction")
                    let implicit = try await evd.expectError("execute", ["sql": "insert into t values (1)"])
                    vetoExpectVetoed(implicit, event: "begin", by: "no-tx", reason: "maintenance")
                }
                #expect(listener.vetoes.map { $0["implicit"] } == [false, true])
                #expect(listener.vetoes.allSatisfy { $0["database"] == "main" && $0["connection"]?.intValue != nil })
            }
            try await daemon.withClient { evd in
                try await evd.request("begin")
                try await evd.request("rollback")
                #expect(try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[0]])
            }
        }
    }

    @Test("commit: a deny rolls the transaction back (explicit and implicit); nothing is visible to another session")
    func commitDeny() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await daemon.withClient { writer in
                let writerSession = writer.hello["session"] ?? .null
                let decide: VetoDecider = { veto, _ in
                    veto["session"] == writerSession ? VetoAnswer.deny("frozen") : VetoAnswer.allow
                }
                try await withVetoTestClient(daemon, ["veto": ["commit"], "name": "freeze"], decide: decide) { listener in
                    try await daemon.withClient { reader in
                        try await writer.request("begin")
                        try await writer.request(.execute(.init(sql: "insert into t values (1)")))
                        let error = try await writer.expectError("commit")
                        vetoExpectVetoed(error, event: "commit", by: "freeze", reason: "frozen")
                        // The transaction is over: rolled back.
                        #expect(try await writer.expectError("rollback").code == "not_in_transaction")
                        #expect(try await reader.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[0]])

                        let implicit = try await writer.expectError("execute", ["sql": "insert into t values (2)"])
                        vetoExpectVetoed(implicit, event: "commit", by: "freeze", reason: "frozen")
                        #expect(try await reader.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[0]])
                    }
                    let denied = listener.vetoes.filter { $0["session"] == writerSession }
                    #expect(denied.map { $0["implicit"] } == [false, true])
                }
            }
        }
    }

    @Test("savepoint: a deny sets no savepoint, so rolling back to it fails; the transaction goes on")
    func savepointDeny() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            try await withVetoTestClient(
                daemon,
                ["veto": ["savepoint"], "name": "flat"],
                decide: VetoAnswer.always(VetoAnswer.deny("no nesting"))
            ) { listener in
                try await daemon.withClient { evd in
                    try await evd.request("begin")
                    try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                    let error = try await evd.expectError("savepoint", ["name": "sp1"])
                    vetoExpectVetoed(error, event: "savepoint", by: "flat", reason: "no nesting")
                    let rollback = try await evd.expectError("rollback_savepoint", ["name": "sp1"])
                    #expect(rollback.code == "sql_error", "\(rollback)")
                    #expect(rollback.message.contains("no such savepoint"), "\(rollback)")
                    try await evd.request("commit")
                    #expect(try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[1]])
                }
                let veto = try #require(listener.vetoes.first)
                #expect(veto["name"] == "sp1")
                #expect(veto["database"] == "main")
            }
        }
    }

    // MARK: Dialect events

    @Test("do_connect: a deny fails the request; the pool's slot is given back")
    func doConnectDeny() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            try await withVetoTestClient(
                daemon,
                ["veto": ["do_connect"], "name": "no-connect"],
                decide: VetoAnswer.always(VetoAnswer.deny("closed"))
            ) { listener in
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    vetoExpectVetoed(error, event: "do_connect", by: "no-connect", reason: "closed")
                }
                let veto = try #require(listener.vetoes.first)
                #expect(veto["path"] == .string(daemon.databasePath))
                #expect(veto["database"] == "main")
                #expect(veto["pragmas"]?["foreign_keys"] == "on")
                #expect(veto["flags"]?.arrayValue?.isEmpty == false)
            }
            #expect(try await daemon.request(.execute(.init(sql: "select 1")))["rows"] == [[1]])
        }
    }

    @Test("do_connect: modified pragmas are what a fresh connection gets")
    func doConnectModifyPragmas() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            #expect(try await daemon.request(.execute(.init(sql: "PRAGMA foreign_keys")))["rows"] == [[1]])
            let pragmas: JSONObject = ["journal_mode": "wal", "busy_timeout": 1234, "foreign_keys": "off"]
            try await withVetoTestClient(
                daemon,
                ["veto": ["do_connect"], "name": "tuner"],
                decide: VetoAnswer.always(VetoAnswer.modify(["pragmas": .object(pragmas)]))
            ) { listener in
                try await daemon.withClient { evd in
                    try await evd.request("dispose")
                    #expect(try await evd.request(.execute(.init(sql: "PRAGMA foreign_keys")))["rows"] == [[0]])
                    #expect(try await evd.request(.execute(.init(sql: "PRAGMA journal_mode")))["rows"] == [["wal"]])
                }
                #expect(listener.vetoes.count == 1)
                #expect(listener.vetoes.first?["pragmas"]?["foreign_keys"] == "on")
            }
        }
    }

    @Test("do_execute, do_execute_no_params, do_executemany: a deny fails the request")
    func dialectExecuteDeny() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            let decide: VetoDecider = { veto, _ in
                (veto["statement"]?.stringValue ?? "").hasPrefix("select count")
                    ? VetoAnswer.allow : VetoAnswer.deny("no \(veto["event"]?.stringValue ?? "?")")
            }
            try await withVetoTestClient(
                daemon,
                ["veto": ["do_execute", "do_execute_no_params", "do_executemany"], "name": "dialect"],
                decide: decide
            ) { listener in
                #expect(listener.subscribed["veto"] == ["do_execute", "do_execute_no_params", "do_executemany"])
                try await daemon.withClient { evd in
                    let one = try await evd.expectError("execute", ["sql": "insert into t values (?)", "params": [1]])
                    vetoExpectVetoed(one, event: "do_execute", by: "dialect", reason: "no do_execute")
                    let none = try await evd.expectError("execute", ["sql": "insert into t values (2)"])
                    vetoExpectVetoed(none, event: "do_execute_no_params", by: "dialect", reason: "no do_execute_no_params")
                    let many = try await evd.expectError(
                        "executemany",
                        ["sql": "insert into t values (?)", "params": [[3], [4]]]
                    )
                    vetoExpectVetoed(many, event: "do_executemany", by: "dialect", reason: "no do_executemany")
                    #expect(try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[0]])
                }
                let many = try #require(listener.vetoes.first { $0["event"] == "do_executemany" })
                #expect(many["statement"] == "insert into t values (?)")
                #expect(many["parameters"] == [[3], [4]])
            }
        }
    }

    // MARK: handle_error

    @Test("handle_error: a modified error is what the client receives")
    func handleErrorModify() async throws {
        try await withRunningDaemon { daemon in
            let decide: VetoDecider = { _, _ in
                VetoAnswer.modify(["error": ["code": "busy", "message": "try again later"]])
            }
            try await withVetoTestClient(daemon, ["veto": ["handle_error"], "name": "errors"], decide: decide) { listener in
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "select * from nosuch"])
                    #expect(error.code == "busy")
                    #expect(error.message == "try again later")
                    #expect(try await evd.request(.execute(.init(sql: "select 1")))["rows"] == [[1]])
                }
                let veto = try #require(listener.vetoes.first)
                #expect(veto["statement"] == "select * from nosuch")
                #expect(veto["error"]?["code"] == "sql_error")
                #expect(veto["error"]?["message"]?.stringValue?.contains("nosuch") == true)
                #expect(listener.vetoes.count == 1)
            }
        }
    }

    @Test("ddl and column_reflect vetoes can be subscribed to (they do not fire yet)")
    func ddlSubscribe() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let names: JSONValue = ["before_create", "before_drop", "before_parent_attach", "column_reflect"]
                let result = try await evd.request("subscribe", ["veto": names, "name": "ddl"])
                #expect(result["veto"] == names)
                #expect(result["subscription"]?.intValue != nil)
                let glob = try await evd.request("subscribe", ["veto": ["before_*"]])
                let matched = Set((glob["veto"]?.arrayValue ?? []).compactMap(\.stringValue))
                #expect(
                    matched == ["before_execute", "before_cursor_execute", "before_create", "before_drop", "before_parent_attach"]
                )
            }
        }
    }

    @Test("where narrows a veto subscription too: a listener is asked only about matching events")
    func vetoWhere() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClient(
                daemon,
                ["veto": ["before_cursor_execute"], "where": ["statement": ["select 1", "select 3"]], "name": "narrow"],
                decide: VetoAnswer.always(VetoAnswer.deny("not that one"))
            ) { listener in
                try await daemon.withClient { evd in
                    let other = try await evd.request(.execute(.init(sql: "select 2")))
                    #expect(other["rows"] == [[2]])
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    vetoExpectVetoed(error, event: "before_cursor_execute", by: "narrow", reason: "not that one")
                }
                #expect(listener.vetoes.map { $0["statement"] } == ["select 1"])
            }
        }
    }

    // MARK: The chain

    @Test("the chain: highest priority first, equal priorities in subscription order, each sees the last one's changes")
    func chainOrder() async throws {
        try await withRunningDaemon { daemon in
            func appending(_ tag: String) -> VetoDecider {
                { veto, _ in VetoAnswer.modify(["statement": .string((veto["statement"]?.stringValue ?? "") + ", '\(tag)'")]) }
            }
            try await withVetoTestClients(
                daemon,
                [
                    (["events": ["before_cursor_execute"]], VetoAnswer.silent),
                    (["veto": ["before_cursor_execute"], "name": "zero-a", "priority": 0], appending("zero-a")),
                    (["veto": ["before_cursor_execute"], "name": "low", "priority": -5], appending("low")),
                    (["veto": ["before_cursor_execute"], "name": "high", "priority": 10], appending("high")),
                    (["veto": ["before_cursor_execute"], "name": "zero-b"], appending("zero-b")),
                ]
            ) { clients in
                let plain = clients[0]
                let (zeroA, low, high, zeroB) = (clients[1], clients[2], clients[3], clients[4])
                try await daemon.withClient { evd in
                    let result = try await evd.request(.execute(.init(sql: "select 1")))
                    #expect(result["rows"] == [[1, "high", "zero-a", "zero-b", "low"]])
                }
                #expect(high.vetoes.map { $0["statement"] } == ["select 1"])
                #expect(zeroA.vetoes.map { $0["statement"] } == ["select 1, 'high'"])
                #expect(zeroB.vetoes.map { $0["statement"] } == ["select 1, 'high', 'zero-a'"])
                #expect(low.vetoes.map { $0["statement"] } == ["select 1, 'high', 'zero-a', 'zero-b'"])
                let vetoSeq = try #require(high.vetoes.first?["seq"]?.intValue)
                #expect([zeroA, zeroB, low].allSatisfy { $0.vetoes.first?["seq"]?.intValue == vetoSeq })

                // Plain subscribers get the event after the chain: a later seq, the final properties, the outcome.
                let event = try #require(try await plain.event("before_cursor_execute"))
                #expect((event["seq"]?.intValue ?? 0) > vetoSeq)
                #expect(event["statement"] == "select 1, 'high', 'zero-a', 'zero-b', 'low'")
                let outcome = try #require(event["outcome"]?.objectValue)
                #expect(outcome["seq"] == .int(vetoSeq))
                #expect(outcome["action"] == "modify")
                #expect(outcome["by"] == "low")
                #expect(outcome["reason"] == .null)
                #expect(outcome["dry_run"] == [])
                #expect(Set(outcome.keys) == ["seq", "action", "by", "reason", "dry_run"])
            }
        }
    }

    @Test("the chain: the first deny ends it; later listeners are not asked")
    func chainDenyEnds() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClients(
                daemon,
                [
                    (["events": ["before_cursor_execute", "after_cursor_execute"]], VetoAnswer.silent),
                    (["veto": ["before_cursor_execute"], "name": "first", "priority": 2], VetoAnswer.always(VetoAnswer.allow)),
                    (["veto": ["before_cursor_execute"], "name": "second", "priority": 1], VetoAnswer.always(VetoAnswer.deny("stop"))),
                    (["veto": ["before_cursor_execute"], "name": "third"], VetoAnswer.always(VetoAnswer.allow)),
                ]
            ) { clients in
                let (plain, first, second, third) = (clients[0], clients[1], clients[2], clients[3])
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    vetoExpectVetoed(error, event: "before_cursor_execute", by: "second", reason: "stop")
                }
                try await third.sync()
                #expect(first.vetoes.count == 1)
                #expect(second.vetoes.count == 1)
                #expect(third.vetoes.isEmpty)
                let event = try #require(try await plain.event("before_cursor_execute"))
                let outcome = try #require(event["outcome"]?.objectValue)
                #expect(outcome["action"] == "deny")
                #expect(outcome["by"] == "second")
                #expect(outcome["reason"] == "stop")
                #expect(outcome["seq"] == first.vetoes.first?["seq"])
                #expect((event["seq"]?.intValue ?? 0) > (outcome["seq"]?.intValue ?? .max))
                try await plain.sync()
                #expect(!plain.events.contains { $0["event"] == "after_cursor_execute" })
            }
        }
    }

    @Test("plain subscribers of an allowed vetoable event get it after the chain with outcome allow")
    func plainSubscriberAllowOutcome() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClients(
                daemon,
                [
                    (["events": ["begin"]], VetoAnswer.silent),
                    (["veto": ["begin"], "name": "ok"], VetoAnswer.always(VetoAnswer.allow)),
                ]
            ) { clients in
                try await daemon.withClient { evd in _ = try await evd.request(.execute(.init(sql: "select 1"))) }
                let vetoSeq = try #require(clients[1].vetoes.first?["seq"]?.intValue)
                let event = try #require(try await clients[0].event("begin"))
                #expect((event["seq"]?.intValue ?? 0) > vetoSeq)
                #expect(event["implicit"] == true)
                #expect(event["outcome"]?["seq"] == .int(vetoSeq))
                #expect(event["outcome"]?["action"] == "allow")
                #expect(event["outcome"]?["by"] == .null)
                #expect(event["outcome"]?["reason"] == .null)
                #expect(event["outcome"]?["dry_run"] == [])
            }
        }
    }

    // MARK: dry_run

    @Test("dry_run: a dry-run deny or modify is recorded in outcome.dry_run and stats, never enforced")
    func dryRun() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClients(
                daemon,
                [
                    (["events": ["before_cursor_execute"]], VetoAnswer.silent),
                    (
                        ["veto": ["before_cursor_execute"], "name": "audit", "mode": "dry_run", "priority": 1],
                        VetoAnswer.always(VetoAnswer.deny("would block"))
                    ),
                    (
                        ["veto": ["before_cursor_execute"], "name": "tryout", "mode": "dry_run"],
                        VetoAnswer.always(VetoAnswer.modify(["statement": "select 99"]))
                    ),
                ]
            ) { clients in
                let result = try await daemon.request(.execute(.init(sql: "select 1")))
                #expect(result["rows"] == [[1]])
                let event = try #require(try await clients[0].event("before_cursor_execute"))
                #expect(event["statement"] == "select 1")
                #expect(event["outcome"]?["action"] == "allow")
                #expect(event["outcome"]?["by"] == .null)
                let dryRun = try #require(event["outcome"]?["dry_run"]?.arrayValue)
                #expect(dryRun.count == 2)
                #expect(dryRun.first?["by"] == "audit")
                #expect(dryRun.first?["action"] == "deny")
                #expect(dryRun.first?["reason"] == "would block")
                #expect(dryRun.last?["by"] == "tryout")
                #expect(dryRun.last?["action"] == "modify")
                // Each dry-run listener was asked with the properties as they were.
                #expect(clients[2].vetoes.first?["statement"] == "select 1")
                #expect(try await vetoStatistics(daemon)["dry_run_denied"] == 1)
            }
        }
    }

    // MARK: Timeouts, the budget, dead listeners

    @Test("timeout: a silent listener's on_timeout decides", arguments: ["allow", "deny"])
    func timeout(onTimeout: String) async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClient(
                daemon,
                ["veto": ["before_cursor_execute"], "name": "sleepy", "timeout_ms": 100, "on_timeout": .string(onTimeout)]
            ) { listener in
                try await daemon.withClient { evd in
                    let response = try await evd.rawRequest("execute", ["sql": "select 1"])
                    if onTimeout == "allow" {
                        #expect(response["result"]?["rows"] == [[1]], "\(response)")
                    } else {
                        let error = vetoResponseError(response)
                        expectVetoed(error, event: "before_cursor_execute", by: "sleepy")
                        #expect(error["reason"]?.stringValue?.contains("timeout") == true, "\(error)")
                    }
                }
                // A silent listener's veto may still be on its way when the writer's answer arrives.
                try await listener.sync()
                #expect(listener.vetoes.first?["deadline_ms"] == 100)
                let stats = try await vetoStatistics(daemon)
                #expect(stats["timed_out"] == 1)
                #expect(stats["asked"] == 1)
            }
        }
    }

    @Test("budget: when it runs out the pending veto resolves by on_timeout and later listeners are not asked")
    func budgetExhaustion() async throws {
        try await withRunningDaemon(configure: { $0.vetoBudgetMs = 300 }) { daemon in
            let silent: JSONObject = ["veto": ["before_cursor_execute"], "timeout_ms": 60000, "on_timeout": "allow"]
            var first = silent
            first["name"] = "first"
            var second = silent
            second["name"] = "second"
            try await withVetoTestClients(daemon, [(first, VetoAnswer.silent), (second, VetoAnswer.silent)]) { clients in
                try await daemon.withClient { evd in
                    let inFlight = VetoInFlight { try await evd.request(.execute(.init(sql: "select 1"))) }
                    let result = try #require(try await inFlight.value(within: 20))
                    #expect(result["rows"] == [[1]])
                }
                try await clients[0].sync()
                let deadline = try #require(clients[0].vetoes.first?["deadline_ms"]?.intValue)
                #expect(deadline <= 300)
                try await clients[1].sync()
                #expect(clients[1].vetoes.isEmpty)
                #expect(try await vetoStatistics(daemon)["asked"] == 1)
            }
        }
    }

    @Test("a listener that disconnects mid-veto: its on_timeout decides at once, and the daemon goes on", arguments: ["allow", "deny"])
    func listenerDisconnects(onTimeout: String) async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let inFlight = try await daemon.withClient { listener -> VetoInFlight<JSONObject> in
                    try await listener.request(
                        "subscribe",
                        ["veto": ["before_cursor_execute"], "name": "doomed", "timeout_ms": 60000, "on_timeout": .string(onTimeout)]
                    )
                    let inFlight = VetoInFlight { try await evd.rawRequest("execute", ["sql": "select 1"]) }
                    #expect(await listener.nextMessage(ofType: "veto", within: 10) != nil)
                    return inFlight
                }  // the listener's connection closes here, its veto still pending
                let response = try #require(try await inFlight.value(within: 20))
                if onTimeout == "allow" {
                    #expect(response["result"]?["rows"] == [[1]], "\(response)")
                } else {
                    let error = vetoResponseError(response)
                    expectVetoed(error, event: "before_cursor_execute", by: "doomed")
                    #expect(error["reason"]?.stringValue?.contains("disconnected") == true, "\(error)")
                }
                #expect(try await evd.request(.execute(.init(sql: "select 2")))["rows"] == [[2]])
            }
            #expect(try await daemon.request("stats")["veto_listeners"] == 0)
        }
    }

    @Test("a listener that half-closes its input can never reply: its pending veto resolves at once")
    func listenerHalfCloses() async throws {
        try await withRunningDaemon { daemon in
            let script = """
                import socket, sys
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sys.argv[1])
                f = s.makefile("rb")
                f.readline()
                s.sendall(b'{"op":"subscribe","id":1,"veto":["before_cursor_execute"],"events":["after_cursor_execute"],"name":"half","timeout_ms":60000,"on_timeout":"deny"}\\n')
                f.readline()
                sys.stdout.write(f.readline().decode()); sys.stdout.flush()
                s.shutdown(socket.SHUT_WR)
                for line in f:
                    sys.stdout.write(line.decode()); sys.stdout.flush()
                    if b'"select 2"' in line: break
                """
            let python = try Spawned("/usr/bin/env", ["python3", "-c", script, daemon.socketPath])
            try await waitForSubscriptions(daemon, atLeast: 1)
            try await daemon.withClient { evd in
                let inFlight = VetoInFlight { try await evd.rawRequest("execute", ["sql": "select 1"]) }
                let response = try #require(try await inFlight.value(within: 20))
                expectVetoed(vetoResponseError(response), event: "before_cursor_execute", by: "half")
                // It is no longer asked, but its plain subscription lives on (it still reads).
                let next = VetoInFlight { try await evd.rawRequest("execute", ["sql": "select 2"]) }
                #expect(try await next.value(within: 20)?["result"]?["rows"] == [[2]])
            }
            let output = try await python.finish(within: 20)
            let lines = jsonLines(output.stdout)
            #expect(lines.filter { $0["type"] == "veto" }.count == 1, "\(output.stdout)")
            #expect(lines.contains { $0["event"] == "after_cursor_execute" && $0["statement"] == "select 2" }, "\(output.stdout)")
        }
    }

    @Test("the budget is per operation: once one event's vetoes spent it, the request's later vetoes are not asked")
    func budgetAcrossEvents() async throws {
        try await withRunningDaemon(configure: { $0.vetoBudgetMs = 300 }) { daemon in
            try await withVetoTestClients(
                daemon,
                [
                    (["veto": ["before_execute"], "name": "slow", "timeout_ms": 60000, "on_timeout": "allow"], VetoAnswer.silent),
                    (["veto": ["before_cursor_execute"], "name": "later", "timeout_ms": 60000, "on_timeout": "allow"], VetoAnswer.silent),
                ]
            ) { clients in
                try await daemon.withClient { evd in
                    let inFlight = VetoInFlight { try await evd.request(.execute(.init(sql: "select 1"))) }
                    let result = try await inFlight.value(within: 20)
                    #expect(result?["rows"] == [[1]])
                }
                try await clients[0].sync()
                #expect(clients[0].vetoes.count == 1)
                try await clients[1].sync()
                #expect(clients[1].vetoes.isEmpty)
            }
        }
    }

    @Test("the budget counts time spent waiting for vetoes, not the SQL work between them")
    func budgetIgnoresSQLWork() async throws {
        // A budget large enough for two allow replies on a loaded machine, smaller than the first
        // statement's own work (about six seconds here).
        try await withRunningDaemon(configure: { $0.vetoBudgetMs = 4000 }) { daemon in
            try await withVetoTestClient(
                daemon,
                ["veto": ["before_cursor_execute"], "name": "prompt", "timeout_ms": 60000, "on_timeout": "deny"],
                decide: VetoAnswer.always(VetoAnswer.allow)
            ) { listener in
                // The first statement takes longer than the whole budget; the
                // second statement's listener is still asked, and allows.
                let slow = "with recursive c(x) as (select 1 union all select x + 1 from c where x < 24000000) select count(*) from c"
                let result = try await daemon.request("execute", ["sql": .string(slow + "; select 2")])
                #expect(result["rows"] == [[2]])
                #expect(listener.vetoes.count == 2)
            }
        }
    }

    // MARK: Invalid replies

    @Test("replies: unknown seq, bad action, immutable or mistyped property → bad_request with the reply's id; the veto goes by on_timeout")
    func invalidReplies() async throws {
        // The chain's budget as long as the listener's timeout: a loaded machine's slow reply is
        // still a reply.
        try await withRunningDaemon(configure: { $0.vetoBudgetMs = 60000 }) { daemon in
            try await daemon.withClient { listener in
                try await listener.request(
                    "subscribe",
                    ["veto": ["before_cursor_execute"], "name": "picky", "timeout_ms": 60000, "on_timeout": "deny"]
                )
                func replyError(_ reply: JSONObject) async throws -> JSONObject {
                    var reply = reply
                    reply["op"] = "reply"
                    try await listener.send(reply)
                    let response = try #require(await listener.nextMessage(ofType: "response", within: 10))
                    #expect(response["id"] == reply["id"] ?? .null)
                    return vetoResponseError(response)
                }
                let unknown = try await replyError(["id": "r1", "seq": 123_456, "action": "allow"])
                #expect(unknown["code"] == "bad_request")
                #expect(unknown["field"] == "seq")
                let missing = try await replyError(["id": 7, "action": "allow"])
                #expect(missing["field"] == "seq")

                try await daemon.withClient { evd in
                    let cases: [(set: JSONObject, field: String)] = [
                        (["action": "modify", "set": ["connection": 9]], "set.connection"),
                        (["action": "modify", "set": ["statement": 5]], "set.statement"),
                        (["action": "modify"], "set"),
                        (["action": "maybe"], "action"),
                    ]
                    for (index, testCase) in cases.enumerated() {
                        let inFlight = VetoInFlight { try await evd.rawRequest("execute", ["sql": "select 1"]) }
                        let veto = try #require(await listener.nextMessage(ofType: "veto", within: 10))
                        var reply = testCase.set
                        reply["id"] = .string("bad-\(index)")
                        reply["seq"] = veto["seq"] ?? .null
                        let error = try await replyError(reply)
                        #expect(error["code"] == "bad_request", "\(testCase)")
                        #expect(error["field"] == .string(testCase.field), "\(testCase): \(error)")
                        // It counts as no answer: on_timeout deny, at once (not after 60 s).
                        let response = try #require(try await inFlight.value(within: 20))
                        let vetoed = vetoResponseError(response)
                        expectVetoed(vetoed, event: "before_cursor_execute", by: "picky")
                        #expect(vetoed["reason"]?.stringValue?.contains("invalid_reply") == true, "\(vetoed)")
                        // The veto is decided: a valid reply now is for an unknown seq.
                        var late: JSONObject = ["id": .string("late-\(index)"), "seq": veto["seq"] ?? .null, "action": "allow"]
                        late["op"] = "reply"
                        #expect(try await replyError(late)["field"] == "seq")
                    }
                }
                #expect(try await vetoStatistics(daemon)["invalid_replies"] == 4)
            }
        }
    }

    @Test("a reply for a veto that already timed out is bad_request field seq")
    func expiredReply() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                try await listener.request(
                    "subscribe",
                    ["veto": ["before_cursor_execute"], "timeout_ms": 100, "on_timeout": "allow"]
                )
                let result = try await daemon.request(.execute(.init(sql: "select 1")))
                #expect(result["rows"] == [[1]])
                let veto = try #require(await listener.nextMessage(ofType: "veto", within: 10))
                try await listener.send(["op": "reply", "id": "too-late", "seq": veto["seq"] ?? .null, "action": "deny"])
                let response = try #require(await listener.nextMessage(ofType: "response", within: 10))
                #expect(response["id"] == "too-late")
                let error = vetoResponseError(response)
                #expect(error["code"] == "bad_request")
                #expect(error["field"] == "seq")
            }
        }
    }

    @Test("a reply from another connection cannot decide someone else's veto")
    func replyFromAnotherConnection() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClient(
                daemon,
                ["veto": ["before_cursor_execute"], "name": "owner"],
                decide: { _, _ in nil }
            ) { listener in
                try await daemon.withClient { evd in
                    let inFlight = VetoInFlight { try await evd.rawRequest("execute", ["sql": "select 1"]) }
                    try await listener.waitUntil("the veto") { $0.contains { $0["type"] == "veto" } }
                    let seq = listener.vetoes.first?["seq"] ?? .null
                    // The requester (or anyone else) tries to allow it: not its veto.
                    try await evd.send(["op": "reply", "id": "forged", "seq": seq, "action": "allow"])
                    let forged = try #require(await evd.nextMessage(ofType: "response", within: 10))
                    #expect(forged["id"] == "forged")
                    #expect(vetoResponseError(forged)["field"] == "seq")
                    // The owner's answer is still the one that counts.
                    try await listener.connection.send(["op": "reply", "seq": seq, "action": "deny", "reason": "mine"])
                    let response = try #require(try await inFlight.value(within: 20))
                    expectVetoed(vetoResponseError(response), event: "before_cursor_execute", by: "owner", reason: "mine")
                }
            }
        }
    }

    @Test("a flood of 1000 bogus replies: each gets its error, and the daemon keeps serving")
    func bogusReplyFlood() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                // A long timeout: on a loaded machine the flood can keep the listener past the default.
                try await listener.request(
                    "subscribe",
                    ["veto": ["before_cursor_execute"], "on_timeout": "allow", "timeout_ms": 30_000]
                )
                var lines: [UInt8] = []
                for n in 0..<1000 {
                    let reply: JSONValue = ["op": "reply", "id": .string("bogus-\(n)"), "seq": .integer(1_000_000 + n), "action": "allow"]
                    lines += reply.jsonBytes + [0x0a]
                }
                try await listener.sendRaw(lines)
                var ids: [JSONValue] = []
                while ids.count < 1000, let response = await listener.nextMessage(ofType: "response", within: 20) {
                    #expect(response["ok"] == false)
                    #expect(response["error"]?["code"] == "bad_request")
                    ids.append(response["id"] ?? .null)
                }
                #expect(ids == (0..<1000).map { .string("bogus-\($0)") })
                #expect(try await listener.request("ping").isEmpty)
                // The listener still works: it answers a real veto.
                try await daemon.withClient { evd in
                    let inFlight = VetoInFlight { try await evd.request(.execute(.init(sql: "select 1"))) }
                    let veto = try #require(await listener.nextMessage(ofType: "veto", within: 10))
                    try await listener.send([
                        "op": "reply", "seq": veto["seq"] ?? .null, "action": "modify", "set": ["statement": "select 5"],
                    ])
                    #expect(try await inFlight.value(within: 20)?["rows"] == [[5]])
                }
            }
        }
    }

    // MARK: Odd listeners

    @Test("a client that is its own listener answers its own veto on the same connection, without deadlock")
    func ownListener() async throws {
        // (A budget of a minute: on a loaded run the exchange below can outlast the default 5 s.)
        try await withRunningDaemon(configure: { $0.vetoBudgetMs = 60_000 }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request("subscribe", ["veto": ["before_cursor_execute"], "name": "self", "timeout_ms": 60000])
                let inFlight = VetoInFlight { try await evd.rawRequest("execute", ["sql": "select 1"]) }
                let veto = try #require(await evd.nextMessage(ofType: "veto", within: 10))
                #expect(veto["session"] == evd.hello["session"])
                // An invalid reply is answered at once, ahead of the request still running here.
                try await evd.send(["op": "reply", "id": "bogus", "seq": 999_999, "action": "allow"])
                let bogus = try #require(await evd.nextMessage(ofType: "response", within: 10))
                #expect(bogus["id"] == "bogus")
                #expect(vetoResponseError(bogus)["field"] == "seq")
                try await evd.send(["op": "reply", "seq": veto["seq"] ?? .null, "action": "modify", "set": ["statement": "select 7"]])
                let response = try #require(try await inFlight.value(within: 20))
                #expect(response["result"]?["rows"] == [[7]], "\(response)")
            }
        }
    }

    @Test("not_vetoable: a non-vetoable name or a glob matching nothing vetoable; bad listener options are bad_request")
    func notVetoable() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                for names: JSONValue in [
                    ["after_execute"], ["after_*"], ["insert-rows"], ["myapp.deployed"], ["before_execute", "commit", "rollback"],
                ] {
                    let error = try await evd.expectError("subscribe", ["veto": names])
                    #expect(error.code == "not_vetoable", "\(names): \(error)")
                    #expect(error.extra["field"] == "veto", "\(names): \(error)")
                }
                #expect(try await evd.expectError("subscribe", ["veto": ["befor_execute"]]).code == "unknown_event")
                let badOptions: [(JSONObject, String)] = [
                    (["timeout_ms": 0], "timeout_ms"), (["timeout_ms": 60001], "timeout_ms"),
                    (["on_timeout": "maybe"], "on_timeout"), (["mode": "audit"], "mode"), (["priority": "high"], "priority"),
                ]
                for (options, field) in badOptions {
                    var arguments = options
                    arguments["veto"] = ["before_execute"]
                    let error = try await evd.expectError("subscribe", arguments)
                    #expect(error.code == "bad_request", "\(options)")
                    #expect(error.extra["field"] == .string(field), "\(options): \(error)")
                }
                // Nothing was registered by the failures.
                #expect(try await daemon.request("stats")["veto_listeners"] == 0)
                // Root holds the veto permission.
                let ok = try await evd.request("subscribe", ["veto": ["*"], "timeout_ms": 60000, "on_timeout": "allow", "priority": -3])
                #expect(ok["veto"]?.arrayValue?.count == EventKind.allCases.filter { $0.spec.vetoable }.count)
            }
        }
    }

    // MARK: The Swift client

    @Test("the Swift client: evd.vetoes(...) yields Veto values that deny, modify and allow")
    func swiftClient() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                // A generous timeout: the default 1 s can pass before a loaded machine runs the listener's task.
                let vetoes = try await listener.vetoes(["before_cursor_execute"], options: .init(name: "x", timeoutMs: 20000))
                #expect(vetoes.subscription > 0)
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        var answered = 0
                        for try await veto in vetoes {
                            #expect(veto.event == "before_cursor_execute")
                            #expect(veto.deadlineMs > 0)
                            switch answered {
                            case 0: try await veto.deny("no")
                            case 1:
                                #expect(veto["statement"] == "select 1")
                                try await veto.modify(["statement": "select 2"])
                            default: try await veto.allow()
                            }
                            answered += 1
                            if answered == 3 { break }
                        }
                    }
                    try await daemon.withClient { evd in
                        let error = try await evd.expectError("execute", ["sql": "select 1"])
                        vetoExpectVetoed(error, event: "before_cursor_execute", by: "x", reason: "no")
                        #expect(try await evd.request(.execute(.init(sql: "select 1")))["rows"] == [[2]])
                        #expect(try await evd.request(.execute(.init(sql: "select 3")))["rows"] == [[3]])
                    }
                    try await group.waitForAll()
                }
            }
        }
    }
}
