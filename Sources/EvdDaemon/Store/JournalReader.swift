import CSQLite
import DequeModule
import EvdClient
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension Journal {
    // MARK: Reading

    /// Reads journaled events in seq order, merged from every source, for one replay.
    ///
    /// Rows are not copied: a page visits each one where SQLite keeps it (`Row`), so a replay can
    /// splice the stored bytes into its output. Between pages no statement stays open, so a
    /// replay holds no read snapshot while it waits for its client. A row may hold a run of
    /// events (`EventRun`), which a page may take only in part: the next one goes on inside it.
    ///
    /// `@unchecked Sendable`: in exclusive use: a replay uses its reader from one task, one page at
    /// a time (the task may be on another thread at each page). Debug builds check it: each page
    /// (`next`) is a use (`exclusiveUse`), and its connections check their own.
    final class Reader: @unchecked Sendable {
        /// Checks the claim of exclusive use in debug builds (nothing in release builds).
        private let exclusiveUse = ExclusiveUse("Journal.Reader")
        /// One journaled row, borrowed from SQLite: valid only while it is being visited.
        struct Row {
            /// Its first seq, and its last (the same for a row of one event).
            let first: Int64
            let seq: Int64
            /// The event's name (UTF-8).
            let name: UnsafeBufferPointer<UInt8>
            /// The event's time, unquoted.
            let time: UnsafeBufferPointer<UInt8>
            /// What `_evd_journal.body` holds: one event's body (with the row images when they
            /// were recorded), or a run packed (`isRun`).
            let stored: UnsafeBufferPointer<UInt8>
            /// The length of the body without the images, when `stored` has them.
            let plain: Int?
            /// `stored` is a run (`EventRun.packed`).
            let isRun: Bool
        }

        /// A row that failed its check (`Checksum`, or its event count): the seqs from the first
        /// not yet read (`from`; the row's own first may be damaged) through its last (`to`, or
        /// the replay's end) are announced as a gap, and nothing of it is sent.
        struct Damage: Sendable {
            /// The database whose journal holds it (`nil`: the state database's).
            let database: String?
            let from: Int64
            let to: Int64
            /// The row's own seq (its last), which names it in the log.
            let seq: Int64
        }

        private struct Cursor {
            let connection: SQLiteConnection
            let statement: SQLiteStatement
            let source: Source
            /// The last seq journaled in this source before its rows had checksums.
            let uncheckedThrough: Int64
            /// Its query has no rows left (up to `through`).
            var done = false
        }

        private var cursors: [Cursor] = []
        private var position: Int64
        private let through: Int64
        /// The damaged row the last `next` stopped at (and passed), if any.
        private(set) var damage: Damage?

        /// Reads the events with seq in `after+1 ... through`.
        init(_ journal: Journal, after: Int64, through: Int64) throws(SQLiteError) {
            self.position = after
            self.through = through
            for source in journal.sources {
                let connection = try SQLiteConnection(
                    path: source.path,
                    flags: SQLITE_OPEN_READONLY | SQLITE_OPEN_URI
                )
                // A range of the rowid: no sort, and no LIMIT needed (a page stops stepping). A
                // run's row has its last seq: one that starts by `through` may end after it.
                let sql = """
                    SELECT seq, event, time, body, plain, first, events, crc FROM _evd_journal
                    WHERE seq > ? AND seq <= ? ORDER BY seq
                    """
                guard let statement = try? connection.prepare(SQLText(sql), from: 0) else { continue }  // no journal there yet
                let unchecked =
                    (try? connection.scalarInt(
                        "SELECT value FROM \(source.metaTable) WHERE key = '\(Journal.uncheckedThroughKey)'"
                    )) ?? nil
                self.cursors.append(
                    Cursor(connection: connection, statement: statement, source: source, uncheckedThrough: unchecked ?? 0)
                )
            }
        }

        /// Visits the next events in seq order, at most `limit`; returns how many it visited (0
        /// when the replay is complete). `visit` is given a row and the seqs of it to take, in
        /// order, at most `budget` of them; it returns how many it took, from `from` on.
        ///
        /// A damaged row ends the visit before it; the next call passes it, visiting nothing:
        /// `damage` says which seqs it held, and the count returned covers them.
        func next(
            limit: Int,
            _ visit: (_ row: Row, _ from: Int64, _ to: Int64, _ budget: Int) -> Int
        ) throws(SQLiteError) -> Int {
            let entered = self.exclusiveUse.enter()
            defer { self.exclusiveUse.leave(entered) }
            self.damage = nil
            // Each source that has rows left is positioned on its first row after the position.
            var live: [Int] = []
            defer { for index in live { self.cursors[index].statement.reset() } }
            let bound = self.through > Int64.max - Int64(Journal.maxRunEvents) ? Int64.max : self.through + Int64(Journal.maxRunEvents)
            for index in self.cursors.indices where !self.cursors[index].done {
                let statement = self.cursors[index].statement
                statement.reset()
                try statement.bind(int: self.position, at: 1)
                try statement.bind(int: bound, at: 2)
                live.append(index)
                if try !statement.step() { self.cursors[index].done = true }
            }
            var visited = 0
            while visited < limit {
                // The source whose current row has the lowest seq (mostly there is only one). Runs
                // never overlap: the seqs of one are a transaction's, consecutive.
                var chosen: SQLiteStatement?
                var chosenIndex = 0
                var seq = Int64.max
                for index in live where !self.cursors[index].done {
                    let statement = self.cursors[index].statement
                    let candidate = statement.int(at: 0)
                    if candidate < seq {
                        seq = candidate
                        chosen = statement
                        chosenIndex = index
                    }
                }
                guard let statement = chosen else { break }
                // NULL reads as 0, which is no seq.
                let runFirst = statement.int(at: 5)
                guard Self.isIntact(statement, seq: seq, uncheckedThrough: self.cursors[chosenIndex].uncheckedThrough) else {
                    // Its first seq as stored (which may be damaged too): a row that ends after the
                    // replay and says it starts after it too is left to live delivery's side.
                    let stated = runFirst > 0 && runFirst <= seq ? runFirst : seq
                    if seq > self.through && stated > self.through {
                        self.cursors[chosenIndex].done = true
                        continue
                    }
                    guard visited == 0 else { break }  // this page ends before it
                    // Its seqs from the first not yet read: no other row lies between (this one has
                    // the lowest seq left, and runs never interleave), and its own `first` cannot
                    // be trusted. Never past `through`.
                    let from = self.position + 1
                    let to = min(seq, self.through)
                    self.damage = Damage(database: self.cursors[chosenIndex].source.database, from: from, to: to, seq: seq)
                    self.position = to
                    if seq > self.through {
                        self.cursors[chosenIndex].done = true
                    } else if try !statement.step() {
                        self.cursors[chosenIndex].done = true
                    }
                    return Int(to - from + 1)
                }
                let first = runFirst > 0 ? min(runFirst, seq) : seq
                guard first <= self.through else {
                    self.cursors[chosenIndex].done = true
                    continue
                }
                let stored = statement.rawBytes(at: 3)
                var plain: Int?
                // NULL reads as 0, which is no length.
                if case let length = Int(statement.int(at: 4)), length >= 2, length <= stored.count { plain = length }
                let row = Row(
                    first: first,
                    seq: seq,
                    name: statement.rawBytes(at: 1),
                    time: statement.rawBytes(at: 2),
                    stored: stored,
                    plain: plain,
                    isRun: runFirst > 0
                )
                let from = max(first, self.position + 1)
                let to = min(seq, self.through)
                let taken = from > to ? 0 : min(visit(row, from, to, limit - visited), Int(to - from + 1))
                visited += taken
                if taken > 0 { self.position = from + Int64(taken) - 1 }
                if from + Int64(taken) <= to { break }  // the page is full inside the row
                if seq > self.through {
                    self.cursors[chosenIndex].done = true
                } else if try !statement.step() {
                    self.cursors[chosenIndex].done = true
                }
            }
            return visited
        }

        /// Whether the row `statement` is on holds what evd wrote: its checksum matches and its
        /// event count fits its seqs. A row without a checksum passes only when an older evd wrote
        /// it (at or below `uncheckedThrough`).
        private static func isIntact(_ statement: SQLiteStatement, seq: Int64, uncheckedThrough: Int64) -> Bool {
            guard !statement.isNull(at: 7) else { return seq <= uncheckedThrough }
            let first = statement.int(at: 5)
            let events = statement.int(at: 6)
            guard events == (first > 0 ? seq - first + 1 : 1) else { return false }
            let expected = Checksum.of(
                seq: seq,
                first: first,
                events: events,
                plain: statement.int(at: 4),
                name: UnsafeRawBufferPointer(statement.rawBytes(at: 1)),
                time: UnsafeRawBufferPointer(statement.rawBytes(at: 2)),
                body: UnsafeRawBufferPointer(statement.rawBytes(at: 3))
            )
            return expected == statement.int(at: 7)
        }
    }
}
