import OrderedCollections

/// A request's op and its arguments, checked: one case per op of PROTOCOL.md §3, each with its
/// request type. The daemon parses a request into an `Operation` once (`init(parsing:)`) and
/// dispatches on the case; clients build one and send its `request` (`EvdConnection.send`).
///
/// Parsing checks what needs neither the daemon's state nor its configuration: that every
/// argument is known and has its type and range, in the order each op reads them (the first
/// problem is the one reported, as `bad_request` naming the argument). What needs the daemon
/// (permissions, whether an event name is in the catalog, a table's shape) is checked by the
/// daemon's handler afterwards.
public enum EvdOperation: Sendable, Hashable {
    case ping
    case events
    case stats
    case subscribe(Subscribe)
    case unsubscribe(subscription: Int64)
    /// `ack`: a cursor's subscription acknowledges every event up to `seq` (evd's addition).
    case ack(subscription: Int64, seq: Int64)
    /// `delete_cursor`: forgets a durable cursor (evd's addition).
    case deleteCursor(cursor: String)
    /// `wait`: answers once every event up to `seq` has been delivered to the session's own
    /// subscriptions, or `timeout` after `timeoutMs` (evd's addition, issue 23: read your writes).
    case wait(seq: Int64, timeoutMs: Int64)
    case execute(Execute)
    case executemany(ExecuteMany)
    /// `create_table`, `insert`, `upsert`, `update`, `delete`, `drop_table`, `describe`.
    case structured(StructuredOp, database: String?)
    case begin(database: String?)
    case commit(database: String?)
    case rollback(database: String?)
    case savepoint(Savepoint)
    case twoPhase(TwoPhase)
    case recover(database: String?)
    case executionOptions(ExecutionOptions)
    case emit(Emit)
    case login(token: String)
    case logout
    case createToken(CreateToken)
    case invalidate(Invalidate)
    case dispose(database: String?)
    /// A veto listener's answer (PROTOCOL.md §4). The daemon reads a `reply` on the event loop with
    /// its own two steps (`Session.handleReply`): a reply that names a pending veto resolves it (as
    /// no answer) even when its other arguments are wrong, which a parse that stops at the first
    /// problem cannot do.
    case reply(Reply)

    /// The ops by name.
    public enum Name: String, Sendable, CaseIterable {
        case ping
        case events
        case stats
        case subscribe
        case unsubscribe
        case execute
        case executemany
        case createTable = "create_table"
        case insert
        case upsert
        case update
        case delete
        case dropTable = "drop_table"
        case describe
        case begin
        case commit
        case rollback
        case savepoint
        case releaseSavepoint = "release_savepoint"
        case rollbackSavepoint = "rollback_savepoint"
        case beginTwophase = "begin_twophase"
        case prepareTwophase = "prepare_twophase"
        case commitTwophase = "commit_twophase"
        case rollbackTwophase = "rollback_twophase"
        case recover
        case executionOptions = "execution_options"
        case emit
        case login
        case logout
        case createToken = "create_token"
        case invalidate, dispose, reply, ack
        case deleteCursor = "delete_cursor"
        case wait
    }

    /// `wait`'s `timeout_ms` when none is given, and its range.
    public static let waitDefaultTimeoutMs: Int64 = 1000
    public static let waitTimeoutRange: ClosedRange<Int64> = 1...60000

    /// The `op` of a request, as text: `bad_request` when it is missing or not a string. (Whether
    /// the name is an op is `init(parsing:)`'s to say: `unknown_op`.)
    public static func name(of request: JSONObject) throws(EvdError) -> String {
        guard let value = request["op"], !value.isNull else {
            throw .badRequest(field: "op", "missing required argument 'op'")
        }
        guard case .string(let op) = value else { throw Arguments.wrongType("op", "a string", value) }
        return op
    }

    /// Parses a request: its op and every argument. `unknown_op` for a name no op has;
    /// `bad_request` for a missing, mistyped, out-of-range or unknown argument.
    public init(parsing request: EvdRequest) throws(EvdError) {
        let text = try Self.name(of: request.object)
        guard let name = Name(rawValue: text) else { throw EvdError(.unknownOp, "unknown op '\(text)'") }
        var args = Arguments(request.object)
        switch name {
        case .ping: self = .ping
        case .events: self = .events
        case .stats: self = .stats
        case .logout: self = .logout
        case .subscribe: self = .subscribe(try Subscribe(&args))
        case .unsubscribe: self = .unsubscribe(subscription: try args.requiredInt("subscription"))
        case .ack:
            self = .ack(subscription: try args.requiredInt("subscription"), seq: try args.requiredInt("seq", in: 0...Int64.max))
        case .deleteCursor: self = .deleteCursor(cursor: try args.requiredString("cursor"))
        case .wait:
            self = .wait(
                seq: try args.requiredInt("seq", in: 0...Int64.max),
                timeoutMs: try args.int("timeout_ms", in: Self.waitTimeoutRange) ?? Self.waitDefaultTimeoutMs
            )
        case .execute: self = .execute(try Execute(&args))
        case .executemany: self = .executemany(try ExecuteMany(&args))
        case .createTable, .insert, .upsert, .update, .delete, .dropTable, .describe:
            let op = try StructuredOp.parse(name.rawValue, &args, flatRows: request.rows)
            self = .structured(op, database: try args.string("database"))
        case .begin: self = .begin(database: try args.string("database"))
        case .commit: self = .commit(database: try args.string("database"))
        case .rollback: self = .rollback(database: try args.string("database"))
        case .savepoint, .releaseSavepoint, .rollbackSavepoint: self = .savepoint(try Savepoint(name, &args))
        case .beginTwophase, .prepareTwophase, .commitTwophase, .rollbackTwophase:
            self = .twoPhase(try TwoPhase(name, &args))
        case .recover: self = .recover(database: try args.string("database"))
        case .executionOptions: self = .executionOptions(try ExecutionOptions(&args))
        case .emit: self = .emit(try Emit(&args))
        case .login: self = .login(token: try args.requiredString("token"))
        case .createToken: self = .createToken(try CreateToken(&args))
        case .invalidate: self = .invalidate(try Invalidate(&args))
        case .dispose: self = .dispose(database: try args.string("database"))
        case .reply: self = .reply(try Reply(&args))
        }
        try args.finish()
        if case .twoPhase(let twoPhase) = self, twoPhase.xid.isEmpty {
            throw .badRequest(field: "xid", "'xid' must not be empty")
        }
    }

    /// The op's name.
    public var name: Name {
        switch self {
        case .ping: .ping
        case .events: .events
        case .stats: .stats
        case .subscribe: .subscribe
        case .unsubscribe: .unsubscribe
        case .ack: .ack
        case .deleteCursor: .deleteCursor
        case .wait: .wait
        case .execute: .execute
        case .executemany: .executemany
        case .structured(let op, _): op.name
        case .begin: .begin
        case .commit: .commit
        case .rollback: .rollback
        case .savepoint(let savepoint): savepoint.op
        case .twoPhase(let twoPhase): twoPhase.op
        case .recover: .recover
        case .executionOptions: .executionOptions
        case .emit: .emit
        case .login: .login
        case .logout: .logout
        case .createToken: .createToken
        case .invalidate: .invalidate
        case .dispose: .dispose
        case .reply: .reply
        }
    }

    /// The request's members (without `id`), as a client sends them.
    public var request: JSONObject {
        var object: JSONObject = ["op": .string(self.name.rawValue)]
        func add(_ key: String, _ value: JSONValue?) { if let value { object[key] = value } }
        switch self {
        case .ping, .events, .stats, .logout:
            break
        case .subscribe(let s):
            add("events", s.events.map { .array($0.map(JSONValue.string)) })
            add("veto", s.veto.map { .array($0.map(JSONValue.string)) })
            add("mode", s.mode.map { .string($0.rawValue) })
            add("since", s.since.map(JSONValue.int))
            add("rows", s.rows.map(JSONValue.bool))
            add("name", s.name.map(JSONValue.string))
            add("timeout_ms", s.timeoutMs.map(JSONValue.int))
            add("on_timeout", s.onTimeout.map { .string($0.rawValue) })
            add("priority", s.priority.map(JSONValue.int))
            add("on_overflow", s.onOverflow.map { .string($0.rawValue) })
            add("where", s.where.map(JSONValue.object))
            add("cursor", s.cursor.map(JSONValue.string))
            add("snapshot", s.snapshot.map { .array($0.map(JSONValue.string)) })
            add("database", s.database.map(JSONValue.string))
        case .unsubscribe(let subscription):
            add("subscription", .int(subscription))
        case .ack(let subscription, let seq):
            add("subscription", .int(subscription))
            add("seq", .int(seq))
        case .deleteCursor(let cursor):
            add("cursor", .string(cursor))
        case .wait(let seq, let timeoutMs):
            add("seq", .int(seq))
            add("timeout_ms", .int(timeoutMs))
        case .execute(let e):
            add("sql", .string(e.sql))
            if !e.params.isEmpty { add("params", e.params.jsonValue) }
            add("database", e.database.map(JSONValue.string))
        case .executemany(let e):
            add("sql", .string(e.sql))
            add("params", .array(e.parameterSets.map(\.jsonValue)))
            add("database", e.database.map(JSONValue.string))
        case .structured(let op, let database):
            for (key, value) in op.arguments { object[key] = value }
            add("database", database.map(JSONValue.string))
        case .begin(let database), .commit(let database), .rollback(let database), .recover(let database),
            .dispose(let database):
            add("database", database.map(JSONValue.string))
        case .savepoint(let s):
            add("name", .string(s.name))
        case .twoPhase(let t):
            add("xid", .string(t.xid))
            add("database", t.database.map(JSONValue.string))
        case .executionOptions(let e):
            add("options", .object(e.options))
            add("scope", e.scope.map { .string($0.rawValue) })
        case .emit(let e):
            add("event", .string(e.event))
            add("data", e.data.map(JSONValue.object))
        case .login(let token):
            add("token", .string(token))
        case .createToken(let c):
            add("expires_after", c.expiresAfter.map(JSONValue.int))
            add("restrict_all", c.restrictAll)
            add("restrict_database", c.restrictDatabase.map(JSONValue.object))
            add("restrict_resource", c.restrictResource.map(JSONValue.object))
        case .invalidate(let i):
            add("database", i.database.map(JSONValue.string))
            add("connection", i.connection.map(JSONValue.int))
            add("soft", i.soft.map(JSONValue.bool))
        case .reply(let r):
            add("seq", .int(r.seq))
            add("action", .string(r.action.rawValue))
            add("reason", r.reason.map(JSONValue.string))
            add("set", r.set.map(JSONValue.object))
        }
        return object
    }
}

// MARK: The request types

extension EvdOperation {
    /// `subscribe` (PROTOCOL.md §3, §5). Absent arguments are nil: the daemon's defaults apply.
    public struct Subscribe: Sendable, Hashable {
        public enum Mode: String, Sendable {
            case enforce
            case dryRun = "dry_run"
        }
        public enum OnTimeout: String, Sendable { case allow, deny }
        public enum OnOverflow: String, Sendable { case disconnect, drop }

        public var events: [String]?
        public var veto: [String]?
        public var mode: Mode?
        public var since: Int64?
        public var rows: Bool?
        public var name: String?
        public var timeoutMs: Int64?
        public var onTimeout: OnTimeout?
        public var priority: Int64?
        public var onOverflow: OnOverflow?
        public var `where`: JSONObject?
        /// A durable cursor's name (evd's addition): the subscription receives journaled events
        /// only, from the cursor's acknowledged position (or `since`, which repositions it), and
        /// `ack` moves the position.
        public var cursor: String?
        /// Tables whose current rows the subscription gets first, as `snapshot-rows` events, then
        /// every committed event after the snapshot (evd's addition, issue 23).
        public var snapshot: [String]?
        /// The database of `snapshot`'s tables (the first database when absent).
        public var database: String?

        /// The longest `timeout_ms` a listener may ask for.
        public static let timeoutRange: ClosedRange<Int64> = 1...60_000

        public init(
            events: [String]? = nil,
            veto: [String]? = nil,
            mode: Mode? = nil,
            since: Int64? = nil,
            rows: Bool? = nil,
            name: String? = nil,
            timeoutMs: Int64? = nil,
            onTimeout: OnTimeout? = nil,
            priority: Int64? = nil,
            onOverflow: OnOverflow? = nil,
            where filter: JSONObject? = nil,
            cursor: String? = nil,
            snapshot: [String]? = nil,
            database: String? = nil
        ) {
            self.events = events
            self.veto = veto
            self.mode = mode
            self.since = since
            self.rows = rows
            self.name = name
            self.timeoutMs = timeoutMs
            self.onTimeout = onTimeout
            self.priority = priority
            self.onOverflow = onOverflow
            self.where = filter
            self.cursor = cursor
            self.snapshot = snapshot
            self.database = database
        }

        init(_ args: inout Arguments) throws(EvdError) {
            self.events = try args.strings("events")
            self.veto = try args.strings("veto")
            self.mode = try args.choice("mode", ["enforce", "dry_run"]).flatMap(Mode.init)
            self.since = try args.int("since", in: 0...Int64.max)
            self.rows = try args.bool("rows")
            self.name = try args.string("name")
            self.timeoutMs = try args.int("timeout_ms", in: Self.timeoutRange)
            self.onTimeout = try args.choice("on_timeout", ["allow", "deny"]).flatMap(OnTimeout.init)
            self.priority = try args.int("priority")
            self.onOverflow = try args.choice("on_overflow", ["disconnect", "drop"]).flatMap(OnOverflow.init)
            self.where = try args.object("where")
            self.cursor = try args.string("cursor")
            self.snapshot = try args.strings("snapshot")
            self.database = try args.string("database")
            if let snapshot = self.snapshot {
                if snapshot.isEmpty { throw .badRequest(field: "snapshot", "'snapshot' names no table") }
                if self.since != nil {
                    throw .badRequest(
                        field: "snapshot",
                        "'snapshot' and 'since' cannot go together: the snapshot says where the stream starts"
                    )
                }
                if self.cursor != nil { throw .badRequest(field: "snapshot", "'snapshot' and 'cursor' cannot go together") }
            } else if self.database != nil {
                throw .badRequest(field: "database", "'database' of a subscription names the database of its 'snapshot'")
            }
        }
    }

    /// `execute`: one SQL text (one statement, or a script) with its parameters.
    public struct Execute: Sendable, Hashable {
        public var sql: String
        public var params: SQLParameters
        public var database: String?

        public init(sql: String, params: SQLParameters = .none, database: String? = nil) {
            self.sql = sql
            self.params = params
            self.database = database
        }

        init(_ args: inout Arguments) throws(EvdError) {
            self.sql = try args.requiredString("sql")
            self.params = try SQLParameters(args.value("params"))
            self.database = try args.string("database")
        }
    }

    /// `executemany`: one statement run once per parameter set.
    public struct ExecuteMany: Sendable, Hashable {
        public var sql: String
        public var parameterSets: [SQLParameters]
        public var database: String?

        public init(sql: String, parameterSets: [SQLParameters], database: String? = nil) {
            self.sql = sql
            self.parameterSets = parameterSets
            self.database = database
        }

        init(_ args: inout Arguments) throws(EvdError) {
            self.sql = try args.requiredString("sql")
            guard let sets = try args.array("params") else {
                throw .badRequest(field: "params", "missing required argument 'params'")
            }
            var parameterSets: [SQLParameters] = []
            parameterSets.reserveCapacity(sets.count)
            for (index, set) in sets.enumerated() {
                guard set.arrayValue != nil || set.objectValue != nil else {
                    throw .badRequest(field: "params[\(index)]", "each parameter set must be an array or an object")
                }
                parameterSets.append(try SQLParameters(set, field: "params[\(index)]"))
            }
            self.parameterSets = parameterSets
            self.database = try args.string("database")
        }
    }

    /// `savepoint`, `release_savepoint`, `rollback_savepoint` (inside the session's transaction).
    public struct Savepoint: Sendable, Hashable {
        public var op: Name
        public var name: String

        public init(_ op: Name, name: String) {
            self.op = op
            self.name = name
        }

        init(_ op: Name, _ args: inout Arguments) throws(EvdError) {
            self.op = op
            self.name = try args.requiredString("name")
        }
    }

    /// `begin_twophase`, `prepare_twophase`, `commit_twophase`, `rollback_twophase`.
    public struct TwoPhase: Sendable, Hashable {
        public var op: Name
        public var xid: String
        public var database: String?

        public init(_ op: Name, xid: String, database: String? = nil) {
            self.op = op
            self.xid = xid
            self.database = database
        }

        init(_ op: Name, _ args: inout Arguments) throws(EvdError) {
            self.op = op
            self.xid = try args.requiredString("xid")
            self.database = try args.string("database")
        }
    }

    /// `execution_options`: options of the session (`connection`) or of the daemon (`engine`).
    public struct ExecutionOptions: Sendable, Hashable {
        public enum Scope: String, Sendable { case connection, engine }
        public var options: JSONObject
        public var scope: Scope?

        public init(options: JSONObject, scope: Scope? = nil) {
            self.options = options
            self.scope = scope
        }

        init(_ args: inout Arguments) throws(EvdError) {
            self.options = try args.requiredObject("options")
            self.scope = try args.choice("scope", ["connection", "engine"]).flatMap(Scope.init)
        }

        /// Checks the type of the options evd itself reads (any other is kept as given).
        public func checkKnownOptions() throws(EvdError) {
            for flag in ["query_only", "group_commit"] {
                if let value = self.options[flag], value.boolValue == nil {
                    throw Arguments.wrongType("options.\(flag)", "a boolean", value)
                }
            }
            if let value = self.options["busy_timeout_ms"] {
                _ = try Arguments.integer(value, field: "options.busy_timeout_ms", in: 0...600_000)
            }
        }
    }

    /// `emit`: a custom event.
    public struct Emit: Sendable, Hashable {
        public var event: String
        public var data: JSONObject?

        public init(event: String, data: JSONObject? = nil) {
            self.event = event
            self.data = data
        }

        /// Parses an `emit` request's arguments (the executor reads emits in groups this way).
        public init(arguments object: JSONObject) throws(EvdError) {
            var args = Arguments(object)
            try self.init(&args)
            try args.finish()
        }

        init(_ args: inout Arguments) throws(EvdError) {
            self.event = try args.requiredString("event")
            self.data = try args.object("data")
        }
    }

    /// `create_token`. The restrictions are kept as sent; the daemon reads their action names.
    public struct CreateToken: Sendable, Hashable {
        public var expiresAfter: Int64?
        public var restrictAll: JSONValue?
        public var restrictDatabase: JSONObject?
        public var restrictResource: JSONObject?

        /// The longest `expires_after` (100 years, in seconds): beyond it, ask for no expiry.
        public static let maxExpiresAfter: Int64 = 100 * 365 * 86_400

        public init(
            expiresAfter: Int64? = nil,
            restrictAll: JSONValue? = nil,
            restrictDatabase: JSONObject? = nil,
            restrictResource: JSONObject? = nil
        ) {
            self.expiresAfter = expiresAfter
            self.restrictAll = restrictAll
            self.restrictDatabase = restrictDatabase
            self.restrictResource = restrictResource
        }

        init(_ args: inout Arguments) throws(EvdError) {
            self.expiresAfter = try args.int("expires_after", in: 1...Self.maxExpiresAfter)
            if let all = args.value("restrict_all"), !all.isNull { self.restrictAll = all }
            self.restrictDatabase = try args.object("restrict_database")
            self.restrictResource = try args.object("restrict_resource")
        }
    }

    /// `invalidate`: one pooled connection, or all of a database's.
    public struct Invalidate: Sendable, Hashable {
        public var database: String?
        public var connection: Int64?
        public var soft: Bool?

        public init(database: String? = nil, connection: Int64? = nil, soft: Bool? = nil) {
            self.database = database
            self.connection = connection
            self.soft = soft
        }

        init(_ args: inout Arguments) throws(EvdError) {
            self.database = try args.string("database")
            self.connection = try args.int("connection", in: 1...Int64(Int32.max))
            self.soft = try args.bool("soft")
        }
    }

    /// `reply`: a veto listener's answer to the veto with `seq`.
    public struct Reply: Sendable, Hashable {
        public enum Action: String, Sendable { case allow, deny, modify }
        public var seq: Int64
        public var action: Action
        public var reason: String?
        public var set: JSONObject?

        public init(seq: Int64, action: Action, reason: String? = nil, set: JSONObject? = nil) {
            self.seq = seq
            self.action = action
            self.reason = reason
            self.set = set
        }

        init(_ args: inout Arguments) throws(EvdError) {
            self.seq = try args.requiredInt("seq")
            let action = try args.requiredString("action")
            self.reason = try args.string("reason")
            self.set = try args.object("set")
            guard let known = Action(rawValue: action) else {
                throw .badRequest(field: "action", "'action' must be one of allow, deny, modify, not '\(action)'")
            }
            self.action = known
        }
    }
}

extension StructuredOp {
    /// The op's name.
    public var name: EvdOperation.Name {
        switch self {
        case .createTable: .createTable
        case .insert: .insert
        case .upsert: .upsert
        case .update: .update
        case .delete: .delete
        case .dropTable: .dropTable
        case .describe: .describe
        }
    }

    /// The op's arguments, as a client sends them (without `op` and `database`).
    public var arguments: JSONObject {
        var object: JSONObject = ["table": .string(self.table)]
        switch self {
        case .createTable(_, let columns, let rows, let keys, let ignore, let replace, let alter):
            if let columns {
                object["columns"] = .array(columns.map { ["name": .string($0.name), "type": .string($0.type)] })
            }
            if let rows { object["rows"] = rows.jsonValue }
            if keys.count == 1 {
                object["pk"] = .string(keys[0])
            } else if !keys.isEmpty {
                object["pks"] = .array(keys.map(JSONValue.string))
            }
            if ignore { object["ignore"] = true }
            if replace { object["replace"] = true }
            if alter { object["alter"] = true }
        case .insert(_, let rows, let ignore, let replace, let alter, let returning):
            object["rows"] = rows.jsonValue
            if ignore { object["ignore"] = true }
            if replace { object["replace"] = true }
            if alter { object["alter"] = true }
            if returning { object["return"] = true }
        case .upsert(_, let rows, let alter, let returning):
            object["rows"] = rows.jsonValue
            if alter { object["alter"] = true }
            if returning { object["return"] = true }
        case .update(_, let key, let update, let alter, let returning):
            object["pks"] = .array(key)
            object["update"] = .object(update)
            if alter { object["alter"] = true }
            if returning { object["return"] = true }
        case .delete(_, let key):
            object["pks"] = .array(key)
        case .dropTable, .describe:
            break
        }
        return object
    }
}
