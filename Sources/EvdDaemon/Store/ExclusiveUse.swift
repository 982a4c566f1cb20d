import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Checks, in debug builds, the claim an `@unchecked Sendable` class of Store makes: that it is in
/// **exclusive use** — one thread inside it at a time.
///
/// The claim is not "one thread": a session's task may resume on any of the `DatabaseThreads`
/// after each suspension, so one connection is used by several threads in turn. What must never
/// happen is two threads inside at once. Each use (`run`, or `enter`/`leave`) stores the using
/// thread's id in an atomic word and clears it after; a second thread that comes in meanwhile
/// stops the process with `preconditionFailure`, naming the class. The thread inside may come in
/// again (SQLite calls evd's hooks back inside `sqlite3_step`, on the thread that stepped), and a
/// callback can check that it runs inside a use of its connection (`assertInside`).
///
/// The model is GRDB's `SchedulingWatchdog.preconditionValidQueue`. In release builds the struct is
/// empty and every method compiles to nothing (`#if DEBUG`, which SwiftPM defines for debug
/// builds), so the hot paths are unchanged.
struct ExclusiveUse: ~Copyable {
    #if DEBUG
    /// The id of the thread inside (`pthread_self`), or 0.
    private let owner = Atomic<UInt>(0)
    private let label: StaticString
    #endif

    /// `label`: the class whose claim this checks, for the failure's message.
    init(_ label: StaticString) {
        #if DEBUG
        self.label = label
        #endif
    }

    /// Whether uses are checked (debug builds).
    static var isChecking: Bool {
        #if DEBUG
        return true
        #else
        return false
        #endif
    }

    #if DEBUG
    private static var currentThread: UInt { unsafeBitCast(pthread_self(), to: UInt.self) }
    #endif

    /// Starts a use by the calling thread; stops the process if another thread is inside. Returns
    /// whether this call started it (false: the thread was inside already), for `leave`.
    @inline(__always)
    func enter() -> Bool {
        #if DEBUG
        let me = Self.currentThread
        let (exchanged, inside) = self.owner.compareExchange(expected: 0, desired: me, ordering: .acquiring)
        if exchanged { return true }
        if inside == me { return false }
        preconditionFailure(
            "\(self.label) is in exclusive use: used by thread \(me) while thread \(inside) is inside (a session must not share it)"
        )
        #else
        return false
        #endif
    }

    /// Ends a use `enter` started (`entered`: what it returned).
    @inline(__always)
    func leave(_ entered: Bool) {
        #if DEBUG
        if entered { self.owner.store(0, ordering: .releasing) }
        #endif
    }

    /// Runs `body` as one use.
    @inline(__always)
    func run<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        #if DEBUG
        let entered = self.enter()
        defer { self.leave(entered) }
        #endif
        return try body()
    }

    /// Stops the process unless the calling thread is inside a use (a callback SQLite makes from
    /// inside a call on the connection).
    @inline(__always)
    func assertInside() {
        #if DEBUG
        let inside = self.owner.load(ordering: .relaxed)
        precondition(
            inside == Self.currentThread,
            "\(self.label) called back on thread \(Self.currentThread) outside its use (thread \(inside) is inside)"
        )
        #endif
    }

    /// For tests: starts a use unless another thread is inside (then false, and nothing changes).
    /// Always true in release builds.
    func tryEnter() -> Bool {
        #if DEBUG
        let me = Self.currentThread
        let (exchanged, inside) = self.owner.compareExchange(expected: 0, desired: me, ordering: .acquiring)
        return exchanged || inside == me
        #else
        return true
        #endif
    }
}
