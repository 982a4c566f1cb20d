import EvdClient
import OrderedCollections

/// `begin`, `commit`, `rollback` and savepoints: a transaction the session keeps open across requests.
extension Session {
    func transactionProperties(_ transaction: Transaction) -> JSONObject {
        [
            "database": .string(transaction.pool.database.name),
            "connection": .integer(transaction.connection.number), "implicit": false,
        ]
    }

    /// `begin`: the session keeps one connection until `commit` or `rollback`.
    func begin(database: String?, _ state: inout SessionState) async throws {
        if let transaction = state.transaction {
            throw EvdError(
                .alreadyInTransaction,
                "the session is already in a transaction on '\(transaction.pool.database.name)'"
            )
        }
        let pool = try self.core.pool(database)
        let connection = try await self.checkout(pool)
        let options = self.effectiveOptions(state)
        let transaction = Transaction(pool: pool, connection: connection)
        do {
            try await self.vetoable(.begin, on: pool) { self.transactionProperties(transaction) }
            // A restricted actor's policy needs the schema for the transaction's first statement.
            try await pool.begin(
                connection,
                executionOptions: options,
                readSchema: !self.core.permissions.isUnrestricted(self.actor),
                attachments: state.attachments,
                policy: try self.attachmentPolicy(on: pool)
            )
        } catch {
            await self.checkin(connection, to: pool)
            throw self.keepingAttachments(after: error, &state)
        }
        state.transaction = transaction
    }

    /// `commit` or `rollback`: ends the transaction and gives the connection back. Returns the seq
    /// of the last event the commit published (nil: none).
    @discardableResult
    func end(commit: Bool, database: String?, _ state: inout SessionState) async throws -> Int64? {
        guard let transaction = state.transaction else {
            throw EvdError(.notInTransaction, "the session is not in a transaction (use begin first)")
        }
        try self.checkSameDatabase(database, transaction)
        let connection = transaction.connection
        var committed: Int64?
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
                committed = try await transaction.pool.commit(connection, origin: self.origin)
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
        return committed
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
        await transaction.pool.rollBack(connection)
        if let xid = transaction.xid {
            self.core.bus.emit(.rollbackTwophase, self.origin) {
                Self.twoPhaseProperties(transaction.pool, connection, xid: xid, isPrepared: false)
            }
        } else {
            self.core.bus.emit(.rollback, self.origin) { self.transactionProperties(transaction) }
        }
    }

    /// `savepoint`, `release_savepoint`, `rollback_savepoint` inside the open transaction.
    func savepoint(_ request: EvdOperation.Savepoint, _ state: inout SessionState) async throws {
        guard let transaction = state.transaction else {
            throw EvdError(.notInTransaction, "savepoints need a transaction (use begin first)")
        }
        let name = request.name
        guard !name.isEmpty else { throw EvdError.badRequest(field: "name", "'name' must not be empty") }
        let (step, kind): (ConnectionPool.SavepointStep, EventKind) =
            switch request.op {
            case .releaseSavepoint: (.release, .releaseSavepoint)
            case .rollbackSavepoint: (.rollbackTo, .rollbackSavepoint)
            default: (.savepoint, .savepoint)
            }
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
        try await transaction.pool.savepoint(step, name, on: transaction.connection)
        if kind != .savepoint { self.core.bus.emit(kind, self.origin, properties) }
    }
}
