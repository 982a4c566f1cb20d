import OrderedCollections

// Compact JSON output into a byte array. No Foundation.

extension JSONValue {
    /// Appends this value as compact JSON (no spaces, object keys in stored order) to `bytes`.
    ///
    /// ±infinity, which JSON has no number for, is written as `{"$real":"Infinity"}` or
    /// `{"$real":"-Infinity"}`; NaN as `null` (SQLite has no NaN: it stores one as NULL).
    public func write(into bytes: inout [UInt8]) {
        switch self {
        case .null:
            JSONWriter.appendASCII("null", to: &bytes)
        case .bool(let b):
            JSONWriter.appendASCII(b ? "true" : "false", to: &bytes)
        case .int(let i):
            JSONWriter.appendInt(i, to: &bytes)
        case .double(let d):
            JSONWriter.appendDouble(d, to: &bytes)
        case .number(let text):
            bytes.append(contentsOf: text.utf8)
        case .string(let s):
            JSONWriter.appendString(s, to: &bytes)
        case .array(let elements):
            bytes.append(UInt8(ascii: "["))
            var first = true
            for element in elements {
                if !first { bytes.append(UInt8(ascii: ",")) }
                first = false
                element.write(into: &bytes)
            }
            bytes.append(UInt8(ascii: "]"))
        case .object(let object):
            bytes.append(UInt8(ascii: "{"))
            var first = true
            for (key, value) in object {
                if !first { bytes.append(UInt8(ascii: ",")) }
                first = false
                JSONWriter.appendString(key, to: &bytes)
                bytes.append(UInt8(ascii: ":"))
                value.write(into: &bytes)
            }
            bytes.append(UInt8(ascii: "}"))
        }
    }

    /// This value as compact JSON in UTF-8 bytes.
    public var jsonBytes: [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(64)
        write(into: &bytes)
        return bytes
    }

    /// This value as a compact JSON string.
    public var jsonString: String {
        String(decoding: jsonBytes, as: UTF8.self)
    }
}

/// Building blocks for writing JSON by hand into a byte array, as used by ``JSONValue/write(into:)``.
public enum JSONWriter {
    /// Appends `s` as a quoted JSON string.
    ///
    /// `"` and `\` are escaped, as are control characters below U+0020 (`\n`, `\r`, `\t`,
    /// `\b`, `\f` in their short forms, the rest as `\u00xx`). Everything else, U+007F and
    /// all non-ASCII characters included, is written as raw UTF-8.
    public static func appendString(_ s: String, to bytes: inout [UInt8]) {
        var s = s  // `withUTF8` is mutating; for a native string this neither copies nor allocates.
        s.withUTF8 { utf8 in appendEscaped(utf8, to: &bytes) }
    }

    /// Appends the decimal digits of `i` (with a leading `-` when negative) without allocating.
    public static func appendInt(_ i: Int64, to bytes: inout [UInt8]) {
        if i >= 0 && i < 10 {
            bytes.append(UInt8(truncatingIfNeeded: i) &+ UInt8(ascii: "0"))
            return
        }
        // 20 bytes fit Int64.min: "-9223372036854775808". Digits are written back to front
        // into a stack buffer; `magnitude` makes Int64.min safe.
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 20) { buffer in
            var magnitude = i.magnitude
            var position = 20
            repeat {
                let (quotient, remainder) = magnitude.quotientAndRemainder(dividingBy: 10)
                position -= 1
                buffer[position] = UInt8(truncatingIfNeeded: remainder) &+ UInt8(ascii: "0")
                magnitude = quotient
            } while magnitude != 0
            if i < 0 {
                position -= 1
                buffer[position] = UInt8(ascii: "-")
            }
            bytes.append(contentsOf: UnsafeBufferPointer(rebasing: buffer[position...]))
        }
    }

    /// Appends `d` as the shortest text that reads back as the same `Double`
    /// ("0.1", "1.0", "1e-05", "1e+16", "5e-324"); ±infinity as `{"$real":"Infinity"}` and
    /// `{"$real":"-Infinity"}` (JSON has no number for them; `null` would read as SQL NULL), NaN
    /// as `null` (SQLite stores a NaN as NULL, so none comes out of it).
    ///
    /// The text is Swift's `description`, which for finite values always matches JSON's
    /// number grammar. A finite double always keeps a `.` or an exponent, so it reads back
    /// as `.double`, never `.int`.
    public static func appendDouble(_ d: Double, to bytes: inout [UInt8]) {
        guard d.isFinite else {
            if d.isNaN {
                appendASCII("null", to: &bytes)
            } else {
                appendASCII(d < 0 ? #"{"$real":"-Infinity"}"# : #"{"$real":"Infinity"}"#, to: &bytes)
            }
            return
        }
        // Fast path: whole numbers below 10^15 print as their digits plus ".0", exactly as
        // `description` does, without building a String. (-0.0 keeps its sign via `description`.)
        // (Checked by converting to Int64 and back, which needs no libm.)
        if d.magnitude < 1e15, case let i = Int64(d), Double(i) == d, !(i == 0 && d.sign == .minus) {
            appendInt(i, to: &bytes)
            bytes.append(UInt8(ascii: "."))
            bytes.append(UInt8(ascii: "0"))
            return
        }
        // Fast path: one to three decimals below 2^31 (prices, scores, measurements), as
        // `description` writes them. The fewest decimals whose number reads back as `d` are the
        // shortest text; below 2^31 a double's neighbours are nearer than 0.001, so that number
        // is the only one with so few decimals, and the closest.
        if d.magnitude >= 0.001, d.magnitude < 2_147_483_648 {
            var scale = 10.0
            for decimals in 1...3 {
                // The nearest number of units (no libm: converted to Int64); the check decides.
                let units = Int64(d * scale + (d < 0 ? -0.5 : 0.5))
                if Double(units) / scale == d {
                    let units = units.magnitude
                    let unit = UInt64(scale)
                    if d < 0 { bytes.append(UInt8(ascii: "-")) }
                    appendInt(Int64(units / unit), to: &bytes)
                    bytes.append(UInt8(ascii: "."))
                    var fraction = units % unit
                    var divisor = unit / 10
                    for _ in 0..<decimals {
                        bytes.append(UInt8(truncatingIfNeeded: fraction / divisor) &+ UInt8(ascii: "0"))
                        fraction %= divisor
                        divisor /= 10
                    }
                    return
                }
                scale *= 10
            }
        }
        bytes.append(contentsOf: d.description.utf8)
    }

    /// Appends a TEXT value's bytes: as a JSON string when they are valid UTF-8 (almost always),
    /// else as `{"$text_base64":"..."}`, so that no byte is lost (a string would need U+FFFD in
    /// place of the invalid ones, and the value written back would not be the one read).
    public static func appendText(_ utf8: UnsafeBufferPointer<UInt8>, to bytes: inout [UInt8]) {
        // Fast path: ASCII (most text) is valid UTF-8 and needs no further look.
        if utf8.allSatisfy({ $0 < 0x80 }) || isValidUTF8(utf8) {
            appendEscaped(utf8, to: &bytes)
        } else {
            appendASCII(#"{"$text_base64":""#, to: &bytes)
            bytes += Base64.encode(utf8).utf8
            appendASCII(#""}"#, to: &bytes)
        }
    }

    /// Appends an ASCII literal such as `null` (or a fixed piece of JSON) as is.
    public static func appendASCII(_ text: StaticString, to bytes: inout [UInt8]) {
        bytes.append(contentsOf: UnsafeBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
    }

    /// Appends UTF-8 text as a quoted JSON string, escaped as ``appendString(_:to:)`` does: for
    /// text already in bytes (read from SQLite), without making a `String` of it.
    public static func appendEscaped(_ utf8: UnsafeBufferPointer<UInt8>, to bytes: inout [UInt8]) {
        bytes.append(UInt8(ascii: "\""))
        // Fast path: scan for the next byte that needs escaping and copy the whole run of
        // bytes before it in one `append(contentsOf:)`. Most strings are a single run.
        var runStart = 0
        var i = 0
        let count = utf8.count
        while i < count {
            let byte = utf8[i]
            if byte >= 0x20 && byte != UInt8(ascii: "\"") && byte != UInt8(ascii: "\\") {
                i += 1
                continue
            }
            if runStart < i {
                bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[runStart..<i]))
            }
            bytes.append(UInt8(ascii: "\\"))
            switch byte {
            case UInt8(ascii: "\""): bytes.append(UInt8(ascii: "\""))
            case UInt8(ascii: "\\"): bytes.append(UInt8(ascii: "\\"))
            case 0x0A: bytes.append(UInt8(ascii: "n"))
            case 0x0D: bytes.append(UInt8(ascii: "r"))
            case 0x09: bytes.append(UInt8(ascii: "t"))
            case 0x08: bytes.append(UInt8(ascii: "b"))
            case 0x0C: bytes.append(UInt8(ascii: "f"))
            default:
                // Other control characters: \u00xx with lowercase hex.
                let hexDigits: StaticString = "0123456789abcdef"
                bytes.append(UInt8(ascii: "u"))
                bytes.append(UInt8(ascii: "0"))
                bytes.append(UInt8(ascii: "0"))
                bytes.append(hexDigits.utf8Start[Int(byte >> 4)])
                bytes.append(hexDigits.utf8Start[Int(byte & 0x0F)])
            }
            i += 1
            runStart = i
        }
        if runStart < count {
            bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[runStart..<count]))
        }
        bytes.append(UInt8(ascii: "\""))
    }
}

extension JSONWriter {
    /// Whether `bytes` are well-formed UTF-8 (no overlong forms, surrogates, code points above
    /// U+10FFFF or sequences cut short), as the JSON parser requires of a string.
    public static func isValidUTF8(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        var i = 0
        let count = bytes.count
        @inline(__always) func continuation(_ at: Int) -> Bool { at < count && bytes[at] & 0xC0 == 0x80 }
        while i < count {
            let lead = bytes[i]
            switch lead {
            case 0x00...0x7F:
                i += 1
            case 0xC2...0xDF:
                guard continuation(i + 1) else { return false }
                i += 2
            case 0xE0...0xEF:
                guard i + 1 < count else { return false }
                let second = bytes[i + 1]
                switch lead {
                case 0xE0: guard second >= 0xA0 && second <= 0xBF else { return false }  // no overlongs
                case 0xED: guard second >= 0x80 && second <= 0x9F else { return false }  // no surrogates
                default: guard second & 0xC0 == 0x80 else { return false }
                }
                guard continuation(i + 2) else { return false }
                i += 3
            case 0xF0...0xF4:
                guard i + 1 < count else { return false }
                let second = bytes[i + 1]
                switch lead {
                case 0xF0: guard second >= 0x90 && second <= 0xBF else { return false }  // no overlongs
                case 0xF4: guard second >= 0x80 && second <= 0x8F else { return false }  // ≤ U+10FFFF
                default: guard second & 0xC0 == 0x80 else { return false }
                }
                guard continuation(i + 2), continuation(i + 3) else { return false }
                i += 4
            default:
                return false  // 80..BF (a continuation), C0, C1 (overlong), F5..FF
            }
        }
        return true
    }
}

extension JSONValue {
    /// A TEXT value from its bytes: a string when they are valid UTF-8, else
    /// `{"$text_base64": "..."}` (see ``JSONWriter/appendText(_:to:)``).
    public init(text utf8: UnsafeBufferPointer<UInt8>) {
        if let string = String(validating: utf8, as: UTF8.self) {
            self = .string(string)
        } else {
            self = ["$text_base64": .string(Base64.encode(utf8))]
        }
    }
}
