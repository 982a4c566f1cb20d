#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSQLite
import DequeModule
import EvdClient
import NIOPosix
import Synchronization

/// How the journal keeps committed events (PROTOCOL.md §5; `evd --journal-*`).
public struct JournalSettings: Sendable {
    /// Whether committed events are journaled at all (`--no-journal` turns it off: then `since`
    /// can replay nothing and gets notice `gap`).
    public var enabled = true
    /// Keep at least the newest this many journaled events of each retention window
    /// (`Journal.Window`); 0: no limit by count.
    public var keepEvents = 1_000_000
    /// Drop journaled events older than this many seconds (in every window); 0: no limit by age.
    public var keepSeconds = 7 * 86_400
    /// How often retention runs, in milliseconds.
    public var pruneIntervalMs = 1000
    /// Whether row images are journaled with every change (`--no-journal-rows` turns it off):
    /// then a `rows: true` subscriber that replays gets them even for changes made while nobody
    /// asked for them — what a cache rebuilt from the journal needs. Off, changes record only
    /// their keys unless a `rows: true` subscription exists at the time.
    public var rowImages = true

    public init() {}
}

/// The journal: every committed event, stored durably with the commit that caused it (PROTOCOL.md §5).
///
/// **Where events live.** A database's committed events (the Datasette family) go into the table
/// `_evd_journal` of that database, written inside the transaction that made the changes, just
/// before its COMMIT: SQLite makes both durable together or neither, so a kill -9 at any moment
/// leaves no committed change without its events and no event for work that did not commit.
/// Events that belong to no database transaction (custom events, `login`, `logout`,
/// `create-token`) go into `_evd_journal` of the daemon's own state database
/// (`STATE_DIR/journal.db`), committed before the client gets its answer.
///
/// **Seqs.** A transaction's events get their seqs just before COMMIT (`EventBus.reserve`) and are
/// published after it; meanwhile later events are held back, so every subscription still receives
/// seqs in order. Seqs never go back across restarts: the state database keeps a lease — the
/// daemon hands out seqs only below a persisted bound, raised in large steps — and a restart
/// continues from that bound.
///
/// **Retention** keeps the newest `keepEvents` and drops those older than `keepSeconds`, in each
/// retention window on its own (`Window`): every database's changes, the state database's
/// `login`/`logout`, and its other events. So nobody's churn evicts others' events: anyone who
/// can connect makes `login` and `logout` (tens of thousands a second), and those push out only
/// older `login`s and `logout`s, never a database's committed changes; a writer of one database
/// pushes out only that database's older changes. Each window's floor (the highest seq retention
/// may have dropped from it) is persisted before anything is deleted, so a replay that asks for
/// what is gone gets notice `gap`, never a silent hole; a replay checks the floors of the windows
/// whose events it can match (`floor(of:)`).
public final class Journal: Sendable {
    /// The table, in each database and in the state database.
    ///
    /// A row holds one event, or a run of events of one name (`EventRun`):
    /// - one event: `seq` is its seq, `body` its body as delivered (the bytes after
    ///   `"subscription":N`); with row images, `body` has them and `plain` is the length of the
    ///   body without them (the same bytes up to its closing brace). `first` is NULL.
    /// - a run: `first` is its first seq and `seq` its last (so a range of `seq` finds every run
    ///   that reaches into it), `body` the run packed (`EventRun.packed`: the start the bodies
    ///   share once, then each event's tail and its row images in binary), `plain` NULL.
    ///
    /// Every row also carries how many events it holds (`events`) and a checksum of all of it
    /// (`crc`, `Checksum`), checked when a replay reads it: a row damaged on disk is never sent.
    static let table = "_evd_journal"
    static let createSQL = """
        CREATE TABLE IF NOT EXISTS _evd_journal (
          seq INTEGER PRIMARY KEY,
          event TEXT NOT NULL,
          time TEXT NOT NULL,
          body BLOB NOT NULL,
          plain INTEGER,
          first INTEGER,
          events INTEGER,
          crc INTEGER
        )
        """
    static let insertSQL = "INSERT INTO _evd_journal (seq, event, time, body, plain, first, events, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

    /// The table of what a database's journal needs kept beside it, in each database: the seq
    /// lease and its window's floor (so that neither goes back when the state directory is lost),
    /// and the last seq written before rows had checksums. The state database has the same keys
    /// in its `meta` table.
    static let metaTable = "_evd_meta"
    static let metaCreateSQL = "CREATE TABLE IF NOT EXISTS \(metaTable) (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"

    /// The meta key of the last seq journaled before this file's rows had checksums: a row at
    /// or below it without one is an older evd's, one above it is damaged.
    static let uncheckedThroughKey = "journal_unchecked_through"

    /// The most events one journal row holds (a run longer than this is split).
    static let maxRunEvents = 4096

    /// Creates the journal table and its meta table (`meta`: the state database's `meta`, or
    /// `_evd_meta`) on `connection`, or adds what an older evd's table lacks (`first`, `events`,
    /// `crc`; its rows until then stay readable without a checksum).
    static func prepareTable(on connection: SQLiteConnection, meta: String = Journal.metaTable) throws(SQLiteError) {
        try connection.exec(Self.createSQL)
        if meta == Self.metaTable { try connection.exec(Self.metaCreateSQL) }
        let columns = "SELECT count(*) FROM pragma_table_info('_evd_journal') WHERE name = "
        if try connection.scalarInt(columns + "'first'") == 0 {
            try connection.exec("ALTER TABLE _evd_journal ADD COLUMN first INTEGER")
        }
        var unchecked: Int64 = 0
        if try connection.scalarInt(columns + "'crc'") == 0 {
            unchecked = try connection.scalarInt("SELECT max(seq) FROM _evd_journal") ?? 0
            try connection.exec("ALTER TABLE _evd_journal ADD COLUMN events INTEGER; ALTER TABLE _evd_journal ADD COLUMN crc INTEGER")
        }
        // Kept once: a table made with checksums has none unchecked.
        try connection.exec("INSERT OR IGNORE INTO \(meta) (key, value) VALUES ('\(Self.uncheckedThroughKey)', \(unchecked))")
    }

    /// The checksum of a journal row: CRC-32C of its seq, first seq, event count, plain length
    /// and the lengths of its name, time and body, then of those bytes. (A field stored as NULL
    /// counts as 0.)
    enum Checksum {
        static func of(
            seq: Int64, first: Int64, events: Int64, plain: Int64,
            name: UnsafeRawBufferPointer, time: UnsafeRawBufferPointer, body: UnsafeRawBufferPointer
        ) -> Int64 {
            var fields = (
                seq.littleEndian, first.littleEndian, events.littleEndian, plain.littleEndian,
                Int64(name.count).littleEndian, Int64(time.count).littleEndian, Int64(body.count).littleEndian
            )
            var crc = withUnsafeBytes(of: &fields) { evd_crc32c(0, $0.baseAddress, $0.count) }
            crc = evd_crc32c(crc, name.baseAddress, name.count)
            crc = evd_crc32c(crc, time.baseAddress, time.count)
            crc = evd_crc32c(crc, body.baseAddress, body.count)
            return Int64(crc)
        }

        /// The checksum of a row about to be written.
        static func of(seq: Int64, first: Int64, events: Int64, plain: Int64, name: String, time: String, body: [UInt8]) -> Int64 {
            var name = name
            var time = time
            return name.withUTF8 { name in
                time.withUTF8 { time in
                    body.withUnsafeBytes { body in
                        Self.of(
                            seq: seq, first: first, events: events, plain: plain, name: UnsafeRawBufferPointer(name),
                            time: UnsafeRawBufferPointer(time), body: body)
                    }
                }
            }
        }
    }

    /// A journal to read and prune: a database's, or the state database's (`database` nil).
    struct Source: Sendable {
        let database: String?
        let path: String

        /// The table its journal's bookkeeping is kept in (`Journal.metaTable`; the state
        /// database's own is `meta`).
        var metaTable: String { self.database == nil ? "meta" : Journal.metaTable }

        /// The retention windows its rows belong to.
        var windows: [Window] {
            self.database.map { [.database($0)] } ?? [.sessions, .state]
        }
    }

    /// A part of the journal that retention keeps on its own: its newest `keepEvents`, and none
    /// older than `keepSeconds`, with a floor of its own.
    enum Window: Hashable, Sendable {
        /// `login` and `logout`, in the state database: what anyone who can connect makes.
        case sessions
        /// The state database's other events: custom events and `create-token` (both need a grant).
        case state
        /// One database's committed changes.
        case database(String)

        /// The events of `sessions`.
        static let sessionEvents: Set<String> = [EventKind.login.name, EventKind.logout.name]

        /// The window of an event journaled in the state database.
        static func of(stateEvent name: String) -> Window { Self.sessionEvents.contains(name) ? .sessions : .state }

        /// The SQL condition that picks its rows in its source's `_evd_journal`.
        var rows: String {
            let names = Self.sessionEvents.sorted().map { "'\($0)'" }.joined(separator: ", ")
            switch self {
            case .sessions: return "event IN (\(names))"
            case .state: return "event NOT IN (\(names))"
            case .database: return "1"
            }
        }

        /// The key of its floor in the state database's `meta` table.
        var floorKey: String {
            switch self {
            case .sessions: return "journal_floor.sessions"
            case .state: return "journal_floor.state"
            case .database(let name): return "journal_floor.database." + name
            }
        }
    }

    let settings: JournalSettings
    let sources: [Source]
    private let statePath: String
    /// The state database: its meta table (lease, floor) and its journal.
    private let state: Mutex<StateDatabase?> = Mutex(nil)

    /// The state database's connection and its journal insert, prepared once.
    private struct StateDatabase {
        let connection: SQLiteConnection
        let insert: SQLiteStatement
    }
    /// Connections for retention's deletes, one per source, opened on first use.
    private let maintenance: Mutex<[String: SQLiteConnection]> = Mutex([:])
    /// The highest seq retention may have removed, from any window.
    private let floorValue = Atomic<Int64>(0)
    /// The highest seq retention may have removed, per window.
    private let floors: Mutex<[Window: Int64]> = Mutex([:])
    /// The seq through which retention has deleted each window's rows since evd started (so that
    /// it does not visit them again); absent: nothing yet, the first prune visits from the start.
    private let swept: Mutex<[Window: Int64]> = Mutex([:])
    /// The seq lease each database's `_evd_meta` holds (by path), as last written.
    private let leaseKept: Mutex<[String: Int64]> = Mutex([:])
    /// The damaged rows replays have found (by source path and seq), each logged once.
    private let damagedRows: Mutex<Set<DamagedRow>> = Mutex([])
    private struct DamagedRow: Hashable {
        let database: String?
        let seq: Int64
    }
    /// What the journal holds, kept as events are journaled (for `stats` and `/metrics`).
    let running = RunningFigures()
    let lease: SeqLease
    /// Events waiting for the state database's writer (`appendToState`).
    private let appends = Mutex(Appends())
    /// Where the state database's writer runs.
    private let threadPool: NIOThreadPool

    /// The journal of the daemon's databases, its own in `stateDirectory`; the state database's
    /// writes run on `threadPool`.
    public init(
        stateDirectory: String, databases: [DatabaseConfig], settings: JournalSettings, threadPool: NIOThreadPool
    ) {
        self.threadPool = threadPool
        self.settings = settings
        self.statePath = stateDirectory + "/journal.db"
        var sources = [Source(database: nil, path: self.statePath)]
        for database in databases where !database.isInMemory {
            sources.append(Source(database: database.name, path: database.path))
        }
        self.sources = sources
        self.lease = SeqLease()
    }

    /// The highest seq that retention may have removed from any window (`stats`' `journal.floor`).
    var floor: Int64 { self.floorValue.load(ordering: .acquiring) }

    /// Each window's floor.
    var windowFloors: [Window: Int64] { self.floors.withLock { $0 } }

    /// The highest seq that retention may have removed from the windows `relevant` picks: a
    /// replay of events of those windows from below it has a gap.
    func floor(of relevant: (Window) -> Bool) -> Int64 {
        self.floors.withLock { floors in floors.reduce(0) { relevant($1.key) ? max($0, $1.value) : $0 } }
    }

    /// Records a damaged row a replay found; `true` the first time, when the caller logs it.
    func noteDamage(_ damage: Reader.Damage) -> Bool {
        self.damagedRows.withLock { $0.insert(DamagedRow(database: damage.database, seq: damage.seq)).inserted }
    }

    /// How many damaged rows replays have found since evd started (`stats`' `journal.damaged_rows`).
    var damagedRowCount: Int { self.damagedRows.withLock { $0.count } }

    // MARK: Opening

    /// What `open` found.
    struct Opening {
        /// The last seq that may have been handed out: the daemon continues after it.
        let head: Int64
        /// The state database was missing (new) although a database shows that evd ran before:
        /// the state directory was lost. Seqs still continue after every seq handed out (each
        /// database keeps the lease too), and the state database's events up to `head`, gone with
        /// it, are a gap to any replay.
        let stateWasLost: Bool
    }

    /// Opens the state database and every database's journal table (creating them), and returns
    /// where seqs continue.
    ///
    /// **Where the high-water mark lives.** The seq lease (the bound below which seqs are handed
    /// out) is kept in the state database and in every database's `_evd_meta`, and so is each
    /// database window's floor: losing one file — the state directory included — cannot make
    /// seqs go back or a pruned range look whole.
    func open() throws(SQLiteError) -> Opening {
        let state = try SQLiteConnection(path: self.statePath, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
        try state.exec("PRAGMA journal_mode = wal; PRAGMA synchronous = normal")
        try state.exec("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        try Self.prepareTable(on: state, meta: "meta")
        let stateLease = try state.scalarInt("SELECT value FROM meta WHERE key = 'seq_lease'")
        let floor = try state.scalarInt("SELECT value FROM meta WHERE key = 'journal_floor'") ?? 0
        // Each window's floor; one without its own (a journal written by an evd that had one floor
        // for all, or a database added since) starts at the highest, which is never too low.
        var floors: [Window: Int64] = [:]
        for window in self.sources.flatMap(\.windows) {
            floors[window] = try state.scalarInt("SELECT value FROM meta WHERE key = '\(Self.quoted(window.floorKey))'") ?? floor
        }
        var head = max(stateLease ?? 0, floor)
        var ranBefore = false
        if self.settings.enabled {
            head = max(head, try state.scalarInt("SELECT max(seq) FROM _evd_journal") ?? 0)
            for source in self.sources {
                guard let database = source.database else { continue }
                let connection = try self.maintenanceConnection(source)
                try Self.prepareTable(on: connection)
                head = max(head, try connection.scalarInt("SELECT max(seq) FROM _evd_journal") ?? 0)
                if let lease = try connection.scalarInt("SELECT value FROM \(Self.metaTable) WHERE key = 'seq_lease'") {
                    head = max(head, lease)
                    ranBefore = true
                }
                if let kept = try connection.scalarInt("SELECT value FROM \(Self.metaTable) WHERE key = 'journal_floor'") {
                    floors[.database(database)] = max(floors[.database(database)] ?? 0, kept)
                    head = max(head, kept)
                }
            }
        }
        let stateWasLost = stateLease == nil && ranBefore
        if stateWasLost {
            // What the state database journaled went with it: a replay of its windows gets a gap.
            for window in [Window.sessions, .state] { floors[window] = max(floors[window] ?? 0, head) }
        }
        let highest = floors.values.max() ?? floor
        self.floorValue.store(max(floor, highest), ordering: .releasing)
        self.floors.withLock { $0 = floors }
        guard let insert = try state.prepare(SQLText(Self.insertSQL), from: 0) else {
            throw SQLiteError(code: SQLITE_MISUSE, message: "the journal's insert prepared to nothing")
        }
        self.state.withLock { $0 = StateDatabase(connection: state, insert: insert) }
        for (window, value) in floors { try self.setMeta(window.floorKey, value) }
        try self.setMeta("journal_floor", max(floor, highest))
        self.lease.start(after: head) { end throws(SQLiteError) in try self.setMeta("seq_lease", end) }
        try self.setMeta("seq_lease", self.lease.end)
        if self.settings.enabled {
            for source in self.sources {
                guard let database = source.database else { continue }
                let connection = try self.maintenanceConnection(source)
                try Self.raiseMeta("seq_lease", to: self.lease.end, on: connection)
                try Self.raiseMeta("journal_floor", to: floors[.database(database)] ?? 0, on: connection)
                self.leaseKept.withLock { $0[source.path] = self.lease.end }
            }
        }
        return Opening(head: head, stateWasLost: stateWasLost)
    }

    /// Raises `key` in `connection`'s `_evd_meta` to `value` (never lowers it).
    private static func raiseMeta(_ key: String, to value: Int64, on connection: SQLiteConnection) throws(SQLiteError) {
        try connection.exec(
            """
            INSERT INTO \(Self.metaTable) (key, value) VALUES ('\(Self.quoted(key))', \(value))
            ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)
            """)
    }

    /// Writes the seq lease into every database whose `_evd_meta` has an older one (after the
    /// lease was raised: at most once per `SeqLease.block / 2` seqs). Retention's task does it,
    /// the one that uses the databases' maintenance connections, well before the seqs reach the
    /// old bound (half a block: millions of events).
    /// A database that is busy (a long write transaction) is left for the next round; the others
    /// are written meanwhile.
    private func keepLeaseInDatabases() throws(SQLiteError) {
        let end = self.lease.end
        var failure: SQLiteError?
        for source in self.sources where source.database != nil {
            guard self.leaseKept.withLock({ $0[source.path] ?? 0 }) < end else { continue }
            do throws(SQLiteError) {
                try Self.raiseMeta("seq_lease", to: end, on: try self.maintenanceConnection(source))
                self.leaseKept.withLock { $0[source.path] = end }
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
    }

    /// Closes the journal's own connections, checkpointing the state database's WAL.
    func close() {
        self.state.withLock { state in
            try? state?.connection.exec("PRAGMA wal_checkpoint(TRUNCATE)")
            state = nil
        }
        self.maintenance.withLock { $0.removeAll() }
    }

    private func setMeta(_ key: String, _ value: Int64) throws(SQLiteError) {
        try self.state.withLock { state throws(SQLiteError) in
            guard let state else { return }
            try state.connection.exec(
                "INSERT INTO meta (key, value) VALUES ('\(Self.quoted(key))', \(value)) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        }
    }

    /// `text` with its single quotes doubled, for a SQL string literal (a database's name is in a
    /// window's key).
    private static func quoted(_ text: String) -> String {
        text.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "''")
    }

    private func maintenanceConnection(_ source: Source) throws(SQLiteError) -> SQLiteConnection {
        if let connection = self.maintenance.withLock({ $0[source.path] }) { return connection }
        let connection = try SQLiteConnection(
            path: source.path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI)
        connection.setBusyTimeout(milliseconds: 5000)
        try connection.exec("PRAGMA journal_mode = wal; PRAGMA synchronous = normal")
        self.maintenance.withLock { $0[source.path] = connection }
        return connection
    }

    // MARK: Writing

    /// Writes `entries` with consecutive seqs from `first` through `insert` (a prepared `insertSQL`
    /// on the connection whose transaction they belong to).
    static func write(
        _ entries: [JournalEntry], first: Int64, time: String, using insert: SQLiteStatement
    ) throws(SQLiteError) {
        for (offset, entry) in entries.enumerated() {
            try Self.write(entry, seq: first + Int64(offset), time: time, using: insert)
        }
    }

    /// Writes events (all made: none `unwanted`) with consecutive seqs from `first`: a row per
    /// entry, and one per run.
    static func write(
        _ publications: [Publication], first: Int64, time: String, using insert: SQLiteStatement
    ) throws(SQLiteError) {
        var seq = first
        for publication in publications {
            switch publication {
            case .entry(let entry):
                try Self.write(entry, seq: seq, time: time, using: insert)
            case .run(let run):
                if run.count == 1, !run.hasImages {
                    // One event without images: its body, as a single event's row.
                    var body = run.common
                    body += run.tails
                    try Self.insert(seq: seq, name: run.kind.name, time: time, body: body, using: insert)
                } else {
                    try Self.insert(
                        seq: seq + Int64(run.count) - 1, first: seq, events: run.count, name: run.kind.name, time: time,
                        body: run.packed(), using: insert)
                }
            case .unwanted:
                preconditionFailure("every journaled event is made")
            }
            seq += Int64(publication.count)
        }
    }

    /// Writes one event as a row of its own.
    private static func write(_ entry: JournalEntry, seq: Int64, time: String, using insert: SQLiteStatement) throws(SQLiteError) {
        // With images, the body with them is stored, and the length of the one without: that
        // one is the same bytes up to its closing `}` (see `WireLines.body`).
        if let images = entry.imagesBody {
            try Self.insert(seq: seq, name: entry.name, time: time, body: images, plain: entry.body.count, using: insert)
        } else {
            try Self.insert(seq: seq, name: entry.name, time: time, body: entry.body, using: insert)
        }
    }

    /// Inserts a row (`createSQL` says what each field is), with its event count and checksum.
    private static func insert(
        seq: Int64, first: Int64? = nil, events: Int = 1, name: String, time: String, body: [UInt8], plain: Int? = nil,
        using insert: SQLiteStatement
    ) throws(SQLiteError) {
        insert.reset()
        try insert.bind(int: seq, at: 1)
        try insert.bind(text: name, at: 2)
        try insert.bind(text: time, at: 3)
        try insert.bind(blob: body, at: 4)
        if let plain { try insert.bind(int: Int64(plain), at: 5) } else { try insert.bind(blob: nil, at: 5) }
        if let first { try insert.bind(int: first, at: 6) } else { try insert.bind(blob: nil, at: 6) }
        try insert.bind(int: Int64(events), at: 7)
        let crc = Checksum.of(
            seq: seq, first: first ?? 0, events: Int64(events), plain: Int64(plain ?? 0), name: name, time: time, body: body)
        try insert.bind(int: crc, at: 8)
        _ = try insert.step()
    }

    /// One caller's events, waiting for the state database's writer.
    private struct Append {
        let entries: [JournalEntry]
        let reservation: SeqReservation
        let done: CheckedContinuation<Result<Void, SQLiteError>, Never>
    }

    /// The group commit's queue: the appends that wait, and whether a writer is at work.
    private struct Appends {
        var waiting: Deque<Append> = []
        var writing = false
    }

    /// The most events one group commit takes (a caller's own batch may be larger, and is taken
    /// whole): the first callers of a crowd are not kept waiting for the last.
    static let maxGroupEvents = 8192

    /// Journals events that belong to no database transaction (custom events, `login`, `logout`,
    /// `create-token`) in the state database, durably, before they are published: returns once
    /// the COMMIT holding them has succeeded.
    ///
    /// **Group commit.** A commit costs about the same whatever it holds (BEGIN, the WAL frames,
    /// COMMIT; with synchronous=NORMAL no fsync), so callers share commits: a caller that finds no
    /// writer at work becomes the writer — a thread-pool job that commits every append waiting by
    /// then in one transaction, then again whatever queued meanwhile, until nothing waits — and
    /// every other caller only queues and waits on a continuation (no thread held). Nobody is
    /// resumed before the COMMIT that holds its events, and a failed one fails everyone in it
    /// (each caller then cancels its reservation: nothing of theirs was journaled). Callers bring
    /// batches of their own too: a session journals the `emit`s it has already read in one call
    /// (`Session.executeEmits`).
    func appendToState(_ entries: [JournalEntry], _ reservation: SeqReservation) async throws(SQLiteError) {
        let result = await withCheckedContinuation { (done: CheckedContinuation<Result<Void, SQLiteError>, Never>) in
            let lead = self.appends.withLock { appends -> Bool in
                appends.waiting.append(Append(entries: entries, reservation: reservation, done: done))
                guard !appends.writing else { return false }
                appends.writing = true
                return true
            }
            if lead { self.threadPool.submit { state in self.writeAppends(cancelled: state == .cancelled) } }
        }
        try result.get()
    }

    /// The writer: commits what waits, a group per transaction, until nothing does. (`cancelled`:
    /// the thread pool has stopped, so everything waiting fails.)
    private func writeAppends(cancelled: Bool) {
        while true {
            let group = self.appends.withLock { appends -> [Append] in
                var group: [Append] = []
                var events = 0
                while let next = appends.waiting.first,
                    group.isEmpty || events + next.entries.count <= Self.maxGroupEvents
                {
                    group.append(appends.waiting.removeFirst())
                    events += next.entries.count
                }
                if group.isEmpty { appends.writing = false }
                return group
            }
            guard !group.isEmpty else { return }
            let result: Result<Void, SQLiteError>
            do throws(SQLiteError) {
                if cancelled { throw SQLiteError(code: SQLITE_MISUSE, message: "the journal's writer has stopped") }
                try self.commit(group)
                result = .success(())
            } catch {
                result = .failure(error)
            }
            for append in group { append.done.resume(returning: result) }
        }
    }

    /// Writes a group's events in one transaction of the state database.
    private func commit(_ group: [Append]) throws(SQLiteError) {
        try self.state.withLock { state throws(SQLiteError) in
            guard let state else { throw SQLiteError(code: SQLITE_MISUSE, message: "the journal is closed") }
            try state.connection.exec("BEGIN IMMEDIATE")
            do throws(SQLiteError) {
                for append in group {
                    try Self.write(
                        append.entries, first: append.reservation.first, time: append.reservation.timeText,
                        using: state.insert)
                }
                state.insert.reset()
                try state.connection.exec("COMMIT")
                for append in group {
                    self.running.addState(
                        append.entries, first: append.reservation.first, timeBytes: append.reservation.time.count - 2)
                }
            } catch {
                state.insert.reset()
                try? state.connection.exec("ROLLBACK")
                throw error
            }
        }
    }

    // MARK: Reading

    /// Reads journaled events in seq order, merged from every source, for one replay.
    ///
    /// Rows are not copied: a page visits each one where SQLite keeps it (`Row`), so a replay can
    /// splice the stored bytes into its output. Between pages no statement stays open, so a
    /// replay holds no read snapshot while it waits for its client. A row may hold a run of
    /// events (`EventRun`), which a page may take only in part: the next one goes on inside it.
    ///
    /// `@unchecked Sendable`: a replay uses its reader from one task, one page at a time.
    final class Reader: @unchecked Sendable {
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
                    path: source.path, flags: SQLITE_OPEN_READONLY | SQLITE_OPEN_URI)
                // A range of the rowid: no sort, and no LIMIT needed (a page stops stepping). A
                // run's row has its last seq: one that starts by `through` may end after it.
                let sql = """
                    SELECT seq, event, time, body, plain, first, events, crc FROM _evd_journal
                    WHERE seq > ? AND seq <= ? ORDER BY seq
                    """
                guard let statement = try? connection.prepare(SQLText(sql), from: 0) else { continue }  // no journal there yet
                let unchecked = (try? connection.scalarInt(
                    "SELECT value FROM \(source.metaTable) WHERE key = '\(Journal.uncheckedThroughKey)'")) ?? nil
                self.cursors.append(
                    Cursor(connection: connection, statement: statement, source: source, uncheckedThrough: unchecked ?? 0))
            }
        }

        /// Visits the next events in seq order, at most `limit`; returns how many it visited (0
        /// when the replay is complete). `visit` is given a row and the seqs of it to take, in
        /// order, at most `budget` of them; it returns how many it took, from `from` on.
        ///
        /// A damaged row ends the visit before it; the next call passes it, visiting nothing:
        /// `damage` says which seqs it held, and the count returned covers them.
        func next(
            limit: Int, _ visit: (_ row: Row, _ from: Int64, _ to: Int64, _ budget: Int) -> Int
        ) throws(SQLiteError) -> Int {
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
                    first: first, seq: seq, name: statement.rawBytes(at: 1), time: statement.rawBytes(at: 2), stored: stored,
                    plain: plain, isRun: runFirst > 0)
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
                seq: seq, first: first, events: events, plain: statement.int(at: 4),
                name: UnsafeRawBufferPointer(statement.rawBytes(at: 1)), time: UnsafeRawBufferPointer(statement.rawBytes(at: 2)),
                body: UnsafeRawBufferPointer(statement.rawBytes(at: 3)))
            return expected == statement.int(at: 7)
        }
    }

    // MARK: Retention

    /// Drops what retention no longer keeps, window by window: first the window's floor is raised
    /// (durably), then its rows at or below it are deleted, in small transactions so that writers
    /// are not held up. Called from one task at a time (the daemon's retention loop).
    ///
    /// It first keeps the databases' copies of the seq lease up to date (`keepLeaseInDatabases`).
    func prune() throws(SQLiteError) {
        guard self.settings.enabled else { return }
        // Retention goes on when a database is busy; the error is reported after it.
        var failure: SQLiteError?
        do throws(SQLiteError) { try self.keepLeaseInDatabases() } catch { failure = error }
        guard self.settings.keepEvents > 0 || self.settings.keepSeconds > 0 else {
            if let failure { throw failure }
            return
        }
        for source in self.sources {
            for window in source.windows {
                var cutoff: Int64 = 0
                try self.withConnection(source) { connection throws(SQLiteError) in
                    cutoff = try self.cutoff(of: window, on: connection)
                }
                guard cutoff > self.floor(of: { $0 == window }) else { continue }
                try self.setMeta(window.floorKey, cutoff)
                if source.database != nil {
                    // And in the database itself, which may outlive the state directory.
                    try self.withConnection(source) { connection throws(SQLiteError) in
                        try Self.raiseMeta("journal_floor", to: cutoff, on: connection)
                    }
                }
                let highest = self.floors.withLock { floors in
                    floors[window] = cutoff
                    return floors.values.max() ?? cutoff
                }
                // The single floor an older evd reads (the highest: never too low for any window).
                try self.setMeta("journal_floor", highest)
                self.floorValue.store(highest, ordering: .releasing)
                // What an earlier prune deleted is not visited again (the rows of the source's
                // other window stay among them).
                let from = self.swept.withLock { $0[window] } ?? 0
                try self.withConnection(source) { connection throws(SQLiteError) in
                    repeat {
                        try connection.exec(
                            """
                            DELETE FROM _evd_journal WHERE seq IN (SELECT seq FROM _evd_journal
                            WHERE seq > \(from) AND seq <= \(cutoff) AND \(window.rows) ORDER BY seq LIMIT 10000)
                            """)
                    } while connection.changes == 10_000
                }
                self.swept.withLock { $0[window] = cutoff }
            }
        }
        if let failure { throw failure }
    }

    /// The highest seq of `window` that retention no longer keeps (0: none), on its source's
    /// connection.
    private func cutoff(of window: Window, on connection: SQLiteConnection) throws(SQLiteError) -> Int64 {
        var cutoff: Int64 = 0
        if self.settings.keepEvents > 0 {
            cutoff = max(cutoff, try Self.seqBeforeNewest(self.settings.keepEvents, of: window, on: connection))
        }
        if self.settings.keepSeconds > 0 {
            let before = EventTime.text(secondsAgo: self.settings.keepSeconds)
            let old = try connection.scalarInt("SELECT max(seq) FROM _evd_journal WHERE time < '\(before)' AND \(window.rows)")
            cutoff = max(cutoff, old ?? 0)
        }
        return cutoff
    }

    /// The seq of the newest event older than the newest `count` events of `window` in
    /// `connection`'s journal (0 when it holds no more than `count`): rows are walked from the
    /// newest, a run counting all its events.
    private static func seqBeforeNewest(_ count: Int, of window: Window, on connection: SQLiteConnection) throws(SQLiteError) -> Int64 {
        guard
            let rows = try connection.prepare(
                SQLText("SELECT seq, first FROM _evd_journal WHERE \(window.rows) ORDER BY seq DESC"), from: 0)
        else { return 0 }
        var kept: Int64 = 0
        while try rows.step() {
            let last = rows.int(at: 0)
            let first = rows.int(at: 1)
            let events = first > 0 && first <= last ? last - first + 1 : 1
            if kept + events > Int64(count) { return last - (Int64(count) - kept) }
            kept += events
        }
        return 0
    }

    /// Runs `body` with a writable connection to `source`: the state database's own (under its
    /// lock), or the source's maintenance connection (only retention uses those, from one task).
    private func withConnection(_ source: Source, _ body: (SQLiteConnection) throws(SQLiteError) -> Void) throws(SQLiteError) {
        if source.database == nil {
            try self.state.withLock { state throws(SQLiteError) in
                guard let state else { return }
                try body(state.connection)
            }
        } else {
            try body(try self.maintenanceConnection(source))
        }
    }
}

extension PooledConnection {
    /// How many committed events are made, journaled and published at a time. A transaction with
    /// more never has all its events made at once: they are made for the journal a chunk at a
    /// time, and made again for publishing after COMMIT (only those someone wants), so that its
    /// memory stays about what its capture holds (`CommittedEvents`). One with fewer makes them
    /// once and keeps them until they are published.
    static let eventChunk = 4096

    /// A transaction that changed at least this many rows gives the memory it used back to the
    /// system once it ended. Its big buffers went back when freed (`Daemon` maps each on its own),
    /// but glibc keeps the pages of the many small allocations its events made for reuse:
    /// `malloc_trim` returns them (megabytes for a million rows; without it RSS creeps up by as
    /// much with each such transaction). Not after small ones: it walks every arena, for little.
    static let trimAfterRows = 10_000

    /// COMMITs the open transaction with its committed events: journaled inside the transaction
    /// (when the journal is on), then published once the COMMIT succeeded. On a failed COMMIT
    /// that leaves the transaction open (busy, a deferred constraint), the journal rows are taken
    /// back out and the captured changes stay, so the client may retry. `events`: those a prepared
    /// transaction's log holds, instead of what the capture recorded.
    func commit(
        database: String, origin: EventOrigin, bus: EventBus, journal: Journal?, events prepared: [CommittedEvent]? = nil
    ) throws(SQLiteError) {
        let events = prepared.map(CommittedEvents.init) ?? self.capture.committedEvents(database: database)
        let large = self.capture.recordedCount >= Self.trimAfterRows || events.count > Self.eventChunk
        defer {
            // Once the capture is discarded (on a failed COMMIT it stays, and so does its memory).
            if large, self.capture.isEmpty { _ = evd_malloc_trim() }
        }
        guard let journal, journal.settings.enabled, !events.isEmpty else {
            try self.identity.check()  // nothing is committed into a file deleted or replaced under evd
            try self.run(own: "COMMIT")
            if !events.isEmpty { bus.publishCommitted(events, origin: origin) }
            self.capture.discardAll()
            return
        }
        let reservation = bus.reserve(events.count)
        // A small transaction's events are made once, kept for publishing.
        var kept: [Publication]?
        // The journal's own rows (and taking them back out) are not changes of the client's.
        try self.capture.withoutRecording { () throws(SQLiteError) in
            do throws(SQLiteError) {
                if self.journalInsert == nil {
                    try Journal.prepareTable(on: self.sqlite)  // a database created after start-up
                    self.journalInsert = try self.sqlite.prepare(SQLText(Journal.insertSQL), from: 0)
                }
                let time = reservation.timeText
                var start = 0
                var bytes = 0
                while start < events.count {
                    let chunk = start..<min(events.count, start + Self.eventChunk)
                    let made = events.publications(chunk, origin: origin)
                    try Journal.write(made, first: reservation.first + Int64(start), time: time, using: self.journalInsert!)
                    bytes += Journal.RunningFigures.bytes(of: made, timeBytes: time.utf8.count)
                    if chunk.count == events.count { kept = made }
                    start = chunk.upperBound
                }
                try self.identity.check()  // nothing is committed into a file deleted or replaced under evd
                try self.run(own: "COMMIT")
                journal.running.add(.database(database), first: reservation.first, count: events.count, bytes: bytes)
            } catch {
                if self.sqlite.inTransaction {
                    try? self.sqlite.exec(
                        "DELETE FROM _evd_journal WHERE seq BETWEEN \(reservation.first) AND \(reservation.last)")
                }
                bus.cancel(reservation)
                throw error
            }
        }
        if let kept {
            bus.complete(reservation, kept)
        } else {
            // Made again, a chunk at a time, from the capture (so before it is discarded): the same
            // bytes as journaled. Events nobody subscribed to are not made at all.
            bus.complete(reservation, batch: Self.eventChunk) { range, wanted in
                events.publications(range, origin: origin, wanted: wanted)
            }
        }
        self.capture.discardAll()
    }
}

extension EventBus {
    /// Publishes a transaction's committed events when the journal is off, in order, with
    /// consecutive seqs unless other events interleave between batches. The events are made a
    /// batch at a time, and only those someone wants (the others get no seq).
    func publishCommitted(_ events: CommittedEvents, origin: EventOrigin) {
        var start = 0
        while start < events.count {
            // Made outside the lock, then numbered and queued under one lock.
            let batch = start..<min(events.count, start + PooledConnection.eventChunk)
            start = batch.upperBound
            self.publish(
                events.publications(batch, origin: origin, wanted: self.wanted).filter {
                    if case .unwanted = $0 { return false } else { return true }
                })
        }
    }
}

extension CommittedEvent {
    /// Its bytes, made once for the journal and every subscriber (a prepared transaction's
    /// events, kept as properties and JSON images).
    func entry(origin: EventOrigin) -> JournalEntry {
        let body = WireLines.body(origin, self.properties)
        var imagesBody: [UInt8]?
        if let images = self.images {
            // The same bytes up to the closing brace, then the images.
            var bytes: [UInt8] = []
            bytes.reserveCapacity(body.count + images.count)
            bytes += body[..<(body.count - 2)]
            bytes += images
            bytes.append(UInt8(ascii: "}"))
            bytes.append(UInt8(ascii: "\n"))
            imagesBody = bytes
        }
        return JournalEntry(
            name: self.kind.name, kind: self.kind, origin: origin, properties: self.properties, body: body,
            imagesBody: imagesBody)
    }
}

extension Journal: StateJournal {
    var isEnabled: Bool { self.settings.enabled }

    func append(_ entries: [JournalEntry], _ reservation: SeqReservation) async throws {
        try await self.appendToState(entries, reservation)
    }
}
