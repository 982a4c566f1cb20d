import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// A query that never ends on its own.
private let endless = "with recursive r(n) as (select 1 union all select n + 1 from r) select count(*) from r"

private func sqlUser(_ configuration: inout EvdConfiguration) {
    openUp(&configuration, grants: [Grant(who: .uid(65534), actions: [.executeSQL, .viewTable, .insertRow, .subscribe], database: "main")])
}

private func inUse(_ stats: JSONObject) -> Int64? { stats["pools"]?["main"]?["in_use"]?.intValue }

/// Issue 17's "the pool can be held hostage": a user with execute-sql (or less) must not be able
/// to keep pooled connections, or the daemon, from everyone else.
@Suite("Pool hostage (another uid)")
struct PoolHostageTests {
    @Test("a statement that runs past --max-statement-ms is interrupted with timeout; others are served meanwhile")
    func statementTimeLimit() async throws {
        try await withRunningDaemon(configure: {
            sqlUser(&$0)
            $0.maxStatementMs = 300
            $0.poolSize = 2
        }) { daemon in
            let attacker = try asNobody(daemon, [execute(endless)], linger: 30)
            #expect(try await daemon.request(.execute(.init(sql: "select 1")))["rows"] == [[1]])
            let got = responses(try await messages(attacker))
            #expect(got[1]?["error"]?["code"] == "timeout", "\(String(describing: got[1]))")
            #expect(got[1]?["error"]?["limit"] == "max-statement-ms")
        }
    }

    @Test("a client that goes away leaves no statement running on its pooled connection")
    func disconnectInterrupts() async throws {
        try await withRunningDaemon(configure: {
            sqlUser(&$0)
            $0.maxStatementMs = 0
            $0.poolSize = 1
            $0.checkoutTimeoutMs = 10_000
        }) { daemon in
            // The client gives up after a second and exits, its query still running.
            let attacker = try Spawned(
                "/usr/bin/setpriv",
                [
                    "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", otherUserClient, daemon.socketPath,
                    String(decoding: JSONValue.array([.object(execute(endless))]).jsonBytes, as: UTF8.self), "", "1",
                ]
            )
            _ = try await attacker.finish(within: 30)
            #expect(try await daemon.request(.execute(.init(sql: "select 1")))["rows"] == [[1]])
        }
    }

    @Test("stopping the daemon interrupts what still runs after the grace period")
    func shutdownInterrupts() async throws {
        try await withStoppableDaemon(configure: {
            sqlUser(&$0)
            $0.maxStatementMs = 0
            $0.shutdownGraceMs = 200
        }) {
            daemon,
            stop in
            let attacker = try asNobody(daemon, [execute(endless)], linger: 60)
            try await waitForStats(daemon) { inUse($0) == 1 }
            // (Without the interrupt, this waits for the query forever.)
            await stop()
            let got = responses(try await messages(attacker))
            #expect(got[1]?["error"]?["code"] == "shutting_down", "\(String(describing: got[1]))")
        }
    }

    @Test("one uid cannot hold the whole pool: its share is the pool less one (--max-pool-share)")
    func poolShare() async throws {
        try await withRunningDaemon(configure: {
            sqlUser(&$0)
            $0.poolSize = 2
            $0.checkoutTimeoutMs = 2000
        }) { daemon in
            let first = try asNobody(
                daemon,
                [["op": "begin"], ["op": "subscribe", "events": ["app.stop"]]],
                until: "app.stop",
                linger: 30
            )
            try await waitForStats(daemon) { inUse($0) == 1 }
            let second = try asNobody(daemon, [["op": "begin"]], linger: 30)
            // Root still gets the pool's other connection, while nobody's second begin waits.
            #expect(try await daemon.request(.execute(.init(sql: "select 1")))["rows"] == [[1]])
            let got = responses(try await messages(second))
            #expect(got[1]?["error"]?["code"] == "timeout", "\(String(describing: got[1]))")
            #expect(got[1]?["error"]?["message"]?.stringValue?.contains("--max-pool-share") == true)
            try await daemon.request("emit", ["event": "app.stop"])
            _ = try await messages(first)
        }
    }

    @Test("a transaction idle past --idle-transaction-ms is rolled back and its session closed")
    func idleTransaction() async throws {
        try await withRunningDaemon(configure: {
            sqlUser(&$0)
            $0.idleTransactionMs = 1500
        }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(x)")))
            let idle = try asNobody(
                daemon,
                [["op": "begin"], execute("insert into t values (1)")],
                until: "never",
                linger: 30
            )
            let got = try await messages(idle)
            let notices = got.filter { $0["type"] == "notice" }.map { $0["code"] }
            #expect(notices.contains("idle_transaction_timeout"), "\(got)")
            try await waitForStats(daemon) { stats in inUse(stats) == 0 }
            #expect(try await daemon.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[0]])
        }
    }
}
