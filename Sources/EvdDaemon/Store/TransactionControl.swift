import EvdClient
import Logging

/// The transaction statements a session sends across requests (`begin`, `commit`, `rollback`,
/// savepoints, the two phases), each run on its pooled connection on a database thread (inline when
/// the caller is one, `ConnectionPool.run`). The session decides when (its events and vetoes,
/// its permissions); what SQLite and the capture do is here.
extension ConnectionPool {
    /// Applies the execution options evd reads to `connection`: `query_only` (off when absent) and
    /// `busy_timeout_ms` (the pool's busy timeout when absent). On the connection's thread.
    func apply(_ executionOptions: JSONObject, to connection: PooledConnection) throws(SQLiteError) {
        try connection.apply(
            queryOnly: executionOptions["query_only"]?.boolValue ?? false,
            busyTimeoutMs: Int32(executionOptions["busy_timeout_ms"]?.intValue ?? Int64(self.defaultBusyTimeoutMs))
        )
    }

    /// Applies the session's execution options, attaches the session's `attachments` again
    /// (judged by `policy`; a `ReattachError` if they cannot be) and opens a deferred transaction.
    /// `readSchema`: reads the schema first, for a restricted actor's policy on the transaction's
    /// first statement, which must not read before it writes (`SQLRun.facts`).
    func begin(
        _ connection: PooledConnection,
        executionOptions: JSONObject,
        readSchema: Bool,
        attachments: [Attachment] = [],
        policy: SQLPolicy? = nil
    ) async throws {
        try await self.run {
            try self.apply(executionOptions, to: connection)
            try connection.reattach(attachments, policy: policy)
            if readSchema { _ = try? connection.schema.replacingTables(connection.sqlite) }
            try connection.run(own: "BEGIN")
        }
    }

    /// Commits the connection's transaction with its committed events (`PooledConnection.commit`);
    /// returns the last one's seq (nil: none was published).
    func commit(_ connection: PooledConnection, origin: EventOrigin) async throws -> Int64? {
        let (database, bus, journal) = (self.database.name, self.bus, self.journal)
        return try await self.run {
            try connection.commit(database: database, origin: origin, bus: bus, journal: journal)
            return connection.committedThrough
        }
    }

    /// Rolls the connection's transaction back, its captured changes and schema with it. Errors are
    /// ignored: a transaction SQLite ended already has nothing to roll back.
    func rollBack(_ connection: PooledConnection) async {
        try? await self.run {
            connection.capture.discardAll()
            connection.schema.clear()  // the schema cookie goes back (see `SchemaCache`)
            try connection.sqlite.exec("ROLLBACK")
        }
    }

    /// Whether the connection is still in a transaction. When SQLite ended it itself (RAISE(ROLLBACK),
    /// SQLITE_FULL), the schema read inside it is forgotten: the schema cookie went back.
    func isInTransaction(_ connection: PooledConnection) async -> Bool {
        (try? await self.run { () -> Bool in
            let open = connection.sqlite.inTransaction
            if !open { connection.schema.clear() }
            return open
        }) ?? false
    }

    /// A savepoint statement inside the connection's transaction, with the capture's matching step:
    /// the changes since a savepoint that is rolled back will never commit.
    enum SavepointStep: Sendable {
        case savepoint, release, rollbackTo
    }

    func savepoint(_ step: SavepointStep, _ name: String, on connection: PooledConnection) async throws {
        let quoted = SQLIdentifier.quote(name)
        try await self.run {
            switch step {
            case .savepoint:
                try connection.sqlite.exec("SAVEPOINT \(quoted)")
                connection.capture.savepoint(name)
            case .release:
                try connection.sqlite.exec("RELEASE SAVEPOINT \(quoted)")
                connection.capture.release(name)
            case .rollbackTo:
                try connection.sqlite.exec("ROLLBACK TO SAVEPOINT \(quoted)")
                connection.capture.rollback(to: name)
            }
        }
    }

    /// `begin_twophase`: applies the session's execution options, attaches the session's
    /// `attachments` again (as `begin`) and opens the transaction; returns the schema version at
    /// begin (prepare refuses a schema change).
    func beginTwoPhase(
        _ connection: PooledConnection,
        executionOptions: JSONObject,
        attachments: [Attachment] = [],
        policy: SQLPolicy? = nil
    ) async throws -> Int64 {
        let logged = !self.database.isInMemory
        return try await self.run {
            try self.apply(executionOptions, to: connection)
            try connection.reattach(attachments, policy: policy)
            return try connection.beginTwoPhase(logged: logged)
        }
    }

    /// `prepare_twophase`: checks the file is still the database's (a prepared transaction must be
    /// able to commit) and prepares (`PooledConnection.prepareTwoPhase`).
    func prepareTwoPhase(
        _ connection: PooledConnection,
        xid: String,
        origin: EventOrigin,
        schemaVersion: Int64,
        log: TwoPhaseLog?
    ) async throws -> PreparedRecord {
        let database = self.database.name
        return try await self.run {
            try connection.identity.check()
            return try connection.prepareTwoPhase(
                xid: xid,
                database: database,
                origin: origin,
                schemaVersion: schemaVersion,
                log: log
            )
        }
    }

    /// Commits or rolls back a prepared transaction. A commit writes the record's events, with the
    /// marker that says it committed, then forgets the log entry (a failure to forget is logged: the
    /// next start finds the marker and knows); a rollback forgets first (a crash after it rolls back
    /// all the same). Returns the seq of the last event the commit published (nil: none).
    func finishPrepared(
        _ connection: PooledConnection,
        _ record: PreparedRecord,
        commit: Bool,
        log: TwoPhaseLog,
        logger: Logger
    ) async throws -> Int64? {
        let (database, bus, journal) = (self.database.name, self.bus, self.journal)
        return try await self.run { () throws -> Int64? in
            if commit {
                try connection.commit(database: database, origin: record.origin, bus: bus, journal: journal, events: record.events)
                guard record.token != 0 else { return connection.committedThrough }
                do {
                    try log.remove(token: record.token)
                    connection.removeMarker(token: record.token)
                } catch {
                    logger.warning(
                        "a committed two-phase transaction stays in the log until the next start",
                        metadata: ["xid": "\(record.xid)", "error": "\(error)"]
                    )
                }
                return connection.committedThrough
            } else {
                if record.token != 0 { try log.remove(token: record.token) }
                try connection.sqlite.exec("ROLLBACK")
                connection.schema.clear()
                return nil
            }
        }
    }

    /// Forgets a prepared transaction evd could not prepare again after a restart.
    func forget(_ record: PreparedRecord, log: TwoPhaseLog) async throws {
        try await self.run { try log.remove(token: record.token) }
    }
}
