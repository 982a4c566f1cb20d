import CSQLite
import EvdClient
import OrderedCollections

/// What `execute` returns.
struct ExecuteResult: Sendable {
    var columns: [String] = []
    var rows: [[JSONValue]] = []
    var changes: Int64 = 0
    var lastInsertRowid: Int64 = 0

    var jsonValue: JSONValue {
        [
            "columns": .array(self.columns.map(JSONValue.string)),
            "rows": .array(self.rows.map(JSONValue.array)),
            "changes": .int(self.changes), "last_insert_rowid": .int(self.lastInsertRowid),
        ]
    }
}

/// Runs a request's SQL on one checked-out connection, firing the connection and dialect events
/// (PROTOCOL.md §6.2–6.3) in SQLAlchemy's order:
/// [`begin`], per statement `before_cursor_execute` (before the statement is prepared: a listener
/// may rewrite one SQLite cannot prepare), the prepare, `do_execute*`, `after_cursor_execute` (or,
/// when the prepare or the step fails, `dbapi_error`, `handle_error`), `after_execute`,
/// [`commit` | `rollback`].
/// (`before_execute` is decided by the session before it hands the request here, since a listener
/// may rewrite the request itself.)
///
/// Everything here blocks and runs on the session's database thread (`DatabaseThreads`). A vetoable
/// event with listeners blocks this thread while they decide: it is the thread of the one
/// connection the work runs on, so nothing else waits for it.
struct SQLRun {
    let bus: EventBus
    let pool: ConnectionPool
    let connection: PooledConnection
    let origin: EventOrigin
    /// The client's request (as `before_execute` listeners left it), for `after_execute`.
    let request: EvdRequest
    let executionOptions: JSONObject
    /// Whether this request is its own transaction (no `begin` op is open).
    let implicitTransaction: Bool
    /// The most one operation's vetoes may take in all (`--veto-budget-ms`).
    let vetoBudget: Duration
    /// What is left of it for this request: taken from the session's task when the run is made,
    /// since the SQLite thread the run goes on cannot see the task's value (a commit group sets
    /// its member's).
    var operationBudget: OperationVetoBudget? = OperationVetoBudget.current
    /// The largest response evd sends (`--max-response-bytes`): a result past it stops early.
    /// Taken from the session's task, as `operationBudget` is.
    var maxResponseBytes = ResultRows.maxResponseBytes
    /// The session's actor, checked table by table as its SQL is prepared (`nil`: holds everything).
    var policy: SQLPolicy? = nil
    /// The `before_execute` listeners that rewrote the request: its SQL must stay within what each
    /// of them may see.
    var rewriters: [SQLPolicy] = []
    /// How long one client statement may run before it is interrupted (0: no limit).
    var statementLimitMs = 0
    /// The commit group the request runs in (`CommitGroups`): its transaction is a savepoint of
    /// the group's, committed with it. `nil`: its own, or the session's.
    var group: CommitGroup? = nil

    var database: String { self.pool.database.name }
    var sqlite: SQLiteConnection { self.connection.sqlite }

    func base() -> JSONObject {
        ["database": .string(self.database), "connection": .integer(self.connection.number)]
    }

    func requestProperties() -> JSONObject {
        var properties: JSONObject = ["database": .string(self.database), "request": .object(self.request.whole)]
        if !self.executionOptions.isEmpty { properties["execution_options"] = .object(self.executionOptions) }
        return properties
    }

    /// Asks the veto listeners of `kind` (or just emits it); throws `vetoed` on an enforced deny.
    @discardableResult
    func vetoable(_ kind: EventKind, _ properties: () -> JSONObject) throws(EvdError) -> VetoVerdict? {
        let verdict = self.bus.decideBlocking(
            kind,
            self.origin,
            budget: self.vetoBudget,
            operation: self.operationBudget,
            properties
        )
        if let verdict, verdict.denied { throw verdict.vetoedError(event: kind.name) }
        return verdict
    }

    /// `execute`: every statement of `sql`, with the rows of the last one that returns columns.
    ///
    /// As SQLAlchemy's `execute`, which takes one statement, each statement of a script is one
    /// cursor execute: `begin` (once, for the request's own transaction), then per statement
    /// `before_cursor_execute` with its text, before SQLite ever sees it (a listener may rewrite a
    /// statement that would not prepare), then the prepare, judged by the authorizer, of what will
    /// really run, `do_execute*`, and the step (`after_cursor_execute`) or, when SQLite cannot
    /// prepare or step it, `dbapi_error` and `handle_error`. The script is split into statements
    /// before anything is prepared (`SQLText.nextStatement`).
    func execute(sql: SQLText, parameters: SQLParameters) throws(EvdError) -> ExecuteResult {
        var begunOnlyAsEvent = false  // `begin` fired, SQLite's BEGIN not yet run
        var sqlBegun = !self.implicitTransaction
        do {
            return try self.inRequest { () throws(EvdError) -> (ExecuteResult, Int64) in
                if self.implicitTransaction {
                    try self.beginEvent()
                    begunOnlyAsEvent = true
                }
                var result = ExecuteResult()
                var offset = 0
                var cursor = 0
                var listenerParameters = false
                while let range = sql.nextStatement(from: offset) {
                    offset = range.upperBound
                    let own = sql.statement(range)
                    let text = own.text
                    let given = parameters.remaining(from: cursor)
                    var final = own
                    var finalParameters = given
                    var modifiers: [EventVisibility]?
                    var replaced: SQLParameters?
                    if let verdict = try self.beforeCursorExecute(text, given, executemany: false) {
                        if let changed = verdict.properties["statement"]?.stringValue, changed != text {
                            final = SQLText(changed)
                            modifiers = verdict.modifiers  // prepared within their grants too
                        }
                        if let changed = verdict.properties["parameters"], changed != given {
                            replaced = try SQLParameters(changed, field: "parameters")
                            finalParameters = changed
                            listenerParameters = true
                        }
                    }
                    let shown = finalParameters
                    let statement = try self.prepareStatement(
                        final,
                        rewrittenBy: modifiers,
                        dialect: SQLParameters.isEmptyJSON(shown) ? .doExecuteNoParams : .doExecute,
                        parameters: { shown }
                    )
                    try self.runOne(
                        statement,
                        parameters: parameters,
                        replaced: replaced,
                        cursor: &cursor,
                        sqlBegun: &sqlBegun,
                        result: &result
                    )
                }
                if !listenerParameters, let total = parameters.positionalCount, cursor != total {
                    throw EvdError.badRequest(field: "params", "\(total) parameter(s) given, the SQL takes \(cursor)")
                }
                if !sqlBegun {  // no statement ran: still one (empty) transaction
                    sqlBegun = true
                    try self.beginSQL(immediate: false)
                }
                result.lastInsertRowid = self.sqlite.lastInsertRowid
                return (result, result.changes)
            }
        } catch {
            // `begin` fired but SQLite's BEGIN never ran (the first statement failed before it
            // could): the request's transaction still ends, as in SQLAlchemy, with `rollback`.
            if begunOnlyAsEvent && !sqlBegun { self.bus.emit(.rollback, self.origin) { self.transactionProperties() } }
            throw error
        }
    }

    /// Binds and runs one prepared statement of `execute`, opening the request's own transaction
    /// in SQLite before the first (`BEGIN IMMEDIATE` if it writes).
    private func runOne(
        _ statement: SQLiteStatement,
        parameters: SQLParameters,
        replaced: SQLParameters?,
        cursor: inout Int,
        sqlBegun: inout Bool,
        result: inout ExecuteResult
    ) throws(EvdError) {
        if !sqlBegun {
            sqlBegun = true
            try self.beginSQL(immediate: !statement.isReadOnly)
        }
        let bound: JSONValue
        if let replaced {
            // A listener's parameters are this statement's, exactly; it takes none of the request's.
            var own = 0
            bound = try replaced.bind(statement, cursor: &own)
            if let total = replaced.positionalCount, total != own {
                throw EvdError(.vetoed, "a listener's parameters (\(total)) do not fit the statement (\(own))")
            }
        } else {
            bound = try parameters.bind(statement, cursor: &cursor)
        }
        var rows = ResultRows(limit: self.maxResponseBytes)
        let changed = try self.capturing(statement, intent: SQLScanner.intent(of: statement.sql)) { () throws(EvdError) in
            try self.run(statement, parameters: bound, executemany: false) { () throws(EvdError) in
                try rows.append(statement.row())
            }
        }
        result.changes += changed
        if statement.columnCount > 0 {
            result.columns = statement.columnNames
            result.rows = rows.rows
        }
    }

    /// Prepares one client statement (exactly one), after its `before_cursor_execute`: `modifiers`
    /// are the listeners that rewrote it (`nil`: it is the client's own). When SQLite cannot
    /// prepare it, `do_execute*` fires (where SQLAlchemy's dialect calls `cursor.execute`, which
    /// prepares), then `dbapi_error` and `handle_error`.
    private func prepareStatement(
        _ sql: SQLText,
        rewrittenBy modifiers: [EventVisibility]?,
        dialect: EventKind,
        parameters: @escaping () -> JSONValue
    ) throws(EvdError) -> SQLiteStatement {
        let rewriters = (modifiers ?? []).map { SQLPolicy(rewriter: $0, database: self.database) }
        let prepared = try self.prepare(sql, from: 0, rewrittenBy: rewriters, failing: (dialect, parameters))
        guard let statement = prepared else {
            if modifiers != nil { throw EvdError(.vetoed, "a listener replaced the statement with no statement") }
            throw EvdError.badRequest(field: "sql", "the SQL has no statement")
        }
        guard sql.isBlank(from: statement.tailOffset) else {
            if modifiers != nil { throw EvdError(.vetoed, "a listener replaced the statement with more than one statement") }
            // `nextStatement` and SQLite disagree on where the statement ends: run nothing.
            throw EvdError.badRequest(field: "sql", "evd could not split the SQL into statements")
        }
        return statement
    }

    /// `executemany`: one statement, stepped once per parameter set. `before_cursor_execute` comes
    /// before the prepare, as `execute`'s.
    func executemany(sql: SQLText, parameterSets: [SQLParameters]) throws(EvdError) -> Int64 {
        var begunOnlyAsEvent = false  // `begin` fired, SQLite's BEGIN not yet run
        var sqlBegun = !self.implicitTransaction
        do {
            return try self.inRequest { () throws(EvdError) -> (Int64, Int64) in
                // A request that cannot be an executemany is refused before its transaction begins.
                guard let range = sql.nextStatement(from: 0) else {
                    throw EvdError.badRequest(field: "sql", "the SQL has no statement")
                }
                guard sql.nextStatement(from: range.upperBound) == nil else {
                    throw EvdError.badRequest(field: "sql", "executemany takes exactly one statement")
                }
                if self.implicitTransaction {
                    try self.beginEvent()
                    begunOnlyAsEvent = true
                }
                let own = sql.statement(range)
                let text = own.text
                var sets = ParameterSets.sets(parameterSets)
                // The sets become JSON only for an event someone gets.
                let json = OnceJSON { sets.jsonValue }
                var final = own
                var modifiers: [EventVisibility]?
                if let verdict = try self.beforeCursorExecute(text, json(), executemany: true) {
                    if let changed = verdict.properties["statement"]?.stringValue, changed != text {
                        final = SQLText(changed)
                        modifiers = verdict.modifiers
                    }
                    if let replaced = verdict.properties["parameters"], replaced != json() {
                        sets = try Self.parameterSets(replaced)
                        json.replace(with: replaced)
                    }
                }
                let statement = try self.prepareStatement(
                    final,
                    rewrittenBy: modifiers,
                    dialect: .doExecutemany,
                    parameters: json.callAsFunction
                )
                if !sqlBegun {
                    sqlBegun = true
                    try self.beginSQL(immediate: !statement.isReadOnly)
                }
                let changed = try self.capturing(statement, intent: SQLScanner.intent(of: statement.sql)) {
                    () throws(EvdError) in
                    try self.run(statement, parameters: json.callAsFunction, executemany: true, sets: sets) {}
                }
                return (changed, changed)
            }
        } catch {
            if begunOnlyAsEvent && !sqlBegun { self.bus.emit(.rollback, self.origin) { self.transactionProperties() } }
            throw error
        }
    }

    /// An executemany's parameter sets as a listener replaced them.
    private static func parameterSets(_ replaced: JSONValue) throws(EvdError) -> ParameterSets {
        guard let list = replaced.arrayValue else {
            throw EvdError(.vetoed, "a listener set executemany's parameters to something that is not a list")
        }
        return .sets(
            try list.enumerated().map { (index, set) throws(EvdError) in
                try SQLParameters(set, field: "parameters[\(index)]")
            }
        )
    }

    /// Runs one statement's `body` as one unit of captured changes, with the schema events of the
    /// DDL it does (the authorizer told, while it was prepared).
    func capturing<T>(
        _ statement: SQLiteStatement,
        intent: StatementIntent,
        _ body: () throws(EvdError) -> T
    ) throws(EvdError) -> T {
        let observer = self.connection.observer
        let capture = self.connection.capture
        let actions = observer.schemaActions
        capture.loadShapes(of: observer.writtenTables)
        capture.beginUnit(intent)
        do {
            if actions.isEmpty { return try body() }
            // A savepoint rolled back since may have taken the schema cookie back to where this
            // statement takes it again, with another schema (see `SchemaCache`).
            self.connection.schema.clear()
            return try self.withSchemaEvents(sql: statement.sql, actions: actions, body)
        } catch {
            capture.failUnit()
            throw error
        }
    }

    /// Prepares the next statement, refusing transaction control (that is what the begin/commit/
    /// rollback/savepoint ops are for: evd must know where transactions start and end).
    ///
    /// `failing`: for a client's statement, the dialect event and parameters that fire, before
    /// `dbapi_error` and `handle_error`, when SQLite cannot prepare it (`prepareStatement`).
    func prepare(
        _ sql: SQLText,
        from offset: Int,
        rewrittenBy rewriters: [SQLPolicy] = [],
        failing dialect: (event: EventKind, parameters: () -> JSONValue)? = nil
    ) throws(EvdError) -> SQLiteStatement? {
        let observer = self.connection.observer
        observer.clearStatementRecord()
        observer.rewriters = self.rewriters + rewriters
        // The statement cache: for an actor who holds every action, and no listener's rewrite,
        // the authorizer decides nothing a later use could decide otherwise, so a statement
        // prepared before under the same schema is used again (`SchemaCache.cachedStatement`).
        // A restricted actor's statements are compiled, and so judged, every time.
        // (Looking it up reads the schema cookie: not in a deferred transaction that has read
        // nothing yet, which must not take its snapshot before its first statement, see `facts`.)
        let cacheable =
            offset == 0 && observer.policy == nil && observer.rewriters.isEmpty
            && (!self.sqlite.inTransaction || sqlite3_txn_state(self.sqlite.handle, "main") != SQLITE_TXN_NONE)
        if cacheable, let cached = try? self.connection.schema.cachedStatement(sql.text, self.sqlite) {
            cached.statement.reset()
            observer.writtenTables = cached.writtenTables
            return cached.statement
        }
        let leftStateBefore = observer.leftSessionState
        if observer.policy != nil || !observer.rewriters.isEmpty { observer.facts = self.facts(of: sql, from: offset) }
        observer.judgingClientSQL = true
        defer { observer.judgingClientSQL = false }
        let statement: SQLiteStatement?
        do {
            statement = try self.sqlite.prepare(sql, from: offset)
        } catch {
            if let refusal = self.policyRefusal() { throw refusal }
            if let table = observer.protectedTable {
                throw EvdError(
                    .permissionDenied,
                    "\(table) is evd's journal: clients may read it but not change it",
                    extra: ["table": .string(table)]
                )
            }
            if let pragma = observer.setExecutionOptionPragma {
                throw EvdError.badRequest(
                    field: "sql",
                    "PRAGMA \(pragma) cannot be set in SQL: it is an execution option (use the execution_options op)"
                )
            }
            guard let dialect else { throw self.failed(error, statement: sql.text, parameters: .array([])) }
            try self.vetoable(dialect.event) {
                var properties = self.base()
                properties["statement"] = .string(sql.text)
                properties["parameters"] = dialect.parameters()
                return properties
            }
            throw self.failed(error, statement: sql.text, parameters: dialect.parameters())
        }
        if observer.sawTransactionControl {
            throw EvdError.badRequest(
                field: "sql",
                "transaction control in SQL is not allowed: use the begin, commit, rollback and savepoint ops"
            )
        }
        if cacheable, let statement, Self.mayCache(statement, sql, observer, leftStateBefore: leftStateBefore) {
            try? self.connection.schema.cache(
                SchemaCache.CachedStatement(statement: statement, writtenTables: observer.writtenTables),
                for: sql.text,
                self.sqlite
            )
        }
        return statement
    }

    /// Whether a statement just prepared may be used again for the same text: one plain query or
    /// change of rows, whose compile changed nothing on the connection (no schema change, no
    /// pragma, no attachment: what a compile does, a reuse would not do again).
    private static func mayCache(
        _ statement: SQLiteStatement,
        _ sql: SQLText,
        _ observer: AuthorizerObserver,
        leftStateBefore: Bool
    ) -> Bool {
        guard sql.isBlank(from: statement.tailOffset), observer.schemaActions.isEmpty, observer.setExecutionOptionPragma == nil,
            observer.protectedTable == nil, observer.refused == nil, observer.leftSessionState == leftStateBefore,
            let verb = SQLScanner.topLevelWords(sql.utf8.dropLast(), limit: 1).first
        else { return false }
        return ["SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "WITH", "VALUES"].contains(verb)
    }

    /// What the policy needs to know of the statement at `offset` that its compile does not tell.
    private func facts(of sql: SQLText, from offset: Int) -> StatementFacts {
        var facts = SQLScanner.facts(of: sql.utf8[offset..<(sql.utf8.count - 1)])
        let schema = self.connection.schema
        // A deferred transaction that has read nothing yet must not read now (see
        // `ChangeCapture.loadShapes`): it goes by what was read before its BEGIN.
        let mayRead = !self.sqlite.inTransaction || sqlite3_txn_state(self.sqlite.handle, "main") != SQLITE_TXN_NONE
        facts.replacingTables = mayRead ? (try? schema.replacingTables(self.sqlite)) ?? schema.lastReplacing : schema.lastReplacing
        return facts
    }

    /// The `permission_denied` error for what the policy refused while a statement compiled, if it did.
    private func policyRefusal() -> EvdError? {
        guard let refused = self.connection.observer.refused else { return nil }
        return refused.policy.refused(refused.action, table: refused.table)
    }

    /// Prepares a statement the listeners that see `modifiers` substituted: exactly one statement,
    /// no transaction control, and nothing they may not see.
    func prepareReplacement(_ text: String, modifiers: [EventVisibility]) throws(EvdError) -> SQLiteStatement {
        let sql = SQLText(text)
        let rewriters = modifiers.map { SQLPolicy(rewriter: $0, database: self.database) }
        guard let statement = try self.prepare(sql, from: 0, rewrittenBy: rewriters) else {
            throw EvdError(.vetoed, "a listener replaced the statement with no statement")
        }
        guard sql.isBlank(from: statement.tailOffset) else {
            throw EvdError(.vetoed, "a listener replaced the statement with more than one statement")
        }
        return statement
    }

    /// `before_cursor_execute`: listeners may deny, or rewrite `statement` and `parameters`.
    func beforeCursorExecute(
        _ sql: String,
        _ parameters: @autoclosure () -> JSONValue,
        executemany: Bool
    ) throws(EvdError)
        -> VetoVerdict?
    {
        try self.vetoable(.beforeCursorExecute) {
            var properties = self.base()
            properties["statement"] = .string(sql)
            properties["parameters"] = parameters()
            properties["executemany"] = .bool(executemany)
            return properties
        }
    }

    /// Runs one statement once per parameter set (an executemany), with its events:
    /// `before_cursor_execute` (whose listeners may rewrite the statement and the sets), the
    /// dialect events, and the changes captured. The sets are made into JSON only for an event
    /// someone listens to. `onRow` sees each result row of the statement that runs. Returns the
    /// rows it changed directly.
    func runMany(
        _ statement: SQLiteStatement,
        _ sets: ParameterSets,
        intent: StatementIntent,
        onRow: (SQLiteStatement) -> Void = { _ in }
    ) throws(EvdError) -> Int64 {
        var statement = statement
        var sets = sets
        let json = OnceJSON { sets.jsonValue }
        if let verdict = try self.beforeCursorExecute(statement.sql, json(), executemany: true) {
            if let text = verdict.properties["statement"]?.stringValue, text != statement.sql {
                statement = try self.prepareReplacement(text, modifiers: verdict.modifiers)
            }
            if let replaced = verdict.properties["parameters"], replaced != json() {
                sets = try Self.parameterSets(replaced)
                json.replace(with: replaced)
            }
        }
        let run = statement
        return try self.capturing(run, intent: intent) { () throws(EvdError) in
            try self.run(run, parameters: json.callAsFunction, executemany: true, sets: sets) { onRow(run) }
        }
    }

    /// The statement and parameters a `modify` asked for: what then runs.
    func rewrite(
        _ statement: SQLiteStatement,
        _ bound: JSONValue,
        by verdict: VetoVerdict
    ) throws(EvdError)
        -> (SQLiteStatement, JSONValue)
    {
        let properties = verdict.properties
        let text = properties["statement"]?.stringValue ?? statement.sql
        let parameters = properties["parameters"] ?? bound
        guard text != statement.sql || parameters != bound else { return (statement, bound) }
        let replacement =
            text != statement.sql ? try self.prepareReplacement(text, modifiers: verdict.modifiers) : statement
        replacement.reset()
        let source = try SQLParameters(parameters, field: "parameters")
        var cursor = 0
        let rebound = try source.bind(replacement, cursor: &cursor)
        if let total = source.positionalCount, total != cursor {
            throw EvdError(.vetoed, "a listener's parameters (\(total)) do not fit the statement (\(cursor))")
        }
        return (replacement, rebound)
    }

    /// Steps one statement to completion (once per parameter set for executemany), firing the
    /// dialect and `after_cursor_execute` events; `onRow` sees each result row. Returns the rows it
    /// changed directly.
    func run(
        _ statement: SQLiteStatement,
        parameters: JSONValue,
        executemany: Bool,
        onRow: () throws(EvdError) -> Void = {}
    ) throws(EvdError) -> Int64 {
        try self.run(statement, parameters: { parameters }, executemany: executemany, sets: nil, onRow: onRow)
    }

    /// `run` with the events' `parameters` made only when an event is sent, and for an
    /// executemany the sets to bind.
    private func run(
        _ statement: SQLiteStatement,
        parameters: () -> JSONValue,
        executemany: Bool,
        sets: ParameterSets?,
        onRow: () throws(EvdError) -> Void
    ) throws(EvdError) -> Int64 {
        let sql = statement.sql
        let dialectEvent: EventKind =
            executemany ? .doExecutemany : (statement.parameterCount == 0 ? .doExecuteNoParams : .doExecute)
        try self.vetoable(dialectEvent) {
            var properties = self.base()
            properties["statement"] = .string(sql)
            properties["parameters"] = parameters()
            return properties
        }
        let start = ContinuousClock.now
        var changed: Int64 = 0
        // Stepping may compile the statement again (the schema changed since it was prepared):
        // that compile is judged as the first was.
        let observer = self.connection.observer
        observer.refused = nil
        observer.judgingClientSQL = true
        defer { observer.judgingClientSQL = false }
        // A kept statement is reset once run (a reused one was before): no cursor stays open, no
        // binding points at a request's text.
        defer { if statement.isCached { statement.reset() } }
        let watch = self.connection.watch
        watch.begin(limitMs: self.statementLimitMs)
        var interrupted: StatementWatch.Reason?
        defer { if interrupted == nil { watch.end() } }
        do {
            if let sets {
                try sets.forEach(statement, capture: self.connection.capture) { changed += try self.step(statement, onRow) }
            } else {
                changed = try self.step(statement, onRow)
            }
        } catch let error as SQLiteError {
            interrupted = watch.end()
            if let interrupted { throw self.failed(error, statement: sql, parameters: parameters(), as: interrupted.evdError) }
            if let refusal = self.policyRefusal() { throw refusal }
            throw self.failed(error, statement: sql, parameters: parameters())
        } catch let error as EvdError {
            throw error
        } catch {
            throw EvdError(.sqlError, "\(error)")
        }
        let elapsed = ContinuousClock.now - start
        let readOnly = statement.isReadOnly
        self.bus.emit(.afterCursorExecute, self.origin) {
            var properties = self.base()
            properties["statement"] = .string(sql)
            properties["parameters"] = parameters()
            properties["executemany"] = .bool(executemany)
            properties["rowcount"] = .int(readOnly && changed == 0 ? -1 : changed)
            let (seconds, attoseconds) = elapsed.components
            properties["duration_us"] = .int(seconds * 1_000_000 + attoseconds / 1_000_000_000_000)
            return properties
        }
        return changed
    }

    /// Steps until done (or `onRow` throws); returns the rows changed directly (not by triggers).
    private func step(_ statement: SQLiteStatement, _ onRow: () throws(EvdError) -> Void) throws -> Int64 {
        let before = self.sqlite.totalChanges
        while try statement.step() { try onRow() }
        return self.sqlite.totalChanges != before ? self.sqlite.changes : 0
    }

    /// Turns a SQLite failure into the client's error: `dbapi_error`, then `handle_error` (whose
    /// listeners may rewrite the error the client receives), and the connection invalidated when the
    /// error means it can no longer be trusted.
    func failed(
        _ error: SQLiteError,
        statement: String,
        parameters: JSONValue,
        as wireError: EvdError? = nil
    )
        -> EvdError
    {
        let evdError = wireError ?? error.evdError
        let errorObject: JSONValue = .object(evdError.jsonObject)
        func properties() -> JSONObject {
            var properties = self.base()
            properties["statement"] = .string(statement)
            properties["parameters"] = parameters
            properties["error"] = errorObject
            return properties
        }
        self.bus.emit(.dbapiError, self.origin, properties)
        if error.invalidatesConnection { self.pool.invalidate(self.connection, error: error, origin: self.origin) }
        let verdict = self.bus.decideBlocking(
            .handleError,
            self.origin,
            budget: self.vetoBudget,
            operation: self.operationBudget,
            properties
        )
        if let rewritten = verdict?.properties["error"]?.objectValue, verdict?.action == "modify" {
            return EvdError(object: rewritten)
        }
        return evdError
    }
}

/// A JSON value made only when first asked for (`json()`), and then kept: the parameter sets of an
/// executemany become JSON only for an event someone gets, and once for all of its events.
final class OnceJSON {
    private let make: () -> JSONValue
    private var made: JSONValue?

    init(_ make: @escaping () -> JSONValue) {
        self.make = make
    }

    func callAsFunction() -> JSONValue {
        if let made { return made }
        let made = self.make()
        self.made = made
        return made
    }

    /// What a listener replaced the value with.
    func replace(with value: JSONValue) {
        self.made = value
    }
}
