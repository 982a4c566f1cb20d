#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import TOMLKit

/// The config file (`evd --config FILE`, TOML; PROTOCOL.md §8). A file that is not valid stops
/// evd from starting, with the reason: a policy read wrongly would let someone in.
///
/// ```toml
/// [[grant]]
/// user = "alice"              # or uid = 1000, or group = "staff": exactly one
/// actions = ["subscribe", "view-table", "insert-row"]
/// database = "main"           # optional: every database when absent
/// table = "dogs"              # optional: every table when absent
/// ```
public struct ConfigFile: Sendable {
    public var grants: [Grant] = []

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
        for key in table.keys {
            guard key == "grant" else {
                throw Invalid(description: "\(source): unknown setting '\(key)' (known: grant)")
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
            throw Invalid(description: "\(place): name exactly one of uid, user, group (it names \(named.isEmpty ? "none" : named.joined(separator: ", ")))")
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
                    description: "\(place): unknown action \(value.string.map { "'\($0)'" } ?? "\(value)") (actions: \(Action.allCases.map(\.rawValue).joined(separator: ", ")))")
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
}
