#if canImport(Glibc)
import OrderedCollections
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import EvdClient

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

/// Whose work caused an event: a session and its actor, or the daemon itself (both `null`).
///
/// The envelope fragment `,"session":S,"actor":{...}` is encoded once per origin, not once per event.
public struct EventOrigin: Sendable {
    public let session: UInt64?
    public let actor: Actor?
    /// `,"session":…,"actor":…` ready to splice into an event.
    let envelopeFragment: [UInt8]

    public init(session: UInt64?, actor: Actor?) {
        self.session = session
        self.actor = actor
        var bytes: [UInt8] = Array(#","session":"#.utf8)
        if let session { JSONWriter.appendInt(Int64(session), to: &bytes) } else { bytes += Array("null".utf8) }
        bytes += Array(#","actor":"#.utf8)
        (actor?.jsonValue ?? .null).write(into: &bytes)
        self.envelopeFragment = bytes
    }

    /// The daemon's own work.
    public static let daemon = EventOrigin(session: nil, actor: nil)
}

/// Wall-clock time as the envelope writes it: `2026-11-21T10:00:00.123456Z`.
enum EventTime {
    /// Appends the current UTC time, quoted, to `bytes` without going through Foundation.
    static func appendNow(to bytes: inout [UInt8]) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        bytes.append(UInt8(ascii: "\""))
        self.append(seconds: ts.tv_sec, micros: Int(ts.tv_nsec / 1000), to: &bytes)
        bytes.append(UInt8(ascii: "\""))
    }

    /// The UTC time `seconds` ago, unquoted: the journal compares these as text (they sort as times).
    static func text(secondsAgo seconds: Int) -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var bytes: [UInt8] = []
        self.append(seconds: ts.tv_sec - seconds, micros: Int(ts.tv_nsec / 1000), to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// `unixSeconds` as the envelope writes a time, unquoted.
    static func text(unixSeconds: Int64) -> String {
        var bytes: [UInt8] = []
        self.append(seconds: Int(unixSeconds), micros: 0, to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func append(seconds: Int, micros: Int, to bytes: inout [UInt8]) {
        var seconds = seconds
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func two(_ n: Int32) { bytes.append(UInt8(48 + n / 10)); bytes.append(UInt8(48 + n % 10)) }
        let year = Int(parts.tm_year) + 1900
        for divisor in [1000, 100, 10, 1] { bytes.append(UInt8(48 + (year / divisor) % 10)) }
        bytes.append(UInt8(ascii: "-")); two(parts.tm_mon + 1)
        bytes.append(UInt8(ascii: "-")); two(parts.tm_mday)
        bytes.append(UInt8(ascii: "T")); two(parts.tm_hour)
        bytes.append(UInt8(ascii: ":")); two(parts.tm_min)
        bytes.append(UInt8(ascii: ":")); two(parts.tm_sec)
        bytes.append(UInt8(ascii: "."))
        for divisor in [100_000, 10_000, 1000, 100, 10, 1] { bytes.append(UInt8(48 + (micros / divisor) % 10)) }
        bytes.append(UInt8(ascii: "Z"))
    }
}
