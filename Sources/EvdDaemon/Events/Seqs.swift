import CSQLite
import EvdClient
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

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
/// The bound is raised in steps of `block`, ahead of need: when a seq crosses the half-way mark
/// (`block / 2` below the bound), the new bound (that seq plus `block`) is written on a thread of
/// its own, and the caller goes on — a synchronous SQLite write under the journal's lock never
/// runs on the thread that happened to cross the mark (a DB thread, or a cooperative one for
/// `login`/`logout`). Only a caller whose seq comes within `block / 4` of the persisted bound (the
/// raise in flight has not landed, or failed) blocks: it waits for the raise in flight and, if the
/// bound is still too low, raises it itself. So no seq is handed out above the persisted bound
/// unless more than `block / 4` seqs are numbered between two calls of `cover`.
final class SeqLease: Sendable {
    static let block: Int64 = 1 << 24
    /// Within this of the bound, `cover` waits for the bound to be raised.
    static let hardMargin: Int64 = block / 4
    private let endValue = Atomic<Int64>(Int64.max)
    /// Whether a raise runs on its own thread now (at most one does).
    private let raising = Atomic<Bool>(false)
    /// After a raise on its own thread failed: no other starts before this (monotonic ns), so a
    /// failing state database (a full disk) does not cost a thread per event.
    private let retryAfter = Atomic<Int64>(0)
    /// How long after a failed raise the next one starts (the hard margin does not wait for it).
    static let retryDelayNs: Int64 = 100_000_000
    /// Held while the bound is written: the raise in flight and a caller at the hard margin take
    /// it in turn. Lock order: this, then the journal's state lock (inside `persist`).
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
        if seq + Self.hardMargin > self.endValue.load(ordering: .relaxed) {
            // At the hard margin: wait for the raise in flight (it holds `persist`), then raise
            // here if the bound is still too low.
            self.persist(above: seq, needed: Self.hardMargin)
            return
        }
        guard Self.monotonicNs() >= self.retryAfter.load(ordering: .relaxed),
            self.raising.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
        else { return }  // one raise is on its way, or the last one failed a moment ago
        let started = Self.detach {
            if !self.persist(above: seq, needed: Self.block / 2) {
                self.retryAfter.store(Self.monotonicNs() + Self.retryDelayNs, ordering: .relaxed)
            }
            self.raising.store(false, ordering: .releasing)
        }
        if !started {
            // No thread to spare: raise here, as before (the bound must not be left behind).
            self.persist(above: seq, needed: Self.block / 2)
            self.raising.store(false, ordering: .releasing)
        }
    }

    /// Runs `work` on a detached thread of its own (`seq-lease`); returns whether one started.
    private static func detach(_ work: @escaping @Sendable () -> Void) -> Bool {
        final class Work: Sendable {
            let run: @Sendable () -> Void
            init(_ run: @escaping @Sendable () -> Void) { self.run = run }
        }
        let context = Unmanaged.passRetained(Work(work)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(
            &thread,
            nil,
            { context in
                let work = Unmanaged<Work>.fromOpaque(context!).takeRetainedValue()
                evd_set_thread_name("seq-lease")
                work.run()
                return nil
            },
            context
        )
        guard rc == 0 else {
            Unmanaged<Work>.fromOpaque(context).release()
            return false
        }
        pthread_detach(thread)
        return true
    }

    /// Writes the bound `seq + block` unless the bound is `needed` above `seq` already; returns
    /// `false` if the write failed.
    @discardableResult
    private func persist(above seq: Int64, needed: Int64) -> Bool {
        self.persist.withLock { persist in
            guard let persist, seq + needed > self.endValue.load(ordering: .relaxed) else { return true }
            let end = seq + Self.block
            // A failed write keeps the old bound: a later event tries again.
            guard (try? persist(end)) != nil else { return false }
            self.endValue.store(end, ordering: .relaxed)
            return true
        }
    }

    private static func monotonicNs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    /// Waits until no raise is in flight (tests, and a caller that wants the bound written now).
    func settle() {
        while self.raising.load(ordering: .acquiring) { usleep(100) }
        self.persist.withLock { _ in }
    }
}
