import EvdClient
import NIOCore
import OrderedCollections
import Synchronization

/// One subscription: which events it wants, with what filter, and where its events go.
final class Subscription: Sendable {
    let id: Int
    let session: UInt64
    let name: String?
    let patterns: [EventPattern]
    /// Catalog events matched by `patterns`, as a bit set over `EventKind.rawValue`.
    let kinds: UInt64
    /// Its `where`: property → accepted values; every listed property must match.
    let filter: WhereFilter
    let overflow: OverflowPolicy
    let wantsRows: Bool
    let outbox: Outbox
    /// What its actor may see; `nil`: everything.
    let visibility: EventVisibility?

    init(
        id: Int, session: UInt64, name: String?, patterns: [EventPattern], filter: WhereFilter,
        overflow: OverflowPolicy, wantsRows: Bool, outbox: Outbox, visibility: EventVisibility? = nil
    ) {
        self.visibility = visibility
        self.id = id
        self.session = session
        self.name = name
        self.patterns = patterns
        var kinds: UInt64 = 0
        for kind in EventKind.allCases where patterns.contains(where: { $0.matches(kind.name) }) {
            kinds |= 1 << UInt64(kind.rawValue)
        }
        self.kinds = kinds
        self.filter = filter
        self.overflow = overflow
        self.wantsRows = wantsRows
        self.outbox = outbox
    }

    func matches(customName name: String) -> Bool {
        self.patterns.contains { $0.matches(name) }
    }

    /// Whether an event with these properties passes the `where` filter and may be seen.
    func accepts(name: String, origin: EventOrigin, properties: JSONObject) -> Bool {
        (self.visibility?.allows(properties, name: name, actor: origin.actor) ?? true)
            && Self.passes(self.filter, name: name, origin: origin, properties: properties)
    }

    /// Whether every event passes (no `where`, no visibility limit): no check is needed.
    var acceptsAll: Bool { self.filter.isEmpty && self.visibility == nil }

    /// Whether an event passes a `where` filter (plain subscriptions and veto listeners alike).
    static func passes(_ filter: WhereFilter, name: String, origin: EventOrigin, properties: JSONObject) -> Bool {
        filter.passes(
            name: name, session: origin.session.map { .integer($0) } ?? .null,
            actor: origin.actor.map { .string($0.id) } ?? .null, properties: properties)
    }
}

/// Routes every event to the subscriptions that asked for it, numbering events with one daemon-wide seq.
///
/// Hot path: `emit` first checks one atomic bit per catalog event, so an event nobody subscribed
/// to costs a load and a mask — no properties built, no JSON written. A wanted event's body
/// (everything after the subscription number) is serialized once, outside the lock; under the lock
/// it gets its seq and is queued, in seq order, to each matching subscriber's outbox.
public final class EventBus: Sendable {
    private struct State {
        var seq: Int64
        var nextSubscription = 1
        var subscriptions: OrderedDictionary<Int, Subscription> = [:]
        /// Subscriptions per catalog event, in subscription order.
        var byKind: [[Subscription]] = Array(repeating: [], count: EventKind.allCases.count)
        /// Subscriptions per custom name, computed on first use and dropped on (un)subscribe.
        var byCustomName: [String: [Subscription]] = [:]
        /// Custom names emitted so far, for the `events` op.
        var customNames: OrderedSet<String> = []
        var published: [String: Int] = [:]
        /// Veto listeners by subscription, and per catalog event in chain order.
        var vetoListeners: [Int: VetoListener] = [:]
        var vetoersByKind: [[VetoListener]] = Array(repeating: [], count: EventKind.allCases.count)
        /// The first seqs of reservations whose transaction has not finished, oldest first.
        var pending: [Int64] = []
        /// Events numbered after the oldest pending reservation, in seq order: they wait for it,
        /// so that every subscription receives seqs in order.
        var held: [NumberedEvent] = []
        /// How far the oldest pending reservation has been delivered while its batches go out
        /// (`complete` publishes a big transaction in batches): its first seq, and the last seq
        /// delivered. Part of the stable point a new subscription replays up to.
        var delivering: (first: Int64, through: Int64)?
    }

    /// The seq up to which every event has been delivered: later ones are pending or held and
    /// will reach a subscription added now.
    private static func stablePoint(_ state: State) -> Int64 {
        guard let oldest = state.pending.first else { return state.seq }
        if let delivering = state.delivering, delivering.first == oldest { return delivering.through }
        return oldest - 1
    }

    /// Events with their seqs (a run's first), on their way to the subscriptions.
    struct NumberedEvent {
        let seq: Int64
        let event: Publication
        /// The time, quoted; `nil`: the moment it is delivered.
        var time: [UInt8]?
    }

    private let interest = Atomic<UInt64>(0)
    private let vetoInterest = Atomic<UInt64>(0)
    /// The catalog events some `rows: true` subscription wants.
    private let rowsInterest = Atomic<UInt64>(0)
    private let state: Mutex<State>
    let deliveryStats = DeliveryStats()
    let vetoStats: VetoStats
    /// Vetoes waiting for a reply.
    let pendingVetoes = PendingVetoes()

    /// Keeps seqs below a persisted bound, so that a restart never reuses one (`nil`: no journal).
    let lease: SeqLease?

    /// Creates a bus whose first event gets `lastSeq + 1`; `vetoLatency` is told how long each
    /// veto listener took to answer.
    init(lastSeq: Int64 = 0, lease: SeqLease? = nil, vetoLatency: (@Sendable (Duration) -> Void)? = nil) {
        precondition(EventKind.allCases.count <= 64, "the interest bit set holds 64 catalog events")
        self.state = Mutex(State(seq: lastSeq))
        self.lease = lease
        self.vetoStats = VetoStats(observeLatency: vetoLatency)
    }

    /// The newest seq handed out.
    public var headSeq: Int64 { self.state.withLock { $0.seq } }

    /// Whether any subscription wants `kind` right now.
    @inline(__always)
    public func wants(_ kind: EventKind) -> Bool {
        self.interest.load(ordering: .relaxed) & (1 << UInt64(kind.rawValue)) != 0
    }

    /// Whether any veto listener decides `kind` right now.
    @inline(__always)
    public func wantsVeto(_ kind: EventKind) -> Bool {
        self.vetoInterest.load(ordering: .relaxed) & (1 << UInt64(kind.rawValue)) != 0
    }

    /// Emits a catalog event; `properties` is only called when someone subscribed to it.
    @inline(__always)
    public func emit(_ kind: EventKind, _ origin: EventOrigin, _ properties: () -> JSONObject) {
        guard self.wants(kind) else { return }
        self.publish(name: kind.name, kind: kind, origin: origin, properties: properties())
    }

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

    /// The subscriptions of an event: by catalog bit, or (custom events) by name, cached.
    private static func subscribers(_ state: inout State, name: String, kind: EventKind?) -> [Subscription] {
        if let kind { return state.byKind[kind.rawValue] }
        if let cached = state.byCustomName[name] { return cached }
        let subscribers = state.subscriptions.values.filter { $0.matches(customName: name) }
        state.byCustomName[name] = subscribers
        return subscribers
    }

    /// Delivers a numbered event now, or holds it back while an older reservation is pending.
    private static func dispatch(_ state: inout State, _ event: NumberedEvent, wakeups: inout [Outbox.Wakeup]) {
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
    private static func releaseHeld(_ state: inout State, below bound: Int64? = nil, wakeups: inout [Outbox.Wakeup]) {
        let bound = bound ?? state.pending.first ?? .max
        var released = 0
        while released < state.held.count, state.held[released].seq < bound {
            Self.deliver(&state, state.held[released], wakeups: &wakeups)
            released += 1
        }
        if released > 0 { state.held.removeFirst(released) }
    }

    /// Whether anyone wants a committed change event (`insert-rows`, `create-table`, ...): then
    /// connections record their changes.
    public var wantsCommittedChanges: Bool {
        self.interest.load(ordering: .relaxed) & EventKind.committedChanges != 0
    }

    /// Whether a `rows: true` subscription wants a committed change event: then connections also
    /// record whole rows.
    public var wantsRowImages: Bool {
        self.rowsInterest.load(ordering: .relaxed) & EventKind.committedChanges != 0
    }

    /// The events some subscription wants, as a bit set of `EventKind` raw values (what
    /// `CommittedEvents.publications(_:origin:wanted:)` makes).
    var wanted: UInt64 { self.interest.load(ordering: .relaxed) }

    /// Numbers and queues events made outside the lock (none `unwanted`), in order, under one
    /// lock: consecutive seqs, one time for all.
    func publish(_ made: [Publication]) {
        guard !made.isEmpty else { return }
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
    }

    // MARK: Journaled events

    /// A custom (or daemon) event's bytes, made once for the journal and every subscriber.
    func entry(name: String, kind: EventKind?, origin: EventOrigin, properties: JSONObject) -> JournalEntry {
        JournalEntry(
            name: name, kind: kind, origin: origin, properties: properties, body: Self.body(origin, properties),
            imagesBody: nil)
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
        _ reservation: SeqReservation, batch: Int = 512, making make: (Range<Int>, _ wanted: UInt64) -> [Publication]
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
        _ events: [(name: String, kind: EventKind?, properties: JSONObject)], origin: EventOrigin, journal: (any StateJournal)?
    ) async throws -> [Int64] {
        guard let journal, journal.isEnabled else {
            return events.map { self.publish(name: $0.name, kind: $0.kind, origin: origin, properties: $0.properties) }
        }
        guard !events.isEmpty else { return [] }
        let entries = events.map { self.entry(name: $0.name, kind: $0.kind, origin: origin, properties: $0.properties) }
        let reservation = self.reserve(entries.count)
        do {
            try await journal.append(entries, reservation)
        } catch {
            self.cancel(reservation)
            throw error
        }
        self.complete(reservation, entries)
        return (0..<Int64(entries.count)).map { reservation.first + $0 }
    }

    /// An event's bytes after the subscription number: the envelope's origin, the properties, the
    /// closing brace and newline.
    static func body(_ origin: EventOrigin, _ properties: JSONObject) -> [UInt8] {
        var body = origin.envelopeFragment
        for (key, value) in properties {
            body.append(UInt8(ascii: ","))
            JSONWriter.appendString(key, to: &body)
            body.append(UInt8(ascii: ":"))
            value.write(into: &body)
        }
        body.append(UInt8(ascii: "}"))
        body.append(UInt8(ascii: "\n"))
        return body
    }

    /// An event's bytes up to its subscription number: `{"type":"event","seq":…,"event":…,"time":…,"subscription":`.
    /// `time` is quoted; `nil`: now.
    static func prefix(seq: Int64, name: String, time: [UInt8]?) -> [UInt8] {
        var prefix: [UInt8] = []
        prefix.reserveCapacity(112)
        var name = name  // `withUTF8` is mutating; a native string neither copies nor allocates
        name.withUTF8 { Self.appendHead(seq: seq, name: $0, to: &prefix) }
        if let time { prefix += time } else { EventTime.appendNow(to: &prefix) }
        JSONWriter.appendASCII(Self.subscriptionKey, to: &prefix)
        return prefix
    }

    /// Appends an event's bytes up to its time: `{"type":"event","seq":…,"event":…,"time":`.
    /// `name` is UTF-8. (A replay writes its events with its two parts, `subscriptionKey` and the
    /// body.)
    @inline(__always)
    static func appendHead(seq: Int64, name: UnsafeBufferPointer<UInt8>, to bytes: inout [UInt8]) {
        Self.appendStart(seq: seq, to: &bytes)
        Self.appendName(name, to: &bytes)
    }

    /// The head's first part: `{"type":"event","seq":…`.
    @inline(__always)
    static func appendStart(seq: Int64, to bytes: inout [UInt8]) {
        JSONWriter.appendASCII(#"{"type":"event","seq":"#, to: &bytes)
        JSONWriter.appendInt(seq, to: &bytes)
    }

    /// The head's second part, the same for every event of one name: `,"event":…,"time":`.
    static func appendName(_ name: UnsafeBufferPointer<UInt8>, to bytes: inout [UInt8]) {
        JSONWriter.appendASCII(#","event":"#, to: &bytes)
        JSONWriter.appendEscaped(name, to: &bytes)
        JSONWriter.appendASCII(#","time":"#, to: &bytes)
    }

    /// What follows an event's quoted time, before its subscription number.
    static let subscriptionKey: StaticString = #","subscription":"#

    /// Queues numbered events to their subscribers that pass their filters (under the lock);
    /// those with `rows: true` get the row images.
    private static func deliver(_ state: inout State, _ numbered: NumberedEvent, wakeups: inout [Outbox.Wakeup]) {
        switch numbered.event {
        case .entry(let event):
            let subscribers = Self.subscribers(&state, name: event.name, kind: event.kind)
            guard !subscribers.isEmpty else { return }
            let prefix = Self.prefix(seq: numbered.seq, name: event.name, time: numbered.time)
            for subscription in subscribers
            where subscription.acceptsAll
                || subscription.accepts(name: event.name, origin: event.origin, properties: event.properties)
            {
                let chosen = subscription.wantsRows ? event.imagesBody ?? event.body : event.body
                let queued = QueuedEvent(prefix: prefix, subscription: subscription.id, body: chosen, seq: numbered.seq)
                if let wakeup = subscription.outbox.enqueue(event: queued, policy: subscription.overflow) {
                    wakeups.append(wakeup)
                }
            }
        case .run(let run):
            let subscribers = state.byKind[run.kind.rawValue]
            guard !subscribers.isEmpty else { return }
            var time = numbered.time ?? []
            if numbered.time == nil { EventTime.appendNow(to: &time) }
            // Read back from the bodies once, if a filter needs them.
            var properties: [JSONObject]?
            for subscription in subscribers {
                var accepted: [Range<Int>] = [0..<run.count]
                if !subscription.acceptsAll {
                    if properties == nil { properties = (0..<run.count).map { run.properties(at: $0) } }
                    accepted = []
                    var from: Int?
                    for index in 0..<run.count {
                        let passes = subscription.accepts(name: run.kind.name, origin: run.origin, properties: properties![index])
                        if passes, from == nil { from = index }
                        if !passes, let start = from {
                            accepted.append(start..<index)
                            from = nil
                        }
                    }
                    if let start = from { accepted.append(start..<run.count) }
                }
                for range in accepted {
                    let delivery = RunDelivery(
                        run: run, range: range, seq: numbered.seq, time: time, subscription: subscription.id,
                        rows: subscription.wantsRows)
                    if let wakeup = subscription.outbox.enqueue(run: delivery, policy: subscription.overflow) {
                        wakeups.append(wakeup)
                    }
                }
            }
        case .unwanted:
            break  // made for nobody: nobody wanted it when the batch was made, nor when queued
        }
    }

    /// Adds a subscription; `registered` runs under the bus's lock with the head seq at that moment
    /// and the stable point — the seq up to which every event has been delivered (later ones are
    /// pending or held, and will reach the new subscription) — so what it queues reaches the
    /// subscriber before any event of the new subscription.
    @discardableResult
    func subscribe(
        session: UInt64, name: String?, patterns: [EventPattern], filter: WhereFilter,
        overflow: OverflowPolicy, wantsRows: Bool, outbox: Outbox, visibility: EventVisibility? = nil,
        veto: ((Int) -> VetoListener)? = nil,
        registered: (Subscription, _ head: Int64, _ stable: Int64) -> Void = { _, _, _ in }
    ) -> Subscription {
        self.state.withLock { state in
            let subscription = Subscription(
                id: state.nextSubscription, session: session, name: name, patterns: patterns, filter: filter,
                overflow: overflow, wantsRows: wantsRows, outbox: outbox, visibility: visibility)
            state.nextSubscription += 1
            state.subscriptions[subscription.id] = subscription
            if let veto { state.vetoListeners[subscription.id] = veto(subscription.id) }
            self.rebuild(&state)
            registered(subscription, state.seq, Self.stablePoint(state))
            return subscription
        }
    }

    /// Removes subscription `id` if `session` owns it; returns whether it did.
    func unsubscribe(id: Int, session: UInt64) -> Bool {
        self.state.withLock { state in
            guard let subscription = state.subscriptions[id], subscription.session == session else { return false }
            state.subscriptions.removeValue(forKey: id)
            state.vetoListeners.removeValue(forKey: id)
            self.rebuild(&state)
            return true
        }
    }

    /// Removes every subscription of `session` (it disconnected).
    func unsubscribeAll(session: UInt64) {
        self.state.withLock { state in
            let before = state.subscriptions.count
            state.subscriptions = state.subscriptions.filter { $0.value.session != session }
            state.vetoListeners = state.vetoListeners.filter { $0.value.session != session }
            if state.subscriptions.count != before { self.rebuild(&state) }
        }
        // A listener that disconnects resolves its pending vetoes at once, not at their timeout.
        self.pendingVetoes.resolveAll(session: session, .noAnswer(.disconnected))
    }

    private func rebuild(_ state: inout State) {
        var byKind = Array(repeating: [Subscription](), count: EventKind.allCases.count)
        var interest: UInt64 = 0
        var rowsInterest: UInt64 = 0
        for subscription in state.subscriptions.values {
            interest |= subscription.kinds
            if subscription.wantsRows { rowsInterest |= subscription.kinds }
            var bits = subscription.kinds
            while bits != 0 {
                let index = bits.trailingZeroBitCount
                byKind[index].append(subscription)
                bits &= bits - 1
            }
        }
        state.byKind = byKind
        state.byCustomName = [:]
        self.interest.store(interest, ordering: .relaxed)
        self.rowsInterest.store(rowsInterest, ordering: .relaxed)
        var vetoersByKind = Array(repeating: [VetoListener](), count: EventKind.allCases.count)
        var vetoInterest: UInt64 = 0
        for listener in state.vetoListeners.values.sorted(by: VetoListener.chainOrder) {
            vetoInterest |= listener.kinds
            var bits = listener.kinds
            while bits != 0 {
                vetoersByKind[bits.trailingZeroBitCount].append(listener)
                bits &= bits - 1
            }
        }
        state.vetoersByKind = vetoersByKind
        self.vetoInterest.store(vetoInterest, ordering: .relaxed)
    }

    /// Stops asking `session`'s veto listeners (its input ended: it can never reply again) and
    /// resolves their pending vetoes at once by their `on_timeout`. Its plain subscriptions stay.
    func removeVetoListeners(session: UInt64) {
        self.state.withLock { state in
            let before = state.vetoListeners.count
            state.vetoListeners = state.vetoListeners.filter { $0.value.session != session }
            if state.vetoListeners.count != before { self.rebuild(&state) }
        }
        self.pendingVetoes.resolveAll(session: session, .noAnswer(.disconnected))
    }

    /// Custom event names emitted so far.
    public var customNames: [String] { self.state.withLock { Array($0.customNames) } }

    /// Counters for `stats`.
    func statistics() -> (published: [String: Int], subscriptions: Int, head: Int64) {
        self.state.withLock { ($0.published, $0.subscriptions.count, $0.seq) }
    }

    // MARK: Vetoes

    /// Runs the veto chain for a vetoable event from async code, then emits the event to plain
    /// subscribers with its `outcome`. Returns `nil` when no listener decides `kind` (the event was
    /// emitted as usual and nothing changes); otherwise the verdict.
    func decide(
        _ kind: EventKind, _ origin: EventOrigin, budget: Duration, eventLoop: any EventLoop,
        _ properties: () -> JSONObject
    ) async -> VetoVerdict? {
        let budget = OperationVetoBudget.current?.remaining(cap: budget) ?? budget
        guard var run = self.startVeto(kind, origin, budget: budget, emitPlainly: true, properties) else { return nil }
        await self.runChain(&run, eventLoop: eventLoop)
        self.endVeto(run)
        return run.verdict
    }

    /// A chain decided ahead of the work it is about (`decideAhead`): its verdict (`nil`: no
    /// listener was asked), and the event, which plain subscribers get only when `publish()` is
    /// called — where the event belongs in the order they see.
    struct DecidedAhead {
        let verdict: VetoVerdict?
        /// Emits the event to plain subscribers: with its `outcome` after a chain, else plainly.
        let publish: () -> Void
    }

    /// Runs the veto chain for `kind` like `decide`, but leaves the event's publication to the
    /// caller. `before_execute` is decided this way before a connection is checked out (a listener
    /// never holds a pooled connection while it thinks), and published after the checkout, so that
    /// plain subscribers still see SQLAlchemy's order: `checkout`, `engine_connect`, `before_execute`.
    func decideAhead(
        _ kind: EventKind, _ origin: EventOrigin, budget: Duration, eventLoop: any EventLoop,
        _ properties: @escaping () -> JSONObject
    ) async -> DecidedAhead {
        let budget = OperationVetoBudget.current?.remaining(cap: budget) ?? budget
        guard var run = self.startVeto(kind, origin, budget: budget, emitPlainly: false, properties) else {
            return DecidedAhead(verdict: nil) { self.emit(kind, origin, properties) }
        }
        await self.runChain(&run, eventLoop: eventLoop)
        let decided = run
        return DecidedAhead(verdict: run.verdict) { self.endVeto(decided) }
    }

    /// Asks the chain's listeners one at a time from async code, drawing on the request's
    /// budget (`OperationVetoBudget.current`).
    private func runChain(_ run: inout VetoRun, eventLoop: any EventLoop) async {
        let operation = OperationVetoBudget.current
        let started = ContinuousClock.now
        defer { operation?.spend(.now - started) }
        while let (listener, timeout) = run.next() {
            switch self.ask(listener, run) {
            case .answered(let decision):
                self.finishAsking(nil, listener, decision, into: &run)
            case .pending(let veto):
                let decision = await veto.wait(timeout: timeout, on: eventLoop)
                self.finishAsking(veto, listener, decision, into: &run)
            }
        }
    }

    /// The same as `decide`, for a SQLite thread: each wait blocks this thread (which serves the one
    /// connection the vetoed work runs on), never a cooperative one. `operation` is the request's
    /// budget (a SQLite thread cannot see `OperationVetoBudget.current`).
    func decideBlocking(
        _ kind: EventKind, _ origin: EventOrigin, budget: Duration, operation: OperationVetoBudget? = nil,
        _ properties: () -> JSONObject
    ) -> VetoVerdict? {
        let started = ContinuousClock.now
        defer { operation?.spend(.now - started) }
        guard var run = self.startVeto(kind, origin, budget: operation?.remaining(cap: budget) ?? budget, emitPlainly: true, properties)
        else { return nil }
        while let (listener, timeout) = run.next() {
            switch self.ask(listener, run) {
            case .answered(let decision):
                self.finishAsking(nil, listener, decision, into: &run)
            case .pending(let veto):
                let decision = veto.waitBlocking(timeout: timeout)
                self.finishAsking(veto, listener, decision, into: &run)
            }
        }
        self.endVeto(run)
        return run.verdict
    }

    /// Starts a chain with `budget` (what is left of the request's), or (no listener) returns
    /// `nil` — having emitted the event plainly if `emitPlainly`.
    private func startVeto(
        _ kind: EventKind, _ origin: EventOrigin, budget: Duration, emitPlainly: Bool, _ properties: () -> JSONObject
    ) -> VetoRun? {
        guard self.wantsVeto(kind) else {
            if emitPlainly { self.emit(kind, origin, properties) }
            return nil
        }
        let properties = properties()
        // The listeners whose `where` the event passes; a seq only when someone is asked.
        let (listeners, seq) = self.state.withLock { state -> ([VetoListener], Int64) in
            let listeners = state.vetoersByKind[kind.rawValue].filter {
                $0.accepts(kind, origin: origin, properties: properties)
            }
            guard !listeners.isEmpty else { return ([], 0) }
            state.seq += 1
            return (listeners, state.seq)
        }
        if seq != 0 { self.lease?.cover(seq) }
        guard !listeners.isEmpty else {
            if emitPlainly { self.emit(kind, origin) { properties } }
            return nil
        }
        return VetoRun(kind: kind, seq: seq, origin: origin, properties: properties, listeners: listeners, budget: budget)
    }

    /// What asking a listener came to: a veto to wait for, or a decision made without waiting.
    private enum Asked {
        case pending(PendingVeto)
        /// Decided by the listener's `on_timeout` at once: it is tripped, its outbox is full, or
        /// it is gone.
        case answered(VetoDecision)
    }

    /// Sends the veto message to `listener` and registers the pending veto its reply resolves —
    /// unless the listener is tripped (the message is sent, not waited for), or its output is at
    /// its bound (nothing is sent: `Outbox.enqueue(veto:)`).
    private func ask(_ listener: VetoListener, _ run: VetoRun) -> Asked {
        let deadline = run.deadline - .now
        let deadlineMs = min(listener.timeout, deadline).components.seconds * 1000
            + min(listener.timeout, deadline).components.attoseconds / 1_000_000_000_000_000
        var line: [UInt8] = Array(#"{"type":"veto","seq":"#.utf8)
        JSONWriter.appendInt(run.verdict.seq, to: &line)
        line += Array(#","event":"#.utf8)
        JSONWriter.appendString(run.kind.name, to: &line)
        line += Array(#","time":"#.utf8)
        EventTime.appendNow(to: &line)
        line += Array(#","subscription":"#.utf8)
        JSONWriter.appendInt(Int64(listener.subscription), to: &line)
        line += run.origin.envelopeFragment
        line += Array(#","deadline_ms":"#.utf8)
        JSONWriter.appendInt(max(1, deadlineMs), to: &line)
        for (key, value) in run.verdict.properties {
            line.append(UInt8(ascii: ","))
            JSONWriter.appendString(key, to: &line)
            line.append(UInt8(ascii: ":"))
            value.write(into: &line)
        }
        line += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
        if listener.isTripped {
            // Sent so that a listener that comes back has something to reply to (its reply, late
            // as it is, closes its circuit); not registered, not waited for.
            switch listener.outbox.enqueue(veto: line) {
            case .queued: return .answered(.noAnswer(.tripped))
            case .full: return .answered(.noAnswer(.outboxFull))
            case .closed: return .answered(.noAnswer(.disconnected))
            }
        }
        // Registered before it is sent: the reply may come before `enqueue` returns.
        let veto = PendingVeto(seq: run.verdict.seq, listener: listener, mutable: Set(run.kind.spec.mutable))
        self.pendingVetoes.add(veto)
        switch listener.outbox.enqueue(veto: line) {
        case .queued:
            self.vetoStats.asked.add(1, ordering: .relaxed)
            return .pending(veto)
        case .full:
            self.pendingVetoes.remove(veto)
            return .answered(.noAnswer(.outboxFull))
        case .closed:
            self.pendingVetoes.remove(veto)
            return .answered(.noAnswer(.disconnected))
        }
    }

    /// Records one listener's decision: in the stats, its circuit, and the chain.
    private func finishAsking(_ veto: PendingVeto?, _ listener: VetoListener, _ decision: VetoDecision, into run: inout VetoRun) {
        if let veto { self.pendingVetoes.remove(veto) }
        self.vetoStats.record(decision, dryRun: listener.dryRun, since: veto?.askedAt ?? .now)
        listener.note(decision)
        run.record(decision, from: listener)
    }

    /// Emits the event to plain subscribers with its final properties and `outcome`.
    private func endVeto(_ run: VetoRun) {
        if self.wants(run.kind) {
            var properties = run.verdict.properties
            properties["outcome"] = run.verdict.outcome
            self.publish(name: run.kind.name, kind: run.kind, origin: run.origin, properties: properties)
        }
    }

    /// `session` sent a `reply` that matched no pending veto (a late one, typically: it had timed
    /// out): it is alive again, so its tripped listeners' circuits close.
    func vetoListenersReplied(session: UInt64) {
        let listeners = self.state.withLock { state in state.vetoListeners.values.filter { $0.session == session } }
        for listener in listeners { listener.replied() }
    }

    /// Veto listeners that are tripped now, for `stats`.
    var trippedVetoListenerCount: Int {
        self.state.withLock { state in state.vetoListeners.values.count { $0.isTripped } }
    }

    /// Every veto listener, for `stats`.
    var vetoListenerCount: Int { self.state.withLock { $0.vetoListeners.count } }
}
