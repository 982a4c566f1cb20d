import CSQLite
import EvdClient
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Row images in the compact binary form the pre-update hook records and the journal keeps; JSON
/// is made from it only for a `rows: true` subscriber, live or replaying, and always by
/// `render(row:…)`, so a replay writes the same bytes live delivery wrote.
///
/// A row is `varint n` then its `n` values in column order; a value is a tag byte and its payload:
/// NULL; an integer (zigzag varint); a real (its 8 bytes, little-endian bit pattern); text or a
/// blob (varint length, the bytes as SQLite keeps them); or, for a value recorded as `JSONValue`
/// that is none of those, its JSON (varint length, the bytes).
enum RowImage {
    static let null: UInt8 = 0
    static let integer: UInt8 = 1
    static let real: UInt8 = 2
    static let text: UInt8 = 3
    static let blob: UInt8 = 4
    static let json: UInt8 = 5

    // MARK: Writing

    @inline(__always)
    static func appendVarint(_ value: UInt64, to bytes: inout [UInt8]) {
        var value = value
        while value >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: value) | 0x80)
            value >>= 7
        }
        bytes.append(UInt8(truncatingIfNeeded: value))
    }

    @inline(__always)
    static func appendVarint(_ value: Int, to bytes: inout [UInt8]) {
        Self.appendVarint(UInt64(value), to: &bytes)
    }

    /// Appends a value recorded as JSON (a row read while its table's shape was unknown).
    static func append(_ value: JSONValue, to bytes: inout [UInt8]) {
        switch value {
        case .null:
            bytes.append(Self.null)
        case .int(let int):
            bytes.append(Self.integer)
            Self.appendVarint(evd_zigzag(int), to: &bytes)
        case .double(let double):
            bytes.append(Self.real)
            withUnsafeBytes(of: double.bitPattern.littleEndian) { bytes.append(contentsOf: $0) }
        case .string(var string):
            bytes.append(Self.text)
            string.withUTF8 { utf8 in
                Self.appendVarint(utf8.count, to: &bytes)
                bytes.append(contentsOf: utf8)
            }
        default:
            let json = value.jsonBytes
            bytes.append(Self.json)
            Self.appendVarint(json.count, to: &bytes)
            bytes += json
        }
    }

    /// Appends a row of JSON values.
    static func append(row: [JSONValue], to bytes: inout [UInt8]) {
        Self.appendVarint(row.count, to: &bytes)
        for value in row { Self.append(value, to: &bytes) }
    }

    // MARK: Reading

    /// Reads a varint at `position` of `bytes`, moving past it; `nil` when the bytes end first.
    @inline(__always)
    static func readVarint(_ bytes: UnsafeRawBufferPointer, _ position: inout Int) -> UInt64? {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        while position < bytes.count, shift < 64 {
            let byte = bytes[position]
            position += 1
            value |= UInt64(byte & 0x7f) << shift
            if byte < 0x80 { return value }
            shift += 7
        }
        return nil
    }

    /// Reads a length (a varint no larger than what is left of `bytes`).
    @inline(__always)
    static func readLength(_ bytes: UnsafeRawBufferPointer, _ position: inout Int) -> Int? {
        guard let length = Self.readVarint(bytes, &position), length <= UInt64(bytes.count - position) else { return nil }
        return Int(length)
    }

    /// Writes the value at `position` as JSON, moving past it; `false` when the bytes are not a value.
    static func render(value bytes: UnsafeRawBufferPointer, _ position: inout Int, into out: inout [UInt8]) -> Bool {
        guard position < bytes.count else { return false }
        let tag = bytes[position]
        position += 1
        switch tag {
        case Self.null:
            JSONWriter.appendASCII("null", to: &out)
        case Self.integer:
            guard let zigzag = Self.readVarint(bytes, &position) else { return false }
            JSONWriter.appendInt(Int64(bitPattern: (zigzag >> 1) ^ (0 &- (zigzag & 1))), to: &out)
        case Self.real:
            guard position + 8 <= bytes.count else { return false }
            var bits: UInt64 = 0
            withUnsafeMutableBytes(of: &bits) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[position..<(position + 8)])) }
            position += 8
            JSONWriter.appendDouble(Double(bitPattern: UInt64(littleEndian: bits)), to: &out)
        case Self.text:
            guard let count = Self.readLength(bytes, &position) else { return false }
            let utf8 = UnsafeRawBufferPointer(rebasing: bytes[position..<(position + count)]).bindMemory(to: UInt8.self)
            position += count
            JSONWriter.appendText(utf8, to: &out)  // not UTF-8: {"$text_base64": ...}, nothing lost
        case Self.blob:
            guard let count = Self.readLength(bytes, &position) else { return false }
            JSONWriter.appendASCII(#"{"$base64":""#, to: &out)
            out += Base64.encode(UnsafeRawBufferPointer(rebasing: bytes[position..<(position + count)])).utf8
            JSONWriter.appendASCII(#""}"#, to: &out)
            position += count
        case Self.json:
            guard let count = Self.readLength(bytes, &position) else { return false }
            out.append(contentsOf: UnsafeRawBufferPointer(rebasing: bytes[position..<(position + count)]))
            position += count
        default:
            return false
        }
        return true
    }

    /// Reads the value at `position` back as `JSONValue` (what a two-phase transaction's redo log keeps).
    static func value(_ bytes: UnsafeRawBufferPointer, _ position: inout Int) -> JSONValue? {
        guard position < bytes.count else { return nil }
        switch bytes[position] {
        case Self.null:
            position += 1
            return .null
        case Self.integer:
            position += 1
            guard let zigzag = Self.readVarint(bytes, &position) else { return nil }
            return .int(Int64(bitPattern: (zigzag >> 1) ^ (0 &- (zigzag & 1))))
        case Self.text:
            position += 1
            guard let count = Self.readLength(bytes, &position) else { return nil }
            defer { position += count }
            return JSONValue(text: UnsafeRawBufferPointer(rebasing: bytes[position..<(position + count)]).bindMemory(to: UInt8.self))
        default:
            // The others as their JSON reads back (a real stays a real: the writer keeps a `.`).
            var json: [UInt8] = []
            guard Self.render(value: bytes, &position, into: &json) else { return nil }
            return try? JSONValue(parsing: json)
        }
    }

    /// Reads a row (`varint n`, `n` values) back as its values.
    static func values(ofRow bytes: UnsafeRawBufferPointer) -> [JSONValue]? {
        var position = 0
        guard let count = Self.readVarint(bytes, &position), count <= UInt64(bytes.count) else { return nil }
        var values: [JSONValue] = []
        values.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let value = Self.value(bytes, &position) else { return nil }
            values.append(value)
        }
        return values
    }

    // MARK: Images of an event

    /// Writes an event's row images (as `EventRun` keeps them) as the JSON members a `rows: true`
    /// subscriber gets before the body's closing brace: `,"before":{…},"after":{…}` (update-row),
    /// `,"before":{…}` (delete-row), `,"rows":[{…},…]` (insert-rows, upsert-rows). An image is
    /// one slot per row: `varint 0` for none (`null`), else `varint k+1` and a row whose columns
    /// are named by `columns[k]`; insert-rows and upsert-rows start with the number of rows.
    static func render(
        event image: UnsafeRawBufferPointer,
        kind: EventKind,
        columns: [ColumnKeys],
        into out: inout [UInt8]
    )
        -> Bool
    {
        var position = 0
        switch kind {
        case .updateRow:
            JSONWriter.appendASCII(#","before":"#, to: &out)
            guard Self.render(slot: image, &position, columns, into: &out) else { return false }
            JSONWriter.appendASCII(#","after":"#, to: &out)
            return Self.render(slot: image, &position, columns, into: &out)
        case .deleteRow:
            JSONWriter.appendASCII(#","before":"#, to: &out)
            return Self.render(slot: image, &position, columns, into: &out)
        default:
            guard let count = Self.readVarint(image, &position), count <= UInt64(image.count) else { return false }
            JSONWriter.appendASCII(#","rows":["#, to: &out)
            for index in 0..<count {
                if index > 0 { out.append(UInt8(ascii: ",")) }
                guard Self.render(slot: image, &position, columns, into: &out) else { return false }
            }
            out.append(UInt8(ascii: "]"))
            return true
        }
    }

    /// Writes one row slot as a JSON object (or `null`).
    private static func render(
        slot bytes: UnsafeRawBufferPointer,
        _ position: inout Int,
        _ columns: [ColumnKeys],
        into out: inout [UInt8]
    ) -> Bool {
        guard let set = Self.readVarint(bytes, &position) else { return false }
        guard set > 0 else {
            JSONWriter.appendASCII("null", to: &out)
            return true
        }
        guard set <= UInt64(columns.count), let count = Self.readVarint(bytes, &position), count <= UInt64(bytes.count)
        else { return false }
        let keys = columns[Int(set - 1)]
        out.append(UInt8(ascii: "{"))
        for column in 0..<Int(count) {
            if column > 0 { out.append(UInt8(ascii: ",")) }
            keys.append(column, to: &out)
            guard Self.render(value: bytes, &position, into: &out) else { return false }
        }
        out.append(UInt8(ascii: "}"))
        return true
    }
}

/// The keys of a row image's JSON object: `"name":` for each column of a table, and `"columnN":`
/// beyond them (a row recorded with more values than the table's columns now has).
struct ColumnKeys: Sendable {
    let names: [String]
    private let keys: [UInt8]
    private let ends: [Int]

    init(_ names: [String]) {
        self.names = names
        var keys: [UInt8] = []
        var ends: [Int] = []
        for name in names {
            JSONWriter.appendString(name, to: &keys)
            keys.append(UInt8(ascii: ":"))
            ends.append(keys.count)
        }
        self.keys = keys
        self.ends = ends
    }

    @inline(__always)
    func append(_ column: Int, to out: inout [UInt8]) {
        if column < self.ends.count {
            let start = column == 0 ? 0 : self.ends[column - 1]
            self.keys.withUnsafeBufferPointer { out.append(contentsOf: UnsafeBufferPointer(rebasing: $0[start..<self.ends[column]])) }
        } else {
            JSONWriter.appendString("column\(column)", to: &out)
            out.append(UInt8(ascii: ":"))
        }
    }
}

/// Consecutive committed events of one transaction, of one name, made together: the unit in
/// which they are journaled (one row, `Journal.write`), delivered (one outbox chunk per
/// subscriber, `RunDelivery`) and replayed.
///
/// Their bodies share a start — the envelope's origin and, for rows of one table, the properties
/// before `pks` — kept once; each event adds its tail (the rest of its body, ending in `}` and a
/// newline) and its row images in binary (`RowImage`). Nothing per event is an object of its own,
/// and no `properties` dictionary exists unless a `where` filter asks (`properties(at:)`).
final class EventRun: Sendable {
    let kind: EventKind
    let origin: EventOrigin
    /// The start of every event's body: `,"session":…,"actor":…`, the transaction's members
    /// (`TxStamp`) and the properties all share.
    let common: [UInt8]
    /// The events' tails, one after another.
    let tails: [UInt8]
    /// Where each event's tail ends in `tails`.
    let tailEnds: [Int]
    /// The events' row images (`RowImage.render(event:…)`), one after another; empty for an event
    /// recorded without them.
    let images: [UInt8]
    let imageEnds: [Int]
    /// The column names the images' rows use.
    let columns: [ColumnKeys]

    init(
        kind: EventKind,
        origin: EventOrigin,
        common: [UInt8],
        tails: [UInt8],
        tailEnds: [Int],
        images: [UInt8],
        imageEnds: [Int],
        columns: [ColumnKeys]
    ) {
        self.kind = kind
        self.origin = origin
        self.common = common
        self.tails = tails
        self.tailEnds = tailEnds
        self.images = images
        self.imageEnds = imageEnds
        self.columns = columns
    }

    var count: Int { self.tailEnds.count }

    func tailRange(_ index: Int) -> Range<Int> { (index == 0 ? 0 : self.tailEnds[index - 1])..<self.tailEnds[index] }

    func imageRange(_ index: Int) -> Range<Int> { (index == 0 ? 0 : self.imageEnds[index - 1])..<self.imageEnds[index] }

    /// Whether any event has row images.
    var hasImages: Bool { !self.images.isEmpty }

    /// Event `index`'s body (as `WireLines.body` writes it), with its row images when `rows`.
    func appendBody(_ index: Int, rows: Bool, to out: inout [UInt8]) {
        self.tails.withUnsafeBufferPointer { tails in
            self.images.withUnsafeBytes { images in
                EventLine.appendBody(
                    common: self.common,
                    tail: UnsafeBufferPointer(rebasing: tails[self.tailRange(index)]),
                    image: rows ? UnsafeRawBufferPointer(rebasing: images[self.imageRange(index)]) : nil,
                    kind: self.kind,
                    columns: self.columns,
                    to: &out
                )
            }
        }
    }

    /// Event `index`'s properties, with the envelope's `session` and `actor`: read back from its
    /// body, for `where` filters and what an actor may view.
    func properties(at index: Int) -> JSONObject {
        var object: [UInt8] = [UInt8(ascii: "{")]
        self.appendBody(index, rows: false, to: &object)
        object[1] = UInt8(ascii: " ")  // the body's leading comma
        return (try? JSONValue(parsing: object))?.objectValue ?? [:]
    }

    /// The bytes a journal row keeps for the run (`Journal.write`, read by `PackedRun`): a
    /// version byte, the common start, the column sets, the number of events, then each event's
    /// tail and image, each after its length (varints).
    func packed() -> [UInt8] {
        var bytes: [UInt8] = [PackedRun.version]
        bytes.reserveCapacity(self.common.count + self.tails.count + self.images.count + 3 * self.count + 64)
        RowImage.appendVarint(self.common.count, to: &bytes)
        bytes += self.common
        RowImage.appendVarint(self.columns.count, to: &bytes)
        for set in self.columns {
            RowImage.appendVarint(set.names.count, to: &bytes)
            for var name in set.names {
                name.withUTF8 { utf8 in
                    RowImage.appendVarint(utf8.count, to: &bytes)
                    bytes.append(contentsOf: utf8)
                }
            }
        }
        RowImage.appendVarint(self.count, to: &bytes)
        self.tails.withUnsafeBufferPointer { tails in
            self.images.withUnsafeBufferPointer { images in
                for index in 0..<self.count {
                    let tail = self.tailRange(index)
                    RowImage.appendVarint(tail.count, to: &bytes)
                    bytes.append(contentsOf: UnsafeBufferPointer(rebasing: tails[tail]))
                    let image = self.imageRange(index)
                    RowImage.appendVarint(image.count, to: &bytes)
                    bytes.append(contentsOf: UnsafeBufferPointer(rebasing: images[image]))
                }
            }
        }
        return bytes
    }
}

/// A journal row that holds a run of events (`EventRun.packed`), read where SQLite keeps it.
struct PackedRun {
    static let version: UInt8 = 1

    let common: UnsafeRawBufferPointer
    let columnNames: [[String]]
    let count: Int
    /// Where the first event's tail length starts.
    private let eventsStart: Int
    private let bytes: UnsafeRawBufferPointer

    /// Parses the header; `nil` when the bytes are not a packed run.
    init?(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.first == Self.version else { return nil }
        var position = 1
        guard let commonCount = RowImage.readLength(bytes, &position) else { return nil }
        self.common = UnsafeRawBufferPointer(rebasing: bytes[position..<(position + commonCount)])
        position += commonCount
        guard let sets = RowImage.readVarint(bytes, &position), sets <= UInt64(bytes.count) else { return nil }
        var names: [[String]] = []
        for _ in 0..<sets {
            guard let count = RowImage.readVarint(bytes, &position), count <= UInt64(bytes.count) else { return nil }
            var set: [String] = []
            for _ in 0..<count {
                guard let length = RowImage.readLength(bytes, &position) else { return nil }
                set.append(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[position..<(position + length)]), as: UTF8.self))
                position += length
            }
            names.append(set)
        }
        self.columnNames = names
        guard let count = RowImage.readVarint(bytes, &position), count <= UInt64(bytes.count) else { return nil }
        self.count = Int(count)
        self.eventsStart = position
        self.bytes = bytes
    }

    /// Visits each event's tail and image in order; stops early when `visit` returns false.
    /// Returns false when the bytes end too soon.
    func forEachEvent(_ visit: (_ index: Int, _ tail: UnsafeRawBufferPointer, _ image: UnsafeRawBufferPointer) -> Bool) -> Bool {
        var position = self.eventsStart
        for index in 0..<self.count {
            guard let tailCount = RowImage.readLength(self.bytes, &position) else { return false }
            let tail = UnsafeRawBufferPointer(rebasing: self.bytes[position..<(position + tailCount)])
            position += tailCount
            guard let imageCount = RowImage.readLength(self.bytes, &position) else { return false }
            let image = UnsafeRawBufferPointer(rebasing: self.bytes[position..<(position + imageCount)])
            position += imageCount
            if !visit(index, tail, image) { return true }
        }
        return true
    }
}

/// How an event's line is written, the same way live (`RunDelivery`) and in a replay (`ReplayPage`).
enum EventLine {
    /// The body: the common start, the tail, and — for a `rows: true` subscriber, when the event
    /// has images — the images' JSON members before the tail's closing `}`.
    @inline(__always)
    static func appendBody(
        common: some Collection<UInt8>,
        tail: UnsafeBufferPointer<UInt8>,
        image: UnsafeRawBufferPointer?,
        kind: EventKind,
        columns: [ColumnKeys],
        to out: inout [UInt8]
    ) {
        out.append(contentsOf: common)
        guard let image, !image.isEmpty, tail.count >= 2 else {
            out.append(contentsOf: tail)
            return
        }
        out.append(contentsOf: UnsafeBufferPointer(rebasing: tail[..<(tail.count - 2)]))
        var rendered: [UInt8] = []
        rendered.reserveCapacity(image.count * 3)
        // An image that cannot be read (it never happens: evd wrote it) is left out.
        if RowImage.render(event: image, kind: kind, columns: columns, into: &rendered) { out += rendered }
        out.append(contentsOf: UnsafeBufferPointer(rebasing: tail[(tail.count - 2)...]))
    }
}

/// A run's events, or some of them, queued for one subscription: written out on the connection's
/// event loop (`write(into:)`), where a `rows: true` subscriber's images are made.
struct RunDelivery {
    let run: EventRun
    /// The events of the run delivered, consecutive.
    let range: Range<Int>
    /// The seq of the run's event 0.
    let seq: Int64
    /// The events' time, quoted.
    let time: [UInt8]
    let epoch: JournalEpoch
    let subscription: Int
    let rows: Bool

    var count: Int { self.range.count }
    var firstSeq: Int64 { self.seq + Int64(self.range.lowerBound) }
    var lastSeq: Int64 { self.seq + Int64(self.range.upperBound - 1) }

    /// About what the events take written (their images' JSON guessed at three times their size).
    var byteCount: Int {
        let tails =
            self.range.isEmpty ? 0 : self.run.tailEnds[self.range.upperBound - 1] - self.run.tailRange(self.range.lowerBound).lowerBound
        var bytes = tails + self.count * (self.run.common.count + 96 + self.time.count)
        if self.rows, !self.range.isEmpty {
            bytes += 3 * (self.run.imageEnds[self.range.upperBound - 1] - self.run.imageRange(self.range.lowerBound).lowerBound)
        }
        return bytes
    }

    /// The first `count` of these events (what fits when the rest overflows).
    func prefix(_ count: Int) -> RunDelivery {
        RunDelivery(
            run: self.run,
            range: self.range.lowerBound..<(self.range.lowerBound + count),
            seq: self.seq,
            time: self.time,
            epoch: self.epoch,
            subscription: self.subscription,
            rows: self.rows
        )
    }

    /// Every event's line, one after another.
    func write(into buffer: inout ByteBuffer) {
        var line: [UInt8] = []
        line.reserveCapacity(512)
        self.forEachLine(into: &line) { line in
            buffer.writeBytes(line)
            line.removeAll(keepingCapacity: true)
        }
    }

    /// Every event's line, one after another.
    func write(into out: inout [UInt8]) {
        out.reserveCapacity(out.count + self.byteCount)
        self.forEachLine(into: &out) { _ in }
    }

    /// Appends each event's line to `out`, then calls `written` (which may take the bytes and
    /// empty it).
    private func forEachLine(into out: inout [UInt8], _ written: (inout [UInt8]) -> Void) {
        // `,"event":…,"time":…,"subscription":N`: the same for every event of the run.
        var middle: [UInt8] = []
        var name = self.run.kind.name
        name.withUTF8 { WireLines.appendName($0, epoch: self.epoch, to: &middle) }
        middle += self.time
        JSONWriter.appendASCII(WireLines.subscriptionKey, to: &middle)
        JSONWriter.appendInt(Int64(self.subscription), to: &middle)
        let run = self.run
        run.tails.withUnsafeBufferPointer { tails in
            run.images.withUnsafeBytes { images in
                for index in self.range {
                    WireLines.appendStart(seq: self.seq + Int64(index), to: &out)
                    out += middle
                    EventLine.appendBody(
                        common: run.common,
                        tail: UnsafeBufferPointer(rebasing: tails[run.tailRange(index)]),
                        image: self.rows ? UnsafeRawBufferPointer(rebasing: images[run.imageRange(index)]) : nil,
                        kind: run.kind,
                        columns: run.columns,
                        to: &out
                    )
                    written(&out)
                }
            }
        }
    }
}

/// Committed events with consecutive seqs, as they are journaled and published: one event made
/// with its properties (`JournalEntry`), a run made from a capture, or events nobody wanted when
/// they were made (counted, never delivered).
enum Publication: Sendable {
    case entry(JournalEntry)
    case run(EventRun)
    case unwanted(EventKind, count: Int)

    /// How many events (and seqs).
    var count: Int {
        switch self {
        case .entry: return 1
        case .run(let run): return run.count
        case .unwanted(_, let count): return count
        }
    }

    var name: String {
        switch self {
        case .entry(let entry): return entry.name
        case .run(let run): return run.kind.name
        case .unwanted(let kind, _): return kind.name
        }
    }

    /// The catalog event; `nil` for a custom event.
    var kind: EventKind? {
        switch self {
        case .entry(let entry): return entry.kind
        case .run(let run): return run.kind
        case .unwanted(let kind, _): return kind
        }
    }
}
