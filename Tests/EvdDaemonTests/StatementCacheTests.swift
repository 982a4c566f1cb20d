import CSQLite
import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// The statement cache (`SchemaCache.cachedStatement`, `SQLRun.prepare`): a statement is used again
/// only for an actor who holds every action, and only under the schema it was prepared under.
@Suite("Statement cache")
struct StatementCacheTests {
    @Test("a statement root's requests left cached is compiled, and judged, again for another uid and for a restricted token")
    func restrictedActorsAreJudged() async throws {
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: nobodyMayInsertInto("open"))
            $0.poolSize = 2
        }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table open(v)")))
            try await daemon.request(.execute(.init(sql: "create table closed(v)")))
            // Root's inserts and reads, many times over, on every pooled connection.
            try await withThrowingTaskGroup(of: Void.self) { group in
                for _ in 0..<2 {
                    group.addTask {
                        try await daemon.withClient { evd in
                            for _ in 0..<50 {
                                try await evd.request(.execute(.init(sql: "insert into closed values (1)")))
                                try await evd.request(.execute(.init(sql: "select count(*) from closed")))
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
            let attacker = try asNobody(
                daemon,
                [
                    execute("insert into closed values (1)"), execute("select count(*) from closed"),
                    execute("insert into open values (1)"), execute("insert into closed values (1)"),
                ]
            )
            let got = responses(try await messages(attacker))
            #expect(got[1]?["error"]?["code"] == "permission_denied", "\(String(describing: got[1]))")
            #expect(got[2]?["error"]?["code"] == "permission_denied", "\(String(describing: got[2]))")
            #expect(got[3]?["ok"] == true, "\(String(describing: got[3]))")
            #expect(got[4]?["error"]?["code"] == "permission_denied", "\(String(describing: got[4]))")

            // Root's token restricted to view-table and execute-sql: the same text, refused.
            let token = try #require(
                try await daemon.request("create_token", ["restrict_all": ["view-table", "execute-sql"]])["token"]?.stringValue
            )
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "insert into closed values (1)")))  // root: cached again
                try await evd.login(token: token)
                let error = await #expect(throws: EvdError.self) {
                    try await evd.request(.execute(.init(sql: "insert into closed values (1)")))
                }
                #expect(error?.code == "permission_denied")
                #expect(try await evd.request(.execute(.init(sql: "select count(*) from closed")))["rows"] == [[101]])
            }
        }
    }

    @Test("a statement is not used again once the schema changed: the same text sees the new columns")
    func schemaChange() async throws {
        try await withRunningDaemon(configure: { $0.poolSize = 1 }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(a)")))
                for value in 1...3 {
                    try await evd.request(.execute(.init(sql: "insert into t values (?)", params: .positional([.integer(Int64(value))]))))
                    #expect(try await evd.request(.execute(.init(sql: "select * from t order by a")))["columns"] == ["a"])
                }
                try await evd.request(.execute(.init(sql: "alter table t add column b default 'x'")))
                let error = await #expect(throws: EvdError.self) {
                    try await evd.request(.execute(.init(sql: "insert into t values (?)", params: .positional([4]))))
                }
                #expect(error?.message.contains("2 columns but 1 values") == true, "\(String(describing: error))")
                let rows = try await evd.request(.execute(.init(sql: "select * from t order by a")))
                #expect(rows["columns"] == ["a", "b"])
                #expect(rows["rows"] == [[1, "x"], [2, "x"], [3, "x"]])
                // A table dropped and made again under the same name, with other columns.
                try await evd.request(.execute(.init(sql: "drop table t")))
                try await evd.request(.execute(.init(sql: "create table t(z, a)")))
                try await evd.request(.execute(.init(sql: "insert into t(a) values (?)", params: .positional([9]))))
                #expect(try await evd.request(.execute(.init(sql: "select * from t order by a")))["rows"] == [[.null, 9]])
            }
        }
    }

    @Test("more distinct statements than the cache keeps all run right, and a read cut short leaves no snapshot open")
    func boundedAndReset() async throws {
        try await withRunningDaemon(configure: {
            $0.poolSize = 1
            $0.maxResponseBytes = 2048
        }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(id integer primary key, v)")))
                for n in 0..<(SchemaCache.maxStatements * 2) {
                    let result = try await evd.request(.execute(.init(sql: "insert into t(v) values (\(n))")))
                    #expect(result["changes"] == 1)
                }
                #expect(try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[128]])
                // A read stopped at the response bound, twice (the second from the cache): were
                // it left open, the one pooled connection would keep reading that snapshot.
                for round in 0..<2 {
                    let error = await #expect(throws: EvdError.self) {
                        try await evd.request(.execute(.init(sql: "select * from t, t")))
                    }
                    #expect(error?.code != nil)
                    let outside = try SQLiteConnection(path: daemon.databasePath, flags: SQLITE_OPEN_READWRITE)
                    try outside.exec("insert into t(v) values ('outside')")
                    let count = try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"]
                    #expect(count == [[.integer(Int64(129 + round))]], "round \(round): a stale snapshot")
                }
            }
        }
    }
}
