import EvdClient
import OrderedCollections
import Testing

// MARK: - Helpers

/// Parses `text`, failing the test on error.
private func parse(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> JSONValue? {
    do {
        return try JSONValue(parsing: text)
    } catch {
        Issue.record("unexpected parse error for \(text.debugDescription): \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// The error from parsing `bytes`, or nil when they parse.
private func parseError(_ bytes: [UInt8]) -> JSONParseError? {
    do {
        _ = try JSONValue(parsing: bytes)
        return nil
    } catch {
        return error
    }
}

private func parseError(_ text: String) -> JSONParseError? {
    parseError(Array(text.utf8))
}

private func written(_ value: JSONValue) -> String { value.jsonString }

private func writtenString(_ s: String) -> String {
    var bytes: [UInt8] = []
    JSONWriter.appendString(s, to: &bytes)
    return String(decoding: bytes, as: UTF8.self)
}

private func writtenDouble(_ d: Double) -> String {
    var bytes: [UInt8] = []
    JSONWriter.appendDouble(d, to: &bytes)
    return String(decoding: bytes, as: UTF8.self)
}

private func writtenInt(_ i: Int64) -> String {
    var bytes: [UInt8] = []
    JSONWriter.appendInt(i, to: &bytes)
    return String(decoding: bytes, as: UTF8.self)
}

/// A tiny deterministic generator (SplitMix64), so randomized tests never flake.
private struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

// MARK: - Parser

@Suite("JSON parser")
struct JSONParserTests {
    @Test func literals() {
        #expect(parse("true") == .bool(true))
        #expect(parse("false") == .bool(false))
        #expect(parse("null") == .null)
        #expect(parse("[true,false,null]") == [true, false, nil])
    }

    @Test(arguments: ["tru", "True", "nul", "NULL", "fals", "falsey", "nulll", "t", "[tru]", "undefined"])
    func invalidLiterals(text: String) {
        #expect(parseError(text) != nil)
    }

    @Test func integersAndDoubles() throws {
        #expect(parse("5") == .int(5))
        #expect(parse("5.0") == .double(5.0))
        #expect(parse("1e2") == .double(100))
        #expect(parse("1E2") == .double(100))
        #expect(parse("1e+2") == .double(100))
        #expect(parse("-0") == .int(0))
        #expect(parse("0") == .int(0))
        #expect(parse("-7") == .int(-7))
        #expect(parse("9223372036854775807") == .int(Int64.max))
        // Integers beyond Int64 keep their text: a Double would round them, and make them reals.
        #expect(parse("9223372036854775808") == .number("9223372036854775808"))
        #expect(parse("-9223372036854775808") == .int(Int64.min))
        #expect(parse("-9223372036854775809") == .number("-9223372036854775809"))
        #expect(parse("99999999999999999999") == .number("99999999999999999999"))
        #expect(parse("1000000000000000000000000") == .number("1000000000000000000000000"))
        #expect(parse("1e24") == .double(1e24))
        #expect(written(parse("100000000000000000000") ?? .null) == "100000000000000000000")
        // -0.0 stays a double and keeps its sign.
        guard case .double(let negativeZero) = try JSONValue(parsing: "-0.0") else {
            Issue.record("-0.0 is not a double")
            return
        }
        #expect(negativeZero == 0 && negativeZero.sign == .minus)
    }

    @Test func doublesAreCorrectlyRounded() {
        #expect(parse("0.1") == .double(0.1))
        #expect(parse("-2.5") == .double(-2.5))
        #expect(parse("1e308") == .double(1e308))
        #expect(parse("1.7976931348623157e308") == .double(.greatestFiniteMagnitude))
        #expect(parse("5e-324") == .double(.leastNonzeroMagnitude))
        #expect(parse("2.2250738585072014e-308") == .double(.leastNormalMagnitude))
        #expect(parse("123456789012345678901234567890.0") == .double(1.2345678901234568e29))
        #expect(parse("3.14159265358979323846264338327950288") == .double(.pi))
        #expect(parse("9007199254740993.0") == .double(9007199254740992.0))
        #expect(parse("0.000001") == .double(0.000001))
        #expect(parse("1e-400") == .double(0))
        #expect(parse("0.30000000000000004") == .double(0.1 + 0.2))
    }

    /// The fast double path must agree bit for bit with the stdlib's conversion.
    @Test func randomNumbersAgreeWithStdlib() throws {
        var rng = SplitMix64(seed: 42)
        func digits(_ n: Int, leadingNonZero: Bool) -> String {
            var s = ""
            for k in 0..<n {
                s += String(Int.random(in: (k == 0 && leadingNonZero ? 1 : 0)...9, using: &rng))
            }
            return s
        }
        for _ in 0..<20_000 {
            var text = Bool.random(using: &rng) ? "-" : ""
            let integerLength = Int.random(in: 1...22, using: &rng)
            text += integerLength == 1 && Bool.random(using: &rng) ? "0" : digits(integerLength, leadingNonZero: true)
            let hasFraction = Int.random(in: 0..<3, using: &rng) > 0
            if hasFraction { text += "." + digits(Int.random(in: 1...22, using: &rng), leadingNonZero: false) }
            let hasExponent = Int.random(in: 0..<3, using: &rng) == 0
            if hasExponent {
                text += ["e", "E", "e+", "e-", "E-"].randomElement(using: &rng)!
                text += String(Int.random(in: 0...340, using: &rng))
            }
            let expected = Double(text)!
            if !hasFraction && !hasExponent, let int = Int64(text) {
                #expect(try JSONValue(parsing: text) == .int(int), "\(text)")
            } else if !hasFraction && !hasExponent {
                #expect(try JSONValue(parsing: text) == .number(text), "\(text)")  // beyond Int64: its text
            } else if expected.isFinite {
                guard case .double(let d) = try JSONValue(parsing: text) else {
                    Issue.record("\(text) did not parse as a double")
                    continue
                }
                #expect(d.bitPattern == expected.bitPattern, "\(text): \(d) vs \(expected)")
            } else {
                #expect(parseError(text)?.message.contains("out of range") == true, "\(text)")
            }
        }
    }

    @Test(arguments: [
        "+1", "01", "-01", "00", "1.", "-1.", ".5", "-.5", "-", "1e", "1e+", "1E-", "1.e5", "1.5e",
        "NaN", "nan", "Infinity", "-Infinity", "inf", "0x10", "--1", "1e5.5", "1_000", "1.0.0",
        "[01]", "[1.]", "[-]", "1e400", "-1e400", "1 000",
    ])
    func invalidNumbers(text: String) {
        #expect(parseError(text) != nil, "\(text) should be rejected")
    }

    @Test func leadingZeroMessage() {
        #expect(parseError("012")?.message == "invalid number: leading zeros are not allowed at byte 0")
    }

    @Test func escapes() {
        #expect(parse(#""\" \\ \/ \b \f \n \r \t""#) == .string("\" \\ / \u{08} \u{0C} \n \r \t"))
        #expect(parse(#""\u0041\u00e9\u00E9\u20AC\uFFFF\u0000""#) == .string("Aéé€\u{FFFF}\u{0}"))
        #expect(parse(#""\ud83d\ude00""#) == .string("😀"))
        #expect(parse(#""\uD83D\uDE00""#) == .string("😀"))
        #expect(parse(#""\udbff\udfff""#) == .string("\u{10FFFF}"))
        #expect(parse(#""plain é 😀 then \n escape é 😀""#) == .string("plain é 😀 then \n escape é 😀"))
        #expect(parse(#""""#) == .string(""))
    }

    @Test(arguments: [
        #""\ud83d""#, #""\ude00""#, #""\ud83d\u0041""#, #""\ud83dx""#, #""\ud83d\n""#,
        #""\ud83d\ud83d""#, #""\ude00\ud83d""#,
    ])
    func unpairedSurrogatesAreRejected(text: String) {
        #expect(parseError(text)?.message.contains("surrogate") == true, "\(text)")
    }

    @Test(arguments: [#""\x""#, #""\a""#, #""\u12""#, #""\u12G4""#, #""\uZZZZ""#, #""\U0041""#, #""\"#, #""\u00"#, #""\'""#])
    func invalidEscapes(text: String) {
        #expect(parseError(text) != nil, "\(text)")
    }

    @Test func rawControlCharactersAreRejected() {
        for byte: UInt8 in 0..<0x20 {
            let error = parseError([0x22, 0x61, byte, 0x62, 0x22])
            #expect(error?.message.contains("control character") == true, "byte \(byte)")
            #expect(error?.offset == 2)
        }
        // After an escape (the slow path) too.
        #expect(parseError([0x22, 0x5C, 0x6E, 0x01, 0x22]) != nil)
        // DEL is not a control character in JSON's sense.
        #expect(parse("\"a\u{7F}b\"") == .string("a\u{7F}b"))
    }

    @Test(
        arguments: [
            [0x22, 0xFF, 0x22],  // never valid
            [0x22, 0xC0, 0xAF, 0x22],  // overlong '/'
            [0x22, 0xC1, 0xBF, 0x22],  // overlong
            [0x22, 0xE0, 0x80, 0xAF, 0x22],  // overlong, 3 bytes
            [0x22, 0xF0, 0x80, 0x80, 0xAF, 0x22],  // overlong, 4 bytes
            [0x22, 0xED, 0xA0, 0x80, 0x22],  // UTF-16 surrogate U+D800
            [0x22, 0xED, 0xBF, 0xBF, 0x22],  // UTF-16 surrogate U+DFFF
            [0x22, 0xE2, 0x82, 0x22],  // truncated €
            [0x22, 0xE2, 0x82],  // truncated at end of input
            [0x22, 0xF0, 0x9F, 0x98],  // truncated 😀 at end of input
            [0x22, 0x80, 0x22],  // lone continuation byte
            [0x22, 0xF4, 0x90, 0x80, 0x80, 0x22],  // above U+10FFFF
            [0x22, 0xF5, 0x80, 0x80, 0x80, 0x22],  // F5 lead
            [0x22, 0x5C, 0x6E, 0xFF, 0x22],  // after an escape (slow path)
            [0xFF],  // outside a string
            [0x5B, 0xC0, 0x5D],  // outside a string, in an array
        ] as [[UInt8]]
    )
    func invalidUTF8IsRejected(bytes: [UInt8]) {
        let error = parseError(bytes)
        #expect(error?.message.contains("UTF-8") == true, "\(bytes): \(String(describing: error))")
    }

    @Test func invalidUTF8Offset() {
        #expect(parseError([0x22, 0x61, 0xE2, 0x82, 0x22])?.offset == 2)
        #expect(parseError([0x22, 0x61, 0xE2, 0x82, 0x22])?.message == "invalid UTF-8 at byte 2")
    }

    @Test func validUTF8IsAccepted() throws {
        let cases: [([UInt8], String)] = [
            ([0xC3, 0xA9], "é"),
            ([0xE2, 0x82, 0xAC], "€"),
            ([0xED, 0x9F, 0xBF], "\u{D7FF}"),
            ([0xEE, 0x80, 0x80], "\u{E000}"),
            ([0xEF, 0xBF, 0xBF], "\u{FFFF}"),
            ([0xF0, 0x9F, 0x98, 0x80], "😀"),
            ([0xF4, 0x8F, 0xBF, 0xBF], "\u{10FFFF}"),
        ]
        for (utf8, expected) in cases {
            #expect(try JSONValue(parsing: [0x22] + utf8 + [0x22]) == .string(expected))
        }
    }

    @Test func nonASCIIOutsideStringsIsNamed() {
        #expect(parseError("é")?.message.contains("unexpected character 'é' at byte 0") == true)
    }

    @Test func nestingLimit() throws {
        let ok = String(repeating: "[", count: 512) + String(repeating: "]", count: 512)
        #expect(try JSONValue(parsing: ok).jsonString == ok)
        let tooDeep = String(repeating: "[", count: 513) + String(repeating: "]", count: 513)
        let error = parseError(tooDeep)
        #expect(error?.message == "nesting deeper than 512 at byte 512")
        #expect(error?.offset == 512)

        // Objects count too.
        let objects =
            String(repeating: #"{"a":"#, count: 256) + String(repeating: "[", count: 256) + "1"
            + String(repeating: "]", count: 256) + String(repeating: "}", count: 256)
        #expect(parseError(objects) == nil)
        let deeperObjects =
            String(repeating: #"{"a":"#, count: 257) + String(repeating: "[", count: 256) + "1"
            + String(repeating: "]", count: 256) + String(repeating: "}", count: 257)
        #expect(parseError(deeperObjects)?.message.hasPrefix("nesting deeper than 512") == true)
    }

    @Test func hugeNestingFailsCleanly() {
        #expect(parseError(String(repeating: "[", count: 100_000))?.message.contains("nesting") == true)
        let balanced = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        #expect(parseError(balanced)?.message.contains("nesting") == true)
        #expect(parseError(String(repeating: #"{"a":"#, count: 100_000))?.message.contains("nesting") == true)
    }

    @Test(arguments: ["1 2", "[]]", "{}x", "true false", #""a""b""#, "1,", "null;", "[1]\n[2]", "0 x", "{} {}"])
    func trailingGarbageIsRejected(text: String) {
        #expect(parseError(text)?.message.hasPrefix("trailing characters after the value") == true, "\(text)")
    }

    @Test func whitespaceAroundIsAccepted() {
        #expect(parse(" \t\n\r1 \t\n\r") == .int(1))
        #expect(parse("\n[ 1 , 2 ]\n") == [1, 2])
        #expect(parse(" { \"a\" : [ ] , \"b\" : { } } ") == ["a": [], "b": [:]])
        #expect(parse("\r\n\"x\"\r\n") == "x")
    }

    @Test(arguments: ["\u{0C}1", "1\u{0C}", "\u{A0}1", "\u{0B}1", "[1,\u{0C}2]"])
    func otherWhitespaceIsRejected(text: String) {
        #expect(parseError(text) != nil)
    }

    @Test func emptyInputIsRejected() throws {
        #expect(parseError("") != nil)
        #expect(parseError("   \n") != nil)
        #expect(throws: JSONParseError.self) { try JSONValue(parsing: UnsafeRawBufferPointer(start: nil, count: 0)) }
    }

    @Test(arguments: [
        "[1,]", "[,1]", "[,]", "{\"a\":1,}", "{,}", "{\"a\"}", "{a:1}", "{\"a\" 1}", "{\"a\":}", "[1 2]",
        "[", "{", "]", "}", "{\"a\":", "{\"a\"", "[1,", "\"abc", "\"abc\\\"", "{1:2}", "{'a':1}", "['a']",
        "[1}", "{\"a\":1]", ":", ",", "{\"a\":1 \"b\":2}", "/* c */ 1", "1 // c",
    ])
    func malformedStructureIsRejected(text: String) {
        #expect(parseError(text) != nil, "\(text)")
    }

    @Test func errorMessagesAreReadable() {
        let x = parseError("[1, x]")
        #expect(x?.offset == 4)
        #expect(x?.message == "unexpected character 'x' at byte 4, expected a value")
        #expect(x?.description == x?.message)
        #expect(parseError("\"abc")?.message == "unterminated string starting at byte 0")
        #expect(parseError("[1 2]")?.message == "unexpected character '2' at byte 3, expected ',' or ']'")
        #expect(parseError("[1")?.message == "unexpected end of input at byte 2, expected ',' or ']'")
        #expect(parseError("1 x")?.message == "trailing characters after the value at byte 2")
        #expect(parseError("{\"a\" 1}")?.message == "unexpected character '1' at byte 5, expected ':'")
    }

    @Test func duplicateKeysLastWinsFirstPositionKept() throws {
        let value = try JSONValue(parsing: #"{"a":1,"b":2,"a":3}"#)
        #expect(value.objectValue?.keys.elements == ["a", "b"])
        #expect(value["a"] == .int(3))
        #expect(value["b"] == .int(2))
        #expect(value.jsonString == #"{"a":3,"b":2}"#)
    }

    /// Consecutive objects share the keys of the one before when they are the same (the rows of an
    /// insert); each object must still come out exactly as written.
    @Test func consecutiveObjectsWithSimilarKeys() throws {
        let text =
            #"[{"a":1,"b":2},{"a":3,"b":4},{"a":5,"bc":6},{"ab":7,"b":8},{"a":9},{"a":1,"b":2,"c":3},"#
            + #"{"a\"b":1,"b":2},{"a\"b":3,"b":4},{"a":0,"b":1,"a":2},{"a":1,"b":2},{},{"a":1,"b":{"a":2,"b":3}},"#
            + #"{"é":1,"b":2},{"é":3,"b":4},{"":1},{"":2},{"a":1,"b" :2},{"a" : 3 ,"b":4}]"#
        let value = try JSONValue(parsing: text)
        let expected: JSONValue = [
            ["a": 1, "b": 2], ["a": 3, "b": 4], ["a": 5, "bc": 6], ["ab": 7, "b": 8], ["a": 9], ["a": 1, "b": 2, "c": 3],
            ["a\"b": 1, "b": 2], ["a\"b": 3, "b": 4], ["a": 2, "b": 1], ["a": 1, "b": 2], [:], ["a": 1, "b": ["a": 2, "b": 3]],
            ["é": 1, "b": 2], ["é": 3, "b": 4], ["": 1], ["": 2], ["a": 1, "b": 2], ["a": 3, "b": 4],
        ]
        #expect(value == expected)  // `OrderedDictionary`'s == compares the order of the keys too
        // A key that is a prefix of the cached one, or longer, or at the end of the input, is no match.
        #expect(parseError(#"[{"ab":1},{"a"#)?.message.hasPrefix("unterminated string") == true)
        #expect(throws: JSONParseError.self) { try JSONValue(parsing: #"[{"ab":1},{"ab"#) }
    }

    @Test func keyOrderIsKept() throws {
        let value = try JSONValue(parsing: #"{"z":1,"a":2,"m":3,"b":{"y":1,"x":2}}"#)
        #expect(value.objectValue?.keys.elements == ["z", "a", "m", "b"])
        #expect(value["b"]?.objectValue?.keys.elements == ["y", "x"])
        #expect(value.jsonString == #"{"z":1,"a":2,"m":3,"b":{"y":1,"x":2}}"#)
    }

    @Test func escapedKeys() throws {
        let value = try JSONValue(parsing: #"{"a\nb":1,"\u00e9":2}"#)
        #expect(value.objectValue?.keys.elements == ["a\nb", "é"])
    }

    @Test func convenienceInitializersAgree() throws {
        let text = #"{"k":[1,2.5,"s",null,true]}"#
        let fromString = try JSONValue(parsing: text)
        let fromArray = try JSONValue(parsing: Array(text.utf8))
        let fromBuffer = try Array(text.utf8).withUnsafeBytes { try JSONValue(parsing: $0) }
        #expect(fromString == fromArray)
        #expect(fromString == fromBuffer)
        #expect(fromString == ["k": [1, 2.5, "s", nil, true]])
        // A substring's storage is shared, not necessarily starting at 0.
        let sub = "xx[1]"
        #expect(try JSONValue(parsing: String(sub.dropFirst(2))) == [1])
    }

    @Test func parsesAOneMebibyteArrayOfInts() throws {
        var bytes: [UInt8] = [UInt8(ascii: "[")]
        var expected: [JSONValue] = []
        var rng = SplitMix64(seed: 7)
        while bytes.count < 1 << 20 {
            let i = Int64(bitPattern: rng.next()) >> Int.random(in: 0...63, using: &rng)
            if !expected.isEmpty { bytes.append(UInt8(ascii: ",")) }
            JSONWriter.appendInt(i, to: &bytes)
            expected.append(.int(i))
        }
        bytes.append(UInt8(ascii: "]"))
        let value = try JSONValue(parsing: bytes)
        #expect(value.arrayValue?.count == expected.count)
        #expect(value == .array(expected))
        #expect(value.jsonBytes == bytes)
    }
}

// MARK: - Writer

@Suite("JSON writer")
struct JSONWriterTests {
    @Test func scalars() {
        #expect(written(.null) == "null")
        #expect(written(.bool(true)) == "true")
        #expect(written(.bool(false)) == "false")
        #expect(written(.int(0)) == "0")
        #expect(written(.int(-42)) == "-42")
        #expect(written(.string("hi")) == #""hi""#)
    }

    @Test func compactContainers() {
        let value: JSONValue = ["b": [1, 2.5, "x", nil], "a": [:], "c": [], "d": ["z": true, "y": false]]
        #expect(written(value) == #"{"b":[1,2.5,"x",null],"a":{},"c":[],"d":{"z":true,"y":false}}"#)
        #expect(written([]) == "[]")
        #expect(written([:]) == "{}")
        #expect(value.jsonBytes == Array(value.jsonString.utf8))
        var appended: [UInt8] = Array("prefix:".utf8)
        value.write(into: &appended)
        #expect(String(decoding: appended, as: UTF8.self) == "prefix:" + value.jsonString)
    }

    @Test func stringEscaping() {
        #expect(writtenString("") == #""""#)
        #expect(writtenString("plain") == #""plain""#)
        #expect(writtenString("a\"b") == #""a\"b""#)
        #expect(writtenString("a\\b") == #""a\\b""#)
        #expect(writtenString("/") == #""/""#)
        #expect(writtenString("\n\r\t\u{08}\u{0C}") == #""\n\r\t\b\f""#)
        #expect(writtenString("\u{01}") == #""\u0001""#)
        #expect(writtenString("x\u{00}y\u{1F}z") == #""x\u0000y\u001fz""#)
        #expect(writtenString("\u{7F}") == "\"\u{7F}\"")
        #expect(writtenString("abc\ndef\"ghi") == #""abc\ndef\"ghi""#)
        #expect(writtenString("\"\"") == #""\"\"""#)
    }

    @Test func nonASCIIIsWrittenRaw() {
        let bytes: [UInt8] = {
            var b: [UInt8] = []
            JSONWriter.appendString("é😀", to: &b)
            return b
        }()
        #expect(bytes == [0x22, 0xC3, 0xA9, 0xF0, 0x9F, 0x98, 0x80, 0x22])
        #expect(written(["é": "😀\u{2028}"]) == "{\"é\":\"😀\u{2028}\"}")
    }

    @Test func allControlCharactersRoundTrip() throws {
        let s = String(String.UnicodeScalarView((0..<0x80).map { Unicode.Scalar(UInt8($0)) }))
        let text = writtenString(s)
        #expect(!text.utf8.contains { $0 < 0x20 })
        #expect(try JSONValue(parsing: text) == .string(s))
    }

    @Test func integers() {
        #expect(writtenInt(0) == "0")
        #expect(writtenInt(9) == "9")
        #expect(writtenInt(10) == "10")
        #expect(writtenInt(-1) == "-1")
        #expect(writtenInt(Int64.max) == "9223372036854775807")
        #expect(writtenInt(Int64.min) == "-9223372036854775808")
        var rng = SplitMix64(seed: 1)
        for _ in 0..<10_000 {
            let i = Int64(bitPattern: rng.next()) >> Int.random(in: 0...63, using: &rng)
            #expect(writtenInt(i) == String(i))
        }
    }

    @Test func doubles() {
        #expect(writtenDouble(0.1) == "0.1")
        #expect(writtenDouble(1e-7) == "1e-07")
        #expect(writtenDouble(1e300) == "1e+300")
        #expect(writtenDouble(-2.5) == "-2.5")
        #expect(writtenDouble(1.0) == "1.0")
        #expect(writtenDouble(0.0) == "0.0")
        #expect(writtenDouble(-0.0) == "-0.0")
        #expect(writtenDouble(-3.0) == "-3.0")
        #expect(writtenDouble(1e16) == "1e+16")
        #expect(writtenDouble(.leastNonzeroMagnitude) == "5e-324")
        #expect(writtenDouble(.greatestFiniteMagnitude) == "1.7976931348623157e+308")
        #expect(writtenDouble(.nan) == "null")
        #expect(writtenDouble(.infinity) == #"{"$real":"Infinity"}"#)
        #expect(writtenDouble(-.infinity) == #"{"$real":"-Infinity"}"#)
        #expect(written([.double(.nan), .double(.infinity)]) == #"[null,{"$real":"Infinity"}]"#)
    }

    /// Every finite double is written as valid JSON that reads back as the same bits.
    @Test func randomDoublesRoundTrip() throws {
        var rng = SplitMix64(seed: 3)
        var samples: [Double] = []
        for _ in 0..<20_000 { samples.append(Double(bitPattern: rng.next())) }
        for _ in 0..<5_000 { samples.append(Double(Int64.random(in: -1 << 60...1 << 60, using: &rng))) }
        for _ in 0..<5_000 { samples.append(Double(Int.random(in: -100_000...100_000, using: &rng)) / 8) }
        // One to three decimals, on both sides of the fast path's bounds (0.001 and 2^31).
        for scale in [10.0, 100.0, 1000.0] {
            for _ in 0..<5_000 { samples.append(Double(Int.random(in: -100_000...100_000, using: &rng)) / scale) }
            for _ in 0..<2_000 { samples.append(Double(Int64.random(in: -(1 << 42)...(1 << 42), using: &rng)) / scale) }
        }
        for near in [0.001, 0.002, 0.0009, 2_147_483_647.5, 2_147_483_648.5, 2_147_483_647.125, 0.1 + 0.2, 1.005, 2.675] {
            samples += [near, -near, near.nextUp, near.nextDown]
        }
        for d in samples where d.isFinite {
            let text = writtenDouble(d)
            #expect(text == d.description, "\(d)")
            guard case .double(let back) = try JSONValue(parsing: text) else {
                Issue.record("\(text) did not read back as a double")
                continue
            }
            #expect(back.bitPattern == d.bitPattern, "\(text)")
        }
    }
}

// MARK: - Round trip

@Suite("JSON round trip")
struct JSONRoundTripTests {
    /// Builds a random value, nested up to `depth`.
    private static func randomValue(_ rng: inout SplitMix64, depth: Int) -> JSONValue {
        let kind = Int.random(in: 0..<(depth > 0 ? 8 : 6), using: &rng)
        switch kind {
        case 0: return .null
        case 1: return .bool(Bool.random(using: &rng))
        case 2: return .int(Int64(bitPattern: rng.next()) >> Int.random(in: 0...63, using: &rng))
        case 3:
            var d: Double
            repeat { d = Double(bitPattern: rng.next()) } while !d.isFinite
            return .double(
                [d, Double(Int.random(in: -1000...1000, using: &rng)) / 4, 0.1, -0.0, 1e16]
                    .randomElement(using: &rng)!
            )
        case 4, 5: return .string(randomString(&rng))
        case 6:
            return .array((0..<Int.random(in: 0...6, using: &rng)).map { _ in randomValue(&rng, depth: depth - 1) })
        default:
            var object = JSONObject()
            for _ in 0..<Int.random(in: 0...6, using: &rng) {
                object[randomString(&rng)] = randomValue(&rng, depth: depth - 1)
            }
            return .object(object)
        }
    }

    private static func randomString(_ rng: inout SplitMix64) -> String {
        let pool: [Unicode.Scalar] = [
            "a", "Z", "0", " ", "\"", "\\", "/", "\n", "\r", "\t", "\u{08}", "\u{0C}",
            "\u{00}", "\u{01}", "\u{1F}", "\u{7F}", "é", "€", "\u{FFFF}", "😀", "\u{10FFFF}",
        ]
        var scalars = String.UnicodeScalarView()
        for _ in 0..<Int.random(in: 0...12, using: &rng) {
            if Bool.random(using: &rng) {
                scalars.append(pool.randomElement(using: &rng)!)
            } else {
                var scalar: Unicode.Scalar?
                repeat { scalar = Unicode.Scalar(UInt32.random(in: 0...0x10FFFF, using: &rng)) } while scalar == nil
                scalars.append(scalar!)
            }
        }
        return String(scalars)
    }

    @Test func randomValuesRoundTrip() throws {
        var rng = SplitMix64(seed: 0x5EED)
        for _ in 0..<2_000 {
            let value = Self.randomValue(&rng, depth: 5)
            let bytes = value.jsonBytes
            let back = try JSONValue(parsing: bytes)
            #expect(back == value, "\(value.jsonString)")
            #expect(back.jsonBytes == bytes)
            #expect(try JSONValue(parsing: value.jsonString) == value)
        }
    }

    @Test func deepValueRoundTrips() throws {
        var value: JSONValue = "leaf"
        for i in 0..<512 { value = i.isMultiple(of: 2) ? [value] : ["k": value] }
        #expect(try JSONValue(parsing: value.jsonBytes) == value)
    }
}

/// `JSONValue.parsing(_:flatteningRowsOf:)`: the rows of an insert read flat must be exactly what the
/// general parser reads, and anything it cannot read flat must come out as the general parser has it.
@Suite("JSON parser, flat rows")
struct JSONFlatRowsTests {
    /// Parses `text` both ways and checks they agree; returns the flat rows.
    @discardableResult
    private func flatten(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> JSONRows? {
        let general = try JSONValue(parsing: text)
        let (value, rows) = try Array(text.utf8).withUnsafeBytes { try JSONValue.parsing($0, flatteningRowsOf: "rows") }
        var whole = value
        if let rows, case .object(var object) = value {
            #expect(object["rows"] == nil, "flat rows are left out of the object", sourceLocation: sourceLocation)
            object["rows"] = rows.jsonValue
            // The general parser keeps `rows` where it was written; compare without the order.
            whole = .object(object)
            #expect(Set(object.keys) == Set(general.objectValue?.keys ?? []), sourceLocation: sourceLocation)
            for (key, member) in object { #expect(general[key] == member, "member \(key)", sourceLocation: sourceLocation) }
        } else {
            #expect(whole == general, sourceLocation: sourceLocation)
        }
        return rows
    }

    @Test func rowsWithTheSameKeysAreOneRun() throws {
        let rows = try #require(try flatten(#"{"op":"insert","rows":[{"id":1,"n":"a"},{"id":2,"n":"b"},{"id":3,"n":null}],"x":true}"#))
        #expect(rows.count == 3)
        #expect(rows.runs.count == 1)
        #expect(rows.runs[0].keys == ["id", "n"])
        #expect(rows.values == [1, "a", 2, "b", 3, nil])
        #expect(rows[1] == ["id": 2, "n": "b"])
    }

    @Test func rowsWithOtherKeysStartRuns() throws {
        let text =
            #"{"rows":[{"a":1,"b":2},{"a":3,"b":4},{"a":5,"bc":6},{"ab":7,"b":8},{"a":9},{"a":1,"b":2,"c":3},"#
            + #"{"a\"b":1,"b":2},{"a\"b":3,"b":4},{"a":1,"b":2},{},{},{"é":1,"b":2},{"é":3,"b":4},{"":1},{"":2},"#
            + #"{"a":1,"b" :2},{"a" : 3 ,"b":4},{"\u0061":5,"b":6},{"b":7,"a":8}]}"#
        let rows = try #require(try flatten(text))
        #expect(rows.count == 19)
        #expect(rows.runs.map(\.rows.count) == [2, 1, 1, 1, 1, 2, 1, 2, 2, 2, 3, 1])
        #expect(rows.runs.last?.keys == ["b", "a"])
        #expect(rows[17] == ["a": 5, "b": 6])  // the same key, written with an escape
        #expect(rows.column("b") == [2, 4, 8, 2, 2, 4, 2, 2, 4, 2, 4, 6, 7])
    }

    @Test func scalarsOfEveryKind() throws {
        let rows = try #require(try flatten(#"{"rows":[{"a":-1.5e3,"b":true,"c":false,"d":"x\ny","e":9223372036854775807,"f":1e300}]}"#))
        #expect(rows.values == [-1500.0, true, false, "x\ny", 9_223_372_036_854_775_807, 1e300])
    }

    @Test func whatIsNotFlatStaysInTheObject() throws {
        // A nested value, a repeated key in a row, an element that is not an object, rows that are
        // not an array: the general parser's reading.
        for text in [
            #"{"rows":[{"a":1},{"a":[1,2]}]}"#, #"{"rows":[{"a":1},{"a":{"b":1}}]}"#, #"{"rows":[{"a":1,"a":2}]}"#,
            #"{"rows":[{"a":1},2]}"#, #"{"rows":{"a":1}}"#, #"{"rows":5}"#, #"{"x":{"rows":[{"a":1}]}}"#,
            #"[{"rows":[{"a":1}]}]"#,
        ] {
            #expect(try flatten(text) == nil, "\(text)")
        }
    }

    @Test func theLastOfARepeatedKeyCounts() throws {
        #expect(try flatten(#"{"rows":[{"a":1}],"rows":[{"b":2}]}"#)?.values == [2])
        #expect(try flatten(#"{"rows":[{"a":1}],"rows":[{"b":[2]}]}"#) == nil)
        #expect(try flatten(#"{"rows":[{"a":[1]}],"rows":[{"b":2}]}"#)?.values == [2])
    }

    @Test func emptyRows() throws {
        let rows = try #require(try flatten(#"{"rows":[]}"#))
        #expect(rows.isEmpty && rows.count == 0)
    }

    @Test func invalidJSONFailsAsTheGeneralParserDoes() throws {
        for text in [
            #"{"rows":[{"a":1},{"a"#, #"{"rows":[{"a":1},{"a":}]}"#, #"{"rows":[{"a":1},]}"#, #"{"rows":[{"a":01}]}"#,
            #"{"rows":[{"a":1}"#, #"{"rows":[{"a":"x}]}"#, #"{"rows":[{"ab":1},{"a"":2}]}"#,
            #"{"rows":[{"a\"":1},{"a"":2}]}"#, #"{"rows":[{"a":1} {"a":2}]}"#, #"{"rows":[{"a":tru}]}"#,
        ] {
            let general = parseError(text)
            #expect(general != nil, "\(text)")
            let flat: JSONParseError?
            do {
                _ = try Array(text.utf8).withUnsafeBytes { try JSONValue.parsing($0, flatteningRowsOf: "rows") }
                flat = nil
            } catch {
                flat = error as? JSONParseError
            }
            #expect(flat?.message == general?.message, "\(text)")
        }
    }

    /// Random rows, strings of every kind and length around the 8-byte words the string scanner
    /// reads at a time: the flat reading is the general one.
    @Test func randomRowsReadAsTheGeneralParserDoes() throws {
        var generator = SystemRandomNumberGenerator()
        let pieces = ["a", "xyz", "\"", "\\", "\n", "\u{1}", "\u{1F}", "é", "😀", "\u{7F}", " ", "/", "0123456", "\u{2028}"]
        let keys = ["id", "name", "a\"b", "longer_key_name", "", "é"]
        for _ in 0..<20 {
            var rows: [JSONValue] = []
            for _ in 0..<50 {
                var row = JSONObject()
                for key in keys.shuffled(using: &generator).prefix(Int.random(in: 1...keys.count, using: &generator)) {
                    switch Int.random(in: 0..<6, using: &generator) {
                    case 0: row[key] = .int(Int64.random(in: Int64.min...Int64.max, using: &generator))
                    case 1: row[key] = .double(Double.random(in: -1e6...1e6, using: &generator))
                    case 2: row[key] = .bool(Bool.random(using: &generator))
                    case 3: row[key] = .null
                    default:
                        let count = Int.random(in: 0...20, using: &generator)
                        row[key] = .string((0..<count).map { _ in pieces.randomElement(using: &generator)! }.joined())
                    }
                }
                rows.append(.object(row))
            }
            let request: JSONValue = ["op": "insert", "rows": .array(rows)]
            let rowsOut = try #require(try flatten(request.jsonString))
            #expect(rowsOut.jsonValue == .array(rows))
        }
    }

    @Test func rowsBuiltFromObjects() throws {
        let array: [JSONValue] = [["a": 1], ["a": 2], ["b": 3]]
        let rows = try #require(JSONRows(objects: array))
        #expect(rows.jsonValue == .array(array))
        #expect(rows.run(of: 2).keys == ["b"])
        #expect(JSONRows(objects: [["a": 1], 2]) == nil)
    }
}

@Suite("JSON values JSON cannot hold as plain values (issue 19)")
struct JSONValueFormsTests {
    @Test func textIsAStringOnlyWhenItIsUTF8() {
        func text(_ bytes: [UInt8]) -> String {
            var out: [UInt8] = []
            bytes.withUnsafeBufferPointer { JSONWriter.appendText($0, to: &out) }
            return String(decoding: out, as: UTF8.self)
        }
        #expect(text(Array("plain \"ascii\"".utf8)) == #""plain \"ascii\"""#)
        #expect(text(Array("é😀".utf8)) == #""é😀""#)
        #expect(text([0xff]) == #"{"$text_base64":"/w=="}"#)
        #expect(text([0xc3]) == #"{"$text_base64":"ww=="}"#)  // cut short
        #expect(text([0xc0, 0x80]) == #"{"$text_base64":"wIA="}"#)  // overlong
        #expect(text([0xed, 0xa0, 0x80]) == #"{"$text_base64":"7aCA"}"#)  // a surrogate
        #expect(text([0xf4, 0x90, 0x80, 0x80]) == #"{"$text_base64":"9JCAgA=="}"#)  // above U+10FFFF
        #expect([0xff, 0x41].withUnsafeBufferPointer { JSONValue(text: $0) } == ["$text_base64": "/0E="])
        #expect(Array("é".utf8).withUnsafeBufferPointer { JSONValue(text: $0) } == "é")
    }

    @Test func aRequestIDKeepsItsText() throws {
        for id in ["1.50", "1e2", "-0", "18446744073709551616", "0.1"] {
            let (value, _) = try Array(#"{"id":\#(id),"n":1.50}"#.utf8).withUnsafeBytes { bytes in
                try JSONValue.parsing(bytes, flatteningRowsOf: "rows", keepingNumberTextOf: "id")
            }
            #expect(value["id"] == .number(id))
            #expect(value["n"] == .double(1.5))  // only the key asked for
            #expect(value.jsonString == #"{"id":\#(id),"n":1.5}"#)
        }
        let (value, _) = try Array(#"{"id":12}"#.utf8).withUnsafeBytes { bytes in
            try JSONValue.parsing(bytes, flatteningRowsOf: "rows", keepingNumberTextOf: "id")
        }
        #expect(value["id"] == .int(12))
    }
}
