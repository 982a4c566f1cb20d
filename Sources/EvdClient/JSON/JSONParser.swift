import OrderedCollections

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
// A strict RFC 8259 JSON parser over raw bytes.
//
// The parser is iterative: containers being built live on explicit stacks
// (`frames`, `values`, `keys`) rather than on the call stack, so hostile input
// such as 100 000 `[` fails with a clean error instead of overflowing the stack.
// No Foundation is used.

/// Why some bytes are not one valid JSON text.
///
/// `message` is meant for a human and says where the problem is
/// ("unexpected character 'x' at byte 3"); `offset` is the same position as a
/// 0-based byte offset into the input.
public struct JSONParseError: Error, Sendable, CustomStringConvertible {
    /// What went wrong, in words, including the byte position.
    public var message: String
    /// The 0-based byte offset in the input where the problem was found.
    public var offset: Int

    /// Creates an error with a human-readable message and a 0-based byte offset.
    public init(message: String, offset: Int) {
        self.message = message
        self.offset = offset
    }

    /// The message, as shown to a person.
    public var description: String { message }
}

extension JSONValue {
    /// The deepest nesting of arrays and objects the parser accepts.
    public static let maximumParsingDepth = 512

    /// Parses exactly one JSON value (with optional surrounding whitespace) from UTF-8 bytes.
    ///
    /// Strict RFC 8259: no comments, no trailing commas, no NaN/Infinity, no leading zeros,
    /// strings must be valid UTF-8 without raw control characters, nesting is limited to
    /// ``maximumParsingDepth``. Integers that fit `Int64` (no fraction, no exponent) become
    /// `.int`, larger integers `.number` (their text: a `Double` would round them), all other
    /// numbers `.double`. In an object with a repeated key the last value
    /// wins and the key keeps the position of its first occurrence.
    public init(parsing bytes: UnsafeRawBufferPointer) throws(JSONParseError) {
        guard let base = bytes.baseAddress, bytes.count > 0 else {
            throw JSONParseError(message: "empty input", offset: 0)
        }
        var parser = _JSONParser(base: base.assumingMemoryBound(to: UInt8.self), count: bytes.count)
        self = try parser.parseDocument()
    }

    /// Parses exactly one JSON value, as ``init(parsing:)-(UnsafeRawBufferPointer)`` does, except
    /// that when it is an object whose member `key` is an array of objects holding only scalars,
    /// that member is left out of the object and returned as `rows`, flat.
    ///
    /// It is how evd reads a request: the thousand rows of an `insert` become one array of values
    /// instead of a thousand dictionaries. Any other value of `key` stays in the object.
    ///
    /// `textKey`: a member of that object whose value, when a number other than an `Int64`, is
    /// kept as its text (`.number`), byte for byte: a request's `id`, which evd echoes as it came.
    public static func parsing(
        _ bytes: UnsafeRawBufferPointer,
        flatteningRowsOf key: String,
        keepingNumberTextOf textKey: String? = nil
    ) throws(JSONParseError) -> (value: JSONValue, rows: JSONRows?) {
        guard let base = bytes.baseAddress, bytes.count > 0 else {
            throw JSONParseError(message: "empty input", offset: 0)
        }
        var parser = _JSONParser(base: base.assumingMemoryBound(to: UInt8.self), count: bytes.count)
        parser.flatKey = key
        parser.textKey = textKey
        let value = try parser.parseDocument()
        guard let rows = parser.flatRows, case .object(var object) = value else { return (value, nil) }
        object.removeValue(forKey: key)
        return (.object(object), rows)
    }

    /// Parses exactly one JSON value from UTF-8 bytes; see ``init(parsing:)-(UnsafeRawBufferPointer)``.
    public init(parsing bytes: [UInt8]) throws(JSONParseError) {
        let result = bytes.withUnsafeBytes { buffer in
            Result { () throws(JSONParseError) -> JSONValue in try JSONValue(parsing: buffer) }
        }
        self = try result.get()
    }

    /// Parses exactly one JSON value from the UTF-8 of a string; see ``init(parsing:)-(UnsafeRawBufferPointer)``.
    public init(parsing string: String) throws(JSONParseError) {
        let parse = { (buffer: UnsafeBufferPointer<UInt8>) -> Result<JSONValue, JSONParseError> in
            Result { () throws(JSONParseError) -> JSONValue in
                try JSONValue(parsing: UnsafeRawBufferPointer(buffer))
            }
        }
        // Native Swift strings are contiguous UTF-8; the copy is only for bridged/foreign strings.
        let result =
            string.utf8.withContiguousStorageIfAvailable(parse)
            ?? Array(string.utf8).withUnsafeBufferPointer(parse)
        self = try result.get()
    }
}

// MARK: - The parser

/// One open container on the parser's explicit stack.
private struct _Frame {
    /// Whether this is an object (else an array).
    var isObject: Bool
    /// Index in `values` of this container's first element.
    var valueStart: Int
    /// Index in `keys` of this object's first key.
    var keyStart: Int
}

private enum ASCII {
    static let quote: UInt8 = 0x22  // "
    static let backslash: UInt8 = 0x5C  // \
    static let slash: UInt8 = 0x2F  // /
    static let comma: UInt8 = 0x2C  // ,
    static let colon: UInt8 = 0x3A  // :
    static let openBracket: UInt8 = 0x5B  // [
    static let closeBracket: UInt8 = 0x5D  // ]
    static let openBrace: UInt8 = 0x7B  // {
    static let closeBrace: UInt8 = 0x7D  // }
    static let minus: UInt8 = 0x2D  // -
    static let plus: UInt8 = 0x2B  // +
    static let dot: UInt8 = 0x2E  // .
    static let zero: UInt8 = 0x30  // 0
    static let nine: UInt8 = 0x39  // 9
    static let space: UInt8 = 0x20
    static let tab: UInt8 = 0x09
    static let newline: UInt8 = 0x0A
    static let carriageReturn: UInt8 = 0x0D
}

private struct _JSONParser {
    let base: UnsafePointer<UInt8>
    let count: Int
    var index = 0

    /// Finished values of all open containers, flat; a container takes its tail when it closes.
    var values: [JSONValue] = []
    /// Keys of all open objects, flat, parallel to their values in `values`.
    var keys: [String] = []
    /// The open containers, innermost last.
    var frames: [_Frame] = []
    /// Reused buffer for strings that contain escapes.
    var scratch: [UInt8] = []
    /// The keys of the last object closed, when none of them needs escaping: the next object
    /// often has the same ones (the rows of an `insert`), and then shares them instead of making
    /// each key and the list of keys again.
    var lastKeys: ContiguousArray<String> = []
    /// The member of the outermost object whose array of objects is read into `flatRows`
    /// (`JSONValue.parsing(_:flatteningRowsOf:)`); nil to read everything into values.
    var flatKey: String?
    /// The rows of `flatKey` when its value (the last one, if the key repeats) was an array of
    /// objects whose values are all scalars.
    var flatRows: JSONRows?
    /// The member of the outermost object whose number value is kept as its text (`.number`).
    var textKey: String?

    init(base: UnsafePointer<UInt8>, count: Int) {
        self.base = base
        self.count = count
    }

    // MARK: Errors

    /// An error whose message is "`what` at byte `offset`", followed by what was expected.
    func error(_ what: String, at offset: Int, expected: String? = nil) -> JSONParseError {
        var message = "\(what) at byte \(offset)"
        if let expected { message += ", expected \(expected)" }
        return JSONParseError(message: message, offset: offset)
    }

    /// The error for an unexpected byte at `offset` (or the end of input), naming the character.
    func unexpected(at offset: Int, expected: String) -> JSONParseError {
        guard offset < count else { return error("unexpected end of input", at: offset, expected: expected) }
        let byte = base[offset]
        if byte >= 0x80 {
            let length = validUTF8Length(at: offset)
            guard length > 0 else { return error("invalid UTF-8", at: offset) }
            let text = String(decoding: UnsafeBufferPointer(start: base + offset, count: length), as: UTF8.self)
            return error("unexpected character '\(text)'", at: offset, expected: expected)
        }
        if byte < 0x20 || byte == 0x7F {
            return error("unexpected control character \(codePointName(byte))", at: offset, expected: expected)
        }
        return error("unexpected character '\(Character(Unicode.Scalar(byte)))'", at: offset, expected: expected)
    }

    /// "U+001F" for a byte.
    func codePointName(_ byte: UInt8) -> String {
        let hex = String(byte, radix: 16, uppercase: true)
        return "U+" + String(repeating: "0", count: 4 - hex.count) + hex
    }

    // MARK: Driver

    @inline(__always)
    mutating func skipWhitespace() {
        while index < count {
            let byte = base[index]
            guard byte == ASCII.space || byte == ASCII.newline || byte == ASCII.carriageReturn || byte == ASCII.tab else {
                return
            }
            index += 1
        }
    }

    mutating func parseDocument() throws(JSONParseError) -> JSONValue {
        skipWhitespace()
        if index == count { throw error("empty input (only whitespace)", at: index) }
        let value = try parseValue()
        skipWhitespace()
        if index != count { throw error("trailing characters after the value", at: index) }
        return value
    }

    /// Parses one value, iteratively: containers are pushed on `frames` instead of recursing.
    mutating func parseValue() throws(JSONParseError) -> JSONValue {
        // Each pass of this loop starts at the beginning of a value (whitespace skipped).
        parsing: while true {
            guard index < count else { throw unexpected(at: index, expected: "a value") }
            let byte = base[index]
            var value: JSONValue
            if frames.count == 1, flatKey != nil, takesFlatRows(at: byte) {
                value = .null  // a placeholder: the rows come out apart, in `flatRows`
            } else {
                switch byte {
                case ASCII.openBracket, ASCII.openBrace:
                    if frames.count == JSONValue.maximumParsingDepth {
                        throw error("nesting deeper than \(JSONValue.maximumParsingDepth)", at: index)
                    }
                    let isObject = byte == ASCII.openBrace
                    frames.append(_Frame(isObject: isObject, valueStart: values.count, keyStart: keys.count))
                    index += 1
                    skipWhitespace()
                    if index < count, base[index] == (isObject ? ASCII.closeBrace : ASCII.closeBracket) {
                        index += 1
                        value = closeContainer()
                    } else {
                        if isObject { try parseKeyAndColon() }
                        continue parsing
                    }
                case ASCII.quote:
                    value = .string(try parseString())
                case ASCII.minus, ASCII.zero...ASCII.nine:
                    let start = index
                    value = try parseNumber()
                    if frames.count == 1, textKey != nil, frames[0].isObject, keys.last == textKey, Self.keepsText(value, base[start]) {
                        value = .number(String(decoding: UnsafeBufferPointer(start: base + start, count: index - start), as: UTF8.self))
                    }
                case UInt8(ascii: "t"):
                    try expectLiteral("true")
                    value = .bool(true)
                case UInt8(ascii: "f"):
                    try expectLiteral("false")
                    value = .bool(false)
                case UInt8(ascii: "n"):
                    try expectLiteral("null")
                    value = .null
                default:
                    throw unexpected(at: index, expected: "a value")
                }
            }

            // After a complete value: add it to the innermost container, closing containers
            // for as long as their closing bracket follows.
            while true {
                guard let frame = frames.last else { return value }
                values.append(value)
                skipWhitespace()
                guard index < count else {
                    throw unexpected(at: index, expected: frame.isObject ? "',' or '}'" : "',' or ']'")
                }
                let next = base[index]
                if next == ASCII.comma {
                    index += 1
                    skipWhitespace()
                    if frame.isObject { try parseKeyAndColon() }
                    continue parsing
                }
                if next == (frame.isObject ? ASCII.closeBrace : ASCII.closeBracket) {
                    index += 1
                    value = closeContainer()
                    continue
                }
                throw unexpected(at: index, expected: frame.isObject ? "',' or '}'" : "',' or ']'")
            }
        }
    }

    // MARK: Flat rows

    /// At the start of a member's value in the outermost object: when the member is `flatKey`,
    /// whether its value was read into `flatRows` (an array of objects of scalars). Anything else
    /// (another value, a nested array or object in a row, a repeated key in a row, invalid JSON)
    /// leaves `index` where it was for the general parser, which reads it (and reports its errors)
    /// as usual.
    mutating func takesFlatRows(at byte: UInt8) -> Bool {
        guard frames[0].isObject, keys.last == flatKey else { return false }
        flatRows = nil  // a repeated key: the last value counts
        guard byte == ASCII.openBracket else { return false }
        let start = index
        if let rows = parseFlatRows() {
            flatRows = rows
            return true
        }
        index = start
        return false
    }

    /// Reads an array of objects whose values are scalars, from its `[` on; nil for anything else.
    mutating func parseFlatRows() -> JSONRows? {
        // Room for the values of rows like an insert's: a value per 16 bytes of what is left.
        var rows = JSONRows.Builder(capacity: (count - index) / 16)
        index += 1
        skipWhitespace()
        if index < count, base[index] == ASCII.closeBracket {
            index += 1
            return rows.finish()
        }
        // The last run's keys, and when their JSON text is their bytes, those bytes back to back
        // (`keyText`, where key `i` is `keyRanges[i]`): the next row's keys are matched against the
        // input as they are (as `plainKeyLength` does), without touching a reference count.
        var lastKeys: [String] = []
        var keyText = UnsafeMutableBufferPointer<UInt8>(start: nil, count: 0)
        var keyRanges: [Range<Int>] = []
        // Each key's first eight bytes as a little-endian word (zero-padded): what a short key
        // is compared with.
        var keyWords: [UInt64] = []
        defer { keyText.deallocate() }
        do {
            while true {
                guard index < count, base[index] == ASCII.openBrace else { return nil }
                index += 1
                skipWhitespace()
                let firstValue = rows.valueCount
                // This row's keys, once they differ from the last run's (nil while they match).
                var keys: [String]?
                var position = 0
                if index < count, base[index] == ASCII.closeBrace {
                    index += 1
                } else {
                    members: while true {
                        guard index < count, base[index] == ASCII.quote else { return nil }
                        if keys == nil, position < keyRanges.count, case let key = keyRanges[position],
                            index + 1 + key.count < count, base[index + 1 + key.count] == ASCII.quote,
                            key.count <= 8 && index + 9 <= count
                                ? Self.firstBytes(base + index + 1, key.count) == keyWords[position]
                                : memcmp(base + index + 1, keyText.baseAddress! + key.lowerBound, key.count) == 0
                        {
                            index += key.count + 2
                        } else {
                            let key = try parseString()
                            if keys == nil {
                                if position < lastKeys.count && key == lastKeys[position] {
                                    // the same key, written with escapes
                                } else {
                                    keys = Array(lastKeys.prefix(position))
                                    keys!.append(key)
                                }
                            } else {
                                keys!.append(key)
                            }
                        }
                        skipWhitespace()
                        guard index < count, base[index] == ASCII.colon else { return nil }
                        index += 1
                        skipWhitespace()
                        guard index < count else { return nil }
                        switch base[index] {
                        case ASCII.quote:
                            // (A cell's length is 32 bits.)
                            let fits = try parseString { text in
                                guard text.count <= Int(UInt32.max) else { return false }
                                rows.appendText(text)
                                return true
                            }
                            guard fits else { return nil }
                        case ASCII.minus, ASCII.zero...ASCII.nine:
                            switch try parseNumber() {
                            case .int(let int): rows.append(.int(int))
                            case .double(let double): rows.append(.double(double))
                            default: return nil  // an integer beyond Int64: read by the general parser
                            }
                        case UInt8(ascii: "t"):
                            try expectLiteral("true")
                            rows.append(.bool(true))
                        case UInt8(ascii: "f"):
                            try expectLiteral("false")
                            rows.append(.bool(false))
                        case UInt8(ascii: "n"):
                            try expectLiteral("null")
                            rows.append(.null)
                        default:
                            return nil  // a nested array or object, or not JSON
                        }
                        position += 1
                        skipWhitespace()
                        guard index < count else { return nil }
                        if base[index] == ASCII.comma {
                            index += 1
                            skipWhitespace()
                            continue members
                        }
                        guard base[index] == ASCII.closeBrace else { return nil }
                        index += 1
                        break members
                    }
                }
                if keys == nil && (position != lastKeys.count || rows.isEmpty) {
                    keys = Array(lastKeys.prefix(position))  // fewer keys than the last run (or the first row)
                }
                if let keys {
                    if keys.count > 1 && !Self.allDifferent(keys[...]) { return nil }
                    lastKeys = keys
                    keyText.deallocate()
                    keyRanges = []
                    keyWords = []
                    if keys.allSatisfy(Self.isPlain) {
                        let bytes = keys.flatMap(\.utf8)
                        keyText = .allocate(capacity: bytes.count)
                        _ = keyText.initialize(from: bytes)
                        var start = 0
                        for key in keys {
                            keyRanges.append(start..<(start + key.utf8.count))
                            start += key.utf8.count
                            var word: UInt64 = 0
                            for (i, byte) in key.utf8.prefix(8).enumerated() { word |= UInt64(byte) << (8 * UInt64(i)) }
                            keyWords.append(word)
                        }
                    } else {
                        keyText = UnsafeMutableBufferPointer(start: nil, count: 0)
                    }
                }
                rows.endRow(keys: lastKeys, firstValue: firstValue, newRun: keys != nil)
                skipWhitespace()
                guard index < count else { return nil }
                if base[index] == ASCII.comma {
                    index += 1
                    skipWhitespace()
                    continue
                }
                guard base[index] == ASCII.closeBracket else { return nil }
                index += 1
                return rows.finish()
            }
        } catch {
            return nil
        }
    }

    /// Parses `"key"` `:` and the whitespace after it, pushing the key.
    mutating func parseKeyAndColon() throws(JSONParseError) {
        guard index < count, base[index] == ASCII.quote else {
            throw unexpected(at: index, expected: "a string key")
        }
        let position = keys.count - (frames.last?.keyStart ?? 0)
        if position < lastKeys.count, let length = plainKeyLength(matching: lastKeys[position]) {
            keys.append(lastKeys[position])
            index += length + 2
        } else {
            keys.append(try parseString())
        }
        skipWhitespace()
        guard index < count, base[index] == ASCII.colon else {
            throw unexpected(at: index, expected: "':'")
        }
        index += 1
        skipWhitespace()
    }

    /// The byte length of `key` when the input at `index` is exactly `"key"` (a key of the last
    /// object, which needs no escaping, so its bytes are its JSON text).
    func plainKeyLength(matching key: String) -> Int? {
        var key = key
        return key.withUTF8 { bytes -> Int? in
            let end = index + 1 + bytes.count
            guard end < count, base[end] == ASCII.quote else { return nil }
            guard bytes.isEmpty || memcmp(base + index + 1, bytes.baseAddress!, bytes.count) == 0 else { return nil }
            return bytes.count
        }
    }

    /// Whether a key's JSON text is its bytes between quotes (no quote, backslash or control byte).
    static func isPlain(_ key: String) -> Bool {
        key.utf8.allSatisfy { $0 >= 0x20 && $0 != ASCII.quote && $0 != ASCII.backslash }
    }

    /// Pops the innermost frame and builds its array or object from the tails of the stacks.
    mutating func closeContainer() -> JSONValue {
        let frame = frames.removeLast()
        let elements = Self.takeTail(of: &values, from: frame.valueStart, filler: .null)
        guard frame.isObject else { return .array(elements) }
        let object: JSONObject
        do {
            // `names` must be gone before `keys` is mutated below, or that would copy `keys`.
            let names = keys[frame.keyStart...]
            if !names.isEmpty, names.elementsEqual(lastKeys) {
                // The same keys as the last object: share them.
                object = JSONObject(uncheckedUniqueKeys: lastKeys, values: elements)
            } else if names.count <= 16, Self.allDifferent(names) {
                // Fast path: a small object whose keys are all different (the usual case)
                // is built in one go.
                let unique = ContiguousArray(names)
                object = JSONObject(uncheckedUniqueKeys: unique, values: elements)
                lastKeys = unique.allSatisfy(Self.isPlain) ? unique : []
            } else {
                // One by one: for a repeated key the last value wins and the first position is kept.
                var members = JSONObject(minimumCapacity: names.count)
                for (name, element) in zip(names, elements) {
                    members.updateValue(element, forKey: name)
                }
                object = members
            }
        }
        if frame.keyStart < keys.count { keys.removeSubrange(frame.keyStart...) }
        return .object(object)
    }

    /// Whether no two of a few strings are equal (pairwise: cheaper than hashing for ≤ 16).
    static func allDifferent(_ names: ArraySlice<String>) -> Bool {
        if names.count > 16 { return Set(names).count == names.count }
        var i = names.startIndex + 1
        while i < names.endIndex {
            for j in names.startIndex..<i where names[j] == names[i] { return false }
            i += 1
        }
        return true
    }

    /// Moves `stack[start...]` out into a new array and shrinks `stack`, without retaining
    /// and releasing every element on the way.
    static func takeTail<Element>(of stack: inout [Element], from start: Int, filler: Element) -> [Element] {
        let n = stack.count - start
        if n == 0 { return [] }
        let result = stack.withUnsafeMutableBufferPointer { source in
            let tail = source.baseAddress! + start
            let moved = [Element](unsafeUninitializedCapacity: n) { target, initialized in
                target.baseAddress!.moveInitialize(from: tail, count: n)
                initialized = n
            }
            // The moved-from slots are uninitialized now; refill them with a trivial value
            // so that `removeLast` below has valid values to destroy.
            tail.initialize(repeating: filler, count: n)
            return moved
        }
        stack.removeLast(n)
        return result
    }

    mutating func expectLiteral(_ literal: StaticString) throws(JSONParseError) {
        let length = literal.utf8CodeUnitCount
        let text = literal.utf8Start
        for i in 0..<length {
            guard index + i < count, base[index + i] == text[i] else {
                throw error("invalid literal", at: index, expected: "'\(literal)'")
            }
        }
        index += length
    }

    // MARK: Numbers

    /// Parses `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?` starting at `index`.
    mutating func parseNumber() throws(JSONParseError) -> JSONValue {
        let start = index
        let negative = base[index] == ASCII.minus
        if negative { index += 1 }

        // While validating, collect the first 19 significant digits in `mantissa` and the
        // power of ten that scales it, for the integer and the fast double paths.
        var mantissa: UInt64 = 0
        var significantDigits = 0  // digits from the first non-zero one on, at most 19
        var truncated = false  // more than 19 significant digits: use the slow path
        var power = 0  // value == mantissa * 10^power (when not truncated)

        guard index < count, Self.isDigit(base[index]) else {
            throw unexpected(at: index, expected: "a digit after '-'")
        }
        if base[index] == ASCII.zero {
            index += 1
            if index < count, Self.isDigit(base[index]) {
                throw error("invalid number: leading zeros are not allowed", at: start)
            }
        } else {
            while index < count, Self.isDigit(base[index]) {
                if significantDigits < 19 {
                    mantissa = mantissa &* 10 &+ UInt64(base[index] &- ASCII.zero)
                    significantDigits += 1
                } else {
                    truncated = true
                }
                index += 1
            }
        }

        var isInteger = true
        if index < count, base[index] == ASCII.dot {
            isInteger = false
            index += 1
            guard index < count, Self.isDigit(base[index]) else {
                throw unexpected(at: index, expected: "a digit after '.'")
            }
            while index < count, Self.isDigit(base[index]) {
                if significantDigits < 19 {
                    // Leading zeros of the fraction ("0.001") only move the power.
                    mantissa = mantissa &* 10 &+ UInt64(base[index] &- ASCII.zero)
                    if mantissa != 0 { significantDigits += 1 }
                    power -= 1
                } else {
                    truncated = true
                }
                index += 1
            }
        }

        if index < count, base[index] | 0x20 == UInt8(ascii: "e") {
            isInteger = false
            index += 1
            var exponentNegative = false
            if index < count, base[index] == ASCII.plus || base[index] == ASCII.minus {
                exponentNegative = base[index] == ASCII.minus
                index += 1
            }
            guard index < count, Self.isDigit(base[index]) else {
                throw unexpected(at: index, expected: "a digit in the exponent")
            }
            var exponent = 0
            while index < count, Self.isDigit(base[index]) {
                // Clamp: anything this large is out of range (or zero) anyway.
                if exponent < 1_000_000 { exponent = exponent * 10 + Int(base[index] &- ASCII.zero) }
                index += 1
            }
            power += exponentNegative ? -exponent : exponent
        }

        if isInteger {
            // Fast path: at most 19 digits are in `mantissa`; check them against Int64's range.
            // More digits than that can never fit Int64. An integer beyond it keeps its text:
            // as a `Double` it would be rounded, and read as a real.
            if !truncated {
                if negative {
                    if mantissa <= UInt64(Int64.max) + 1 { return .int(Int64(bitPattern: 0 &- mantissa)) }
                } else if mantissa <= UInt64(Int64.max) {
                    return .int(Int64(mantissa))
                }
            }
            return .number(String(decoding: UnsafeBufferPointer(start: base + start, count: index - start), as: UTF8.self))
        }

        // Fast path (Clinger): an integer ≤ 2^53 and a power of ten ≤ 10^22 are both exact
        // doubles, so one multiplication or division gives the correctly rounded result.
        if !truncated, mantissa <= 1 << 53, power >= -22, power <= 22 {
            let magnitude = Double(mantissa)
            let d = power < 0 ? magnitude / _powersOfTen[-power] : magnitude * _powersOfTen[power]
            return .double(negative ? -d : d)
        }
        return .double(try slowDouble(from: start))
    }

    /// Whether a number read as `value` (its first byte `first`) reads back as other text: all
    /// but an `int`, and `-0` (an `int` 0, echoed as `0`).
    static func keepsText(_ value: JSONValue, _ first: UInt8) -> Bool {
        guard case .int(let int) = value else { return true }
        return int == 0 && first == ASCII.minus
    }

    @inline(__always)
    static func isDigit(_ byte: UInt8) -> Bool { byte &- ASCII.zero < 10 }

    /// Converts the already-validated number text `base[start..<index]` with the stdlib's
    /// correctly rounded conversion.
    func slowDouble(from start: Int) throws(JSONParseError) -> Double {
        let text = String(decoding: UnsafeBufferPointer(start: base + start, count: index - start), as: UTF8.self)
        guard let d = Double(text) else {
            throw error("invalid number", at: start)
        }
        guard d.isFinite else {
            throw error("number out of range", at: start)
        }
        return d
    }

    // MARK: Strings

    /// Parses a string starting at the opening quote; `index` ends after the closing quote.
    mutating func parseString() throws(JSONParseError) -> String {
        try parseString { String(decoding: $0, as: UTF8.self) }
    }

    /// Parses a string starting at the opening quote, handing `body` its UTF-8 where it lies: in
    /// the input when it has no escapes (the common case: no copy), else decoded in `scratch`.
    /// `index` ends after the closing quote.
    @inline(__always)
    mutating func parseString<R>(_ body: (UnsafeBufferPointer<UInt8>) -> R) throws(JSONParseError) -> R {
        let start = index
        index += 1
        let contentStart = index
        // Fast path: a run of plain ASCII and validated multi-byte UTF-8 with no escapes.
        while index < count {
            // Eight bytes at a time while none of them is a quote, a backslash, a control byte or
            // part of a multi-byte character.
            while index + 8 <= count {
                let word = UnsafeRawPointer(base + index).loadUnaligned(as: UInt64.self)
                if Self.mayEndPlainText(word) { break }
                index += 8
            }
            guard index < count else { break }
            let byte = base[index]
            if byte == ASCII.quote {
                index += 1
                return body(UnsafeBufferPointer(start: base + contentStart, count: index - 1 - contentStart))
            }
            if byte == ASCII.backslash { break }
            if byte < 0x20 { throw controlCharacterError(byte) }
            if byte < 0x80 {
                index += 1
            } else {
                index += try validateUTF8()
            }
        }
        guard index < count else { throw error("unterminated string starting", at: start) }

        // Slow path: escapes. Copy the plain prefix into `scratch` and decode from here on.
        scratch.removeAll(keepingCapacity: true)
        scratch.append(contentsOf: UnsafeBufferPointer(start: base + contentStart, count: index - contentStart))
        try decodeEscapedRest(ofStringAt: start)
        return scratch.withUnsafeBufferPointer(body)
    }

    /// The first `n` (at most 8) bytes at `bytes` as a little-endian word, zero-padded; reads
    /// eight bytes.
    @inline(__always)
    static func firstBytes(_ bytes: UnsafePointer<UInt8>, _ n: Int) -> UInt64 {
        let word = UInt64(littleEndian: UnsafeRawPointer(bytes).loadUnaligned(as: UInt64.self))
        return n >= 8 ? word : word & ((1 << (UInt64(n) * 8)) &- 1)
    }

    /// Whether one of the eight bytes of `word` is a quote, a backslash, below 0x20 or above 0x7F
    /// (what ends a run of plain ASCII in a string; SWAR: all eight are tested at once).
    @inline(__always)
    static func mayEndPlainText(_ word: UInt64) -> Bool {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        func hasZeroByte(_ x: UInt64) -> Bool { (x &- ones) & ~x & highs != 0 }
        let control = (word &- ones &* 0x20) & ~word & highs  // a byte below 0x20
        return word & highs != 0 || control != 0 || hasZeroByte(word ^ (ones &* 0x22)) || hasZeroByte(word ^ (ones &* 0x5C))
    }

    /// Decodes the rest of the string that starts at `start` (`index` is at its first escape),
    /// appending it to `scratch`; `index` ends after the closing quote.
    mutating func decodeEscapedRest(ofStringAt start: Int) throws(JSONParseError) {
        while index < count {
            let byte = base[index]
            if byte == ASCII.quote {
                index += 1
                return
            }
            if byte == ASCII.backslash {
                try parseEscape()
            } else if byte < 0x20 {
                throw controlCharacterError(byte)
            } else if byte < 0x80 {
                scratch.append(byte)
                index += 1
            } else {
                let length = try validateUTF8()
                scratch.append(contentsOf: UnsafeBufferPointer(start: base + index, count: length))
                index += length
            }
        }
        throw error("unterminated string starting", at: start)
    }

    func controlCharacterError(_ byte: UInt8) -> JSONParseError {
        error("raw control character \(codePointName(byte)) in a string (must be escaped as \\u)", at: index)
    }

    /// Decodes one escape sequence at `index` (the backslash) into `scratch`.
    mutating func parseEscape() throws(JSONParseError) {
        let escapeStart = index
        guard index + 1 < count else { throw error("unterminated string", at: index) }
        let code = base[index + 1]
        index += 2
        switch code {
        case ASCII.quote: scratch.append(ASCII.quote)
        case ASCII.backslash: scratch.append(ASCII.backslash)
        case ASCII.slash: scratch.append(ASCII.slash)
        case UInt8(ascii: "b"): scratch.append(0x08)
        case UInt8(ascii: "f"): scratch.append(0x0C)
        case UInt8(ascii: "n"): scratch.append(0x0A)
        case UInt8(ascii: "r"): scratch.append(0x0D)
        case UInt8(ascii: "t"): scratch.append(0x09)
        case UInt8(ascii: "u"):
            var scalar = try parseHex4()
            if scalar >= 0xD800, scalar <= 0xDBFF {
                // A high surrogate must be followed by `\u` and a low surrogate.
                guard index + 1 < count, base[index] == ASCII.backslash, base[index + 1] == UInt8(ascii: "u") else {
                    throw error("unpaired surrogate in \\u escape", at: escapeStart)
                }
                index += 2
                let low = try parseHex4()
                guard low >= 0xDC00, low <= 0xDFFF else {
                    throw error("unpaired surrogate in \\u escape", at: escapeStart)
                }
                scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
            } else if scalar >= 0xDC00, scalar <= 0xDFFF {
                throw error("unpaired surrogate in \\u escape", at: escapeStart)
            }
            appendUTF8(scalar)
        default:
            throw error("invalid escape sequence", at: escapeStart)
        }
    }

    mutating func parseHex4() throws(JSONParseError) -> UInt32 {
        var result: UInt32 = 0
        for i in 0..<4 {
            guard index + i < count else { throw error("unterminated \\u escape", at: index) }
            let byte = base[index + i]
            let digit: UInt8
            switch byte {
            case ASCII.zero...ASCII.nine: digit = byte - ASCII.zero
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw error("invalid \\u escape: expected 4 hex digits", at: index - 2)
            }
            result = result << 4 | UInt32(digit)
        }
        index += 4
        return result
    }

    mutating func appendUTF8(_ scalar: UInt32) {
        switch scalar {
        case ..<0x80:
            scratch.append(UInt8(scalar))
        case ..<0x800:
            scratch.append(UInt8(0xC0 | scalar >> 6))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        case ..<0x10000:
            scratch.append(UInt8(0xE0 | scalar >> 12))
            scratch.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        default:
            scratch.append(UInt8(0xF0 | scalar >> 18))
            scratch.append(UInt8(0x80 | scalar >> 12 & 0x3F))
            scratch.append(UInt8(0x80 | scalar >> 6 & 0x3F))
            scratch.append(UInt8(0x80 | scalar & 0x3F))
        }
    }

    /// The length of the well-formed multi-byte UTF-8 sequence at `index`, or an error.
    func validateUTF8() throws(JSONParseError) -> Int {
        let length = validUTF8Length(at: index)
        guard length > 0 else { throw error("invalid UTF-8", at: index) }
        return length
    }

    /// The length of the well-formed UTF-8 sequence at `offset` (Unicode Table 3-7), or 0.
    /// Rejects overlong forms, UTF-16 surrogates (ED A0..BF), code points above U+10FFFF
    /// and sequences cut short.
    func validUTF8Length(at offset: Int) -> Int {
        let lead = base[offset]
        @inline(__always) func byte(_ i: Int) -> UInt8 { offset + i < count ? base[offset + i] : 0 }
        @inline(__always) func isContinuation(_ b: UInt8) -> Bool { b & 0xC0 == 0x80 }
        switch lead {
        case 0x00...0x7F:
            return 1
        case 0xC2...0xDF:
            return isContinuation(byte(1)) ? 2 : 0
        case 0xE0...0xEF:
            let second = byte(1)
            let secondOK: Bool
            switch lead {
            case 0xE0: secondOK = second >= 0xA0 && second <= 0xBF  // no overlongs
            case 0xED: secondOK = second >= 0x80 && second <= 0x9F  // no surrogates
            default: secondOK = isContinuation(second)
            }
            return secondOK && isContinuation(byte(2)) ? 3 : 0
        case 0xF0...0xF4:
            let second = byte(1)
            let secondOK: Bool
            switch lead {
            case 0xF0: secondOK = second >= 0x90 && second <= 0xBF  // no overlongs
            case 0xF4: secondOK = second >= 0x80 && second <= 0x8F  // ≤ U+10FFFF
            default: secondOK = isContinuation(second)
            }
            return secondOK && isContinuation(byte(2)) && isContinuation(byte(3)) ? 4 : 0
        default:
            return 0  // 80..C1 (continuation or overlong lead), F5..FF
        }
    }
}

/// Exact powers of ten 10^0 ... 10^22 (all exactly representable as `Double`).
private let _powersOfTen: [Double] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
]
