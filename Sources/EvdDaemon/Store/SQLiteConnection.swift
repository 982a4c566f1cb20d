import CSQLite
import EvdClient
import OrderedCollections

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One SQLite connection (`sqlite3*`).
///
/// `@unchecked Sendable`: SQLite is opened with `SQLITE_OPEN_NOMUTEX` (multi-thread mode), which is
/// safe as long as the connection is in exclusive use: one thread inside it at a time (not one
/// thread: a session's task may resume on another database thread after each suspension; the
/// executor's hand-over orders one thread's use before the next's). The pool guarantees that: a
/// connection is checked out to exactly one session, and a session runs one request at a time.
/// Debug builds check it (`exclusiveUse`, entered by `exec`, `prepare` and its statements' `step`
/// and `reset`).
///
/// **Hooks.** The C callbacks evd installs on the connection (the pre-update hook of
/// `ChangeCapture`, the authorizer, the WAL hook of `Checkpointer`, the busy handler of
/// `BusyWaiter`) are registered here (`installed(_:owner:)`): the connection keeps each hook's
/// object alive while the hook points at it, and `close` removes every hook before it closes the
/// handle, so SQLite can never call back into a freed object.
public final class SQLiteConnection: @unchecked Sendable {
    let handle: OpaquePointer
    /// The path it was opened on.
    public let path: String
    /// Checks the claim of exclusive use in debug builds (nothing in release builds).
    let exclusiveUse = ExclusiveUse("SQLiteConnection")

    /// A C hook evd installs on a connection.
    enum Hook: CaseIterable, Sendable {
        case preUpdate, authorizer, wal, busy
    }

    /// The objects the installed hooks' callbacks point at, kept alive until `close` (or
    /// `uninstallHooks`) removes the hooks. The owners hold this connection in turn: the cycle
    /// is broken by `close` (`PooledConnection` closes its connection at the latest in its deinit).
    private var hookOwners: [Hook: AnyObject] = [:]
    private var closed = false

    /// SQLite's process-wide settings, made before the first connection opens (they cannot change
    /// once SQLite is initialized). Memory statistics are off: evd reads none, and keeping them
    /// takes a process-wide mutex on every allocation SQLite makes (several per row it reads,
    /// and per row image the pre-update hook takes).
    private static let configured: Void = {
        _ = evd_sqlite_config_memstatus(0)
    }()

    /// Opens `path` with `flags` (`SQLITE_OPEN_*`). With `SQLITE_OPEN_CREATE`, a database file that
    /// does not exist is created 0600 first (`DatabaseFiles.createPrivately`), whatever the umask.
    public init(path: String, flags: Int32) throws(SQLiteError) {
        Self.configured
        if flags & SQLITE_OPEN_CREATE != 0 { DatabaseFiles.createPrivately(path) }
        var db: OpaquePointer?
        let rc = sqlite3_open_v2(path, &db, flags | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE, nil)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { Self.message($0, code: rc) } ?? String(cString: sqlite3_errstr(rc))
            if let db { sqlite3_close_v2(db) }
            throw SQLiteError(code: rc, message: message)
        }
        sqlite3_extended_result_codes(db, 1)
        // On every connection, evd's own too: no writable_schema, no writes to shadow tables or
        // sqlite_dbpage (DEFENSIVE), no fts3_tokenizer() with a pointer (it crashed evd).
        _ = evd_sqlite_db_config_flag(db, SQLITE_DBCONFIG_DEFENSIVE, 1)
        _ = evd_sqlite_db_config_flag(db, SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, 0)
        _ = evd_sqlite_db_config_flag(db, SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0)
        self.handle = db
        self.path = path
    }

    deinit {
        self.close()
    }

    /// Records that `hook` is installed with `owner` as its callback's context: the connection
    /// keeps `owner` alive until the hook is removed.
    func installed(_ hook: Hook, owner: AnyObject) {
        self.hookOwners[hook] = owner
    }

    /// The hooks installed now (`installed(_:owner:)`).
    var installedHooks: Set<Hook> { Set(self.hookOwners.keys) }

    /// Removes every C hook evd installed, and lets their objects go.
    func uninstallHooks() {
        self.exclusiveUse.run {
            for hook in self.hookOwners.keys {
                switch hook {
                case .preUpdate: sqlite3_preupdate_hook(self.handle, nil, nil)
                case .authorizer: sqlite3_set_authorizer(self.handle, nil, nil)
                case .wal: sqlite3_wal_hook(self.handle, nil, nil)
                case .busy: sqlite3_busy_handler(self.handle, nil, nil)
                }
            }
            self.hookOwners.removeAll()
        }
    }

    /// Closes the connection (once; later calls do nothing): first every hook is removed, then the
    /// handle is closed (`sqlite3_close_v2`: statements not finalized yet keep it until they are;
    /// nothing may step them). A close may checkpoint the WAL: not on an event loop.
    public func close() {
        guard !self.closed else { return }
        self.uninstallHooks()
        self.closed = true
        sqlite3_close_v2(self.handle)
    }

    /// Whether `close` ran.
    var isClosed: Bool { self.closed }

    /// The current error as a `SQLiteError`.
    ///
    /// An I/O error's message gets the operating system's reason: SQLite's own is only "disk I/O
    /// error", which is all evd said when a full disk kept it from making a database's `-shm`
    /// file (`SQLITE_IOERR_SHMSIZE`) — SQLite reports ENOSPC as `SQLITE_FULL` ("database or disk
    /// is full") only for its database, journal and WAL files.
    func lastError(_ rc: Int32, sql: String? = nil) -> SQLiteError {
        let extended = sqlite3_extended_errcode(self.handle)
        let code = extended != 0 ? extended : rc
        return SQLiteError(code: code, message: Self.message(self.handle, code: code), sql: sql)
    }

    /// SQLite's message for `code` on `db`, with the operating system's reason for an I/O error
    /// or a file that could not be opened ("disk I/O error: No space left on device").
    private static func message(_ db: OpaquePointer, code: Int32) -> String {
        let message = String(cString: sqlite3_errmsg(db))
        let systemErrno = sqlite3_system_errno(db)
        guard code & 0xff == SQLITE_IOERR || code & 0xff == SQLITE_CANTOPEN, systemErrno != 0 else { return message }
        return message + ": " + String(cString: strerror(systemErrno))
    }

    /// Runs one or more statements that return no rows (pragmas, BEGIN, COMMIT).
    public func exec(_ sql: String) throws(SQLiteError) {
        let rc = self.exclusiveUse.run { sqlite3_exec(self.handle, sql, nil, nil, nil) }
        if rc != SQLITE_OK { throw self.lastError(rc, sql: sql) }
    }

    /// The first column of the first row of `sql`, as an integer.
    func scalarInt(_ sql: String) throws(SQLiteError) -> Int64? {
        guard let statement = try self.prepare(SQLText(sql), from: 0), try statement.step() else { return nil }
        return statement.column(0).intValue
    }

    /// The first column of the first row of `sql`, as text.
    func scalarText(_ sql: String) throws(SQLiteError) -> String? {
        guard let statement = try self.prepare(SQLText(sql), from: 0), try statement.step() else { return nil }
        return statement.column(0).stringValue
    }

    /// Whether a transaction is open on this connection.
    public var inTransaction: Bool { sqlite3_get_autocommit(self.handle) == 0 }

    /// Sets how long a statement waits for a lock another connection holds.
    public func setBusyTimeout(milliseconds: Int32) {
        sqlite3_busy_timeout(self.handle, milliseconds)
    }

    /// The total rows changed by INSERT, UPDATE and DELETE (triggers included) since opening.
    public var totalChanges: Int64 { sqlite3_total_changes64(self.handle) }
    /// The rows changed by the most recent INSERT, UPDATE or DELETE.
    public var changes: Int64 { sqlite3_changes64(self.handle) }
    /// The rowid of the most recent successful INSERT; the pool sets it back to 0 at checkin, so a
    /// session never sees the rowid of another session's insert.
    public var lastInsertRowid: Int64 {
        get { sqlite3_last_insert_rowid(self.handle) }
        set { sqlite3_set_last_insert_rowid(self.handle, newValue) }
    }

    /// Prepares the first statement of `sql` starting at byte `offset`; returns `nil` when only
    /// whitespace and comments remain.
    public func prepare(_ sql: SQLText, from offset: Int) throws(SQLiteError) -> SQLiteStatement? {
        let entered = self.exclusiveUse.enter()
        defer { self.exclusiveUse.leave(entered) }
        var result: Result<SQLiteStatement?, SQLiteError> = .success(nil)
        // Skip the whitespace before the statement, so that its text (the events' `statement`) starts
        // with the statement itself.
        var offset = offset
        while offset < sql.utf8.count - 1, sql.utf8[offset] == 32 || (9...13).contains(sql.utf8[offset]) { offset += 1 }
        sql.utf8.withUnsafeBufferPointer { buffer in
            let base = UnsafeRawPointer(buffer.baseAddress!).assumingMemoryBound(to: CChar.self)
            var stmt: OpaquePointer?
            var tail: UnsafePointer<CChar>?
            let rc = sqlite3_prepare_v3(
                self.handle,
                base + offset,
                Int32(buffer.count - 1 - offset),
                0,
                &stmt,
                &tail
            )
            if rc != SQLITE_OK {
                result = .failure(self.lastError(rc, sql: sql.text))
                return
            }
            let end = tail.map { $0 - base } ?? (buffer.count - 1)
            guard let stmt else { return }  // nothing but whitespace or comments
            result = .success(SQLiteStatement(handle: stmt, connection: self, tailOffset: end))
        }
        return try result.get()
    }
}
