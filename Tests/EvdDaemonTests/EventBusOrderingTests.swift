import EvdClient
import NIOCore
import Testing

@testable import EvdDaemon

/// The events queued to `outbox` so far, as `(subscription, seq, event name)`, with their
/// properties; taken as its event loop's flush would take them.
private func delivered(_ outbox: Outbox, sourceLocation: SourceLocation = #_sourceLocation) throws -> [JSONObject] {
    guard case .batch(let chunks, let bytes, _) = outbox.take() else { return [] }
    var buffer = ByteBufferAllocator().buffer(capacity: bytes)
    for chunk in chunks { chunk.write(into: &buffer) }
    let data = buffer.readBytes(length: buffer.readableBytes) ?? []
    return try data.split(separator: 0x0a).map { line in
        try #require(try JSONValue(parsing: Array(line)).objectValue, sourceLocation: sourceLocation)
    }
}

/// `subscription#seq:name` of each event.
private func summary(_ events: [JSONObject]) -> [String] {
    events.map { "\($0["subscription"]?.intValue ?? -1)#\($0["seq"]?.intValue ?? -1):\($0["event"]?.stringValue ?? "?")" }
}

private func outbox() -> Outbox { Outbox(limits: OutboxLimits(), stats: DeliveryStats()) }

@discardableResult
private func subscribe(
    _ bus: EventBus,
    _ outbox: Outbox,
    _ patterns: [String],
    where filter: JSONObject = [:],
    session: UInt64 = 1
) throws -> Subscription {
    bus.subscribe(
        session: session,
        name: nil,
        patterns: patterns.map(EventPattern.init),
        filter: try WhereFilter(filter, maxValues: 100),
        overflow: .drop,
        wantsRows: false,
        outbox: outbox
    )
}

/// A custom event's entry, made outside the bus's lock as a journaled event is.
private func entry(_ bus: EventBus, _ name: String, _ properties: JSONObject = [:]) -> JournalEntry {
    bus.entry(name: name, kind: nil, origin: .daemon, properties: properties)
}

@Suite("EventBus ordering (unit)")
struct EventBusOrderingTests {
    @Test("publish numbers events consecutively from the last seq; each subscriber gets them in seq order")
    func consecutiveSeqs() throws {
        let bus = EventBus(lastSeq: 100)
        let a = outbox()
        let b = outbox()
        try subscribe(bus, a, ["app.*"])
        try subscribe(bus, b, ["app.*"], session: 2)
        #expect(bus.publish(name: "app.one", kind: nil, origin: .daemon, properties: ["n": 1]) == 101)
        #expect(bus.publish(name: "other", kind: nil, origin: .daemon, properties: [:]) == 102)
        #expect(bus.publish(name: "app.two", kind: nil, origin: .daemon, properties: ["n": 2]) == 103)
        #expect(bus.headSeq == 103)
        let toA = try delivered(a)
        #expect(summary(toA) == ["1#101:app.one", "1#103:app.two"])
        #expect(toA.first?["n"] == 1 && toA.first?["type"] == "event" && toA.first?["session"] == .null)
        #expect(summary(try delivered(b)) == ["2#101:app.one", "2#103:app.two"])
        #expect(bus.statistics().published == ["app.one": 1, "other": 1, "app.two": 1])
    }

    @Test("two subscriptions on one connection: each event goes to both, in subscription order, before the next event")
    func subscriptionOrderOnOneOutbox() throws {
        let bus = EventBus()
        let box = outbox()
        try subscribe(bus, box, ["app.*"])
        try subscribe(bus, box, ["*"])
        bus.publish(name: "app.a", kind: nil, origin: .daemon, properties: [:])
        bus.publish(name: "b", kind: nil, origin: .daemon, properties: [:])
        bus.publish(name: "app.c", kind: nil, origin: .daemon, properties: [:])
        #expect(summary(try delivered(box)) == ["1#1:app.a", "2#1:app.a", "2#2:b", "1#3:app.c", "2#3:app.c"])
    }

    @Test("reservations completed out of order: events are delivered in seq order, later ones held until the oldest completes")
    func reserveCompleteOutOfOrder() throws {
        let bus = EventBus()
        let box = outbox()
        try subscribe(bus, box, ["*"])
        let first = bus.reserve(2)
        let second = bus.reserve(1)
        #expect(first.first == 1 && first.last == 2 && second.first == 3)
        // Published while both are pending: numbered after them, held.
        #expect(bus.publish(name: "live.4", kind: nil, origin: .daemon, properties: [:]) == 4)
        #expect(try delivered(box).isEmpty)
        // The younger reservation completes first: it waits for the older.
        bus.complete(second, [entry(bus, "r2.3")])
        #expect(try delivered(box).isEmpty)
        bus.publish(name: "live.5", kind: nil, origin: .daemon, properties: [:])
        #expect(try delivered(box).isEmpty)
        bus.complete(first, [entry(bus, "r1.1"), entry(bus, "r1.2")])
        #expect(summary(try delivered(box)) == ["1#1:r1.1", "1#2:r1.2", "1#3:r2.3", "1#4:live.4", "1#5:live.5"])
        // Nothing pending any more: delivered at once.
        bus.publish(name: "live.6", kind: nil, origin: .daemon, properties: [:])
        #expect(summary(try delivered(box)) == ["1#6:live.6"])
    }

    @Test("held events are released in seq order when a reservation slots in among them")
    func heldReleasedInOrder() throws {
        let bus = EventBus()
        let box = outbox()
        try subscribe(bus, box, ["*"])
        let r1 = bus.reserve(1)  // 1
        bus.publish(name: "e2", kind: nil, origin: .daemon, properties: [:])  // held
        let r3 = bus.reserve(1)  // 3
        bus.publish(name: "e4", kind: nil, origin: .daemon, properties: [:])  // held
        let r5 = bus.reserve(1)  // 5
        bus.publish(name: "e6", kind: nil, origin: .daemon, properties: [:])  // held
        bus.complete(r5, [entry(bus, "r5")])
        bus.complete(r3, [entry(bus, "r3")])
        #expect(try delivered(box).isEmpty)
        bus.complete(r1, [entry(bus, "r1")])
        #expect(summary(try delivered(box)) == ["1#1:r1", "1#2:e2", "1#3:r3", "1#4:e4", "1#5:r5", "1#6:e6"])
    }

    @Test("only the events before the oldest pending reservation are released when a younger one is cancelled")
    func releaseUpToOldestPending() throws {
        let bus = EventBus()
        let box = outbox()
        try subscribe(bus, box, ["*"])
        let r1 = bus.reserve(1)  // 1
        bus.publish(name: "e2", kind: nil, origin: .daemon, properties: [:])
        let r3 = bus.reserve(1)  // 3
        bus.publish(name: "e4", kind: nil, origin: .daemon, properties: [:])
        bus.complete(r1, [entry(bus, "r1")])
        // r3 is still pending: e4 waits for it.
        #expect(summary(try delivered(box)) == ["1#1:r1", "1#2:e2"])
        bus.cancel(r3)
        // A cancelled reservation's seqs are never used: e4 keeps 4, the next event gets 5.
        #expect(summary(try delivered(box)) == ["1#4:e4"])
        #expect(bus.publish(name: "e5", kind: nil, origin: .daemon, properties: [:]) == 5)
        #expect(summary(try delivered(box)) == ["1#5:e5"])
    }

    @Test("a big reservation completed in batches: a subscription added between batches gets exactly the events after the stable point")
    func batchesAndStablePoint() throws {
        let bus = EventBus()
        let box = outbox()
        try subscribe(bus, box, ["*"])
        let reservation = bus.reserve(5)
        let late = outbox()
        var registeredAt: (head: Int64, stable: Int64)?
        var calls: [Range<Int>] = []
        bus.complete(reservation, batch: 2) { range, _ in
            calls.append(range)
            if range.lowerBound == 2, registeredAt == nil {
                // Between the first batch (seqs 1...2, delivered) and the second.
                bus.subscribe(
                    session: 2,
                    name: nil,
                    patterns: [EventPattern("*")],
                    filter: .none,
                    overflow: .drop,
                    wantsRows: false,
                    outbox: late,
                    registered: { _, head, stable in registeredAt = (head, stable) }
                )
                bus.publish(name: "live", kind: nil, origin: .daemon, properties: [:])  // 6: held
            }
            return range.map { .entry(entry(bus, "r.\($0 + 1)")) }
        }
        #expect(calls == [0..<2, 2..<4, 4..<5])
        #expect(registeredAt?.head == 5)
        #expect(registeredAt?.stable == 2)
        #expect(summary(try delivered(box)) == ["1#1:r.1", "1#2:r.2", "1#3:r.3", "1#4:r.4", "1#5:r.5", "1#6:live"])
        // What it missed (1...2) is the stable point's: a replay's; everything after comes live.
        #expect(summary(try delivered(late)) == ["2#3:r.3", "2#4:r.4", "2#5:r.5", "2#6:live"])
    }

    @Test("a subscription's where filter and patterns choose its events; the others still get theirs, in order")
    func filter() throws {
        let bus = EventBus()
        let red = outbox()
        let all = outbox()
        try subscribe(bus, red, ["app.*"], where: ["color": "red", "size": [1, 2]])
        try subscribe(bus, all, ["app.*"], session: 2)
        bus.publish(name: "app.a", kind: nil, origin: .daemon, properties: ["color": "red", "size": 1])
        bus.publish(name: "app.a", kind: nil, origin: .daemon, properties: ["color": "blue", "size": 1])
        bus.publish(name: "x.a", kind: nil, origin: .daemon, properties: ["color": "red", "size": 1])
        bus.publish(name: "app.b", kind: nil, origin: .daemon, properties: ["color": "red", "size": 2.0])
        bus.publish(name: "app.b", kind: nil, origin: .daemon, properties: ["color": "red"])
        bus.publish(name: "app.c", kind: nil, origin: .daemon, properties: ["color": "red", "size": 3])
        #expect(summary(try delivered(red)) == ["1#1:app.a", "1#4:app.b"])
        #expect(summary(try delivered(all)) == ["2#1:app.a", "2#2:app.a", "2#4:app.b", "2#5:app.b", "2#6:app.c"])
    }

    @Test("interest bits: a catalog event is wanted only while a subscription's patterns match it")
    func interest() throws {
        let bus = EventBus()
        let box = outbox()
        #expect(!bus.wants(.insertRows) && !bus.wantsCommittedChanges)
        let rows = try subscribe(bus, box, ["insert-*"])
        #expect(bus.wants(.insertRows) && !bus.wants(.updateRow) && bus.wantsCommittedChanges)
        // emit builds nothing for an unwanted event: its properties closure is not called.
        var built = 0
        bus.emit(.updateRow, .daemon) {
            built += 1
            return [:]
        }
        bus.emit(.insertRows, .daemon) {
            built += 1
            return ["table": "t"]
        }
        #expect(built == 1)
        #expect(summary(try delivered(box)) == ["1#1:insert-rows"])
        #expect(bus.unsubscribe(id: rows.id, session: 1))
        #expect(!bus.wants(.insertRows) && !bus.wantsCommittedChanges)
    }

    @Test("unsubscribe stops delivery to that subscription only; another session's cannot be removed")
    func unsubscribe() throws {
        let bus = EventBus()
        let box = outbox()
        let first = try subscribe(bus, box, ["*"])
        try subscribe(bus, box, ["*"])
        #expect(!bus.unsubscribe(id: first.id, session: 9))
        #expect(bus.unsubscribe(id: first.id, session: 1))
        bus.publish(name: "e", kind: nil, origin: .daemon, properties: [:])
        #expect(summary(try delivered(box)) == ["2#1:e"])
        #expect(bus.statistics().subscriptions == 1)
    }
}
