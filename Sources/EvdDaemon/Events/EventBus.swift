import EvdClient
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
    /// Property → accepted values; every listed property must match.
    let filter: [(String, [JSONValue])]
    let overflow: OverflowPolicy
    let wantsRows: Bool
    let outbox: Outbox

    init(
        id: Int, session: UInt64, name: String?, patterns: [EventPattern], filter: [(String, [JSONValue])],
        overflow: OverflowPolicy, wantsRows: Bool, outbox: Outbox
    ) {
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

    /// Whether an event with these properties passes the `where` filter.
    func accepts(name: String, origin: EventOrigin, properties: JSONObject) -> Bool {
        for (key, accepted) in self.filter {
            let value: JSONValue?
            switch key {
            case "event": value = .string(name)
            case "session": value = origin.session.map { .integer($0) } ?? .null
            case "actor": value = origin.actor.map { .string($0.id) } ?? .null
            default: value = properties[key]
            }
            guard let value, accepted.contains(where: { looselyEqual($0, value) }) else { return false }
        }
        return true
    }
}

/// JSON equality where an integer equals the same real (`5 == 5.0`), as a filter user expects.
func looselyEqual(_ a: JSONValue, _ b: JSONValue) -> Bool {
    if let x = a.doubleValue, let y = b.doubleValue { return x == y }
    return a == b
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
    }

    private let interest = Atomic<UInt64>(0)
    private let state: Mutex<State>
    let deliveryStats = DeliveryStats()

    /// Creates a bus whose first event gets `lastSeq + 1`.
    public init(lastSeq: Int64 = 0) {
        precondition(EventKind.allCases.count <= 64, "the interest bit set holds 64 catalog events")
        self.state = Mutex(State(seq: lastSeq))
    }

    /// The newest seq handed out.
    public var headSeq: Int64 { self.state.withLock { $0.seq } }

    /// Whether any subscription wants `kind` right now.
    @inline(__always)
    public func wants(_ kind: EventKind) -> Bool {
        self.interest.load(ordering: .relaxed) & (1 << UInt64(kind.rawValue)) != 0
    }

    /// Emits a catalog event; `properties` is only called when someone subscribed to it.
    @inline(__always)
    public func emit(_ kind: EventKind, _ origin: EventOrigin, _ properties: () -> JSONObject) {
        guard self.wants(kind) else { return }
        self.publish(name: kind.name, kind: kind, origin: origin, properties: properties())
    }

    /// Emits a custom event (`emit` op) and returns its seq.
    public func emitCustom(name: String, origin: EventOrigin, properties: JSONObject) -> Int64 {
        self.publish(name: name, kind: nil, origin: origin, properties: properties)
    }

    /// Numbers an event and queues it to every matching subscription.
    @discardableResult
    private func publish(name: String, kind: EventKind?, origin: EventOrigin, properties: JSONObject) -> Int64 {
        var body = origin.envelopeFragment
        for (key, value) in properties {
            body.append(UInt8(ascii: ","))
            JSONWriter.appendString(key, to: &body)
            body.append(UInt8(ascii: ":"))
            value.write(into: &body)
        }
        body.append(UInt8(ascii: "}"))
        body.append(UInt8(ascii: "\n"))

        var wakeups: [Outbox.Wakeup] = []
        let seq = self.state.withLock { state -> Int64 in
            state.seq += 1
            let seq = state.seq
            state.published[name, default: 0] += 1
            let subscribers: [Subscription]
            if let kind {
                subscribers = state.byKind[kind.rawValue]
            } else {
                state.customNames.append(name)
                if let cached = state.byCustomName[name] {
                    subscribers = cached
                } else {
                    subscribers = state.subscriptions.values.filter { $0.matches(customName: name) }
                    state.byCustomName[name] = subscribers
                }
            }
            guard !subscribers.isEmpty else { return seq }
            var prefix: [UInt8] = Array(#"{"type":"event","seq":"#.utf8)
            JSONWriter.appendInt(seq, to: &prefix)
            prefix += Array(#","event":"#.utf8)
            JSONWriter.appendString(name, to: &prefix)
            prefix += Array(#","time":"#.utf8)
            EventTime.appendNow(to: &prefix)
            prefix += Array(#","subscription":"#.utf8)
            for subscription in subscribers
            where subscription.filter.isEmpty || subscription.accepts(name: name, origin: origin, properties: properties) {
                let event = QueuedEvent(prefix: prefix, subscription: subscription.id, body: body, seq: seq)
                if let wakeup = subscription.outbox.enqueue(event: event, policy: subscription.overflow) {
                    wakeups.append(wakeup)
                }
            }
            return seq
        }
        for wakeup in wakeups { wakeup.resume() }
        return seq
    }

    /// Adds a subscription; `registered` runs under the bus's lock with the head seq at that moment,
    /// so what it queues reaches the subscriber before any event of the new subscription.
    @discardableResult
    func subscribe(
        session: UInt64, name: String?, patterns: [EventPattern], filter: [(String, [JSONValue])],
        overflow: OverflowPolicy, wantsRows: Bool, outbox: Outbox,
        registered: (Subscription, _ head: Int64) -> Void = { _, _ in }
    ) -> Subscription {
        self.state.withLock { state in
            let subscription = Subscription(
                id: state.nextSubscription, session: session, name: name, patterns: patterns, filter: filter,
                overflow: overflow, wantsRows: wantsRows, outbox: outbox)
            state.nextSubscription += 1
            state.subscriptions[subscription.id] = subscription
            self.rebuild(&state)
            registered(subscription, state.seq)
            return subscription
        }
    }

    /// Removes subscription `id` if `session` owns it; returns whether it did.
    func unsubscribe(id: Int, session: UInt64) -> Bool {
        self.state.withLock { state in
            guard let subscription = state.subscriptions[id], subscription.session == session else { return false }
            state.subscriptions.removeValue(forKey: id)
            self.rebuild(&state)
            return true
        }
    }

    /// Removes every subscription of `session` (it disconnected).
    func unsubscribeAll(session: UInt64) {
        self.state.withLock { state in
            let before = state.subscriptions.count
            state.subscriptions = state.subscriptions.filter { $0.value.session != session }
            if state.subscriptions.count != before { self.rebuild(&state) }
        }
    }

    private func rebuild(_ state: inout State) {
        var byKind = Array(repeating: [Subscription](), count: EventKind.allCases.count)
        var interest: UInt64 = 0
        for subscription in state.subscriptions.values {
            interest |= subscription.kinds
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
    }

    /// Custom event names emitted so far.
    public var customNames: [String] { self.state.withLock { Array($0.customNames) } }

    /// Counters for `stats`.
    func statistics() -> (published: [String: Int], subscriptions: Int, head: Int64) {
        self.state.withLock { ($0.published, $0.subscriptions.count, $0.seq) }
    }
}
