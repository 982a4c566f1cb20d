import EvdClient

/// A subscription's `where` (PROTOCOL.md §3): property → the values it accepts; an event passes
/// when every listed property has one of its values.
///
/// **Cost.** Filters are checked under the bus's lock for every event a subscription's names
/// match, so their cost is everyone's: each property's values are a hash set, and a check costs
/// one lookup per property however long the lists are. Their size is bounded too
/// (`--max-filter-values`, checked by `subscribe`), so that what one connection can make evd hold
/// stays small.
///
/// **Equality** is JSON's, except that an integer equals the same real (`5 == 5.0`), as a filter
/// user expects: numbers are kept as doubles (so very large integers that one double cannot tell
/// apart are equal, as before).
struct WhereFilter: Sendable {
    /// One property and the values it accepts (normalized: see `key(_:)`).
    struct Clause: Sendable {
        let property: String
        let accepted: Set<JSONValue>
    }

    let clauses: [Clause]
    /// How many values the request listed in all (a duplicate counts).
    let valueCount: Int

    /// No filter: every event passes.
    static let none = WhereFilter(clauses: [], valueCount: 0)

    private init(clauses: [Clause], valueCount: Int) {
        self.clauses = clauses
        self.valueCount = valueCount
    }

    /// Reads `where` (its members in order): each value is a scalar or a list of scalars. A
    /// filter of more than `maxValues` values in all is refused with `bad_request` naming the
    /// limit (`max-filter-values`); nothing else is refused.
    init(_ object: JSONObject, maxValues: Int) throws(EvdError) {
        var total = 0
        for (_, value) in object { total += value.arrayValue?.count ?? 1 }
        guard total <= maxValues else {
            throw EvdError(
                .badRequest,
                "'where' lists \(total) values, more than the \(maxValues) evd accepts per subscription (--max-filter-values)",
                extra: ["field": "where", "limit": "max-filter-values", "max": .integer(maxValues)]
            )
        }
        var clauses: [Clause] = []
        for (property, value) in object {
            let listed = value.arrayValue ?? [value]
            guard listed.allSatisfy(\.isScalar) else {
                throw EvdError.badRequest(
                    field: "where.\(property)",
                    "a where value must be a scalar or a list of scalars"
                )
            }
            clauses.append(Clause(property: property, accepted: Set(listed.map(Self.key))))
        }
        self.init(clauses: clauses, valueCount: total)
    }

    var isEmpty: Bool { self.clauses.isEmpty }

    /// The form a value is compared in: numbers as doubles (`5` and `5.0` are one key), anything
    /// else as it is.
    @inline(__always)
    static func key(_ value: JSONValue) -> JSONValue {
        switch value {
        case .int(let integer): return .double(Double(integer))
        default: return value
        }
    }

    /// Whether an event passes, given its name, its envelope's `session` and actor `id`, and its
    /// properties. An absent property, or one whose value is an array or object, does not pass.
    func passes(name: String, session: JSONValue, actor: JSONValue, properties: JSONObject) -> Bool {
        for clause in self.clauses {
            let value: JSONValue?
            switch clause.property {
            case "event": value = .string(name)
            case "session": value = session
            case "actor": value = actor
            default: value = properties[clause.property]
            }
            guard let value, value.isScalar, clause.accepted.contains(Self.key(value)) else { return false }
        }
        return true
    }

    /// Whether an event whose `property` is `value` could pass (other properties unknown): what a
    /// replay asks of a journal's source (`database`) before it reads it.
    func mayPass(_ property: String, _ value: JSONValue) -> Bool {
        self.clauses.allSatisfy { $0.property != property || $0.accepted.contains(Self.key(value)) }
    }
}
