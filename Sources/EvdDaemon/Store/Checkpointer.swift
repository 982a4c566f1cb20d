import CSQLite
import NIOPosix
import Synchronization

/// Keeps one database's write-ahead log short from a thread of its own, so that commits never
/// wait for a checkpoint.
///
/// SQLite's default (`wal_autocheckpoint = 1000`) runs the checkpoint inside the COMMIT that grew
/// the WAL past 1000 pages: that commit copies the WAL back into the database file and fsyncs it
/// while its client waits, and a session's p99 is mostly those commits. Instead, every pool
/// connection gets a WAL hook that, past `threshold` pages, asks this checkpointer to run a
/// PASSIVE checkpoint on its own connection and thread. A PASSIVE checkpoint never blocks writers
/// or readers; when it has copied every frame, the next writer starts the WAL over from the
/// beginning, so the file stays about `threshold` pages long.
///
/// `threshold` is 4000 pages (16 MiB of 4 KiB pages), not SQLite's 1000: each checkpoint pays two
/// fdatasyncs, and copies once a page that many commits rewrote (the B-tree's right edge, the
/// journal's last pages). On the 2-core machine the bulk insert of `scripts/bench` spent about a
/// fifth of evd's CPU in checkpoints at 1000 pages; at 4000 it went from 560k to 600k rows/s
/// (2000: 590k; 8000: no faster, and burstier).
///
/// If the WAL still outgrows `inlineThreshold` pages (a reader holding an old snapshot, or a disk
/// slower than the writers), the committing connection checkpoints itself, as SQLite would: the
/// writers then slow down instead of the WAL growing without bound.
final class Checkpointer: Sendable {
    /// WAL pages that trigger a background checkpoint (`EvdConfiguration.checkpointPages`).
    let threshold: Int32
    /// WAL pages past which the committing connection checkpoints itself.
    let inlineThreshold: Int32

    let path: String
    /// The checkpoints' own thread, at a lower priority than the sessions' (`nice` 10): on a
    /// machine with few cores a checkpoint takes the time the requests leave, not theirs.
    private let thread = NIOThreadPool(numberOfThreads: 1)
    /// Whether a checkpoint is queued or running: many commits past the threshold ask for one.
    private let scheduled = Atomic<Bool>(false)
    private struct State {
        var connection: SQLiteConnection?
        var closed = false
    }
    /// Used only on `thread`, and by `close`.
    private let state = Mutex(State())

    /// Opened after every commit of a watched connection (the WAL hook runs once the write lock
    /// is released).
    let gate: WriteGate
    /// A checkpoint copies the WAL at the database's path into the file its connection opened:
    /// never once the path names another file (`DatabaseIdentity`).
    let identity: DatabaseIdentity

    init(path: String, gate: WriteGate, identity: DatabaseIdentity, threshold: Int32 = 4000) {
        self.identity = identity
        self.threshold = threshold
        self.inlineThreshold = max(16_000, 4 * threshold)
        self.path = path
        self.thread.start()
        self.gate = gate
    }

    /// Installs the WAL hook on `connection`: it opens the write gate and schedules checkpoints.
    /// Replaces SQLite's own autocheckpoint on that connection. The connection keeps this
    /// checkpointer until it closes, which removes the hook first.
    func watch(_ connection: SQLiteConnection) {
        let context = Unmanaged.passUnretained(self).toOpaque()
        sqlite3_wal_hook(
            connection.handle,
            { context, db, _, pages in
                guard let context else { return SQLITE_OK }
                let checkpointer = Unmanaged<Checkpointer>.fromOpaque(context).takeUnretainedValue()
                checkpointer.gate.committed()
                if pages >= checkpointer.inlineThreshold {
                    sqlite3_wal_checkpoint_v2(db, nil, SQLITE_CHECKPOINT_PASSIVE, nil, nil)
                } else if pages >= checkpointer.threshold {
                    checkpointer.schedule()
                }
                return SQLITE_OK
            },
            context
        )
        connection.installed(.wal, owner: self)
    }

    /// Queues a checkpoint unless one is already queued or running.
    func schedule() {
        guard !self.scheduled.exchange(true, ordering: .acquiringAndReleasing) else { return }
        self.thread.submit { state in
            if state == .active { self.checkpoint() }
            self.scheduled.store(false, ordering: .releasing)
        }
    }

    private func checkpoint() {
        self.state.withLock { state in
            guard !state.closed, (try? self.identity.check()) != nil else { return }
            if state.connection == nil {
                evd_lower_thread_priority(10)  // the first checkpoint, on `thread`
                guard let connection = try? SQLiteConnection(path: self.path, flags: SQLITE_OPEN_READWRITE) else { return }
                if (try? self.identity.opened(connection)) == nil {
                    ConnectionPool.keepWALOnClose(connection)
                    return
                }
                state.connection = connection
                // A connection that has not read the database yet does not know it is in WAL mode:
                // a checkpoint on it does nothing at all (SQLITE_OK, -1 frames). One read opens
                // the WAL for good.
                try? state.connection?.exec("PRAGMA main.schema_version")
            }
            guard let connection = state.connection else { return }
            // SQLITE_BUSY (another checkpoint is running) and a partial checkpoint (a reader still
            // needs old frames) are both fine: the next commit past the threshold asks again.
            sqlite3_wal_checkpoint_v2(connection.handle, nil, SQLITE_CHECKPOINT_PASSIVE, nil, nil)
        }
    }

    /// Closes the checkpointer's connection, for good: the last connection to close checkpoints
    /// the whole WAL and removes it. Call after the pool's connections are closed.
    func close() async {
        _ = try? await self.thread.runIfActive {
            self.state.withLock { state in
                state.closed = true
                state.connection = nil
            }
        }
        try? await self.thread.shutdownGracefully()
    }
}
