import Crypto
import EvdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a token actor shows of its token on the wire (`"token":{"expires":…}`); never the token.
public struct ActorToken: Sendable, Equatable {
    /// When the token stops working, in Unix seconds; nil: never.
    public var expires: Int64?

    public init(expires: Int64?) {
        self.expires = expires
    }

    /// Whether the token has expired at `now` (Unix seconds).
    func isExpired(at now: Double) -> Bool {
        guard let expires else { return false }
        return now >= Double(expires)
    }

    var jsonValue: JSONValue {
        ["expires": self.expires.map { .string(EventTime.text(unixSeconds: $0)) } ?? .null]
    }
}

/// What a token carries (PROTOCOL.md §8): its creator's actor (without the pid, which is the
/// connection's of whoever logs in), every restriction set that narrows it, and its expiry.
struct TokenPayload: Sendable, Equatable {
    /// The payload format's version (`v`): a token of another version is `token_invalid`.
    static let version: Int64 = 1

    var uid: UInt32
    var gid: UInt32
    var user: String?
    var groups: [UInt32]
    /// Every set must allow an action: the creator's own sets (when it logged in with a token)
    /// and the new token's.
    var restrictions: [TokenRestrictions]
    /// When the token was made, in Unix seconds.
    var created: Int64
    /// When it stops working, in Unix seconds; nil: never.
    var expires: Int64?

    /// The actor a session becomes when it logs in with this token from a connection of `pid`.
    func actor(pid: Int32) -> Actor {
        var actor = Actor(uid: self.uid, gid: self.gid, pid: pid, user: self.user, groups: self.groups)
        actor.restrictions = self.restrictions
        actor.token = ActorToken(expires: self.expires)
        return actor
    }

    var jsonValue: JSONValue {
        var object: JSONObject = [
            "v": .int(Self.version), "uid": .integer(self.uid), "gid": .integer(self.gid),
            "user": self.user.map(JSONValue.string) ?? .null, "groups": .array(self.groups.map { .integer($0) }),
            "restrictions": .array(self.restrictions.map(\.jsonValue)), "created": .int(self.created),
        ]
        if let expires = self.expires { object["expires"] = .int(expires) }
        return .object(object)
    }

    /// The payload from its JSON; nil if it is not one (a signed token always is).
    init?(json: JSONValue) {
        guard json["v"]?.intValue == Self.version, let uid = json["uid"]?.intValue, let gid = json["gid"]?.intValue,
            let groups = json["groups"]?.arrayValue, let restrictions = json["restrictions"]?.arrayValue,
            let created = json["created"]?.intValue, UInt32(exactly: uid) != nil, UInt32(exactly: gid) != nil
        else { return nil }
        self.uid = UInt32(uid)
        self.gid = UInt32(gid)
        switch json["user"] {
        case .string(let user)?: self.user = user
        case .null?: self.user = nil
        default: return nil
        }
        var gids: [UInt32] = []
        for group in groups {
            guard let gid = group.intValue.flatMap(UInt32.init(exactly:)) else { return nil }
            gids.append(gid)
        }
        self.groups = gids
        var sets: [TokenRestrictions] = []
        for set in restrictions {
            guard let parsed = TokenRestrictions(json: set) else { return nil }
            sets.append(parsed)
        }
        self.restrictions = sets
        self.created = created
        switch json["expires"] {
        case nil: self.expires = nil
        case .int(let expires)?: self.expires = expires
        default: return nil
        }
    }

    init(actor: Actor, restrictions: [TokenRestrictions], created: Int64, expires: Int64?) {
        self.uid = actor.uid
        self.gid = actor.gid
        self.user = actor.user
        self.groups = actor.groups
        self.restrictions = restrictions
        self.created = created
        self.expires = expires
    }
}

extension TokenRestrictions {
    /// The restrictions as `create_token` takes them and the `create-token` event shows them:
    /// `restrict_all`, `restrict_database`, `restrict_resource`, sorted so that equal sets look alike.
    var jsonValue: JSONValue {
        func actions(_ set: Set<Action>) -> JSONValue { .array(set.map(\.rawValue).sorted().map(JSONValue.string)) }
        var databases = JSONObject()
        for database in self.databases.keys.sorted() { databases[database] = actions(self.databases[database]!) }
        var resources = JSONObject()
        for database in self.resources.keys.sorted() {
            var tables = JSONObject()
            let byTable = self.resources[database]!
            for table in byTable.keys.sorted() { tables[table] = actions(byTable[table]!) }
            resources[database] = .object(tables)
        }
        return [
            "restrict_all": actions(self.all), "restrict_database": .object(databases),
            "restrict_resource": .object(resources),
        ]
    }

    /// The restrictions from their JSON form; nil if it is not one.
    init?(json: JSONValue) {
        guard let object = json.objectValue, object.count == 3 else { return nil }
        do {
            var arguments = Arguments(object)
            let request = EvdOperation.CreateToken(
                restrictAll: arguments.value("restrict_all").flatMap { $0.isNull ? nil : $0 },
                restrictDatabase: try arguments.object("restrict_database"),
                restrictResource: try arguments.object("restrict_resource")
            )
            try arguments.finish()
            self = try Self.parse(request).restrictions
        } catch {
            return nil
        }
    }

    /// Reads `restrict_all`, `restrict_database` and `restrict_resource` from a request, checking
    /// every type and action name (`bad_request` naming the field at fault). `given` names the
    /// first of them present (nil: none).
    static func parse(_ request: EvdOperation.CreateToken) throws(EvdError) -> (restrictions: TokenRestrictions, given: String?) {
        var restrictions = TokenRestrictions()
        var given: String?
        if let all = request.restrictAll {
            given = "restrict_all"
            restrictions.all = try Self.actions(all, field: "restrict_all")
        }
        if let databases = request.restrictDatabase {
            given = given ?? "restrict_database"
            for (database, actions) in databases {
                restrictions.databases[database] = try Self.actions(actions, field: "restrict_database.\(database)")
            }
        }
        if let resources = request.restrictResource {
            given = given ?? "restrict_resource"
            for (database, tables) in resources {
                guard case .object(let tables) = tables else {
                    throw Arguments.wrongType("restrict_resource.\(database)", "an object (table → actions)", tables)
                }
                var byTable: [String: Set<Action>] = [:]
                for (table, actions) in tables {
                    byTable[table] = try Self.actions(actions, field: "restrict_resource.\(database).\(table)")
                }
                restrictions.resources[database] = byTable
            }
        }
        return (restrictions, given)
    }

    /// An array of action names.
    private static func actions(_ value: JSONValue, field: String) throws(EvdError) -> Set<Action> {
        guard case .array(let items) = value else { throw Arguments.wrongType(field, "an array of action names", value) }
        var actions = Set<Action>()
        for (index, item) in items.enumerated() {
            guard case .string(let name) = item else {
                throw .badRequest(field: field, "'\(field)[\(index)]' must be an action name, not \(item.typeName)")
            }
            guard let action = Action(rawValue: name) else {
                let known = Action.allCases.map(\.rawValue).joined(separator: ", ")
                throw .badRequest(field: field, "'\(name)' in '\(field)' is not an action (actions: \(known))")
            }
            actions.insert(action)
        }
        return actions
    }

    /// Whether the restrictions name any action at all (a set that names none allows nothing).
    var namesAnyAction: Bool {
        !self.all.isEmpty || self.databases.values.contains { !$0.isEmpty }
            || self.resources.values.contains { $0.values.contains { !$0.isEmpty } }
    }
}

/// Signs and checks tokens: `evd_` + base64url(payload JSON) + `.` + base64url(HMAC-SHA256 of
/// everything before the dot), keyed with the daemon's secret.
///
/// The secret is 32 random bytes in `STATE_DIR/token-secret`, made on the first start with mode
/// 0600; a secret file that anyone but its owner can read (or that is not the daemon's own, not a
/// regular file, or not 32 bytes) stops evd from starting. The same secret at the next start keeps
/// every token working; deleting the file revokes them all.
final class TokenAuthority: Sendable {
    /// Why the secret cannot be used.
    struct SecretError: Error, CustomStringConvertible {
        let description: String
    }

    static let secretFileName = "token-secret"
    static let secretBytes = 32
    static let prefix = "evd_"

    /// The secret's bytes (`SymmetricKey` is not `Sendable`; one is made for each use).
    private let secret: [UInt8]

    init(key: SymmetricKey) {
        self.secret = key.withUnsafeBytes { Array($0) }
    }

    private var key: SymmetricKey { SymmetricKey(data: self.secret) }

    /// Reads the secret in `stateDirectory`, creating it (atomically, mode 0600) when there is none.
    static func load(stateDirectory: String) throws(SecretError) -> TokenAuthority {
        let path = stateDirectory + "/" + Self.secretFileName
        if let key = try Self.readSecret(path) { return TokenAuthority(key: key) }
        try Self.createSecret(path)
        guard let key = try Self.readSecret(path) else { throw SecretError(description: "\(path) vanished after it was created") }
        return TokenAuthority(key: key)
    }

    /// The secret at `path`, or nil when there is no file.
    private static func readSecret(_ path: String) throws(SecretError) -> SymmetricKey? {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw SecretError(description: "cannot open the token secret \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw SecretError(description: "cannot stat the token secret \(path): \(String(cString: strerror(errno)))")
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw SecretError(description: "the token secret \(path) is not a regular file")
        }
        guard info.st_mode & 0o077 == 0 else {
            throw SecretError(
                description:
                    "the token secret \(path) has mode 0\(String(info.st_mode & 0o777, radix: 8)): others may read it; chmod 600 it (or delete it to revoke every token)"
            )
        }
        guard info.st_uid == geteuid() else {
            throw SecretError(description: "the token secret \(path) belongs to uid \(info.st_uid), not to evd's uid \(geteuid())")
        }
        var bytes = [UInt8](repeating: 0, count: Self.secretBytes + 1)
        var count = 0
        while count < bytes.count {
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + count, $0.count - count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else {
                throw SecretError(description: "cannot read the token secret \(path): \(String(cString: strerror(errno)))")
            }
            if n == 0 { break }
            count += n
        }
        guard count == Self.secretBytes else {
            throw SecretError(
                description:
                    "the token secret \(path) holds \(count == bytes.count ? "more than \(Self.secretBytes)" : "\(count)") bytes, not \(Self.secretBytes)"
            )
        }
        return SymmetricKey(data: bytes.prefix(Self.secretBytes))
    }

    /// Writes 32 fresh random bytes to `path`: to a temporary file of mode 0600 first, made
    /// durable, then renamed into place, so a crash never leaves a short secret.
    private static func createSecret(_ path: String) throws(SecretError) {
        let temporary = path + ".new"
        unlink(temporary)
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw SecretError(description: "cannot create the token secret \(temporary): \(String(cString: strerror(errno)))")
        }
        var ok = fchmod(fd, 0o600) == 0
        let secret = SymmetricKey(size: .bits256).withUnsafeBytes { Array($0) }
        var written = 0
        while ok && written < secret.count {
            let n = secret.withUnsafeBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { ok = false } else { written += n }
        }
        ok = ok && fsync(fd) == 0
        let failure = errno
        close(fd)
        guard ok, rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(ok ? errno : failure))
            unlink(temporary)
            throw SecretError(description: "cannot write the token secret \(path): \(reason)")
        }
        // Make the rename durable too.
        let directory = open(SocketDirectory.parent(of: path), O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directory >= 0 {
            fsync(directory)
            close(directory)
        }
    }

    /// The token for `payload`.
    func sign(_ payload: TokenPayload) -> String {
        let signed = Self.prefix + Base64URL.encode(payload.jsonValue.jsonBytes)
        let mac = HMAC<SHA256>.authenticationCode(for: Array(signed.utf8), using: self.key)
        return signed + "." + Base64URL.encode(Array(mac))
    }

    /// The payload of a token this daemon signed: `token_invalid` when it is not one (forged,
    /// altered, garbage), `token_expired` when it was but has expired at `now` (Unix seconds).
    func verify(_ token: String, now: Double) throws(EvdError) -> TokenPayload {
        let invalid = EvdError(.tokenInvalid, "the token is not one this evd signed (forged, altered or truncated)")
        guard token.hasPrefix(Self.prefix), token.utf8.count < 64 * 1024 else { throw invalid }
        let parts = token.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        guard parts.count == 2, let mac = Base64URL.decode(parts[1]), mac.count == SHA256.byteCount,
            HMAC<SHA256>.isValidAuthenticationCode(mac, authenticating: Array(parts[0]), using: self.key)
        else { throw invalid }
        guard let json = Base64URL.decode(parts[0].dropFirst(Self.prefix.utf8.count)),
            let value = try? JSONValue(parsing: json), let payload = TokenPayload(json: value)
        else { throw invalid }
        if ActorToken(expires: payload.expires).isExpired(at: now) {
            throw EvdError(.tokenExpired, "the token expired at \(EventTime.text(unixSeconds: payload.expires!))")
        }
        return payload
    }

    /// The current time in Unix seconds.
    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// Base64url without padding (RFC 4648 §5), as tokens use it. Decoding is strict: only the
/// canonical encoding of some bytes is accepted, so a token has exactly one spelling.
enum Base64URL {
    static func encode(_ bytes: [UInt8]) -> String {
        var text = Array(Base64.encode(bytes).utf8)
        while text.last == UInt8(ascii: "=") { text.removeLast() }
        for index in text.indices {
            if text[index] == UInt8(ascii: "+") { text[index] = UInt8(ascii: "-") }
            if text[index] == UInt8(ascii: "/") { text[index] = UInt8(ascii: "_") }
        }
        return String(decoding: text, as: UTF8.self)
    }

    static func decode(_ text: some Collection<UInt8>) -> [UInt8]? {
        guard text.count % 4 != 1 else { return nil }
        var standard: [UInt8] = []
        standard.reserveCapacity(text.count + 2)
        for byte in text {
            switch byte {
            case UInt8(ascii: "-"): standard.append(UInt8(ascii: "+"))
            case UInt8(ascii: "_"): standard.append(UInt8(ascii: "/"))
            case UInt8(ascii: "+"), UInt8(ascii: "/"), UInt8(ascii: "="): return nil
            default: standard.append(byte)
            }
        }
        while standard.count % 4 != 0 { standard.append(UInt8(ascii: "=")) }
        guard let bytes = Base64.decode(String(decoding: standard, as: UTF8.self)),
            Self.encode(bytes).utf8.elementsEqual(text)
        else { return nil }
        return bytes
    }
}
