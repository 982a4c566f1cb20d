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

extension SQLRun {
    /// Runs `command` on the run's connection, on a database thread (inline when the caller is
    /// one), with the session's `query_only` and busy timeout applied first; returns the result.
    func run(_ command: SQLCommand, queryOnly: Bool, busyTimeoutMs: Int32) async throws -> JSONValue {
        let connection = self.connection
        return try await self.pool.run {
            try connection.apply(queryOnly: queryOnly, busyTimeoutMs: busyTimeoutMs)
            return try self.perform(command)
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
