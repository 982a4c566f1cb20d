#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CSQLite
import EvdClient

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
/// by SQLite's authorizer while the statement is prepared — its triggers' and views' actions too,
/// since SQLite codes them into the statement — so a raw `INSERT INTO dogs` needs `insert-row` on
/// dogs, as the structured `insert` does.
struct SQLPolicy: Sendable {
    let actor: Actor
    let permissions: Permissions
    let database: String

    func allows(_ action: Action, table: String?) -> Bool {
        self.permissions.allows(self.actor, action, on: Resource(database: self.database, table: table))
    }

    /// Pragmas that only describe one table (their argument): `view-table` on it. Every other
    /// pragma needs `admin`.
    static let describingPragmas: Set<String> = [
        "table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list",
    ]

    /// The action an authorizer action code needs, on which table (`nil`: the whole database);
    /// `nil` when it needs none (a SELECT as such, reading the schema, transaction control).
    static func required(
        _ code: Int32, _ first: UnsafePointer<CChar>?, _ second: UnsafePointer<CChar>?
    ) -> (Action, String?)? {
        func name(_ pointer: UnsafePointer<CChar>?) -> String? { pointer.map { String(cString: $0) } }
        func isSchema(_ table: String?) -> Bool {
            ["sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"].contains(table?.lowercased() ?? "")
        }
        func isInternal(_ table: String?) -> Bool {
            guard let table = table?.lowercased() else { return false }
            return table.hasPrefix("sqlite_") || table.hasPrefix("_evd_")
        }
        switch code {
        case SQLITE_READ:
            let table = name(first)
            if isSchema(table) { return nil }
            // evd's own tables (the journal: every committed event) and SQLite's: for admins.
            return isInternal(table) ? (.admin, nil) : (.viewTable, table)
        case SQLITE_INSERT, SQLITE_UPDATE, SQLITE_DELETE:
            let table = name(first)
            // SQLite's own tables change with DDL (checked as DDL) and AUTOINCREMENT; evd's own are
            // protected from every client (`AuthorizerObserver.protectedTable`).
            if table?.lowercased().hasPrefix("sqlite_") == true { return nil }
            if isInternal(table) { return (.admin, nil) }
            return (code == SQLITE_INSERT ? .insertRow : code == SQLITE_UPDATE ? .updateRow : .deleteRow, table)
        case SQLITE_CREATE_TABLE, SQLITE_CREATE_TEMP_TABLE, SQLITE_CREATE_VIEW, SQLITE_CREATE_TEMP_VIEW:
            return (.createTable, name(first))
        case SQLITE_DROP_TABLE, SQLITE_DROP_TEMP_TABLE, SQLITE_DROP_VIEW, SQLITE_DROP_TEMP_VIEW:
            return (.dropTable, name(first))
        case SQLITE_CREATE_INDEX, SQLITE_CREATE_TEMP_INDEX, SQLITE_CREATE_TRIGGER, SQLITE_CREATE_TEMP_TRIGGER,
            SQLITE_DROP_INDEX, SQLITE_DROP_TEMP_INDEX, SQLITE_DROP_TRIGGER, SQLITE_DROP_TEMP_TRIGGER, SQLITE_ALTER_TABLE:
            // An index or a trigger changes its table (for ALTER TABLE, `second` is the table too).
            return (.alterTable, name(second))
        case SQLITE_PRAGMA:
            let pragma = name(first)?.lowercased() ?? ""
            if pragma == "table_list" { return nil }
            return Self.describingPragmas.contains(pragma) && second != nil ? (.viewTable, name(second)) : (.admin, nil)
        case SQLITE_ATTACH, SQLITE_DETACH, SQLITE_ANALYZE, SQLITE_REINDEX, SQLITE_CREATE_VTABLE, SQLITE_DROP_VTABLE:
            return (.admin, nil)
        case SQLITE_FUNCTION:
            return name(second)?.lowercased() == "load_extension" ? (.admin, nil) : nil
        default:
            return nil
        }
    }
}

/// What one subscriber may see (PROTOCOL.md §8): an event about a table needs `view-table` on it,
/// an event about a database but no one table (pool and connection events, statements and their
/// parameters) needs `view-table` on the whole database; events about neither (`login`, `logout`,
/// custom events) need only `subscribe`. A subscription of an actor that holds everything has none.
struct EventVisibility: Sendable {
    let actor: Actor
    let permissions: Permissions

    func allows(_ properties: JSONObject) -> Bool {
        guard let database = properties["database"]?.stringValue else { return true }
        if let before = properties["before_name"]?.stringValue,
            !self.permissions.allows(self.actor, .viewTable, on: Resource(database: database, table: before))
        {
            return false
        }
        return self.permissions.allows(self.actor, .viewTable, on: Resource(database: database, table: Self.table(of: properties)))
    }

    /// The table an event is about: `table`, a DDL event's table or view `target` (or a column's
    /// `parent`), a renamed table's new name (`allows` checks the old one too).
    static func table(of properties: JSONObject) -> String? {
        if let table = properties["table"]?.stringValue { return table }
        if let target = properties["target"], let kind = target["kind"]?.stringValue, kind == "table" || kind == "view" {
            return target["name"]?.stringValue
        }
        if let parent = properties["parent"]?["name"]?.stringValue { return parent }
        return properties["after_name"]?.stringValue
    }
}
