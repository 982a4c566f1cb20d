import OrderedCollections

/// A request's arguments, read with validation: every reader names the argument in the
/// `bad_request` it throws, and `finish()` rejects arguments no reader asked for.
public struct Arguments {
    let object: JSONObject
    /// The keys read so far. A request has a handful: an array is cheaper than hashing each.
    private var used: [String] = ["op", "id"]

    public init(_ object: JSONObject) {
        self.object = object
    }

    /// The raw value of `key`, marking it used.
    public mutating func value(_ key: String) -> JSONValue? {
        if !self.used.contains(key) { self.used.append(key) }
        return self.object[key]
    }

    public mutating func required(_ key: String) throws(EvdError) -> JSONValue {
        guard let value = self.value(key), !value.isNull else {
            throw .badRequest(field: key, "missing required argument '\(key)'")
        }
        return value
    }

    public mutating func string(_ key: String) throws(EvdError) -> String? {
        guard let value = self.value(key), !value.isNull else { return nil }
        guard case .string(let s) = value else { throw Self.wrongType(key, "a string", value) }
        return s
    }

    public mutating func requiredString(_ key: String) throws(EvdError) -> String {
        let value = try self.required(key)
        guard case .string(let s) = value else { throw Self.wrongType(key, "a string", value) }
        return s
    }

    public mutating func bool(_ key: String) throws(EvdError) -> Bool? {
        guard let value = self.value(key), !value.isNull else { return nil }
        guard case .bool(let b) = value else { throw Self.wrongType(key, "a boolean", value) }
        return b
    }

    /// An integer in `range`; out-of-range values are rejected, never clamped.
    public mutating func int(_ key: String, in range: ClosedRange<Int64>? = nil) throws(EvdError) -> Int64? {
        guard let value = self.value(key), !value.isNull else { return nil }
        return try Self.integer(value, field: key, in: range)
    }

    public mutating func requiredInt(_ key: String, in range: ClosedRange<Int64>? = nil) throws(EvdError) -> Int64 {
        try Self.integer(try self.required(key), field: key, in: range)
    }

    public mutating func object(_ key: String) throws(EvdError) -> JSONObject? {
        guard let value = self.value(key), !value.isNull else { return nil }
        guard case .object(let o) = value else { throw Self.wrongType(key, "an object", value) }
        return o
    }

    public mutating func requiredObject(_ key: String) throws(EvdError) -> JSONObject {
        let value = try self.required(key)
        guard case .object(let o) = value else { throw Self.wrongType(key, "an object", value) }
        return o
    }

    public mutating func array(_ key: String) throws(EvdError) -> [JSONValue]? {
        guard let value = self.value(key), !value.isNull else { return nil }
        guard case .array(let a) = value else { throw Self.wrongType(key, "an array", value) }
        return a
    }

    /// A string that must be one of `choices`.
    public mutating func choice(_ key: String, _ choices: [String]) throws(EvdError) -> String? {
        guard let s = try self.string(key) else { return nil }
        guard choices.contains(s) else {
            throw .badRequest(field: key, "'\(key)' must be one of \(choices.joined(separator: ", ")), not '\(s)'")
        }
        return s
    }

    /// A string, or an array of strings (a single name is accepted where a list is expected).
    public mutating func strings(_ key: String) throws(EvdError) -> [String]? {
        guard let value = self.value(key), !value.isNull else { return nil }
        switch value {
        case .string(let s):
            return [s]
        case .array(let items):
            var result: [String] = []
            for (index, item) in items.enumerated() {
                guard case .string(let s) = item else {
                    throw .badRequest(field: key, "'\(key)[\(index)]' must be a string, not \(item.typeName)")
                }
                result.append(s)
            }
            return result
        default:
            throw Self.wrongType(key, "an array of strings", value)
        }
    }

    /// Rejects any argument that no reader asked for.
    public func finish() throws(EvdError) {
        for key in self.object.keys where !self.used.contains(key) {
            throw .badRequest(field: key, "unknown argument '\(key)'")
        }
    }

    public static func integer(_ value: JSONValue, field: String, in range: ClosedRange<Int64>?) throws(EvdError) -> Int64 {
        guard case .int(let n) = value else { throw wrongType(field, "an integer", value) }
        if let range, !range.contains(n) {
            throw .badRequest(field: field, "'\(field)' must be between \(range.lowerBound) and \(range.upperBound), not \(n)")
        }
        return n
    }

    public static func wrongType(_ key: String, _ expected: String, _ value: JSONValue) -> EvdError {
        .badRequest(field: key, "'\(key)' must be \(expected), not \(value.typeName)")
    }
}
