/// Subject helpers.
public enum NATSSubject {
    /// Makes any string one safe subject token, reversibly (`untoken` gives it back).
    ///
    /// A subject is tokens joined by `.`; `*` and `>` are wildcards and whitespace ends the subject
    /// in the protocol's control line. So those bytes, every control byte, and `%` itself are written
    /// as `%XX` (upper-case hex of the UTF-8 byte): `"a.b c"` → `"a%2Eb%20c"`, `"100%"` → `"100%25"`.
    /// Every other byte, non-ASCII UTF-8 included, stays as it is. The empty string, which would make
    /// an empty token, is `"%"` — a lone `%` never occurs otherwise, since an escaped `%` is `%25`.
    public static func token(_ name: String) -> String {
        if name.isEmpty { return "%" }
        var out = [UInt8]()
        out.reserveCapacity(name.utf8.count)
        let hex = Array("0123456789ABCDEF".utf8)
        for byte in name.utf8 {
            switch byte {
            case 0...0x20, 0x7f, UInt8(ascii: "."), UInt8(ascii: "*"), UInt8(ascii: ">"), UInt8(ascii: "%"):
                out += [UInt8(ascii: "%"), hex[Int(byte >> 4)], hex[Int(byte & 0x0f)]]
            default:
                out.append(byte)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The string `token(_:)` made `token` from; `nil` when `token` is not such an escape (a bad `%`
    /// sequence, or a byte `token(_:)` would have escaped).
    public static func untoken(_ token: String) -> String? {
        if token == "%" { return "" }
        var out = [UInt8]()
        var bytes = token.utf8.makeIterator()
        func hexValue(_ byte: UInt8?) -> UInt8? {
            switch byte {
            case .some(let b) where b >= UInt8(ascii: "0") && b <= UInt8(ascii: "9"): b - UInt8(ascii: "0")
            case .some(let b) where b >= UInt8(ascii: "A") && b <= UInt8(ascii: "F"): b - UInt8(ascii: "A") + 10
            default: nil
            }
        }
        while let byte = bytes.next() {
            switch byte {
            case UInt8(ascii: "%"):
                guard let high = hexValue(bytes.next()), let low = hexValue(bytes.next()) else { return nil }
                out.append(high << 4 | low)
            case 0...0x20, 0x7f, UInt8(ascii: "."), UInt8(ascii: "*"), UInt8(ascii: ">"):
                return nil
            default:
                out.append(byte)
            }
        }
        return String(validating: out, as: UTF8.self)
    }
}
