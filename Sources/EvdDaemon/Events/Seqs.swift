import EvdClient
import Synchronization

/// The seqs of a group of journaled events, handed out before their commit (`EventBus.reserve`).
struct SeqReservation: Sendable {
    let first: Int64
    let count: Int
    /// The events' time, quoted, as the envelope writes it.
    let time: [UInt8]

    var last: Int64 { self.first + Int64(self.count) - 1 }
    /// The time without its quotes, as the journal stores it.
    var timeText: String { String(decoding: self.time.dropFirst().dropLast(), as: UTF8.self) }
}

/// The persisted bound below which seqs are handed out, so that a restart never reuses one.
///
/// The bound is raised in steps of `block` when half of the step is used; only the thread that
/// crosses the half-way mark writes (once per `block / 2` seqs), and everyone else goes on.
final class SeqLease: Sendable {
    static let block: Int64 = 1 << 24
    private let endValue = Atomic<Int64>(Int64.max)
    private let persist = Mutex<(@Sendable (Int64) throws -> Void)?>(nil)

    /// The current bound.
    var end: Int64 { self.endValue.load(ordering: .relaxed) }

    /// Starts leasing after `head`, persisting each new bound with `persist`.
    func start(after head: Int64, persist: @escaping @Sendable (Int64) throws -> Void) {
        self.endValue.store(head + Self.block, ordering: .relaxed)
        self.persist.withLock { $0 = persist }
    }

    /// Makes sure the bound stays well above `seq`: a load and a compare, except once per half block.
    @inline(__always)
    func cover(_ seq: Int64) {
        guard seq + Self.block / 2 > self.endValue.load(ordering: .relaxed) else { return }
        self.raise(above: seq)
    }

    private func raise(above seq: Int64) {
        self.persist.withLock { persist in
            guard let persist, seq + Self.block / 2 > self.endValue.load(ordering: .relaxed) else { return }
            let end = seq + Self.block
            // A failed write keeps the old bound: the next event tries again.
            if (try? persist(end)) != nil { self.endValue.store(end, ordering: .relaxed) }
        }
    }
}
