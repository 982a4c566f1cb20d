import EvdClient
import NIOCore
import Synchronization

/// What a subscriber does when its queue is full (PROTOCOL.md §5).
public enum OverflowPolicy: String, Sendable {
    /// Send notice `lagged` with the last seq it received, then close the connection.
    case disconnect
    /// Discard events, and later send notice `lagged` with how many and which were dropped.
    case drop
}

/// Bounds on one connection's queued output (`--max-queued-events`, `--max-queued-bytes`).
public struct OutboxLimits: Sendable {
    /// Events queued for one subscription before its overflow policy applies.
    public var maxEventsPerSubscription: Int
    /// The connection's output bound. Events: bytes of them queued before the overflow policy
    /// applies. All output (responses, notices, vetoes and events, queued or being written): bytes
    /// of it unwritten at which evd stops running the connection's requests and reading from it,
    /// until the client has read enough (`Outbox.hasRoom`).
    public var maxBytes: Int

    /// What `--max-queued-events` accepts.
    public static let eventsRange = 1...Int.max
    /// What `--max-queued-bytes` accepts: at least 64 KiB, since an event larger than the bound
    /// overflows even an empty queue.
    public static let bytesRange = (64 << 10)...Int.max

    public init(maxEventsPerSubscription: Int = 10_000, maxBytes: Int = 16 << 20) {
        self.maxEventsPerSubscription = maxEventsPerSubscription
        self.maxBytes = maxBytes
    }
}

/// One event queued for one subscription: the shared bytes around the subscription's number.
///
/// `prefix` and `body` are the same arrays for every subscriber of the event (copy-on-write shares
/// them), so an event is serialized once however many subscribe.
struct QueuedEvent {
    let prefix: [UInt8]
    let subscription: Int
    let body: [UInt8]
    let seq: Int64
    var byteCount: Int { self.prefix.count + self.body.count + 8 }
}

/// A page of replayed events, as the lines its subscriber reads, one after another
/// (`ReplayPage`, which the server reads from the journal).
protocol ReplayedEvents: Sendable {
    var subscription: Int { get }
    /// The events' lines.
    var bytes: [UInt8] { get }
    /// How many events the lines hold.
    var count: Int { get }
    /// The seq of the first event, and of the last (0 when there is none).
    var firstSeq: Int64 { get }
    var lastSeq: Int64 { get }
}

/// One piece of a connection's output, in the order it must be written.
enum OutboundChunk {
    case line([UInt8])
    case event(QueuedEvent)
    /// Consecutive events of one subscription, already written out whole (a page of a replay).
    case events(any ReplayedEvents)
    /// Consecutive events of a run for one subscription, written out when taken.
    case run(RunDelivery)

    /// Appends the chunk's bytes to `buffer`.
    func write(into buffer: inout ByteBuffer) {
        switch self {
        case .line(let bytes):
            buffer.writeBytes(bytes)
        case .event(let event):
            buffer.writeBytes(event.prefix)
            var digits: [UInt8] = []
            JSONWriter.appendInt(Int64(event.subscription), to: &digits)
            buffer.writeBytes(digits)
            buffer.writeBytes(event.body)
        case .events(let page):
            buffer.writeBytes(page.bytes)
        case .run(let run):
            run.write(into: &buffer)
        }
    }

    var byteCount: Int {
        switch self {
        case .line(let bytes): return bytes.count
        case .event(let event): return event.byteCount
        case .events(let page): return page.bytes.count
        case .run(let run): return run.byteCount
        }
    }

    /// The subscription and first seq of the events it holds (`nil`: a line).
    var firstEvent: (subscription: Int, seq: Int64)? {
        switch self {
        case .line: return nil
        case .event(let event): return (event.subscription, event.seq)
        case .events(let page): return (page.subscription, page.firstSeq)
        case .run(let run): return (run.subscription, run.firstSeq)
        }
    }
}

/// Daemon-wide delivery counters for `stats`.
public final class DeliveryStats: Sendable {
    let delivered = Atomic<Int>(0)
    let dropped = Atomic<Int>(0)
    let laggedDisconnects = Atomic<Int>(0)
    public init() {}
}
