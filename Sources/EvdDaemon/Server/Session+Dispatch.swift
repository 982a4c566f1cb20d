import EvdClient

/// The ops of PROTOCOL.md §3: a request parsed once (`EvdOperation`), then its permission, then its
/// handler. Each handler lives with its concern: `Session+SQL` (SQL and structured ops),
/// `Session+Transactions`, `Session+TwoPhase`, `Session+Subscriptions`, `Session+Emit`,
/// `Session+Tokens`, `Session+Admin`.
extension Session {
    func dispatch(_ request: Request, _ state: inout SessionState) async throws -> Outcome {
        // An expired token refuses every op but a few, known or not, before its arguments are read.
        try self.checkTokenExpiry(try EvdOperation.name(of: request.object))
        let operation = try EvdOperation(parsing: request)
        switch operation {
        case .ping:
            return .result([:])
        case .events:
            return .result(self.catalog())
        case .stats:
            try self.require(.admin)
            return .result(self.core.statistics())
        case .subscribe(let subscribe):
            return try await self.subscribe(subscribe, id: request["id"] ?? .null)
        case .unsubscribe(let subscription):
            try self.require(.subscribe)
            try self.unsubscribe(subscription)
            return .result([:])
        case .ack:
            // `SessionHandler` answers an `ack` as it arrives (`handleAck`): none reaches here.
            assertionFailure("an ack reached the executor")
            throw EvdError.badRequest(field: "op", "an ack is handled as it arrives, never queued")
        case .deleteCursor(let cursor):
            return .result(try await self.deleteCursor(cursor))
        case .wait(let seq, let timeoutMs):
            try await self.waitForDelivery(through: seq, timeoutMs: timeoutMs)
            return .result([:])
        case .execute, .executemany, .structured:
            return try await self.runSQL(SQLWork(operation)!, request: request, &state)
        case .begin(let database):
            try self.requireSQL(on: database)
            try await self.begin(database: database, &state)
            return .result([:])
        case .commit(let database):
            try self.requireSQL(on: database ?? state.transaction?.pool.database.name)
            let seq = try await self.end(commit: true, database: database, &state)
            return .result([:], seq: seq)
        case .rollback(let database):
            try self.requireSQL(on: database ?? state.transaction?.pool.database.name)
            try await self.end(commit: false, database: database, &state)
            return .result([:])
        case .savepoint(let savepoint):
            try self.requireSQL(on: state.transaction?.pool.database.name)
            try await self.savepoint(savepoint, &state)
            return .result([:])
        case .twoPhase(let twoPhase):
            try self.requireSQL(on: twoPhase.database ?? state.transaction?.pool.database.name)
            return .result([:], seq: try await self.twoPhase(twoPhase, &state))
        case .recover(let database):
            try self.requireSQL(on: database)
            return .result(try self.recoverTwoPhase(database: database))
        case .executionOptions(let options):
            return .result(try self.executionOptions(options, &state))
        case .emit(let emit):
            // (The executor runs emits in groups, `executeEmits`; this is the same for one.)
            let seq = try await self.publishEmits([try self.checkEmit(emit)])[0]
            return .result(["seq": .int(seq)], seq: seq)
        case .login(let token):
            let (actor, seq) = try await self.login(token: token)
            state.clearAttachments()
            return .result(actor, seq: seq)
        case .logout:
            let seq = await self.logout()
            state.clearAttachments()
            return .result([:], seq: seq)
        case .createToken(let request):
            let (token, seq) = try await self.createToken(request)
            return .result(token, seq: seq)
        case .invalidate(let invalidate):
            try self.require(.admin)
            return .result(try await self.invalidate(invalidate))
        case .dispose(let database):
            try self.require(.admin)
            try await self.core.pool(database).dispose(origin: self.origin)
            return .result([:])
        case .reply:
            // `SessionHandler` answers a `reply` on the event loop (`handleReply`): none reaches here.
            assertionFailure("a reply reached the executor")
            throw EvdError.badRequest(field: "op", "a reply is handled as it arrives, never queued")
        }
    }

    func require(_ action: Action, on resource: Resource = .daemon) throws(EvdError) {
        try self.core.permissions.require(self.actor, action, on: resource)
    }

    /// Checks the actions a SQL request needs, on its database (and table): `execute-sql` for raw
    /// SQL, whose statements are then checked table by table as SQLite compiles them (against the
    /// policy this returns; `nil`: the actor holds everything); a structured op's own actions.
    /// `inTransactionOn`: the database of the session's open transaction, where a request that
    /// names none runs.
    func authorize(_ work: SQLWork, inTransactionOn transactionDatabase: String?) throws(EvdError) -> SQLPolicy? {
        let database = try self.core.pool(work.database ?? transactionDatabase).database.name
        let resource = Resource(database: database, table: work.command.table)
        let actions: [Action] =
            switch work.command {
            case .execute, .executemany: [.executeSQL]
            case .structured(let op): op.actions
            }
        return try self.core.permissions.authorizeSQL(self.actor, actions, on: resource)
    }

    /// `execute-sql` on `database` (the default database when nil: callers pass the open
    /// transaction's database when the request names none).
    func requireSQL(on database: String?) throws(EvdError) {
        try self.require(.executeSQL, on: Resource(database: try self.core.pool(database).database.name))
    }
}
