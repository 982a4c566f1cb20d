import CSQLite
import EvdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A column's type affinity, by SQLite's rules for its declared type (`sqlite3AffinityType`).
enum ColumnAffinity {
    case integer, text, blob, real, numeric

    init(declaredType: String) {
        let type = Array(declaredType.utf8)
        func has(_ word: StaticString) -> Bool { ChangeCapture.BoundColumn.contains(type, word) }
        if has("INT") {
            self = .integer
        } else if has("CHAR") || has("CLOB") || has("TEXT") {
            self = .text
        } else if has("BLOB") || type.isEmpty {
            self = .blob  // none: values are stored as they are
        } else if has("REAL") || has("FLOA") || has("DOUB") {
            self = .real
        } else {
            self = .numeric
        }
    }
}

extension ChangeCapture {
    // MARK: Images from the values bound

    /// A structured insert's run of rows while it steps: the hook writes their after-images from
    /// the values bound (`appendBoundImage`) rather than reading each back from SQLite, which
    /// unpacks the row's whole record for it (most of what an image costs). Only where a value is
    /// stored as it was bound: see `BoundColumn`.
    struct BoundImages {
        /// The table's number in `tables`.
        let table: Int32
        /// For each of the table's columns, in order.
        let columns: [BoundColumn]
        /// The run's cells, `width` to a row, and the rows' text: where they lie while the run steps.
        let cells: UnsafeBufferPointer<JSONRows.Cell>
        let text: UnsafeBufferPointer<UInt8>
        let width: Int
    }

    /// A table column of an insert's run: where its value is in a row's cells, and which values
    /// SQLite stores as they are bound, or as a real. The column's affinity converts the others
    /// (text into an INTEGER column, a whole real into an INTEGER or NUMERIC one, a number into a
    /// TEXT one), and a NOT NULL or key column may turn a NULL into a default or a new rowid:
    /// those rows are read back from SQLite.
    struct BoundColumn {
        let key: Int
        let integer: Bool
        /// An integer is stored as a real (REAL affinity).
        let integerAsReal: Bool
        /// A real with a fraction is stored as it is.
        let real: Bool
        /// A whole real is stored as a real too (REAL affinity, or none).
        let wholeReal: Bool
        let text: Bool
        let null: Bool

        /// The column `info`, which takes the value at `key` of each row.
        init(_ info: ColumnInfo, key: Int) {
            self.key = key
            let affinity = ColumnAffinity(declaredType: info.type)
            self.integer = affinity == .integer || affinity == .numeric || affinity == .blob
            self.integerAsReal = affinity == .real
            self.real = affinity != .text
            self.wholeReal = affinity == .real || affinity == .blob
            self.text = affinity == .text || affinity == .blob
            self.null = !info.notNull && info.pk == 0
        }

        /// Whether `type` contains `word` (upper-case ASCII), ignoring ASCII case, as SQLite's
        /// `sqlite3AffinityType` compares.
        static func contains(_ type: [UInt8], _ word: StaticString) -> Bool {
            let n = word.utf8CodeUnitCount
            guard n <= type.count else { return false }
            let letters = UnsafeBufferPointer(start: word.utf8Start, count: n)
            for start in 0...(type.count - n) {
                var i = 0
                while i < n, type[start + i] & 0xDF == letters[i] { i += 1 }
                if i == n { return true }
            }
            return false
        }
    }

    /// Runs `body` (which steps the run's rows, setting `boundRow` before each) with the hook
    /// writing their after-images from `cells`. `columns`: `BoundColumn`s of `table`.
    func withBoundImages<T>(
        table: String,
        columns: [BoundColumn],
        cells: UnsafeBufferPointer<JSONRows.Cell>,
        text: UnsafeBufferPointer<UInt8>,
        width: Int,
        _ body: () throws -> T
    ) rethrows -> T {
        guard self.active, self.images else { return try body() }
        self.bound = BoundImages(table: self.intern(table), columns: columns, cells: cells, text: text, width: width)
        self.boundRow = 0
        defer { self.bound = nil }
        return try body()
    }

    /// Writes row `row` of `bound` as an after-image, as `evd_append_preupdate_image` would have
    /// read it back from SQLite; its length, or nil when a value would not be stored as bound.
    func appendBoundImage(_ bound: BoundImages, row: Int) -> Int? {
        let first = row * bound.width
        guard first + bound.width <= bound.cells.count else { return nil }
        var textBytes = 0
        for column in bound.columns {
            let cell = bound.cells[first + column.key]
            switch cell.kind {
            case .null: if !column.null { return nil }
            case .int: if !column.integer && !column.integerAsReal { return nil }
            case .double:
                let value = cell.double
                if !column.real || !value.isFinite || (!column.wholeReal && value.rounded() == value) { return nil }
            case .text:
                if !column.text { return nil }
                textBytes += cell.textRange.count
            case .bool, .other: return nil
            }
        }
        guard evd_bytes_reserve(&self.imageBytes, 10 + bound.columns.count * 11 + textBytes) != 0 else { return nil }
        let start = self.imageBytes.bytes + Int(self.imageBytes.count)
        var at = start
        func byte(_ value: UInt8) {
            at.pointee = value
            at += 1
        }
        at = evd_write_varint(at, UInt64(bound.columns.count))
        for column in bound.columns {
            let cell = bound.cells[first + column.key]
            switch cell.kind {
            case .int where column.integer:
                byte(RowImage.integer)
                at = evd_write_varint(at, evd_zigzag(cell.int))
            case .int, .double:
                // (An integer here goes into a REAL column: SQLite reads it as this real.)
                let real = cell.kind == .int ? Double(cell.int) : cell.double
                byte(RowImage.real)
                withUnsafeBytes(of: real.bitPattern.littleEndian) { bits in
                    UnsafeMutableRawPointer(at).copyMemory(from: bits.baseAddress!, byteCount: 8)
                }
                at += 8
            case .text:
                byte(RowImage.text)
                let range = cell.textRange
                at = evd_write_varint(at, UInt64(range.count))
                if !range.isEmpty {
                    UnsafeMutableRawPointer(at).copyMemory(from: bound.text.baseAddress! + range.lowerBound, byteCount: range.count)
                    at += range.count
                }
            default:
                byte(RowImage.null)
            }
        }
        let written = at - start
        self.imageBytes.count += written
        return written
    }
}
