import EvdClient
import NIOCore
import Synchronization
import Testing

@testable import EvdDaemon

/// An event line for `subscription` with `seq`, as the outbox writes it: the prefix, the
/// subscription's number, the body.
private func event(_ seq: Int64, subscription: Int, padding: Int = 0) -> QueuedEvent {
    QueuedEvent(
        prefix: Array(#"{"type":"event","seq":\#(seq),"pad":"\#(String(repeating: "x", count: padding))","subscription":"#.utf8),
        subscription: subscription,
        body: Array("}\n".utf8),
        seq: seq
    )
}

/// A line (a response or notice) with a marker.
private func line(_ text: String) -> [UInt8] { Array(#"{"type":"response","id":"\#(text)"}"#.utf8) + [0x0a] }

/// A page of replayed events for `subscription`, seqs `first...last`.
private struct Page: ReplayedEvents {
    let subscription: Int
    let firstSeq: Int64
    let lastSeq: Int64
    var count: Int { Int(self.lastSeq - self.firstSeq + 1) }
    var bytes: [UInt8] {
        guard self.count > 0 else { return [] }
        return (self.firstSeq...self.lastSeq).flatMap { seq in
            Array(#"{"type":"event","seq":\#(seq),"replayed":true,"subscription":\#(self.subscription)}"#.utf8) + [0x0a]
        }
    }
}

/// What one `take()` returned, written out and parsed.
private struct Batch {
    var messages: [JSONObject]
    var bytes: Int
    var written: Int
    var closeAfter: Bool

    /// `seq` of each event, `id` of each response, `notice:CODE` of each notice.
    var summary: [String] {
        self.messages.map { message in
            switch message["type"]?.stringValue {
            case "event": return "\(message["subscription"]?.intValue ?? -1)#\(message["seq"]?.intValue ?? -1)"
            case "notice": return "notice:\(message["code"]?.stringValue ?? "?")"
            default: return message["id"]?.stringValue ?? "?"
            }
        }
    }
}

/// Takes what the outbox holds, as its event loop's flush would; `nil` for `.idle`, and a batch
/// with no messages and `closeAfter` for `.close`.
private func take(_ outbox: Outbox, sourceLocation: SourceLocation = #_sourceLocation) throws -> Batch? {
    switch outbox.take() {
    case .idle:
        return nil
    case .close:
        return Batch(messages: [], bytes: 0, written: 0, closeAfter: true)
    case .batch(let chunks, let bytes, let closeAfter):
        var buffer = ByteBufferAllocator().buffer(capacity: bytes)
        for chunk in chunks { chunk.write(into: &buffer) }
        let written = buffer.readableBytes
        let data = buffer.readBytes(length: written) ?? []
        var messages: [JSONObject] = []
        for piece in data.split(separator: 0x0a) {
            let value = try JSONValue(parsing: Array(piece))
            messages.append(try #require(value.objectValue, sourceLocation: sourceLocation))
        }
        #expect(data.last == 0x0a, "a batch ends with a whole line", sourceLocation: sourceLocation)
        return Batch(messages: messages, bytes: bytes, written: written, closeAfter: closeAfter)
    }
}

/// Counts the flushes the outbox schedules.
private final class FlushCounter: Sendable {
    let count = Atomic<Int>(0)
    var value: Int { self.count.load(ordering: .relaxed) }
    func attach(to outbox: Outbox) { outbox.attach { self.count.add(1, ordering: .relaxed) } }
}

private func makeOutbox(events: Int = 10_000, bytes: Int = 16 << 20) -> (Outbox, DeliveryStats) {
    let stats = DeliveryStats()
    return (Outbox(limits: OutboxLimits(maxEventsPerSubscription: events, maxBytes: bytes), stats: stats), stats)
}

@Suite("Outbox (unit)")
struct OutboxTests {
    @Test("lines and events are taken in the order they were queued, in one batch whose byte count is what the outbox accounted")
    func order() throws {
        let (outbox, stats) = makeOutbox()
        outbox.enqueue(line: line("r1"))
        outbox.enqueue(event: event(1, subscription: 1), policy: .drop)?.resume()
        outbox.enqueue(event: event(2, subscription: 2), policy: .drop)?.resume()
        outbox.enqueue(line: line("r2"))
        outbox.enqueue(event: event(3, subscription: 1), policy: .drop)?.resume()
        let batch = try #require(try take(outbox))
        #expect(batch.summary == ["r1", "1#1", "2#2", "r2", "1#3"])
        // The batch's bytes are those the outbox accounted: lines exactly, an event as its prefix
        // and body plus 8 for its subscription's number (here one digit each: 7 more than written).
        #expect(batch.bytes == batch.written + 3 * 7)
        #expect(!batch.closeAfter)
        #expect(stats.delivered.load(ordering: .relaxed) == 3)
        #expect(try take(outbox) == nil)
        outbox.written(bytes: batch.bytes)
        #expect(outbox.writtenBytes == batch.bytes)
    }

    @Test("the first output into an idle outbox schedules one flush; more output before the take schedules none")
    func wakeups() throws {
        let (outbox, _) = makeOutbox()
        // Queued before the connection is attached: attaching schedules the flush for it.
        outbox.enqueue(line: line("hello"))
        let flushes = FlushCounter()
        flushes.attach(to: outbox)
        #expect(flushes.value == 1)
        outbox.enqueue(line: line("r1"))
        #expect(outbox.enqueue(event: event(1, subscription: 1), policy: .drop) == nil)
        #expect(flushes.value == 1)
        #expect(try take(outbox)?.summary == ["hello", "r1", "1#1"])
        // The take clears the schedule: the next event returns a wake-up for its caller to run.
        let wakeup = try #require(outbox.enqueue(event: event(2, subscription: 1), policy: .drop))
        #expect(flushes.value == 1)
        wakeup.resume()
        #expect(flushes.value == 2)
        outbox.enqueue(line: line("r2"))
        #expect(flushes.value == 2)
        #expect(try take(outbox)?.summary == ["1#2", "r2"])
        // An empty take also clears it.
        #expect(try take(outbox) == nil)
        outbox.enqueue(line: line("r3"))
        #expect(flushes.value == 3)
    }

    @Test(
        "drop: events beyond a subscription's count bound are dropped, and a lagged notice with how many and which precedes its next event"
    )
    func dropByCount() throws {
        let (outbox, stats) = makeOutbox(events: 2)
        for seq in Int64(1)...5 { outbox.enqueue(event: event(seq, subscription: 1), policy: .drop)?.resume() }
        // Another subscription has its own count.
        outbox.enqueue(event: event(6, subscription: 2), policy: .drop)?.resume()
        #expect(try take(outbox)?.summary == ["1#1", "1#2", "2#6"])
        #expect(stats.dropped.load(ordering: .relaxed) == 3)
        outbox.enqueue(event: event(7, subscription: 2), policy: .drop)?.resume()
        outbox.enqueue(event: event(8, subscription: 1), policy: .drop)?.resume()
        let batch = try #require(try take(outbox))
        #expect(batch.summary == ["2#7", "notice:lagged", "1#8"])
        let notice = batch.messages[1]
        #expect(notice == ["type": "notice", "code": "lagged", "subscription": 1, "dropped": 3, "from": 3, "to": 5])
        #expect(stats.delivered.load(ordering: .relaxed) == 5)
        #expect(!outbox.isClosing)
    }

    @Test("drop: an event that would take the queued bytes beyond the bound is dropped; the bound frees when taken")
    func dropByBytes() throws {
        let small = event(1, subscription: 1).byteCount
        let (outbox, stats) = makeOutbox(bytes: 2 * small + small / 2)
        for seq in Int64(1)...3 { outbox.enqueue(event: event(seq, subscription: 1), policy: .drop)?.resume() }
        #expect(stats.dropped.load(ordering: .relaxed) == 1)
        #expect(try take(outbox)?.summary == ["1#1", "1#2"])
        // An event larger than the whole bound overflows even an empty queue.
        outbox.enqueue(event: event(4, subscription: 1, padding: 3 * small), policy: .drop)?.resume()
        #expect(stats.dropped.load(ordering: .relaxed) == 2)
        outbox.enqueue(event: event(5, subscription: 1), policy: .drop)?.resume()
        let batch = try #require(try take(outbox))
        #expect(batch.summary == ["notice:lagged", "1#5"])
        #expect(batch.messages[0]["dropped"] == 2 && batch.messages[0]["from"] == 3 && batch.messages[0]["to"] == 4)
    }

    @Test("disconnect: the queued events go, responses stay, a lagged notice with the last seq taken closes the outbox")
    func disconnect() async throws {
        let (outbox, stats) = makeOutbox(events: 2)
        outbox.enqueue(event: event(1, subscription: 1), policy: .disconnect)?.resume()
        #expect(try take(outbox)?.summary == ["1#1"])
        outbox.enqueue(line: line("r1"))
        outbox.enqueue(event: event(2, subscription: 1), policy: .disconnect)?.resume()
        outbox.enqueue(event: event(3, subscription: 2), policy: .drop)?.resume()
        outbox.enqueue(event: event(4, subscription: 1), policy: .disconnect)?.resume()
        outbox.enqueue(line: line("r2"))
        outbox.enqueue(event: event(5, subscription: 1), policy: .disconnect)?.resume()
        #expect(outbox.isClosing)
        #expect(await outbox.closed() == true)
        #expect(stats.laggedDisconnects.load(ordering: .relaxed) == 1)
        // Its two queued events, the one that overflowed, and subscription 2's queued event 3: the
        // disconnect discards every queued event of the connection, and each is a drop
        // (docs/protocol.md: `drops` counts copies an overflow policy discarded).
        #expect(stats.dropped.load(ordering: .relaxed) == 4)
        // Nothing more is accepted.
        outbox.enqueue(line: line("r3"))
        outbox.enqueue(event: event(6, subscription: 2), policy: .drop)?.resume()
        #expect(outbox.enqueue(veto: line("v")) == .closed)
        let batch = try #require(try take(outbox))
        #expect(batch.summary == ["r1", "r2", "notice:lagged"])
        #expect(batch.messages[2] == ["type": "notice", "code": "lagged", "subscription": 1, "last_seq": 1])
        #expect(batch.closeAfter)
        #expect(try take(outbox)?.closeAfter == true)
    }

    @Test("disconnect before anything was taken: last_seq is the seq before the first event missed")
    func disconnectBeforeAnyTake() throws {
        let (outbox, _) = makeOutbox(events: 1)
        outbox.enqueue(event: event(41, subscription: 3), policy: .disconnect)?.resume()
        outbox.enqueue(event: event(42, subscription: 3), policy: .disconnect)?.resume()
        let batch = try #require(try take(outbox))
        #expect(batch.messages == [["type": "notice", "code": "lagged", "subscription": 3, "last_seq": 40]])
    }

    @Test("parking: a replaying subscription's live events wait behind its replayed pages; others pass")
    func parking() throws {
        let (outbox, stats) = makeOutbox()
        outbox.park(1, after: 10)
        outbox.enqueue(event: event(13, subscription: 1), policy: .drop)?.resume()
        outbox.enqueue(event: event(14, subscription: 2), policy: .drop)?.resume()
        outbox.enqueue(event: event(15, subscription: 1), policy: .drop)?.resume()
        #expect(try take(outbox)?.summary == ["2#14"])
        outbox.enqueue(replayed: Page(subscription: 1, firstSeq: 11, lastSeq: 12))
        #expect(try take(outbox)?.summary == ["1#11", "1#12"])
        // An empty page queues nothing.
        outbox.enqueue(replayed: Page(subscription: 1, firstSeq: 13, lastSeq: 12))
        #expect(try take(outbox) == nil)
        outbox.unpark(1)
        #expect(try take(outbox)?.summary == ["1#13", "1#15"])
        #expect(stats.delivered.load(ordering: .relaxed) == 5)
        // Unparked: live events flow again.
        outbox.enqueue(event: event(16, subscription: 1), policy: .drop)?.resume()
        #expect(try take(outbox)?.summary == ["1#16"])
    }

    @Test("parked events count against the subscription's bound; a disconnect before the replay delivered reports its since")
    func parkedOverflow() throws {
        let (outbox, stats) = makeOutbox(events: 2)
        outbox.park(1, after: 10)
        outbox.enqueue(event: event(20, subscription: 1), policy: .disconnect)?.resume()
        outbox.enqueue(event: event(21, subscription: 1), policy: .disconnect)?.resume()
        #expect(!outbox.isClosing)
        outbox.enqueue(event: event(22, subscription: 1), policy: .disconnect)?.resume()
        #expect(outbox.isClosing)
        #expect(stats.dropped.load(ordering: .relaxed) == 3)
        let batch = try #require(try take(outbox))
        #expect(batch.messages == [["type": "notice", "code": "lagged", "subscription": 1, "last_seq": 10]])
        // The replay's end has nothing left to release.
        outbox.unpark(1)
        #expect(try take(outbox)?.messages == [])
    }

    @Test("drop while parked: the lagged notice comes after the parked events, before the next live one")
    func dropWhileParked() throws {
        let (outbox, stats) = makeOutbox(events: 2)
        outbox.park(1, after: 0)
        for seq in Int64(1)...4 { outbox.enqueue(event: event(seq, subscription: 1), policy: .drop)?.resume() }
        #expect(stats.dropped.load(ordering: .relaxed) == 2)
        #expect(try take(outbox) == nil)
        outbox.unpark(1)
        #expect(try take(outbox)?.summary == ["1#1", "1#2"])
        outbox.enqueue(event: event(5, subscription: 1), policy: .drop)?.resume()
        let batch = try #require(try take(outbox))
        #expect(batch.summary == ["notice:lagged", "1#5"])
        #expect(batch.messages[0] == ["type": "notice", "code": "lagged", "subscription": 1, "dropped": 2, "from": 3, "to": 4])
    }

    @Test("parked events still fill the byte bound after a take (drop policy)")
    func parkedBytesStayQueued() throws {
        let size = event(1, subscription: 1).byteCount
        let (outbox, stats) = makeOutbox(bytes: 2 * size)
        outbox.park(1, after: 0)
        outbox.enqueue(event: event(1, subscription: 1), policy: .drop)?.resume()
        outbox.enqueue(event: event(2, subscription: 2), policy: .drop)?.resume()
        #expect(try take(outbox)?.summary == ["2#2"])
        // The taken event freed its room; the parked one still holds its own.
        outbox.enqueue(event: event(3, subscription: 2), policy: .drop)?.resume()
        outbox.enqueue(event: event(4, subscription: 2), policy: .drop)?.resume()
        #expect(stats.dropped.load(ordering: .relaxed) == 1)
        outbox.unpark(1)
        #expect(try take(outbox)?.summary == ["2#3", "1#1"])
    }

    @Test("written(bytes:) accounting: output queued or being written holds the bound until written; waitForRoom waits for it")
    func writtenAccounting() async throws {
        let first = line("first-response-line")
        let (outbox, _) = makeOutbox(bytes: 2 * first.count)
        outbox.enqueue(line: first)
        #expect(outbox.hasRoom)
        outbox.enqueue(line: line("second-response-lin"))
        #expect(!outbox.hasRoom)
        let batch = try #require(try take(outbox))
        #expect(batch.bytes == 2 * first.count)
        // Taken but not yet written: still unwritten, so still at the bound.
        #expect(!outbox.hasRoom)
        #expect(outbox.writtenBytes == 0)
        let waiter = Task { await outbox.waitForRoom() }
        outbox.written(bytes: batch.bytes)
        #expect(
            await firstValue(within: 10) {
                await waiter.value
                return true
            } == true
        )
        #expect(outbox.hasRoom)
        #expect(outbox.writtenBytes == batch.bytes)
        await outbox.waitForRoom()
        // Two batches in flight: each counts until its own write completes.
        outbox.enqueue(line: first)
        let a = try #require(try take(outbox))
        outbox.enqueue(line: first)
        let b = try #require(try take(outbox))
        #expect(!outbox.hasRoom)
        outbox.written(bytes: a.bytes)
        #expect(outbox.hasRoom)
        outbox.written(bytes: b.bytes)
        #expect(outbox.writtenBytes == batch.bytes + a.bytes + b.bytes)
    }

    @Test("a veto is queued only while the unwritten output leaves room for it, or when nothing is unwritten")
    func vetoBound() throws {
        let veto = line("veto-message")
        let (outbox, _) = makeOutbox(bytes: 2 * veto.count)
        #expect(outbox.enqueue(veto: veto) == .queued)
        #expect(outbox.enqueue(veto: veto) == .queued)
        #expect(outbox.enqueue(veto: veto) == .full)
        let batch = try #require(try take(outbox))
        #expect(batch.messages.count == 2)
        // Being written counts too.
        #expect(outbox.enqueue(veto: veto) == .full)
        outbox.written(bytes: batch.bytes)
        // Larger than the whole bound: queued when nothing else is unwritten.
        let big = line(String(repeating: "v", count: 3 * veto.count))
        #expect(outbox.enqueue(veto: big) == .queued)
        #expect(outbox.enqueue(veto: veto) == .full)
        outbox.close()
        #expect(outbox.enqueue(veto: veto) == .closed)
    }

    @Test("close: what is queued is still taken, then the flush says close; closed() reports no lag; drained() returns")
    func close() async throws {
        let (outbox, _) = makeOutbox()
        let flushes = FlushCounter()
        flushes.attach(to: outbox)
        outbox.enqueue(line: line("r1"))
        outbox.enqueue(event: event(1, subscription: 1), policy: .drop)?.resume()
        let watcher = Task { await outbox.closed() }
        outbox.close()
        #expect(await watcher.value == false)
        outbox.enqueue(line: line("late"))
        let batch = try #require(try take(outbox))
        #expect(batch.summary == ["r1", "1#1"])
        #expect(batch.closeAfter)
        #expect(try take(outbox)?.messages == [])
        #expect(try take(outbox)?.closeAfter == true)
        await outbox.drained()
        await outbox.waitForRoom()
    }

    @Test("drained() waits until the queue has been taken")
    func drained() async throws {
        let (outbox, _) = makeOutbox()
        await outbox.drained()
        outbox.enqueue(replayed: Page(subscription: 1, firstSeq: 1, lastSeq: 3))
        let drained = Task {
            await outbox.drained()
            return true
        }
        #expect(try take(outbox)?.summary == ["1#1", "1#2", "1#3"])
        #expect(await firstValue(within: 10) { await drained.value } == true)
    }

    @Test("drained(withinMs:): true once taken or closed, false when the time runs out first, every time the drain comes first")
    func drainedWithin() async throws {
        let (outbox, _) = makeOutbox()
        #expect(await outbox.drained(withinMs: 10) == true)  // nothing queued
        // The time runs out: false, and the wait is gone (a later take answers nobody twice).
        outbox.enqueue(line: line("r1"))
        #expect(await outbox.drained(withinMs: 20) == false)
        #expect(try take(outbox)?.summary == ["r1"])
        // The drain first, many times over: never false (a timer's cancellation is no timeout).
        for round in 0..<300 {
            outbox.enqueue(line: line("r\(round)"))
            let waiting = Task { await outbox.drained(withinMs: 60_000) }
            await Task.yield()
            _ = try take(outbox)
            #expect(await waiting.value == true, "round \(round)")
        }
        // Closing answers true.
        outbox.enqueue(line: line("last"))
        let closing = Task { await outbox.drained(withinMs: 60_000) }
        await Task.yield()
        outbox.close()
        #expect(await firstValue(within: 10) { await closing.value } == true)
    }

    @Test("discard: everything queued is let go; the flush closes at once")
    func discard() throws {
        let (outbox, _) = makeOutbox()
        outbox.enqueue(line: line("r1"))
        outbox.enqueue(event: event(1, subscription: 1), policy: .drop)?.resume()
        outbox.discard()
        #expect(outbox.isClosing)
        #expect(outbox.hasRoom)
        #expect(try take(outbox)?.messages == [])
    }
}
