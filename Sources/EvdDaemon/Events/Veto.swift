import EvdClient
import Synchronization

/// What a veto listener does when it gives no valid answer in time (PROTOCOL.md §4).
public enum VetoPolicy: String, Sendable {
    case allow, deny
}

/// The veto half of a subscription: which vetoable events it decides, and how.
final class VetoListener: Sendable {
    let subscription: Int
    let session: UInt64
    /// `by` in outcomes and `vetoed` errors: the subscription's name, else `subscription:N`.
    let name: String
    /// Vetoable catalog events matched by the subscription's `veto` patterns, as a bit set.
    let kinds: UInt64
    let priority: Int64
    let timeout: Duration
    let onTimeout: VetoPolicy
    /// `mode: "dry_run"`: asked, recorded, never enforced.
    let dryRun: Bool
    let outbox: Outbox
    /// The subscription's `where`: the listener is asked only about events that pass it.
    let filter: WhereFilter
    /// What its actor may see: it is asked only about those (`nil`: everything).
    let visibility: EventVisibility?
    /// Where its actor's `veto` grant reaches: it is asked only about those (`nil`: everywhere).
    let scope: EventVisibility?

    /// The listener's circuit: how many of its vetoes in a row timed out, and whether that run
    /// has tripped it (see `tripAfter`).
    private let circuit = Mutex(Circuit())

    private struct Circuit {
        var consecutiveTimeouts = 0
        var tripped = false
    }

    /// Consecutive timeouts after which a listener is tripped: its vetoes are then still sent to
    /// it but not waited for — its `on_timeout` decides each at once — until it replies again
    /// (any `reply`, even a late one; PROTOCOL.md §4 "The daemon never hangs on a dead or
    /// silent listener", docs/protocol.md "Vetoes").
    static let tripAfter = 3

    init(
        subscription: Int,
        session: UInt64,
        name: String?,
        kinds: UInt64,
        priority: Int64,
        timeout: Duration,
        onTimeout: VetoPolicy,
        dryRun: Bool,
        outbox: Outbox,
        filter: WhereFilter = .none,
        visibility: EventVisibility? = nil,
        scope: EventVisibility? = nil
    ) {
        self.visibility = visibility
        self.scope = scope
        self.filter = filter
        self.subscription = subscription
        self.session = session
        self.name = name ?? "subscription:\(subscription)"
        self.kinds = kinds
        self.priority = priority
        self.timeout = timeout
        self.onTimeout = onTimeout
        self.dryRun = dryRun
        self.outbox = outbox
    }

    /// Whether this listener is asked about `kind` with these properties (its `where`).
    func accepts(_ kind: EventKind, origin: EventOrigin, properties: JSONObject) -> Bool {
        (self.visibility?.allows(properties, name: kind.name, actor: origin.actor) ?? true)
            && (self.scope?.allows(properties, name: kind.name, actor: origin.actor) ?? true)
            && (self.filter.isEmpty || Subscription.passes(self.filter, name: kind.name, origin: origin, properties: properties))
    }

    /// Whether the listener is tripped: its vetoes are decided by its `on_timeout` without waiting.
    var isTripped: Bool { self.circuit.withLock { $0.tripped } }

    /// Counts one of its vetoes' outcomes towards its circuit: a timeout adds to the run (and trips
    /// it at `tripAfter`); an answer — valid or not — ends the run and closes the circuit. Other
    /// outcomes (disconnect, shutdown, a full outbox, a skip while tripped) change nothing.
    func note(_ decision: VetoDecision) {
        switch decision {
        case .noAnswer(.timeout):
            self.circuit.withLock { circuit in
                circuit.consecutiveTimeouts += 1
                if circuit.consecutiveTimeouts >= Self.tripAfter { circuit.tripped = true }
            }
        case .allow, .deny, .modify, .noAnswer(.invalidReply):
            self.replied()
        case .noAnswer:
            break
        }
    }

    /// The listener replied (to any veto, even one already decided): its circuit closes and its
    /// vetoes are waited for again.
    func replied() {
        self.circuit.withLock { circuit in
            circuit.consecutiveTimeouts = 0
            circuit.tripped = false
        }
    }

    /// Chain order: highest priority first, then subscription order.
    static func chainOrder(_ a: VetoListener, _ b: VetoListener) -> Bool {
        a.priority != b.priority ? a.priority > b.priority : a.subscription < b.subscription
    }
}

/// A listener's answer to one veto, or why there was none.
enum VetoDecision: Sendable, Equatable {
    case allow
    case deny(reason: String?)
    /// The listener's `set`, already checked against the event's mutable properties.
    case modify(JSONObject)
    /// No valid answer: the listener's `on_timeout` decides.
    case noAnswer(NoAnswer)

    enum NoAnswer: String, Sendable {
        case timeout
        case disconnected
        case invalidReply = "invalid_reply"
        case shutdown
        /// The listener's unwritten output was at its bound (`--max-queued-bytes`): the veto was
        /// not sent, nor waited for.
        case outboxFull = "outbox_full"
        /// The listener is tripped (`VetoListener.tripAfter`): the veto was sent, not waited for.
        case tripped
    }
}

/// What a veto chain decided.
struct VetoVerdict: Sendable {
    /// The properties after every modification.
    var properties: JSONObject
    /// `allow`, `deny` or `modify`: what actually happened.
    var action: String
    var by: String?
    var reason: String?
    /// The decisions of dry-run listeners: `{"by","action","reason"}`.
    var dryRun: [JSONValue] = []
    /// The seq the vetoers saw.
    var seq: Int64
    /// What each listener that modified the properties may see (listeners that see everything
    /// are left out): what it rewrote must stay within it (`SQLPolicy(rewriter:)`).
    var modifiers: [EventVisibility] = []

    var denied: Bool { self.action == "deny" }

    /// The `outcome` object plain subscribers get.
    var outcome: JSONValue {
        [
            "seq": .int(self.seq), "action": .string(self.action), "by": self.by.map(JSONValue.string) ?? .null,
            "reason": self.reason.map(JSONValue.string) ?? .null, "dry_run": .array(self.dryRun),
        ]
    }

    /// The error the client whose work was denied receives.
    func vetoedError(event: String) -> EvdError {
        EvdError(
            .vetoed,
            "\(event) was vetoed" + (self.by.map { " by \($0)" } ?? "") + (self.reason.map { ": \($0)" } ?? ""),
            extra: [
                "event": .string(event), "by": self.by.map(JSONValue.string) ?? .null,
                "reason": self.reason.map(JSONValue.string) ?? .null,
            ]
        )
    }
}

/// One operation's veto budget (PROTOCOL.md §4: "one operation's vetoes together never take longer
/// than the daemon's veto budget"): the session gives each request one (`$current`), and every chain
/// the request runs — `checkout`, `before_execute`, each statement's events, `commit` — draws on it.
/// Only the time spent waiting for vetoes is spent, not the SQL work between them.
final class OperationVetoBudget: Sendable {
    /// The budget of the request running in this task. SQLite threads do not see it: what runs
    /// there takes it along when it is created (see `SQLRun.operationBudget`).
    @TaskLocal static var current: OperationVetoBudget?

    private let left: Mutex<Duration>

    init(_ budget: Duration) {
        self.left = Mutex(budget)
    }

    /// What is left of it, at most `cap` (the daemon's budget for one chain).
    func remaining(cap: Duration) -> Duration { min(cap, self.left.withLock { $0 }) }

    func spend(_ elapsed: Duration) { self.left.withLock { $0 -= elapsed } }
}
