import CSQLite
import DequeModule
import EvdClient
import NIOCore
import NIOPosix
import OrderedCollections
import Synchronization

/// One database's pool of SQLite connections, and the pool events of PROTOCOL.md §6.1.
///
/// Connections are opened lazily up to `size`; a session that finds none free waits (in order)
/// up to `checkoutTimeout`, then gets `timeout`. Every blocking SQLite call runs on a session's
/// database thread (`DatabaseThreads`) or the `NIOThreadPool`, never on an event loop or a thread
/// of Swift's cooperative pool.
public final class ConnectionPool: Sendable {
    public let database: DatabaseConfig
    public let size: Int
    let bus: EventBus
    let threadPool: NIOThreadPool
    let eventLoop: any EventLoop
    let checkoutTimeout: TimeAmount
    /// The pragmas every new connection gets (the `do_connect` event's `pragmas`).
    let pragmas: JSONObject
    let defaultBusyTimeoutMs: Int32
    /// The most one operation's vetoes may take in all.
    let vetoBudget: Duration
    /// Where committed events are journaled with their commit (`nil`: nowhere).
    let journal: Journal?
    /// Checkpoints the WAL off the commit path (`nil` for an in-memory database).
    let checkpointer: Checkpointer?
    /// Where connections wait for the write lock; opened at each commit.
    let writeGate = WriteGate()
    /// Where requests that are their own transaction are committed together (`CommitGroups`).
    let commitGroups = CommitGroups()
    /// Whether the path still names the file the pool first opened (`DatabaseIdentity`).
    let identity: DatabaseIdentity
    /// How many connections one uid may hold at once (`--max-pool-share`), and the uids it does
    /// not limit (root, evd's own): one uid cannot take the whole pool and lock the others out.
    let share: Int
    let unlimitedUIDs: Set<UInt32>

    private enum WaitResult {
        case connection(PooledConnection)
        case retry
        case failed(EvdError)
    }

    private struct Waiter {
        let id: Int
        /// The uid it waits for, when its share of the pool is limited.
        let uid: UInt32?
        let continuation: CheckedContinuation<WaitResult, Never>
    }

    private struct State {
        var idle: [PooledConnection] = []
        /// Connections open or being opened (idle + checked out + opening).
        var open = 0
        var inUse = 0
        var waiters: Deque<Waiter> = []
        var nextWaiter = 0
        var nextNumber = 1
        var firstConnectDone = false
        /// Connection numbers to close at checkin, and the event that already announced it.
        var closeOnCheckin: [Int: EventKind] = [:]
        /// Numbers of the connections checked out (or being opened for a checkout), for invalidate
        /// and dispose: kept with `idle` under one lock, so every connection is in exactly one.
        var checkedOut: Set<Int> = []
        var waits = 0
        var checkouts = 0
        var disposed = false
        /// One connection of a lost database, kept open (never served) until the pool is disposed:
        /// while evd holds a deleted file open, its owner can still copy it from `/proc/PID/fd`.
        var retained: PooledConnection?
        /// How many connections each limited uid holds, and which uid holds which connection.
        var held: [UInt32: Int] = [:]
        var holders: [Int: UInt32] = [:]

        /// Records that `uid` (if limited) holds connection `number` now.
        mutating func take(_ number: Int, for uid: UInt32?) {
            guard let uid else { return }
            self.held[uid, default: 0] += 1
            self.holders[number] = uid
        }

        /// Records that whoever held connection `number` gave it back.
        mutating func give(_ number: Int) {
            guard let uid = self.holders.removeValue(forKey: number) else { return }
            let count = (self.held[uid] ?? 1) - 1
            self.held[uid] = count > 0 ? count : nil
        }

        /// The first waiter that may take a connection now (its uid is below its share).
        mutating func popEligibleWaiter(share: Int) -> Waiter? {
            guard let index = self.waiters.firstIndex(where: { $0.uid.map { (self.held[$0] ?? 0) < share } ?? true }) else {
                return nil
            }
            return self.waiters.remove(at: index)
        }
    }

    private let state = Mutex(State())
    /// The statement watch of every open connection, by number: what the watchdog and shutdown
    /// interrupt (`interruptOverdue`, `interruptAll`).
    private let watches = Mutex<[Int: StatementWatch]>([:])

    init(
        database: DatabaseConfig,
        size: Int,
        bus: EventBus,
        threadPool: NIOThreadPool,
        eventLoop: any EventLoop,
        busyTimeoutMs: Int32 = 5000,
        checkoutTimeout: TimeAmount = .seconds(30),
        vetoBudget: Duration = .seconds(5),
        journal: Journal? = nil,
        checkpointPages: Int = 4000,
        share: Int = .max,
        unlimitedUIDs: Set<UInt32> = [],
        reportLost: @escaping DatabaseIdentity.Report = { _, _, _ in }
    ) {
        self.identity = DatabaseIdentity(database: database.name, path: database.path, report: reportLost)
        self.share = max(1, share)
        self.unlimitedUIDs = unlimitedUIDs
        self.vetoBudget = vetoBudget
        self.journal = journal
        self.database = database
        self.size = size
        self.bus = bus
        self.threadPool = threadPool
        self.eventLoop = eventLoop
        self.checkoutTimeout = checkoutTimeout
        self.defaultBusyTimeoutMs = busyTimeoutMs
        self.checkpointer =
            database.isInMemory
            ? nil
            : Checkpointer(
                path: database.path,
                gate: self.writeGate,
                identity: self.identity,
                threshold: Int32(clamping: checkpointPages)
            )
        self.pragmas = [
            "journal_mode": "wal", "synchronous": "normal", "foreign_keys": "on",
            "busy_timeout": .integer(busyTimeoutMs),
        ]
    }

    /// Runs blocking SQLite work: right here on a session's database thread (`DatabaseThreads`),
    /// else on the thread pool.
    func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        if DatabaseThreads.isCurrentThread { return try body() }
        return try await self.threadPool.runIfActive(body)
    }

    private func poolProperties(_ number: Int) -> JSONObject {
        ["database": .string(self.database.name), "connection": .integer(number)]
    }

    // MARK: Checkout and checkin

    /// Takes a connection for a session: an idle one, a new one, or the next one freed.
    ///
    /// `checkout` is vetoable: a deny means "this connection is no good" (SQLAlchemy's
    /// DisconnectionError): it is invalidated and another is tried, at most 2 attempts in all.
    ///
    /// Fails with `SQLITE_READONLY_DBMOVED` once the database's file was deleted or replaced
    /// (`DatabaseIdentity`). `verifyFile`: `stat` the path now; `false` only reads whether the
    /// database was found lost before, for a request in its own transaction, whose COMMIT (which
    /// it always runs, reads too, before its result is sent) checks the file anyway.
    ///
    /// `announced: false`: a commit group's connection, whose members each announce their own
    /// `checkout` (`announceCheckout`): neither fired nor asked here.
    public func checkout(origin: EventOrigin, verifyFile: Bool = true, announced: Bool = true) async throws(EvdError) -> PooledConnection {
        var attempts = 0
        let uid = origin.actor.flatMap { self.unlimitedUIDs.contains($0.uid) ? nil : $0.uid }
        while true {
            try await self.checkServing(origin: origin, verifyFile: verifyFile)
            enum Step {
                case idle(PooledConnection)
                case open(Int)
                case wait(atShare: Bool)
            }
            let step: Step = self.state.withLock { state in
                if let uid, state.held[uid] ?? 0 >= self.share {
                    state.waits += 1
                    return .wait(atShare: true)
                }
                if let connection = state.idle.popLast() {
                    state.take(connection.number, for: uid)
                    state.inUse += 1
                    state.checkouts += 1
                    state.checkedOut.insert(connection.number)
                    return .idle(connection)
                }
                if state.open < self.size {
                    state.open += 1
                    state.inUse += 1
                    state.checkouts += 1
                    state.checkedOut.insert(state.nextNumber)
                    state.take(state.nextNumber, for: uid)
                    defer { state.nextNumber += 1 }
                    return .open(state.nextNumber)
                }
                state.waits += 1
                return .wait(atShare: false)
            }
            let connection: PooledConnection
            switch step {
            case .idle(let idle):
                connection = idle
            case .open(let number):
                do {
                    let operation = OperationVetoBudget.current  // the SQLite thread cannot see it
                    connection = try await self.run { try self.open(number: number, origin: origin, operation: operation) }
                } catch {
                    self.releaseSlot(number)
                    if let error = error as? SQLiteError { throw error.evdError }
                    if let error = error as? EvdError { throw error }
                    throw EvdError(.shuttingDown, "the daemon is stopping")
                }
            case .wait(let atShare):
                switch await self.waitForConnection(uid: uid, atShare: atShare) {
                case .connection(let handedOver):
                    connection = handedOver
                    // The file may have gone while it waited.
                    if (try? verifyFile ? self.identity.check() : self.identity.checkLost()) == nil {
                        await self.giveBackLost(connection, origin: origin)
                        continue
                    }
                case .retry: continue
                case .failed(let error): throw error
                }
            }
            guard announced else { return connection }
            let verdict = await self.bus.decide(.checkout, origin, budget: self.vetoBudget, eventLoop: self.eventLoop) {
                self.poolProperties(connection.number)
            }
            if let verdict, verdict.denied {
                attempts += 1
                await self.discard(connection, because: verdict, origin: origin)
                if attempts >= 2 { throw verdict.vetoedError(event: EventKind.checkout.name) }
                continue
            }
            return connection
        }
    }

    /// A commit group's member takes the group's connection: `checkout`, then `engine_connect`,
    /// as a request of its own that checked it out would fire them.
    func announceCheckout(_ connection: PooledConnection, origin: EventOrigin) {
        self.bus.emit(.checkout, origin) { self.poolProperties(connection.number) }
        self.announceEngineConnect(connection, origin: origin)
    }

    /// A session is done with `connection`: `reset`, then `checkin` if it `returned` to the pool.
    /// Also a commit group's member, done with the group's connection (nothing rolled back: its
    /// transaction was a savepoint of the group's).
    func announceCheckin(_ connection: PooledConnection, origin: EventOrigin, rolledBack: Bool = false, returned: Bool = true) {
        self.bus.emit(.reset, origin) {
            var properties = self.poolProperties(connection.number)
            properties["rolled_back"] = .bool(rolledBack)
            return properties
        }
        if returned { self.bus.emit(.checkin, origin) { self.poolProperties(connection.number) } }
    }

    // MARK: A lost database file

    /// Throws `sql_error` `SQLITE_READONLY_DBMOVED` if the database's path no longer names the file
    /// the pool opened (`DatabaseIdentity`): one `stat` (`verifyFile`), or only whether it was found
    /// lost before. Its idle connections then leave the pool.
    private func checkServing(origin: EventOrigin, verifyFile: Bool) async throws(EvdError) {
        do {
            if verifyFile { try self.identity.check() } else { try self.identity.checkLost() }
        } catch {
            let idle = self.state.withLock { state -> [PooledConnection] in
                let idle = state.idle
                state.idle = []
                state.open -= idle.count
                return idle
            }
            await self.retire(idle, origin: origin)
            self.wakeWaitersForFreedSlots(idle.count)
            throw error.evdError
        }
    }

    /// Takes a connection handed over to a waiter out of the pool: its database was found lost.
    private func giveBackLost(_ connection: PooledConnection, origin: EventOrigin) async {
        let waiter = self.takeOut(connection)
        await self.retire([connection], origin: origin)
        waiter?.continuation.resume(returning: .retry)
    }

    /// Connections of a lost database, already out of the pool's counts: `invalidate`, then closed,
    /// except one kept open, never served, until the pool is disposed (`State.retained`).
    private func retire(_ connections: [PooledConnection], origin: EventOrigin) async {
        guard !connections.isEmpty else { return }
        let closing = self.state.withLock { state -> [PooledConnection] in
            guard state.retained == nil else { return connections }
            state.retained = connections[0]
            return Array(connections.dropFirst())
        }
        let error: JSONValue = .object(self.identity.lostError.evdError.jsonObject)
        for connection in connections {
            self.bus.emit(.invalidate, origin) {
                var properties = self.poolProperties(connection.number)
                properties["error"] = error
                return properties
            }
        }
        for connection in closing { await self.close(connection, detached: false, origin: origin) }
    }

    /// Invalidates and closes a checked-out connection a `checkout` listener denied.
    private func discard(_ connection: PooledConnection, because verdict: VetoVerdict, origin: EventOrigin) async {
        self.bus.emit(.invalidate, origin) {
            var properties = self.poolProperties(connection.number)
            properties["error"] = .object(verdict.vetoedError(event: EventKind.checkout.name).jsonObject)
            return properties
        }
        let waiter = self.takeOut(connection)
        await self.close(connection, detached: false, origin: origin)
        waiter?.continuation.resume(returning: .retry)
    }

    /// Takes a checked-out connection out of the pool's counts (it will not come back), and
    /// returns the waiter that may now open one in its place.
    private func takeOut(_ connection: PooledConnection) -> Waiter? {
        self.state.withLock { state in
            state.inUse -= 1
            state.open -= 1
            state.checkedOut.remove(connection.number)
            state.give(connection.number)
            state.closeOnCheckin.removeValue(forKey: connection.number)
            return state.popEligibleWaiter(share: self.share)
        }
    }

    /// Waits for a connection another session gives back; `atShare`: because `uid` holds its share.
    private func waitForConnection(uid: UInt32?, atShare: Bool) async -> WaitResult {
        let id = self.state.withLock { state in
            state.nextWaiter += 1
            return state.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<WaitResult, Never>) in
                self.state.withLock { $0.waiters.append(Waiter(id: id, uid: uid, continuation: continuation)) }
                self.eventLoop.scheduleTask(in: self.checkoutTimeout) {
                    let milliseconds = self.checkoutTimeout.nanoseconds / 1_000_000
                    let why =
                        atShare
                        ? " (uid \(uid ?? 0) holds \(self.share) of its connections, the most one uid may: --max-pool-share)" : ""
                    self.failWaiter(
                        id: id,
                        EvdError(.timeout, "no connection to \(self.database.name) was free within \(milliseconds) ms" + why)
                    )
                }
            }
        } onCancel: {
            self.failWaiter(id: id, EvdError(.shuttingDown, "the request was cancelled"))
        }
    }

    private func failWaiter(id: Int, _ error: EvdError) {
        let waiter = self.state.withLock { state -> Waiter? in
            guard let index = state.waiters.firstIndex(where: { $0.id == id }) else { return nil }
            return state.waiters.remove(at: index)
        }
        waiter?.continuation.resume(returning: .failed(error))
    }

    /// Gives up the slot of connection `number`, which never opened.
    private func releaseSlot(_ number: Int) {
        let waiter = self.state.withLock { state -> Waiter? in
            state.open -= 1
            state.inUse -= 1
            state.checkedOut.remove(number)
            state.give(number)
            state.closeOnCheckin.removeValue(forKey: number)
            return state.popEligibleWaiter(share: self.share)
        }
        waiter?.continuation.resume(returning: .retry)
    }

    /// Returns a connection: reset (rolling back anything open), checkin (not for a detached one,
    /// which is not the pool's any more), then idle, handed to a
    /// waiter, or closed if it was invalidated, soft-invalidated or detached meanwhile, or if its
    /// session left state on it that the next session must not inherit (a temporary table or
    /// trigger, an attached database, a pragma: `AuthorizerObserver.leftSessionState`).
    ///
    /// `announced: false`: a commit group's connection, whose members announced their own
    /// `reset` and `checkin` (`announceCheckin`).
    public func checkin(_ connection: PooledConnection, origin: EventOrigin, announced: Bool = true) async {
        let rolledBack: Bool
        do {
            rolledBack = try await self.run {
                let open = connection.sqlite.inTransaction
                if open {
                    try? connection.sqlite.exec("ROLLBACK")
                    connection.schema.clear()  // the schema cookie went back (see `SchemaCache`)
                }
                connection.capture.discardAll()
                connection.twoPhase = false
                try? connection.apply(queryOnly: false, busyTimeoutMs: self.defaultBusyTimeoutMs)
                connection.sqlite.lastInsertRowid = 0
                return open
            }
        } catch {
            rolledBack = false  // the thread pool is gone: we are stopping
        }
        if announced {
            // A detached connection does not return to the pool: no `checkin` (SQLAlchemy's
            // `_finalize_fairy` resets it, then fires only `close_detached`).
            let detached = self.state.withLock { $0.closeOnCheckin[connection.number] == .detach }
            self.announceCheckin(connection, origin: origin, rolledBack: rolledBack, returned: !detached)
        }

        enum Next {
            case idle
            case handOver(Waiter)
            case close(EventKind, Waiter?)
            case retire(Waiter?)
        }
        let leftSessionState = connection.observer.leftSessionState
        let lost = self.identity.isLost
        let next: Next = self.state.withLock { state in
            state.inUse -= 1
            state.give(connection.number)
            if lost {
                // Not pooled again: nothing is served from a lost database.
                state.open -= 1
                state.checkedOut.remove(connection.number)
                if state.closeOnCheckin.removeValue(forKey: connection.number) == .detach {
                    return .close(.detach, state.popEligibleWaiter(share: self.share))
                }
                return .retire(state.popEligibleWaiter(share: self.share))
            }
            if let reason = state.closeOnCheckin.removeValue(forKey: connection.number) ?? (leftSessionState ? .close : nil) {
                state.open -= 1
                state.checkedOut.remove(connection.number)
                return .close(reason, state.popEligibleWaiter(share: self.share))
            }
            if let waiter = state.popEligibleWaiter(share: self.share) {
                state.take(connection.number, for: waiter.uid)
                state.inUse += 1
                state.checkouts += 1
                return .handOver(waiter)  // it stays checked out, by the waiter now
            }
            state.checkedOut.remove(connection.number)
            state.idle.append(connection)
            return .idle
        }
        switch next {
        case .idle:
            break
        case .handOver(let waiter):
            waiter.continuation.resume(returning: .connection(connection))
        case .close(let reason, let waiter):
            await self.close(connection, detached: reason == .detach, origin: origin)
            waiter?.continuation.resume(returning: .retry)
        case .retire(let waiter):
            await self.retire([connection], origin: origin)
            waiter?.continuation.resume(returning: .retry)
        }
    }

    // MARK: Opening and closing

    /// Opens connection `number`: `do_connect`, open, pragmas, `first_connect`, `connect`. Runs on the thread pool.
    /// `do_connect` is vetoable: deny refuses the connection; a modified `pragmas` is what is applied.
    private func open(number: Int, origin: EventOrigin, operation: OperationVetoBudget? = nil) throws -> PooledConnection {
        var pragmas = self.pragmas
        let verdict = self.bus.decideBlocking(.doConnect, origin, budget: self.vetoBudget, operation: operation) {
            [
                "database": .string(self.database.name), "path": .string(self.database.path),
                "flags": ["SQLITE_OPEN_READWRITE", "SQLITE_OPEN_CREATE", "SQLITE_OPEN_URI"],
                "pragmas": .object(pragmas),
            ]
        }
        if let verdict {
            if verdict.denied { throw verdict.vetoedError(event: EventKind.doConnect.name) }
            if let modified = verdict.properties["pragmas"]?.objectValue { pragmas = modified }
        }
        var statements: [String] = []
        for (name, value) in pragmas {
            guard let statement = Self.pragmaStatement(name, value) else {
                throw EvdError(.vetoed, "do_connect: cannot apply pragma '\(name)' = \(String(decoding: value.jsonBytes, as: UTF8.self))")
            }
            statements.append(statement)
        }
        // A replaced file must not be opened (with the old one's WAL): checked before, and after,
        // since it may have been replaced meanwhile; SQLite has read nothing yet.
        try self.identity.check()
        let sqlite = try SQLiteConnection(
            path: self.database.path,
            flags: SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_URI
        )
        do {
            try self.identity.opened(sqlite)
        } catch {
            Self.keepWALOnClose(sqlite)
            throw error
        }
        for statement in statements { try sqlite.exec(statement) }
        // A listener that set wal_autocheckpoint itself keeps SQLite's own checkpointing.
        if let checkpointer = self.checkpointer, pragmas["wal_autocheckpoint"] == nil { checkpointer.watch(sqlite) }
        let observer = AuthorizerObserver()
        sqlite.setAuthorizer(observer)
        let first = self.state.withLock { state in
            defer { state.firstConnectDone = true }
            return !state.firstConnectDone
        }
        if first { self.bus.emit(.firstConnect, origin) { self.poolProperties(number) } }
        self.bus.emit(.connect, origin) { self.poolProperties(number) }
        // The pragma's busy timeout (a do_connect listener may have changed it) is what the
        // connection's own busy handler waits.
        let busyTimeoutMs = pragmas["busy_timeout"]?.intValue.map { Int32(clamping: $0) } ?? self.defaultBusyTimeoutMs
        let connection = PooledConnection(
            number: number,
            sqlite: sqlite,
            observer: observer,
            busyTimeoutMs: busyTimeoutMs,
            gate: self.writeGate,
            identity: self.identity
        )
        self.watches.withLock { $0[number] = connection.watch }
        return connection
    }

    /// `PRAGMA name = value` for a name that is an identifier and a value that is a number, a
    /// boolean or a bare word (`wal`, `normal`); `nil` for anything else, so that a listener's
    /// `pragmas` can never smuggle other SQL in.
    static func pragmaStatement(_ name: String, _ value: JSONValue) -> String? {
        func isWord(_ text: String) -> Bool {
            !text.isEmpty
                && text.utf8.allSatisfy {
                    $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") || (48...57).contains($0) || (65...90).contains($0)
                        || (97...122).contains($0)
                }
        }
        guard isWord(name), !name.contains("-") else { return nil }
        switch value {
        case .int(let n): return "PRAGMA \(name) = \(n)"
        case .bool(let b): return "PRAGMA \(name) = \(b ? 1 : 0)"
        case .string(let s) where isWord(s): return "PRAGMA \(name) = \(s)"
        default: return nil
        }
    }

    /// Closes a connection that left the pool, with `close` or `close_detached`.
    private func close(_ connection: PooledConnection, detached: Bool, origin: EventOrigin) async {
        self.watches.withLock { _ = $0.removeValue(forKey: connection.number) }
        // Closed here, explicitly (its hooks first), on the thread pool, since a close may
        // checkpoint the WAL.
        let lost = self.identity.isLost
        _ = try? await self.run {
            if lost { Self.keepWALOnClose(connection.sqlite) }
            connection.close()
        }
        self.bus.emit(detached ? .closeDetached : .close, origin) { self.poolProperties(connection.number) }
    }

    /// Makes closing `sqlite` leave the WAL alone: the last connection of a file to close would
    /// otherwise checkpoint the WAL at the database's path into its file and delete it, and once
    /// the path names another file that WAL is not this file's (SQLite skips it by itself when
    /// its own file has moved, not when a new connection opened the file that replaced it).
    static func keepWALOnClose(_ sqlite: SQLiteConnection) {
        _ = evd_sqlite_db_config_flag(sqlite.handle, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    }

    // MARK: Invalidation and disposal

    /// Invalidates a checked-out connection after an error that means it can no longer be trusted:
    /// `invalidate` now, closed when its session checks it in.
    func invalidate(_ connection: PooledConnection, error: SQLiteError, origin: EventOrigin) {
        self.state.withLock { $0.closeOnCheckin[connection.number] = .invalidate }
        self.bus.emit(.invalidate, origin) {
            var properties = self.poolProperties(connection.number)
            properties["error"] = ["code": "sql_error", "message": .string(error.message), "sqlite_code": .string(error.codeName)]
            return properties
        }
    }

    /// The admin op `invalidate`: connection `number` (or all), closed now if idle, else at checkin.
    /// `soft` fires `soft_invalidate` instead of `invalidate`. Returns the numbers affected.
    func invalidate(number: Int?, soft: Bool, origin: EventOrigin) async -> [Int] {
        let kind: EventKind = soft ? .softInvalidate : .invalidate
        let (idle, inUse) = self.state.withLock { state -> ([PooledConnection], [Int]) in
            let idle = state.idle.filter { number == nil || $0.number == number }
            state.idle.removeAll { number == nil || $0.number == number }
            state.open -= idle.count
            return (idle, Self.markCheckedOut(&state, number: number, as: kind))
        }
        let error: JSONValue = [
            "code": "invalidated", "message": .string(soft ? "soft-invalidated by an admin" : "invalidated by an admin"),
            "sqlite_code": .null,
        ]
        for connection in idle {
            self.bus.emit(kind, origin) {
                var properties = self.poolProperties(connection.number)
                properties["error"] = error
                return properties
            }
            await self.close(connection, detached: false, origin: origin)
        }
        for n in inUse {
            self.bus.emit(kind, origin) {
                var properties = self.poolProperties(n)
                properties["error"] = error
                return properties
            }
        }
        self.wakeWaitersForFreedSlots(idle.count)
        return idle.map(\.number) + inUse
    }

    /// Marks checked-out connection `number` (or all) to be closed at checkin, announced by `kind`
    /// (unless an earlier mark stands); returns their numbers.
    private static func markCheckedOut(_ state: inout State, number: Int?, as kind: EventKind) -> [Int] {
        let numbers = state.checkedOut.filter { number == nil || $0 == number }.sorted()
        for n in numbers where state.closeOnCheckin[n] == nil { state.closeOnCheckin[n] = kind }
        return numbers
    }

    private func wakeWaitersForFreedSlots(_ count: Int) {
        guard count > 0 else { return }
        let waiters = self.state.withLock { state in (0..<min(count, state.waiters.count)).map { _ in state.waiters.removeFirst() } }
        for waiter in waiters { waiter.continuation.resume(returning: .retry) }
    }

    /// The admin op `dispose` and shutdown, in SQLAlchemy's order (`Engine.dispose`: the old pool's
    /// `dispose`, then `recreate`, then `engine_disposed`): idle connections closed, checked-out
    /// ones detached (closed with `close_detached` when their session gives them back), then
    /// `engine_disposed`. The pool that follows is a new one: its first connection fires
    /// `first_connect` again.
    func dispose(origin: EventOrigin) async {
        let (idle, inUse, retained) = self.state.withLock { state -> ([PooledConnection], [Int], PooledConnection?) in
            let idle = state.idle
            state.idle = []
            state.open -= idle.count
            state.firstConnectDone = false
            defer { state.retained = nil }
            return (idle, Self.markCheckedOut(&state, number: nil, as: .detach), state.retained)
        }
        for connection in idle { await self.close(connection, detached: false, origin: origin) }
        if let retained { await self.close(retained, detached: false, origin: origin) }
        for n in inUse {
            self.bus.emit(.detach, origin) { self.poolProperties(n) }
        }
        self.bus.emit(.engineDisposed, origin) { ["database": .string(self.database.name)] }
        self.wakeWaitersForFreedSlots(idle.count)
    }

    /// Interrupts every client statement that has run past the statement time limit.
    func interruptOverdue() {
        let now = ContinuousClock.now
        for watch in self.watches.withLock({ Array($0.values) }) { watch.interruptIfOverdue(now: now) }
    }

    /// Interrupts every running client statement (the daemon is stopping).
    func interruptAll(_ reason: StatementWatch.Reason) {
        for watch in self.watches.withLock({ Array($0.values) }) { watch.interrupt(reason) }
    }

    /// Pool figures for `stats`.
    func statistics() -> JSONValue {
        let (groups, members, queued) = self.commitGroups.statistics
        return self.state.withLock { state in
            [
                "size": .integer(self.size), "open": .integer(state.open), "in_use": .integer(state.inUse),
                "idle": .integer(state.idle.count), "waiting": .integer(state.waiters.count),
                "waits": .integer(state.waits), "checkouts": .integer(state.checkouts),
                "lost": .bool(self.identity.isLost),
                // Commit groups run, and the requests they held (`CommitGroups`).
                "commit_groups": .integer(groups), "grouped_requests": .integer(members), "group_queue": .integer(queued),
            ]
        }
    }
}
