import EvdClient
import OrderedCollections

/// Connections and transactions for a session's SQL.
extension Session {
    /// A SQL request, parsed: its database and what it runs there.
    struct SQLWork: Sendable {
        let database: String?
        let command: SQLCommand

        /// The SQL work of a parsed operation (`nil` for an op that runs no SQL).
        init?(_ operation: EvdOperation) {
            switch operation {
            case .execute(let execute):
                self.init(database: execute.database, command: .execute(SQLText(execute.sql), execute.params))
            case .executemany(let many):
                self.init(database: many.database, command: .executemany(SQLText(many.sql), many.parameterSets))
            case .structured(let op, let database):
                self.init(database: database, command: .structured(op))
            default:
                return nil
            }
        }

        init(database: String?, command: SQLCommand) {
            self.database = database
            self.command = command
        }
    }

    /// The daemon's veto budget for one operation.
    var vetoBudget: Duration { .milliseconds(self.core.configuration.vetoBudgetMs) }

    /// Asks the veto listeners of `kind` from async code (or just emits it); throws `vetoed` on an
    /// enforced deny.
    @discardableResult
    func vetoable(_ kind: EventKind, on pool: ConnectionPool, _ properties: () -> JSONObject) async throws -> VetoVerdict? {
        let verdict = await self.core.bus.decide(
            kind,
            self.origin,
            budget: self.vetoBudget,
            eventLoop: pool.eventLoop,
            properties
        )
        if let verdict, verdict.denied { throw verdict.vetoedError(event: kind.name) }
        return verdict
    }

    /// Runs a SQL request on a connection: the open transaction's, or one checked out for just this
    /// request (its own implicit transaction), with the session's options applied. Every argument
    /// was checked (`EvdOperation`); the actions the op needs are checked first, then (as SQLite
    /// prepares each statement) each statement's actions on each table.
    ///
    /// `before_execute` is decided first, before any connection is checked out: a veto needs none,
    /// and a slow or silent listener must not hold one of the pool's while it thinks (every pending
    /// veto would otherwise hold a connection, and a stopped listener would starve the pool). A
    /// listener may deny the request — then no connection is checked out at all — or rewrite it,
    /// in which case it is parsed again and the rewritten request is what runs. Plain subscribers
    /// get `before_execute` once the connection is the session's, as in SQLAlchemy (`checkout`,
    /// `engine_connect`, `before_execute`); a denied request's comes without them.
    func runSQL(_ parsed: SQLWork, request: Request, _ state: inout SessionState) async throws -> Outcome {
        var policy = try self.authorize(parsed, inTransactionOn: state.transaction?.pool.database.name)
        var work = parsed
        let options = self.effectiveOptions(state)
        let origin = self.origin
        let transaction = state.transaction
        if let transaction {
            try self.checkSameDatabase(work.database, transaction)
            try await self.endIfLost(transaction, &state)
        }
        let pool = try transaction?.pool ?? self.core.pool(work.database)
        let decided = await self.core.bus.decideAhead(
            .beforeExecute,
            origin,
            budget: self.vetoBudget,
            eventLoop: pool.eventLoop
        ) {
            // Made only for a listener or a subscriber: an insert's rows become JSON values here.
            var properties: JSONObject = ["database": .string(pool.database.name), "request": .object(request.whole)]
            if !options.isEmpty { properties["execution_options"] = .object(options) }
            return properties
        }
        let verdict = decided.verdict
        if let verdict, verdict.denied {
            decided.publish()
            throw verdict.vetoedError(event: EventKind.beforeExecute.name)
        }
        var finalRequest = request
        var rewriters: [SQLPolicy] = []
        if let rewritten = verdict?.properties["request"]?.objectValue, rewritten != request.whole {
            do {
                finalRequest = Request(rewritten)
                finalRequest.object["op"] = request["op"] ?? .null  // a listener rewrites the request, not the op
                guard let rewrittenWork = SQLWork(try EvdOperation(parsing: finalRequest)) else {
                    throw EvdError(.vetoed, "a before_execute listener rewrote the request into another op")
                }
                work = rewrittenWork
                if let database = work.database, database != pool.database.name {
                    throw EvdError(.vetoed, "a before_execute listener moved the request to another database")
                }
                // The rewritten request is the requester's, checked as the first was; and it must
                // stay within what each listener that rewrote it may see.
                policy = try self.authorize(work, inTransactionOn: pool.database.name)
                rewriters = (verdict?.modifiers ?? []).map { SQLPolicy(rewriter: $0, database: pool.database.name) }
                for rewriter in rewriters where !rewriter.allows(.viewTable, table: work.command.table) {
                    throw rewriter.refused(.viewTable, table: work.command.table)
                }
            } catch {
                // Refused before any connection is checked out, as a deny is.
                decided.publish()
                throw error
            }
        }
        let sql = SQLRequest(
            command: work.command,
            request: finalRequest,
            origin: origin,
            executionOptions: options,
            vetoBudget: self.vetoBudget,
            policy: policy,
            rewriters: rewriters,
            statementLimitMs: self.core.configuration.maxStatementMs,
            attachments: state.attachments
        )
        let outcome: SQLOutcome
        do {
            outcome = try await pool.execute(sql, on: transaction?.connection, announcing: decided) { watch in
                self.runningWatch.withLock { $0 = watch }
            }
        } catch {
            guard let transaction else { throw self.keepingAttachments(after: error, &state) }
            throw await self.endIfRolledBackBySQLite(transaction, error, &state)
        }
        if let attachments = outcome.attachments, state.transaction?.adoptsAttachments ?? true {
            state.attachments = attachments
        }
        return .result(outcome.result, seq: outcome.seq)
    }

    /// The policy the session's attachments are judged by when a transaction on `pool` attaches
    /// them again (`nil`: the actor holds everything), as the request's SQL would be.
    func attachmentPolicy(on pool: ConnectionPool) throws(EvdError) -> SQLPolicy? {
        try self.core.permissions.authorizeSQL(self.actor, [], on: Resource(database: pool.database.name))
    }

    /// The error a request fails with after `error`: when the session's attachments could not be
    /// attached again (`ReattachError`), the session keeps those it says, and fails with its error.
    func keepingAttachments(after error: any Error, _ state: inout SessionState) -> any Error {
        guard let failure = error as? ReattachError else { return error }
        state.attachments = failure.kept
        return failure.error
    }

    /// After a request of the session's transaction failed: if SQLite rolled the whole transaction
    /// back itself (RAISE(ROLLBACK) in a trigger, SQLITE_FULL, a COMMIT that could not be written),
    /// the transaction is over — its later requests must not autocommit on a connection the client
    /// believes is still in a transaction. Then this fires `rollback` (`rollback_twophase`), forgets
    /// the schema read inside it (the schema cookie went back, see `SchemaCache`), gives the
    /// connection back, and returns the error saying so, so that the client neither retries nor
    /// rolls back. Otherwise it returns `error` as it is: the transaction stays open.
    func endIfRolledBackBySQLite(_ transaction: Transaction, _ error: any Error, _ state: inout SessionState) async -> any Error {
        let connection = transaction.connection
        guard !(await transaction.pool.isInTransaction(connection)) else { return error }
        state.transaction = nil
        if let xid = transaction.xid {
            self.core.bus.emit(.rollbackTwophase, self.origin) {
                Self.twoPhaseProperties(transaction.pool, connection, xid: xid, isPrepared: false)
            }
        } else {
            self.core.bus.emit(.rollback, self.origin) { self.transactionProperties(transaction) }
        }
        await self.checkin(connection, to: transaction.pool)
        var ended = Self.wireError(error)
        ended.message += " (SQLite rolled the transaction back: the session is no longer in a transaction)"
        return ended
    }

    /// Checks a connection out for this session: `checkout`, then `engine_connect`.
    func checkout(_ pool: ConnectionPool, verifyFile: Bool = true) async throws -> PooledConnection {
        try await pool.connect(origin: self.origin, verifyFile: verifyFile)
    }

    func checkin(_ connection: PooledConnection, to pool: ConnectionPool) async {
        await pool.checkin(connection, origin: self.origin)
    }

    func checkSameDatabase(_ database: String?, _ transaction: Transaction) throws(EvdError) {
        if let database, database != transaction.pool.database.name {
            if self.core.pools[database] == nil { _ = try self.core.pool(database) }
            throw EvdError.badRequest(
                field: "database",
                "the session's transaction is on '\(transaction.pool.database.name)'; commit or roll back before using '\(database)'"
            )
        }
    }
}
