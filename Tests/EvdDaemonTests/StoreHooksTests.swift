import CSQLite
import Foundation
import Synchronization
import Testing

@testable import EvdDaemon

/// The C hooks evd installs on a connection are registered with it and removed by its `close`,
/// before the handle closes (so SQLite never calls back into a freed object); and the debug
/// builds' check of exclusive use.
@Suite struct StoreHooksTests {
    /// What the hooks of one connection point at, made and dropped inside one scope.
    private struct Installed {
        weak var capture: ChangeCapture?
        weak var observer: AuthorizerObserver?
        weak var busy: BusyWaiter?
    }

    private static func installHooks(
        on connection: SQLiteConnection,
        gate: WriteGate,
        checkpointer: Checkpointer
    ) throws -> Installed {
        let capture = ChangeCapture(connection: connection, schema: SchemaCache())
        let observer = AuthorizerObserver()
        connection.setAuthorizer(observer)
        let busy = BusyWaiter(gate: gate, timeoutMs: 100)
        busy.install(on: connection)
        checkpointer.watch(connection)
        // The hooks run: the capture records the insert, the authorizer sees the BEGIN.
        capture.active = true
        capture.beginUnit(.other)
        try connection.exec("BEGIN; INSERT INTO t VALUES (1, 'a'); COMMIT")
        #expect(capture.recordedCount == 1)
        #expect(observer.sawTransactionControl)
        return Installed(capture: capture, observer: observer, busy: busy)
    }

    @Test func closeRemovesTheHooksAndReleasesTheirObjects() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/hooks.db"
            let gate = WriteGate()
            let checkpointer = Checkpointer(path: path, gate: gate, identity: DatabaseIdentity(database: "main", path: path))
            let connection = try SQLiteConnection(path: path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
            try connection.exec("PRAGMA journal_mode = WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
            let installed = try Self.installHooks(on: connection, gate: gate, checkpointer: checkpointer)
            // Nobody else holds them: the connection keeps them while its hooks point at them.
            #expect(installed.capture != nil)
            #expect(installed.observer != nil)
            #expect(installed.busy != nil)
            #expect(connection.installedHooks == Set(SQLiteConnection.Hook.allCases))

            connection.close()
            #expect(connection.isClosed)
            #expect(connection.installedHooks.isEmpty)
            #expect(installed.capture == nil)
            #expect(installed.observer == nil)
            #expect(installed.busy == nil)
            connection.close()  // a second close does nothing
            await checkpointer.close()
        }
    }

    @Test func uninstalledHooksAreNotCalled() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/hooks.db"
            let gate = WriteGate()
            let checkpointer = Checkpointer(path: path, gate: gate, identity: DatabaseIdentity(database: "main", path: path))
            let connection = try SQLiteConnection(path: path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
            try connection.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
            let capture = ChangeCapture(connection: connection, schema: SchemaCache())
            let observer = AuthorizerObserver()
            connection.setAuthorizer(observer)

            connection.uninstallHooks()
            #expect(connection.installedHooks.isEmpty)
            capture.active = true
            capture.beginUnit(.other)
            try connection.exec("BEGIN; INSERT INTO t VALUES (1, 'a'); UPDATE t SET v = 'b'; DELETE FROM t; COMMIT")
            #expect(capture.recordedCount == 0)
            #expect(!observer.sawTransactionControl)
            connection.close()
            await checkpointer.close()
        }
    }

    @Test func aPooledConnectionClosesItsConnectionWhenItGoes() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/hooks.db"
            let gate = WriteGate()
            let sqlite = try SQLiteConnection(path: path, flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE)
            weak var capture: ChangeCapture?
            do {
                let observer = AuthorizerObserver()
                sqlite.setAuthorizer(observer)
                let pooled = PooledConnection(
                    number: 1,
                    sqlite: sqlite,
                    observer: observer,
                    busyTimeoutMs: 100,
                    gate: gate,
                    identity: DatabaseIdentity(database: "main", path: path)
                )
                capture = pooled.capture
                #expect(sqlite.installedHooks == [.preUpdate, .authorizer, .busy])
            }
            #expect(sqlite.isClosed)
            #expect(sqlite.installedHooks.isEmpty)
            #expect(capture == nil)
        }
    }

    /// A class sharing one `ExclusiveUse` between threads, for the test.
    private final class Shared: @unchecked Sendable {
        let use = ExclusiveUse("StoreHooksTests.Shared")
    }

    private final class Answer: Sendable {
        let value = Atomic<Bool>(false)
    }

    private static func onAnotherThread(_ body: @escaping @Sendable () -> Bool) -> Bool {
        let answer = Answer()
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            answer.value.store(body(), ordering: .relaxed)
            done.signal()
        }
        thread.start()
        done.wait()
        return answer.value.load(ordering: .relaxed)
    }

    @Test func exclusiveUseRefusesASecondThreadWhileOneIsInside() {
        #if DEBUG
        #expect(ExclusiveUse.isChecking)
        #endif
        guard ExclusiveUse.isChecking else { return }
        let shared = Shared()
        let entered = shared.use.enter()
        #expect(entered)
        let again = shared.use.enter()
        #expect(!again)  // the same thread again: allowed, and not a use of its own
        shared.use.assertInside()
        #expect(!Self.onAnotherThread { shared.use.tryEnter() })
        shared.use.leave(entered)
        // Exclusive use, not one thread: another thread may use it once the first has left.
        #expect(
            Self.onAnotherThread {
                let took = shared.use.tryEnter()
                shared.use.leave(took)
                return took
            }
        )
        let afterwards = shared.use.enter()
        #expect(afterwards)
        shared.use.leave(afterwards)
    }
}
