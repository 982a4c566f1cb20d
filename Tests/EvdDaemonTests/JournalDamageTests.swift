import CSQLite
import EvdClient
import Foundation
import InMemoryLogging
import Logging
import NIOPosix
import Testing

@testable import EvdDaemon

/// A journal that was damaged or lost while evd was stopped: a row whose bytes changed is never
/// replayed (notice `gap` instead, logged once), and losing the state directory sends no seq back.
@Suite("Journal damage and loss")
struct JournalDamageTests {
    /// What the damage tests journal: a table of `rows` rows, each inserted on its own (an
    /// `insert-rows` row of the journal each), then one UPDATE of all of them (a run of `rows`
    /// `update-row` events in one journal row), then an emit `test.end`. Returns the seqs of the
    /// run's events.
    private static func journalARun(_ daemon: RunningDaemon, rows: Int) async throws -> ClosedRange<Int64> {
        try await daemon.withClient { evd in
            _ = try await subscribeEvents(evd, ["update-row"])
            try await evd.request(.execute(.init(sql: "create table t(id integer primary key, v text)")))
            for n in 0..<3 { try await evd.request("execute", ["sql": .string("insert into t(v) values ('before \(n)')")]) }
            try await evd.request(
                "execute",
                [
                    "sql": .string(
                        "with recursive c(x) as (select 4 union all select x + 1 from c where x < \(rows)) insert into t(v) select 'row ' || x from c"
                    )
                ]
            )
            try await evd.request(.execute(.init(sql: "update t set v = v || ' changed'")))
            let updates = try await collectEvents(evd, until: "update-row", occurrence: rows, within: 30)
            try await evd.request("emit", ["event": "test.end"])
            let seqs = updates.compactMap { $0["seq"]?.intValue }
            return try #require(seqs.first)...#require(seqs.last)
        }
    }

    /// Every line a `since: 0` subscription to what `journalARun` made receives, through the
    /// `caught_up` notice that ends its replay, each parsed (a line that is not JSON fails the test).
    private static func replayLines(_ daemon: RunningDaemon) async throws -> [JSONObject] {
        let request = #"{"op":"subscribe","id":1,"events":["insert-rows","update-row","test.*"],"since":0}"# + "\n"
        let (bytes, _) = await plainSocketExchange(socketPath: daemon.socketPath, send: Array(request.utf8), halfClose: false) {
            $0.count > 10 && String(decoding: $0.suffix(300), as: UTF8.self).contains("\"caught_up\"") && $0.last == 0x0a
        }
        var messages: [JSONObject] = []
        for line in bytes.split(separator: 0x0a) {
            let parsed = try #require(
                try? JSONValue(parsing: Array(line)),
                "not JSON: \(String(decoding: line.prefix(200), as: UTF8.self))"
            )
            messages.append(try #require(parsed.objectValue))
        }
        return messages
    }

    /// Checks a replay of a journal whose run row was damaged: everything else replayed, the
    /// run's seqs announced as a gap and none of its events sent.
    private static func expectRunReplacedByGap(_ messages: [JSONObject], run: ClosedRange<Int64>, rows: Int) {
        let events = messages.filter { $0["type"] == "event" }
        let gaps = messages.filter { $0["type"] == "notice" && $0["code"] == "gap" }
        #expect(events.filter { $0["event"] == "insert-rows" }.count == 4)
        #expect(events.filter { $0["event"] == "update-row" }.isEmpty, "events of the damaged run were sent")
        #expect(events.last?["event"] == "test.end")
        #expect(gaps.count == 1)
        if let gap = gaps.first, let from = gap["from"]?.intValue, let to = gap["to"]?.intValue {
            // It covers the run and nothing that was replayed.
            #expect(from <= run.lowerBound && to == run.upperBound)
            #expect(events.allSatisfy { ($0["seq"]?.intValue).map { $0 < from || $0 > to } ?? false })
        }
        let seqs = events.compactMap { $0["seq"]?.intValue }
        #expect(seqs == seqs.sorted())
    }

    /// The file offset of bytes of `body` from its middle, found exactly once in `file`'s bytes.
    private static func offsetInFile(of body: [UInt8], in file: [UInt8]) -> Int? {
        for start in stride(from: body.count / 2, to: body.count - 16, by: 97) {
            let needle = Array(body[start..<(start + 16)])
            var found: [Int] = []
            file.withUnsafeBufferPointer { haystack in
                var index = 0
                while index + 16 <= haystack.count, found.count < 2 {
                    if haystack[index] == needle[0], memcmp(haystack.baseAddress! + index, needle, 16) == 0 { found.append(index) }
                    index += 1
                }
            }
            if found.count == 1 { return found[0] }
        }
        return nil
    }

    @Test("five bytes overwritten in a stored run (evd stopped): the replay sends no garbage, the run's seqs are a gap, logged once")
    func overwrittenBytes() async throws {
        try await withTemporaryDirectory { directory in
            let rows = 1000
            let run = try await withDaemon(in: directory) { daemon, _ in try await Self.journalARun(daemon, rows: rows) }
            // Into the file itself, as a disk or a stray write would: the WAL checkpointed first.
            let path = directory + "/main.db"
            let db = try SQLiteConnection(path: path, flags: SQLITE_OPEN_READWRITE)
            try db.exec("PRAGMA wal_checkpoint(TRUNCATE)")
            let statement = try #require(try db.prepare(SQLText("SELECT body FROM _evd_journal WHERE seq = \(run.upperBound)"), from: 0))
            #expect(try statement.step())
            let body = Array(statement.rawBytes(at: 0))
            statement.reset()
            var file = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
            let offset = try #require(Self.offsetInFile(of: body, in: file), "the run's bytes are not in the file")
            for index in offset..<(offset + 5) { file[index] ^= 0x5a }
            try Data(file).write(to: URL(fileURLWithPath: path))

            let logs = InMemoryLogHandler()
            try await withDaemon(in: directory, logger: Logger(label: "evd-test", factory: { _ in logs })) { daemon, _ in
                Self.expectRunReplacedByGap(try await Self.replayLines(daemon), run: run, rows: rows)
                // A second replay gets the same gap; the damage is logged once.
                Self.expectRunReplacedByGap(try await Self.replayLines(daemon), run: run, rows: rows)
                let damage = logs.entries.filter { $0.message.description.contains("journal row is damaged") }
                #expect(damage.count == 1)
                #expect(damage.first?.level == .error)
                #expect(damage.first?.metadata["row_seq"]?.description == "\(run.upperBound)")
                let journal = try await daemon.request("stats")["journal"]
                #expect(journal?["damaged_rows"] == 1)
            }
        }
    }

    @Test("a run cut to half its length: notice gap for its seqs, nothing of it sent")
    func truncatedRunAndMissingChecksum() async throws {
        try await withTemporaryDirectory { directory in
            let rows = 1000
            let run = try await withDaemon(in: directory) { daemon, _ in try await Self.journalARun(daemon, rows: rows) }
            let db = try SQLiteConnection(path: directory + "/main.db", flags: SQLITE_OPEN_READWRITE)
            try db.exec("UPDATE _evd_journal SET body = substr(body, 1, length(body) / 2) WHERE seq = \(run.upperBound)")
            try await withDaemon(in: directory) { daemon, _ in
                Self.expectRunReplacedByGap(try await Self.replayLines(daemon), run: run, rows: rows)
            }
        }
    }

    @Test(
        "a row's event count or checksum changed alone, or its checksum gone, is damage; an older evd's rows without checksums replay as before"
    )
    func countsAndOlderRows() async throws {
        try await withTemporaryDirectory { directory in
            let rows = 50
            let run = try await withDaemon(in: directory) { daemon, _ in try await Self.journalARun(daemon, rows: rows) }
            let db = try SQLiteConnection(path: directory + "/main.db", flags: SQLITE_OPEN_READWRITE)
            let crc = try #require(try db.scalarInt("SELECT crc FROM _evd_journal WHERE seq = \(run.upperBound)"))
            for change in ["events = events - 1", "crc = \(crc + 1)", "crc = NULL"] {
                try db.exec("UPDATE _evd_journal SET events = \(rows), crc = \(crc) WHERE seq = \(run.upperBound)")
                try db.exec("UPDATE _evd_journal SET \(change) WHERE seq = \(run.upperBound)")
                try await withDaemon(in: directory) { daemon, _ in
                    Self.expectRunReplacedByGap(try await Self.replayLines(daemon), run: run, rows: rows)
                }
            }
            // As an evd from before checksums left it: no `events`, no `crc`, no meta key.
            try db.exec("UPDATE _evd_journal SET events = \(rows), crc = \(crc) WHERE seq = \(run.upperBound)")
            try db.exec(
                """
                ALTER TABLE _evd_journal DROP COLUMN crc; ALTER TABLE _evd_journal DROP COLUMN events;
                DELETE FROM _evd_meta WHERE key = 'journal_unchecked_through'
                """
            )
            try await withDaemon(in: directory) { daemon, _ in
                let messages = try await Self.replayLines(daemon)
                let notices = messages.filter { $0["type"] == "notice" }
                #expect(notices.map { $0["code"] } == [.string("caught_up")], "the replay ends with caught_up alone")
                #expect(messages.filter { $0["event"] == "update-row" }.count == rows)
                #expect(messages.filter { $0["event"] == "insert-rows" }.count == 4)
                // New rows have checksums again, and are checked.
                try await daemon.request(.execute(.init(sql: "insert into t(v) values ('after')")))
            }
            let newest = try #require(try db.scalarInt("SELECT max(seq) FROM _evd_journal"))
            #expect(try db.scalarInt("SELECT crc IS NOT NULL FROM _evd_journal WHERE seq = \(newest)") == 1)
            let rowsBefore = try #require(try db.scalarInt("SELECT count(*) FROM _evd_journal WHERE seq < \(newest)"))
            #expect(try db.scalarInt("SELECT count(*) FROM _evd_journal WHERE crc IS NULL") == rowsBefore)
        }
    }

    @Test("the state directory lost, the database kept: seqs go on above every seq handed out, and the lost events are a gap")
    func stateDirectoryLost() async throws {
        try await withTemporaryDirectory { directory in
            let told: Int64 = try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    try await evd.request(.execute(.init(sql: "create table t(id integer primary key, v text)")))
                    try await evd.request(.execute(.init(sql: "insert into t(v) values ('a')")))
                    var last: Int64 = 0
                    for _ in 0..<3 { last = try #require(try await evd.request("emit", ["event": "app.x"])["seq"]?.intValue) }
                    return last
                }
            }
            try FileManager.default.removeItem(atPath: directory + "/state")
            let logs = InMemoryLogHandler()
            try await withDaemon(in: directory, logger: Logger(label: "evd-test", factory: { _ in logs })) { daemon, _ in
                #expect(logs.entries.contains { $0.level == .error && $0.message.description.contains("was lost") })
                try await daemon.withClient { evd in
                    #expect((evd.hello["seq"]?.intValue ?? 0) >= told)
                    let seq = try #require(try await evd.request("emit", ["event": "app.y"])["seq"]?.intValue)
                    #expect(seq > told)
                }
                // The database's events are all there; the emits that went with the state are a gap.
                try await daemon.withClient { evd in
                    _ = try await subscribeEvents(evd, ["insert-rows", "create-table"], ["since": 0])
                    let first = try #require(await evd.nextMessage(ofType: nil))
                    #expect(first["event"] == "create-table")
                    let second = try #require(await evd.nextMessage(ofType: nil))
                    #expect(second["event"] == "insert-rows")
                }
                try await daemon.withClient { evd in
                    _ = try await subscribeEvents(evd, ["app.*"], ["since": 0])
                    let first = try #require(await evd.nextMessage(ofType: nil))
                    #expect(first["type"] == "notice" && first["code"] == "gap")
                    #expect((first["to"]?.intValue ?? 0) >= told)
                    let next = try #require(await evd.nextMessage(ofType: nil))
                    #expect(next["event"] == "app.y")
                }
            }
        }
    }

    @Test("the state directory lost after retention pruned a database's journal: the floor kept in the database still gives notice gap")
    func floorSurvivesStateLoss() async throws {
        try await withTemporaryDirectory { directory in
            let floor: Int64 = try await withDaemon(
                in: directory,
                configure: {
                    $0.journal.keepEvents = 5
                    $0.journal.pruneIntervalMs = 20
                }
            ) { daemon, _ in
                try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, v text)")))
                for n in 0..<20 { try await daemon.request("execute", ["sql": .string("insert into t(v) values ('\(n)')")]) }
                let deadline = ContinuousClock.now + .seconds(60)
                while ContinuousClock.now < deadline {
                    // The database's own floor (logins and logouts have theirs).
                    let sources = try await daemon.request("stats")["journal"]?["sources"]?.arrayValue ?? []
                    let main = sources.first { $0["database"] == "main" }
                    if let floor = main?["floor"]?.intValue, floor > 0 { return floor }
                    try await Task.sleep(for: .milliseconds(50))
                }
                Issue.record("retention never ran")
                return 0
            }
            try FileManager.default.removeItem(atPath: directory + "/state")
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    _ = try await subscribeEvents(evd, ["insert-rows"], ["since": 0])
                    let first = try #require(await evd.nextMessage(ofType: nil))
                    #expect(first["type"] == "notice" && first["code"] == "gap")
                    #expect((first["to"]?.intValue ?? 0) >= floor)
                }
            }
        }
    }

    @Test("a raised seq lease reaches every database's _evd_meta at the next retention round, and a restart continues above it")
    func leaseRaiseReachesDatabases() async throws {
        try await withTemporaryDirectory { directory in
            let threads = NIOThreadPool(numberOfThreads: 1)
            threads.start()
            let databases = [DatabaseConfig(name: "main", path: directory + "/main.db")]
            let journal = Journal(stateDirectory: directory, databases: databases, settings: JournalSettings(), threadPool: threads)
            _ = try journal.open()
            let db = try SQLiteConnection(path: directory + "/main.db", flags: SQLITE_OPEN_READWRITE)
            let kept = { try db.scalarInt("SELECT value FROM _evd_meta WHERE key = 'seq_lease'") }
            let started = journal.lease.end
            #expect(try kept() == started)
            // Seqs reach half-way to the bound: it is raised (in the state database, on a thread of
            // its own: `settle` waits for it).
            journal.lease.cover(started - SeqLease.block / 2 + 1)
            journal.lease.settle()
            let raised = journal.lease.end
            #expect(raised > started)
            try journal.prune()
            #expect(try kept() == raised)
            journal.close()
            // Without the state database, a new journal starts above what the database kept.
            try FileManager.default.removeItem(atPath: directory + "/journal.db")
            let again = Journal(stateDirectory: directory, databases: databases, settings: JournalSettings(), threadPool: threads)
            let opening = try again.open()
            #expect(opening.stateWasLost)
            #expect(opening.head >= raised)
            again.close()
            try await threads.shutdownGracefully()
        }
    }
}
