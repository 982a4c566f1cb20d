#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
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
