import CSQLite
import EvdClient
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Durable cursors: named positions in the journal, as JetStream's durable consumers
/// (docs/protocol.md, "Durable cursors").
///
/// A cursor is made by a `subscribe` with `cursor: NAME` and belongs to the actor that made it.
/// Its position is the last seq its consumer acknowledged (`ack`); a later subscription to it
/// replays what follows the position, then goes on live. Cursors are kept in `STATE_DIR/cursors.db`
/// (`synchronous = FULL`: an `ack` is answered once its position is on disk), and the journal
/// keeps what a cursor has not acknowledged (`lowestPosition(pinning:)`, read by retention), up to
/// `JournalSettings.cursorMaxRetainedEvents` per retention window.
///
/// At most one subscription follows a cursor at a time (`claim`): a second one gets
/// `cursor_in_use`, so a consumer started twice by mistake is fenced off.
public final class Cursors: Sendable {
    /// One cursor.
    struct Cursor: Sendable, Equatable {
        let name: String
        /// The id of the actor that made it (`Actor.id`).
        let owner: String
        /// The last acknowledged seq: a subscription resumes after it.
        var position: Int64
        /// The event names and globs it follows (narrowed to journaled events).
        var events: [String]
        /// The databases its `where` lets through (`nil`: every one).
        var databases: [String]?
        /// When it was made, and when it was last acknowledged (RFC 3339).
        let created: String
        var acked: String?
        /// The subscription that follows it now, if any.
        var live: Follower?
    }

    /// The subscription following a cursor.
    struct Follower: Sendable, Equatable {
        let session: UInt64
        var subscription: Int
    }

    /// Why a cursor cannot be followed, acknowledged or deleted.
    enum Refusal: Error, Equatable {
        case inUse
        case notOwner
        case noSuchCursor
        /// The cursor would be one too many: in all (`perOwner` false) or for its owner.
        case tooMany(limit: Int, perOwner: Bool)
        /// The cursors' database refused the change (SQLite's error, as text).
        case notStored(String)
    }

    static let createSQL = """
        CREATE TABLE IF NOT EXISTS cursors (
          name TEXT PRIMARY KEY,
          owner TEXT NOT NULL,
          position INTEGER NOT NULL,
          events TEXT NOT NULL,
          databases TEXT,
          created TEXT NOT NULL,
          acked TEXT
        )
        """

    /// The longest cursor name, in UTF-8 bytes.
    static let maxNameBytes = 128

    private let path: String
    /// The most cursors in all, and per owner.
    let maxCursors: Int
    let maxPerOwner: Int
    private let connection = Mutex<SQLiteConnection?>(nil)
    private let cursors = Mutex<[String: Cursor]>([:])

    init(stateDirectory: String, maxCursors: Int, maxPerOwner: Int) {
        self.path = stateDirectory + "/cursors.db"
        self.maxCursors = maxCursors
        self.maxPerOwner = maxPerOwner
    }

    /// Opens (or creates) the cursors' database and loads every cursor.
    func open() throws(SQLiteError) {
        let connection = try SQLiteConnection(path: self.path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
        connection.setBusyTimeout(milliseconds: 5000)
        try connection.exec("PRAGMA journal_mode = wal; PRAGMA synchronous = full")
        try connection.exec(Self.createSQL)
        var loaded: [String: Cursor] = [:]
        if let select = try connection.prepare(
            SQLText("SELECT name, owner, position, events, databases, created, acked FROM cursors"),
            from: 0
        ) {
            while try select.step() {
                let name = select.column(0).stringValue ?? ""
                let events = (try? JSONValue(parsing: select.column(3).stringValue ?? "[]"))?.arrayValue?.compactMap(\.stringValue) ?? ["*"]
                let databases = select.column(4).stringValue.flatMap { try? JSONValue(parsing: $0) }?.arrayValue?.compactMap(\.stringValue)
                loaded[name] = Cursor(
                    name: name,
                    owner: select.column(1).stringValue ?? "",
                    position: select.int(at: 2),
                    events: events,
                    databases: databases,
                    created: select.column(5).stringValue ?? "",
                    acked: select.column(6).stringValue
                )
            }
        }
        self.connection.withLock { $0 = connection }
        self.cursors.withLock { $0 = loaded }
    }

    func close() {
        self.connection.withLock { $0 = nil }
    }

    // MARK: Following

    /// Claims cursor `name` for a subscription of `session` made by `owner`, making it if it does
    /// not exist; returns its position (`nil`: a new cursor, whose position the caller chooses and
    /// `attach` stores). Nothing is written yet: `attach` does, `abandon` undoes the claim.
    func claim(_ name: String, owner: String, session: UInt64) throws(Refusal) -> Int64? {
        try self.cursors.withLock { cursors throws(Refusal) -> Int64? in
            if var cursor = cursors[name] {
                guard cursor.owner == owner else { throw .notOwner }
                guard cursor.live == nil else { throw .inUse }
                cursor.live = Follower(session: session, subscription: 0)
                cursors[name] = cursor
                return cursor.position
            }
            guard cursors.count < self.maxCursors else { throw .tooMany(limit: self.maxCursors, perOwner: false) }
            guard cursors.values.count(where: { $0.owner == owner }) < self.maxPerOwner else {
                throw .tooMany(limit: self.maxPerOwner, perOwner: true)
            }
            cursors[name] = Cursor(
                name: name,
                owner: owner,
                position: -1,
                events: [],
                databases: nil,
                created: EventTime.text(secondsAgo: 0),
                acked: nil,
                live: Follower(session: session, subscription: 0)
            )
            return nil
        }
    }

    /// Stores a claimed cursor: its position (where the subscription starts after), the events
    /// and databases it follows. Blocks on SQLite (a synchronous write): off the event loops.
    func attach(_ name: String, position: Int64, events: [String], databases: [String]?) throws(SQLiteError) {
        guard let cursor = self.cursors.withLock({ $0[name] }) else { return }
        try self.withConnection { connection throws(SQLiteError) in
            guard
                let upsert = try connection.prepare(
                    SQLText(
                        """
                        INSERT INTO cursors (name, owner, position, events, databases, created, acked) VALUES (?, ?, ?, ?, ?, ?, ?)
                        ON CONFLICT (name) DO UPDATE SET position = excluded.position, events = excluded.events,
                        databases = excluded.databases
                        """
                    ),
                    from: 0
                )
            else { return }
            try upsert.bind(text: name, at: 1)
            try upsert.bind(text: cursor.owner, at: 2)
            try upsert.bind(int: position, at: 3)
            // The lists as JSON text (NULL: every database).
            func text(_ names: [String]) -> JSONValue {
                .string(String(decoding: JSONValue.array(names.map(JSONValue.string)).jsonBytes, as: UTF8.self))
            }
            try upsert.bind(text(events), at: 4)
            try upsert.bind(databases.map(text) ?? .null, at: 5)
            try upsert.bind(text: cursor.created, at: 6)
            try upsert.bind(cursor.acked.map(JSONValue.string) ?? .null, at: 7)
            _ = try upsert.step()
        }
        self.cursors.withLock { cursors in
            guard var stored = cursors[name] else { return }
            stored.position = position
            stored.events = events
            stored.databases = databases
            cursors[name] = stored
        }
    }

    /// Records which subscription follows a claimed cursor (its id is known once it exists).
    func follow(_ name: String, subscription: Int) {
        self.cursors.withLock { cursors in
            guard var cursor = cursors[name], cursor.live != nil else { return }
            cursor.live?.subscription = subscription
            cursors[name] = cursor
        }
    }

    /// Undoes a `claim` whose subscription was not made: a new cursor is forgotten, an existing
    /// one is free again.
    func abandon(_ name: String, session: UInt64) {
        self.cursors.withLock { cursors in
            guard var cursor = cursors[name], cursor.live?.session == session else { return }
            if cursor.position < 0 {
                cursors[name] = nil
            } else {
                cursor.live = nil
                cursors[name] = cursor
            }
        }
    }

    /// The cursor subscription `subscription` of `session` follows, if any.
    func name(following subscription: Int, session: UInt64) -> String? {
        self.cursors.withLock { cursors in
            cursors.values.first { $0.live == Follower(session: session, subscription: subscription) }?.name
        }
    }

    /// Frees the cursor that `subscription` of `session` follows (it ended); returns its name.
    @discardableResult
    func release(subscription: Int, session: UInt64) -> String? {
        self.cursors.withLock { cursors in
            guard var cursor = cursors.values.first(where: { $0.live == Follower(session: session, subscription: subscription) })
            else { return nil }
            cursor.live = nil
            cursors[cursor.name] = cursor
            return cursor.name
        }
    }

    /// Frees every cursor `session` follows (it ended).
    func releaseAll(session: UInt64) {
        self.cursors.withLock { cursors in
            for (name, cursor) in cursors where cursor.live?.session == session {
                cursors[name]?.live = nil
            }
        }
    }

    // MARK: Acknowledging and deleting

    /// Moves cursor `name` to `seq` (never back) and returns its position, once it is on disk.
    /// Blocks on SQLite (a synchronous write): off the event loops.
    func acknowledge(_ name: String, through seq: Int64) throws(SQLiteError) -> Int64 {
        guard let cursor = self.cursors.withLock({ $0[name] }) else { return seq }
        guard seq > cursor.position else { return cursor.position }
        let now = EventTime.text(secondsAgo: 0)
        try self.withConnection { connection throws(SQLiteError) in
            guard
                let update = try connection.prepare(
                    SQLText("UPDATE cursors SET position = ?, acked = ? WHERE name = ? AND position < ?"),
                    from: 0
                )
            else { return }
            try update.bind(int: seq, at: 1)
            try update.bind(text: now, at: 2)
            try update.bind(text: name, at: 3)
            try update.bind(int: seq, at: 4)
            _ = try update.step()
        }
        return self.cursors.withLock { cursors in
            guard var stored = cursors[name] else { return seq }
            stored.position = max(stored.position, seq)
            stored.acked = now
            cursors[name] = stored
            return stored.position
        }
    }

    /// Deletes cursor `name`, if `actor` made it (or `mayDeleteAny`) and nobody follows it.
    func delete(_ name: String, by actor: String, mayDeleteAny: Bool) throws(Refusal) {
        try self.cursors.withLock { cursors throws(Refusal) in
            guard let cursor = cursors[name] else { throw .noSuchCursor }
            guard cursor.owner == actor || mayDeleteAny else { throw .notOwner }
            guard cursor.live == nil else { throw .inUse }
            // Marked as following so that no claim takes it while the row is deleted.
            cursors[name]?.live = Follower(session: 0, subscription: -1)
        }
        do {
            try self.withConnection { connection throws(SQLiteError) in
                guard let delete = try connection.prepare(SQLText("DELETE FROM cursors WHERE name = ?"), from: 0) else { return }
                try delete.bind(text: name, at: 1)
                _ = try delete.step()
            }
            _ = self.cursors.withLock { $0.removeValue(forKey: name) }
        } catch {
            self.cursors.withLock { $0[name]?.live = nil }
            throw .notStored("\(error)")
        }
    }

    // MARK: Reading

    /// Every cursor, by name.
    var all: [Cursor] { self.cursors.withLock { $0.values.sorted { $0.name < $1.name } } }

    /// The cursor named `name`.
    func cursor(_ name: String) -> Cursor? { self.cursors.withLock { $0[name] } }

    /// The lowest position of the cursors that may receive events of `window` (`nil`: none do):
    /// retention keeps that window's events after it.
    func lowestPosition(pinning window: Journal.Window) -> Int64? {
        self.cursors.withLock { cursors in
            cursors.values.filter { $0.position >= 0 && $0.follows(window) }.map(\.position).min()
        }
    }

    private func withConnection<T>(_ body: (SQLiteConnection) throws(SQLiteError) -> T) throws(SQLiteError) -> T {
        try self.connection.withLock { connection throws(SQLiteError) in
            guard let connection else { throw SQLiteError(code: SQLITE_MISUSE, message: "the cursors' database is closed") }
            return try body(connection)
        }
    }
}

extension Cursors.Cursor {
    /// Whether events of `window` can reach this cursor: its names match some of the window's
    /// events, and (for a database's) the database is one it follows.
    func follows(_ window: Journal.Window) -> Bool {
        let patterns = self.events.map(EventPattern.init)
        func matches(_ kinds: [EventKind]) -> Bool {
            kinds.contains { kind in patterns.contains { $0.matches(kind.name) } }
        }
        switch window {
        case .sessions:
            return matches([.login, .logout])
        case .state:
            return matches([.createToken]) || patterns.contains { $0.isGlob || isNamespacedEventName($0.text) }
        case .database(let name):
            let changes = EventKind.allCases.filter { EventKind.committedChanges & (1 << UInt64($0.rawValue)) != 0 }
            return matches(changes) && (self.databases?.contains(name) ?? true)
        }
    }
}
