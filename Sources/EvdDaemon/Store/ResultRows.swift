import EvdClient

/// The rows of a statement's result as `execute` collects them, bounded by the largest response
/// evd sends (`--max-response-bytes`).
///
/// Why here and not only when the response is written: a result is held whole as `JSONValue`s
/// before it is serialized, several times its JSON's size, so a query for a few hundred megabytes
/// would have grown evd by as much again before it could be refused. The rows are counted as they
/// are stepped, and the statement stops at the first row that takes the result past the bound.
/// The count is a lower bound of the JSON's size (a string's bytes without escapes, a number's
/// one digit), so a result that fits is never refused here; the response's exact size is checked
/// when it is written (`Session.respond`).
struct ResultRows {
    /// The most bytes of response the request running in this task may make. SQLite threads do
    /// not see it: what runs there takes it along when it is created (`SQLRun.maxResponseBytes`).
    @TaskLocal static var maxResponseBytes: Int = .max

    /// The bound: the most bytes the rows may take as JSON.
    let limit: Int
    private(set) var rows: [[JSONValue]] = []
    /// The rows' size as JSON, at least.
    private(set) var bytes = 0

    init(limit: Int) {
        self.limit = limit
    }

    /// Adds a row, or throws `response_too_large` when it takes the rows past the bound.
    mutating func append(_ row: [JSONValue]) throws(EvdError) {
        self.bytes += 3  // `[`, `]` and the comma after it
        for value in row { self.bytes += Self.minimumLength(value) + 1 }
        guard self.bytes <= self.limit else { throw EvdError.responseTooLarge(max: self.limit) }
        self.rows.append(row)
    }

    /// How many bytes `value` takes as JSON, at least (without reading a string's characters).
    static func minimumLength(_ value: JSONValue) -> Int {
        switch value {
        case .null, .bool: return 4
        case .int, .double: return 1
        case .number(let text): return text.utf8.count
        case .string(let text): return text.utf8.count + 2
        case .array(let items): return items.reduce(2) { $0 + Self.minimumLength($1) + 1 }
        case .object(let members):
            return members.reduce(2) { $0 + $1.key.utf8.count + 4 + Self.minimumLength($1.value) }
        }
    }
}

extension EvdError {
    /// `response_too_large`: the response would be longer than `--max-response-bytes`.
    static func responseTooLarge(max: Int) -> EvdError {
        EvdError(
            .responseTooLarge,
            "the response would be larger than \(max) bytes, the most evd sends (--max-response-bytes); ask for less (LIMIT, fewer columns)",
            extra: ["limit": "max-response-bytes", "max": .integer(max)]
        )
    }
}
