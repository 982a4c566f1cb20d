import OrderedCollections

/// The parameters of a request: none, positional (`[1, "x"]`) or named (`{"n": 5}` for `:n`, `@n`, `$n`).
public enum SQLParameters: Sendable, Hashable {
    case none
    case positional([JSONValue])
    case named(JSONObject)

    /// Validates a request's `params` value: an array or object of scalars, `{"$base64": ...}`
    /// blobs and the other forms of `ValueForms`, each kept as it binds.
    public init(_ value: JSONValue?, field: String = "params") throws(EvdError) {
        switch value {
        case nil, .null?:
            self = .none
        case .array(var values)?:
            for index in values.indices { values[index] = try Self.checked(values[index], field: "\(field)[\(index)]") }
            self = .positional(values)
        case .object(var object)?:
            for (key, value) in object { object[key] = try Self.checked(value, field: "\(field).\(key)") }
            self = .named(object)
        case let other?:
            throw Arguments.wrongType(field, "an array or an object", other)
        }
    }

    /// A parameter value as it binds: a scalar, a blob `{"$base64": "..."}`, or a form
    /// `ValueForms.decoded` reads (`{"$real": ...}` as its double, `{"$text_base64": ...}` checked;
    /// an integer beyond 64 bits refused); `true`/`false` bind as 1/0.
    private static func checked(_ value: JSONValue, field: String) throws(EvdError) -> JSONValue {
        if let decoded = try ValueForms.decoded(value, field: field) { return decoded }
        switch value {
        case .null, .bool, .int, .double, .string:
            return value
        case .object(let object) where object.count == 1:
            guard let text = object["$base64"]?.stringValue, Base64.decode(text) != nil else { fallthrough }
            return value
        default:
            throw .badRequest(field: field, "a parameter must be a scalar or {\"$base64\": \"...\"}, not \(value.typeName)")
        }
    }

    /// The parameters as the events show them.
    public var jsonValue: JSONValue {
        switch self {
        case .none: return .array([])
        case .positional(let values): return .array(values)
        case .named(let object): return .object(object)
        }
    }

    public var isEmpty: Bool {
        switch self {
        case .none: return true
        case .positional(let values): return values.isEmpty
        case .named(let object): return object.isEmpty
        }
    }

    /// The parameters a script's statement is shown before it is prepared (`before_cursor_execute`):
    /// the positional ones not taken by the statements before it, or all the named ones.
    public func remaining(from cursor: Int) -> JSONValue {
        switch self {
        case .none: return .array([])
        case .positional(let values): return .array(cursor == 0 ? values : Array(values[min(cursor, values.count)...]))
        case .named(let object): return .object(object)
        }
    }

    /// Whether events' `parameters` hold none (`do_execute_no_params` rather than `do_execute`).
    public static func isEmptyJSON(_ value: JSONValue) -> Bool {
        switch value {
        case .array(let values): return values.isEmpty
        case .object(let object): return object.isEmpty
        default: return true
        }
    }

    /// How many positional parameters there are (for the "all consumed" check).
    public var positionalCount: Int? {
        if case .positional(let values) = self { return values.count }
        return nil
    }
}
