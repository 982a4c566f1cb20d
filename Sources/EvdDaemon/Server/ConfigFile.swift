import TOMLKit

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The config file (`evd --config FILE`, TOML; PROTOCOL.md §8). A file that is not valid stops
/// evd from starting, with the reason: a policy read wrongly would let someone in.
///
/// ```toml
/// [[grant]]
/// user = "alice"              # or uid = 1000, or group = "staff": exactly one
/// actions = ["subscribe", "view-table", "insert-row"]
/// database = "main"           # optional: every database when absent
/// table = "dogs"              # optional: every table when absent
///
/// [metrics]                   # the Prometheus endpoint: either or both
/// socket = "/run/evd/metrics.sock"
/// listen = "127.0.0.1:9187"
/// request_timeout_ms = 5000   # a connection's whole request must arrive within this
/// ```
public struct ConfigFile: Sendable {
    public var grants: [Grant] = []
    // Settings a flag can also give (flags win); nil: not in the file.
    public var socket: String?
    public var socketMode: mode_t?
    public var stateDirectory: String?
    public var databases: [DatabaseConfig]?
    public var poolSize: Int?
    public var maxLineBytes: Int?
    public var vetoBudgetMs: Int?
    public var logLevel: String?
    public var maxConnections: Int?
    public var maxConnectionsPerUID: Int?
    public var maxSubscriptions: Int?
    public var maxCursors: Int?
    public var maxCursorsPerActor: Int?
    public var maxPendingRequests: Int?
    public var maxQueuedEvents: Int?
    public var maxQueuedBytes: Int?
    public var maxResponseBytes: Int?
    public var maxFilterValues: Int?
    public var maxStatementMs: Int?
    public var idleTransactionMs: Int?
    public var maxPoolShare: Int?
    public var journalEnabled: Bool?
    public var journalRows: Bool?
    public var journalKeepEvents: Int?
    public var journalKeepSeconds: Int?
    public var cursorMaxRetainedEvents: Int?
    public var metricsSocket: String?
    public var metricsListen: HostPort?
    public var metricsRequestTimeoutMs: Int?

    public init() {}

    /// Every key the file may have, for errors.
    static let topLevelKeys: [String] = [
        "socket", "socket_mode", "state_dir", "pool_size", "max_line_bytes", "veto_budget_ms", "log_level",
        "database", "limits", "journal", "metrics", "grant",
    ]

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    /// Reads and checks `path`.
    public static func load(_ path: String) throws(Invalid) -> ConfigFile {
        guard let file = fopen(path, "r") else {
            throw Invalid(description: "\(path): cannot read it (\(String(cString: strerror(errno))))")
        }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = fread(&buffer, 1, buffer.count, file)
            if count <= 0 { break }
            bytes += buffer[..<count]
        }
        return try self.parse(String(decoding: bytes, as: UTF8.self), source: path)
    }

    /// Checks the text of a config file; `source` names it in errors.
    public static func parse(_ text: String, source: String = "config") throws(Invalid) -> ConfigFile {
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw Invalid(description: "\(source): not valid TOML: \(error.description) (\(error.source.begin))")
        } catch {
            throw Invalid(description: "\(source): not valid TOML: \(error)")
        }
        var config = ConfigFile()
        for key in table.keys where !Self.topLevelKeys.contains(key) {
            throw Invalid(description: "\(source): unknown setting '\(key)' (known: \(Self.topLevelKeys.joined(separator: ", ")))")
        }
        let top = Settings(table: table, place: source)
        config.socket = try top.path("socket")
        if let mode = try top.string("socket_mode") {
            guard let value = UInt32(mode, radix: 8), value <= 0o777 else {
                throw Invalid(description: "\(source): socket_mode must be an octal mode such as \"0660\", not '\(mode)'")
            }
            config.socketMode = mode_t(value)
        }
        config.stateDirectory = try top.path("state_dir")
        config.poolSize = try top.int("pool_size", 1...256)
        config.maxLineBytes = try top.int("max_line_bytes", 1024...Int(Int32.max))
        config.vetoBudgetMs = try top.int("veto_budget_ms", 1...600_000)
        if let level = try top.string("log_level") {
            let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
            guard levels.contains(level) else {
                throw Invalid(description: "\(source): log_level must be one of \(levels.joined(separator: ", ")), not '\(level)'")
            }
            config.logLevel = level
        }
        if let databases = table["database"] {
            guard let array = databases.array, !array.isEmpty else {
                throw Invalid(description: "\(source): 'database' must be an array of tables ([[database]] with name and path)")
            }
            var list: [DatabaseConfig] = []
            for (index, entry) in array.enumerated() {
                let place = "\(source): database \(index + 1)"
                guard let entry = entry.table else { throw Invalid(description: "\(place) must be a table") }
                let settings = Settings(table: entry, place: place)
                try settings.only(["name", "path"])
                guard let name = try settings.string("name"), let path = try settings.path("path") else {
                    throw Invalid(description: "\(place): needs name and path")
                }
                guard !list.contains(where: { $0.name == name }) else {
                    throw Invalid(description: "\(place): database '\(name)' is given twice")
                }
                list.append(DatabaseConfig(name: name, path: path))
            }
            config.databases = list
        }
        if let limits = try top.table("limits") {
            try limits.only([
                "max_connections", "max_connections_per_uid", "max_subscriptions", "max_pending_requests",
                "max_queued_events", "max_queued_bytes", "max_response_bytes", "max_filter_values",
                "max_statement_ms", "idle_transaction_ms", "max_pool_share", "max_cursors", "max_cursors_per_actor",
            ])
            config.maxConnections = try limits.int("max_connections", 1...Int(Int32.max))
            config.maxConnectionsPerUID = try limits.int("max_connections_per_uid", 1...Int(Int32.max))
            config.maxSubscriptions = try limits.int("max_subscriptions", 1...Int(Int32.max))
            config.maxPendingRequests = try limits.int("max_pending_requests", 1...65_536)
            config.maxQueuedEvents = try limits.int("max_queued_events", OutboxLimits.eventsRange)
            config.maxQueuedBytes = try limits.int("max_queued_bytes", OutboxLimits.bytesRange)
            config.maxResponseBytes = try limits.int("max_response_bytes", EvdConfiguration.responseBytesRange)
            config.maxFilterValues = try limits.int("max_filter_values", EvdConfiguration.filterValuesRange)
            config.maxStatementMs = try limits.int("max_statement_ms", 0...86_400_000)
            config.idleTransactionMs = try limits.int("idle_transaction_ms", 0...86_400_000)
            config.maxPoolShare = try limits.int("max_pool_share", 1...256)
            config.maxCursors = try limits.int("max_cursors", 0...1_000_000)
            config.maxCursorsPerActor = try limits.int("max_cursors_per_actor", 0...1_000_000)
        }
        if let journal = try top.table("journal") {
            try journal.only(["enabled", "rows", "keep_events", "keep_seconds", "cursor_max_retained_events"])
            config.journalEnabled = try journal.bool("enabled")
            config.journalRows = try journal.bool("rows")
            config.journalKeepEvents = try journal.int("keep_events", 0...Int.max)
            config.journalKeepSeconds = try journal.int("keep_seconds", 0...Int.max)
            config.cursorMaxRetainedEvents = try journal.int("cursor_max_retained_events", 0...Int.max)
        }
        if let metrics = try top.table("metrics") {
            try metrics.only(["socket", "listen", "request_timeout_ms"])
            config.metricsSocket = try metrics.path("socket")
            config.metricsRequestTimeoutMs = try metrics.int("request_timeout_ms", MetricsSettings.requestTimeoutRange)
            if let listen = try metrics.string("listen") {
                guard let address = HostPort(parsing: listen) else {
                    throw Invalid(description: "\(metrics.place): listen must be HOST:PORT such as \"127.0.0.1:9187\", not '\(listen)'")
                }
                config.metricsListen = address
            }
        }
        if let grants = table["grant"] {
            guard let array = grants.array else {
                throw Invalid(description: "\(source): 'grant' must be an array of tables ([[grant]])")
            }
            for (index, entry) in array.enumerated() {
                guard let grant = entry.table else {
                    throw Invalid(description: "\(source): grant \(index + 1) must be a table")
                }
                config.grants.append(try Self.grant(grant, "\(source): grant \(index + 1)"))
            }
        }
        return config
    }

    private static func grant(_ table: TOMLTable, _ place: String) throws(Invalid) -> Grant {
        let known: Set<String> = ["uid", "user", "group", "actions", "database", "table"]
        for key in table.keys where !known.contains(key) {
            throw Invalid(description: "\(place): unknown key '\(key)' (known: \(known.sorted().joined(separator: ", ")))")
        }
        let named = ["uid", "user", "group"].filter { table[$0] != nil }
        guard named.count == 1 else {
            throw Invalid(
                description:
                    "\(place): name exactly one of uid, user, group (it names \(named.isEmpty ? "none" : named.joined(separator: ", ")))"
            )
        }
        let who: Grant.Who
        switch named[0] {
        case "uid":
            guard let uid = table["uid"]?.int, uid >= 0, uid <= Int(UInt32.max) else {
                throw Invalid(description: "\(place): uid must be a non-negative integer")
            }
            who = .uid(UInt32(uid))
        case "user":
            guard let user = table["user"]?.string, !user.isEmpty else { throw Invalid(description: "\(place): user must be a name") }
            guard getpwnam(user) != nil else { throw Invalid(description: "\(place): there is no user '\(user)' on this system") }
            who = .user(user)
        default:
            guard let group = table["group"]?.string, !group.isEmpty else { throw Invalid(description: "\(place): group must be a name") }
            guard let entry = getgrnam(group) else { throw Invalid(description: "\(place): there is no group '\(group)' on this system") }
            who = .group(name: group, gid: entry.pointee.gr_gid)
        }
        guard let list = table["actions"]?.array else {
            throw Invalid(description: "\(place): 'actions' must be a list of action names")
        }
        var actions: Set<Action> = []
        for value in list {
            guard let name = value.string, let action = Action(rawValue: name) else {
                throw Invalid(
                    description:
                        "\(place): unknown action \(value.string.map { "'\($0)'" } ?? "\(value)") (actions: \(Action.allCases.map(\.rawValue).joined(separator: ", ")))"
                )
            }
            actions.insert(action)
        }
        func name(_ key: String) throws(Invalid) -> String? {
            guard let value = table[key] else { return nil }
            guard let text = value.string, !text.isEmpty else { throw Invalid(description: "\(place): \(key) must be a name") }
            return text
        }
        return Grant(who: who, actions: actions, database: try name("database"), table: try name("table"))
    }

    /// Typed reads of one table's keys, with errors that name the key.
    private struct Settings {
        let table: TOMLTable
        let place: String

        func only(_ keys: Set<String>) throws(Invalid) {
            for key in self.table.keys where !keys.contains(key) {
                throw Invalid(description: "\(self.place): unknown key '\(key)' (known: \(keys.sorted().joined(separator: ", ")))")
            }
        }

        func string(_ key: String) throws(Invalid) -> String? {
            guard let value = self.table[key] else { return nil }
            guard let text = value.string, !text.isEmpty else {
                throw Invalid(description: "\(self.place): \(key) must be a non-empty string")
            }
            return text
        }

        func path(_ key: String) throws(Invalid) -> String? {
            guard let path = try self.string(key) else { return nil }
            guard path.hasPrefix("/") || path == ":memory:" || path.hasPrefix("file:") else {
                throw Invalid(description: "\(self.place): \(key) must be an absolute path, not '\(path)'")
            }
            return path
        }

        func int(_ key: String, _ range: ClosedRange<Int>) throws(Invalid) -> Int? {
            guard let value = self.table[key] else { return nil }
            guard let number = value.int, range.contains(number) else {
                throw Invalid(description: "\(self.place): \(key) must be an integer in \(range.lowerBound)...\(range.upperBound)")
            }
            return number
        }

        func bool(_ key: String) throws(Invalid) -> Bool? {
            guard let value = self.table[key] else { return nil }
            guard let flag = value.bool else { throw Invalid(description: "\(self.place): \(key) must be true or false") }
            return flag
        }

        func table(_ key: String) throws(Invalid) -> Settings? {
            guard let value = self.table[key] else { return nil }
            guard let table = value.table else { throw Invalid(description: "\(self.place): [\(key)] must be a table") }
            return Settings(table: table, place: "\(self.place): [\(key)]")
        }
    }
}
