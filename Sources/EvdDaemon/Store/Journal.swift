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

    /// The meta key of the journal's epoch (`JournalEpoch`), in the state database and in every
    /// database's `_evd_meta`.
    static let epochKey = "journal_epoch"

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
            seq: Int64,
            first: Int64,
            events: Int64,
            plain: Int64,
            name: UnsafeRawBufferPointer,
            time: UnsafeRawBufferPointer,
            body: UnsafeRawBufferPointer
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
                            seq: seq,
                            first: first,
                            events: events,
                            plain: plain,
                            name: UnsafeRawBufferPointer(name),
                            time: UnsafeRawBufferPointer(time),
                            body: body
                        )
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
    let state: Mutex<StateDatabase?> = Mutex(nil)

    /// The state database's connection and its journal insert, prepared once.
    struct StateDatabase {
        let connection: SQLiteConnection
        let insert: SQLiteStatement
    }
    /// Connections for retention's deletes, one per source, opened on first use.
    private let maintenance: Mutex<[String: SQLiteConnection]> = Mutex([:])
    /// The highest seq retention may have removed, from any window.
    let floorValue = Atomic<Int64>(0)
    /// The epoch's value, set once by `open`.
    private let epochValue = Atomic<Int64>(0)
    /// The journal's epoch (after `open`).
    var epoch: JournalEpoch { JournalEpoch(value: self.epochValue.load(ordering: .acquiring)) }
    /// The highest seq retention may have removed, per window.
    let floors: Mutex<[Window: Int64]> = Mutex([:])
    /// The seq through which retention has deleted each window's rows since evd started (so that
    /// it does not visit them again); absent: nothing yet, the first prune visits from the start.
    let swept: Mutex<[Window: Int64]> = Mutex([:])
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
        stateDirectory: String,
        databases: [DatabaseConfig],
        settings: JournalSettings,
        threadPool: NIOThreadPool
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
        /// The journal's epoch: the state database's, else a database's (the state directory
        /// was lost, the history goes on), else new.
        let epoch: JournalEpoch
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
        var epoch = try state.scalarInt("SELECT value FROM meta WHERE key = '\(Self.epochKey)'")
        if self.settings.enabled {
            head = max(head, try state.scalarInt("SELECT max(seq) FROM _evd_journal") ?? 0)
            for source in self.sources {
                guard let database = source.database else { continue }
                let connection = try self.maintenanceConnection(source)
                try Self.prepareTable(on: connection)
                head = max(head, try connection.scalarInt("SELECT max(seq) FROM _evd_journal") ?? 0)
                if epoch == nil {
                    epoch = try connection.scalarInt("SELECT value FROM \(Self.metaTable) WHERE key = '\(Self.epochKey)'")
                }
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
        let chosen = epoch.map(JournalEpoch.init(value:)) ?? .random()
        self.epochValue.store(chosen.value, ordering: .releasing)
        try self.setMeta(Self.epochKey, chosen.value)
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
                try connection.exec("INSERT OR REPLACE INTO \(Self.metaTable) (key, value) VALUES ('\(Self.epochKey)', \(chosen.value))")
                self.leaseKept.withLock { $0[source.path] = self.lease.end }
            }
        }
        return Opening(head: head, stateWasLost: stateWasLost, epoch: chosen)
    }

    /// Raises `key` in `connection`'s `_evd_meta` to `value` (never lowers it).
    static func raiseMeta(_ key: String, to value: Int64, on connection: SQLiteConnection) throws(SQLiteError) {
        try connection.exec(
            """
            INSERT INTO \(Self.metaTable) (key, value) VALUES ('\(Self.quoted(key))', \(value))
            ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)
            """
        )
    }

    /// Writes the seq lease into every database whose `_evd_meta` has an older one (after the
    /// lease was raised: at most once per `SeqLease.block / 2` seqs). Retention's task does it,
    /// the one that uses the databases' maintenance connections, well before the seqs reach the
    /// old bound (half a block: millions of events).
    /// A database that is busy (a long write transaction) is left for the next round; the others
    /// are written meanwhile.
    func keepLeaseInDatabases() throws(SQLiteError) {
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

    func setMeta(_ key: String, _ value: Int64) throws(SQLiteError) {
        try self.state.withLock { state throws(SQLiteError) in
            guard let state else { return }
            try state.connection.exec(
                "INSERT INTO meta (key, value) VALUES ('\(Self.quoted(key))', \(value)) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            )
        }
    }

    /// `text` with its single quotes doubled, for a SQL string literal (a database's name is in a
    /// window's key).
    private static func quoted(_ text: String) -> String {
        text.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "''")
    }

    func maintenanceConnection(_ source: Source) throws(SQLiteError) -> SQLiteConnection {
        if let connection = self.maintenance.withLock({ $0[source.path] }) { return connection }
        let connection = try SQLiteConnection(
            path: source.path,
            flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI
        )
        connection.setBusyTimeout(milliseconds: 5000)
        try connection.exec("PRAGMA journal_mode = wal; PRAGMA synchronous = normal")
        self.maintenance.withLock { $0[source.path] = connection }
        return connection
    }

    // MARK: Writing

    /// Writes `entries` with consecutive seqs from `first` through `insert` (a prepared `insertSQL`
    /// on the connection whose transaction they belong to).
    static func write(
        _ entries: [JournalEntry],
        first: Int64,
        time: String,
        using insert: SQLiteStatement
    ) throws(SQLiteError) {
        for (offset, entry) in entries.enumerated() {
            try Self.write(entry, seq: first + Int64(offset), time: time, using: insert)
        }
    }

    /// Writes events (all made: none `unwanted`) with consecutive seqs from `first`: a row per
    /// entry, and one per run.
    static func write(
        _ publications: [Publication],
        first: Int64,
        time: String,
        using insert: SQLiteStatement
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
                        seq: seq + Int64(run.count) - 1,
                        first: seq,
                        events: run.count,
                        name: run.kind.name,
                        time: time,
                        body: run.packed(),
                        using: insert
                    )
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
        seq: Int64,
        first: Int64? = nil,
        events: Int = 1,
        name: String,
        time: String,
        body: [UInt8],
        plain: Int? = nil,
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
            seq: seq,
            first: first ?? 0,
            events: Int64(events),
            plain: Int64(plain ?? 0),
            name: name,
            time: time,
            body: body
        )
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
                        append.entries,
                        first: append.reservation.first,
                        time: append.reservation.timeText,
                        using: state.insert
                    )
                }
                state.insert.reset()
                try state.connection.exec("COMMIT")
                for append in group {
                    self.running.addState(
                        append.entries,
                        first: append.reservation.first,
                        timeBytes: append.reservation.time.count - 2
                    )
                }
            } catch {
                state.insert.reset()
                try? state.connection.exec("ROLLBACK")
                throw error
            }
        }
    }
}

extension Journal: StateJournal {
    var isEnabled: Bool { self.settings.enabled }

    func append(_ entries: [JournalEntry], _ reservation: SeqReservation) async throws {
        try await self.appendToState(entries, reservation)
    }
}
