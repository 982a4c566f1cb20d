#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Wall-clock time as the envelope writes it: `2026-11-21T10:00:00.123456Z`.
public enum EventTime {
    /// Appends the current UTC time, quoted, to `bytes` without going through Foundation.
    public static func appendNow(to bytes: inout [UInt8]) {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        bytes.append(UInt8(ascii: "\""))
        self.append(seconds: ts.tv_sec, micros: Int(ts.tv_nsec / 1000), to: &bytes)
        bytes.append(UInt8(ascii: "\""))
    }

    /// The UTC time `seconds` ago, unquoted: the journal compares these as text (they sort as times).
    public static func text(secondsAgo seconds: Int) -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var bytes: [UInt8] = []
        self.append(seconds: ts.tv_sec - seconds, micros: Int(ts.tv_nsec / 1000), to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// `unixSeconds` as the envelope writes a time, unquoted.
    public static func text(unixSeconds: Int64) -> String {
        var bytes: [UInt8] = []
        self.append(seconds: Int(unixSeconds), micros: 0, to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func append(seconds: Int, micros: Int, to bytes: inout [UInt8]) {
        var seconds = seconds
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func two(_ n: Int32) {
            bytes.append(UInt8(48 + n / 10))
            bytes.append(UInt8(48 + n % 10))
        }
        let year = Int(parts.tm_year) + 1900
        for divisor in [1000, 100, 10, 1] { bytes.append(UInt8(48 + (year / divisor) % 10)) }
        bytes.append(UInt8(ascii: "-"))
        two(parts.tm_mon + 1)
        bytes.append(UInt8(ascii: "-"))
        two(parts.tm_mday)
        bytes.append(UInt8(ascii: "T"))
        two(parts.tm_hour)
        bytes.append(UInt8(ascii: ":"))
        two(parts.tm_min)
        bytes.append(UInt8(ascii: ":"))
        two(parts.tm_sec)
        bytes.append(UInt8(ascii: "."))
        for divisor in [100_000, 10_000, 1000, 100, 10, 1] { bytes.append(UInt8(48 + (micros / divisor) % 10)) }
        bytes.append(UInt8(ascii: "Z"))
    }
}
