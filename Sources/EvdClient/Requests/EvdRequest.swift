import OrderedCollections

/// A request as read from its line: its members, and apart from them the `rows` of an
/// `insert`, `upsert` or `create_table`, held flat (`JSONRows`: no dictionary per row).
public struct EvdRequest: Sendable {
    /// The members (without `rows` when `rows` holds them).
    public var object: JSONObject
    public var rows: JSONRows?

    /// The ops whose `rows` are read flat.
    public static let rowOps: Set<String> = ["insert", "upsert", "create_table"]

    public init(_ object: JSONObject, rows: JSONRows? = nil) {
        self.object = object
        self.rows = rows
    }

    public subscript(key: String) -> JSONValue? { self.object[key] }

    /// The request whole, as the events show it (`rows` last).
    public var whole: JSONObject {
        guard let rows else { return self.object }
        var object = self.object
        object["rows"] = rows.jsonValue
        return object
    }
}
