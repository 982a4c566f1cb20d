#if canImport(Glibc)
import OrderedCollections
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import EvdClient

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
