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
        database: String,
        origin: EventOrigin,
        bus: EventBus,
        journal: Journal?,
        events prepared: [CommittedEvent]? = nil
    ) throws(SQLiteError) {
        self.committedThrough = nil
        let events = prepared.map(CommittedEvents.init) ?? self.capture.committedEvents(database: database)
        let large = self.capture.recordedCount >= Self.trimAfterRows || events.count > Self.eventChunk
        defer {
            // Once the capture is discarded (on a failed COMMIT it stays, and so does its memory).
            if large, self.capture.isEmpty { _ = evd_malloc_trim() }
        }
        // The schema version the row events carry: as of this COMMIT, the transaction's own DDL
        // included (read inside it; `nil` should the read fail: they then go without it).
        let schemaVersion = events.isEmpty ? nil : try? self.schema.version(self.sqlite)
        guard let journal, journal.settings.enabled, !events.isEmpty else {
            try self.identity.check()  // nothing is committed into a file deleted or replaced under evd
            try self.run(own: "COMMIT")
            if !events.isEmpty {
                self.committedThrough = bus.publishCommitted(events, origin: origin, schemaVersion: schemaVersion)
            }
            self.capture.discardAll()
            return
        }
        let reservation = bus.reserve(events.count)
        // Every event carries its transaction: the seq of its first event (`TxStamp`).
        let stamp = TxStamp(reservation, schemaVersion: schemaVersion)
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
                    let made = events.publications(chunk, origin: origin, stamp: stamp)
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
                        "DELETE FROM _evd_journal WHERE seq BETWEEN \(reservation.first) AND \(reservation.last)"
                    )
                }
                bus.cancel(reservation)
                throw error
            }
        }
        self.committedThrough = reservation.last
        if let kept {
            bus.complete(reservation, kept)
        } else {
            // Made again, a chunk at a time, from the capture (so before it is discarded): the same
            // bytes as journaled. Events nobody subscribed to are not made at all.
            bus.complete(reservation, batch: Self.eventChunk) { range, wanted in
                events.publications(range, origin: origin, wanted: wanted, stamp: stamp)
            }
        }
        self.capture.discardAll()
    }
}

extension EventBus {
    /// Publishes a transaction's committed events when the journal is off, in order, with
    /// consecutive seqs (one reservation, as when journaled: `tx` is the first, and every event
    /// takes one). The events are made a batch at a time, and only those someone wants. Returns
    /// the last seq it gave.
    func publishCommitted(_ events: CommittedEvents, origin: EventOrigin, schemaVersion: Int64?) -> Int64 {
        let reservation = self.reserve(events.count)
        let stamp = TxStamp(reservation, schemaVersion: schemaVersion)
        self.complete(reservation, batch: PooledConnection.eventChunk) { range, wanted in
            events.publications(range, origin: origin, wanted: wanted, stamp: stamp)
        }
        return reservation.last
    }
}

extension CommittedEvent {
    /// Its bytes, made once for the journal and every subscriber (a prepared transaction's
    /// events, kept as properties and JSON images), with its transaction's members (`end`: it
    /// is the transaction's last event).
    func entry(origin: EventOrigin, stamp: TxStamp?, end: Bool) -> JournalEntry {
        let body = WireLines.body(origin, self.properties, kind: self.kind, stamp: stamp, end: end)
        var properties = self.properties
        stamp?.add(to: &properties, kind: self.kind, end: end)
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
            name: self.kind.name,
            kind: self.kind,
            origin: origin,
            properties: properties,
            body: body,
            imagesBody: imagesBody
        )
    }
}
