import EvdClient
import NIOCore
import OrderedCollections
import Synchronization

/// Routes every event to the subscriptions that asked for it, numbering events with one daemon-wide seq.
///
/// Hot path: `emit` first checks one atomic bit per catalog event, so an event nobody subscribed
/// to costs a load and a mask — no properties built, no JSON written. A wanted event's body
/// (everything after the subscription number) is serialized once, outside the lock; under the lock
/// it gets its seq and is queued, in seq order, to each matching subscriber's outbox.
///
/// Its concerns live in files of their own: subscriptions and listeners
/// (`EventBus+Subscriptions.swift`), numbering and ordering (`EventBus+Sequencing.swift`), delivery
/// into outboxes (`EventBus+Delivery.swift`), the veto chain (`VetoChain.swift`), the bytes
/// (`Wire/WireLines.swift`).
public final class EventBus: Sendable {
    struct State {
        var seq: Int64
        /// The journal's epoch, which every event line carries (constant).
        let epoch: JournalEpoch
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
    static func stablePoint(_ state: State) -> Int64 {
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

    // The bus's files (EventBus+Subscriptions, +Sequencing, +Delivery, VetoChain) share these;
    // nothing outside them touches `state` or the interest bits.

    /// The catalog events some subscription wants, as a bit set (written under `state`'s lock).
    let interest = Atomic<UInt64>(0)
    /// The catalog events some veto listener decides.
    let vetoInterest = Atomic<UInt64>(0)
    /// The catalog events some `rows: true` subscription wants.
    let rowsInterest = Atomic<UInt64>(0)
    /// Subscriptions, listeners, the seq and what is held back. Lock order: this, then an
    /// `Outbox`'s (delivery, `Outbox.hold`); no I/O is done under it.
    let state: Mutex<State>
    let deliveryStats = DeliveryStats()
    let vetoStats: VetoStats
    /// Vetoes waiting for a reply.
    let pendingVetoes = PendingVetoes()

    /// Keeps seqs below a persisted bound, so that a restart never reuses one (`nil`: no journal).
    let lease: SeqLease?
    /// The journal's epoch (`JournalEpoch`): in `hello` and every event.
    public let epoch: JournalEpoch

    /// Creates a bus whose first event gets `lastSeq + 1`; `vetoLatency` is told how long each
    /// veto listener took to answer.
    init(
        lastSeq: Int64 = 0,
        epoch: JournalEpoch = .random(),
        lease: SeqLease? = nil,
        vetoLatency: (@Sendable (Duration) -> Void)? = nil
    ) {
        precondition(EventKind.allCases.count <= 64, "the interest bit set holds 64 catalog events")
        self.epoch = epoch
        self.state = Mutex(State(seq: lastSeq, epoch: epoch))
        self.lease = lease
        self.vetoStats = VetoStats(observeLatency: vetoLatency)
    }

    /// The newest seq handed out.
    public var headSeq: Int64 { self.state.withLock { $0.seq } }

    /// The seq up to which every event has been delivered (`stablePoint`): a subscription made
    /// now receives every event after it.
    public var stableSeq: Int64 { self.state.withLock { Self.stablePoint($0) } }

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

    /// Whether any veto listener decides an event other than `kind` right now.
    @inline(__always)
    func vetoesAny(except kind: EventKind) -> Bool {
        self.vetoInterest.load(ordering: .relaxed) & ~(1 << UInt64(kind.rawValue)) != 0
    }

    /// Emits a catalog event; `properties` is only called when someone subscribed to it.
    @inline(__always)
    public func emit(_ kind: EventKind, _ origin: EventOrigin, _ properties: () -> JSONObject) {
        guard self.wants(kind) else { return }
        self.publish(name: kind.name, kind: kind, origin: origin, properties: properties())
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

    /// Custom event names emitted so far.
    public var customNames: [String] { self.state.withLock { Array($0.customNames) } }

    /// Counters for `stats`.
    func statistics() -> (published: [String: Int], subscriptions: Int, head: Int64) {
        self.state.withLock { ($0.published, $0.subscriptions.count, $0.seq) }
    }
}
