import OrderedCollections
import EvdClient

/// Connections and transactions for a session's SQL.
extension Session {
    /// Runs `work` on a connection for this request: the open transaction's, or one checked out
    /// for just this request (its own implicit transaction), with the session's options applied.
    func withSQL<T: Sendable>(
        database: String?, request: JSONObject, _ state: inout SessionState,
        _ work: @escaping @Sendable (SQLRun) throws -> T
    ) async throws -> T {
        let options = self.effectiveOptions(state)
        let queryOnly = options["query_only"]?.boolValue ?? false
        let origin = self.origin
        if let transaction = state.transaction {
            try self.checkSameDatabase(database, transaction)
            let run = SQLRun(
                bus: self.core.bus, pool: transaction.pool, connection: transaction.connection, origin: origin,
                request: request, executionOptions: options, implicitTransaction: false)
            let busyTimeout = Int32(options["busy_timeout_ms"]?.intValue ?? Int64(transaction.connection.busyTimeoutMs))
            return try await transaction.pool.run {
                try transaction.connection.apply(queryOnly: queryOnly, busyTimeoutMs: busyTimeout)
                return try work(run)
            }
        }
        let pool = try self.core.pool(database)
        let connection = try await self.checkout(pool)
        let run = SQLRun(
            bus: self.core.bus, pool: pool, connection: connection, origin: origin, request: request,
            executionOptions: options, implicitTransaction: true)
        let busyTimeout = Int32(options["busy_timeout_ms"]?.intValue ?? Int64(pool.defaultBusyTimeoutMs))
        do {
            let result = try await pool.run {
                try connection.apply(queryOnly: queryOnly, busyTimeoutMs: busyTimeout)
                return try work(run)
            }
            await self.checkin(connection, to: pool)
            return result
        } catch {
            await self.checkin(connection, to: pool)
            throw error
        }
    }

    /// Checks a connection out for this session: `checkout`, then `engine_connect`.
    private func checkout(_ pool: ConnectionPool) async throws -> PooledConnection {
        let origin = self.origin
        let connection = try await pool.checkout(origin: origin)
        pool.noteCheckedOut(connection.number, true)
        self.core.bus.emit(.engineConnect, origin) {
            ["database": .string(pool.database.name), "connection": .integer(connection.number), "branch": false]
        }
        return connection
    }

    private func checkin(_ connection: PooledConnection, to pool: ConnectionPool) async {
        pool.noteCheckedOut(connection.number, false)
        await pool.checkin(connection, origin: self.origin)
    }

    private func checkSameDatabase(_ database: String?, _ transaction: Transaction) throws(EvdError) {
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
        do {
            try await pool.run {
                try connection.apply(queryOnly: queryOnly, busyTimeoutMs: busyTimeout)
                try connection.sqlite.exec("BEGIN")
            }
        } catch {
            await self.checkin(connection, to: pool)
            throw error
        }
        let transaction = Transaction(pool: pool, connection: connection)
        state.transaction = transaction
        self.core.bus.emit(.begin, self.origin) { self.transactionProperties(transaction) }
    }

    /// `commit` or `rollback`: ends the transaction and gives the connection back.
    func end(commit: Bool, database: String?, _ state: inout SessionState) async throws {
        guard let transaction = state.transaction else {
            throw EvdError(.notInTransaction, "the session is not in a transaction (use begin first)")
        }
        try self.checkSameDatabase(database, transaction)
        let connection = transaction.connection
        if commit {
            self.core.bus.emit(.commit, self.origin) { self.transactionProperties(transaction) }
            do {
                try await transaction.pool.run { try connection.sqlite.exec("COMMIT") }
            } catch {
                // A failed COMMIT (busy, a deferred constraint) leaves the transaction open: the
                // client may retry or roll back. If SQLite ended it anyway, so do we.
                let stillOpen = (try? await transaction.pool.run { connection.sqlite.inTransaction }) ?? false
                if !stillOpen {
                    state.transaction = nil
                    await self.checkin(connection, to: transaction.pool)
                }
                throw error
            }
        } else {
            try? await transaction.pool.run { try connection.sqlite.exec("ROLLBACK") }
            self.core.bus.emit(.rollback, self.origin) { self.transactionProperties(transaction) }
        }
        state.transaction = nil
        await self.checkin(connection, to: transaction.pool)
    }

    /// `savepoint`, `release_savepoint`, `rollback_savepoint` inside the open transaction.
    func savepoint(_ op: String, name: String, _ state: inout SessionState) async throws {
        guard let transaction = state.transaction else {
            throw EvdError(.notInTransaction, "savepoints need a transaction (use begin first)")
        }
        guard !name.isEmpty else { throw EvdError.badRequest(field: "name", "'name' must not be empty") }
        let quoted = "\"" + name.split(separator: "\"", omittingEmptySubsequences: false).joined(separator: "\"\"") + "\""
        let sql: String
        let kind: EventKind
        switch op {
        case "savepoint": (sql, kind) = ("SAVEPOINT \(quoted)", .savepoint)
        case "release_savepoint": (sql, kind) = ("RELEASE SAVEPOINT \(quoted)", .releaseSavepoint)
        default: (sql, kind) = ("ROLLBACK TO SAVEPOINT \(quoted)", .rollbackSavepoint)
        }
        let connection = transaction.connection
        try await transaction.pool.run { try connection.sqlite.exec(sql) }
        self.core.bus.emit(kind, self.origin) {
            var properties = self.transactionProperties(transaction)
            properties.removeValue(forKey: "implicit")
            properties["name"] = .string(name)
            return properties
        }
    }
}
