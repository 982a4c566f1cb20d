/// A list of JSON objects (the `rows` of an insert) held flat: every row's values, row after row,
/// in one array, and the keys once per run of consecutive rows that have the same keys in the same
/// order.
///
/// A thousand rows of four columns are one array of 4000 values and one list of four keys, instead
/// of a thousand dictionaries: cheaper to parse, to walk and to bind to a prepared statement, and
/// a run's values are the parameter sets of one `INSERT` back to back.
public struct JSONRows: Sendable, Hashable {
    /// Consecutive rows with the same keys.
    public struct Run: Sendable, Hashable {
        /// The keys of each of these rows, in order (no two equal).
        public let keys: [String]
        /// The rows' positions in the list.
        public fileprivate(set) var rows: Range<Int>
        /// Where the first row's values start in ``JSONRows/values``; each row has `keys.count`.
        public let firstValue: Int

        /// The positions in ``JSONRows/values`` of all of this run's values.
        public var values: Range<Int> { firstValue..<(firstValue + rows.count * keys.count) }

        /// The position in ``JSONRows/values`` of the value of `row` (a position in the list) for
        /// the key at `keyIndex`.
        public func valueIndex(row: Int, keyIndex: Int) -> Int {
            firstValue + (row - rows.lowerBound) * keys.count + keyIndex
        }
    }

    /// The runs, in order; together they cover every row.
    public private(set) var runs: [Run] = []
    /// Every row's values, in its keys' order, row after row.
    public private(set) var values: [JSONValue] = []

    /// An empty list.
    public init() {}

    /// The objects of `array`; `nil` when an element is not an object.
    public init?(objects array: [JSONValue]) {
        for element in array {
            guard case .object(let object) = element else { return nil }
            self.append(object)
        }
    }

    /// The number of rows.
    public var count: Int { runs.last?.rows.upperBound ?? 0 }

    /// Whether there are no rows.
    public var isEmpty: Bool { runs.isEmpty }

    /// Adds a row.
    public mutating func append(_ row: JSONObject) {
        self.append(keys: row.keys.elements, values: row.values.elements)
    }

    /// Adds a row with these keys (no two equal) and values (as many).
    public mutating func append(keys: [String], values: some Collection<JSONValue>) {
        precondition(keys.count == values.count, "a row needs a value for each key")
        let first = self.values.count
        self.values.append(contentsOf: values)
        self.endRow(keys: keys, firstValue: first)
    }

    /// Ends a row whose values were appended to `values` from `firstValue` on: it joins the last
    /// run when it has that run's keys.
    fileprivate mutating func endRow(keys: [String], firstValue: Int) {
        if let last = runs.indices.last, runs[last].keys == keys {
            runs[last].rows = runs[last].rows.lowerBound..<(runs[last].rows.upperBound + 1)
        } else {
            runs.append(Run(keys: keys, rows: count..<(count + 1), firstValue: firstValue))
        }
    }

    /// The run that holds `row`.
    public func run(of row: Int) -> Run {
        precondition(row >= 0 && row < count, "row \(row) is out of range")
        var low = 0
        var high = runs.count - 1
        while low < high {
            let middle = (low + high) / 2
            if runs[middle].rows.upperBound <= row { low = middle + 1 } else { high = middle }
        }
        return runs[low]
    }

    /// Row `row` as an object.
    public subscript(row: Int) -> JSONObject {
        let run = self.run(of: row)
        let start = run.valueIndex(row: row, keyIndex: 0)
        return JSONObject(uncheckedUniqueKeys: run.keys, values: values[start..<(start + run.keys.count)])
    }

    /// The values the rows that have `key` hold for it, in row order.
    public func column(_ key: String) -> [JSONValue] {
        var column: [JSONValue] = []
        for run in runs {
            guard let keyIndex = run.keys.firstIndex(of: key) else { continue }
            for row in run.rows { column.append(values[run.valueIndex(row: row, keyIndex: keyIndex)]) }
        }
        return column
    }

    /// The rows as a JSON array of objects.
    public var jsonValue: JSONValue {
        .array((0..<count).map { .object(self[$0]) })
    }

    /// Replaces values in place: `transform` sees each value with its row and key, and returns a
    /// replacement or `nil` to keep it.
    public mutating func replaceValues<E: Error>(
        _ transform: (_ value: JSONValue, _ row: Int, _ key: String) throws(E) -> JSONValue?
    ) throws(E) {
        for run in runs {
            var index = run.firstValue
            for row in run.rows {
                for key in run.keys {
                    if let replacement = try transform(values[index], row, key) { values[index] = replacement }
                    index += 1
                }
            }
        }
    }
}

extension JSONRows {
    /// Builds a list as the parser reads it: values go straight into `values`, and each row ends
    /// with its keys.
    struct Builder {
        var rows = JSONRows()

        init(capacity: Int) {
            rows.values.reserveCapacity(capacity)
        }

        /// Where the next row's values start.
        var valueCount: Int { rows.values.count }

        mutating func appendValue(_ value: JSONValue) { rows.values.append(value) }

        /// Ends the row whose values start at `firstValue`.
        mutating func endRow(keys: [String], firstValue: Int) {
            rows.endRow(keys: keys, firstValue: firstValue)
        }
    }
}
