import EvdClient
import Foundation
import OrderedCollections
import Testing

/// `EvdOperation`: every op parses from what a client sends, and parsing checks what PROTOCOL.md §3
/// says, in the order each op reads its arguments.
@Suite("EvdOperation")
struct EvdOperationTests {
    /// One of each op, with its arguments set where it has any.
    static let examples: [EvdOperation] = [
        .ping, .events, .stats, .logout,
        .subscribe(
            .init(
                events: ["insert-rows", "sql.*"],
                veto: ["before_execute"],
                mode: .dryRun,
                since: 7,
                rows: true,
                name: "audit",
                timeoutMs: 500,
                onTimeout: .allow,
                priority: 3,
                onOverflow: .drop,
                where: ["table": "dogs"]
            )
        ),
        .subscribe(.init(events: ["*"])),
        .unsubscribe(subscription: 4),
        .execute(.init(sql: "select ?", params: .positional([1, "x", ["$base64": "AAE="]]), database: "main")),
        .execute(.init(sql: "select :n", params: .named(["n": 5]))),
        .execute(.init(sql: "select 1")),
        .executemany(.init(sql: "insert into t values (?)", parameterSets: [.positional([1]), .positional([2])])),
        .structured(
            .insert(
                table: "dogs",
                rows: JSONRows(objects: [["id": 1, "name": "Cleo"]])!,
                ignore: true,
                replace: false,
                alter: true,
                returning: true
            ),
            database: "main"
        ),
        .structured(.upsert(table: "dogs", rows: JSONRows(objects: [["id": 1]])!, alter: false, returning: false), database: nil),
        .structured(.update(table: "dogs", key: [1], update: ["name": "Pancakes"], alter: false, returning: true), database: nil),
        .structured(.delete(table: "dogs", key: ["a", 2]), database: nil),
        .structured(.dropTable(table: "dogs"), database: "other"),
        .structured(.describe(table: "dogs"), database: nil),
        .structured(
            .createTable(
                table: "t",
                columns: [.init(name: "id", type: "integer"), .init(name: "x", type: "text")],
                rows: nil,
                keys: ["id"],
                ignore: false,
                replace: false,
                alter: false
            ),
            database: nil
        ),
        .begin(database: "main"), .commit(database: nil), .rollback(database: nil),
        .savepoint(.init(.savepoint, name: "a")), .savepoint(.init(.releaseSavepoint, name: "a")),
        .savepoint(.init(.rollbackSavepoint, name: "a")),
        .twoPhase(.init(.beginTwophase, xid: "x1")), .twoPhase(.init(.prepareTwophase, xid: "x1", database: "main")),
        .twoPhase(.init(.commitTwophase, xid: "x1")), .twoPhase(.init(.rollbackTwophase, xid: "x1")),
        .recover(database: nil),
        .executionOptions(.init(options: ["query_only": true], scope: .engine)),
        .emit(.init(event: "myapp.deployed", data: ["version": "1.2"])), .emit(.init(event: "myapp.ping")),
        .login(token: "evd_abc"),
        .createToken(.init(expiresAfter: 60, restrictAll: ["view-table"], restrictDatabase: ["main": ["insert-row"]])),
        .invalidate(.init(database: "main", connection: 2, soft: true)), .dispose(database: nil),
        .reply(.init(seq: 12, action: .modify, reason: "r", set: ["statement": "select 2"])),
    ]

    @Test("each op parses from the request a client sends for it, to the same operation")
    func roundTrip() throws {
        for operation in Self.examples {
            let request = operation.request
            #expect(request["op"] == .string(operation.name.rawValue))
            // Through the wire's bytes, as the daemon reads them.
            let line = JSONValue.object(request).jsonBytes
            let (value, rows) = try line.withUnsafeBytes {
                try JSONValue.parsing($0, flatteningRowsOf: "rows", keepingNumberTextOf: "id")
            }
            var parsed = EvdRequest(value.objectValue!, rows: rows)
            if rows != nil, !EvdRequest.rowOps.contains(operation.name.rawValue) { parsed = EvdRequest(parsed.whole) }
            #expect(try EvdOperation(parsing: parsed) == operation, "\(operation.name)")
        }
    }

    @Test("docs/protocol.md lists every op and no other; so does PROTOCOL.md §3 (but the two admin ops), where it is at hand")
    func matchesTheContract() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../..").standardizedFileURL
        let all = Set(EvdOperation.Name.allCases.map(\.rawValue))
        let docs = try String(contentsOf: root.appendingPathComponent("docs/protocol.md"), encoding: .utf8)
        let list = docs.components(separatedBy: "<!-- ops -->")[1].components(separatedBy: "<!-- /ops -->")[0]
        let listed = list.split(separator: "`").enumerated().filter { $0.offset % 2 == 1 }.map { String($0.element) }
        #expect(Set(listed) == all)
        #expect(listed.count == all.count)  // each once
        // The contract lives beside the repository (../shared/PROTOCOL.md) on the machines it is
        // written on; a clone elsewhere checks the list above only.
        let contract = root.appendingPathComponent("../shared/PROTOCOL.md").standardizedFileURL
        guard let text = try? String(contentsOf: contract, encoding: .utf8) else { return }
        let section = text.components(separatedBy: "## 3. Requests")[1].components(separatedBy: "\n## ")[0]
        var named: Set<String> = []
        for line in section.split(separator: "\n") where line.hasPrefix("| `") {
            let cell = line.dropFirst(2).prefix { $0 != "|" }
            for part in cell.split(separator: "/") {
                let name = part.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "`"))
                if !name.isEmpty { named.insert(name) }
            }
        }
        // Two admin ops and the two of durable cursors are evd's own, beyond the contract
        // (docs/protocol.md, "Admin ops (evd's additions)", "Durable cursors (evd's addition)",
        // "`wait` (evd's addition)").
        let additions: Set<String> = ["invalidate", "dispose", "ack", "delete_cursor", "wait"]
        #expect(named.union(additions) == all)
        #expect(named.isDisjoint(with: additions))
    }

    @Test("a missing or ill-typed op is bad_request; an unknown one unknown_op")
    func opItself() {
        #expect(throws: EvdError.badRequest(field: "op", "missing required argument 'op'")) {
            try EvdOperation(parsing: EvdRequest(["id": 1]))
        }
        #expect(throws: EvdError.badRequest(field: "op", "'op' must be a string, not an integer")) {
            try EvdOperation(parsing: EvdRequest(["op": 3]))
        }
        #expect(throws: EvdError(.unknownOp, "unknown op 'pong'")) { try EvdOperation(parsing: EvdRequest(["op": "pong"])) }
    }

    @Test("the first problem is reported: a required argument before an unknown one, types and ranges by name")
    func argumentErrors() {
        func error(_ request: JSONObject) -> EvdError? {
            do {
                _ = try EvdOperation(parsing: EvdRequest(request))
                return nil
            } catch {
                return error
            }
        }
        #expect(error(["op": "ping", "extra": 1])?.extra["field"] == "extra")
        #expect(error(["op": "execute", "extra": 1])?.extra["field"] == "sql")
        #expect(error(["op": "execute", "sql": 1])?.message == "'sql' must be a string, not an integer")
        #expect(error(["op": "execute", "sql": "x", "params": 3])?.extra["field"] == "params")
        #expect(error(["op": "execute", "sql": "x", "params": [["a": ["b": 1]]]])?.extra["field"] == "params[0]")
        #expect(error(["op": "executemany", "sql": "x"])?.message == "missing required argument 'params'")
        #expect(error(["op": "executemany", "sql": "x", "params": [1]])?.extra["field"] == "params[0]")
        #expect(error(["op": "subscribe", "timeout_ms": 0])?.extra["field"] == "timeout_ms")
        #expect(error(["op": "subscribe", "timeout_ms": 60_001])?.extra["field"] == "timeout_ms")
        #expect(error(["op": "subscribe", "mode": "loud"])?.message == "'mode' must be one of enforce, dry_run, not 'loud'")
        #expect(error(["op": "subscribe", "since": -1])?.extra["field"] == "since")
        #expect(error(["op": "begin_twophase", "xid": ""])?.message == "'xid' must not be empty")
        #expect(error(["op": "begin_twophase", "xid": "", "x": 1])?.extra["field"] == "x")
        #expect(error(["op": "invalidate", "connection": 0])?.extra["field"] == "connection")
        #expect(error(["op": "create_token", "expires_after": 0])?.extra["field"] == "expires_after")
        #expect(error(["op": "execution_options", "options": ["query_only": 1]]) == nil)  // checked by the handler
        #expect(error(["op": "insert", "table": "sqlite_master", "rows": [["a": 1]]])?.extra["field"] == "table")
        #expect(error(["op": "reply", "seq": 1, "action": "maybe"])?.extra["field"] == "action")
        #expect(error(["op": "emit"])?.extra["field"] == "event")
    }

    @Test("execution_options: the options evd reads are checked by type and range")
    func knownOptions() {
        #expect(throws: EvdError.self) { try EvdOperation.ExecutionOptions(options: ["query_only": 1]).checkKnownOptions() }
        #expect(throws: EvdError.self) {
            try EvdOperation.ExecutionOptions(options: ["busy_timeout_ms": 600_001]).checkKnownOptions()
        }
        #expect(throws: Never.self) {
            try EvdOperation.ExecutionOptions(options: ["busy_timeout_ms": 10, "mine": "x"]).checkKnownOptions()
        }
    }
}
