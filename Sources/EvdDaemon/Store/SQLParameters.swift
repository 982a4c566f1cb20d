import CSQLite
import EvdClient
import OrderedCollections

/// Binding a request's parameters (EvdClient's `SQLParameters`) to a statement.
extension SQLParameters {
    /// Binds this statement's parameters, taking positional ones from `cursor` on; returns what was
    /// bound, as the events' `parameters`.
    func bind(_ statement: SQLiteStatement, cursor: inout Int) throws(EvdError) -> JSONValue {
        let count = statement.parameterCount
        switch self {
        case .none:
            if count > 0 { throw .badRequest(field: "params", "the SQL takes \(count) parameter(s) but none were given") }
            return .array([])
        case .positional(let values):
            let start = cursor
            try self.bindPositional(values, statement, count: count, cursor: &cursor)
            return .array(start == 0 && count == values.count ? values : Array(values[start..<cursor]))
        case .named(let object):
            var bound = JSONObject()
            for index in stride(from: 1, through: count, by: 1) {
                guard let name = statement.parameterName(index) else {
                    throw .badRequest(field: "params", "the SQL uses positional parameters (?) but params is an object")
                }
                let key = String(name.dropFirst())
                guard let value = object[key] else {
                    throw .badRequest(field: "params", "missing parameter '\(name)'")
                }
                try Self.bind(value, statement, index)
                bound[key] = value
            }
            return .object(bound)
        }
    }

    /// Binds this statement's parameters like `bind`, without making the events' copy of them (an
    /// executemany's sets are in its events already).
    func bindOnly(_ statement: SQLiteStatement, cursor: inout Int) throws(EvdError) {
        if case .positional(let values) = self {
            try self.bindPositional(values, statement, count: statement.parameterCount, cursor: &cursor)
        } else {
            _ = try self.bind(statement, cursor: &cursor)
        }
    }

    private func bindPositional(
        _ values: [JSONValue],
        _ statement: SQLiteStatement,
        count: Int,
        cursor: inout Int
    ) throws(EvdError) {
        guard cursor + count <= values.count else {
            throw .badRequest(field: "params", "the SQL takes at least \(cursor + count) parameter(s), \(values.count) given")
        }
        for offset in 0..<count { try Self.bind(values[cursor + offset], statement, offset + 1) }
        cursor += count
    }

    private static func bind(_ value: JSONValue, _ statement: SQLiteStatement, _ index: Int) throws(EvdError) {
        do {
            try statement.bind(value, at: index)
        } catch {
            throw error.evdError
        }
    }
}

/// The parameter sets of an executemany: a client's `params`, or a run of a structured insert's
/// rows (`JSONRows`), each row a set, bound from its cells where the parser put them.
enum ParameterSets {
    case sets([SQLParameters])
    /// `images`: how the hook may write the rows' after-images from the values bound (when every
    /// column of `table` is among the run's).
    case rows(JSONRows, JSONRows.Run, images: (table: String, columns: [ChangeCapture.BoundColumn])?)

    var count: Int {
        switch self {
        case .sets(let sets): sets.count
        case .rows(_, let run, _): run.rows.count
        }
    }

    /// Every set as the events show them: made only when an event is sent.
    var jsonValue: JSONValue {
        switch self {
        case .sets(let sets):
            return .array(sets.map(\.jsonValue))
        case .rows(let rows, let run, _):
            return .array(
                run.rows.map { row in
                    .array(run.keys.indices.map { rows.value(at: run.valueIndex(row: row, keyIndex: $0)) })
                }
            )
        }
    }

    /// Binds each set to `statement` in turn, checking that it fills the statement's parameters
    /// exactly, and calls `step` after each. `capture`: the connection's, for `images`.
    func forEach(_ statement: SQLiteStatement, capture: ChangeCapture, _ step: () throws -> Void) throws {
        switch self {
        case .sets(let sets):
            for (index, set) in sets.enumerated() {
                statement.reset()
                var cursor = 0
                do {
                    try set.bindOnly(statement, cursor: &cursor)
                } catch {
                    throw Self.located(error, index)
                }
                if let total = set.positionalCount, total != cursor {
                    throw EvdError.badRequest(field: "params[\(index)]", "\(total) parameter(s) given, the SQL takes \(cursor)")
                }
                try step()
            }
        case .rows(let rows, let run, let images):
            let width = run.keys.count
            let count = statement.parameterCount
            guard count == width else {
                throw EvdError.badRequest(field: "params[0]", "\(width) parameter(s) given, the SQL takes \(count)")
            }
            // Text binds from where it lies in `rows` (no copy), so no binding outlives this.
            defer { statement.clearBindings() }
            try rows.withUnsafeText { text in
                try rows.cells.withUnsafeBufferPointer { cells in
                    let runCells = UnsafeBufferPointer(rebasing: cells[run.values])
                    func stepAll() throws {
                        var cell = 0
                        for index in 0..<run.rows.count {
                            statement.rewind()  // every parameter is bound again
                            for parameter in 0..<width {
                                do throws(SQLiteError) {
                                    try statement.bind(runCells[cell], of: rows, text: text, at: Int32(parameter + 1))
                                } catch {
                                    throw Self.located(error.evdError, index)
                                }
                                cell += 1
                            }
                            capture.boundRow = index
                            try step()
                        }
                    }
                    guard let images else { return try stepAll() }
                    try capture.withBoundImages(
                        table: images.table,
                        columns: images.columns,
                        cells: runCells,
                        text: text,
                        width: width,
                        stepAll
                    )
                }
            }
        }
    }

    private static func located(_ error: EvdError, _ index: Int) -> EvdError {
        var error = error
        error.extra["field"] = .string("params[\(index)]")
        return error
    }
}
