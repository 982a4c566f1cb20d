import CSQLite
import DequeModule
import EvdClient
import Synchronization

/// Group commit: concurrent requests that each are their own transaction run together, one after
/// the other, in one SQLite transaction with one COMMIT.
///
/// SQLite has one write lock per database, so concurrent autocommit writes from different sessions
/// run one transaction at a time whatever evd does; what each costs alone is the BEGIN, the
/// COMMIT (the WAL frame, the lock taken and released, the waiters woken) and a connection of its
/// own. A group pays those once. It is serial execution — the members run one after the other on
/// one connection, exactly as they would have one transaction after the other — so isolation is
/// what it was, and each member keeps everything that is its own:
///
/// - its own savepoint (`SAVEPOINT evd_member`): a member whose statement fails, whose `commit` is
///   denied, or whose deferred foreign keys are violated is rolled back alone;
/// - its own events, live (`checkout`, `engine_connect`, `begin`, the cursor events, `commit`,
///   `reset`, `checkin`, all with its own session and actor) and committed (its own seqs, taken
///   in the order the members ran, and its own `tx`);
/// - its own answer, sent only once the group's COMMIT succeeded. Should it fail, every member
///   gets `rollback` and the COMMIT's error, and nothing of the group was committed.
///
/// One member can end the whole transaction, not just its savepoint: a trigger's `RAISE(ROLLBACK)`,
/// an interrupted write, a full disk. Then the members before it that were done lose their work
/// too; each gets its `rollback` and is run again, alone, in a transaction of its own (its live
/// events come again, its committed events once). So no member — and no uid that can send one —
/// can make another's request fail.
///
/// How a group forms: the first request to arrive leads. It takes every request that queued
/// behind it (up to `maxMembers`), runs them on a connection of its own, commits, answers them,
/// and hands the lead to the first request that queued meanwhile. Under no load a group has one
/// member and costs what a request alone did; under load groups grow with it.
///
/// What is grouped (`ConnectionPool.groups(_:)`): a request that is its own transaction, runs one
/// INSERT, UPDATE, DELETE or REPLACE statement (`execute`, `executemany`) or is a structured
/// `insert`, `upsert`, `update` or `delete` (without `alter`), has no attachments, and whose
/// session did not set the execution option `group_commit` to false. Nothing is grouped while any
/// veto listener other than `before_execute`'s (decided before a request reaches the pool) is
/// subscribed: a listener that blocks one member would hold up the whole group, and listeners of
/// `begin` and `commit` may expect a real boundary.
final class CommitGroups: Sendable {
    /// The most requests one group takes.
    static let maxMembers = 64

    /// A request waiting for its turn.
    struct Member: Sendable {
        let sql: SQLRequest
        let decided: EventBus.DecidedAhead
        let watching: @Sendable (StatementWatch?) -> Void
        /// The member's task-local settings, which the leader's task cannot see.
        let operationBudget: OperationVetoBudget?
        let maxResponseBytes: Int
        /// Resumes the member's task: with its result, or to lead the next group. `nil` for the
        /// leader's own request.
        var continuation: CheckedContinuation<Turn, Never>?
    }

    enum Turn: Sendable {
        case done(Result<SQLOutcome, any Error>)
        /// Lead the next group.
        case lead
        /// Run alone: the group lost the member's work (`CommitGroup.rollbackMember`).
        case runAlone
    }

    /// What a group did with a member.
    enum Outcome: Sendable {
        case done(Result<SQLOutcome, any Error>)
        /// Not taken: a member before it needed the group to end there.
        case notTaken
        /// Its work was lost with the group's transaction: to be run again, alone.
        case again
    }

    private struct State {
        var queue: Deque<Member> = []
        var leading = false
        var groups = 0
        var members = 0
    }

    private let state = Mutex(State())

    /// Runs `sql` in the next group: leads one if none is running, else waits for its turn.
    func submit(
        _ sql: SQLRequest,
        on pool: ConnectionPool,
        announcing decided: EventBus.DecidedAhead,
        watching: @escaping @Sendable (StatementWatch?) -> Void
    ) async throws -> SQLOutcome {
        let member = Member(
            sql: sql,
            decided: decided,
            watching: watching,
            operationBudget: OperationVetoBudget.current,
            maxResponseBytes: ResultRows.maxResponseBytes,
            continuation: nil
        )
        if self.takeLead(orQueue: nil) { return try await self.lead(member, on: pool) }
        let turn = await withCheckedContinuation { (continuation: CheckedContinuation<Turn, Never>) in
            var waiting = member
            waiting.continuation = continuation
            // (The group may have ended since the first try.)
            if self.takeLead(orQueue: waiting) { continuation.resume(returning: .lead) }
        }
        switch turn {
        case .done(let result): return try result.get()
        case .lead: return try await self.lead(member, on: pool)
        case .runAlone: return try await self.runAlone(member, on: pool)
        }
    }

    /// Takes the lead when nobody leads; else queues `waiting` (if given) for the next group.
    private func takeLead(orQueue waiting: Member?) -> Bool {
        self.state.withLock { state in
            if !state.leading {
                state.leading = true
                return true
            }
            if let waiting { state.queue.append(waiting) }
            return false
        }
    }

    /// Runs a member whose work a group lost in a transaction of its own (its `before_execute`
    /// was published already).
    private func runAlone(_ member: Member, on pool: ConnectionPool) async throws -> SQLOutcome {
        try await OperationVetoBudget.$current.withValue(member.operationBudget) {
            try await ResultRows.$maxResponseBytes.withValue(member.maxResponseBytes) {
                try await pool.execute(
                    member.sql,
                    on: nil,
                    announcing: EventBus.DecidedAhead(verdict: member.decided.verdict, publish: {}),
                    grouping: false,
                    watching: member.watching
                )
            }
        }
    }

    /// Runs one group: `own` and every request queued behind it; answers them; hands the lead
    /// on to the first request that queued meanwhile.
    private func lead(_ own: Member, on pool: ConnectionPool) async throws -> SQLOutcome {
        var batch = [own]
        self.state.withLock { state in
            while batch.count < Self.maxMembers, let next = state.queue.popFirst() { batch.append(next) }
            state.groups += 1
            state.members += batch.count
        }
        let outcomes = await self.run(batch, on: pool)
        // Members a group could not take (one before them needed the group to end) go first in
        // the next one.
        let next: Member? = self.state.withLock { state in
            for index in batch.indices.reversed() {
                if case .notTaken = outcomes[index] { state.queue.prepend(batch[index]) }
            }
            guard let next = state.queue.popFirst() else {
                state.leading = false
                return nil
            }
            return next
        }
        next?.continuation?.resume(returning: .lead)
        for index in batch.indices.dropFirst() {
            switch outcomes[index] {
            case .done(let result): batch[index].continuation?.resume(returning: .done(result))
            case .again: batch[index].continuation?.resume(returning: .runAlone)
            case .notTaken: break
            }
        }
        // The leader's own request always runs: it is the group's first.
        switch outcomes[0] {
        case .done(let result): return try result.get()
        case .again, .notTaken: return try await self.runAlone(own, on: pool)
        }
    }

    /// Runs a group's members on a connection of their own.
    private func run(_ batch: [Member], on pool: ConnectionPool) async -> [Outcome] {
        let connection: PooledConnection
        do {
            // The group's own: taken quietly (each member announces its checkout), and as the
            // daemon, so that no uid's share of the pool limits the group it leads.
            connection = try await pool.checkout(origin: .daemon, verifyFile: false, announced: false)
        } catch {
            // The listeners were asked: what they decided still reaches the audit log.
            for member in batch where member.decided.verdict != nil { member.decided.publish() }
            return batch.map { _ in .done(.failure(error)) }
        }
        let results: [Outcome]
        do {
            results = try await pool.run { CommitGroup(pool: pool, connection: connection).run(batch) }
        } catch {
            results = batch.map { _ in .done(.failure(error)) }  // the threads are gone: the daemon stops
        }
        await pool.checkin(connection, origin: .daemon, announced: false)
        return results
    }

    /// How many groups ran, how many requests they held, and how many wait for the next, for `stats`.
    var statistics: (groups: Int, members: Int, queued: Int) {
        self.state.withLock { ($0.groups, $0.members, $0.queue.count) }
    }
}

/// One group's run on its connection, on a database thread: the members one after the other in
/// one transaction, then its COMMIT (`CommitGroups`).
///
/// `@unchecked Sendable`: exclusive use, as its connection. It is made inside the one
/// `ConnectionPool.run` that runs the group, and only the members' `SQLRun`s, inside that same
/// call, reach it (`SQLRun.group`); it never outlives the call.
final class CommitGroup: @unchecked Sendable {
    let pool: ConnectionPool
    let connection: PooledConnection
    /// Whether the running member's savepoint is open.
    private(set) var memberOpen = false
    /// The members whose work is in the transaction, with their staged events, in order.
    private var staged: [(index: Int, run: SQLRun, commit: StagedCommit)] = []
    /// Set when a member's events need the capture until the COMMIT: the group takes no more.
    private var closed = false
    /// Members whose work was lost with the transaction, to be run again alone.
    private var lost: Set<Int> = []
    private var running = 0

    init(pool: ConnectionPool, connection: PooledConnection) {
        self.pool = pool
        self.connection = connection
    }

    var sqlite: SQLiteConnection { self.connection.sqlite }

    /// Runs the members and commits.
    func run(_ batch: [CommitGroups.Member]) -> [CommitGroups.Outcome] {
        var results: [CommitGroups.Outcome] = Array(repeating: .notTaken, count: batch.count)
        var answers: [Int: JSONValue] = [:]
        for (index, member) in batch.enumerated() {
            if self.closed { break }
            self.running = index
            do {
                answers[index] = try self.run(member)
            } catch {
                results[index] = .done(.failure(error))
            }
        }
        for index in self.lost { results[index] = .again }
        guard !self.staged.isEmpty else {
            self.endTransaction()
            return results
        }
        let bus = self.pool.bus
        do throws(SQLiteError) {
            try self.connection.identity.check()  // nothing is committed into a file deleted or replaced under evd
            try self.connection.run(own: "COMMIT")
        } catch {
            for member in self.staged {
                self.connection.unstage(member.commit, bus: bus)
                results[member.index] = .done(.failure(member.run.failed(error, statement: "COMMIT", parameters: .array([]))))
            }
            self.endTransaction()
            for member in self.staged { member.run.emitRollback() }
            return results
        }
        for member in self.staged {
            let seq = self.connection.publish(member.commit, bus: bus, journal: self.pool.journal)
            results[member.index] = .done(.success(SQLOutcome(result: answers[member.index] ?? [:], attachments: nil, seq: seq)))
        }
        self.connection.capture.discardAll()
        if self.staged.contains(where: \.commit.large) { _ = evd_malloc_trim() }
        return results
    }

    /// Runs one member in its own savepoint, with its own events; returns its result, to be sent
    /// once the group committed.
    private func run(_ member: CommitGroups.Member) throws -> JSONValue {
        let sql = member.sql
        let pool = self.pool
        pool.announceCheckout(self.connection, origin: sql.origin)
        member.decided.publish()
        defer { pool.announceCheckin(self.connection, origin: sql.origin) }
        member.watching(self.connection.watch)
        defer { member.watching(nil) }
        try pool.apply(sql.executionOptions, to: self.connection)
        var run = SQLRun(
            bus: pool.bus,
            pool: pool,
            connection: self.connection,
            origin: sql.origin,
            request: sql.request,
            executionOptions: sql.executionOptions,
            implicitTransaction: true,
            vetoBudget: sql.vetoBudget,
            policy: sql.policy,
            rewriters: sql.rewriters,
            statementLimitMs: sql.statementLimitMs
        )
        run.group = self
        run.operationBudget = member.operationBudget
        run.maxResponseBytes = member.maxResponseBytes
        return try run.perform(sql.command)
    }

    // MARK: A member's transaction

    /// The member's transaction begins: the group's, if no member began it yet (`BEGIN
    /// IMMEDIATE`: every member writes), then the member's savepoint.
    func beginMember(_ run: SQLRun) throws(EvdError) {
        if !self.sqlite.inTransaction {
            do {
                try self.connection.run(own: "BEGIN IMMEDIATE")
            } catch {
                throw run.failed(error, statement: "BEGIN IMMEDIATE", parameters: .array([]))
            }
        }
        do {
            try self.connection.run(own: "SAVEPOINT evd_member")
        } catch {
            throw run.failed(error, statement: "SAVEPOINT evd_member", parameters: .array([]))
        }
        self.memberOpen = true
    }

    /// The member is done and its `commit` allowed: its events are journaled inside the group's
    /// transaction and numbered, its savepoint released. Fails (the member is then rolled back)
    /// when its deferred foreign keys are violated: its own COMMIT would have failed so.
    func commitMember(_ run: SQLRun) throws(SQLiteError) -> Int64? {
        var pending: Int32 = 0
        var highest: Int32 = 0
        sqlite3_db_status(self.sqlite.handle, SQLITE_DBSTATUS_DEFERRED_FKS, &pending, &highest, 0)
        if pending > 0 {
            // SQLITE_CONSTRAINT_FOREIGNKEY, a macro Swift does not import.
            throw SQLiteError(code: SQLITE_CONSTRAINT | (3 << 8), message: "FOREIGN KEY constraint failed", sql: "COMMIT")
        }
        let commit = try self.connection.stageCommit(
            database: self.pool.database.name,
            origin: run.origin,
            bus: run.bus,
            journal: self.pool.journal,
            grouped: true
        )
        do throws(SQLiteError) {
            try self.connection.run(own: "RELEASE evd_member")
        } catch {
            self.connection.unstage(commit, bus: run.bus)
            throw error
        }
        self.memberOpen = false
        self.staged.append((self.running, run, commit))
        if commit.needsCapture {
            self.closed = true  // published from the capture after the COMMIT
        } else {
            self.connection.capture.discardAll()
        }
        return commit.reservation?.last
    }

    /// Rolls the running member back: to its savepoint, or, when SQLite ended the whole
    /// transaction (a trigger's `RAISE(ROLLBACK)`, an interrupted write, a full disk), with every
    /// member before it that was done: they get their `rollback`, and are run again alone.
    func rollbackMember() {
        self.connection.capture.discardAll()
        self.connection.schema.clear()  // the schema cookie goes back (see `SchemaCache`)
        if self.sqlite.inTransaction {
            if self.memberOpen { try? self.connection.run(own: "ROLLBACK TO evd_member") }
            if self.memberOpen { try? self.connection.run(own: "RELEASE evd_member") }
        } else {
            for member in self.staged {
                self.connection.unstage(member.commit, bus: member.run.bus)
                self.lost.insert(member.index)
                member.run.emitRollback()
            }
            self.staged.removeAll()
        }
        self.memberOpen = false
    }

    /// Ends the group's transaction when nothing of it is to be committed.
    private func endTransaction() {
        if self.sqlite.inTransaction { try? self.sqlite.exec("ROLLBACK") }
        self.connection.capture.discardAll()
        self.connection.schema.clear()
    }
}
