import EvdClient

/// The two-phase ops of PROTOCOL.md §3: `begin_twophase`, `prepare_twophase`, `commit_twophase`,
/// `rollback_twophase` and `recover` (how it works: Store/TwoPhase.swift).
extension Session {
    static func twoPhaseProperties(
        _ pool: ConnectionPool,
        _ connection: PooledConnection?,
        xid: String,
        isPrepared: Bool? = nil
    ) -> JSONObject {
        var properties: JSONObject = [
            "database": .string(pool.database.name), "connection": connection.map { .integer($0.number) } ?? .null,
            "xid": .string(xid),
        ]
        if let isPrepared { properties["is_prepared"] = .bool(isPrepared) }
        return properties
    }

    /// The two-phase ops: `begin_twophase`, `prepare_twophase`, `commit_twophase`, `rollback_twophase`.
    /// Returns the seq of the last event a commit published (nil: none, or not a commit).
    func twoPhase(_ request: EvdOperation.TwoPhase, _ state: inout SessionState) async throws -> Int64? {
        let (xid, database) = (request.xid, request.database)
        switch request.op {
        case .beginTwophase: try await self.beginTwoPhase(xid: xid, database: database, &state)
        case .prepareTwophase: try await self.prepareTwoPhase(xid: xid, database: database, &state)
        default: return try await self.decideTwoPhase(commit: request.op == .commitTwophase, xid: xid, database: database, &state)
        }
        return nil
    }

    /// `begin_twophase`: like `begin`, but the write lock is taken at once and every change is
    /// recorded whole, so that the transaction can be prepared.
    func beginTwoPhase(xid: String, database: String?, _ state: inout SessionState) async throws {
        if let transaction = state.transaction {
            throw EvdError(
                .alreadyInTransaction,
                "the session is already in a transaction on '\(transaction.pool.database.name)'"
            )
        }
        let pool = try self.core.pool(database)
        // The transaction takes the write lock at once and, prepared, keeps it until decided: only
        // an actor that may write somewhere in the database may begin one.
        guard
            [Action.insertRow, .updateRow, .deleteRow].contains(where: {
                self.core.permissions.allowsSomewhere(self.actor, $0, in: pool.database.name)
            })
        else {
            throw Permissions.denied(self.actor, .insertRow, on: Resource(database: pool.database.name))
        }
        try self.checkXidFree(xid, pool)
        let connection = try await self.checkout(pool)
        let options = self.effectiveOptions(state)
        let schemaVersion: Int64
        do {
            schemaVersion = try await pool.beginTwoPhase(
                connection,
                executionOptions: options,
                attachments: state.attachments,
                policy: try self.attachmentPolicy(on: pool)
            )
        } catch {
            await self.checkin(connection, to: pool)
            throw self.keepingAttachments(after: error, &state)
        }
        state.transaction = Transaction(pool: pool, connection: connection, xid: xid, schemaVersion: schemaVersion)
        self.core.bus.emit(.beginTwophase, self.origin) { Self.twoPhaseProperties(pool, connection, xid: xid) }
    }

    private func checkXidFree(_ xid: String, _ pool: ConnectionPool) throws(EvdError) {
        if self.core.twoPhase.isHeld(database: pool.database.name, xid: xid) {
            throw EvdError.badRequest(
                field: "xid",
                "'\(xid)' is prepared on '\(pool.database.name)' and awaits commit_twophase or rollback_twophase"
            )
        }
    }

    /// `prepare_twophase`: after its OK, only `commit_twophase`/`rollback_twophase` (from any session)
    /// decide the transaction, even across a crash. The session is then no longer in it.
    func prepareTwoPhase(xid: String, database: String?, _ state: inout SessionState) async throws {
        guard let transaction = state.transaction else {
            throw EvdError(.notInTransaction, "the session is not in a two-phase transaction (use begin_twophase first)")
        }
        try self.checkSameDatabase(database, transaction)
        guard let ownXid = transaction.xid else {
            throw EvdError.badRequest(field: "xid", "the session's transaction was begun with begin, not begin_twophase")
        }
        guard ownXid == xid else {
            throw EvdError.badRequest(field: "xid", "the session's two-phase transaction is '\(ownXid)', not '\(xid)'")
        }
        let pool = transaction.pool
        try self.checkXidFree(xid, pool)
        try await self.endIfLost(transaction, &state)
        let connection = transaction.connection
        let origin = self.origin
        let log = pool.database.isInMemory ? nil : self.core.twoPhase.log
        let schemaVersion = transaction.schemaVersion
        let record: PreparedRecord
        do {
            // A prepared transaction must be able to commit: not into a file deleted or replaced.
            record = try await pool.prepareTwoPhase(connection, xid: xid, origin: origin, schemaVersion: schemaVersion, log: log)
        } catch {
            try await self.endIfLost(transaction, &state)
            throw error
        }
        self.core.twoPhase.hold(.prepared(PreparedTransaction(pool: pool, connection: connection, record: record, recovered: false)))
        state.transaction = nil
        self.core.bus.emit(.prepareTwophase, origin) { Self.twoPhaseProperties(pool, connection, xid: xid) }
    }

    /// `commit_twophase` / `rollback_twophase`: of the session's own two-phase transaction that is
    /// not prepared (one phase, `is_prepared: false`), or of a prepared one, from any session.
    func decideTwoPhase(commit: Bool, xid: String, database: String?, _ state: inout SessionState) async throws -> Int64? {
        if let transaction = state.transaction, transaction.xid == xid,
            database == nil || database == transaction.pool.database.name
        {
            return try await self.end(commit: commit, database: database, &state)
        }
        let pool = try self.core.pool(database)
        guard let held = self.core.twoPhase.take(database: pool.database.name, xid: xid) else {
            throw EvdError.badRequest(field: "xid", "no transaction '\(xid)' is prepared on '\(pool.database.name)'")
        }
        guard self.mayDecide(preparedBy: held.record.origin.actor, on: pool) else {
            self.core.twoPhase.hold(held)
            throw Permissions.denied(self.actor, .admin, on: Resource(database: pool.database.name))
        }
        let log = self.core.twoPhase.log
        let record = held.record
        guard case .prepared(let prepared) = held else {
            guard !commit else {
                self.core.twoPhase.hold(held)
                let reason = if case .unrecoverable(_, let reason) = held { reason } else { "" }
                throw EvdError.badRequest(
                    field: "xid",
                    "'\(xid)' cannot be committed: evd could not prepare it again after a restart (\(reason)); roll it back"
                )
            }
            try await pool.forget(record, log: log)
            self.core.bus.emit(.rollbackTwophase, self.origin) { Self.twoPhaseProperties(pool, nil, xid: xid, isPrepared: true) }
            return nil
        }
        let connection = prepared.connection
        let logger = self.logger
        if commit {
            // The moment before the COMMIT, as `commit` (SQLAlchemy's `_commit_twophase_impl`): the
            // transaction's committed events follow it, also for one recovered after a restart.
            self.core.bus.emit(.commitTwophase, self.origin) {
                Self.twoPhaseProperties(pool, connection, xid: xid, isPrepared: true)
            }
        }
        let committed: Int64?
        do {
            committed = try await pool.finishPrepared(connection, record, commit: commit, log: log, logger: logger)
        } catch {
            // A COMMIT that failed and left the transaction open (an I/O error, say): still prepared.
            if await pool.isInTransaction(connection) {
                self.core.twoPhase.hold(held)
            } else {
                await prepared.release(origin: self.origin)
            }
            throw error
        }
        await prepared.release(origin: self.origin)
        if !commit {
            self.core.bus.emit(.rollbackTwophase, self.origin) {
                Self.twoPhaseProperties(pool, connection, xid: xid, isPrepared: true)
            }
        }
        return committed
    }

    /// `recover`: the xids prepared on a database and awaiting a decision that this session's
    /// actor may decide.
    func recoverTwoPhase(database: String?) throws -> JSONValue {
        let pool = try self.core.pool(database)
        let xids = self.core.twoPhase.awaiting(database: pool.database.name)
            .filter { self.mayDecide(preparedBy: $0.preparedBy, on: pool) }.map(\.xid)
        return ["xids": .array(xids.map(JSONValue.string))]
    }

    /// Whether this session's actor may commit or roll back a transaction `preparer` prepared: it
    /// is the same user, or holds `admin` on the database.
    private func mayDecide(preparedBy preparer: Actor?, on pool: ConnectionPool) -> Bool {
        if let preparer, preparer.uid == self.actor.uid { return true }
        return self.core.permissions.allows(self.actor, .admin, on: Resource(database: pool.database.name))
    }
}
