import EvdClient
import OrderedCollections

/// The ops of PROTOCOL.md §3: argument validation, permissions, then the work.
extension Session {
    /// Ops the contract defines that later versions of evd implement; they answer `unknown_op`
    /// with a message saying so, rather than pretending.
    static let notYetImplemented: Set<String> = []

    func dispatch(_ whole: Request, _ state: inout SessionState) async throws -> Outcome {
        let request = whole.object  // what every op but the row ops reads (`Request`)
        guard let opValue = request["op"], !opValue.isNull else {
            throw EvdError.badRequest(field: "op", "missing required argument 'op'")
        }
        guard case .string(let op) = opValue else { throw Arguments.wrongType("op", "a string", opValue) }
        var args = Arguments(request)
        try self.checkTokenExpiry(op)
        switch op {
        case "ping":
            try args.finish()
            return .result([:])
        case "events":
            try args.finish()
            return .result(self.catalog())
        case "stats":
            try args.finish()
            try self.require(.admin)
            return .result(self.core.statistics())
        case "subscribe":
            return try await self.subscribe(&args, id: request["id"] ?? .null)
        case "unsubscribe":
            let subscription = try args.requiredInt("subscription")
            try args.finish()
            try self.require(.subscribe)
            guard self.core.bus.unsubscribe(id: Int(subscription), session: self.id) else {
                throw EvdError.badRequest(field: "subscription", "this session has no subscription \(subscription)")
            }
            self.hasSubscriptions.subtract(1, ordering: .relaxed)
            return .result([:])
        case "execute", "executemany":
            // Every argument is checked before permissions and SQL; then (as SQLite prepares each
            // statement) each statement's actions on each table.
            try self.require(try Self.parseSQL(whole))
            return .result(try await self.withSQL(request: whole, &state, parse: Self.parseSQL))
        case "create_table", "insert", "upsert", "update", "delete", "drop_table", "describe":
            try self.require(try Self.parseStructured(whole).work)  // every argument is checked first
            return .result(try await self.withSQL(request: whole, &state) { try Self.parseStructured($0).work })
        case "begin":
            let database = try args.string("database")
            try args.finish()
            try self.requireSQL(on: database)
            try await self.begin(database: database, &state)
            return .result([:])
        case "commit", "rollback":
            let database = try args.string("database")
            try args.finish()
            try self.requireSQL(on: database)
            try await self.end(commit: op == "commit", database: database, &state)
            return .result([:])
        case "savepoint", "release_savepoint", "rollback_savepoint":
            let name = try args.requiredString("name")
            try args.finish()
            try self.requireSQL(on: state.transaction?.pool.database.name)
            try await self.savepoint(op, name: name, &state)
            return .result([:])
        case "begin_twophase", "prepare_twophase", "commit_twophase", "rollback_twophase":
            let xid = try args.requiredString("xid")
            let database = try args.string("database")
            try args.finish()
            guard !xid.isEmpty else { throw EvdError.badRequest(field: "xid", "'xid' must not be empty") }
            try self.requireSQL(on: database)
            switch op {
            case "begin_twophase": try await self.beginTwoPhase(xid: xid, database: database, &state)
            case "prepare_twophase": try await self.prepareTwoPhase(xid: xid, database: database, &state)
            default: try await self.decideTwoPhase(commit: op == "commit_twophase", xid: xid, database: database, &state)
            }
            return .result([:])
        case "recover":
            let database = try args.string("database")
            try args.finish()
            try self.requireSQL(on: database)
            return .result(try self.recoverTwoPhase(database: database))
        case "execution_options":
            return .result(try self.executionOptions(&args, &state))
        case "emit":
            // (The executor runs emits in groups, `executeEmits`; this is the same for one.)
            let event = try self.checkEmit(&args)
            return .result(["seq": .int(try await self.publishEmits([event])[0])])
        case "login":
            return .result(try await self.login(&args))
        case "logout":
            try args.finish()
            await self.logout()
            return .result([:])
        case "create_token":
            return .result(try await self.createToken(&args))
        case "invalidate":
            let database = try args.string("database")
            let connection = try args.int("connection", in: 1...Int64(Int32.max))
            let soft = try args.bool("soft") ?? false
            try args.finish()
            try self.require(.admin)
            let pool = try self.core.pool(database)
            let numbers = await pool.invalidate(number: connection.map(Int.init), soft: soft, origin: self.origin)
            return .result(["invalidated": .array(numbers.map { .integer($0) })])
        case "dispose":
            let database = try args.string("database")
            try args.finish()
            try self.require(.admin)
            try await self.core.pool(database).dispose(origin: self.origin)
            return .result([:])
        default:
            if Self.notYetImplemented.contains(op) {
                throw EvdError(.unknownOp, "'\(op)' is part of protocol 1 but this evd (\(evdVersion)) does not implement it yet")
            }
            throw EvdError(.unknownOp, "unknown op '\(op)'")
        }
    }

    /// Parses a structured op's request into the op and the work it asks for.
    static func parseStructured(_ request: Request) throws -> (op: StructuredOp, work: SQLWork) {
        var args = Arguments(request.object)
        let op = try StructuredOp.parse(request["op"]?.stringValue ?? "", &args, flatRows: request.rows)
        let database = try args.string("database")
        try args.finish()
        return (op, SQLWork(database: database, table: op.table, actions: op.actions, run: { run in try run.perform(op) }))
    }

    /// Parses an `execute` or `executemany` request into the work it asks for.
    static func parseSQL(_ request: Request) throws -> SQLWork {
        var args = Arguments(request.whole)
        let sql = SQLText(try args.requiredString("sql"))
        let work: @Sendable (SQLRun) throws -> JSONValue
        if request["op"] == "executemany" {
            guard let sets = try args.array("params") else {
                throw EvdError.badRequest(field: "params", "missing required argument 'params'")
            }
            var parameterSets: [SQLParameters] = []
            for (index, set) in sets.enumerated() {
                guard set.arrayValue != nil || set.objectValue != nil else {
                    throw EvdError.badRequest(field: "params[\(index)]", "each parameter set must be an array or an object")
                }
                parameterSets.append(try SQLParameters(set, field: "params[\(index)]"))
            }
            let all = parameterSets
            work = { run in ["changes": .int(try run.executemany(sql: sql, parameterSets: all))] }
        } else {
            let parameters = try SQLParameters(args.value("params"))
            work = { run in try run.execute(sql: sql, parameters: parameters).jsonValue }
        }
        let database = try args.string("database")
        try args.finish()
        return SQLWork(database: database, table: nil, actions: [.executeSQL], run: work)
    }

    func require(_ action: Action, on resource: Resource = .daemon) throws(EvdError) {
        try self.core.permissions.require(self.actor, action, on: resource)
    }

    /// `execute-sql` on `database` (the default database when nil).
    /// Checks the actions a SQL request's op needs, on its database (and table).
    func require(_ work: SQLWork) throws(EvdError) {
        let resource = Resource(database: try self.core.pool(work.database).database.name, table: work.table)
        for action in work.actions { try self.require(action, on: resource) }
    }

    func requireSQL(on database: String?) throws(EvdError) {
        try self.require(.executeSQL, on: Resource(database: try self.core.pool(database).database.name))
    }

    // MARK: events, subscribe

    private func catalog() -> JSONValue {
        var events = EventKind.specs.map(\.jsonValue)
        for name in self.core.bus.customNames {
            events.append([
                "name": .string(name), "family": "custom", "vetoable": false, "mutable": [], "properties": [:],
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

    private func subscribe(_ args: inout Arguments, id: JSONValue) async throws -> Outcome {
        let events = try args.strings("events") ?? []
        let veto = try args.strings("veto") ?? []
        let mode = try args.choice("mode", ["enforce", "dry_run"])
        let since = try args.int("since", in: 0...Int64.max)
        let rows = try args.bool("rows") ?? false
        let name = try args.string("name")
        let timeoutMs = try args.int("timeout_ms", in: 1...60_000) ?? 1000
        let onTimeout = try args.choice("on_timeout", ["allow", "deny"]).flatMap(VetoPolicy.init) ?? .deny
        let priority = try args.int("priority") ?? 0
        let overflow = try args.choice("on_overflow", ["disconnect", "drop"]).flatMap(OverflowPolicy.init) ?? .disconnect
        let filter = try WhereFilter(try args.object("where") ?? [:], maxValues: self.core.configuration.maxFilterValues)
        try args.finish()
        guard !events.isEmpty || !veto.isEmpty else {
            throw EvdError.badRequest(field: "events", "subscribe needs 'events' or 'veto' (or both)")
        }
        let patterns = try self.patterns(events, field: "events")
        let vetoPatterns = try self.patterns(veto, field: "veto")
        for pattern in vetoPatterns where !EventKind.allCases.contains(where: { $0.spec.vetoable && pattern.matches($0.name) }) {
            throw EvdError(
                .notVetoable, "'\(pattern.text)' names no vetoable event", extra: ["field": "veto", "event": .string(pattern.text)])
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
                extra: ["limit": "max-subscriptions", "max": .integer(maxSubscriptions)])
        }
        let session = self.id
        let outbox = self.outbox
        let vetoFilter = filter  // `where` narrows the vetoes too
        let makeListener: ((Int) -> VetoListener)? =
            vetoPatterns.isEmpty
            ? nil
            : { subscription in
                VetoListener(
                    subscription: subscription, session: session, name: name, kinds: vetoKinds, priority: priority,
                    timeout: .milliseconds(timeoutMs), onTimeout: onTimeout, dryRun: mode == "dry_run", outbox: outbox,
                    filter: vetoFilter, visibility: visibility, scope: vetoScope)
            }

        // Registering and queueing the response happen under the bus's lock, so no event of the new
        // subscription can reach the client before the response that names it.
        let customNames = self.core.bus.customNames
        let journal = self.core.journal
        var replay: (subscription: Subscription, through: Int64)?
        _ = self.core.bus.subscribe(
            session: self.id, name: name, patterns: patterns, filter: filter, overflow: overflow, wantsRows: rows,
            outbox: self.outbox, visibility: visibility, veto: makeListener
        ) { subscription, head, stable in
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
            let result: JSONValue = [
                "subscription": .integer(subscription.id), "events": .array(matched.map(JSONValue.string)),
                "veto": .array(vetoed), "seq": .int(stable),
            ]
            self.outbox.enqueue(line: Self.responseLine(id: id, result: result))
            guard let since else { return }
            if journal == nil {
                // No journal is kept (`--no-journal`): everything at or before head is gone.
                if since < head { self.outbox.enqueue(line: Self.gapLine(from: since + 1, to: head)) }
            } else if since < stable {
                // Events after `stable` reach the subscription live; its replay covers the rest,
                // and its live events wait until the replay is done.
                self.outbox.park(subscription.id, after: since)
                replay = (subscription, stable)
            }
        }
        self.hasSubscriptions.add(1, ordering: .relaxed)
        // The subscription stays its maker's: a `logout` does not save it from its token's expiry.
        if let expires = visibility?.expires { self.subscriptionsExpire.min(Int64(expires), ordering: .relaxed) }
        if let replay, let since, let journal {
            await self.replay(replay.subscription, after: since, through: replay.through, from: journal)
        }
        return .responded
    }

    static func gapLine(from: Int64, to: Int64) -> [UInt8] {
        let gap: JSONValue = ["type": "notice", "code": "gap", "from": .int(from), "to": .int(to)]
        return gap.jsonBytes + [0x0a]
    }

    /// Replays the journaled events with seq in `since+1 ... through` that `subscription` matches,
    /// in seq order, then lets its live events (held back meanwhile) follow. What retention removed
    /// is announced with notice `gap`. The session's next request waits for the replay; the replay
    /// waits for the client to read (it queues a page and reads the next, then waits until the
    /// queued one is written: at most two pages wait in the outbox and the reader).
    private func replay(_ subscription: Subscription, after since: Int64, through: Int64, from journal: Journal) async {
        defer { self.outbox.unpark(subscription.id) }
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
                    self.outbox.enqueue(line: Self.gapLine(from: position + 1, to: page.floor))
                    position = page.floor
                }
                page.drop(through: position)
                guard page.read > 0 else { break }
                if let damage = page.damage, damage.to > position {
                    // A row that fails its checksum is never sent: its seqs are a gap, and the
                    // damage is logged once (whoever replays it next gets the same gap).
                    self.outbox.enqueue(line: Self.gapLine(from: max(damage.from, position + 1), to: damage.to))
                    if journal.noteDamage(damage) {
                        self.logger.error(
                            "a journal row is damaged (its checksum does not match): its events are not replayed",
                            metadata: [
                                "journal": "\(damage.database.map { "database \($0)" } ?? "state")", "row_seq": "\(damage.seq)",
                                "gap": "\(damage.from)...\(damage.to)",
                            ])
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
            self.outbox.enqueue(line: Self.gapLine(from: position + 1, to: through))
        }
    }

    /// The journaled rows a replay reads per page.
    static let replayPageRows = 4096

    // MARK: emit

    /// A custom event an `emit` asks for, checked.
    struct CustomEvent {
        let name: String
        let data: JSONObject
    }

    /// Runs a run of consecutive `emit` requests (as admitted, in order), answering each.
    ///
    /// **Why in groups.** Each emit must be journaled before it is answered, and a commit costs
    /// about the same for one event as for hundreds; a pipelining publisher, answered one commit
    /// per emit, got about 7k emits/s. So the executor takes every emit the reader has already
    /// queued behind the first (never waiting for more: a lone emit is not delayed) and journals
    /// them with one reservation of consecutive seqs and one commit, shared with other sessions'
    /// through the journal's group commit (`Journal.appendToState`). The answers then go out in
    /// request order with increasing seqs, each after its event was committed and published (so
    /// a subscriber gets the events in seq order, each before its emit's answer, as one at a
    /// time). Only emits are grouped: any other request ends the run, and so ordering against it
    /// is as before. A refused emit is answered in its place, after the emits before it.
    func executeEmits(_ requests: [Admission]) async {
        var checked: [(id: JSONValue, event: CustomEvent)] = []
        for request in requests {
            let refusal: (id: JSONValue, error: EvdError)
            switch request {
            case .refuse(let id, let error):
                refusal = (id, error)
            case .run(let id, let request):
                do {
                    try self.checkTokenExpiry("emit")
                    var args = Arguments(request.object)
                    checked.append((id, try self.checkEmit(&args)))
                    continue
                } catch {
                    refusal = (id, Self.wireError(error))
                }
            }
            await self.journalEmits(checked)
            checked = []
            self.respond(id: refusal.id, .failure(refusal.error))
        }
        await self.journalEmits(checked)
    }

    /// Journals and publishes checked emits together, then answers each.
    private func journalEmits(_ emits: [(id: JSONValue, event: CustomEvent)]) async {
        guard !emits.isEmpty else { return }
        do {
            let seqs = try await self.publishEmits(emits.map(\.event))
            for (emit, seq) in zip(emits, seqs) { self.respond(id: emit.id, .result(["seq": .int(seq)])) }
        } catch {
            let failure = Self.wireError(error)
            for emit in emits { self.respond(id: emit.id, .failure(failure)) }
        }
    }

    /// Checks an `emit` request's arguments and the session's permission.
    private func checkEmit(_ args: inout Arguments) throws -> CustomEvent {
        let name = try args.requiredString("event")
        let data = try args.object("data") ?? [:]
        try args.finish()
        guard isNamespacedEventName(name) else {
            if EventKind(name: name) != nil {
                throw EvdError.badRequest(field: "event", "'\(name)' is a catalog event; emit publishes custom events, whose names have a namespace (myapp.deployed)")
            }
            throw EvdError(.unknownEvent, "unknown event '\(name)': a custom event's name has a namespace (myapp.deployed)", extra: ["field": "event", "event": .string(name)])
        }
        // Byte scans: `String.contains(String)` would be Foundation's, a search costlier than the journal write.
        guard !name.utf8.contains(where: { $0 == UInt8(ascii: "*") || $0 == UInt8(ascii: "?") }) else {
            throw EvdError.badRequest(field: "event", "an event name cannot contain '*' or '?'")
        }
        for key in data.keys where Self.envelopeKeys.contains(key) {
            throw EvdError.badRequest(field: "data.\(key)", "'\(key)' is an envelope key and cannot be an event property")
        }
        try self.require(.emit)
        return CustomEvent(name: name, data: data)
    }

    /// Publishes custom events, in order; returns their seqs. A custom event is a committed event:
    /// the client's OK means it is journaled. (Custom events always get a seq: only an unwanted
    /// catalog event goes without one.)
    private func publishEmits(_ events: [CustomEvent]) async throws -> [Int64] {
        try await self.core.bus.publishJournaled(
            events.map { ($0.name, nil, $0.data) }, origin: self.origin, journal: self.core.journal)
    }

    /// Whether a request is an `emit` (which the executor runs in groups).
    static func isEmit(_ request: JSONObject) -> Bool { request["op"] == "emit" }

    static let envelopeKeys: Set<String> = ["type", "seq", "event", "time", "subscription", "session", "actor"]

    // MARK: execution_options

    private func executionOptions(_ args: inout Arguments, _ state: inout SessionState) throws -> JSONValue {
        let options = try args.requiredObject("options")
        let scope = try args.choice("scope", ["connection", "engine"]) ?? "connection"
        try args.finish()
        if let value = options["query_only"], value.boolValue == nil {
            throw Arguments.wrongType("options.query_only", "a boolean", value)
        }
        if let value = options["busy_timeout_ms"] {
            _ = try Arguments.integer(value, field: "options.busy_timeout_ms", in: 0...600_000)
        }
        if scope == "engine" {
            try self.require(.admin)
            self.core.engineOptions.withLock { engine in
                for (key, value) in options { engine[key] = value }
            }
            self.core.bus.emit(.setEngineExecutionOptions, self.origin) { ["options": .object(options)] }
        } else {
            try self.require(.executeSQL)
            for (key, value) in options { state.options[key] = value }
            self.core.bus.emit(.setConnectionExecutionOptions, self.origin) { ["options": .object(options)] }
        }
        return ["options": .object(self.effectiveOptions(state))]
    }

    /// Engine options overlaid with the session's own.
    func effectiveOptions(_ state: SessionState) -> JSONObject {
        var options = self.core.engineOptions.withLock { $0 }
        for (key, value) in state.options { options[key] = value }
        return options
    }
}
