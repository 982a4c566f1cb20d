import EvdClient
import Foundation
import Logging
import Testing

@testable import EvdDaemon

@Suite("Lifecycle")
struct LifecycleTests {
    @Test("a second daemon on a live socket refuses to start with a clear reason; the first keeps serving")
    func secondDaemonRefused() async throws {
        try await withRunningDaemon { daemon in
            var configuration = daemon.configuration
            configuration.stateDirectory = daemon.directory + "/second-state"
            configuration.databases = [DatabaseConfig(name: "main", path: daemon.directory + "/second.db")]
            let logger = Logger(label: "evd-test", factory: { _ in SwiftLogNoOpLogHandler() })
            do {
                try await Daemon(configuration: configuration, logger: logger).run()
                Issue.record("a second daemon started on a live socket")
            } catch let error as Daemon.StartupError {
                #expect(error.description == "another evd is already serving \(daemon.socketPath)")
            }
            let pong = try await daemon.request("ping")
            #expect(pong == [:])
        }
    }

    @Test("a stale socket file (nobody listening) is replaced")
    func staleSocketReplaced() async throws {
        try await withTemporaryDirectory { directory in
            // A socket file whose listener is gone: bound, then closed without unlinking.
            let path = directory + "/evd.sock"
            close(try boundUnixSocket(at: path))
            #expect(FileManager.default.fileExists(atPath: path))
            try await withDaemon(in: directory) { daemon, _ in
                let pong = try await daemon.request("ping")
                #expect(pong == [:])
            }
            // It created the socket, so it removed it on the way out.
            #expect(!FileManager.default.fileExists(atPath: path))
        }
    }

    @Test(
        "graceful shutdown: a pending veto resolves by its on_timeout at once, in-flight work finishes and commits, clients get notice shutdown"
    )
    func shutdownWithInFlightWorkAndPendingVeto() async throws {
        try await withTemporaryDirectory { directory in
            try await withDaemon(in: directory) { daemon, stop in
                try await daemon.request(.execute(.init(sql: "create table t(id integer primary key)")))
                try await daemon.withClient { listener in
                    try await listener.request(
                        "subscribe",
                        ["veto": ["before_cursor_execute"], "name": "silent", "timeout_ms": 60000, "on_timeout": "allow"]
                    )
                    try await daemon.withClient { writer in
                        let inFlight = VetoInFlight { try await writer.rawRequest("execute", ["sql": "insert into t values (1)"]) }
                        // The veto is pending: the listener never answers it.
                        _ = try #require(await listener.nextMessage(ofType: "veto", within: 20))
                        await stop()
                        // Not after 60 s: shutdown resolves it by on_timeout (allow), and the insert commits.
                        let response = try #require(try await inFlight.value(within: 20))
                        #expect(response["ok"] == true, "\(response)")
                        let notice = try #require(await writer.nextMessage(ofType: "notice", within: 20))
                        #expect(notice["code"] == "shutdown")
                    }
                }
            }
            // The next daemon finds the committed row and its journaled event.
            try await withDaemon(in: directory) { daemon, _ in
                let rows = try await daemon.request(.execute(.init(sql: "select id from t")))
                #expect(rows["rows"] == [[1]])
                let journal = try await daemon.request(.execute(.init(sql: "select event from _evd_journal where event = 'insert-rows'")))
                #expect(journal["rows"] == [["insert-rows"]])
            }
        }
    }
}
