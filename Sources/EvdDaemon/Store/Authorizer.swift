import CSQLite
import EvdClient
import OrderedCollections

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Registers the authorizer observer a connection uses to learn what a statement does while it is prepared.
extension SQLiteConnection {
    /// Installs `observer` as this connection's authorizer; it sees every action of every prepare.
    /// The connection keeps `observer` until it closes, which removes the authorizer first.
    public func setAuthorizer(_ observer: AuthorizerObserver) {
        #if DEBUG
        observer.connection = self
        #endif
        let context = Unmanaged.passUnretained(observer).toOpaque()
        sqlite3_set_authorizer(
            self.handle,
            { context, action, first, second, database, _ in
                let observer = Unmanaged<AuthorizerObserver>.fromOpaque(context!).takeUnretainedValue()
                return observer.authorize(action, first, second, database)
            },
            context
        )
        self.installed(.authorizer, owner: observer)
    }
}

/// Records what the statements being prepared do, as SQLite's authorizer reports them, and judges
/// a client's statements by its actor's policy.
///
/// SQLite calls the authorizer whenever it compiles a statement: when evd prepares it, and again
/// inside `sqlite3_step` when the schema changed since (another connection's DDL, say). Both are
/// judged: `judgingClientSQL` stays on while a client's statement is stepped, not only while it
/// is prepared, so that a statement recompiled with a trigger planted meanwhile is judged with it.
///
/// `@unchecked Sendable`: it belongs to one connection and shares its exclusive use (one thread
/// inside at a time): its settings are made by the request running on the connection, and SQLite
/// calls `authorize` inside that request's `prepare` or `step`. Debug builds check that every
/// call comes from inside a use of the connection.
public final class AuthorizerObserver: @unchecked Sendable {
    #if DEBUG
    /// The connection it is installed on (debug builds: to check the claim). Not retained: the
    /// connection keeps the observer, and removes the authorizer before it goes.
    unowned(unsafe) var connection: SQLiteConnection?
    #endif
    /// Whether a transaction-control statement (BEGIN, COMMIT, SAVEPOINT, ...) was prepared.
    public var sawTransactionControl = false
    /// Whether a client's statement is being prepared or stepped: then every compile is judged by
    /// `policy` and recorded (evd's own statements are neither).
    public var judgingClientSQL = false
    /// The execution-option pragma (`query_only`, `busy_timeout`) a client's statement tried to set,
    /// if any. evd sets those itself per session; a value set by raw SQL would outlive the session on
    /// the pooled connection (and bypass engine-wide options), so the prepare is denied.
    public var setExecutionOptionPragma: String?

    /// The tables of the main database a statement being prepared writes (its triggers' included).
    public var writtenTables: Set<String> = []
    /// The schema changes of the main database a statement being prepared makes.
    public var schemaActions: [SchemaAction] = []
    /// A table of evd's own (`_evd_journal`) that client SQL tried to change: denied.
    public var protectedTable: String?
    /// Who prepares client SQL, when they may not do everything: each action on a table is
    /// checked as it is compiled (`nil`: the actor holds every action).
    var policy: SQLPolicy?
    /// The veto listeners that rewrote the statement (or its request): it must stay within what
    /// each may see, besides the requester's `policy`.
    var rewriters: [SQLPolicy] = []
    /// What evd read of the client's statement before preparing it, for `policy` and `rewriters`.
    var facts = StatementFacts()
    /// Whether the statement being judged creates, drops or alters a schema object.
    private var changesSchema = false
    /// The action a policy refused while compiling, for the `permission_denied` error.
    var refused: (policy: SQLPolicy, action: Action, table: String?)?
    /// Whether client SQL left something on the connection that would outlive its session: a
    /// temporary table, view, index or trigger, an attached database, a pragma set. The pool closes
    /// such a connection when it comes back instead of handing it to the next session.
    public var leftSessionState = false

    /// Forgets what the last prepare recorded.
    func clearStatementRecord() {
        self.sawTransactionControl = false
        self.setExecutionOptionPragma = nil
        if !self.writtenTables.isEmpty { self.writtenTables.removeAll() }
        if !self.schemaActions.isEmpty { self.schemaActions.removeAll() }
        self.protectedTable = nil
        self.refused = nil
        self.changesSchema = false
    }

    /// The table an action changes (its rows, its schema, its indexes or triggers), if any.
    static func changedTable(
        _ action: Int32,
        _ first: UnsafePointer<CChar>?,
        _ second: UnsafePointer<CChar>?
    ) -> UnsafePointer<CChar>? {
        switch action {
        case SQLITE_INSERT, SQLITE_UPDATE, SQLITE_DELETE, SQLITE_DROP_TABLE, SQLITE_DROP_TEMP_TABLE: return first
        case SQLITE_ALTER_TABLE, SQLITE_CREATE_INDEX, SQLITE_CREATE_TRIGGER, SQLITE_DROP_INDEX, SQLITE_DROP_TRIGGER:
            return second
        default: return nil
        }
    }

    /// Pragmas that back execution options (`query_only`, `busy_timeout_ms`).
    static let executionOptionPragmas: Set<String> = ["query_only", "busy_timeout"]

    public init() {}

    /// Records `action` and answers SQLite's authorizer. Denying must happen here, not after the
    /// prepare: SQLite applies some pragmas (query_only among them) while preparing.
    func authorize(
        _ action: Int32,
        _ first: UnsafePointer<CChar>?,
        _ second: UnsafePointer<CChar>?,
        _ database: UnsafePointer<CChar>?
    ) -> Int32 {
        #if DEBUG
        self.connection?.exclusiveUse.assertInside()
        #endif
        if action == SQLITE_TRANSACTION || action == SQLITE_SAVEPOINT { self.sawTransactionControl = true }
        guard self.judgingClientSQL else { return SQLITE_OK }
        self.noteSchemaChangeAndState(action, first, second)
        if let policy = self.policy,
            let (needed, table) = policy.refusal(action, first, second, facts: self.facts, changesSchema: self.changesSchema)
        {
            self.refused = (policy, needed, table)
            return SQLITE_DENY
        }
        for rewriter in self.rewriters {
            if let (needed, table) = rewriter.refusal(action, first, second, facts: self.facts, changesSchema: self.changesSchema) {
                self.refused = (rewriter, needed, table)
                return SQLITE_DENY
            }
        }
        if let table = Self.changedTable(action, first, second), strncmp(table, "_evd_", 5) == 0 {
            // The journal is evd's record of what committed: clients may read it, never change it.
            self.protectedTable = String(cString: table)
            return SQLITE_DENY
        }
        if let first {
            let inMain = database.map { strcmp($0, "main") == 0 } ?? false
            switch action {
            case SQLITE_INSERT, SQLITE_UPDATE, SQLITE_DELETE:
                if inMain && strncmp(first, "sqlite_", 7) != 0 { self.writtenTables.insert(String(cString: first)) }
            case SQLITE_ALTER_TABLE:
                // For ALTER TABLE, `first` is the database's name and `second` the table's.
                if strcmp(first, "main") == 0, let second {
                    self.schemaActions.append(SchemaAction(verb: .alter, kind: "table", name: String(cString: second)))
                }
            default:
                if inMain, let (verb, kind) = SchemaAction.described(by: action) {
                    self.schemaActions.append(SchemaAction(verb: verb, kind: kind, name: String(cString: first)))
                }
            }
        }
        // For SQLITE_PRAGMA, `first` is the pragma's name and `second` its argument (nil for a read).
        if action == SQLITE_PRAGMA, second != nil, let first {
            let name = String(cString: first).lowercased()
            if Self.executionOptionPragmas.contains(name) {
                self.setExecutionOptionPragma = name
                return SQLITE_DENY
            }
        }
        return SQLITE_OK
    }

    /// Notes a DDL action (`changesSchema`), and state that would outlive the session on this
    /// connection (`leftSessionState`).
    private func noteSchemaChangeAndState(_ action: Int32, _ first: UnsafePointer<CChar>?, _ second: UnsafePointer<CChar>?) {
        switch action {
        case SQLITE_CREATE_TEMP_TABLE, SQLITE_CREATE_TEMP_VIEW, SQLITE_CREATE_TEMP_INDEX, SQLITE_CREATE_TEMP_TRIGGER,
            SQLITE_ATTACH:
            self.leftSessionState = true
            self.changesSchema = true
        case SQLITE_CREATE_TABLE, SQLITE_CREATE_VIEW, SQLITE_CREATE_INDEX, SQLITE_CREATE_TRIGGER, SQLITE_DROP_TABLE,
            SQLITE_DROP_VIEW, SQLITE_DROP_INDEX, SQLITE_DROP_TRIGGER, SQLITE_DROP_TEMP_TABLE, SQLITE_DROP_TEMP_VIEW,
            SQLITE_DROP_TEMP_INDEX, SQLITE_DROP_TEMP_TRIGGER, SQLITE_ALTER_TABLE, SQLITE_CREATE_VTABLE, SQLITE_DROP_VTABLE:
            self.changesSchema = true
        case SQLITE_PRAGMA where second != nil:
            // A pragma with an argument sets something, unless it describes a table.
            if let first, !SQLPolicy.describingPragmas.contains(String(cString: first).lowercased()) {
                self.leftSessionState = true
            }
        default:
            break
        }
    }
}

/// A schema change a statement makes, as the authorizer reports it while the statement is prepared.
public struct SchemaAction: Sendable, Equatable {
    public enum Verb: Sendable { case create, drop, alter }
    public let verb: Verb
    /// `table`, `index`, `view` or `trigger` (PROTOCOL.md §6.4's `target.kind`).
    public let kind: String
    public let name: String

    /// The verb and kind of an authorizer action code that creates or drops a schema object in a
    /// persistent database (the temp ones are not reported: they are the connection's own).
    static func described(by action: Int32) -> (Verb, String)? {
        switch action {
        case SQLITE_CREATE_TABLE: return (.create, "table")
        case SQLITE_CREATE_INDEX: return (.create, "index")
        case SQLITE_CREATE_VIEW: return (.create, "view")
        case SQLITE_CREATE_TRIGGER: return (.create, "trigger")
        case SQLITE_DROP_TABLE: return (.drop, "table")
        case SQLITE_DROP_INDEX: return (.drop, "index")
        case SQLITE_DROP_VIEW: return (.drop, "view")
        case SQLITE_DROP_TRIGGER: return (.drop, "trigger")
        default: return nil
        }
    }
}
