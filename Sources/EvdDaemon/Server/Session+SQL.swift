import OrderedCollections
import EvdClient

/// Connections and transactions for a session's SQL.
extension Session {
    /// A parsed `execute`/`executemany`: its database and the work to run on a connection.
    struct SQLWork: Sendable {
        let database: String?
        /// The table a structured op is about (`nil` for raw SQL).
        let table: String?
        /// What the op needs on its database (and table) before it runs; raw SQL's statements are
        /// then checked table by table as SQLite compiles them.
        let actions: [Action]
        let run: @Sendable (SQLRun) throws -> JSONValue
    }

    /// The daemon's veto budget for one operation.
    var vetoBudget: Duration { .milliseconds(self.core.configuration.vetoBudgetMs) }

    /// Asks the veto listeners of `kind` from async code (or just emits it); throws `vetoed` on an
    /// enforced deny.
    @discardableResult
    func vetoable(_ kind: EventKind, on pool: ConnectionPool, _ properties: () -> JSONObject) async throws -> VetoVerdict? {
        let verdict = await self.core.bus.decide(
            kind, self.origin, budget: self.vetoBudget, eventLoop: pool.eventLoop, properties)
        if let verdict, verdict.denied { throw verdict.vetoedError(event: kind.name) }
        return verdict
    }

    /// Runs a SQL request on a connection: the open transaction's, or one checked out for just this
    /// request (its own implicit transaction), with the session's options applied.
    ///
    /// `before_execute` is decided first, before any connection is checked out: a veto needs none,
    /// and a slow or silent listener must not hold one of the pool's while it thinks (every pending
    /// veto would otherwise hold a connection, and a stopped listener would starve the pool). A
    /// listener may deny the request — then no connection is checked out at all — or rewrite it,
    /// in which case it is parsed again with `parse` and the rewritten request is what runs. Plain
    /// subscribers get `before_execute` once the connection is the session's, as in SQLAlchemy
    /// (`checkout`, `engine_connect`, `before_execute`); a denied request's comes without them.
    func withSQL(
        request: Request, _ state: inout SessionState, parse: (Request) throws -> SQLWork
    ) async throws -> JSONValue {
        var work = try parse(request)
        let options = self.effectiveOptions(state)
        let queryOnly = options["query_only"]?.boolValue ?? false
        let origin = self.origin
        let transaction = state.transaction
        if let transaction {
            try self.checkSameDatabase(work.database, transaction)
            try await self.endIfLost(transaction, &state)
        }
        let pool = try transaction?.pool ?? self.core.pool(work.database)
        let decided = await self.core.bus.decideAhead(
            .beforeExecute, origin, budget: self.vetoBudget, eventLoop: pool.eventLoop
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
        let connection: PooledConnection
        if let transaction {
            connection = transaction.connection
        } else {
            do {
                // Its own transaction: the file is checked at its COMMIT (`DatabaseIdentity`).
                connection = try await self.checkout(pool, verifyFile: false)
            } catch {
                // The listeners were asked: what they decided still reaches the audit log.
                if verdict != nil { decided.publish() }
                throw error
            }
        }
        decided.publish()
        let busyTimeout = Int32(options["busy_timeout_ms"]?.intValue ?? Int64(pool.defaultBusyTimeoutMs))
        do {
            var finalRequest = request
            var rewriters: [SQLPolicy] = []
            if let rewritten = verdict?.properties["request"]?.objectValue, rewritten != request.whole {
                finalRequest = Request(rewritten)
                finalRequest.object["op"] = request["op"] ?? .null  // a listener rewrites the request, not the op
                work = try parse(finalRequest)
                if let database = work.database, database != pool.database.name {
                    throw EvdError(.vetoed, "a before_execute listener moved the request to another database")
                }
                // The rewritten request is the requester's, checked as the first was; and it must
                // stay within what each listener that rewrote it may see.
                try self.require(work)
                rewriters = (verdict?.modifiers ?? []).map { SQLPolicy(rewriter: $0, database: pool.database.name) }
                for rewriter in rewriters where !rewriter.allows(.viewTable, table: work.table) {
                    throw rewriter.refused(.viewTable, table: work.table)
                }
            }
            let actor = self.actor
            let permissions = self.core.permissions
            let run = SQLRun(
                bus: self.core.bus, pool: pool, connection: connection, origin: origin, request: finalRequest,
                executionOptions: options, implicitTransaction: transaction == nil, vetoBudget: self.vetoBudget,
                policy: permissions.isUnrestricted(actor)
                    ? nil : SQLPolicy(actor: actor, permissions: permissions, database: pool.database.name),
                rewriters: rewriters, statementLimitMs: self.core.configuration.maxStatementMs)
            let body = work.run
            // While it runs, a disconnect interrupts the statement (`run(channel:)`).
            self.runningWatch.withLock { $0 = connection.watch }
            defer { self.runningWatch.withLock { $0 = nil } }
            let result = try await pool.run {
                try connection.apply(queryOnly: queryOnly, busyTimeoutMs: busyTimeout)
                return try body(run)
            }
            if transaction == nil { await self.checkin(connection, to: pool) }
            return result
        } catch {
            guard let transaction else {
                await self.checkin(connection, to: pool)
                throw error
            }
            throw await self.endIfRolledBackBySQLite(transaction, error, &state)
        }
    }

    /// After a request of the session's transaction failed: if SQLite rolled the whole transaction
    /// back itself (RAISE(ROLLBACK) in a trigger, SQLITE_FULL, a COMMIT that could not be written),
    /// the transaction is over — its later requests must not autocommit on a connection the client
    /// believes is still in a transaction. Then this fires `rollback` (`rollback_twophase`), forgets
    /// the schema read inside it (the schema cookie went back, see `SchemaCache`), gives the
    /// connection back, and returns the error saying so, so that the client neither retries nor
    /// rolls back. Otherwise it returns `error` as it is: the transaction stays open.
    private func endIfRolledBackBySQLite(_ transaction: Transaction, _ error: any Error, _ state: inout SessionState) async -> any Error {
        let connection = transaction.connection
        let stillOpen = (try? await transaction.pool.run { () -> Bool in
            let open = connection.sqlite.inTransaction
            if !open { connection.schema.clear() }
            return open
        }) ?? false
        guard !stillOpen else { return error }
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
        let origin = self.origin
        let connection = try await pool.checkout(origin: origin, verifyFile: verifyFile)
        self.core.bus.emit(.engineConnect, origin) {
            ["database": .string(pool.database.name), "connection": .integer(connection.number), "branch": false]
        }
        return connection
    }

    func checkin(_ connection: PooledConnection, to pool: ConnectionPool) async {
        await pool.checkin(connection, origin: self.origin)
    }

    func checkSameDatabase(_ database: String?, _ transaction: Transaction) throws(EvdError) {
        if let database, database != transaction.pool.database.name {
            if self.core.pools[database] == nil { _ = try self.core.pool(database) }
            throw EvdError.badRequest(
                field: "database",
                "the session's transaction is on '\(transaction.pool.database.name)'; commit or roll back before using '\(database)'")
        }
    }

    private func transactionProperties(_ transaction: Transaction) -> JSONObject {
        [
            "database": .string(transaction.pool.database.name),
            "connection": .integer(transaction.connection.number), "implicit": false,
        ]
    }

    /// `begin`: the session keeps one connection until `commit` or `rollback`.
    func begin(database: String?, _ state: inout SessionState) async throws {
        if let transaction = state.transaction {
            throw EvdError(
                .alreadyInTransaction, "the session is already in a transaction on '\(transaction.pool.database.name)'")
        }
        let pool = try self.core.pool(database)
        let connection = try await self.checkout(pool)
        let options = self.effectiveOptions(state)
        let queryOnly = options["query_only"]?.boolValue ?? false
        let busyTimeout = Int32(options["busy_timeout_ms"]?.intValue ?? Int64(pool.defaultBusyTimeoutMs))
        let transaction = Transaction(pool: pool, connection: connection)
        do {
            try await self.vetoable(.begin, on: pool) { self.transactionProperties(transaction) }
            let restricted = !self.core.permissions.isUnrestricted(self.actor)
            try await pool.run {
                try connection.apply(queryOnly: queryOnly, busyTimeoutMs: busyTimeout)
                // The policy's view of the schema for the transaction's first statement, which
                // must not read before it writes (`SQLRun.facts`): read now, outside it.
                if restricted { _ = try? connection.schema.replacingTables(connection.sqlite) }
                try connection.run(own: "BEGIN")
            }
        } catch {
            await self.checkin(connection, to: pool)
            throw error
        }
        state.transaction = transaction
    }

    /// `commit` or `rollback`: ends the transaction and gives the connection back.
    func end(commit: Bool, database: String?, _ state: inout SessionState) async throws {
        guard let transaction = state.transaction else {
            throw EvdError(.notInTransaction, "the session is not in a transaction (use begin first)")
        }
        try self.checkSameDatabase(database, transaction)
        let connection = transaction.connection
        if commit {
            try await self.endIfLost(transaction, &state)
            do {
                // A two-phase transaction committed in one phase fires `commit_twophase` instead.
                if transaction.xid == nil {
                    try await self.vetoable(.commit, on: transaction.pool) { self.transactionProperties(transaction) }
                }
            } catch {
                // A denied commit rolls the transaction back: nothing becomes visible.
                await self.rollBack(transaction)
                state.transaction = nil
                await self.checkin(connection, to: transaction.pool)
                throw error
            }
            // Like `commit`, `commit_twophase` is the moment before the COMMIT (SQLAlchemy's
            // `_commit_twophase_impl`): the committed events follow it.
            if let xid = transaction.xid {
                self.core.bus.emit(.commitTwophase, self.origin) {
                    Self.twoPhaseProperties(transaction.pool, transaction.connection, xid: xid, isPrepared: false)
                }
            }
            do {
                let pool = transaction.pool
                let origin = self.origin
                try await pool.run {
                    try connection.commit(database: pool.database.name, origin: origin, bus: pool.bus, journal: pool.journal)
                }
            } catch {
                // Nothing commits into a file deleted or replaced under evd: the transaction is over.
                try await self.endIfLost(transaction, &state)
                // A failed COMMIT (busy, a deferred constraint) leaves the transaction open: the
                // client may retry or roll back. If SQLite ended it anyway (SQLITE_FULL: the disk
                // filled up while the COMMIT wrote), so do we, as for any request.
                throw await self.endIfRolledBackBySQLite(transaction, error, &state)
            }
        } else {
            await self.rollBack(transaction)
        }
        state.transaction = nil
        await self.checkin(connection, to: transaction.pool)
    }

    /// If the transaction's database was found lost (its file deleted or replaced under evd,
    /// `DatabaseIdentity`): rolls the transaction back, gives its connection back (closed, not
    /// pooled) and throws the database's error. The session is then no longer in a transaction.
    func endIfLost(_ transaction: Transaction, _ state: inout SessionState) async throws(EvdError) {
        let identity = transaction.pool.identity
        guard identity.isLost else { return }
        await self.rollBack(transaction)
        state.transaction = nil
        await self.checkin(transaction.connection, to: transaction.pool)
        var error = identity.lostError.evdError
        error.message += " (the transaction was rolled back: the session is no longer in a transaction)"
        throw error
    }

    /// Rolls the session's transaction back (its captured changes with it) and fires `rollback`
    /// (`rollback_twophase` for a two-phase one).
    func rollBack(_ transaction: Transaction) async {
        let connection = transaction.connection
        try? await transaction.pool.run {
            connection.capture.discardAll()
            connection.schema.clear()  // the schema cookie goes back (see `SchemaCache`)
            try connection.sqlite.exec("ROLLBACK")
        }
        if let xid = transaction.xid {
            self.core.bus.emit(.rollbackTwophase, self.origin) {
                Self.twoPhaseProperties(transaction.pool, connection, xid: xid, isPrepared: false)
            }
        } else {
            self.core.bus.emit(.rollback, self.origin) { self.transactionProperties(transaction) }
        }
    }

    /// `savepoint`, `release_savepoint`, `rollback_savepoint` inside the open transaction.
    func savepoint(_ op: String, name: String, _ state: inout SessionState) async throws {
        guard let transaction = state.transaction else {
            throw EvdError(.notInTransaction, "savepoints need a transaction (use begin first)")
        }
        guard !name.isEmpty else { throw EvdError.badRequest(field: "name", "'name' must not be empty") }
        let quoted = SQLIdentifier.quote(name)
        let sql: String
        let kind: EventKind
        switch op {
        case "savepoint": (sql, kind) = ("SAVEPOINT \(quoted)", .savepoint)
        case "release_savepoint": (sql, kind) = ("RELEASE SAVEPOINT \(quoted)", .releaseSavepoint)
        default: (sql, kind) = ("ROLLBACK TO SAVEPOINT \(quoted)", .rollbackSavepoint)
        }
        let connection = transaction.connection
        func properties() -> JSONObject {
            var properties = self.transactionProperties(transaction)
            properties.removeValue(forKey: "implicit")
            properties["name"] = .string(name)
            return properties
        }
        if kind == .savepoint {
            // SQLAlchemy's savepoint event comes before the SAVEPOINT; a deny means there is none.
            try await self.vetoable(.savepoint, on: transaction.pool, properties)
        }
        try await transaction.pool.run {
            try connection.sqlite.exec(sql)
            // The changes since a savepoint that is rolled back will never commit.
            switch kind {
            case .savepoint: connection.capture.savepoint(name)
            case .releaseSavepoint: connection.capture.release(name)
            default: connection.capture.rollback(to: name)
            }
        }
        if kind != .savepoint { self.core.bus.emit(kind, self.origin, properties) }
    }
}
