import CSQLite
import EvdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The actions of PROTOCOL.md §8, by Datasette's names.
public enum Action: String, Sendable, CaseIterable {
    case subscribe, veto, emit
    case executeSQL = "execute-sql"
    case viewTable = "view-table"
    case insertRow = "insert-row"
    case updateRow = "update-row"
    case deleteRow = "delete-row"
    case createTable = "create-table"
    case alterTable = "alter-table"
    case dropTable = "drop-table"
    case createToken = "create-token"
    case admin
}

/// Where an action is asked for: the whole daemon, a database, or one table of it.
public struct Resource: Sendable, Hashable {
    public var database: String?
    public var table: String?

    public init(database: String? = nil, table: String? = nil) {
        self.database = database
        self.table = table
    }

    public static let daemon = Resource()
}

/// One `[[grant]]` of the config file: `who` may do `actions`, on `database` (every one if nil) and
/// `table` (every one if nil).
public struct Grant: Sendable, Equatable {
    public enum Who: Sendable, Equatable {
        case uid(UInt32)
        case user(String)
        /// A group, resolved to its gid when the config file is read.
        case group(name: String, gid: UInt32)
    }

    public var who: Who
    public var actions: Set<Action>
    public var database: String?
    public var table: String?

    public init(who: Who, actions: Set<Action>, database: String? = nil, table: String? = nil) {
        self.who = who
        self.actions = actions
        self.database = database
        self.table = table
    }

    func applies(to actor: Actor) -> Bool {
        switch self.who {
        case .uid(let uid): actor.uid == uid
        case .user(let name): actor.user == name
        case .group(_, let gid): actor.gid == gid || actor.groups.contains(gid)
        }
    }

    /// Whether the grant reaches `resource`: a grant for one table does not reach its whole database.
    func covers(_ resource: Resource) -> Bool {
        if let database = self.database, database != resource.database { return false }
        if let table = self.table, table != resource.table { return false }
        return true
    }
}

/// What a token narrows its creator's rights to, as Datasette's `restrict_all`, `restrict_database`
/// and `restrict_resource`: with any restriction, an action is allowed only where one of them
/// names it; with none, the token carries its creator's rights unchanged.
public struct TokenRestrictions: Sendable, Equatable {
    public var all: Set<Action> = []
    public var databases: [String: Set<Action>] = [:]
    public var resources: [String: [String: Set<Action>]] = [:]

    public init(all: Set<Action> = [], databases: [String: Set<Action>] = [:], resources: [String: [String: Set<Action>]] = [:]) {
        self.all = all
        self.databases = databases
        self.resources = resources
    }

    public var isEmpty: Bool { self.all.isEmpty && self.databases.isEmpty && self.resources.isEmpty }

    func allows(_ action: Action, on resource: Resource) -> Bool {
        if self.isEmpty || self.all.contains(action) { return true }
        guard let database = resource.database else { return false }
        if self.databases[database]?.contains(action) == true { return true }
        guard let table = resource.table else { return false }
        return self.resources[database]?[table]?.contains(action) == true
    }

    /// Whether any restriction names `action` within `database` (on it or one of its tables).
    func allowsSomewhere(_ action: Action, in database: String) -> Bool {
        self.isEmpty || self.all.contains(action) || self.databases[database]?.contains(action) == true
            || self.resources[database]?.values.contains { $0.contains(action) } == true
    }

    /// Whether any restriction names `action`, wherever.
    func allowsSomewhere(_ action: Action) -> Bool {
        self.isEmpty || self.all.contains(action) || self.databases.values.contains { $0.contains(action) }
            || self.resources.values.contains { $0.values.contains { $0.contains(action) } }
    }
}

/// Who may do what (PROTOCOL.md §8). Root and the daemon's own uid hold every action; everyone
/// else what the policy grants, and nothing by default. A token's restrictions narrow either.
struct Permissions: Sendable {
    let ownerUID: UInt32
    let grants: [Grant]

    init(ownerUID: UInt32, grants: [Grant] = []) {
        self.ownerUID = ownerUID
        self.grants = grants
    }

    /// Whether the actor holds every action everywhere (no check is needed for it).
    func isUnrestricted(_ actor: Actor) -> Bool {
        (actor.uid == 0 || actor.uid == self.ownerUID) && actor.restrictions.allSatisfy(\.isEmpty)
    }

    /// Checks that `actor` may do each of `actions` on `resource` (a database, perhaps a table), and
    /// returns the policy its SQL is held to there as SQLite prepares it (`nil`: it holds
    /// everything, so nothing needs checking).
    func authorizeSQL(_ actor: Actor, _ actions: [Action], on resource: Resource) throws(EvdError) -> SQLPolicy? {
        for action in actions { try self.require(actor, action, on: resource) }
        guard !self.isUnrestricted(actor), let database = resource.database else { return nil }
        return SQLPolicy(actor: actor, permissions: self, database: database)
    }

    func allows(_ actor: Actor, _ action: Action, on resource: Resource = .daemon) -> Bool {
        guard actor.restrictions.allSatisfy({ $0.allows(action, on: resource) }) else { return false }
        if actor.uid == 0 || actor.uid == self.ownerUID { return true }
        return self.grants.contains { $0.actions.contains(action) && $0.applies(to: actor) && $0.covers(resource) }
    }

    /// Whether the actor holds `action` anywhere at all: enough to `subscribe` (each event is then
    /// shown only where the actor may view it).
    func allowsSomewhere(_ actor: Actor, _ action: Action) -> Bool {
        guard actor.restrictions.allSatisfy({ $0.allowsSomewhere(action) }) else { return false }
        if actor.uid == 0 || actor.uid == self.ownerUID { return true }
        return self.grants.contains { $0.actions.contains(action) && $0.applies(to: actor) }
    }

    /// Whether the actor holds `action` on `database` or on any of its tables.
    func allowsSomewhere(_ actor: Actor, _ action: Action, in database: String) -> Bool {
        guard actor.restrictions.allSatisfy({ $0.allowsSomewhere(action, in: database) }) else { return false }
        if actor.uid == 0 || actor.uid == self.ownerUID { return true }
        return self.grants.contains {
            $0.actions.contains(action) && $0.applies(to: actor) && ($0.database == nil || $0.database == database)
        }
    }

    func require(_ actor: Actor, _ action: Action, on resource: Resource = .daemon) throws(EvdError) {
        guard self.allows(actor, action, on: resource) else {
            throw Self.denied(actor, action, on: resource)
        }
    }

    /// Throws `permission_denied` unless the actor holds `action` anywhere (`allowsSomewhere`).
    func requireSomewhere(_ actor: Actor, _ action: Action) throws(EvdError) {
        guard self.allowsSomewhere(actor, action) else { throw Self.denied(actor, action, on: .daemon) }
    }

    static func denied(_ actor: Actor, _ action: Action, on resource: Resource) -> EvdError {
        var extra: JSONObject = ["action": .string(action.rawValue)]
        var place = ""
        if let database = resource.database {
            extra["database"] = .string(database)
            place = " on \(database)"
            if let table = resource.table {
                extra["table"] = .string(table)
                place += ".\(table)"
            }
        }
        return EvdError(.permissionDenied, "\(actor.id) may not \(action.rawValue)\(place)", extra: extra)
    }
}

/// Who prepares client SQL (PROTOCOL.md §8): what each statement does to each table is checked
/// by SQLite's authorizer whenever the statement is compiled — when evd prepares it, and when
/// SQLite prepares it again by itself because the schema changed — its triggers' and views'
/// actions too, since SQLite codes them into the statement. So a raw `INSERT INTO dogs` needs
/// `insert-row` on dogs, as the structured `insert` does. docs/security.md has the rules.
struct SQLPolicy: Sendable {
    let actor: Actor
    let permissions: Permissions
    let database: String
    /// Judging what a veto listener rewrote a request or statement into (PROTOCOL.md §4): it must
    /// stay within what the listener may see, so every action on a table needs `view-table` on it
    /// (the listener decides about others' work; it need not be allowed to do it), and `admin`
    /// stays `admin`. The requester's own policy judges the rewrite as well.
    var rewriter = false

    init(actor: Actor, permissions: Permissions, database: String) {
        self.actor = actor
        self.permissions = permissions
        self.database = database
    }

    /// The policy a rewrite by the listener that sees `visibility` is judged by.
    init(rewriter visibility: EventVisibility, database: String) {
        self.init(actor: visibility.actor, permissions: visibility.permissions, database: database)
        self.rewriter = true
    }

    func allows(_ action: Action, table: String?) -> Bool {
        let action = self.rewriter && action != .admin ? .viewTable : action
        return self.permissions.allows(self.actor, action, on: Resource(database: self.database, table: table))
    }

    /// The `permission_denied` error for an action this policy refused on `table`.
    func refused(_ action: Action, table: String?) -> EvdError {
        let action = self.rewriter && action != .admin ? .viewTable : action
        var error = Permissions.denied(self.actor, action, on: Resource(database: self.database, table: table))
        if self.rewriter {
            error.message = "a veto listener rewrote the request into what it may not see itself: " + error.message
        }
        return error
    }

    /// Pragmas that only describe one table (their argument): `view-table` on it. `table_list`
    /// needs nothing (the schema is not secret); every other pragma needs `admin`.
    static let describingPragmas: Set<String> = [
        "table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list",
    ]

    /// Table-valued functions that read no table: `json_each` and `json_tree` over their argument,
    /// and the pragma functions that describe the schema (each such pragma function then runs its
    /// pragma, which is judged like the `PRAGMA` statement: `view-table` on the table it describes).
    static let tablelessFunctions: Set<String> = [
        "json_each", "json_tree", "pragma_table_list", "pragma_table_info", "pragma_table_xinfo", "pragma_index_list",
        "pragma_index_info", "pragma_index_xinfo", "pragma_foreign_key_list",
    ]

    /// SQL functions that reach memory, files, extensions or the build: `admin` only.
    /// (`fts3_tokenizer` with two arguments replaces a tokenizer with a pointer, and is turned off
    /// on every connection besides; with one it returns a pointer into libsqlite3.)
    static let adminFunctions: Set<String> = [
        "fts3_tokenizer", "load_extension", "readfile", "writefile", "edit", "fts5", "sqlite_compileoption_get",
        "sqlite_compileoption_used",
    ]

    /// Names of SQLite's schema tables: DDL writes them (and is checked as DDL); SQLite refuses
    /// every other write (`SQLITE_DBCONFIG_DEFENSIVE` keeps `writable_schema` off).
    static func isSchemaTable(_ table: String) -> Bool { Self.schemaTables.contains(table) }

    /// SQLite's schema tables, by every name it knows them by (one set, not an array made per
    /// authorizer call).
    private static let schemaTables: Set<String> = ["sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"]

    /// The first action an authorizer action code needs that the actor lacks, on which table
    /// (`nil` table: the whole database); `nil` when the actor may go on. `facts`: what evd read of
    /// the statement before preparing it; `changesSchema`: whether the statement is DDL (whose
    /// bookkeeping writes SQLite's own tables).
    func refusal(
        _ code: Int32,
        _ first: UnsafePointer<CChar>?,
        _ second: UnsafePointer<CChar>?,
        facts: StatementFacts,
        changesSchema: Bool
    ) -> (Action, String?)? {
        func name(_ pointer: UnsafePointer<CChar>?) -> String? { pointer.map { String(cString: $0) } }
        func need(_ action: Action, _ table: String?) -> (Action, String?)? {
            self.allows(action, table: table) ? nil : (action, table)
        }
        switch code {
        case SQLITE_READ:
            guard let table = name(first) else { return nil }
            let lower = table.lowercased()
            if Self.isSchemaTable(lower) || Self.tablelessFunctions.contains(lower) { return nil }
            // DDL reads sqlite_sequence (a DROP or RENAME of an AUTOINCREMENT table) as it changes it.
            if changesSchema && lower.hasPrefix("sqlite_") { return nil }
            // evd's own tables (the journal: every committed event), SQLite's, the pragma functions
            // (database paths, options, the whole file checked) and dbstat: for admins.
            if lower.hasPrefix("sqlite_") || lower.hasPrefix("_evd_") || lower.hasPrefix("pragma_") || lower == "dbstat" {
                return need(.admin, nil)
            }
            return need(.viewTable, table)
        case SQLITE_INSERT, SQLITE_UPDATE, SQLITE_DELETE:
            guard let table = name(first) else { return nil }
            let lower = table.lowercased()
            if Self.isSchemaTable(lower) { return nil }
            // sqlite_sequence and sqlite_stat*: kept by SQLite itself (a DROP or RENAME of an
            // AUTOINCREMENT table updates sqlite_sequence); written directly, admins only.
            if lower.hasPrefix("sqlite_") { return changesSchema ? nil : need(.admin, nil) }
            if lower.hasPrefix("_evd_") { return need(.admin, nil) }
            let action: Action = code == SQLITE_INSERT ? .insertRow : code == SQLITE_UPDATE ? .updateRow : .deleteRow
            if let refused = need(action, table) { return refused }
            // A write that can replace deletes the rows it conflicts with: as Datasette's replace,
            // it needs the rights to update and delete as well.
            guard code != SQLITE_DELETE, facts.replaces || facts.replacingTables.contains(lower) else { return nil }
            return (code == SQLITE_INSERT ? need(.updateRow, table) : nil) ?? need(.deleteRow, table)
        case SQLITE_CREATE_TABLE, SQLITE_CREATE_TEMP_TABLE, SQLITE_CREATE_VIEW, SQLITE_CREATE_TEMP_VIEW:
            return need(.createTable, name(first))
        case SQLITE_DROP_TABLE, SQLITE_DROP_TEMP_TABLE, SQLITE_DROP_VIEW, SQLITE_DROP_TEMP_VIEW:
            return need(.dropTable, name(first))
        case SQLITE_CREATE_TRIGGER, SQLITE_DROP_TRIGGER:
            // A trigger runs with the rights of whoever writes its table next, root included: only
            // an admin may plant one (or take one away).
            return need(.admin, nil)
        case SQLITE_CREATE_TEMP_TRIGGER, SQLITE_DROP_TEMP_TRIGGER, SQLITE_CREATE_INDEX, SQLITE_CREATE_TEMP_INDEX,
            SQLITE_DROP_INDEX, SQLITE_DROP_TEMP_INDEX:
            // An index or a temporary trigger changes its table. (A temporary trigger fires only on
            // the connection, for the statements of the session that made it, compiled under its
            // rights; the connection is closed when the session gives it back.)
            return need(.alterTable, name(second))
        case SQLITE_ALTER_TABLE:
            // `first` is the database's name, `second` the table's.
            let table = name(second)
            if let refused = need(.alterTable, table) { return refused }
            guard let renamed = facts.renamedTo else { return nil }
            return self.renameRefusal(from: table, to: renamed)
        case SQLITE_PRAGMA:
            let pragma = name(first)?.lowercased() ?? ""
            if pragma == "table_list" { return nil }
            return Self.describingPragmas.contains(pragma) && second != nil ? need(.viewTable, name(second)) : need(.admin, nil)
        case SQLITE_REINDEX:
            // CREATE INDEX fills its index with a REINDEX of it.
            return changesSchema ? nil : need(.admin, nil)
        case SQLITE_ATTACH, SQLITE_DETACH, SQLITE_ANALYZE, SQLITE_CREATE_VTABLE, SQLITE_DROP_VTABLE:
            return need(.admin, nil)
        case SQLITE_FUNCTION:
            guard let function = name(second)?.lowercased(), Self.adminFunctions.contains(function) else { return nil }
            return need(.admin, nil)
        default:
            return nil
        }
    }

    /// A rename moves a table's rows under another name, and the grants go by name: renaming
    /// needs `drop-table` on the old name, `create-table` (and `alter-table`) on the new one, and
    /// must not give the actor a right over the rows it does not hold on the old name already.
    private func renameRefusal(from old: String?, to new: String) -> (Action, String?)? {
        if !self.allows(.dropTable, table: old) { return (.dropTable, old) }
        for action in [Action.createTable, .alterTable] where !self.allows(action, table: new) { return (action, new) }
        for action in [Action.viewTable, .insertRow, .updateRow, .deleteRow]
        where self.allows(action, table: new) && !self.allows(action, table: old) {
            return (action, old)
        }
        return nil
    }
}

/// What one subscriber may see (PROTOCOL.md §8): an event about a table needs `view-table` on it,
/// an event about a database but no one table (pool and connection events, statements and their
/// parameters) needs `view-table` on the whole database; events about neither (`login`, `logout`,
/// custom events) need only `subscribe`. A subscription of an actor that holds everything and
/// whose token (if any) never expires has none.
///
/// The same rule with `veto` instead of `view-table` says which events a listener is asked about:
/// its `veto` grant must reach the event's table or database as well.
///
/// A subscription stays its maker's: it is judged as the actor that made it (a later `login` or
/// `logout` on its connection changes nothing), and sees nothing once that actor's token expired.
struct EventVisibility: Sendable {
    let actor: Actor
    let permissions: Permissions
    /// `view-table` for what a subscriber sees, `veto` for what a listener is asked about.
    var action: Action = .viewTable

    /// When the actor's token expires (Unix seconds), if it does.
    var expires: Double? { self.actor.token?.expires.map(Double.init) }

    /// The visibility `actor` needs, or `nil` when it sees everything (no check is needed).
    static func of(_ actor: Actor, _ permissions: Permissions, action: Action = .viewTable) -> EventVisibility? {
        permissions.isUnrestricted(actor) && actor.token?.expires == nil
            ? nil : EventVisibility(actor: actor, permissions: permissions, action: action)
    }

    /// Events about a session's own settings rather than any database: their options (a
    /// `logging_token`, say) are the session's business, shown to its own user and to admins.
    static let sessionPrivateEvents: Set<String> = ["set_connection_execution_options", "set_engine_execution_options"]

    /// Whether the subscriber sees (or the listener is asked about) the event `name` caused by
    /// `actor` (its origin's), with `properties`.
    func allows(_ properties: JSONObject, name: String? = nil, actor: Actor? = nil) -> Bool {
        if let expires = self.expires, TokenAuthority.now() >= expires { return false }
        if let name, Self.sessionPrivateEvents.contains(name) {
            return actor?.uid == self.actor.uid || self.permissions.allows(self.actor, .admin)
        }
        guard let database = properties["database"]?.stringValue else { return true }
        // `before_name`: what evd journaled before it used Datasette's names (a replay).
        if let before = (properties["old_table"] ?? properties["before_name"])?.stringValue,
            !self.permissions.allows(self.actor, self.action, on: Resource(database: database, table: before))
        {
            return false
        }
        return self.permissions.allows(self.actor, self.action, on: Resource(database: database, table: Self.table(of: properties)))
    }

    /// The table an event is about: `table`, a DDL event's table or view `target` (or a column's
    /// `parent`), a renamed table's new name (`allows` checks the old one too).
    static func table(of properties: JSONObject) -> String? {
        if let table = properties["table"]?.stringValue { return table }
        if let target = properties["target"], let kind = target["kind"]?.stringValue, kind == "table" || kind == "view" {
            return target["name"]?.stringValue
        }
        if let parent = properties["parent"]?["name"]?.stringValue { return parent }
        return (properties["new_table"] ?? properties["after_name"])?.stringValue
    }
}
