import EvdClient
import NIOCore
import Synchronization
import Testing

@testable import EvdDaemon

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Unit seams of Events: the outbox's holding while a subscription is registered, and the seq
/// lease raised ahead of need.
@Suite("Events units")
struct EventsUnitTests {
    private static func lines(_ take: Outbox.Take) -> [String] {
        guard case .batch(let chunks, _, _) = take else { return [] }
        return chunks.map { chunk in
            var buffer = ByteBuffer()
            chunk.write(into: &buffer)
            return String(buffer: buffer)
        }
    }

    @Test("a held outbox lets lines go first, then its events and vetoes in order")
    func holdOrdersResponseFirst() {
        let outbox = Outbox(limits: OutboxLimits(), stats: DeliveryStats())
        outbox.hold()
        let event = QueuedEvent(prefix: Array("E:".utf8), subscription: 1, body: Array(";\n".utf8), seq: 5)
        #expect(outbox.enqueue(event: event, policy: .drop) == nil)
        #expect(outbox.enqueue(veto: Array("veto\n".utf8)) == .queued)
        outbox.enqueue(line: Array("response\n".utf8))
        outbox.release()
        #expect(Self.lines(outbox.take()) == ["response\n", "E:1;\n", "veto\n"])
    }

    @Test("events held while the subscription's replay is parked follow the replay")
    func heldThenParked() {
        let outbox = Outbox(limits: OutboxLimits(), stats: DeliveryStats())
        outbox.hold()
        let event = QueuedEvent(prefix: Array("E:".utf8), subscription: 2, body: Array(";\n".utf8), seq: 9)
        _ = outbox.enqueue(event: event, policy: .drop)
        outbox.enqueue(line: Array("response\n".utf8))
        outbox.park(2, after: 3)
        outbox.release()
        #expect(Self.lines(outbox.take()) == ["response\n"])
        outbox.unpark(2)
        #expect(Self.lines(outbox.take()) == ["E:2;\n"])
    }

    @Test("the seq lease is raised on a thread of its own at the half mark, on the caller's at the hard margin")
    func leaseAheadOfNeed() {
        let writers = Mutex<[(end: Int64, onCaller: Bool)]>([])
        let lease = SeqLease()
        let caller = pthread_self()
        lease.start(after: 0) { end in
            writers.withLock { $0.append((end, pthread_equal(pthread_self(), caller) != 0)) }
        }
        let first = lease.end
        #expect(first == SeqLease.block)
        lease.cover(SeqLease.block / 2 - 1)  // below the half mark: nothing
        lease.settle()
        #expect(writers.withLock { $0.isEmpty })
        let half = SeqLease.block / 2 + 1
        lease.cover(half)
        lease.settle()
        #expect(lease.end == half + SeqLease.block)
        #expect(writers.withLock { $0.map(\.end) } == [half + SeqLease.block])
        #expect(writers.withLock { $0.map(\.onCaller) } == [false])
        // Within the hard margin of the bound: raised before `cover` returns, on the caller.
        let near = lease.end - SeqLease.hardMargin + 1
        lease.cover(near)
        #expect(lease.end == near + SeqLease.block)
        #expect(writers.withLock { $0.last?.onCaller } == true)
    }

    @Test("a failed raise keeps the old bound; the next cover tries again")
    func leaseFailureKeepsBound() {
        struct Failure: Error {}
        let fail = Atomic<Bool>(true)
        let lease = SeqLease()
        lease.start(after: 0) { _ in if fail.load(ordering: .relaxed) { throw Failure() } }
        lease.cover(SeqLease.block / 2 + 1)
        lease.settle()
        #expect(lease.end == SeqLease.block)
        fail.store(false, ordering: .relaxed)
        // Right after a failure, the next raise waits a moment (`retryDelayNs`)...
        lease.cover(SeqLease.block / 2 + 2)
        lease.settle()
        #expect(lease.end == SeqLease.block)
        // ...then goes ahead.
        usleep(UInt32(SeqLease.retryDelayNs / 1000) + 20_000)
        lease.cover(SeqLease.block / 2 + 3)
        lease.settle()
        #expect(lease.end == SeqLease.block / 2 + 3 + SeqLease.block)
        // At the hard margin, the caller raises at once, failure or not before.
        fail.store(true, ordering: .relaxed)
        lease.cover(lease.end - SeqLease.block / 2 + 1)
        lease.settle()
        let before = lease.end
        fail.store(false, ordering: .relaxed)
        let near = before - SeqLease.hardMargin + 1
        lease.cover(near)
        #expect(lease.end == near + SeqLease.block)
    }
}
