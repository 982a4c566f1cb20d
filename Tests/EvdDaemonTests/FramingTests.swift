import EvdClient
import Foundation
import OrderedCollections
import Testing

@testable import EvdDaemon

/// PROTOCOL.md §1: NDJSON framing, over-long lines, malformed lines, pipelining.
///
/// Requests sent with `sendRaw` carry string ids (or none), so their responses match no pending
/// `request()` and arrive through `nextMessage()`, in order, like the `id: null` ones.
@Suite("Framing")
struct FramingTests {
    @Test("a 2 MiB line gets line_too_long with id null, and the connection stays usable")
    func overLongLine() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let padding = String(repeating: "x", count: 2 << 20)
                try await evd.sendLine(#"{"op":"ping","id":"big","pad":""# + padding + #""}"#)
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == .null)
                #expect(response["ok"] == false)
                #expect(response["error"]?["code"] == "line_too_long")
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test("the line after an over-long one in the same write is still served")
    func overLongLineThenRequestInOneWrite() async throws {
        try await withRunningDaemon(configure: { $0.maxLineBytes = 4096 }) { daemon in
            try await daemon.withClient { evd in
                let long = #"{"op":"ping","id":"long","pad":""# + String(repeating: "y", count: 10_000) + #""}"#
                try await evd.sendRaw(Array((long + "\n" + #"{"op":"ping","id":"next"}"# + "\n").utf8))
                let first = try #require(await evd.nextMessage(ofType: "response"))
                #expect(first["id"] == .null)
                #expect(first["error"]?["code"] == "line_too_long")
                let second = try #require(await evd.nextMessage(ofType: "response"))
                #expect(second["id"] == "next")
                #expect(second["ok"] == true)
            }
        }
    }

    @Test("a line of exactly maxLineBytes is accepted; one byte more is line_too_long")
    func lineAtTheLimit() async throws {
        try await withRunningDaemon(configure: { $0.maxLineBytes = 4096 }) { daemon in
            try await daemon.withClient { evd in
                let frame = #"{"op":"ping","id":""# + #""}"#
                let atLimit = String(repeating: "a", count: 4096 - frame.utf8.count)
                let line = #"{"op":"ping","id":""# + atLimit + #""}"#
                #expect(line.utf8.count == 4096)
                try await evd.sendLine(line)
                let accepted = try #require(await evd.nextMessage(ofType: "response"))
                #expect(accepted["ok"] == true)
                #expect(accepted["id"] == .string(atLimit))

                let overLimit = atLimit + "b"
                try await evd.sendLine(#"{"op":"ping","id":""# + overLimit + #""}"#)
                let refused = try #require(await evd.nextMessage(ofType: "response"))
                #expect(refused["id"] == .null)
                #expect(refused["error"]?["code"] == "line_too_long")
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test("bad JSON gets bad_json with id null, even when the broken line has an id")
    func badJSON() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                for line in [#"{"op":"ping","id":7,}"#, #"{"op":"ping""#, "not json at all", #"{"op":'ping'}"#] {
                    try await evd.sendLine(line)
                    let response = try #require(await evd.nextMessage(ofType: "response"))
                    #expect(response["id"] == .null, "\(line)")
                    #expect(response["ok"] == false, "\(line)")
                    #expect(response["error"]?["code"] == "bad_json", "\(line)")
                }
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test(
        "invalid UTF-8 gets bad_json",
        arguments: [[0xff, 0xfe], [0xc3], [0xc0, 0xaf], [0xed, 0xa0, 0x80]] as [[UInt8]]
    )
    func invalidUTF8(_ bad: [UInt8]) async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.sendRaw(Array(#"{"op":"ping","id":""#.utf8) + bad + Array(#""}"#.utf8) + [0x0a])
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == .null)
                #expect(response["error"]?["code"] == "bad_json")
                try await evd.sendRaw(bad + [0x0a])
                let bare = try #require(await evd.nextMessage(ofType: "response"))
                #expect(bare["id"] == .null)
                #expect(bare["error"]?["code"] == "bad_json")
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test(
        "a JSON value that is not an object gets bad_json",
        arguments: [#"[1,2]"#, "42", #""ping""#, "null", "true", "[]"]
    )
    func notAnObject(_ line: String) async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.sendLine(line)
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == .null)
                #expect(response["ok"] == false)
                #expect(response["error"]?["code"] == "bad_json")
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test("\\r\\n line endings work")
    func crlf() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.sendRaw(Array(#"{"op":"ping","id":"crlf"}"#.utf8) + [0x0d, 0x0a])
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == "crlf")
                #expect(response["ok"] == true)
                #expect(response["result"] == [:])
            }
        }
    }

    @Test("blank lines are ignored: no response")
    func blankLines() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.sendRaw(Array("\n\n   \n\t\n\r\n".utf8))
                try await evd.sendLine(#"{"op":"ping","id":"after"}"#)
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == "after")
                #expect(response["ok"] == true)
            }
        }
    }

    @Test("several requests in one write all get responses, in order")
    func severalInOneWrite() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let lines = [
                    #"{"op":"ping","id":"a"}"#,
                    #"{"op":"execute","id":"b","sql":"select 41 + 1 as n"}"#,
                    #"{"op":"no_such_op","id":"c"}"#,
                    #"{"op":"ping","id":4}"#,
                    #"{"op":"ping"}"#,
                ]
                try await evd.sendRaw(Array(lines.joined(separator: "\n").utf8) + [0x0a])
                var responses: [JSONObject] = []
                for _ in lines { responses.append(try #require(await evd.nextMessage(ofType: "response"))) }
                #expect(responses.map { $0["id"] } == ["a", "b", "c", 4, .null])
                #expect(responses[0]["ok"] == true)
                #expect(responses[1]["result"]?["rows"] == [[42]])
                #expect(responses[2]["error"]?["code"] == "unknown_op")
                #expect(responses[3]["ok"] == true)
                #expect(responses[4]["ok"] == true)
            }
        }
    }

    @Test("1000 pipelined pings in one write are all answered, in order")
    func manyPipelined() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                var bytes: [UInt8] = []
                for i in 0..<1000 { bytes += Array(#"{"op":"ping","id":"p\#(i)"}"#.utf8) + [0x0a] }
                try await evd.sendRaw(bytes)
                for i in 0..<1000 {
                    let response = try #require(await evd.nextMessage(ofType: "response"))
                    #expect(response["id"] == .string("p\(i)"))
                    #expect(response["ok"] == true)
                }
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    /// Responses are written by the thread that makes them when nothing is queued ahead
    /// (`WriteThrough`); one the socket cannot take whole must still arrive whole, and everything
    /// after it behind it.
    @Test("pipelined responses larger than the socket holds, read only after all are sent: each whole, in order")
    func bigResponsesInOrder() async throws {
        try await withRunningDaemon { daemon in
            let client = try LineClient(path: daemon.socketPath)
            let big = 400_000  // hex digits: more than a Unix socket buffers
            for i in 0..<6 {
                try client.send(["op": "execute", "id": .integer(2 * i), "sql": .string("select hex(zeroblob(\(big / 2))) as x")])
                try client.send(["op": "ping", "id": .integer(2 * i + 1)])
            }
            for i in 0..<12 {
                let response = try await client.response()
                #expect(response["id"] == .integer(i), "response \(i) out of order: id \(response["id"] ?? .null)")
                #expect(response["ok"] == true)
                if i % 2 == 0 {
                    let text = response["result"]?["rows"]?.arrayValue?.first?.arrayValue?.first?.stringValue
                    #expect(text?.utf8.count == big, "response \(i) is not whole")
                }
            }
        }
    }

    @Test("a partial line then a disconnect: the line is not run and the daemon serves others")
    func partialLineThenDisconnect() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                // A complete, valid request but without its newline: not a message.
                try await evd.sendRaw(Array(#"{"op":"emit","id":"x","event":"test.partial"}"#.utf8))
            }
            try await daemon.withClient { evd in
                #expect(try await evd.request("ping") == [:])
                // Wait (bounded) until the first session is gone, then check its line never ran.
                var current: JSONValue? = nil
                for _ in 0..<500 {
                    current = try await evd.request("stats")["sessions"]?["current"]
                    if current == 1 { break }
                    try await Task.sleep(for: .milliseconds(10))
                }
                #expect(current == 1)
                let names =
                    try await evd.request("events")["events"]?.arrayValue?.compactMap { $0["name"]?.stringValue } ?? []
                #expect(!names.contains("test.partial"))
            }
        }
    }

    @Test(
        "a request whose id is not a scalar gets bad_request (field id) with id null",
        arguments: [#"[1]"#, #"{"a":1}"#]
    )
    func nonScalarID(_ id: String) async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.sendLine(#"{"op":"ping","id":"# + id + "}")
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == .null)
                #expect(response["ok"] == false)
                #expect(response["error"]?["code"] == "bad_request")
                #expect(response["error"]?["field"] == "id")
                #expect(try await evd.request("ping") == [:])
            }
        }
    }

    @Test("any JSON scalar id is echoed as it was sent", arguments: [#""s""#, "12", "-3", "1.5", "true", "null"])
    func scalarIDsEcho(_ id: String) async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                try await evd.sendLine(#"{"op":"ping","id":"# + id + "}")
                let response = try #require(await evd.nextMessage(ofType: "response"))
                #expect(response["id"] == (try JSONValue(parsing: id)))
                #expect(response["ok"] == true)
            }
        }
    }
}

/// §1: `socat - UNIX-CONNECT:$EVD_SOCKET` is a working client — it half-closes once its input ends.
@Suite("Framing with a plain socket")
struct PlainSocketTests {
    @Test("requests followed by a half-close are all answered after hello, then the daemon closes")
    func halfClose() async throws {
        try await withRunningDaemon { daemon in
            let requests = #"{"op":"ping","id":1}"# + "\n" + #"{"op":"execute","id":2,"sql":"select 'ok'"}"# + "\n"
            let (bytes, sawEOF) = await plainSocketExchange(
                socketPath: daemon.socketPath,
                send: Array(requests.utf8),
                halfClose: true
            )
            #expect(sawEOF)
            let messages = try bytes.split(separator: 0x0a).map { try JSONValue(parsing: Array($0)) }
            #expect(messages.count == 3)
            #expect(messages.first?["type"] == "hello")
            #expect(messages.dropFirst().map { $0["id"] } == [1, 2])
            #expect(messages.last?["result"]?["rows"] == [["ok"]])
        }
    }

    @Test("a subscriber that half-closes its input still gets its events")
    func halfClosedSubscriber() async throws {
        try await withRunningDaemon { daemon in
            let subscribe = #"{"op":"subscribe","id":"s","events":["app.*"]}"# + "\n"
            async let exchange = plainSocketExchange(
                socketPath: daemon.socketPath,
                send: Array(subscribe.utf8),
                halfClose: true,
                until: { String(decoding: $0, as: UTF8.self).contains(#""event":"app.ping""#) }
            )
            try await daemon.withClient { evd in
                var subscriptions: JSONValue? = nil
                for _ in 0..<500 {
                    subscriptions = try await evd.request("stats")["subscriptions"]
                    if subscriptions == 1 { break }
                    try await Task.sleep(for: .milliseconds(10))
                }
                try #require(subscriptions == 1)
                try await evd.request("emit", ["event": "app.ping"])
            }
            let (bytes, _) = await exchange
            let messages = try bytes.split(separator: 0x0a).map { try JSONValue(parsing: Array($0)) }
            #expect(messages.map { $0["type"] } == ["hello", "response", "event"])
            #expect(messages.last?["event"] == "app.ping")
        }
    }
}

extension EvdConnection {
    /// Sends `text` and a newline as they are.
    fileprivate func sendLine(_ text: String) async throws {
        try await self.sendRaw(Array(text.utf8) + [0x0a])
    }
}
