import CSQLite
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Wakes evd's connections that wait for a database's write lock the moment one of them commits.
///
/// SQLite's own busy handler (`sqlite3_busy_timeout`) sleeps between attempts — 1 ms, then 2, 5,
/// 10 ... — so with a few sessions writing at once, each write waits milliseconds for a lock that
/// was free after microseconds. Every pooled connection gets a `BusyWaiter` instead: it waits on
/// this gate, which the WAL hook opens after each commit (when SQLite has released the lock), and
/// tries again at once. A commit it cannot see (another process's, a rollback) is caught by the
/// wait's short bound, `retryInterval`.
///
/// `@unchecked Sendable`: shared by every connection of a database and safe from any thread: its
/// one mutable field, `commits`, is read and written only with `mutex` held, and the mutex and
/// condition are allocated once (they must not move) and freed only in `deinit`.
final class WriteGate: @unchecked Sendable {
    /// The longest one wait lasts before the lock is tried again, seen or not.
    static let retryIntervalNs: UInt64 = 500_000

    /// `pthread` objects must not move: they live in memory of their own. Guarded by `mutex`.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var commits: UInt64 = 0

    init() {
        pthread_mutex_init(self.mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(self.condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(self.condition)
        pthread_mutex_destroy(self.mutex)
        self.condition.deallocate()
        self.mutex.deallocate()
    }

    /// A connection committed and released the write lock: every waiter tries again.
    func committed() {
        pthread_mutex_lock(self.mutex)
        self.commits &+= 1
        pthread_cond_broadcast(self.condition)
        pthread_mutex_unlock(self.mutex)
    }

    /// Waits for the next commit, at most `nanoseconds`.
    func waitForCommit(atMost nanoseconds: UInt64) {
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let total = UInt64(deadline.tv_nsec) + nanoseconds
        deadline.tv_sec += Int(total / 1_000_000_000)
        deadline.tv_nsec = Int(total % 1_000_000_000)
        pthread_mutex_lock(self.mutex)
        let seen = self.commits
        while self.commits == seen {
            if pthread_cond_timedwait(self.condition, self.mutex, &deadline) == ETIMEDOUT { break }
        }
        pthread_mutex_unlock(self.mutex)
    }

    static func monotonicNanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}

/// One pooled connection's busy handler: waits at the database's `WriteGate` until its busy
/// timeout (the session's `busy_timeout_ms`) has passed, then lets SQLite report SQLITE_BUSY.
///
/// Installing it replaces SQLite's own handler, so `PRAGMA busy_timeout` reads 0 on pooled
/// connections; `timeoutMs` is the setting that counts.
///
/// `@unchecked Sendable`: its state is atomic (`timeoutMs`, written by the connection's session
/// in `PooledConnection.apply`, read by SQLite's callback; the wait's start, written and read by
/// the callback), so it needs no claim of its own; they were plain `var`s, safe only under the
/// connection's exclusive use. `gate` is shared and safe (`WriteGate`). The one `var`, the
/// debug builds' `connection`, is set once by `install`, before SQLite can call back.
final class BusyWaiter: @unchecked Sendable {
    let gate: WriteGate
    private let timeout: Atomic<Int32>
    private let startedNs = Atomic<UInt64>(0)
    #if DEBUG
    /// The connection it is installed on (debug builds: the callback checks that it runs inside
    /// a use of it). Not retained: the connection keeps the waiter, and removes the handler
    /// before it goes.
    private unowned(unsafe) var connection: SQLiteConnection?
    #endif

    /// Set by the connection's session (`PooledConnection.apply`); read by SQLite's callback.
    var timeoutMs: Int32 {
        get { self.timeout.load(ordering: .relaxed) }
        set { self.timeout.store(newValue, ordering: .relaxed) }
    }

    init(gate: WriteGate, timeoutMs: Int32) {
        self.gate = gate
        self.timeout = Atomic(timeoutMs)
    }

    /// Installs the handler on `connection`. The connection keeps this waiter until it closes,
    /// which removes the handler first.
    func install(on connection: SQLiteConnection) {
        #if DEBUG
        self.connection = connection
        #endif
        sqlite3_busy_handler(
            connection.handle,
            { context, attempts in
                guard let context else { return 0 }
                return Unmanaged<BusyWaiter>.fromOpaque(context).takeUnretainedValue().retry(after: attempts) ? 1 : 0
            },
            Unmanaged.passUnretained(self).toOpaque()
        )
        connection.installed(.busy, owner: self)
    }

    /// Whether SQLite should try to take the lock again, after waiting for a commit.
    private func retry(after attempts: Int32) -> Bool {
        #if DEBUG
        self.connection?.exclusiveUse.assertInside()
        #endif
        let now = WriteGate.monotonicNanoseconds()
        if attempts == 0 { self.startedNs.store(now, ordering: .relaxed) }
        let deadline = self.startedNs.load(ordering: .relaxed) + UInt64(max(self.timeoutMs, 0)) * 1_000_000
        guard now < deadline else { return false }
        self.gate.waitForCommit(atMost: min(deadline - now, WriteGate.retryIntervalNs))
        return true
    }
}
