#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A list of JSON objects (the `rows` of an insert) held flat: every row's values, row after row,
/// in one array of compact cells whose text lies in one byte buffer, and the keys once per run of
/// consecutive rows that have the same keys in the same order.
///
/// A thousand rows of four columns are one array of 4000 cells, one buffer of their text and one
/// list of four keys, instead of a thousand dictionaries and a string per text value: cheaper to
/// parse, to walk, to free, and to bind to a prepared statement (a run's cells are the parameter
/// sets of one `INSERT` back to back, and text binds from where it lies).
public struct JSONRows: Sendable, Hashable {
    /// Consecutive rows with the same keys.
    public struct Run: Sendable, Hashable {
        /// The keys of each of these rows, in order (no two equal).
        public let keys: [String]
        /// The rows' positions in the list.
        public fileprivate(set) var rows: Range<Int>
        /// Where the first row's values start in ``JSONRows/cells``; each row has `keys.count`.
        public let firstValue: Int

        /// The positions in ``JSONRows/cells`` of all of this run's values.
        public var values: Range<Int> { firstValue..<(firstValue + rows.count * keys.count) }

        /// The position in ``JSONRows/cells`` of the value of `row` (a position in the list) for
        /// the key at `keyIndex`.
        public func valueIndex(row: Int, keyIndex: Int) -> Int {
            firstValue + (row - rows.lowerBound) * keys.count + keyIndex
        }
    }

    /// One value: a scalar in place, text as a range of ``JSONRows/text``, anything else (an array
    /// or an object) in a side list.
    public struct Cell: Sendable, Hashable {
        public enum Kind: UInt8, Sendable {
            case null, bool, int, double, text, other
        }

        public let kind: Kind
        /// The integer, the double's bits, the bool (0 or 1), the text's offset, or the other
        /// value's index.
        let bits: UInt64
        /// The text's length in bytes.
        let length: UInt32

        init(_ kind: Kind, _ bits: UInt64, length: UInt32 = 0) {
            self.kind = kind
            self.bits = bits
            self.length = length
        }

        public static let null = Cell(.null, 0)
        public static func bool(_ value: Bool) -> Cell { Cell(.bool, value ? 1 : 0) }
        public static func int(_ value: Int64) -> Cell { Cell(.int, UInt64(bitPattern: value)) }
        public static func double(_ value: Double) -> Cell { Cell(.double, value.bitPattern) }

        /// The integer of an `int` cell, the bool of a `bool` cell as 0 or 1.
        public var int: Int64 { Int64(bitPattern: bits) }
        /// The double of a `double` cell.
        public var double: Double { Double(bitPattern: bits) }
        /// Where a `text` cell's UTF-8 lies in ``JSONRows/text``.
        public var textRange: Range<Int> { Int(bits)..<(Int(bits) + Int(length)) }
    }

    /// The runs, in order; together they cover every row.
    public private(set) var runs: [Run] = []
    /// Every row's values, in its keys' order, row after row.
    public private(set) var cells: [Cell] = []
    /// The UTF-8 of every text value, back to back.
    public private(set) var text: [UInt8] = []
    /// The values that are neither scalars nor text (`Cell.Kind.other`).
    private var others: [JSONValue] = []

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
        let first = self.cells.count
        for value in values { self.cells.append(self.cell(value)) }
        self.endRow(keys: keys, firstValue: first)
    }

    /// The cell for `value`, its text added to `text` (or the value to `others`).
    private mutating func cell(_ value: JSONValue) -> Cell {
        switch value {
        case .null: return .null
        case .bool(let b): return .bool(b)
        case .int(let i): return .int(i)
        case .double(let d): return .double(d)
        case .string(var s) where s.utf8.count <= Int(UInt32.max): return s.withUTF8 { self.textCell($0) }
        case .string, .number, .array, .object:  // (a text cell's length is 32 bits)
            self.others.append(value)
            return Cell(.other, UInt64(self.others.count - 1))
        }
    }

    /// A text cell for `bytes`, which it adds to `text`.
    fileprivate mutating func textCell(_ bytes: UnsafeBufferPointer<UInt8>) -> Cell {
        let start = self.text.count
        self.text.append(contentsOf: bytes)
        return Cell(.text, UInt64(start), length: UInt32(bytes.count))
    }

    /// Ends a row whose values were appended to `cells` from `firstValue` on: it joins the last
    /// run when it has that run's keys.
    fileprivate mutating func endRow(keys: [String], firstValue: Int) {
        if let last = runs.last, last.keys == keys {
            extendLastRun()
        } else {
            runs.append(Run(keys: keys, rows: count..<(count + 1), firstValue: firstValue))
        }
    }

    /// Counts one more row in the last run.
    fileprivate mutating func extendLastRun() {
        let last = runs.count - 1
        runs[last].rows = runs[last].rows.lowerBound..<(runs[last].rows.upperBound + 1)
    }

    /// The value of cell `index`.
    public func value(at index: Int) -> JSONValue {
        let cell = cells[index]
        switch cell.kind {
        case .null: return .null
        case .bool: return .bool(cell.bits != 0)
        case .int: return .int(cell.int)
        case .double: return .double(cell.double)
        case .text: return .string(String(decoding: text[cell.textRange], as: UTF8.self))
        case .other: return others[Int(cell.bits)]
        }
    }

    /// The value of an `other` cell (an array or an object).
    public func other(_ cell: Cell) -> JSONValue {
        precondition(cell.kind == .other, "not an other cell")
        return others[Int(cell.bits)]
    }

    /// Every row's values, as ``cells`` holds them.
    public var values: [JSONValue] { cells.indices.map(self.value(at:)) }

    /// Replaces the value of cell `index`.
    public mutating func setValue(_ value: JSONValue, at index: Int) {
        self.cells[index] = self.cell(value)
    }

    /// Calls `body` with the bytes of ``text`` where they are: what a text cell's range indexes.
    public func withUnsafeText<R, E: Error>(_ body: (UnsafeBufferPointer<UInt8>) throws(E) -> R) throws(E) -> R {
        let result = text.withUnsafeBufferPointer { bytes in Result { () throws(E) -> R in try body(bytes) } }
        return try result.get()
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
        return JSONObject(uncheckedUniqueKeys: run.keys, values: (start..<(start + run.keys.count)).map(self.value(at:)))
    }

    /// The values the rows that have `key` hold for it, in row order.
    public func column(_ key: String) -> [JSONValue] {
        var column: [JSONValue] = []
        for run in runs {
            guard let keyIndex = run.keys.firstIndex(of: key) else { continue }
            for row in run.rows { column.append(self.value(at: run.valueIndex(row: row, keyIndex: keyIndex))) }
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
                    if let replacement = try transform(self.value(at: index), row, key) { self.setValue(replacement, at: index) }
                    index += 1
                }
            }
        }
    }
}

extension JSONRows {
    /// Builds a list as the parser reads it: cells go straight into the list, text into a buffer
    /// of the builder's own (copied into the list once, at the end), and each row ends with its
    /// keys.
    struct Builder: ~Copyable {
        private var rows = JSONRows()
        private var cells: UnsafeMutablePointer<Cell>
        private var cellCount = 0
        private var cellCapacity: Int
        private var text: UnsafeMutablePointer<UInt8>
        private var textCount = 0
        private var textCapacity: Int

        init(capacity: Int) {
            cellCapacity = max(capacity, 16)
            cells = .allocate(capacity: cellCapacity)
            textCapacity = cellCapacity * 8
            text = .allocate(capacity: textCapacity)
        }

        deinit {
            cells.deallocate()
            text.deallocate()
        }

        /// Where the next row's values start.
        var valueCount: Int { cellCount }

        var isEmpty: Bool { rows.isEmpty }

        @inline(__always)
        mutating func append(_ cell: Cell) {
            if cellCount == cellCapacity {
                let grown = UnsafeMutablePointer<Cell>.allocate(capacity: cellCapacity * 2)
                grown.moveInitialize(from: cells, count: cellCount)
                cells.deallocate()
                cells = grown
                cellCapacity *= 2
            }
            (cells + cellCount).initialize(to: cell)
            cellCount += 1
        }

        /// Appends a text value, copying its UTF-8.
        @inline(__always)
        mutating func appendText(_ bytes: UnsafeBufferPointer<UInt8>) {
            if textCount + bytes.count > textCapacity {
                let capacity = max(textCapacity * 2, textCount + bytes.count)
                let grown = UnsafeMutablePointer<UInt8>.allocate(capacity: capacity)
                grown.update(from: text, count: textCount)
                text.deallocate()
                text = grown
                textCapacity = capacity
            }
            if let source = bytes.baseAddress { memcpy(text + textCount, source, bytes.count) }
            self.append(Cell(.text, UInt64(textCount), length: UInt32(bytes.count)))
            textCount += bytes.count
        }

        /// Ends the row whose values start at `firstValue`; `newRun`: its keys may differ from the
        /// last run's (else they are the same).
        @inline(__always)
        mutating func endRow(keys: [String], firstValue: Int, newRun: Bool) {
            if newRun || rows.runs.isEmpty {
                rows.runs.append(Run(keys: keys, rows: rows.count..<(rows.count + 1), firstValue: firstValue))
            } else {
                rows.extendLastRun()
            }
        }

        /// The list.
        consuming func finish() -> JSONRows {
            var rows = self.rows
            rows.cells = Array(UnsafeBufferPointer(start: cells, count: cellCount))
            rows.text = Array(UnsafeBufferPointer(start: text, count: textCount))
            return rows
        }
    }
}
