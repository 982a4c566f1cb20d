import EvdClient
import OrderedCollections

/// The families of PROTOCOL.md §6.
public enum EventFamily: String, Sendable, CaseIterable {
    case pool, connection, dialect, ddl, datasette, custom

    /// Committed events are emitted only after their work commits (and will be journaled with it);
    /// live events are emitted as things happen.
    public var isCommitted: Bool { self == .datasette || self == .custom }
}

/// Every event of the catalog (PROTOCOL.md §6), one case each.
///
/// The raw value indexes `EventKind.specs` and the daemon's interest bit set, so the cheap
/// "does anyone want this?" check is one atomic load and a mask.
public enum EventKind: Int, Sendable, CaseIterable {
    // 6.1 pool
    case connect, firstConnect, checkout, checkin, reset, invalidate, softInvalidate, close, detach, closeDetached
    // 6.2 connection
    case engineConnect, beforeExecute, afterExecute, beforeCursorExecute, afterCursorExecute
    case begin, commit, rollback, savepoint, releaseSavepoint, rollbackSavepoint
    case beginTwophase, prepareTwophase, commitTwophase, rollbackTwophase
    case handleError, dbapiError, engineDisposed, setConnectionExecutionOptions, setEngineExecutionOptions
    // 6.3 dialect
    case doConnect, doExecute, doExecuteNoParams, doExecutemany
    // 6.4 ddl
    case beforeCreate, afterCreate, beforeDrop, afterDrop, beforeParentAttach, afterParentAttach, columnReflect
    // 6.5 datasette
    case login, logout, createToken, createTable, dropTable, alterTable, insertRows, upsertRows
    case updateRow, deleteRow, renameTable

    /// The committed events of changes to tables and rows (§6.5), as a bit set over `rawValue`:
    /// what connections record with `ChangeCapture`.
    static let committedChanges: UInt64 = [
        EventKind.createTable, .dropTable, .alterTable, .renameTable, .insertRows, .upsertRows, .updateRow, .deleteRow,
    ].reduce(0) { $0 | 1 << UInt64($1.rawValue) }

    /// The events the journal keeps (the committed ones: §6.5), as a bit set over `rawValue`:
    /// what a durable cursor follows.
    static let journaled: UInt64 = EventKind.allCases.filter { $0.spec.family.isCommitted }
        .reduce(0) { $0 | 1 << UInt64($1.rawValue) }

    /// This event's catalog entry.
    public var spec: EventSpec { Self.specs[self.rawValue] }
    /// The wire name (`first_connect`, `insert-rows`).
    public var name: String { self.spec.name }

    /// The event with this wire name, if it is in the catalog.
    public init?(name: String) {
        guard let kind = Self.byName[name] else { return nil }
        self = kind
    }

    private static let byName: [String: EventKind] = Dictionary(
        uniqueKeysWithValues: EventKind.allCases.map { ($0.name, $0) }
    )
}

/// What the catalog says about one event: the `events` op returns these, docs/events.md lists them.
public struct EventSpec: Sendable {
    public let name: String
    public let family: EventFamily
    public let vetoable: Bool
    /// Properties a veto listener may replace with `modify`.
    public let mutable: [String]
    /// Property name → a short description of its type and meaning, in wire order.
    public let properties: [(String, String)]
    public let description: String

    /// The entry as the `events` op returns it.
    public var jsonValue: JSONValue {
        var props = JSONObject()
        for (key, text) in self.properties { props[key] = .string(text) }
        return [
            "name": .string(self.name),
            "family": .string(self.family.rawValue),
            "vetoable": .bool(self.vetoable),
            "mutable": .array(self.mutable.map { .string($0) }),
            "properties": .object(props),
            "description": .string(self.description),
        ]
    }
}

extension EventKind {
    private typealias P = [(String, String)]
    private static let db: (String, String) = ("database", "string: the database's name")
    private static let conn: (String, String) = ("connection", "integer: the pooled connection's number")
    private static let poolProps: P = [db, conn]
    private static let errorProp: (String, String) = ("error", "object {code, message, sqlite_code}")
    private static let stmt: P = [
        ("statement", "string: the SQL statement"),
        ("parameters", "array or object: the bound parameters (a list of them when executemany)"),
    ]
    private static let cursor: P = [db, conn] + stmt + [("executemany", "boolean")]
    private static let target: (String, String) = ("target", "object {kind: table/index/view/trigger, name}")
    private static let ddlProps: P = [db, target, ("sql", "string: the DDL statement")]
    private static let xid: (String, String) = ("xid", "string: the two-phase transaction id")
    /// A committed event's transaction (`TxStamp`): before its properties, `tx_end` after them.
    private static let tx: P = [
        ("tx", "integer: its transaction's id, the seq of the transaction's first event"),
        ("tx_last", "integer: the seq of its transaction's last event"),
    ]
    private static let txEnd: (String, String) = ("tx_end", "true on its transaction's last event (absent on the others)")
    /// A custom event's properties in the catalog: its transaction's (its data is its own).
    static let customProperties: JSONObject = {
        var properties = JSONObject()
        for (key, text) in tx + [txEnd] { properties[key] = .string(text) }
        return properties
    }()
    /// A row event's: what follows `tx_last`.
    private static let rowTx: P = tx + [("schema_version", "integer: the database's PRAGMA schema_version as of the commit")]
    private static let request: P = [
        db, ("request", "object: the client's request"),
        ("execution_options", "object: the session's execution options (only when set)"),
    ]

    private static func s(
        _ name: String,
        _ family: EventFamily,
        vetoable: Bool = false,
        mutable: [String] = [],
        _ properties: P,
        _ description: String
    ) -> EventSpec {
        EventSpec(
            name: name,
            family: family,
            vetoable: vetoable,
            mutable: mutable,
            properties: properties,
            description: description
        )
    }

    /// The catalog, in `EventKind` order.
    public static let specs: [EventSpec] = [
        s("connect", .pool, poolProps, "A new SQLite connection was opened for the pool."),
        s(
            "first_connect",
            .pool,
            poolProps,
            "The first connection of a database's pool was opened (again after dispose, which makes a new pool)."
        ),
        s(
            "checkout",
            .pool,
            vetoable: true,
            poolProps,
            "A session took a connection from the pool; deny means the connection is no good: it is invalidated and another is tried (2 attempts in all)."
        ),
        s("checkin", .pool, poolProps, "A connection went back to the pool (not a detached one: it does not go back)."),
        s(
            "reset",
            .pool,
            poolProps + [("rolled_back", "boolean: an open transaction was rolled back")],
            "A connection returned to the pool was reset (any open transaction rolled back)."
        ),
        s(
            "invalidate",
            .pool,
            poolProps + [errorProp],
            "A connection was invalidated and closed: an I/O, corruption or not-a-database error, a denied checkout, or the admin op invalidate."
        ),
        s(
            "soft_invalidate",
            .pool,
            poolProps + [errorProp],
            "A connection was marked to be closed when it is next checked in (the admin op invalidate with soft)."
        ),
        s("close", .pool, poolProps, "A pooled connection was closed."),
        s(
            "detach",
            .pool,
            poolProps,
            "A checked-out connection was detached from its pool (the admin op dispose): when its session gives it back it is reset and closed (close_detached), with no checkin."
        ),
        s("close_detached", .pool, poolProps, "A detached connection was closed."),

        s(
            "engine_connect",
            .connection,
            poolProps + [("branch", "boolean: always false")],
            "A session began using a pooled connection (for a request, or from begin to commit/rollback)."
        ),
        s(
            "before_execute",
            .connection,
            vetoable: true,
            mutable: ["request"],
            request,
            "A request that runs SQL is about to run."
        ),
        s(
            "after_execute",
            .connection,
            request + [("changes", "integer: rows changed")],
            "A request that runs SQL has run."
        ),
        s(
            "before_cursor_execute",
            .connection,
            vetoable: true,
            mutable: ["statement", "parameters"],
            cursor,
            "A statement is about to be executed."
        ),
        s(
            "after_cursor_execute",
            .connection,
            cursor + [("rowcount", "integer: rows changed (-1 for a read)"), ("duration_us", "integer: microseconds")],
            "A statement was executed."
        ),
        s(
            "begin",
            .connection,
            vetoable: true,
            [db, conn, ("implicit", "boolean: the request's own transaction")],
            "A transaction began."
        ),
        s(
            "commit",
            .connection,
            vetoable: true,
            [db, conn, ("implicit", "boolean")],
            "A transaction is committing; deny rolls it back."
        ),
        s("rollback", .connection, [db, conn, ("implicit", "boolean")], "A transaction was rolled back."),
        s("savepoint", .connection, vetoable: true, [db, conn, ("name", "string")], "A savepoint was set."),
        s("release_savepoint", .connection, [db, conn, ("name", "string")], "A savepoint was released."),
        s("rollback_savepoint", .connection, [db, conn, ("name", "string")], "A savepoint was rolled back to."),
        s("begin_twophase", .connection, [db, conn, xid], "A two-phase transaction began."),
        s("prepare_twophase", .connection, [db, conn, xid], "A two-phase transaction was prepared."),
        s(
            "commit_twophase",
            .connection,
            [db, conn, xid, ("is_prepared", "boolean")],
            "A two-phase transaction is committing: fired before the COMMIT, so its committed events follow it."
        ),
        s(
            "rollback_twophase",
            .connection,
            [db, conn, xid, ("is_prepared", "boolean")],
            "A two-phase transaction was rolled back."
        ),
        s(
            "handle_error",
            .connection,
            vetoable: true,
            mutable: ["error"],
            [db, conn] + stmt + [errorProp],
            "A statement failed; error is what the client receives (a listener may rewrite it)."
        ),
        s(
            "dbapi_error",
            .connection,
            [db, conn] + stmt + [errorProp],
            "A statement failed (fired just before handle_error, as SQLAlchemy's legacy event)."
        ),
        s(
            "engine_disposed",
            .connection,
            [db],
            "A database's pool was disposed (the admin op dispose, or shutdown): fired after its idle connections closed and its checked-out ones were detached."
        ),
        s(
            "set_connection_execution_options",
            .connection,
            [("options", "object: the options set")],
            "A session set execution options for itself."
        ),
        s(
            "set_engine_execution_options",
            .connection,
            [("options", "object: the options set")],
            "An admin set execution options for every session."
        ),

        s(
            "do_connect",
            .dialect,
            vetoable: true,
            mutable: ["pragmas"],
            [
                db, ("path", "string: the database file"), ("flags", "array of strings: the sqlite3_open_v2 flags"),
                ("pragmas", "object: pragma → value, applied after opening"),
            ],
            "A SQLite connection is about to be opened; deny refuses it, modify pragmas changes what is applied."
        ),
        s(
            "do_execute",
            .dialect,
            vetoable: true,
            [db, conn] + stmt,
            "A statement with parameters is about to be stepped."
        ),
        s(
            "do_execute_no_params",
            .dialect,
            vetoable: true,
            [db, conn] + stmt,
            "A statement without parameters is about to be stepped."
        ),
        s(
            "do_executemany",
            .dialect,
            vetoable: true,
            [db, conn] + stmt,
            "A statement is about to be stepped once per parameter set."
        ),

        s("before_create", .ddl, vetoable: true, ddlProps, "A table, index, view or trigger is about to be created."),
        s("after_create", .ddl, ddlProps, "A table, index, view or trigger was created."),
        s("before_drop", .ddl, vetoable: true, ddlProps, "A table, index, view or trigger is about to be dropped."),
        s("after_drop", .ddl, ddlProps, "A table, index, view or trigger was dropped."),
        s(
            "before_parent_attach",
            .ddl,
            vetoable: true,
            [db, ("target", "object: the column {name, type}"), ("parent", "object: the table {kind, name}")],
            "A column is about to join a table (create, or ALTER TABLE ... ADD COLUMN)."
        ),
        s(
            "after_parent_attach",
            .ddl,
            [db, ("target", "object: the column {name, type}"), ("parent", "object: the table {kind, name}")],
            "A column joined a table."
        ),
        s(
            "column_reflect",
            .ddl,
            vetoable: true,
            mutable: ["column"],
            [db, ("table", "string"), ("column", "object {name, type, notnull, default, pk}")],
            "A column of a table was reflected (describe); a modified column is what describe returns."
        ),

        s("login", .datasette, tx + [("method", "string: peercred or token"), txEnd], "An actor logged in (connected, or the login op)."),
        s("logout", .datasette, tx + [txEnd], "An actor logged out (the logout op, or disconnected)."),
        s(
            "create-token",
            .datasette,
            tx + [
                ("expires_after", "integer or null: seconds"), ("restrict_all", "array of actions"),
                ("restrict_database", "object: database → actions"), ("restrict_resource", "object: database → table → actions"),
                txEnd,
            ],
            "A token was created (never the token itself)."
        ),
        s(
            "create-table",
            .datasette,
            tx + [db, ("table", "string"), ("schema", "string: the CREATE statement"), txEnd],
            "A table was created."
        ),
        s("drop-table", .datasette, tx + [db, ("table", "string"), txEnd], "A table was dropped."),
        s(
            "alter-table",
            .datasette,
            tx + [db, ("table", "string"), ("before_schema", "string"), ("after_schema", "string"), txEnd],
            "A table was altered."
        ),
        s(
            "insert-rows",
            .datasette,
            rowTx + [
                db, ("table", "string"), ("num_rows", "integer"), ("ignore", "boolean"), ("replace", "boolean"), txEnd,
                ("rows", "array of objects (subscriptions with rows: true)"),
            ],
            "Rows were inserted."
        ),
        s(
            "upsert-rows",
            .datasette,
            rowTx + [db, ("table", "string"), ("num_rows", "integer"), txEnd, ("rows", "array of objects (rows: true)")],
            "Rows were upserted."
        ),
        s(
            "update-row",
            .datasette,
            rowTx + [
                db, ("table", "string"), ("pks", "array: the row's primary key values"), txEnd,
                ("before", "object (rows: true)"), ("after", "object (rows: true)"),
            ],
            "A row was updated."
        ),
        s(
            "delete-row",
            .datasette,
            rowTx + [db, ("table", "string"), ("pks", "array: the row's primary key values"), txEnd, ("before", "object (rows: true)")],
            "A row was deleted."
        ),
        s("rename-table", .datasette, tx + [db, ("old_table", "string"), ("new_table", "string"), txEnd], "A table was renamed."),
    ]
}
