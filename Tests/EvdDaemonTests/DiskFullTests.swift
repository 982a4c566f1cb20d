import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A full disk (issue 18): a real daemon whose socket, database and state directory live on a
/// small tmpfs, filled up with its own writes.
///
/// What a user expects: every write evd acknowledged keeps its row and its events (live, replayed
/// with `since`, and after a restart), exactly once; a write that did not fit fails with a clear
/// error (`sql_error`, `sqlite_code` `SQLITE_FULL`) and leaves no row and no event behind; evd goes
/// on serving reads meanwhile; and once space returns, writes simply work again.
///
/// Needs root (to mount the tmpfs); skipped otherwise.
@Suite(
    "Full disk",
    .serialized,
    .enabled("needs root and a mountable tmpfs") { tmpfsMountable() }
)
struct DiskFullTests {
    /// Each row's payload: big enough that the disk fills after some dozens of inserts.
    static let payload = String(repeating: "evd-disk-full ", count: 1200)
    /// Each fill emit's padding, so that the state database's journal grows as well.
    static let padding = String(repeating: "p", count: 4096)

    @Test(
        "every acknowledged insert and emit keeps its events, a write that does not fit fails with SQLITE_FULL, and writes resume when space returns, also after a restart"
    )
    func fullDisk() async throws {
        try await withTmpfs(size: "7m") { directory in
            let fillers = [directory + "/filler-1", directory + "/filler-2"]
            // Space held back until the end: the first daemon's own shutdown may fill the disk
            // again (closing its last connection checkpoints the WAL into the database file,
            // which grows, the WAL still there), and then a restart needs room for its `-shm` files.
            let reserve = directory + "/reserve"
            #expect(FileManager.default.createFile(atPath: reserve, contents: Data(count: 2 << 20)))
            let ledger: Ledger = try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { watcher in
                    // A live subscriber all along: failed writes must not hold back later events.
                    _ = try await subscribeEvents(watcher, ["insert-rows", "test.*"], ["rows": true])
                    async let live = collectEvents(watcher, until: "test.end", within: 120)
                    let ledger = try await daemon.withClient { evd in
                        try await Self.fillAndRecover(evd, fillers: fillers)
                    }
                    Self.check(try await live, ledger, "live")
                    try await Self.checkReplayAndRows(daemon, ledger, "replay")
                    return ledger
                }
            }
            print("DiskFullTests: after the first daemon: \(describeFiles(directory))")
            // A restart on a disk still full either works or says plainly why it cannot.
            do {
                try await withDaemon(in: directory) { daemon, _ in
                    try await Self.checkReplayAndRows(daemon, ledger, "after a restart on a full disk")
                }
            } catch {
                print("DiskFullTests: a restart on a full disk: \(error)")
                #expect("\(error)".contains("No space left on device") || "\(error)".contains("disk is full"), "\(error)")
            }
            // Restarted with room on the same files: everything acknowledged is still there, once.
            #expect(unlink(reserve) == 0)
            try await withDaemon(in: directory) { daemon, _ in
                #expect(try await daemon.request("ping") == [:])
                try await Self.checkReplayAndRows(daemon, ledger, "after a restart")
                try await daemon.withClient { evd in
                    let result = try await evd.request("insert", ["table": "t", "rows": [["n": -3, "payload": "after"]]])
                    #expect(result["inserted"] == 1)
                    try await evd.request("emit", ["event": "test.after"])
                }
            }
        }
    }

    /// Fills the disk with inserts, then (with some space back) with emits, checking after each
    /// that every kind of write fails clearly and that evd still serves; then gives the rest of the
    /// space back and writes some more. Returns what was acknowledged.
    private static func fillAndRecover(_ evd: EvdConnection, fillers: [String]) async throws -> Ledger {
        var ledger = Ledger()
        try await evd.request(
            "create_table",
            ["table": "t", "pk": "n", "columns": [["name": "n", "type": "integer"], ["name": "payload", "type": "text"]]]
        )
        for _ in 0..<3 { try await ledger.write(.emit, evd) }
        // The space given back later, a filler at a time.
        for filler in fillers {
            #expect(FileManager.default.createFile(atPath: filler, contents: Data(count: 1 << 20)), "no room for \(filler)")
        }

        // Inserts, one request each, until one does not fit; then every kind of write fails.
        let rowsBefore = ledger.rows.count
        let insertFailure = try #require(try await ledger.untilFailure(.insert, evd), "the disk never filled up with inserts")
        expectDiskFull(insertFailure, "insert")
        #expect(ledger.rows.count > rowsBefore, "not even one insert fit")
        var failures = ["insert": insertFailure]
        try await Self.everyWriteFails(evd, &ledger, &failures, "with the disk filled by inserts")

        // Some space returns; emits (journaled in the state database, on the same disk) fill it.
        #expect(unlink(fillers[0]) == 0)
        let emitsBefore = ledger.emits.count
        let emitFailure = try #require(try await ledger.untilFailure(.emit, evd), "the disk never filled up with emits")
        expectDiskFull(emitFailure, "emit")
        #expect(ledger.emits.count > emitsBefore, "not even one emit fit in the space given back")
        failures["emit"] = emitFailure
        try await Self.everyWriteFails(evd, &ledger, &failures, "with the disk filled by emits")

        // The rest of the space returns: each kind of write works again, at once.
        #expect(unlink(fillers[1]) == 0)
        for kind in Ledger.Kind.allCases {
            for _ in 0..<3 { try await ledger.write(kind, evd) }
        }
        #expect(try await selectN(evd) == ledger.rows)
        try await evd.request("emit", ["event": "test.end"])
        print(
            "DiskFullTests: \(ledger.rows.count) rows and \(ledger.emits.count) emits acknowledged; failures: \(failures.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: "; "))"
        )
        return ledger
    }

    /// On a full disk: every kind of write fails with `SQLITE_FULL` (tried until it does: one may
    /// still fit in what a failed one left allocated), and evd answers pings and reads, with
    /// exactly the rows acknowledged so far.
    private static func everyWriteFails(
        _ evd: EvdConnection,
        _ ledger: inout Ledger,
        _ failures: inout [String: EvdError],
        _ when: String
    ) async throws {
        for kind in Ledger.Kind.allCases {
            let failure = try #require(try await ledger.untilFailure(kind, evd), "\(kind) never failed \(when)")
            expectDiskFull(failure, "\(kind) \(when)")
            failures["\(kind) \(when)"] = failure
        }
        #expect(try await evd.request("ping") == [:])
        #expect(try await selectN(evd) == ledger.rows, "\(when)")
    }

    /// The replay from `since: 0` holds every acknowledged insert and emit once, and the table
    /// every acknowledged row.
    private static func checkReplayAndRows(_ daemon: RunningDaemon, _ ledger: Ledger, _ what: String) async throws {
        try await daemon.withClient { evd in
            _ = try await subscribeEvents(evd, ["insert-rows", "test.*"], ["rows": true, "since": 0])
            Self.check(try await collectEvents(evd, until: "test.end", within: 120), ledger, what)
            #expect(await evd.nextMessage(ofType: "event", within: 1) == nil, "\(what): an event after test.end")
            #expect(try await selectN(evd) == ledger.rows, "\(what)")
        }
    }

    /// Events of table `t` for exactly the acknowledged rows, and `test.x` for exactly the
    /// acknowledged emits, each once, in seq order.
    private static func check(_ events: [JSONObject], _ ledger: Ledger, _ what: String) {
        let seqs = events.compactMap { $0["seq"]?.intValue }
        #expect(seqs.count == events.count && seqs == seqs.sorted() && Set(seqs).count == seqs.count, "\(what): seqs \(seqs)")
        let inserted = events.filter { $0["event"] == "insert-rows" && $0["table"] == "t" }
            .flatMap { $0["rows"]?.arrayValue ?? [] }
            .compactMap { $0["n"]?.intValue }
        #expect(inserted.sorted() == ledger.rows, "\(what): insert-rows for \(inserted), acknowledged \(ledger.rows)")
        let emitted = events.filter { $0["event"] == "test.x" }.compactMap { $0["i"]?.intValue }
        #expect(emitted == ledger.emits, "\(what): test.x for \(emitted), acknowledged \(ledger.emits)")
        #expect(events.filter { $0["event"] == "test.end" }.count == 1, "\(what)")
    }
}

/// The writes evd acknowledged.
private struct Ledger: Sendable {
    /// The kinds of write: a structured `insert`, a raw `execute` INSERT, an explicit transaction
    /// (`begin`, an INSERT, `commit`), and an `emit` (journaled in the state database).
    enum Kind: CaseIterable, CustomStringConvertible {
        case insert, raw, transaction, emit
        var description: String {
            switch self {
            case .insert: "insert"
            case .raw: "execute"
            case .transaction: "transaction"
            case .emit: "emit"
            }
        }
    }

    /// The `n` of every acknowledged row, rising.
    private(set) var rows: [Int64] = []
    /// The `i` of every acknowledged `test.x` emit, rising.
    private(set) var emits: [Int64] = []
    /// Every write tried, acknowledged or not, gets a number of its own (so a failed one's could
    /// never be mistaken for a later one's).
    private var tried: Int64 = 0

    /// One write that must succeed.
    mutating func write(_ kind: Kind, _ evd: EvdConnection) async throws {
        if let error = try await self.attempt(kind, evd) { Issue.record("\(kind): \(error)") }
    }

    /// Writes until one fails (its error), at most a few thousand times (nil: none failed).
    mutating func untilFailure(_ kind: Kind, _ evd: EvdConnection) async throws -> EvdError? {
        for _ in 0..<5000 {
            if let error = try await self.attempt(kind, evd) { return error }
        }
        return nil
    }

    /// One write: nil and recorded if acknowledged, else its error.
    private mutating func attempt(_ kind: Kind, _ evd: EvdConnection) async throws -> EvdError? {
        let number = self.tried
        self.tried += 1
        let row: JSONValue = .array([.int(number), .string(DiskFullTests.payload)])
        let insert = "insert into t(n, payload) values (?, ?)"
        do {
            switch kind {
            case .insert:
                let result = try await evd.request(
                    "insert",
                    ["table": "t", "rows": [["n": .int(number), "payload": .string(DiskFullTests.payload)]]]
                )
                #expect(result["inserted"] == 1)
            case .raw:
                let result = try await evd.request("execute", ["sql": .string(insert), "params": row])
                #expect(result["changes"] == 1)
            case .transaction:
                try await evd.request("begin")
                do {
                    try await evd.request("execute", ["sql": .string(insert), "params": row])
                    try await evd.request("commit")
                } catch let error as EvdError {
                    // Either the transaction is still open and the client rolls it back, or SQLite
                    // ended it (SQLITE_FULL in a COMMIT does) and the error said so.
                    do {
                        try await evd.request("rollback")
                    } catch let rollback as EvdError {
                        #expect(rollback.code == "not_in_transaction", "rollback after \(error): \(rollback)")
                        #expect(
                            error.message.contains("no longer in a transaction"),
                            "the transaction ended, but its error did not say so: \(error)"
                        )
                    }
                    throw error
                }
            case .emit:
                let result = try await evd.request(
                    "emit",
                    ["event": "test.x", "data": ["i": .int(number), "padding": .string(DiskFullTests.padding)]]
                )
                #expect(result["seq"]?.intValue != nil)
            }
        } catch let error as EvdError {
            return error
        }
        if kind == .emit { self.emits.append(number) } else { self.rows.append(number) }
        return nil
    }
}

/// What a write that does not fit must answer: a protocol error a user can act on.
private func expectDiskFull(_ error: EvdError, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(error.code == "sql_error", "\(what): \(error)", sourceLocation: sourceLocation)
    #expect(error.extra["sqlite_code"] == "SQLITE_FULL", "\(what): \(error)", sourceLocation: sourceLocation)
    #expect(error.message.contains("full"), "\(what): \(error)", sourceLocation: sourceLocation)
}

/// Every `n` in table `t`, rising.
private func selectN(_ evd: EvdConnection) async throws -> [Int64] {
    let result = try await evd.request(.execute(.init(sql: "select n from t order by n")))
    return (result["rows"]?.arrayValue ?? []).compactMap { $0.arrayValue?.first?.intValue }
}

/// Whether this process may mount a tmpfs: root, and the kernel lets it (not in every container).
private func tmpfsMountable() -> Bool {
    guard geteuid() == 0 else { return false }
    var template = Array("/tmp/evd-tmpfs-probe-XXXXXX".utf8CString)
    guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else { return false }
    let path = String(cString: made)
    defer { rmdir(path) }
    guard mount("tmpfs", path, "tmpfs", 0, "size=64k") == 0 else { return false }
    umount2(path, Int32(MNT_DETACH))
    return true
}

/// A tmpfs of `size` (`mount -o size=`) on a fresh directory for `body`; unmounted afterwards
/// (lazily: whatever still holds a file in it cannot keep it mounted), even if `body` throws.
private func withTmpfs<T>(size: String, _ body: (String) async throws -> T) async throws -> T {
    try await withTemporaryDirectory { directory in
        guard mount("tmpfs", directory, "tmpfs", 0, "size=\(size),mode=0700") == 0 else {
            throw RawUnixSocket.Failure(description: "mount tmpfs on \(directory): \(String(cString: strerror(errno)))")
        }
        defer { umount2(directory, Int32(MNT_DETACH)) }
        return try await body(directory)
    }
}

/// The files under `directory` with their sizes, and the free space of its file system.
private func describeFiles(_ directory: String) -> String {
    var free = statvfs()
    statvfs(directory, &free)
    let files = (FileManager.default.subpaths(atPath: directory) ?? []).sorted().map { path in
        let size = (try? FileManager.default.attributesOfItem(atPath: directory + "/" + path)[.size] as? Int) ?? 0
        return "\(path) \(size)"
    }
    return "free \(Int(free.f_bavail) * Int(free.f_bsize)); " + files.joined(separator: ", ")
}
