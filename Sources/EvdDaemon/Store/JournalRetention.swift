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
    // MARK: Retention

    /// Drops what retention no longer keeps, window by window: first the window's floor is raised
    /// (durably), then its rows at or below it are deleted, in small transactions so that writers
    /// are not held up. Called from one task at a time (the daemon's retention loop).
    ///
    /// It first keeps the databases' copies of the seq lease up to date (`keepLeaseInDatabases`).
    ///
    /// `pinned` gives a window's lowest durable-cursor position (`Cursors.lowestPosition`): what
    /// follows it is kept, unless it is older than the window's newest
    /// `cursorMaxRetainedEvents` (then the cursor's next replay gets notice `gap`).
    func prune(keepingAfter pinned: (Window) -> Int64? = { _ in nil }) throws(SQLiteError) {
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
                    if let pin = pinned(window), pin < cutoff {
                        let cap = self.settings.cursorMaxRetainedEvents
                        let capped = cap > 0 ? try Self.seqBeforeNewest(cap, of: window, on: connection) : cutoff
                        cutoff = max(pin, capped)
                    }
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
                            """
                        )
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
        let floor = self.floor(of: { $0 == window })
        // The newest `keepEvents`, from the running figures when they know it exactly. Walking
        // the window's rows from the newest reads every row it keeps, once a second: with a
        // journal of a million events, 40% of a core, taken from the writers and subscribers.
        if self.settings.keepEvents > 0 {
            let known = self.running.seqBeforeNewest(self.settings.keepEvents, of: window, above: floor)
            if let known {
                cutoff = max(cutoff, known)
            } else {
                cutoff = max(cutoff, try Self.seqBeforeNewest(self.settings.keepEvents, of: window, on: connection))
            }
        }
        if self.settings.keepSeconds > 0 {
            let before = EventTime.text(secondsAgo: self.settings.keepSeconds)
            // Nothing is old enough while the oldest row is not (a lookup by seq): the scan for
            // the newest old row reads the whole table (time has no index), once a second.
            let oldest = try connection.scalarText(
                "SELECT time FROM _evd_journal WHERE seq > \(floor) AND \(window.rows) ORDER BY seq LIMIT 1"
            )
            if let oldest, oldest < before {
                let old = try connection.scalarInt("SELECT max(seq) FROM _evd_journal WHERE time < '\(before)' AND \(window.rows)")
                cutoff = max(cutoff, old ?? 0)
            }
        }
        return cutoff
    }

    /// The seq of the newest event older than the newest `count` events of `window` in
    /// `connection`'s journal (0 when it holds no more than `count`): rows are walked from the
    /// newest, a run counting all its events.
    private static func seqBeforeNewest(_ count: Int, of window: Window, on connection: SQLiteConnection) throws(SQLiteError) -> Int64 {
        guard
            let rows = try connection.prepare(
                SQLText("SELECT seq, first FROM _evd_journal WHERE \(window.rows) ORDER BY seq DESC"),
                from: 0
            )
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
