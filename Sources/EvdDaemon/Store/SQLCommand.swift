import EvdClient

/// What a SQL request asks Store to run: a client's SQL or a structured op, as a value. The
/// session parses it (`Operation`), checks its permissions, decides `before_execute`, and hands it
/// to `SQLRun.run` with the connection it checked out: no code of a higher layer runs inside
/// Store's work.
enum SQLCommand: Sendable {
    /// `execute`: a statement or a script, with its parameters.
    case execute(SQLText, SQLParameters)
    /// `executemany`: one statement, once per parameter set.
    case executemany(SQLText, [SQLParameters])
    /// `create_table`, `insert`, `upsert`, `update`, `delete`, `drop_table`, `describe`.
    case structured(StructuredOp)

    /// The table a structured op is about (`nil` for raw SQL, whose statements are checked table by
    /// table as SQLite compiles them).
    var table: String? {
        if case .structured(let op) = self { return op.table }
        return nil
    }
}

/// A SQL request as a session hands it to Store: what to run, for whom, under which settings. Every
/// argument and permission the session could check is checked; what is left is checked as SQLite
/// prepares each statement (`policy`, `rewriters`).
struct SQLRequest: Sendable {
    let command: SQLCommand
    /// The client's request (as `before_execute` listeners left it), for `after_execute`.
    let request: EvdRequest
    let origin: EventOrigin
    /// The engine's execution options overlaid with the session's.
    let executionOptions: JSONObject
    /// The most one operation's vetoes may take in all (`--veto-budget-ms`).
    let vetoBudget: Duration
    /// The session's actor, checked table by table as its SQL is prepared (`nil`: holds everything).
    let policy: SQLPolicy?
    /// The `before_execute` listeners that rewrote the request: its SQL stays within what each may see.
    let rewriters: [SQLPolicy]
    /// How long one client statement may run before it is interrupted (0: no limit).
    let statementLimitMs: Int
    /// The session's attachments: attached again on a connection checked out for just this request.
    var attachments: [Attachment] = []
}

/// What a SQL request left: its result, and the session's attachments when it may have changed
/// them (`nil`: as they were).
struct SQLOutcome: Sendable {
    let result: JSONValue
    let attachments: [Attachment]?
    /// The last event its own transaction committed (nil: none, or it ran in the session's).
    let seq: Int64?
}

extension ConnectionPool {
    /// Checks a connection out for a session: `checkout`, then `engine_connect`.
    func connect(origin: EventOrigin, verifyFile: Bool = true) async throws -> PooledConnection {
        let connection = try await self.checkout(origin: origin, verifyFile: verifyFile)
        self.announceEngineConnect(connection, origin: origin)
        return connection
    }

    /// `engine_connect`: a session's use of a checked-out connection begins.
    func announceEngineConnect(_ connection: PooledConnection, origin: EventOrigin) {
        self.bus.emit(.engineConnect, origin) {
            ["database": .string(self.database.name), "connection": .integer(connection.number), "branch": false]
        }
    }

    /// Whether `sql`, a request that is its own transaction, runs in a commit group
    /// (`CommitGroups`, which says why these): one write statement or a structured write that
    /// changes no schema, no attachments, no `group_commit: false` option, and no veto listener
    /// but `before_execute`'s.
    func groups(_ sql: SQLRequest) -> Bool {
        guard sql.attachments.isEmpty, sql.executionOptions["group_commit"]?.boolValue != false,
            !self.bus.vetoesAny(except: .beforeExecute)
        else { return false }
        switch sql.command {
        case .execute(let text, _), .executemany(let text, _):
            return text.isOneWrite
        case .structured(.insert(_, _, _, _, let alter, _)), .structured(.upsert(_, _, let alter, _)),
            .structured(.update(_, _, _, let alter, _)):
            return !alter
        case .structured(.delete):
            return true
        case .structured:
            return false
        }
    }

    /// Attaches a session's `attachments` again on `connection`, just checked out for it
    /// (`PooledConnection.reattach`); when they cannot be, gives the connection back and throws
    /// the `ReattachError`.
    func reattach(
        _ attachments: [Attachment],
        on connection: PooledConnection,
        policy: SQLPolicy?,
        origin: EventOrigin
    ) async throws {
        guard !attachments.isEmpty else { return }
        do {
            try await self.run { try connection.reattach(attachments, policy: policy) }
        } catch {
            await self.checkin(connection, origin: origin)
            throw error
        }
    }

    /// Runs a SQL request on `connection` (the session's open transaction's), or, when it is nil, on
    /// one checked out for just this request (its own implicit transaction, given back after it),
    /// with the session's attachments attached again first (a `ReattachError` when they cannot be).
    /// After a request that left state on its connection (an ATTACH or a DETACH among it), the
    /// outcome carries the connection's attachments, read before it is given back.
    ///
    /// `before_execute` was decided by the session before any connection was needed; plain
    /// subscribers get it (`decided.publish()`) once the connection is the session's, as in
    /// SQLAlchemy (`checkout`, `engine_connect`, `before_execute`). `watching` is told the
    /// statement watch of the connection while the request runs, and nil after (a disconnect
    /// interrupts the statement).
    func execute(
        _ sql: SQLRequest,
        on connection: PooledConnection?,
        announcing decided: EventBus.DecidedAhead,
        grouping: Bool = true,
        watching: @escaping @Sendable (StatementWatch?) -> Void
    ) async throws -> SQLOutcome {
        if connection == nil, grouping, self.groups(sql) {
            return try await self.commitGroups.submit(sql, on: self, announcing: decided, watching: watching)
        }
        let implicit = connection == nil
        let connection = try await {
            if let connection { return connection }
            // Its own transaction: the file is checked at its COMMIT (`DatabaseIdentity`).
            let checkedOut: PooledConnection
            do {
                checkedOut = try await self.connect(origin: sql.origin, verifyFile: false)
                try await self.reattach(sql.attachments, on: checkedOut, policy: sql.policy, origin: sql.origin)
            } catch {
                // The listeners were asked: what they decided still reaches the audit log.
                if decided.verdict != nil { decided.publish() }
                throw error
            }
            return checkedOut
        }()
        decided.publish()
        let run = SQLRun(
            bus: self.bus,
            pool: self,
            connection: connection,
            origin: sql.origin,
            request: sql.request,
            executionOptions: sql.executionOptions,
            implicitTransaction: implicit,
            vetoBudget: sql.vetoBudget,
            policy: sql.policy,
            rewriters: sql.rewriters,
            statementLimitMs: sql.statementLimitMs
        )
        watching(connection.watch)
        defer { watching(nil) }
        do {
            let outcome = try await run.run(sql.command)
            if implicit { await self.checkin(connection, origin: sql.origin) }
            return outcome
        } catch {
            if implicit { await self.checkin(connection, origin: sql.origin) }
            throw error
        }
    }
}

extension SQLRun {
    /// Runs `command` on the run's connection, on a database thread (inline when the caller is
    /// one), with the run's execution options applied first (`ConnectionPool.apply`); returns the
    /// result, and the connection's attachments if the session's SQL left state on it (it may
    /// have attached or detached a database).
    func run(_ command: SQLCommand) async throws -> SQLOutcome {
        let (pool, connection, options) = (self.pool, self.connection, self.executionOptions)
        return try await pool.run {
            try pool.apply(options, to: connection)
            let result = try self.perform(command)
            // The request succeeded (committed, if it was its own transaction): what it attached
            // is the session's now. (Should the list not read, the session keeps the one it had.)
            let attachments = connection.observer.leftSessionState ? try? connection.attachedDatabases() : nil
            return SQLOutcome(
                result: result,
                attachments: attachments,
                // (Its own transaction's COMMIT set it: `PooledConnection.commit`.)
                seq: self.implicitTransaction ? connection.committedThrough : nil
            )
        }
    }

    /// Runs `command` on the run's connection, on the calling thread.
    func perform(_ command: SQLCommand) throws(EvdError) -> JSONValue {
        switch command {
        case .execute(let sql, let parameters):
            return try self.execute(sql: sql, parameters: parameters).jsonValue
        case .executemany(let sql, let parameterSets):
            return ["changes": .int(try self.executemany(sql: sql, parameterSets: parameterSets))]
        case .structured(let op):
            return try self.perform(op)
        }
    }
}
