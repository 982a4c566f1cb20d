import Synchronization
import Testing

@testable import EvdDaemon

/// `WaitList`: waiting for a condition without polling (shutdown waits on it).
@Suite("WaitList")
struct WaitListTests {
    @Test("a ready condition returns at once; a waiter returns once the owner changes the state and wakes it")
    func wakes() async {
        let list = WaitList()
        let state = Counter()
        await list.wait { state.value.withLock { $0 == 0 } }  // ready: no wait
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await list.wait { state.value.withLock { $0 == 2 } } }
            // A change that does not make it true: the waiter checks again and goes on waiting.
            state.value.withLock { $0 = 1 }
            list.wakeAll()
            try? await Task.sleep(for: .milliseconds(20))
            state.value.withLock { $0 = 2 }
            list.wakeAll()
            await group.waitForAll()
        }
        #expect(state.value.withLock { $0 } == 2)
    }

    @Test("a cancelled waiter stops waiting, and the list forgets it")
    func cancellation() async {
        let list = WaitList()
        let waiter = Task { await list.wait { false } }
        try? await Task.sleep(for: .milliseconds(10))
        waiter.cancel()
        await waiter.value  // returns: the condition never held
        list.wakeAll()  // nothing left to wake
    }

    @Test("no wake-up is lost: 2,000 waits racing the change that ends them all return")
    func noLostWakeup() async {
        for _ in 0..<2_000 {
            let list = WaitList()
            let done = Flag()
            await withTaskGroup(of: Void.self) { group in
                group.addTask { await list.wait { done.value.load(ordering: .acquiring) } }
                group.addTask {
                    done.value.store(true, ordering: .releasing)
                    list.wakeAll()
                }
                await group.waitForAll()
            }
        }
    }
}

private final class Counter: Sendable {
    let value = Mutex(0)
}

private final class Flag: Sendable {
    let value = Atomic<Bool>(false)
}
