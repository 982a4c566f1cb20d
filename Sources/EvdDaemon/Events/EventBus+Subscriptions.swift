import EvdClient

/// Subscriptions and veto listeners: adding and removing them, and the per-event indexes
/// (`byKind`, the interest bits) that delivery and the veto chain read.
extension EventBus {
    /// The subscriptions of an event: by catalog bit, or (custom events) by name, cached.
    static func subscribers(_ state: inout State, name: String, kind: EventKind?) -> [Subscription] {
        if let kind { return state.byKind[kind.rawValue] }
        if let cached = state.byCustomName[name] { return cached }
        let subscribers = state.subscriptions.values.filter { $0.matches(customName: name) }
        state.byCustomName[name] = subscribers
        return subscribers
    }

    /// Adds a subscription, then runs `registered` with the head seq at that moment and the stable
    /// point — the seq up to which every event has been delivered (later ones are pending or held,
    /// and will reach the new subscription). `registered` runs after the bus's lock is released (it
    /// writes the `subscribe` response, a `send`); meanwhile the outbox holds back the new
    /// subscription's events and vetoes (`Outbox.hold`), so what `registered` queues as a line still
    /// reaches the subscriber before any of them.
    @discardableResult
    func subscribe(
        session: UInt64,
        name: String?,
        patterns: [EventPattern],
        filter: WhereFilter,
        overflow: OverflowPolicy,
        wantsRows: Bool,
        outbox: Outbox,
        visibility: EventVisibility? = nil,
        journaledOnly: Bool = false,
        veto: ((Int) -> VetoListener)? = nil,
        registered: (Subscription, _ head: Int64, _ stable: Int64) -> Void = { _, _, _ in }
    ) -> Subscription {
        let (subscription, head, stable) = self.state.withLock { state in
            let subscription = Subscription(
                id: state.nextSubscription,
                session: session,
                name: name,
                patterns: patterns,
                filter: filter,
                overflow: overflow,
                wantsRows: wantsRows,
                outbox: outbox,
                visibility: visibility,
                journaledOnly: journaledOnly
            )
            state.nextSubscription += 1
            // Held before anything can be queued for the subscription (delivery and the veto
            // chain find it only under this lock).
            outbox.hold()
            state.subscriptions[subscription.id] = subscription
            if let veto { state.vetoListeners[subscription.id] = veto(subscription.id) }
            self.rebuild(&state)
            return (subscription, state.seq, Self.stablePoint(state))
        }
        registered(subscription, head, stable)
        outbox.release()
        return subscription
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

    func rebuild(_ state: inout State) {
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
