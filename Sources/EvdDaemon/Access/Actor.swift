import EvdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The process on the other end of a connection, from its peer credentials (PROTOCOL.md §8).
public struct Actor: Sendable, Equatable {
    /// `uid:N`.
    public var id: String
    public var uid: UInt32
    public var gid: UInt32
    public var pid: Int32
    /// The user name for `uid`, when the system knows one.
    public var user: String?
    /// The user's supplementary groups (from the group database, read once at connect), for
    /// grants by group.
    public var groups: [UInt32] = []
    /// What the token this actor logged in with narrows its rights to: every set must allow an
    /// action (a token made by a token's session carries its maker's sets too). Empty: no token.
    public var restrictions: [TokenRestrictions] = []
    /// The token this actor logged in with (its expiry), shown on the wire; nil: peer credentials.
    public var token: ActorToken?

    public init(uid: UInt32, gid: UInt32, pid: Int32, user: String?, groups: [UInt32] = []) {
        self.id = "uid:\(uid)"
        self.uid = uid
        self.gid = gid
        self.pid = pid
        self.user = user
        self.groups = groups
    }

    /// The supplementary groups of `user` (whose primary group is `gid`).
    public static func groups(user: String?, gid: UInt32) -> [UInt32] {
        guard let user else { return [] }
        var count: Int32 = 64
        while true {
            var groups = [gid_t](repeating: 0, count: Int(count))
            var found = count
            if getgrouplist(user, gid, &groups, &found) >= 0 { return Array(groups.prefix(Int(found))) }
            guard found > count else { return [] }
            count = found
        }
    }

    /// The actor from its wire form (`jsonValue`); nil if it is not one.
    public init?(json: JSONValue) {
        guard let id = json["id"]?.stringValue, let uid = json["uid"]?.intValue, let gid = json["gid"]?.intValue,
            let pid = json["pid"]?.intValue
        else { return nil }
        self.init(uid: UInt32(clamping: uid), gid: UInt32(clamping: gid), pid: Int32(clamping: pid), user: json["user"]?.stringValue)
        self.id = id
    }

    /// The actor as the wire shows it.
    public var jsonValue: JSONValue {
        var object: JSONObject = [
            "id": .string(self.id), "uid": .integer(self.uid), "gid": .integer(self.gid), "pid": .integer(self.pid),
            "user": self.user.map(JSONValue.string) ?? .null,
        ]
        if let token = self.token { object["token"] = token.jsonValue }
        return .object(object)
    }

    /// The user name of `uid`, from the password database.
    public static func userName(uid: UInt32) -> String? {
        var pwd = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 4096)
        guard getpwuid_r(uid, &pwd, &buffer, buffer.count, &result) == 0, result != nil, let name = pwd.pw_name else {
            return nil
        }
        return String(cString: name)
    }
}
