import EvdClient
import NIOCore
import Testing

@testable import NATSClient
@testable import evforward

/// An event line as evd writes it (envelope first, `subscription` after `time`).
func eventLine(
    seq: Int64,
    epoch: String = "0123456789abcdef",
    event: String = "insert-rows",
    database: String? = "main",
    table: String? = "dogs",
    extra: String = #""num_rows":1"#
) -> String {
    var line = #"{"type":"event","seq":\#(seq),"epoch":"\#(epoch)","event":\#(JSONValue.string(event).jsonString),"#
    line += #""time":"2026-11-21T10:00:00.123456Z","subscription":7,"session":17,"#
    line += #""actor":{"id":"uid:1000","uid":1000,"user":"alice","database":"nested"}"#
    if let database { line += #","database":\#(JSONValue.string(database).jsonString)"# }
    if let table { line += #","table":\#(JSONValue.string(table).jsonString)"# }
    line += ",\(extra)}"
    return line
}

/// The same line as a forwarded body: without `"subscription":7`.
func forwardedBody(_ line: String) -> String {
    line.replacingOccurrences(of: #","subscription":7"#, with: "")
}

@Suite("Event lines, subjects and headers")
struct EncodingTests {
    @Test("An event line is located: seq, epoch, names, and the subscription member cut out")
    func locate() throws {
        let text = eventLine(seq: 42)
        let event = try EventLine(ByteBuffer(string: text))
        #expect(event.seq == 42)
        #expect(String(decoding: event.raw(event.epoch), as: UTF8.self) == "0123456789abcdef")
        #expect(String(decoding: event.string(event.event), as: UTF8.self) == "insert-rows")
        #expect(String(decoding: event.string(event.database!), as: UTF8.self) == "main")
        #expect(String(decoding: event.string(event.table!), as: UTF8.self) == "dogs")
        var body = ByteBuffer()
        event.writeBody(into: &body)
        #expect(String(buffer: body) == forwardedBody(text))
        #expect(body.readableBytes == event.bodyCount)
        // Key order is kept: the body parses to the line's members minus `subscription`.
        let parsed = try #require(try JSONValue(parsing: String(buffer: body)).objectValue)
        var expected = try #require(try JSONValue(parsing: text).objectValue)
        expected.removeValue(forKey: "subscription")
        #expect(Array(parsed.keys) == Array(expected.keys))
    }

    @Test("Keys inside nested values are not the event's; a null database is none; escapes are decoded")
    func nestedAndEscaped() throws {
        let text = eventLine(seq: 5, event: "my.app \"x\"", database: nil, table: nil)
        let event = try EventLine(ByteBuffer(string: text))
        #expect(event.database == nil)
        #expect(event.table == nil)
        #expect(String(decoding: event.string(event.event), as: UTF8.self) == "my.app \"x\"")
        let withNull = try EventLine(ByteBuffer(string: text.replacingOccurrences(of: ",\"num_rows\":1}", with: ",\"database\":null}")))
        #expect(withNull.database == nil)
    }

    @Test("The subscription member first or last is cut with the right comma")
    func cutAtEitherEnd() throws {
        let first = #"{"subscription":3,"type":"event","seq":1,"epoch":"e","event":"x","time":"t"}"#
        var body = ByteBuffer()
        try EventLine(ByteBuffer(string: first)).writeBody(into: &body)
        #expect(String(buffer: body) == #"{"type":"event","seq":1,"epoch":"e","event":"x","time":"t"}"#)
        let last = #"{"type":"event","seq":1,"epoch":"e","event":"x","time":"t","subscription":3}"#
        body.clear()
        try EventLine(ByteBuffer(string: last)).writeBody(into: &body)
        #expect(String(buffer: body) == #"{"type":"event","seq":1,"epoch":"e","event":"x","time":"t"}"#)
    }

    @Test(
        "Lines that are not usable events are refused",
        arguments: [
            #"{"type":"notice","code":"gap"}"#,
            #"{"type":"event","seq":1,"event":"x","time":"t","subscription":1}"#,  // no epoch
            #"{"type":"event","seq":"1","epoch":"e","event":"x","time":"t","subscription":1}"#,  // seq not a number
            #"{"type":"event","seq":1,"epoch":"e","event":"x","time":"t","subscription":1"#,  // truncated
        ]
    )
    func malformed(_ text: String) {
        #expect(throws: EventLine.Malformed.self) { try EventLine(ByteBuffer(string: text)) }
    }

    @Test(
        "Subject tokens are escaped exactly as NATSSubject.token does",
        arguments: [
            "main", "a.b c", "100%", "", "*", ">", "tab\there", "ünï.code", "x\u{7f}",
        ]
    )
    func tokens(_ name: String) {
        var bytes: [UInt8] = []
        MessageEncoder.appendToken(Array(name.utf8), to: &bytes)
        #expect(String(decoding: bytes, as: UTF8.self) == NATSSubject.token(name))
    }

    @Test("ce-sequence is 20 digits")
    func padded() {
        var bytes: [UInt8] = []
        MessageEncoder.appendPadded(1234, to: &bytes)
        #expect(String(decoding: bytes, as: UTF8.self) == "00000000000000001234")
        bytes = []
        MessageEncoder.appendPadded(Int64.max, to: &bytes)
        #expect(String(decoding: bytes, as: UTF8.self) == "0000\(Int64.max)".suffix(20).description)
        #expect(bytes.count == 20)
    }

    @Test("NATS URLs: accepted forms and clear refusals")
    func urls() throws {
        #expect(try NATSAddress(parsing: "nats://127.0.0.1:4222") == NATSAddress(host: "127.0.0.1", port: 4222))
        #expect(try NATSAddress(parsing: "localhost") == NATSAddress(host: "localhost", port: 4222))
        #expect(try NATSAddress(parsing: "nats://[::1]:5000/") == NATSAddress(host: "::1", port: 5000))
        for bad in ["tls://h:4222", "nats://user:pw@h:4222", "nats://h:99999", "nats://h:port", "nats://:4222", "nats://h/x"] {
            #expect(throws: ForwarderError.self, "\(bad)") { try NATSAddress(parsing: bad) }
        }
    }

    @Test("The resume point comes from the last message's ce-sequence and ce-epoch")
    func resumePoint() {
        #expect(Forwarder.resumePoint(last: nil, lastSequence: 9) == .init(streamSequence: 9))
        let ours = JetStream.StoredMessage(
            subject: "evd.main.x",
            seq: 12,
            headers: ["Nats-Msg-Id": "00ff:77", "ce-sequence": "00000000000000000077", "ce-epoch": "00ff"],
            payload: []
        )
        #expect(Forwarder.resumePoint(last: ours, lastSequence: 12) == .init(streamSequence: 12, epoch: "00ff", seq: 77))
        let foreign = JetStream.StoredMessage(subject: "evd.other", seq: 13, headers: [:], payload: [])
        #expect(Forwarder.resumePoint(last: foreign, lastSequence: 13) == .init(streamSequence: 13))
    }
}

extension NATSAddress {
    init(host: String, port: Int) {
        self = try! NATSAddress(parsing: "nats://\(host.contains(":") ? "[\(host)]" : host):\(port)")
    }
}
