import EvdClient

/// Delivery: a numbered event's bytes queued into the outbox of each subscription that passes
/// its filters (under the bus's lock; the outboxes' wake-ups run after it is released).
extension EventBus {
    /// Queues numbered events to their subscribers that pass their filters (under the lock);
    /// those with `rows: true` get the row images.
    static func deliver(_ state: inout State, _ numbered: NumberedEvent, wakeups: inout [Outbox.Wakeup]) {
        switch numbered.event {
        case .entry(let event):
            let subscribers = Self.subscribers(&state, name: event.name, kind: event.kind)
            guard !subscribers.isEmpty else { return }
            let prefix = WireLines.prefix(seq: numbered.seq, epoch: state.epoch, name: event.name, time: numbered.time)
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
                        run: run,
                        range: range,
                        seq: numbered.seq,
                        time: time,
                        epoch: state.epoch,
                        subscription: subscription.id,
                        rows: subscription.wantsRows
                    )
                    if let wakeup = subscription.outbox.enqueue(run: delivery, policy: subscription.overflow) {
                        wakeups.append(wakeup)
                    }
                }
            }
        case .unwanted:
            break  // made for nobody: nobody wanted it when the batch was made, nor when queued
        }
    }
}
