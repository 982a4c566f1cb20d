import CSQLite
import DequeModule
import EvdClient
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension Journal {
    /// How much the journal holds, for `stats` and `/metrics`: a snapshot of `RunningFigures`.
    struct Figures: Sendable {
        /// One source's share: the state database's journal (`database` nil) or a database's.
        struct Source: Sendable {
            let database: String?
            let path: String
            var events = 0
            var bytes = 0
            var firstSeq: Int64?
            var lastSeq: Int64?
            /// The lowest floor of its retention windows: what it holds lies above it.
            var floor: Int64 = 0
        }

        var sources: [Source] = []
        /// The highest seq retention may have removed.
        var floor: Int64 = 0
        /// The damaged rows replays found since evd started (`Journal.noteDamage`).
        var damagedRows = 0

        var events: Int { self.sources.reduce(0) { $0 + $1.events } }
        var bytes: Int { self.sources.reduce(0) { $0 + $1.bytes } }
        var firstSeq: Int64? { self.sources.compactMap(\.firstSeq).min() }
        var lastSeq: Int64? { self.sources.compactMap(\.lastSeq).max() }

        /// The `journal` object of `stats`.
        func jsonValue(enabled: Bool) -> JSONValue {
            func seq(_ value: Int64?) -> JSONValue { value.map(JSONValue.int) ?? .null }
            return [
                "enabled": .bool(enabled),
                "events": .integer(self.events),
                "bytes": .integer(self.bytes),
                "first_seq": seq(self.firstSeq),
                "last_seq": seq(self.lastSeq),
                "floor": .int(self.floor),
                "damaged_rows": .integer(self.damagedRows),
                "sources": .array(
                    self.sources.map { source in
                        [
                            "database": source.database.map(JSONValue.string) ?? .null,
                            "path": .string(source.path),
                            "events": .integer(source.events),
                            "bytes": .integer(source.bytes),
                            "first_seq": seq(source.firstSeq),
                            "last_seq": seq(source.lastSeq),
                            "floor": .int(source.floor),
                        ]
                    }
                ),
            ]
        }
    }

    /// The journal's figures, kept up to date as events are journaled and as retention raises the
    /// floor, so that `stats` and a Prometheus scrape read them instead of counting.
    ///
    /// **Why not count when asked.** Counting walks every row of every journal table (and `dbstat`
    /// every page): with a million events a scrape cost a good part of a second of CPU, and anyone
    /// who can reach the metrics endpoint may scrape as often as they like. So the journal is
    /// walked once, at start (`load`), and from then on each COMMIT that journals events adds them
    /// (`add`: a short lock, no I/O), and each snapshot first drops what lies at or below each
    /// retention window's floor (`figures`): retention deletes exactly a window's rows whose seq is
    /// at or below its floor.
    ///
    /// **How.** Each window's events (a database's, the logins and logouts, the state database's
    /// others) are kept as stretches of seqs with their number of events and bytes: a commit whose
    /// seqs follow the last stretch's extends it, any other starts a new one.
    /// While a source has at most `maxStretches` stretches the figures are exact; past that,
    /// neighbouring stretches are merged into ones of at most about 1/2048 of what the source holds
    /// (`compact`), so memory stays bounded (a few hundred KiB per source) and a stretch the floor
    /// cuts through, whose share above the floor is then estimated, is off by at most that much.
    /// The bytes are those of the rows' stored body, event name and time (SQLite's own overhead per
    /// row and page not counted): the size of what the journal holds, not of the file it shares
    /// with the user's tables.
    final class RunningFigures: Sendable {
        /// Seqs of one source, with the events and bytes journaled in them.
        struct Stretch {
            var first: Int64
            var last: Int64
            var events: Int
            var bytes: Int

            /// Takes `other`'s events in (the two never share a seq).
            mutating func absorb(_ other: Stretch) {
                self.first = min(self.first, other.first)
                self.last = max(self.last, other.last)
                self.events += other.events
                self.bytes += other.bytes
            }
        }

        /// The stretches a source keeps before they are compacted.
        static let maxStretches = 8192

        /// Each retention window's stretches, oldest first.
        private let stretches = Mutex<[Window: Deque<Stretch>]>([:])

        init() {}

        /// Adds `count` events of `window` with consecutive seqs from `first`, journaled by a
        /// COMMIT that succeeded.
        func add(_ window: Window, first: Int64, count: Int, bytes: Int) {
            guard count > 0 else { return }
            let stretch = Stretch(first: first, last: first + Int64(count) - 1, events: count, bytes: bytes)
            self.stretches.withLock { all in
                var stretches = all.removeValue(forKey: window) ?? []
                Self.add(stretch, to: &stretches)
                all[window] = stretches
            }
        }

        /// Adds the state database's `entries`, with consecutive seqs from `first`, each to its
        /// window (logins and logouts, or the others), a run of one window at a time.
        func addState(_ entries: [JournalEntry], first: Int64, timeBytes: Int) {
            var start = 0
            while start < entries.count {
                let window = Window.of(stateEvent: entries[start].name)
                var end = start + 1
                while end < entries.count && Window.of(stateEvent: entries[end].name) == window { end += 1 }
                let bytes = entries[start..<end].reduce(0) { $0 + Self.bytes(of: $1, timeBytes: timeBytes) }
                self.add(window, first: first + Int64(start), count: end - start, bytes: bytes)
                start = end
            }
        }

        private static func add(_ new: Stretch, to stretches: inout Deque<Stretch>) {
            if let tail = stretches.last, new.first <= tail.last + 1 {
                if new.first == tail.last + 1 {
                    stretches[stretches.count - 1].absorb(new)
                } else {
                    // Commits of one database end in seq order, but their figures may arrive a
                    // little out of it (each is added after its COMMIT, outside the write lock):
                    // the stretch that reaches to it takes it.
                    var index = stretches.count - 1
                    while index > 0 && stretches[index].first > new.last { index -= 1 }
                    stretches[index].absorb(new)
                }
            } else {
                stretches.append(new)
            }
            if stretches.count > Self.maxStretches + Self.maxStretches / 8 { Self.compact(&stretches) }
        }

        /// Merges neighbouring stretches while together they hold at most 4/`maxStretches` of the
        /// source's events: at most about `maxStretches / 2` are left. Runs once per
        /// `maxStretches / 8` new stretches at most.
        private static func compact(_ stretches: inout Deque<Stretch>) {
            let total = stretches.reduce(0) { $0 + $1.events }
            let target = max(1, 4 * total / Self.maxStretches)
            var merged: Deque<Stretch> = []
            merged.reserveCapacity(Self.maxStretches / 2 + 1)
            for stretch in stretches {
                if let last = merged.last, last.events + stretch.events <= target {
                    merged[merged.count - 1].absorb(stretch)
                } else {
                    merged.append(stretch)
                }
            }
            stretches = merged
        }

        /// The figures now, each window's events at or below its floor dropped (from the running
        /// figures too); `floor`: the highest of them, as `stats` shows it.
        func figures(of journal: Journal, floor: Int64) -> Figures {
            var figures = Figures(floor: floor, damagedRows: journal.damagedRowCount)
            let floors = journal.windowFloors
            self.stretches.withLock { all in
                for source in journal.sources {
                    var measured = Figures.Source(database: source.database, path: source.path)
                    measured.floor = source.windows.map { floors[$0] ?? floor }.min() ?? floor
                    for window in source.windows {
                        guard var stretches = all.removeValue(forKey: window) else { continue }
                        Self.cut(&stretches, at: floors[window] ?? floor)
                        for stretch in stretches {
                            measured.events += stretch.events
                            measured.bytes += stretch.bytes
                            measured.firstSeq = min(measured.firstSeq ?? stretch.first, stretch.first)
                            measured.lastSeq = max(measured.lastSeq ?? stretch.last, stretch.last)
                        }
                        all[window] = stretches
                    }
                    figures.sources.append(measured)
                }
            }
            return figures
        }

        /// The seq of the newest event older than the newest `count` events of `window` above
        /// `floor` (0 when it holds no more than `count`), when the figures know it exactly: the
        /// stretch it falls in has consecutive seqs, every one an event (`nil`: they do not, e.g.
        /// in a stretch compaction merged across a gap; then the rows must be walked). Walks the
        /// stretches from the newest: at most a few thousand, where the rows are up to millions.
        func seqBeforeNewest(_ count: Int, of window: Window, above floor: Int64) -> Int64? {
            self.stretches.withLock { all -> Int64? in
                guard var stretches = all[window] else { return 0 }
                Self.cut(&stretches, at: floor)
                var kept = 0
                for stretch in stretches.reversed() {
                    if kept + stretch.events > count {
                        guard Int64(stretch.events) == stretch.last - stretch.first + 1 else { return nil }
                        return stretch.last - Int64(count - kept)
                    }
                    kept += stretch.events
                }
                return 0
            }
        }

        /// Drops the stretches at or below `floor` and keeps the share above it of one it cuts
        /// through: exact when its seqs are consecutive, else in proportion to the seqs kept.
        private static func cut(_ stretches: inout Deque<Stretch>, at floor: Int64) {
            while let first = stretches.first, first.last <= floor { stretches.removeFirst() }
            // Out-of-order arrivals may leave stretches overlapping a little: look past the first.
            for index in stretches.indices {
                guard stretches[index].first <= floor else { break }
                let stretch = stretches[index]
                let width = stretch.last - stretch.first + 1
                let kept = stretch.last - floor
                stretches[index].events = Int((Int64(stretch.events) * kept + width - 1) / width)
                stretches[index].bytes = Int((Int64(stretch.bytes) * kept + width - 1) / width)
                stretches[index].first = floor + 1
            }
        }

        /// Counts what each of `journal`'s windows holds above its floor, a row at a time, at start
        /// (before any event is added), on a read-only connection of its own. Blocking (run it on
        /// the thread pool): the one walk of the journal tables evd makes.
        func load(_ journal: Journal) {
            // A run's row holds the events from `first` to `seq`; the floor may cut through one.
            let sql = """
                SELECT max(CASE WHEN first > 0 THEN first ELSE seq END, ?1), seq,
                  length(body) + length(event) + length(time), event
                FROM _evd_journal WHERE seq >= ?1 ORDER BY seq
                """
            let floors = journal.windowFloors
            var loaded: [Window: Deque<Stretch>] = [:]
            for source in journal.sources {
                let floor = source.windows.map { floors[$0] ?? journal.floor }.min() ?? journal.floor
                do throws(SQLiteError) {
                    let connection = try SQLiteConnection(path: source.path, flags: SQLITE_OPEN_READONLY | SQLITE_OPEN_URI)
                    connection.setBusyTimeout(milliseconds: 5000)
                    if let statement = try connection.prepare(SQLText(sql), from: 0) {
                        try statement.bind(int: floor + 1, at: 1)
                        while try statement.step() {
                            let first = statement.int(at: 0)
                            let last = statement.int(at: 1)
                            let window =
                                source.database.map { Window.database($0) }
                                ?? Window.of(stateEvent: statement.column(3).stringValue ?? "")
                            Self.add(
                                Stretch(first: first, last: last, events: Int(last - first + 1), bytes: Int(statement.int(at: 2))),
                                to: &loaded[window, default: []]
                            )
                        }
                    }
                } catch {
                    // No journal table there (yet): it holds nothing.
                }
            }
            // At start, before the daemon serves anyone: nothing has been added yet.
            self.stretches.withLock { $0 = loaded }
        }

        /// The bytes a journal row keeps for each of `publications` (about: a run's packed
        /// form is counted as its parts), with its event name and `timeBytes` of time.
        static func bytes(of publications: [Publication], timeBytes: Int) -> Int {
            var total = 0
            for publication in publications {
                switch publication {
                case .entry(let entry):
                    total += Self.bytes(of: entry, timeBytes: timeBytes)
                case .run(let run):
                    total +=
                        run.common.count + run.tails.count + run.images.count + 3 * run.count
                        + run.kind.name.utf8.count + timeBytes
                case .unwanted:
                    break
                }
            }
            return total
        }

        /// The bytes a journal row keeps for `entry`.
        static func bytes(of entry: JournalEntry, timeBytes: Int) -> Int {
            (entry.imagesBody ?? entry.body).count + entry.name.utf8.count + timeBytes
        }
    }
}
