import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// The size of the file at `path` in bytes (0 when it does not exist).
private func fileSize(_ path: String) -> Int {
    var info = stat()
    return stat(path, &info) == 0 ? Int(info.st_size) : 0
}

@Suite("Checkpoints")
struct CheckpointTests {
    /// `Checkpointer`: once a commit leaves more than `threshold` pages in the WAL, its own
    /// connection copies them into the database file, while the daemon runs (SQLite's own
    /// checkpoint at close would hide a checkpointer that does nothing, so this looks before).
    @Test("a WAL past the threshold is checkpointed in the background: the database file takes the rows while evd runs")
    func backgroundCheckpoint() async throws {
        try await withRunningDaemon(configure: { $0.checkpointPages = 1000 }) { daemon in
            try await daemon.withClient { evd in
                try await evd.request(.execute(.init(sql: "create table big (id integer primary key, t text)")))
                // About 1 KB a row: 6 MB, some 1500 pages of WAL, past the threshold of 1000.
                let text = JSONValue.string(String(repeating: "x", count: 1000))
                for batch in 0..<12 {
                    let rows: [JSONValue] = (1...500).map { ["id": .integer(batch * 500 + $0), "t": text] }
                    _ = try await evd.request("insert", ["table": "big", "rows": .array(rows)])
                }
            }
            var size = fileSize(daemon.databasePath)
            let deadline = ContinuousClock.now + .seconds(30)
            while size < 4_000_000 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(50))
                size = fileSize(daemon.databasePath)
            }
            #expect(size >= 4_000_000, "the database file has \(size) bytes: the WAL was not checkpointed")
        }
    }
}
