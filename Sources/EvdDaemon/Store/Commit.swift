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
        let staged = try self.stageCommit(database: database, origin: origin, bus: bus, journal: journal, events: prepared)
        defer {
            // Once the capture is discarded (on a failed COMMIT it stays, and so does its memory).
            if staged.large, self.capture.isEmpty { _ = evd_malloc_trim() }
        }
        do throws(SQLiteError) {
            try self.identity.check()  // nothing is committed into a file deleted or replaced under evd
            try self.run(own: "COMMIT")
        } catch {
            self.unstage(staged, bus: bus)
            throw error
        }
        self.committedThrough = self.publish(staged, bus: bus, journal: journal)
        self.capture.discardAll()
    }

    /// Everything of a COMMIT but the COMMIT: the transaction's committed events made and, when
    /// the journal is on, numbered and journaled inside the transaction. `publish` then sends
    /// them once the COMMIT succeeded; `unstage` takes them back when it did not.
    ///
    /// `grouped`: a member of a commit group (`CommitGroup`), whose capture is discarded before
    /// the group commits: its events are numbered now even without a journal, and, when there are
    /// few enough, made now; when there are more, the capture must be kept until the COMMIT
    /// (`StagedCommit.needsCapture`). On failure nothing stays staged.
    func stageCommit(
        database: String,
        origin: EventOrigin,
        bus: EventBus,
        journal: Journal?,
        events prepared: [CommittedEvent]? = nil,
        grouped: Bool = false
    ) throws(SQLiteError) -> StagedCommit {
        let events = prepared.map(CommittedEvents.init) ?? self.capture.committedEvents(database: database)
        let large = self.capture.recordedCount >= Self.trimAfterRows || events.count > Self.eventChunk
        // The schema version the row events carry: as of this COMMIT, the transaction's own DDL
        // included (read inside it; `nil` should the read fail: they then go without it).
        let schemaVersion = events.isEmpty ? nil : try? self.schema.version(self.sqlite)
        var staged = StagedCommit(
            database: database,
            events: events,
            origin: origin,
            schemaVersion: schemaVersion,
            large: large
        )
        guard !events.isEmpty else { return staged }
        guard let journal, journal.settings.enabled else {
            if grouped {
                let reservation = bus.reserve(events.count)
                staged.reservation = reservation
                if events.count <= Self.eventChunk {
                    staged.kept = events.publications(0..<events.count, origin: origin, stamp: staged.stamp)
                }
            }
            return staged
        }
        let reservation = bus.reserve(events.count)
        staged.reservation = reservation
        // Every event carries its transaction: the seq of its first event (`TxStamp`).
        let stamp = staged.stamp
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
                    // A small transaction's events are made once, kept for publishing.
                    if chunk.count == events.count { staged.kept = made }
                    start = chunk.upperBound
                }
                staged.journaledBytes = bytes
            } catch {
                self.unstage(staged, bus: bus)
                throw error
            }
        }
        return staged
    }

    /// Takes staged events back after the COMMIT failed (or was never run): their journal rows
    /// out of a transaction still open, their seqs given up.
    func unstage(_ staged: StagedCommit, bus: EventBus) {
        guard let reservation = staged.reservation else { return }
        if staged.journaledBytes != nil, self.sqlite.inTransaction {
            self.capture.withoutRecording {
                try? self.sqlite.exec("DELETE FROM _evd_journal WHERE seq BETWEEN \(reservation.first) AND \(reservation.last)")
            }
        }
        bus.cancel(reservation)
    }

    /// Publishes staged events once their COMMIT succeeded, in order, with what was held back for
    /// them; returns the last seq they took (nil: none). Events not made yet are made now from the
    /// capture, a chunk at a time (so call it before the capture is discarded): the same bytes as
    /// journaled; events nobody subscribed to are not made at all.
    func publish(_ staged: StagedCommit, bus: EventBus, journal: Journal?) -> Int64? {
        let events = staged.events
        guard !events.isEmpty else { return nil }
        guard let reservation = staged.reservation else {
            return bus.publishCommitted(events, origin: staged.origin, schemaVersion: staged.schemaVersion)
        }
        if let bytes = staged.journaledBytes {
            journal?.running.add(.database(staged.database), first: reservation.first, count: events.count, bytes: bytes)
        }
        if let kept = staged.kept {
            bus.complete(reservation, kept)
        } else {
            let (origin, stamp) = (staged.origin, staged.stamp)
            bus.complete(reservation, batch: Self.eventChunk) { range, wanted in
                events.publications(range, origin: origin, wanted: wanted, stamp: stamp)
            }
        }
        return reservation.last
    }
}

/// A transaction's committed events between the journal and the COMMIT (`stageCommit`).
struct StagedCommit {
    let database: String
    let events: CommittedEvents
    let origin: EventOrigin
    let schemaVersion: Int64?
    /// Whether the transaction was big enough to give its memory back after it (`trimAfterRows`).
    let large: Bool
    /// Their seqs (nil: none yet; without a journal they are numbered when published).
    var reservation: SeqReservation?
    /// The events, made already (nil: made from the capture when published).
    var kept: [Publication]?
    /// The bytes journaled (nil: not journaled).
    var journaledBytes: Int?

    /// The transaction's members every event carries.
    var stamp: TxStamp? { self.reservation.map { TxStamp($0, schemaVersion: self.schemaVersion) } }

    /// Whether publishing needs the capture the events were planned from.
    var needsCapture: Bool { !self.events.isEmpty && self.kept == nil }
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
