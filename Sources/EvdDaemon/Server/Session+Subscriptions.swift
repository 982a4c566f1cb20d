import EvdClient
import OrderedCollections
import Synchronization

/// `events`, `subscribe` with its replay from the journal, `unsubscribe` (PROTOCOL.md §3, §5).
extension Session {
    func catalog() -> JSONValue {
        var events = EventKind.specs.map(\.jsonValue)
        for name in self.core.bus.customNames {
            events.append([
                "name": .string(name), "family": "custom", "vetoable": false, "mutable": [],
                "properties": .object(EventKind.customProperties),
                "description": "A custom event published with emit.",
            ])
        }
        return ["events": .array(events)]
    }

    /// Checks event names for `events`/`veto`: known names, namespaced custom names and globs pass.
    private func patterns(_ names: [String], field: String) throws(EvdError) -> [EventPattern] {
        var patterns: [EventPattern] = []
        for name in names {
            let pattern = EventPattern(name)
            if !pattern.isGlob && EventKind(name: name) == nil && !isNamespacedEventName(name) {
                var extra: JSONObject = ["field": .string(field), "event": .string(name)]
                var message = "unknown event '\(name)'"
                if let suggestion = closestEventName(to: name) {
                    extra["suggestion"] = .string(suggestion)
                    message += "; did you mean '\(suggestion)'?"
                }
                throw EvdError(.unknownEvent, message, extra: extra)
            }
            patterns.append(pattern)
        }
        return patterns
    }

    func subscribe(_ request: EvdOperation.Subscribe, id: JSONValue) async throws -> Outcome {
        let events = request.events ?? []
        let veto = request.veto ?? []
        var since = request.since
        let filter = try WhereFilter(request.where ?? [:], maxValues: self.core.configuration.maxFilterValues)
        guard !events.isEmpty || !veto.isEmpty else {
            throw EvdError.badRequest(field: "events", "subscribe needs 'events' or 'veto' (or both)")
        }
        let patterns = try self.patterns(events, field: "events")
        let vetoPatterns = try self.patterns(veto, field: "veto")
        for pattern in vetoPatterns where !EventKind.allCases.contains(where: { $0.spec.vetoable && pattern.matches($0.name) }) {
            throw EvdError(
                .notVetoable,
                "'\(pattern.text)' names no vetoable event",
                extra: ["field": "veto", "event": .string(pattern.text)]
            )
        }
        let actor = self.actor
        let permissions = self.core.permissions
        try permissions.requireSomewhere(actor, .subscribe)
        var vetoKinds: UInt64 = 0
        for kind in EventKind.allCases where kind.spec.vetoable && vetoPatterns.contains(where: { $0.matches(kind.name) }) {
            vetoKinds |= 1 << UInt64(kind.rawValue)
        }
        if !vetoPatterns.isEmpty { try permissions.requireSomewhere(actor, .veto) }
        // Each event is shown (or asked about) only where the actor may view it.
        let visibility = EventVisibility.of(actor, permissions)
        let vetoScope = EventVisibility.of(actor, permissions, action: .veto)
        let maxSubscriptions = self.core.configuration.maxSubscriptions
        guard self.hasSubscriptions.load(ordering: .relaxed) < maxSubscriptions else {
            throw EvdError(
                .badRequest,
                "this connection already has \(maxSubscriptions) subscriptions, the most evd allows (--max-subscriptions); unsubscribe one first",
                extra: ["limit": "max-subscriptions", "max": .integer(maxSubscriptions)]
            )
        }
        // A durable cursor: claimed (one follower at a time) and stored with where this
        // subscription starts, before it exists: a crash after the response keeps the cursor.
        var cursor: (name: String, start: Int64)?
        if let name = request.cursor {
            guard vetoPatterns.isEmpty else {
                throw EvdError.badRequest(field: "veto", "a durable cursor follows the journal: it cannot veto")
            }
            let start = try await self.claimCursor(name, since: since, events: events, filter: filter)
            cursor = (name, start)
        }
        if let cursor { since = cursor.start }
        // A snapshot: its tables' rows as of a seq, which the stream then starts after.
        var snapshot: TableSnapshot?
        if let tables = request.snapshot {
            snapshot = try await self.beginSnapshot(of: tables, database: request.database)
            since = snapshot?.seq
        }
        do {
            return try await self.subscribe(
                request,
                id: id,
                since: since,
                cursor: cursor,
                snapshot: snapshot,
                patterns: patterns,
                vetoPatterns: vetoPatterns,
                vetoKinds: vetoKinds,
                filter: filter,
                visibility: visibility,
                vetoScope: vetoScope
            )
        } catch {
            if let snapshot { await self.endSnapshot(snapshot) }
            throw error
        }
    }

    /// The rest of `subscribe`, once its arguments and permissions are checked: the subscription
    /// made, its response queued, then its snapshot and its replay.
    private func subscribe(
        _ request: EvdOperation.Subscribe,
        id: JSONValue,
        since: Int64?,
        cursor: (name: String, start: Int64)?,
        snapshot: TableSnapshot?,
        patterns: [EventPattern],
        vetoPatterns: [EventPattern],
        vetoKinds: UInt64,
        filter: WhereFilter,
        visibility: EventVisibility?,
        vetoScope: EventVisibility?
    ) async throws -> Outcome {
        let name = request.name
        let mode = request.mode ?? .enforce
        let rows = request.rows ?? false
        let timeoutMs = request.timeoutMs ?? 1000
        let onTimeout = request.onTimeout.flatMap { VetoPolicy(rawValue: $0.rawValue) } ?? .deny
        let priority = request.priority ?? 0
        let overflow = request.onOverflow.flatMap { OverflowPolicy(rawValue: $0.rawValue) } ?? .disconnect

        let session = self.id
        let outbox = self.outbox
        let vetoFilter = filter  // `where` narrows the vetoes too
        let makeListener: ((Int) -> VetoListener)? =
            vetoPatterns.isEmpty
            ? nil
            : { subscription in
                VetoListener(
                    subscription: subscription,
                    session: session,
                    name: name,
                    kinds: vetoKinds,
                    priority: priority,
                    timeout: .milliseconds(timeoutMs),
                    onTimeout: onTimeout,
                    dryRun: mode == .dryRun,
                    outbox: outbox,
                    filter: vetoFilter,
                    visibility: visibility,
                    scope: vetoScope
                )
            }

        // The bus holds the session's events and vetoes back while `registered` queues the response
        // (after its lock is released), so none of the new subscription's reaches the client before
        // the response that names it (`Outbox.hold`).
        let customNames = self.core.bus.customNames
        let journal = self.core.journal
        var replay: (subscription: Subscription, through: Int64)?
        _ = self.core.bus.subscribe(
            session: self.id,
            name: name,
            patterns: patterns,
            filter: filter,
            overflow: overflow,
            wantsRows: rows,
            outbox: self.outbox,
            visibility: visibility,
            journaledOnly: cursor != nil,
            veto: makeListener
        ) { subscription, head, stable in
            if let cursor { self.core.cursors?.follow(cursor.name, subscription: subscription.id) }
            var matched = EventKind.allCases.filter { subscription.kinds & (1 << UInt64($0.rawValue)) != 0 }.map(\.name)
            var seen = Set(matched)
            for custom in customNames where subscription.matches(customName: custom) && seen.insert(custom).inserted {
                matched.append(custom)
            }
            for pattern in patterns where !pattern.isGlob && seen.insert(pattern.text).inserted { matched.append(pattern.text) }
            let vetoed = EventKind.allCases.filter { vetoKinds & (1 << UInt64($0.rawValue)) != 0 }.map { JSONValue.string($0.name) }
            // `seq` is the stable point, not the head: seqs above it may be reserved by commits not
            // yet published (journaled emits in flight, say), and those reach this subscription,
            // whose events must all have a greater seq than the response says.
            if cursor != nil {
                // Only journaled events (the committed ones, §6.5) reach a cursor's subscription.
                matched = matched.filter { name in EventKind(name: name).map { $0.spec.family.isCommitted } ?? true }
            }
            var result: JSONObject = [
                "subscription": .integer(subscription.id), "events": .array(matched.map(JSONValue.string)),
                "veto": .array(vetoed), "seq": .int(stable),
            ]
            if let cursor { result["cursor"] = ["name": .string(cursor.name), "position": .int(cursor.start)] }
            self.outbox.enqueue(line: WireLines.response(id: id, result: .object(result)))
            guard let since else { return }
            if journal == nil {
                // No journal is kept (`--no-journal`): everything at or before head is gone.
                if since < head { self.outbox.enqueue(line: WireLines.gapNotice(from: since + 1, to: head)) }
            } else if since < stable || snapshot != nil {
                // Events after `stable` reach the subscription live; its replay (after the pages of
                // its snapshot, when it has one) covers the rest, and its live events wait until the
                // replay is done: none at or before `since` (a snapshot's seq may be past `stable`).
                self.outbox.park(subscription.id, after: since)
                replay = (subscription, max(stable, since))
                return
            }
            // Nothing to replay: the subscription is live from its response on.
            self.outbox.enqueue(line: WireLines.caughtUpNotice(subscription: subscription.id, seq: stable))
        }
        self.hasSubscriptions.add(1, ordering: .relaxed)
        // The subscription stays its maker's: a `logout` does not save it from its token's expiry.
        if let expires = visibility?.expires { self.subscriptionsExpire.min(Int64(expires), ordering: .relaxed) }
        if let snapshot, let subscription = replay?.subscription {
            // (A subscription with a snapshot is always parked for its replay: `replay` is set.)
            let sent = await self.sendSnapshot(snapshot, subscription: subscription.id)
            await self.endSnapshot(snapshot)
            guard sent else {
                try? self.unsubscribe(Int64(subscription.id))
                self.outbox.unpark(subscription.id)
                return .responded
            }
        } else if let snapshot {
            await self.endSnapshot(snapshot)  // the connection is closing: no subscription was made
        }
        if let replay, let since, let journal {
            await self.replay(replay.subscription, after: since, through: replay.through, from: journal)
        }
        return .responded
    }

    // MARK: Snapshots (issue 23)

    /// Checks `view-table` on each table, checks a connection out and begins the snapshot's read
    /// transaction there. Needs the journal: the stream after a snapshot starts at its seq.
    func beginSnapshot(of tables: [String], database: String?) async throws -> TableSnapshot {
        guard let journal = self.core.journal else {
            throw EvdError.badRequest(
                field: "snapshot",
                "a snapshot needs the journal (evd runs with --no-journal): the stream after it would have nowhere to start"
            )
        }
        let pool = try self.core.pool(database)
        for table in tables { try self.require(.viewTable, on: Resource(database: pool.database.name, table: table)) }
        // Read before the transaction begins: it can only have grown since.
        let floor = journal.floor { $0 == .database(pool.database.name) }
        let connection = try await self.checkout(pool)
        do {
            return try await TableSnapshot.begin(pool: pool, connection: connection, tables: tables, floor: floor)
        } catch {
            await self.checkin(connection, to: pool)
            throw error
        }
    }

    /// Ends the snapshot's read transaction and gives its connection back.
    func endSnapshot(_ snapshot: TableSnapshot) async {
        await snapshot.end()
        await self.checkin(snapshot.connection, to: snapshot.pool)
    }

    /// Queues the snapshot's pages as `snapshot-rows` events, then notice `snapshot_end`, waiting
    /// for the client to read (a page is read while the one before is written: at most two pages
    /// wait). Returns false when it failed: notice `snapshot_failed` says why, and the subscription
    /// ends (its rows would be incomplete).
    ///
    /// The snapshot holds a pooled connection: a client that stops reading must not keep it, as a
    /// transaction that waits for its next request does not (`--idle-transaction-ms`). A page the
    /// client has not read within that time fails the snapshot (`timeout`), and the connection goes
    /// back to the pool.
    private func sendSnapshot(_ snapshot: TableSnapshot, subscription: Int) async -> Bool {
        let (epoch, database) = (self.core.bus.epoch, snapshot.pool.database.name)
        let idleMs = self.core.configuration.idleTransactionMs
        do {
            var next = try await snapshot.nextPage()
            while let page = next, !self.outbox.isClosing {
                self.outbox.enqueue(
                    line: WireLines.snapshotRows(
                        subscription: subscription,
                        epoch: epoch,
                        database: database,
                        table: page.table,
                        schemaVersion: snapshot.schemaVersion,
                        rows: page.rows
                    )
                )
                async let following = snapshot.nextPage()
                let drained = await self.outbox.drained(withinMs: idleMs)
                next = try await following
                guard drained else {
                    throw EvdError(
                        .timeout,
                        "the client read nothing of the snapshot for \(idleMs) ms (--idle-transaction-ms): its pooled connection is given back",
                        extra: ["limit": "idle-transaction-ms", "max_ms": .integer(idleMs)]
                    )
                }
            }
            self.outbox.enqueue(line: WireLines.snapshotEndNotice(subscription: subscription, seq: snapshot.seq))
            return true
        } catch {
            let failure = (error as? EvdError) ?? (error as? SQLiteError)?.evdError ?? EvdError(.internalError, "\(error)")
            self.logger.warning("snapshot failed", metadata: ["subscription": "\(subscription)", "error": "\(failure.message)"])
            let notice: JSONValue = [
                "type": "notice", "code": "snapshot_failed", "subscription": .integer(subscription),
                "error": .object(failure.jsonObject),
            ]
            self.outbox.enqueue(line: notice.jsonBytes + [0x0a])
            return false
        }
    }

    /// `unsubscribe`: ends one of this session's subscriptions.
    func unsubscribe(_ subscription: Int64) throws(EvdError) {
        guard self.core.bus.unsubscribe(id: Int(subscription), session: self.id) else {
            throw EvdError.badRequest(field: "subscription", "this session has no subscription \(subscription)")
        }
        self.core.cursors?.release(subscription: Int(subscription), session: self.id)
        self.hasSubscriptions.subtract(1, ordering: .relaxed)
    }

    /// Replays the journaled events with seq in `since+1 ... through` that `subscription` matches,
    /// in seq order, then notice `caught_up` (`through`), then lets its live events (held back
    /// meanwhile) follow. What retention removed is announced with notice `gap`. The session's next
    /// request waits for the replay; the replay waits for the client to read (it queues a page and
    /// reads the next, then waits until the queued one is written: at most two pages wait in the
    /// outbox and the reader).
    private func replay(_ subscription: Subscription, after since: Int64, through: Int64, from journal: Journal) async {
        defer {
            // After the last replayed event (or the gap that stands for the rest), before the first
            // live one: once, whatever the replay met.
            if !self.outbox.isClosing {
                self.outbox.enqueue(line: WireLines.caughtUpNotice(subscription: subscription.id, seq: through))
            }
            self.outbox.unpark(subscription.id)
        }
        // Nothing journaled after `since` to replay (a snapshot that is current): no reader to open.
        guard through > since else { return }
        let pool = self.core.threadPool
        var position = since
        do {
            let reader = try await pool.runIfActive { try Journal.Reader(journal, after: since, through: through) }
            let read = { @Sendable () async throws -> ReplayPage in
                try await pool.runIfActive {
                    try ReplayPage.read(reader, limit: Self.replayPageRows, for: subscription, journal: journal, through: through)
                }
            }
            var next = try await read()
            while !self.outbox.isClosing {
                var page = next
                // A page read before the floor moved past it may lack rows, so everything up to the
                // floor counts as gone.
                if page.floor > position {
                    self.outbox.enqueue(line: WireLines.gapNotice(from: position + 1, to: page.floor))
                    position = page.floor
                }
                page.drop(through: position)
                guard page.read > 0 else { break }
                if let damage = page.damage, damage.to > position {
                    // A row that fails its checksum is never sent: its seqs are a gap, and the
                    // damage is logged once (whoever replays it next gets the same gap).
                    self.outbox.enqueue(line: WireLines.gapNotice(from: max(damage.from, position + 1), to: damage.to))
                    if journal.noteDamage(damage) {
                        self.logger.error(
                            "a journal row is damaged (its checksum does not match): its events are not replayed",
                            metadata: [
                                "journal": "\(damage.database.map { "database \($0)" } ?? "state")", "row_seq": "\(damage.seq)",
                                "gap": "\(damage.from)...\(damage.to)",
                            ]
                        )
                    }
                }
                position = max(position, page.lastRead)
                self.outbox.enqueue(replayed: page)
                // The next page is read while this one is written (the reader is used by one task
                // at a time: this one waits for it).
                async let following = read()
                await self.outbox.drained()
                next = try await following
            }
        } catch {
            self.logger.warning("replay failed", metadata: ["subscription": "\(subscription.id)", "error": "\(error)"])
            self.outbox.enqueue(line: WireLines.gapNotice(from: position + 1, to: through))
        }
    }

    /// The journaled rows a replay reads per page.
    static let replayPageRows = 4096

}

// MARK: Durable cursors

extension Session {
    /// Claims durable cursor `name` for a new subscription of this session and stores where it
    /// starts: after `since` when given (the cursor is repositioned), else after its acknowledged
    /// position, else (a new cursor) after the stable point now. Returns that position.
    fileprivate func claimCursor(_ name: String, since: Int64?, events: [String], filter: WhereFilter) async throws -> Int64 {
        guard let cursors = self.core.cursors else {
            throw EvdError.badRequest(field: "cursor", "durable cursors are positions in the journal, and evd runs with --no-journal")
        }
        try Self.checkCursorName(name)
        // A consumer that reconnects at once may find the close of its previous connection not yet
        // seen (its session still follows the cursor): a cursor in use is tried again for a while
        // before the answer is cursor_in_use.
        let acknowledged: Int64?
        let deadline = ContinuousClock.now + Self.cursorClaimWait
        while true {
            do {
                acknowledged = try cursors.claim(name, owner: self.actor.id, session: self.id)
                break
            } catch .inUse where ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(10))
            } catch {
                throw Self.cursorError(error, name)
            }
        }
        let start = since ?? acknowledged ?? self.core.bus.stableSeq
        // The databases its `where` lets through and its actor may view something in: retention
        // keeps only what it may get (an actor cannot pin a database it cannot see into).
        let permissions = self.core.permissions
        let actor = self.actor
        let passing = self.core.pools.keys.filter {
            filter.mayPass("database", .string($0)) && permissions.allowsSomewhere(actor, .viewTable, in: $0)
        }
        let databases = passing.count == self.core.pools.count ? nil : Array(passing)
        do {
            try await self.core.threadPool.runIfActive { try cursors.attach(name, position: start, events: events, databases: databases) }
        } catch {
            cursors.abandon(name, session: self.id)
            self.logger.error("could not store a durable cursor", metadata: ["cursor": "\(name)", "error": "\(error)"])
            throw EvdError(.internalError, "could not store cursor '\(name)': \(error)")
        }
        return start
    }

    /// How long a `subscribe` waits for a cursor another subscription follows to be freed.
    static let cursorClaimWait = Duration.seconds(2)

    /// A cursor's name: 1 to 128 bytes of UTF-8 without control characters.
    static func checkCursorName(_ name: String) throws(EvdError) {
        guard !name.isEmpty, name.utf8.count <= Cursors.maxNameBytes,
            !name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control })
        else {
            throw EvdError.badRequest(
                field: "cursor",
                "a cursor's name is 1 to \(Cursors.maxNameBytes) bytes of UTF-8 without control characters"
            )
        }
    }

    /// The error response of a cursor refusal.
    static func cursorError(_ refusal: Cursors.Refusal, _ name: String) -> EvdError {
        switch refusal {
        case .inUse:
            return EvdError(
                .cursorInUse,
                "cursor '\(name)' is followed by another subscription now (one at a time)",
                extra: ["field": "cursor"]
            )
        case .notOwner:
            return EvdError(.permissionDenied, "cursor '\(name)' belongs to another actor", extra: ["field": "cursor"])
        case .noSuchCursor:
            return EvdError(.noSuchCursor, "no cursor named '\(name)'", extra: ["field": "cursor"])
        case .tooMany(let limit, let perOwner):
            let flag = perOwner ? "max-cursors-per-actor" : "max-cursors"
            let whose = perOwner ? "for one actor" : "in all"
            return EvdError(
                .badRequest,
                "evd keeps at most \(limit) durable cursors \(whose) (--\(flag)); delete one first (delete_cursor)",
                extra: ["field": "cursor", "limit": .string(flag), "max": .integer(limit)]
            )
        case .notStored(let error):
            return EvdError(.internalError, "could not store the change to cursor '\(name)': \(error)")
        }
    }

    /// `delete_cursor`: forgets a cursor nobody follows — its owner's, or anyone's for `admin`.
    func deleteCursor(_ name: String) async throws -> JSONValue {
        guard let cursors = self.core.cursors else {
            throw EvdError(.noSuchCursor, "no cursor named '\(name)' (evd runs with --no-journal)", extra: ["field": "cursor"])
        }
        let mayDeleteAny = self.core.permissions.allows(self.actor, .admin)
        if !mayDeleteAny { try self.core.permissions.requireSomewhere(self.actor, .subscribe) }
        do {
            try cursors.delete(name, by: self.actor.id, mayDeleteAny: mayDeleteAny)
        } catch {
            if case .notStored(let reason) = error {
                self.logger.error("could not delete a durable cursor", metadata: ["cursor": "\(name)", "error": "\(reason)"])
            }
            throw Self.cursorError(error, name)
        }
        return [:]
    }
}
