import OrderedCollections

/// The error codes of PROTOCOL.md §7: the `code` of every error response.
public enum ErrorCode: String, Sendable, CaseIterable, Codable {
    case badJSON = "bad_json"
    case lineTooLong = "line_too_long"
    case badRequest = "bad_request"
    case unknownOp = "unknown_op"
    case unknownEvent = "unknown_event"
    case notVetoable = "not_vetoable"
    case permissionDenied = "permission_denied"
    case vetoed
    case sqlError = "sql_error"
    case noSuchDatabase = "no_such_database"
    case noSuchTable = "no_such_table"
    case noSuchRow = "no_such_row"
    case notInTransaction = "not_in_transaction"
    case alreadyInTransaction = "already_in_transaction"
    case timeout
    case busy
    case tokenInvalid = "token_invalid"
    case tokenExpired = "token_expired"
    case tooManyConnections = "too_many_connections"
    case shuttingDown = "shutting_down"
    /// Not in PROTOCOL.md §7: a response longer than `--max-response-bytes` (docs/protocol.md, "Limits").
    case responseTooLarge = "response_too_large"
    /// Not in PROTOCOL.md §7: a failure evd did not foresee (a bug, reported and logged instead of
    /// passed off as another code; docs/protocol.md, "Limits": unexpected failures).
    case internalError = "internal_error"
    /// Not in PROTOCOL.md §7: a durable cursor that another subscription uses now, or that does
    /// not exist (docs/protocol.md, "Durable cursors").
    case cursorInUse = "cursor_in_use"
    case noSuchCursor = "no_such_cursor"
}

/// An error response: the code, a message for people, and the extra fields some codes carry
/// (`field`, `sqlite_code`, `event`, `by`, `reason`, `suggestion`, `limit`, `max`).
public struct EvdError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The wire code, as a string so that codes from a newer daemon still round-trip.
    public var code: String
    /// What went wrong, for people.
    public var message: String
    /// The other members of the error object.
    public var extra: JSONObject

    /// Creates an error with a known code.
    public init(_ code: ErrorCode, _ message: String, extra: JSONObject = [:]) {
        self.code = code.rawValue
        self.message = message
        self.extra = extra
    }

    /// Creates an error from the `error` object of a response.
    public init(object: JSONObject) {
        self.code = object["code"]?.stringValue ?? "unknown"
        self.message = object["message"]?.stringValue ?? ""
        var extra = object
        extra.removeValue(forKey: "code")
        extra.removeValue(forKey: "message")
        self.extra = extra
    }

    /// A `bad_request` naming the argument at fault.
    public static func badRequest(field: String, _ message: String) -> EvdError {
        EvdError(.badRequest, message, extra: ["field": .string(field)])
    }

    /// The error object as it goes on the wire.
    public var jsonObject: JSONObject {
        var object: JSONObject = ["code": .string(self.code), "message": .string(self.message)]
        for (key, value) in self.extra { object[key] = value }
        return object
    }

    public var description: String {
        var text = "\(self.code): \(self.message)"
        if let field = self.extra["field"]?.stringValue { text += " (field \(field))" }
        if let sqlite = self.extra["sqlite_code"]?.stringValue { text += " [\(sqlite)]" }
        return text
    }
}
