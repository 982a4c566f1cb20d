import CSQLite
import DequeModule
import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The threads sessions run their requests on: a request's async code and its SQLite work on one
/// thread.
///
/// Why: SQLite calls block, so they cannot run on Swift's cooperative threads. Handing each one to
/// a thread pool and back costs two thread wake-ups per request, and on a machine whose idle cores
/// sleep a wake-up costs about as much as a round trip to the client (docs/performance.md, "Thread
/// hops"). A session's task prefers this executor (`withTaskExecutorPreference`), so its code runs
/// here, and `ConnectionPool.run` calls SQLite right away instead of hopping (`isCurrentThread`).
///
/// Blocking here is allowed, as on the thread pool it replaces: a thread blocks only while SQLite
/// work of a checked-out connection waits (for the write lock, or a veto reply), so with more
/// threads than pooled connections there is always one free for everything else.
///
/// `@unchecked Sendable`: shared by every session and safe from any thread: the queue and the
/// stopping flag live in `jobs` (a `Mutex`), `queued` is a semaphore, `count` is a `let`, and
/// `threads`, the one plain `var`, is written only by `start` (before any session can enqueue a
/// job) and by `shutdown` (after the daemon's sessions are gone), both from the one task that
/// owns the executor (`Daemon.run`).
final class DatabaseThreads: TaskExecutor, @unchecked Sendable {
    private let jobs = Mutex<(queue: Deque<UnownedJob>, stopping: Bool)>(([], false))
    /// Counts the queued jobs (and, at shutdown, one wake-up per thread).
    private let queued = DispatchSemaphore(value: 0)
    private let count: Int
    /// Written once, by `start`, before any job can be enqueued.
    private var threads: [pthread_t] = []

    init(count: Int) {
        precondition(count > 0)
        self.count = count
    }

    /// Marks the threads of every `DatabaseThreads` (the key's value is never read, only whether set).
    private static let marker: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    /// Whether the calling thread is one of these threads (of any instance).
    static var isCurrentThread: Bool { pthread_getspecific(Self.marker) != nil }

    func start() {
        for index in 0..<self.count {
            let context = Unmanaged.passRetained(Box(self, name: "DB-\(index)")).toOpaque()
            var thread = pthread_t()
            let rc = pthread_create(
                &thread,
                nil,
                { context in
                    let box = Unmanaged<Box>.fromOpaque(context!).takeRetainedValue()
                    evd_set_thread_name(box.name)
                    pthread_setspecific(DatabaseThreads.marker, UnsafeRawPointer(bitPattern: 1))
                    box.threads.serve()
                    return nil
                },
                context
            )
            precondition(rc == 0, "cannot start a database thread: \(rc)")
            self.threads.append(thread)
        }
    }

    /// Lets the threads finish the queued jobs, then stops them and waits until they have.
    func shutdown() {
        self.jobs.withLock { $0.stopping = true }
        for _ in 0..<self.count { self.queued.signal() }
        for thread in self.threads { pthread_join(thread, nil) }
        self.threads = []
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        self.jobs.withLock { $0.queue.append(job) }
        self.queued.signal()
    }

    private func serve() {
        let executor = self.asUnownedTaskExecutor()
        while true {
            self.queued.wait()
            enum Next {
                case run(UnownedJob)
                case stop, spurious
            }
            let next: Next = self.jobs.withLock { jobs in
                if let job = jobs.queue.popFirst() { return .run(job) }
                return jobs.stopping ? .stop : .spurious
            }
            switch next {
            case .run(let job): job.runSynchronously(on: executor)
            case .stop: return
            case .spurious: continue
            }
        }
    }

    private final class Box {
        let threads: DatabaseThreads
        let name: String
        init(_ threads: DatabaseThreads, name: String) {
            self.threads = threads
            self.name = name
        }
    }
}
