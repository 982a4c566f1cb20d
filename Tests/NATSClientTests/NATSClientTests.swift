import EvdClient
import NATSClient
import NATSTestSupport
import NIOCore
import Testing

@Suite("NATS client against a real nats-server", .timeLimit(.minutes(1)))
struct NATSClientTests {
    @Test("a published message with headers arrives on a wildcard subscription, and a plain one too")
    func pubSubWithHeaders() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                #expect(nats.info["jetstream"] == true)
                let subscription = try await nats.subscribe(subject: "greet.*")
                let headers: NATSHeaders = ["Nats-Msg-Id": "e1:42", "ce-type": "insert rows", "ce-type2": ""]
                try await nats.publish(subject: "greet.joe", headers: headers, payload: Array("hello".utf8))
                try await nats.publish(subject: "greet.ann", payload: Array("plain".utf8))
                try await nats.publish(subject: "other.joe", payload: Array("not mine".utf8))
                try await nats.publish(subject: "greet.empty", headers: ["k": "v"], payload: [])
                var iterator = subscription.messages.makeAsyncIterator()
                let first = try #require(await iterator.next())
                #expect(first.subject == "greet.joe")
                #expect(first.headers == headers)
                #expect(first.headers["ce-type"] == "insert rows")
                #expect(first.payload == Array("hello".utf8))
                let second = try #require(await iterator.next())
                #expect(second.subject == "greet.ann")
                #expect(second.headers.isEmpty)
                #expect(second.payload == Array("plain".utf8))
                let third = try #require(await iterator.next())
                #expect(third.subject == "greet.empty")
                #expect(third.headers["k"] == "v")
                #expect(third.payload.isEmpty)
                try await subscription.unsubscribe()
                #expect(await iterator.next() == nil)
                // After UNSUB nothing more is delivered (and nothing breaks).
                try await nats.publish(subject: "greet.joe", payload: [1])
                try await nats.flush()
            }
        }
    }

    @Test("request/reply through the inbox, a request nobody answers is no-responders, a silent one times out")
    func requestReply() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let service = try await nats.subscribe(subject: "svc.echo")
                let silent = try await nats.subscribe(subject: "svc.silent")
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        for await request in service.messages {
                            guard let replyTo = request.replyTo else { continue }
                            #expect(replyTo.hasPrefix("_INBOX."))
                            try await nats.publish(
                                subject: replyTo,
                                headers: ["echo": request.headers["q"] ?? "-"],
                                payload: request.payload.reversed()
                            )
                        }
                    }
                    for n in 0..<3 {
                        let reply = try await nats.request(
                            subject: "svc.echo",
                            headers: ["q": "\(n)"],
                            payload: Array("abc\(n)".utf8),
                            timeout: .seconds(5)
                        )
                        #expect(reply.payload == Array("\(n)cba".utf8))
                        #expect(reply.headers["echo"] == "\(n)")
                    }
                    await #expect(throws: NATSError.noResponders(subject: "nobody.here")) {
                        try await nats.request(subject: "nobody.here", payload: [], timeout: .seconds(5))
                    }
                    await #expect(throws: NATSError.timeout) {
                        try await nats.request(subject: "svc.silent", payload: [], timeout: .milliseconds(200))
                    }
                    try await service.unsubscribe()
                    try await silent.unsubscribe()
                    try await group.waitForAll()
                }
            }
        }
    }

    @Test("the server's PINGs are answered with PONG, so an idle connection stays open")
    func serverPings() async throws {
        // The server pings every 100 ms and closes a connection 20 PINGs behind (2 s): a client
        // that never answered would be closed long before the bound below; a loaded machine that
        // answers late is not.
        try await withNATSServer(config: "ping_interval: \"100ms\"\nping_max: 20\n") { server in
            try await withConnection(to: server) { nats in
                let bound = ContinuousClock.now + .seconds(20)
                while nats.pingsAnswered < 3 && !nats.isClosed && ContinuousClock.now < bound {
                    try await Task.sleep(for: .milliseconds(50))
                }
                #expect(nats.pingsAnswered >= 3)
                #expect(!nats.isClosed)
                try await nats.flush()
                let subscription = try await nats.subscribe(subject: "still.alive")
                try await nats.publish(subject: "still.alive", payload: [7])
                var iterator = subscription.messages.makeAsyncIterator()
                #expect(await iterator.next()?.payload == [7])
            }
        }
    }

    @Test("a batch is published pipelined, in order: acks in order, stored in order; one refused message fails alone")
    func pipelinedBatch() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "B", subjects: ["b.>"], duplicateWindow: .seconds(600))
                let batch = (1...2000).map { n in
                    NATSConnection.OutgoingRequest(subject: "b.\(n % 7)", headers: ["Nats-Msg-Id": "e:\(n)"], payload: Array("\(n)".utf8))
                }
                let acks = try await js.publish(batch)
                #expect(acks.count == 2000)
                #expect(acks.map { (try? $0.get())?.seq } == (1...2000).map { UInt64($0) })
                // The stream holds them in the order sent.
                for seq in [1, 2, 999, 2000] {
                    #expect(try await js.getMessage(stream: "B", seq: UInt64(seq)).payload == Array("\(seq)".utf8))
                }
                // Again with one id already stored, and one expecting another last id: each fails or
                // is a duplicate on its own, and the rest are stored after them in order.
                let mixed = [
                    NATSConnection.OutgoingRequest(subject: "b.x", headers: ["Nats-Msg-Id": "e:2001"], payload: [1]),
                    NATSConnection.OutgoingRequest(subject: "b.x", headers: ["Nats-Msg-Id": "e:5"], payload: [2]),
                    NATSConnection.OutgoingRequest(
                        subject: "b.x",
                        headers: ["Nats-Msg-Id": "e:2002", "Nats-Expected-Last-Msg-Id": "nope"],
                        payload: [3]
                    ),
                    NATSConnection.OutgoingRequest(subject: "b.x", headers: ["Nats-Msg-Id": "e:2003"], payload: [4]),
                ]
                let results = try await js.publish(mixed)
                #expect(try results[0].get() == JetStream.PubAck(stream: "B", seq: 2001, duplicate: false))
                #expect(try results[1].get() == JetStream.PubAck(stream: "B", seq: 5, duplicate: true))
                #expect(throws: JetStream.APIError.self) { try results[2].get() }
                if case .failure(let error as JetStream.APIError) = results[2] { #expect(error.errCode == 10070) }
                #expect(try results[3].get() == JetStream.PubAck(stream: "B", seq: 2002, duplicate: false))
                #expect(try await js.streamInfo(name: "B").messages == 2002)
                // A message too large for the server is refused before anything of the batch is sent.
                let tooLarge = [
                    NATSConnection.OutgoingRequest(subject: "b.x", payload: [1]),
                    NATSConnection.OutgoingRequest(subject: "b.x", payload: Array(repeating: 0, count: nats.maxPayload + 1)),
                ]
                await #expect(throws: NATSError.self) { _ = try await js.publish(tooLarge) }
                #expect(try await js.streamInfo(name: "B").messages == 2002)
            }
        }
    }

    @Test("a Nats-Msg-Id published twice inside the duplicate window is stored once; the second ack says duplicate")
    func jetStreamDuplicates() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                let created = try await js.createStream(
                    name: "EVD_MAIN",
                    subjects: ["evd.main.>"],
                    storage: .file,
                    duplicateWindow: .seconds(600),
                    replicas: 1
                )
                #expect(created.name == "EVD_MAIN")
                #expect(created.raw["config"]?["duplicate_window"] == .int(600_000_000_000))
                #expect(created.raw["config"]?["storage"] == "file")
                let headers: NATSHeaders = ["Nats-Msg-Id": "epoch1:1"]
                let first = try await js.publish(subject: "evd.main.db.insert", headers: headers, payload: Array("{}".utf8))
                #expect(first == JetStream.PubAck(stream: "EVD_MAIN", seq: 1, duplicate: false))
                let second = try await js.publish(subject: "evd.main.db.insert", headers: headers, payload: Array("{}".utf8))
                #expect(second == JetStream.PubAck(stream: "EVD_MAIN", seq: 1, duplicate: true))
                let info = try await js.streamInfo(name: "EVD_MAIN")
                #expect(info.messages == 1)
                #expect(info.lastSeq == 1)
                // Creating the same stream again is accepted; a missing stream is a 404.
                try await js.createStream(name: "EVD_MAIN", subjects: ["evd.main.>"], duplicateWindow: .seconds(600))
                let missing = await #expect(throws: JetStream.APIError.self) { try await js.streamInfo(name: "NOPE") }
                #expect(missing?.code == 404)
                #expect(missing?.errCode == 10059)
            }
        }
    }

    @Test("Nats-Expected-Last-Msg-Id that does not match is an APIError with err_code 10070; a match is stored")
    func expectedLastMsgId() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "S", subjects: ["s.>"], duplicateWindow: .seconds(600))
                _ = try await js.publish(subject: "s.a", headers: ["Nats-Msg-Id": "e:1"], payload: [1])
                let fenced = await #expect(throws: JetStream.APIError.self) {
                    try await js.publish(
                        subject: "s.a",
                        headers: ["Nats-Msg-Id": "e:2", "Nats-Expected-Last-Msg-Id": "e:0"],
                        payload: [2]
                    )
                }
                #expect(fenced?.code == 400)
                #expect(fenced?.errCode == 10070)
                #expect(fenced?.errorDescription.contains("wrong last msg ID") == true)
                let ack = try await js.publish(
                    subject: "s.a",
                    headers: ["Nats-Msg-Id": "e:2", "Nats-Expected-Last-Msg-Id": "e:1"],
                    payload: [2]
                )
                #expect(ack.seq == 2)
                #expect(!ack.duplicate)
                // A subject no stream captures: no responders, not a hang.
                await #expect(throws: NATSError.noResponders(subject: "nostream.x")) {
                    try await js.publish(subject: "nostream.x", payload: [])
                }
            }
        }
    }

    @Test("lastMessage returns the last stored message's headers and payload; getMessage any by seq")
    func lastMessage() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "L", subjects: ["l.>"], storage: .memory)
                #expect(try await js.lastMessage(stream: "L") == nil)
                _ = try await js.publish(subject: "l.one", headers: ["ce-sequence": "00000000000000000001"], payload: Array("first".utf8))
                _ = try await js.publish(subject: "l.two", payload: Array("no headers".utf8))
                let headers: NATSHeaders = ["Nats-Msg-Id": "e:3", "ce-sequence": "00000000000000000003"]
                _ = try await js.publish(subject: "l.three", headers: headers, payload: Array("{\"seq\":3}".utf8))
                let last = try #require(try await js.lastMessage(stream: "L"))
                #expect(last.seq == 3)
                #expect(last.subject == "l.three")
                #expect(last.headers == headers)
                #expect(last.payload == Array("{\"seq\":3}".utf8))
                #expect(last.time != nil)
                let first = try await js.getMessage(stream: "L", seq: 1)
                #expect(first.headers["ce-sequence"] == "00000000000000000001")
                #expect(first.payload == Array("first".utf8))
                let second = try await js.getMessage(stream: "L", seq: 2)
                #expect(second.headers.isEmpty)
                let missing = await #expect(throws: JetStream.APIError.self) { try await js.getMessage(stream: "L", seq: 99) }
                #expect(missing?.code == 404)
                #expect(missing?.errCode == 10037)
                // A stream that does not exist is an error, not "no last message".
                await #expect(throws: JetStream.APIError.self) { try await js.lastMessage(stream: "NOPE") }
            }
        }
    }

    @Test("a message over the server's max_payload is refused with a clear error, and the connection stays usable")
    func payloadTooLarge() async throws {
        try await withNATSServer(config: "max_payload: 1024\n") { server in
            try await withConnection(to: server) { nats in
                #expect(nats.maxPayload == 1024)
                await #expect(throws: NATSError.payloadTooLarge(size: 2000, limit: 1024)) {
                    try await nats.publish(subject: "big", payload: [UInt8](repeating: 1, count: 2000))
                }
                let headers: NATSHeaders = ["k": "v"]  // "NATS/1.0\r\nk: v\r\n\r\n" is 18 bytes
                await #expect(throws: NATSError.payloadTooLarge(size: 18 + 1010, limit: 1024)) {
                    try await nats.publish(subject: "big", headers: headers, payload: [UInt8](repeating: 1, count: 1010))
                }
                await #expect(throws: NATSError.invalidSubject("has space")) {
                    try await nats.publish(subject: "has space", payload: [])
                }
                let subscription = try await nats.subscribe(subject: "big")
                try await nats.publish(subject: "big", payload: [UInt8](repeating: 2, count: 1024))
                var iterator = subscription.messages.makeAsyncIterator()
                #expect(await iterator.next()?.payload.count == 1024)
                #expect(!nats.isClosed)
            }
        }
    }

    @Test("a subject token escapes . * > whitespace % and the empty string, and comes back unchanged")
    func subjectTokens() {
        let names = ["", "plain", "a.b", "*", ">", "a b\tc\n", "100%", "%2E", "%", "ünïcødé", "x.y.*.>", "\u{7f}"]
        for name in names {
            let token = NATSSubject.token(name)
            #expect(!token.isEmpty)
            #expect(!token.utf8.contains { $0 <= 0x20 || $0 == 0x7f || $0 == UInt8(ascii: ".") })
            #expect(!token.contains("*") && !token.contains(">"))
            #expect(NATSSubject.untoken(token) == name)
        }
        #expect(NATSSubject.token("a.b c") == "a%2Eb%20c")
        #expect(NATSSubject.token("100%") == "100%25")
        #expect(NATSSubject.token("") == "%")
        #expect(Set(names.map(NATSSubject.token)).count == names.count)
        #expect(NATSSubject.untoken("a.b") == nil)
        #expect(NATSSubject.untoken("%2") == nil)
        #expect(NATSSubject.untoken("%zz") == nil)
    }

    @Test("the frame decoder waits for whole frames and turns bad input into a protocol error")
    func frameDecoder() throws {
        var decoder = NATSFrameDecoder(maxControlLine: 64, maxPayload: 16)
        var buffer = ByteBuffer(string: "MSG a.b 1 5\r\nhel")
        #expect(try decoder.decodeFrame(&buffer) == nil)
        buffer.writeString("lo\r\nPING\r\n")
        guard case .message(let sid, let message) = try decoder.decodeFrame(&buffer) else {
            Issue.record("not a message")
            return
        }
        #expect(sid == "1")
        #expect(message.payload == Array("hello".utf8))
        guard case .ping = try decoder.decodeFrame(&buffer) else {
            Issue.record("not a ping")
            return
        }
        // nats-server 2.9.10 writes two spaces before the size of a MSG without reply subject.
        var doubleSpace = ByteBuffer(string: "MSG _INBOX.x.2 1  2\r\nok\r\n")
        guard case .message(_, let spaced) = try decoder.decodeFrame(&doubleSpace) else {
            Issue.record("not a message")
            return
        }
        #expect(spaced.replyTo == nil)
        #expect(spaced.payload == Array("ok".utf8))
        var hmsg = ByteBuffer(string: "HMSG _INBOX.x.1 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n")
        guard case .message(_, let status) = try decoder.decodeFrame(&hmsg) else {
            Issue.record("not a message")
            return
        }
        #expect(status.status == 503)
        for bad in [
            "MSG a 1 17\r\n", "HELLO\r\n", "MSG a 1 x\r\n", "HMSG a 1 9 5\r\n", "MSG a 1 1\r\nxyz\r\n", "INFO [1]\r\n",
            String(repeating: "P", count: 100),
        ] {
            var decoder = NATSFrameDecoder(maxControlLine: 64, maxPayload: 16)
            var input = ByteBuffer(string: bad)
            #expect(throws: NATSError.self, "\(bad.debugDescription)") { _ = try decoder.decodeFrame(&input) }
        }
        var info = ByteBuffer(string: "INFO {\"max_payload\":8}\r\n")
        _ = try decoder.decodeFrame(&info)
        #expect(decoder.maxPayload == 8)
    }
}
