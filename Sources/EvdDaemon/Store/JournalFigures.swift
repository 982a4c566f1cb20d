#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSQLite
import EvdClient

extension Journal {
    /// How much the journal holds, for `stats` and `/metrics`: measured when asked, never kept
    /// up to date on the write path.
    struct Figures: Sendable {
        /// One source's share: the state database's journal (`database` nil) or a database's.
        struct Source: Sendable {
            let database: String?
            let path: String
            var events = 0
            var bytes = 0
            var firstSeq: Int64?
            var lastSeq: Int64?
        }

        var sources: [Source] = []
        /// The highest seq retention may have removed.
        var floor: Int64 = 0

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
                "sources": .array(
                    self.sources.map { source in
                        [
                            "database": source.database.map(JSONValue.string) ?? .null,
                            "path": .string(source.path),
                            "events": .integer(source.events),
                            "bytes": .integer(source.bytes),
                            "first_seq": seq(source.firstSeq),
                            "last_seq": seq(source.lastSeq),
                        ]
                    }),
            ]
        }
    }

    /// Counts the journaled events of every source, their lowest and highest seq, and the bytes
    /// they take on disk: the state database's files (`journal.db` and its WAL) whole, and in each
    /// database the pages of `_evd_journal` (SQLite's `dbstat`, which shares the file with the
    /// user's tables).
    ///
    /// Blocking (run it on the thread pool). Each source is read on a connection of its own,
    /// read-only and short-lived, as a replay does: writers are never held up. The count walks
    /// the journal table's rows (a run's counts all its events); the seqs are two rowid lookups.
    func measure() -> Figures {
        var figures = Figures(floor: self.floor)
        for source in self.sources {
            var measured = Figures.Source(database: source.database, path: source.path)
            if source.database == nil {
                measured.bytes = Self.fileSize(source.path) + Self.fileSize(source.path + "-wal")
            }
            if let connection = try? SQLiteConnection(path: source.path, flags: SQLITE_OPEN_READONLY | SQLITE_OPEN_URI) {
                connection.setBusyTimeout(milliseconds: 1000)
                // No journal table there yet (a database created after start-up): nothing held.
                // A row holds one event, or a run of them from `first` to `seq`.
                if let count = try? connection.scalarInt(
                    "SELECT coalesce(sum(CASE WHEN first > 0 THEN seq - first + 1 ELSE 1 END), 0) FROM _evd_journal")
                {
                    measured.events = Int(count)
                    measured.firstSeq = try? connection.scalarInt(
                        "SELECT CASE WHEN first > 0 THEN first ELSE seq END FROM _evd_journal ORDER BY seq LIMIT 1")
                    measured.lastSeq = try? connection.scalarInt("SELECT max(seq) FROM _evd_journal")
                }
                if source.database != nil,
                    let pages = try? connection.scalarInt("SELECT sum(pgsize) FROM dbstat WHERE name = '_evd_journal'")
                {
                    measured.bytes = Int(pages)
                }
            }
            figures.sources.append(measured)
        }
        return figures
    }

    /// The size of the file at `path`, 0 when there is none.
    private static func fileSize(_ path: String) -> Int {
        var info = stat()
        return stat(path, &info) == 0 ? Int(info.st_size) : 0
    }
}
