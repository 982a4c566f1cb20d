/// The JSON forms of the SQLite values plain JSON cannot carry unchanged (docs/protocol.md,
/// "Values"), as a request may send them back: a BLOB `{"$base64": "..."}`, an infinite REAL
/// `{"$real": "Infinity"}` or `{"$real": "-Infinity"}`, and TEXT whose bytes are not UTF-8
/// `{"$text_base64": "..."}`. evd writes them (`JSONWriter.appendDouble`, `appendText`); here
/// they are read back.
public enum ValueForms {
    /// The double of `{"$real": "Infinity"}` or `{"$real": "-Infinity"}`; nil for anything else.
    /// (No NaN: SQLite stores a NaN as NULL, so none is ever read, and NULL is `null`.)
    public static func real(_ object: JSONObject) -> Double? {
        guard object.count == 1, let text = object["$real"]?.stringValue else { return nil }
        switch text {
        case "Infinity": return .infinity
        case "-Infinity": return -.infinity
        default: return nil
        }
    }

    /// The bytes of `{"$text_base64": "..."}`; nil for anything else (or invalid base64).
    public static func textBytes(_ object: JSONObject) -> [UInt8]? {
        guard object.count == 1, let text = object["$text_base64"]?.stringValue else { return nil }
        return Base64.decode(text)
    }

    /// A value to store, as it binds: `{"$real": ...}` as its double, `{"$text_base64": ...}`
    /// checked and kept (it binds as TEXT of its bytes); nil when `value` is none of these forms
    /// (nor an integer beyond 64 bits). A misspelt form, and an integer SQLite cannot hold, are
    /// `bad_request` naming `field`: neither may become a value of another type unnoticed.
    public static func decoded(_ value: JSONValue, field: @autoclosure () -> String) throws(EvdError) -> JSONValue? {
        switch value {
        case .number(let text):
            throw .badRequest(
                field: field(),
                "\(text) is outside SQLite's 64-bit integer range; send it as a string, or with a fraction or exponent for a REAL"
            )
        case .object(let object) where object.count == 1 && object["$real"] != nil:
            guard let real = Self.real(object) else {
                throw .badRequest(field: field(), #"$real must be "Infinity" or "-Infinity""#)
            }
            return .double(real)
        case .object(let object) where object.count == 1 && object["$text_base64"] != nil:
            guard Self.textBytes(object) != nil else { throw .badRequest(field: field(), "Invalid $text_base64 encoded value") }
            return value
        default:
            return nil
        }
    }
}
