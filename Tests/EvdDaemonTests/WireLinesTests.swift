import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// Every server line's encoder (`WireLines`) against the line PROTOCOL.md shows, byte for byte —
/// and, where the old encoder is still in use, against it.
@Suite("WireLines")
struct WireLinesTests {
    private static func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

    /// The line with its time (quoted, as the envelope writes it) replaced by `"T"`.
    private static func timeless(_ bytes: [UInt8]) -> String {
        Self.text(bytes).replacingOccurrences(
            of: #""time":"[0-9T:.\-Z]+""#,
            with: #""time":"T""#,
            options: .regularExpression
        )
    }

    private let actor = Actor(uid: 1000, gid: 1000, pid: 42, user: "ann")
    /// 123456789: its text is zero-padded to 16 hex digits.
    private static let epoch = JournalEpoch(value: 123_456_789)
    private var actorJSON: String { Self.text(self.actor.jsonValue.jsonBytes) }

    @Test("an event's prefix, body, and its parts")
    func event() {
        let origin = EventOrigin(session: 7, actor: self.actor)
        let time = Array(#""2026-01-02T03:04:05.000006Z""#.utf8)
        let prefix = WireLines.prefix(seq: 12, epoch: Self.epoch, name: "insert-rows", time: time)
        #expect(
            Self.text(prefix)
                == #"{"type":"event","seq":12,"epoch":"00000000075bcd15","event":"insert-rows","time":"2026-01-02T03:04:05.000006Z","subscription":"#
        )
        let body = WireLines.body(origin, ["table": "t", "rows": 1])
        #expect(Self.text(body) == #","session":7,"actor":"# + self.actorJSON + #","table":"t","rows":1}"# + "\n")
        #expect(Self.text(WireLines.body(.daemon, [:])) == #","session":null,"actor":null}"# + "\n")

        var parts: [UInt8] = []
        WireLines.appendStart(seq: 12, to: &parts)
        var name = "insert-rows"
        name.withUTF8 { WireLines.appendName($0, epoch: Self.epoch, to: &parts) }
        parts += time
        JSONWriter.appendASCII(WireLines.subscriptionKey, to: &parts)
        #expect(parts == prefix)
        var head: [UInt8] = []
        name.withUTF8 { WireLines.appendHead(seq: 12, epoch: Self.epoch, name: $0, to: &head) }
        #expect(head + time + Array(#","subscription":"#.utf8) == prefix)
        // A name that needs escaping, and the time of now.
        let now = WireLines.prefix(seq: 1, epoch: Self.epoch, name: "a\"b", time: nil)
        #expect(Self.timeless(now) == #"{"type":"event","seq":1,"epoch":"00000000075bcd15","event":"a\"b","time":"T","subscription":"#)
    }

    @Test("veto")
    func veto() {
        let origin = EventOrigin(session: 3, actor: nil)
        let line = WireLines.veto(
            seq: 99,
            epoch: Self.epoch,
            name: "commit",
            subscription: 4,
            origin: origin,
            deadlineMs: 0,
            properties: ["database": "main"]
        )
        #expect(
            Self.timeless(line)
                == #"{"type":"veto","seq":99,"epoch":"00000000075bcd15","event":"commit","time":"T","subscription":4,"session":3,"actor":null,"deadline_ms":1,"database":"main"}"#
                + "\n"
        )
        let later = WireLines.veto(
            seq: 1,
            epoch: Self.epoch,
            name: "checkout",
            subscription: 2,
            origin: .daemon,
            deadlineMs: 250,
            properties: [:]
        )
        #expect(
            Self.timeless(later)
                == #"{"type":"veto","seq":1,"epoch":"00000000075bcd15","event":"checkout","time":"T","subscription":2,"session":null,"actor":null,"deadline_ms":250}"#
                + "\n"
        )
    }

    @Test("responses")
    func responses() {
        let id: JSONValue = "r1"
        let ok = WireLines.response(id: id, result: ["n": 1])
        #expect(Self.text(ok) == #"{"type":"response","id":"r1","ok":true,"result":{"n":1}}"# + "\n")
        let error = EvdError(.badRequest, "no", extra: ["field": "sql"])
        let failed = WireLines.response(id: .int(5), error: error)
        #expect(
            Self.text(failed)
                == #"{"type":"response","id":5,"ok":false,"error":{"code":"bad_request","message":"no","field":"sql"}}"# + "\n"
        )
        #expect(Self.text(WireLines.response(id: .null, result: .null)) == #"{"type":"response","id":null,"ok":true,"result":null}"# + "\n")
    }

    @Test("hello")
    func hello() {
        let line = WireLines.hello(
            version: evdVersion,
            session: 8,
            actor: self.actor,
            databases: ["main", "logs"],
            seq: 41,
            epoch: Self.epoch
        )
        #expect(
            Self.text(line)
                == #"{"type":"hello","server":"evd","version":""# + evdVersion + #"","protocol":1,"session":8,"actor":"#
                + self.actorJSON + #","databases":["main","logs"],"seq":41,"epoch":"00000000075bcd15"}"# + "\n"
        )
    }

    @Test("notices")
    func notices() {
        #expect(Self.text(WireLines.shutdownNotice()) == #"{"type":"notice","code":"shutdown"}"# + "\n")
        #expect(
            Self.text(WireLines.idleTransactionTimeoutNotice(database: "main", maxMs: 30000))
                == #"{"type":"notice","code":"idle_transaction_timeout","database":"main","max_ms":30000}"# + "\n"
        )
        #expect(Self.text(WireLines.gapNotice(from: 3, to: 9)) == #"{"type":"notice","code":"gap","from":3,"to":9}"# + "\n")
        #expect(
            Self.text(WireLines.laggedDroppedNotice(subscription: 2, dropped: 5, from: 10, to: 14))
                == #"{"type":"notice","code":"lagged","subscription":2,"dropped":5,"from":10,"to":14}"# + "\n"
        )
        #expect(
            Self.text(WireLines.laggedDisconnectNotice(subscription: 2, lastSeq: 9))
                == #"{"type":"notice","code":"lagged","subscription":2,"last_seq":9}"# + "\n"
        )
    }
}
