import EvdClient
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One `event` line from evd, located rather than parsed: the line's bytes and where in them the
/// members the forwarder needs are, so the message body is the line itself minus one member.
///
/// Only the top level is walked; nested values (`actor`, `rows`, `outcome`) are skipped over, so a
/// key of the same name inside them is never mistaken for the event's own.
struct EventLine: Sendable {
    /// The whole line, without its newline.
    var line: ByteBuffer
    /// The event's `seq`.
    var seq: Int64
    /// The `subscription` member to cut out, with the comma that separates it from its neighbour.
    var subscriptionCut: Range<Int>
    /// The contents (inside the quotes) of the string members: `epoch`, `event`, `time`, and the
    /// `database` and `table` properties when the event has them as strings.
    var epoch: Range<Int>
    var event: Range<Int>
    var time: Range<Int>
    var database: Range<Int>?
    var table: Range<Int>?
    /// Whether any of those contents has a `\` escape (then it is decoded before use).
    var hasEscapes: Bool

    /// Why a line is not an event line the forwarder can use.
    struct Malformed: Error, CustomStringConvertible {
        var description: String
    }

    /// The bytes of `range` in the line, as they are in the JSON text.
    func raw(_ range: Range<Int>) -> ByteBufferView {
        self.line.readableBytesView[(self.line.readerIndex + range.lowerBound)..<(self.line.readerIndex + range.upperBound)]
    }

    /// The decoded value of the string whose contents are `range`.
    func string(_ range: Range<Int>) -> [UInt8] {
        let raw = self.raw(range)
        guard self.hasEscapes, raw.contains(UInt8(ascii: "\\")) else { return Array(raw) }
        let quoted = [UInt8(ascii: "\"")] + raw + [UInt8(ascii: "\"")]
        return Array(((try? JSONValue(parsing: quoted))?.stringValue ?? "").utf8)
    }

    /// Locates the members of an `event` line; a line of another type, or one without `seq`,
    /// `epoch`, `event`, `time` or `subscription`, is `Malformed`.
    init(_ line: ByteBuffer) throws(Malformed) {
        self.line = line
        var scanner = TopLevelScanner()
        let found = line.withUnsafeReadableBytes { scanner.scan($0) }
        guard found, scanner.isEvent, let seq = scanner.seq, let cut = scanner.subscriptionCut, let epoch = scanner.epoch,
            let event = scanner.event, let time = scanner.time
        else {
            throw Malformed(description: "an event line without type, seq, epoch, event, time or subscription")
        }
        self.seq = seq
        self.subscriptionCut = cut
        self.epoch = epoch
        self.event = event
        self.time = time
        self.database = scanner.database
        self.table = scanner.table
        self.hasEscapes = scanner.hasEscapes
    }

    /// The body to publish: the line without its `subscription` member.
    func writeBody(into buffer: inout ByteBuffer) {
        var line = self.line
        let start = line.readerIndex
        buffer.writeBytes(line.readableBytesView[start..<(start + self.subscriptionCut.lowerBound)])
        line.moveReaderIndex(forwardBy: self.subscriptionCut.upperBound)
        buffer.writeBuffer(&line)
    }

    /// How many bytes `writeBody` writes.
    var bodyCount: Int { self.line.readableBytes - self.subscriptionCut.count }
}

/// Whether a line is an `event` line, judged by its first bytes (evd writes `type` first).
func isEventLine(_ line: ByteBuffer) -> Bool {
    let prefix: StaticString = #"{"type":"event""#
    guard line.readableBytes > prefix.utf8CodeUnitCount else { return false }
    return line.withUnsafeReadableBytes { bytes in
        prefix.withUTF8Buffer { expected in
            memcmp(bytes.baseAddress!, expected.baseAddress!, expected.count) == 0
        }
    }
}

/// Walks the members of a JSON object's top level and records the ones `EventLine` wants.
///
/// A key is compared as raw bytes: the keys evd writes have no escapes. Values are skipped without
/// being decoded (strings by their quotes and backslashes, containers by depth).
struct TopLevelScanner {
    var isEvent = false
    var seq: Int64?
    var subscriptionCut: Range<Int>?
    var epoch: Range<Int>?
    var event: Range<Int>?
    var time: Range<Int>?
    var database: Range<Int>?
    var table: Range<Int>?
    var hasEscapes = false

    /// Scans `bytes`; `false` when it is not a well-formed object at the top level.
    mutating func scan(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let count = bytes.count
        var index = Self.skipSpace(bytes, 0)
        guard index < count, bytes[index] == UInt8(ascii: "{") else { return false }
        index += 1
        var previousEnd: Int? = nil  // where the previous member's value ended
        while true {
            index = Self.skipSpace(bytes, index)
            guard index < count else { return false }
            if bytes[index] == UInt8(ascii: "}") { break }
            if previousEnd != nil {
                guard bytes[index] == UInt8(ascii: ",") else { return false }
                index = Self.skipSpace(bytes, index + 1)
                guard index < count else { return false }
            }
            guard bytes[index] == UInt8(ascii: "\"") else { return false }
            let keyStart = index
            guard let keyEnd = Self.stringEnd(bytes, index) else { return false }
            let key = UnsafeRawBufferPointer(rebasing: bytes[(index + 1)..<(keyEnd - 1)])
            index = Self.skipSpace(bytes, keyEnd)
            guard index < count, bytes[index] == UInt8(ascii: ":") else { return false }
            index = Self.skipSpace(bytes, index + 1)
            guard index < count else { return false }
            let valueStart = index
            guard let valueEnd = Self.valueEnd(bytes, index) else { return false }
            index = valueEnd
            switch Key(key) {
            case .type:
                self.isEvent = Self.equals(bytes, valueStart..<valueEnd, #""event""#)
            case .seq:
                self.seq = Self.integer(bytes, valueStart..<valueEnd)
            case .subscription:
                if let previousEnd {
                    // `…,"subscription":3`: the comma before it goes with it.
                    self.subscriptionCut = previousEnd..<valueEnd
                } else {
                    // `{"subscription":3,…}`: the comma after it goes with it.
                    var after = Self.skipSpace(bytes, valueEnd)
                    if after < count, bytes[after] == UInt8(ascii: ",") { after += 1 }
                    self.subscriptionCut = keyStart..<after
                }
            case .epoch: self.epoch = self.contents(bytes, valueStart..<valueEnd)
            case .event: self.event = self.contents(bytes, valueStart..<valueEnd)
            case .time: self.time = self.contents(bytes, valueStart..<valueEnd)
            case .database: self.database = self.contents(bytes, valueStart..<valueEnd)
            case .table: self.table = self.contents(bytes, valueStart..<valueEnd)
            case .other: break
            }
            previousEnd = valueEnd
        }
        return true
    }

    /// The keys the forwarder reads.
    private enum Key {
        case type, seq, subscription, epoch, event, time, database, table, other

        init(_ key: UnsafeRawBufferPointer) {
            switch key.count {
            case 3 where Self.is(key, "seq"): self = .seq
            case 4 where Self.is(key, "type"): self = .type
            case 4 where Self.is(key, "time"): self = .time
            case 5 where Self.is(key, "epoch"): self = .epoch
            case 5 where Self.is(key, "event"): self = .event
            case 5 where Self.is(key, "table"): self = .table
            case 8 where Self.is(key, "database"): self = .database
            case 12 where Self.is(key, "subscription"): self = .subscription
            default: self = .other
            }
        }

        private static func `is`(_ key: UnsafeRawBufferPointer, _ name: StaticString) -> Bool {
            name.withUTF8Buffer { memcmp(key.baseAddress!, $0.baseAddress!, $0.count) == 0 }
        }
    }

    /// A string value's contents (without its quotes); `nil` for any other value (`null`).
    private mutating func contents(_ bytes: UnsafeRawBufferPointer, _ value: Range<Int>) -> Range<Int>? {
        guard value.count >= 2, bytes[value.lowerBound] == UInt8(ascii: "\"") else { return nil }
        let inner = (value.lowerBound + 1)..<(value.upperBound - 1)
        if !self.hasEscapes, UnsafeRawBufferPointer(rebasing: bytes[inner]).contains(UInt8(ascii: "\\")) {
            self.hasEscapes = true
        }
        return inner
    }

    private static func equals(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>, _ text: StaticString) -> Bool {
        guard range.count == text.utf8CodeUnitCount else { return false }
        return text.withUTF8Buffer { memcmp(bytes.baseAddress! + range.lowerBound, $0.baseAddress!, $0.count) == 0 }
    }

    /// A non-negative integer's value; `nil` for anything else.
    private static func integer(_ bytes: UnsafeRawBufferPointer, _ range: Range<Int>) -> Int64? {
        guard !range.isEmpty, range.count <= 18 else { return nil }
        var value: Int64 = 0
        for index in range {
            let byte = bytes[index]
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            value = value * 10 + Int64(byte - UInt8(ascii: "0"))
        }
        return value
    }

    private static func skipSpace(_ bytes: UnsafeRawBufferPointer, _ start: Int) -> Int {
        var index = start
        while index < bytes.count {
            switch bytes[index] {
            case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\r"), UInt8(ascii: "\n"): index += 1
            default: return index
            }
        }
        return index
    }

    /// The index just past the string starting (at its opening quote) at `start`.
    private static func stringEnd(_ bytes: UnsafeRawBufferPointer, _ start: Int) -> Int? {
        var index = start + 1
        while index < bytes.count {
            switch bytes[index] {
            case UInt8(ascii: "\""): return index + 1
            case UInt8(ascii: "\\"): index += 2
            default: index += 1
            }
        }
        return nil
    }

    /// The index just past the value starting at `start`.
    private static func valueEnd(_ bytes: UnsafeRawBufferPointer, _ start: Int) -> Int? {
        switch bytes[start] {
        case UInt8(ascii: "\""):
            return Self.stringEnd(bytes, start)
        case UInt8(ascii: "{"), UInt8(ascii: "["):
            var depth = 0
            var index = start
            while index < bytes.count {
                switch bytes[index] {
                case UInt8(ascii: "\""):
                    guard let end = Self.stringEnd(bytes, index) else { return nil }
                    index = end
                    continue
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    depth += 1
                case UInt8(ascii: "}"), UInt8(ascii: "]"):
                    depth -= 1
                    if depth == 0 { return index + 1 }
                default:
                    break
                }
                index += 1
            }
            return nil
        default:
            var index = start
            while index < bytes.count {
                switch bytes[index] {
                case UInt8(ascii: ","), UInt8(ascii: "}"), UInt8(ascii: "]"), UInt8(ascii: " "), UInt8(ascii: "\t"),
                    UInt8(ascii: "\r"), UInt8(ascii: "\n"):
                    return index > start ? index : nil
                default:
                    index += 1
                }
            }
            return nil
        }
    }
}
