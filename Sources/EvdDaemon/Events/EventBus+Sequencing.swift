import EvdClient

/// Numbering and ordering: every event gets the next daemon-wide seq, and every subscription
/// receives seqs in order — events numbered after a pending reservation (a transaction being
/// journaled) are held back until it completes or is cancelled.
extension EventBus {
    // MARK: Numbering

    /// Numbers an event and queues it to every matching subscription.
    @discardableResult
    func publish(name: String, kind: EventKind?, origin: EventOrigin, properties: JSONObject) -> Int64 {
        let event = self.entry(name: name, kind: kind, origin: origin, properties: properties)
        var wakeups: [Outbox.Wakeup] = []
        let seq = self.state.withLock { state -> Int64 in
            state.seq += 1
            state.published[name, default: 0] += 1
            if kind == nil { state.customNames.append(name) }
            Self.dispatch(&state, NumberedEvent(seq: state.seq, event: .entry(event)), wakeups: &wakeups)
            return state.seq
        }
        for wakeup in wakeups { wakeup.resume() }
        self.lease?.cover(seq)
        return seq
    }

    /// Delivers a numbered event now, or holds it back while an older reservation is pending.
    static func dispatch(_ state: inout State, _ event: NumberedEvent, wakeups: inout [Outbox.Wakeup]) {
        guard let oldest = state.pending.first, event.seq > oldest else {
            Self.deliver(&state, event, wakeups: &wakeups)
            return
        }
        var event = event
        if event.time == nil {
            var time: [UInt8] = []
            EventTime.appendNow(to: &time)
            event.time = time
        }
        // Events arrive in seq order except a reservation's, which slot in before later ones.
        if let last = state.held.last, last.seq > event.seq {
            var low = 0
            var high = state.held.count
            while low < high {
                let middle = (low + high) / 2
                if state.held[middle].seq < event.seq { low = middle + 1 } else { high = middle }
            }
            state.held.insert(event, at: low)
        } else {
            state.held.append(event)
        }
    }

    /// Delivers the held events that no pending reservation precedes any more.
    /// (`bound`: only those below it, the reservation that completes being the oldest.)
    static func releaseHeld(_ state: inout State, below bound: Int64? = nil, wakeups: inout [Outbox.Wakeup]) {
        let bound = bound ?? state.pending.first ?? .max
        var released = 0
        while released < state.held.count, state.held[released].seq < bound {
            Self.deliver(&state, state.held[released], wakeups: &wakeups)
            released += 1
        }
        if released > 0 { state.held.removeFirst(released) }
    }

    /// Numbers and queues events made outside the lock (none `unwanted`), in order, under one
    /// lock: consecutive seqs, one time for all. Returns the last seq given (nil: none).
    @discardableResult
    func publish(_ made: [Publication]) -> Int64? {
        guard !made.isEmpty else { return nil }
        var time: [UInt8] = []
        EventTime.appendNow(to: &time)
        var wakeups: [Outbox.Wakeup] = []
        let seq = self.state.withLock { state in
            for publication in made {
                let first = state.seq + 1
                state.seq += Int64(publication.count)
                state.published[publication.name, default: 0] += publication.count
                Self.dispatch(&state, NumberedEvent(seq: first, event: publication, time: time), wakeups: &wakeups)
            }
            return state.seq
        }
        for wakeup in wakeups { wakeup.resume() }
        self.lease?.cover(seq)
        return seq
    }

    // MARK: Journaled events

    /// A custom (or daemon) event's bytes, made once for the journal and every subscriber; a
    /// committed event's with its transaction's members (`stamp`, and `tx_end` when it is the
    /// transaction's last: its seq is `seq`).
    func entry(
        name: String,
        kind: EventKind?,
        origin: EventOrigin,
        properties: JSONObject,
        stamp: TxStamp? = nil,
        seq: Int64 = 0
    ) -> JournalEntry {
        let end = seq == stamp?.last
        let body = WireLines.body(origin, properties, kind: kind, stamp: stamp, end: end)
        var properties = properties
        stamp?.add(to: &properties, kind: kind, end: end)
        return JournalEntry(name: name, kind: kind, origin: origin, properties: properties, body: body, imagesBody: nil)
    }

    /// Hands out `count` consecutive seqs for events to be journaled before they are published.
    /// Until `complete` or `cancel`, events numbered later are held back.
    func reserve(_ count: Int) -> SeqReservation {
        var time: [UInt8] = []
        EventTime.appendNow(to: &time)
        let first = self.state.withLock { state -> Int64 in
            let first = state.seq + 1
            state.seq += Int64(count)
            state.pending.append(first)  // seqs only grow: `pending` stays sorted
            return first
        }
        let reservation = SeqReservation(first: first, count: count, time: time)
        self.lease?.cover(reservation.last)
        return reservation
    }

    /// Publishes a reservation's events (journaled and committed), then what was held back for it.
    func complete(_ reservation: SeqReservation, _ entries: [JournalEntry]) {
        precondition(entries.count == reservation.count, "a reservation's events are all published")
        self.complete(reservation) { range, _ in entries[range].map { .entry($0) } }
    }

    /// Publishes a reservation's events made already (and journaled), in one batch.
    func complete(_ reservation: SeqReservation, _ publications: [Publication]) {
        self.complete(reservation, batch: reservation.count) { _, _ in publications }
    }

    /// Publishes a reservation's events, made a batch at a time by `make` (so that a huge
    /// transaction's events need not all exist at once), then what was held back for it. `make`
    /// returns the entries of the range it is given; it may leave bare those of catalog events not
    /// in `wanted` (`entries(of:_:origin:wanted:)`): nobody would receive them. Should a
    /// subscription that wants them come before they are queued, the batch is made again.
    func complete(
        _ reservation: SeqReservation,
        batch: Int = 512,
        making make: (Range<Int>, _ wanted: UInt64) -> [Publication]
    ) {
        var start = 0
        repeat {
            // In batches, so that one huge transaction does not hold the lock for long; later
            // events stay held until the last batch.
            let end = min(reservation.count, start + max(1, batch))
            var wanted = self.interest.load(ordering: .relaxed)
            var entries = make(start..<end, wanted)
            precondition(entries.reduce(0) { $0 + $1.count } == end - start, "a reservation's events are all published")
            var wakeups: [Outbox.Wakeup] = []
            while true {
                let queued = self.state.withLock { state -> Bool in
                    // When no older reservation is pending, this one's events go out now: after those
                    // of its earlier batches that waited for an older one. (Held back behind their own
                    // reservation, a batch would reach subscribers after the last one.)
                    let oldest = state.pending.first.map { $0 >= reservation.first } ?? true
                    // What the batch must have bytes for: the events someone wants now (the interest
                    // changes only under this lock), or all of them if they are held back, as
                    // someone may want them by the time they are released.
                    let needed = oldest ? self.interest.load(ordering: .relaxed) : .max
                    guard needed & ~wanted == 0 else {
                        wanted |= needed  // only grows: the batch is made again at most 64 times
                        return false
                    }
                    if end == reservation.count { state.pending.removeAll { $0 == reservation.first } }
                    if oldest { Self.releaseHeld(&state, below: reservation.first + Int64(start), wakeups: &wakeups) }
                    var offset = start
                    for entry in entries {
                        state.published[entry.name, default: 0] += entry.count
                        if entry.kind == nil { state.customNames.append(entry.name) }
                        let numbered = NumberedEvent(seq: reservation.first + Int64(offset), event: entry, time: reservation.time)
                        offset += entry.count
                        if oldest {
                            Self.deliver(&state, numbered, wakeups: &wakeups)
                        } else {
                            Self.dispatch(&state, numbered, wakeups: &wakeups)
                        }
                    }
                    if end == reservation.count {
                        if state.delivering?.first == reservation.first { state.delivering = nil }
                        Self.releaseHeld(&state, wakeups: &wakeups)
                    } else if oldest {
                        // Still pending, yet delivered this far: a subscription added before the
                        // next batch must replay these from the journal, not wait for them live.
                        state.delivering = (reservation.first, reservation.first + Int64(end) - 1)
                    }
                    return true
                }
                if queued { break }
                entries = make(start..<end, wanted)
            }
            for wakeup in wakeups { wakeup.resume() }
            start = end
        } while start < reservation.count
    }

    /// Gives a reservation up (its transaction did not commit): its seqs are never used.
    func cancel(_ reservation: SeqReservation) {
        var wakeups: [Outbox.Wakeup] = []
        self.state.withLock { state in
            state.pending.removeAll { $0 == reservation.first }
            Self.releaseHeld(&state, wakeups: &wakeups)
        }
        for wakeup in wakeups { wakeup.resume() }
    }

    /// Journals committed events of one origin that belong to no database transaction (custom
    /// events, `login`, `logout`, `create-token`) in `journal`'s state database, then publishes
    /// them; returns their seqs, in order. Journaled, they have consecutive seqs (one reservation)
    /// and share one commit, with other callers' too (`Journal.appendToState`).
    func publishJournaled(
        _ events: [(name: String, kind: EventKind?, properties: JSONObject)],
        origin: EventOrigin,
        journal: (any StateJournal)?
    ) async throws -> [Int64] {
        guard !events.isEmpty else { return [] }
        // Each is a transaction of its own (`tx` its own seq, `tx_end`), journaled or not: the
        // seqs are reserved first, for the bodies to carry them.
        let reservation = self.reserve(events.count)
        let entries = events.enumerated().map { offset, event in
            let seq = reservation.first + Int64(offset)
            return self.entry(
                name: event.name,
                kind: event.kind,
                origin: origin,
                properties: event.properties,
                stamp: TxStamp(tx: seq, last: seq),
                seq: seq
            )
        }
        if let journal, journal.isEnabled {
            do {
                try await journal.append(entries, reservation)
            } catch {
                self.cancel(reservation)
                throw error
            }
        }
        self.complete(reservation, entries)
        return (0..<Int64(entries.count)).map { reservation.first + $0 }
    }
}
