import EvdClient

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
        id: Int,
        session: UInt64,
        name: String?,
        patterns: [EventPattern],
        filter: WhereFilter,
        overflow: OverflowPolicy,
        wantsRows: Bool,
        outbox: Outbox,
        visibility: EventVisibility? = nil,
        journaledOnly: Bool = false
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
        // A durable cursor's subscription follows the journal: its live events are not for it.
        self.kinds = journaledOnly ? kinds & EventKind.journaled : kinds
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
            name: name,
            session: origin.session.map { .integer($0) } ?? .null,
            actor: origin.actor.map { .string($0.id) } ?? .null,
            properties: properties
        )
    }
}
