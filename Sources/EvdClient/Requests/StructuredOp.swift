import OrderedCollections

/// The structured write ops of PROTOCOL.md §3 (`create_table`, `insert`, `upsert`, `update`,
/// `delete`, `drop_table`, `describe`), with Datasette's semantics and messages (docs/protocol.md
/// lists where evd differs).
///
/// Parsing checks everything that needs no database; the rest runs in `SQLRun` as statements evd
/// writes, through the same path as a client's SQL: the statement events (vetoable
/// `before_cursor_execute` included), the DDL events, and the captured changes that become the
/// committed events. Each op is its own transaction unless the session has one open.
public enum StructuredOp: Sendable, Hashable {
    case createTable(table: String, columns: [ColumnSpec]?, rows: JSONRows?, keys: [String], ignore: Bool, replace: Bool, alter: Bool)
    case insert(table: String, rows: JSONRows, ignore: Bool, replace: Bool, alter: Bool, returning: Bool)
    case upsert(table: String, rows: JSONRows, alter: Bool, returning: Bool)
    case update(table: String, key: [JSONValue], update: JSONObject, alter: Bool, returning: Bool)
    case delete(table: String, key: [JSONValue])
    case dropTable(table: String)
    case describe(table: String)

    /// A column of `create_table`'s `columns`.
    public struct ColumnSpec: Sendable, Hashable {
        public let name: String
        public let type: String

        public init(name: String, type: String) {
            self.name = name
            self.type = type
        }
    }

    /// The table the op is about.
    public var table: String {
        switch self {
        case .createTable(let table, _, _, _, _, _, _), .insert(let table, _, _, _, _, _), .upsert(let table, _, _, _),
            .update(let table, _, _, _, _), .delete(let table, _), .dropTable(let table), .describe(let table):
            table
        }
    }

    // MARK: Parsing

    /// Parses a structured op's request (its `database` aside). `flatRows`: the request's `rows`
    /// when the parser read them flat (`Request`).
    public static func parse(_ op: String, _ args: inout Arguments, flatRows: JSONRows? = nil) throws(EvdError) -> StructuredOp {
        let table = try Self.tableName(&args)
        switch op {
        case "create_table":
            let columnsValue = try args.array("columns")
            let rows = try Self.rows(flatRows, &args)
            let pk = try args.string("pk")
            let pks = try args.strings("pks")
            let ignore = try args.bool("ignore")
            let replace = try args.bool("replace")
            let alter = try args.bool("alter") ?? false
            guard columnsValue != nil || rows != nil else {
                throw .badRequest(field: "columns", "columns or rows is required")
            }
            if columnsValue != nil && rows != nil {
                throw .badRequest(field: "columns", "Cannot specify columns with rows")
            }
            var columns: [ColumnSpec]?
            if let columnsValue { columns = try Self.columnSpecs(columnsValue) }
            if let rows, rows.isEmpty { throw .badRequest(field: "rows", "columns or rows is required") }
            if pk != nil && pks != nil { throw .badRequest(field: "pks", "Cannot specify both pk and pks") }
            let keys = pks ?? pk.map { [$0] } ?? []
            if Set(keys).count != keys.count { throw .badRequest(field: "pks", "pks must not repeat a column") }
            if ignore == true && replace == true {
                throw .badRequest(field: "replace", "ignore and replace are mutually exclusive")
            }
            if ignore != nil || replace != nil {
                if rows == nil { throw .badRequest(field: ignore != nil ? "ignore" : "replace", "ignore and replace require rows") }
                if keys.isEmpty { throw .badRequest(field: ignore != nil ? "ignore" : "replace", "ignore and replace require pk or pks") }
            }
            if let columns {
                let names = Set(columns.map { $0.name.lowercased() })
                for key in keys where !names.contains(key.lowercased()) && keys.count > 1 {
                    throw .badRequest(field: "pks", "pks names a column that is not in columns: \(key)")
                }
            }
            return .createTable(
                table: table,
                columns: columns,
                rows: rows,
                keys: keys,
                ignore: ignore ?? false,
                replace: replace ?? false,
                alter: alter
            )
        case "insert", "upsert":
            guard let rows = try Self.rows(flatRows, &args) else {
                throw .badRequest(field: "rows", "missing required argument 'rows'")
            }
            let ignore = try args.bool("ignore")
            let replace = try args.bool("replace")
            let alter = try args.bool("alter") ?? false
            let returning = try args.bool("return") ?? false
            if op == "upsert" {
                if ignore != nil || replace != nil {
                    throw .badRequest(field: ignore != nil ? "ignore" : "replace", "Upsert does not support ignore or replace")
                }
                return .upsert(table: table, rows: rows, alter: alter, returning: returning)
            }
            if ignore == true && replace == true {
                throw .badRequest(field: "replace", "Cannot use \"ignore\" and \"replace\" at the same time")
            }
            return .insert(
                table: table,
                rows: rows,
                ignore: ignore ?? false,
                replace: replace ?? false,
                alter: alter,
                returning: returning
            )
        case "update":
            let key = try Self.keyValues(&args)
            let update = try args.requiredObject("update")
            for (column, value) in update { _ = try Self.cell(value, field: "update.\(column)") }
            let alter = try args.bool("alter") ?? false
            let returning = try args.bool("return") ?? false
            return .update(table: table, key: key, update: update, alter: alter, returning: returning)
        case "delete":
            return .delete(table: table, key: try Self.keyValues(&args))
        case "drop_table":
            return .dropTable(table: table)
        default:
            return .describe(table: table)
        }
    }

    private static func tableName(_ args: inout Arguments) throws(EvdError) -> String {
        let table = try args.requiredString("table")
        guard !table.isEmpty else { throw .badRequest(field: "table", "Table is required") }
        guard !table.lowercased().hasPrefix("sqlite_"), !table.contains("\n") else {
            throw .badRequest(field: "table", "Invalid table name: '\(table)' (names starting with sqlite_ are SQLite's)")
        }
        return table
    }

    private static func columnSpecs(_ values: [JSONValue]) throws(EvdError) -> [ColumnSpec] {
        guard !values.isEmpty else { throw .badRequest(field: "columns", "columns or rows is required") }
        var specs: [ColumnSpec] = []
        var seen: Set<String> = []
        var duplicates: [String] = []
        for (index, value) in values.enumerated() {
            guard case .object(let object) = value else {
                throw .badRequest(field: "columns[\(index)]", "columns must be a list of objects")
            }
            for key in object.keys where key != "name" && key != "type" {
                throw .badRequest(field: "columns[\(index)].\(key)", "unknown column property '\(key)' (a column has name and type)")
            }
            guard case .string(let name)? = object["name"], !name.isEmpty else {
                throw .badRequest(field: "columns[\(index)].name", "Column name is required")
            }
            let type: String
            switch object["type"] {
            case nil, .null?: type = "text"
            case .string(let given)?: type = given.lowercased()
            case let other?: throw Arguments.wrongType("columns[\(index)].type", "a string", other)
            }
            guard ["text", "integer", "float", "blob"].contains(type) else {
                throw .badRequest(field: "columns[\(index)].type", "Unsupported column type: \(type) (text, integer, float or blob)")
            }
            if !seen.insert(name.lowercased()).inserted { duplicates.append(name) }
            specs.append(ColumnSpec(name: name, type: type))
        }
        if !duplicates.isEmpty {
            throw .badRequest(field: "columns", "Duplicate column name: \(duplicates.joined(separator: ", "))")
        }
        return specs
    }

    /// The rows of `insert`/`upsert`/`create_table` (`nil` when the request has none): as the
    /// parser read them flat, or from the request's array (a `before_execute` listener's rewrite,
    /// rows with nested values); each value as SQLite stores it (`cell`).
    private static func rows(_ flat: JSONRows?, _ args: inout Arguments) throws(EvdError) -> JSONRows? {
        var rows: JSONRows
        if let flat {
            rows = flat
        } else if let array = try args.array("rows") {
            for (index, value) in array.enumerated() where value.objectValue == nil {
                throw .badRequest(field: "rows[\(index)]", "rows must be a list of objects, rows[\(index)] is \(value.typeName)")
            }
            rows = JSONRows(objects: array) ?? JSONRows()
        } else {
            return nil
        }
        let stored = rows.cells.allSatisfy { cell in
            switch cell.kind {
            case .null, .int, .double, .text: true
            case .bool, .other: false
            }
        }
        if !stored {
            try rows.replaceValues { (value, row, key) throws(EvdError) -> JSONValue? in
                switch value {
                case .null, .int, .double, .string: nil
                default: try Self.cell(value, field: "rows[\(row)].\(key)")
                }
            }
        }
        return rows
    }

    /// `pks`: one row's primary key values, in key order.
    private static func keyValues(_ args: inout Arguments) throws(EvdError) -> [JSONValue] {
        guard let key = try args.array("pks") else { throw .badRequest(field: "pks", "missing required argument 'pks'") }
        guard !key.isEmpty else { throw .badRequest(field: "pks", "pks must hold the row's primary key values") }
        for (index, value) in key.enumerated() {
            switch value {
            case .int, .double, .string: continue
            default: throw .badRequest(field: "pks[\(index)]", "a primary key value must be a number or a string, not \(value.typeName)")
            }
        }
        return key
    }

    /// A row's value as SQLite stores it: scalars as they are, `true`/`false` as 1/0, a blob
    /// `{"$base64": ...}` as bytes, `{"$real": ...}` and `{"$text_base64": ...}` as what they stand
    /// for (`ValueForms`), any other object or array as its JSON text (as Datasette does). An
    /// integer beyond 64 bits is `bad_request`.
    public static func cell(_ value: JSONValue, field: @autoclosure () -> String) throws(EvdError) -> JSONValue {
        if let decoded = try ValueForms.decoded(value, field: field()) { return decoded }
        switch value {
        case .null, .int, .double, .string: return value
        case .number: return value  // (refused by `ValueForms.decoded`)
        case .bool(let b): return .int(b ? 1 : 0)
        case .object(let object) where object.count == 1 && object["$base64"] != nil:
            guard let text = object["$base64"]?.stringValue, Base64.decode(text) != nil else {
                throw .badRequest(field: field(), "Invalid $base64 encoded value")
            }
            return value
        case .array, .object:
            return .string(String(decoding: value.jsonBytes, as: UTF8.self))
        }
    }

    /// The SQLite type Datasette (sqlite-utils) gives a column from the values rows hold for it.
    public static func inferredType(_ values: [JSONValue]) -> String {
        var kinds: Set<String> = []
        for value in values {
            switch value {
            case .null: continue
            case .int, .number: kinds.insert("int")
            case .bool: kinds.insert("bool")
            case .double: kinds.insert("float")
            case .string, .array: kinds.insert("str")
            case .object(let object): kinds.insert(object.count == 1 && object["$base64"] != nil ? "bytes" : "str")
            }
        }
        switch kinds {
        case []: return "TEXT"
        case ["int"], ["bool"], ["int", "bool"]: return "INTEGER"
        case ["float"], ["int", "float"], ["float", "bool"], ["int", "float", "bool"]: return "REAL"
        case ["bytes"], ["bytes", "str"]: return "BLOB"
        default: return "TEXT"
        }
    }
}
