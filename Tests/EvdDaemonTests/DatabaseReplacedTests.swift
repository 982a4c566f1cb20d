import CSQLite
import EvdClient
import Foundation
import InMemoryLogging
import Logging
import Testing

@testable import EvdDaemon

/// Makes a SQLite file at `path` (rollback journal: one file) with a table `t` of one row, and
/// returns its bytes.
private func makeOtherDatabase(_ path: String) throws -> Data {
    do {
        let sqlite = try SQLiteConnection(path: path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
        try sqlite.exec("create table t(x); insert into t values ('theirs')")
    }
    return try Data(contentsOf: URL(fileURLWithPath: path))
}

/// The rows of `t` in the SQLite file at `path`, read from a copy in a directory of its own (so
/// that no `-wal` of the daemon's database is paired with it).
private func rowsOfCopy(_ path: String, in directory: String) throws -> Int64? {
    let copy = directory + "/copy-\(UUID().uuidString).db"
    try FileManager.default.copyItem(atPath: path, toPath: copy)
    let sqlite = try SQLiteConnection(path: copy, flags: SQLITE_OPEN_READONLY)
    return try sqlite.scalarInt("select count(*) from t")
}

/// Expects `error` to be the refusal of a lost database: `sql_error`, `SQLITE_READONLY_DBMOVED`.
private func expectMoved(_ error: EvdError, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(error.code == "sql_error", sourceLocation: sourceLocation)
    #expect(error.extra["sqlite_code"]?.stringValue == "SQLITE_READONLY_DBMOVED", sourceLocation: sourceLocation)
    #expect(
        error.message.contains("deleted or replaced") || error.message.contains("was deleted")
            || error.message.contains("was replaced"),
        sourceLocation: sourceLocation
    )
}

private func remove(databaseAt path: String) {
    for suffix in ["", "-wal", "-shm", "-journal"] { unlink(path + suffix) }
}

@Suite("A database file deleted or replaced under a running daemon")
struct DatabaseReplacedTests {
    @Test("rm main.db*: writes and reads fail with SQLITE_READONLY_DBMOVED, even on a pooled connection; nothing is created")
    func deleted() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                // An idle pooled connection is open on the file now.
                let before = try await evd.request("stats")
                #expect((before["pools"]?["main"]?["idle"]?.intValue ?? 0) >= 1)
                #expect(before["pools"]?["main"]?["lost"] == false)

                remove(databaseAt: daemon.databasePath)
                expectMoved(try await evd.expectError("execute", ["sql": "insert into t values (2)"]))
                expectMoved(try await evd.expectError("execute", ["sql": "update t set x = 3"]))
                expectMoved(try await evd.expectError("insert", ["table": "t", "rows": [["x": 4]]]))
                expectMoved(try await evd.expectError("execute", ["sql": "select count(*) from t"]))
                expectMoved(try await evd.expectError("begin"))

                // Nothing new at the path: no file was created, no WAL paired with one.
                for suffix in ["", "-wal", "-shm"] {
                    #expect(!FileManager.default.fileExists(atPath: daemon.databasePath + suffix))
                }
                let after = try await evd.request("stats")
                #expect(after["pools"]?["main"]?["lost"] == true)
                #expect(after["pools"]?["main"]?["idle"] == 0)
                #expect(after["pools"]?["main"]?["open"] == 0)
                // One connection keeps the deleted file open, never used: its owner can still copy it from /proc.
                let descriptors = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")
                let kept = descriptors.contains { fd in
                    (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/" + fd))
                        == daemon.databasePath + " (deleted)"
                }
                #expect(kept)
                // The daemon itself goes on.
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test("another file renamed over main.db: writes are refused and the new file is left untouched")
    func replaced() async throws {
        try await withTemporaryDirectory { directory in
            let bytes = try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(x)")))
                    try await evd.request(.execute(.init(sql: "insert into t values ('ours')")))

                    let other = daemon.directory + "/other.db"
                    let bytes = try makeOtherDatabase(other)
                    #expect(rename(other, daemon.databasePath) == 0)

                    expectMoved(try await evd.expectError("execute", ["sql": "insert into t values ('lost')"]))
                    expectMoved(try await evd.expectError("executemany", ["sql": "insert into t values (?)", "params": [[1], [2]]]))
                    expectMoved(try await evd.expectError("execute", ["sql": "select x from t"]))
                    // Other sessions are refused too.
                    try await daemon.withClient { second in
                        expectMoved(try await second.expectError("execute", ["sql": "delete from t"]))
                    }
                    #expect(try Data(contentsOf: URL(fileURLWithPath: daemon.databasePath)) == bytes)
                    #expect(try rowsOfCopy(daemon.databasePath, in: daemon.directory) == 1)
                    return bytes
                }
            }
            // The daemon stopped, its connections closed: the old WAL was not checkpointed into the new file.
            #expect(try Data(contentsOf: URL(fileURLWithPath: directory + "/main.db")) == bytes)
            #expect(try rowsOfCopy(directory + "/main.db", in: directory) == 1)
        }
    }

    @Test("a connection opened after the file was replaced is refused before it reads anything")
    func newConnectionAfterReplace() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                // The pool's only open connection is held: the next request opens a new one.
                try await evd.request("begin")
                try await evd.request(.execute(.init(sql: "insert into t values ('held')")))
                let other = daemon.directory + "/other.db"
                let bytes = try makeOtherDatabase(other)
                #expect(rename(other, daemon.databasePath) == 0)
                try await daemon.withClient { second in
                    expectMoved(try await second.expectError("execute", ["sql": "insert into t values ('new')"]))
                }
                expectMoved(try await evd.expectError("commit"))
                #expect(try Data(contentsOf: URL(fileURLWithPath: daemon.databasePath)) == bytes)
                #expect(try rowsOfCopy(daemon.databasePath, in: daemon.directory) == 1)
                let stats = try await evd.request("stats")
                #expect(stats["pools"]?["main"]?["open"] == 0)
            }
        }
    }

    @Test("with two databases, losing one leaves the other fully served")
    func otherDatabaseServed() async throws {
        try await withRunningDaemon(configure: { configuration in
            configuration.databases.append(
                DatabaseConfig(name: "second", path: SocketDirectory.parent(of: configuration.databases[0].path) + "/second.db")
            )
        }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                try await evd.request("execute", ["sql": "create table t(x)", "database": "second"])
                remove(databaseAt: daemon.databasePath)
                expectMoved(try await evd.expectError("execute", ["sql": "insert into t values (1)"]))

                try await evd.request("execute", ["sql": "insert into t values (1)", "database": "second"])
                try await evd.request("insert", ["table": "t", "rows": [["x": 2]], "database": "second"])
                try await evd.request("begin", ["database": "second"])
                try await evd.request(.execute(.init(sql: "insert into t values (3)")))
                try await evd.request("commit")
                let rows = try await evd.request("execute", ["sql": "select x from t order by x", "database": "second"])
                #expect(rows["rows"] == [[1], [2], [3]])

                let stats = try await evd.request("stats")
                #expect(stats["pools"]?["main"]?["lost"] == true)
                #expect(stats["pools"]?["second"]?["lost"] == false)
                // Still lost: it does not come back by itself.
                expectMoved(try await evd.expectError("execute", ["sql": "select 1"]))
            }
        }
    }

    @Test("BEGIN, INSERT, the file replaced, COMMIT: the commit is refused, rolled back, and not acknowledged")
    func writeInFlight() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                try await evd.request("begin")
                try await evd.request(.execute(.init(sql: "insert into t values ('in flight')")))

                let other = daemon.directory + "/other.db"
                let bytes = try makeOtherDatabase(other)
                #expect(rename(other, daemon.databasePath) == 0)

                let refused = try await evd.expectError("commit")
                expectMoved(refused)
                #expect(refused.message.contains("no longer in a transaction"))
                // The transaction is over: nothing to commit or roll back any more.
                #expect(try await evd.expectError("rollback").code == "not_in_transaction")
                #expect(try Data(contentsOf: URL(fileURLWithPath: daemon.databasePath)) == bytes)
                #expect(try rowsOfCopy(daemon.databasePath, in: daemon.directory) == 1)
            }
        }
    }

    @Test("BEGIN, the file deleted, then a statement: refused, and the transaction is rolled back")
    func statementInTransaction() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                try await evd.request("begin")
                try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                remove(databaseAt: daemon.databasePath)
                // Another session finds it lost at its checkout ...
                try await daemon.withClient { second in
                    expectMoved(try await second.expectError("execute", ["sql": "select 1"]))
                }
                // ... and this session's transaction ends at its next request.
                expectMoved(try await evd.expectError("execute", ["sql": "insert into t values (2)"]))
                #expect(try await evd.expectError("commit").code == "not_in_transaction")
            }
        }
    }

    @Test("one error is logged, not one per request, and the metric evd_database_lost says so")
    func loggedOnce() async throws {
        try await withTCPMetricsDaemon { daemon, logs, _, port in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                let before = try await parseWithPrometheusClient(
                    httpRequest(.tcp(host: "127.0.0.1", port: port), "GET /metrics").body
                )
                #expect(before.value("evd_database_lost", ["database": "main"]) == 0)

                remove(databaseAt: daemon.databasePath)
                for value in 1...3 {
                    expectMoved(try await evd.expectError("execute", ["sql": "insert into t values (?)", "params": [.int(Int64(value))]]))
                }
                let after = try await parseWithPrometheusClient(
                    httpRequest(.tcp(host: "127.0.0.1", port: port), "GET /metrics").body
                )
                #expect(after.value("evd_database_lost", ["database": "main"]) == 1)
            }
            let errors = logs.entries.filter { $0.level == .error }
            #expect(errors.count == 1)
            #expect(errors.first?.metadata["db.name"]?.description == "main")
            #expect(errors.first?.metadata["db.loss"]?.description == "deleted")
            #expect(errors.first?.metadata["db.path"]?.description == daemon.databasePath)
        }
    }

    @Test("a database path that is a symlink its owner made keeps working")
    func symlinkedPath() async throws {
        try await withTemporaryDirectory { directory in
            try FileManager.default.createDirectory(atPath: directory + "/real", withIntermediateDirectories: true)
            #expect(symlink(directory + "/real/data.db", directory + "/link.db") == 0)
            try await withDaemon(
                in: directory,
                configure: { configuration in
                    configuration.databases = [DatabaseConfig(name: "main", path: directory + "/link.db")]
                }
            ) { daemon, _ in
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(x)")))
                    for value in 1...20 {
                        try await evd.request("execute", ["sql": "insert into t values (?)", "params": [.int(Int64(value))]])
                    }
                    try await evd.request("begin")
                    try await evd.request(.execute(.init(sql: "insert into t values (21)")))
                    // Meanwhile another session needs a second connection: opened through the link too.
                    try await daemon.withClient { second in
                        try await second.request(.execute(.init(sql: "select count(*) from t")))
                    }
                    try await evd.request("commit")
                    #expect(try await evd.request(.execute(.init(sql: "select count(*) from t")))["rows"] == [[21]])
                    #expect((try await evd.request("stats")["pools"]?["main"]?["open"]?.intValue ?? 0) >= 2)
                    let stats = try await evd.request("stats")
                    #expect(stats["pools"]?["main"]?["lost"] == false)
                }
            }
        }
    }

    @Test("a two-phase transaction on a lost database cannot be prepared")
    func twoPhaseNotPrepared() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table t(x)")))
                try await evd.request("begin_twophase", ["xid": "x1"])
                try await evd.request(.execute(.init(sql: "insert into t values (1)")))
                remove(databaseAt: daemon.databasePath)
                expectMoved(try await evd.expectError("prepare_twophase", ["xid": "x1"]))
                #expect(try await evd.request("recover")["xids"] == [])
            }
        }
    }
}
