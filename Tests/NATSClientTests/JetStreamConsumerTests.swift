import EvdClient
import NATSTestSupport
import Testing

@testable import NATSClient

/// Reading streams back: the pull consumer and the binary search, against a real nats-server.
@Suite("JetStream consumer against a real nats-server", .timeLimit(.minutes(1)))
struct JetStreamConsumerTests {
    /// Publishes `count` messages `evd.main.e<i % 2>` with body `m<i>` and `ce-sequence: <10 * i>`.
    private func fill(_ js: JetStream, count: Int, from first: Int = 1) async throws {
        for i in first..<(first + count) {
            _ = try await js.publish(
                subject: "evd.main.e\(i % 2)",
                headers: ["ce-sequence": "\(10 * i)", "Nats-Msg-Id": "x:\(i)"],
                payload: Array("m\(i)".utf8)
            )
        }
    }

    private func consumerCount(_ js: JetStream, stream: String) async throws -> Int64? {
        try await js.streamInfo(name: stream).raw["state"]?["consumer_count"]?.intValue
    }

    @Test("from the start: every message once, in order, with headers, across many small pull batches; the consumer is deleted")
    func readsEverythingInOrder() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "T", subjects: ["evd.>"])
                try await self.fill(js, count: 100)
                var seen: [JetStream.StoredMessage] = []
                try await js.consume(stream: "T", options: .init(start: .all, batch: 7)) { message in
                    seen.append(message)
                    return seen.count == 100 ? .stop : .next
                }
                #expect(seen.map(\.seq) == Array(1...100))
                #expect(seen.map { String(decoding: $0.payload, as: UTF8.self) } == (1...100).map { "m\($0)" })
                #expect(seen[41].subject == "evd.main.e0")
                #expect(seen[41].headers["ce-sequence"] == "420")
                #expect(seen[41].headers["Nats-Msg-Id"] == "x:42")
                #expect(try await self.consumerCount(js, stream: "T") == 0)
            }
        }
    }

    @Test("a start sequence and a filter subject select what is read")
    func startAndFilter() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "T", subjects: ["evd.>"])
                try await self.fill(js, count: 20)
                var seqs: [UInt64] = []
                let options = JetStream.ConsumeOptions(filterSubject: "evd.main.e1", start: .sequence(10))
                try await js.consume(stream: "T", options: options) { message in
                    #expect(message.subject == "evd.main.e1")
                    seqs.append(message.seq)
                    return seqs.count == 5 ? .stop : .next
                }
                #expect(seqs == [11, 13, 15, 17, 19])
            }
        }
    }

    @Test("follows live: it waits at the end of the stream and gets what is stored later, past pull requests that expire")
    func followsLive() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "T", subjects: ["evd.>"])
                try await self.fill(js, count: 3)
                try await withThrowingTaskGroup(of: [UInt64].self) { group in
                    group.addTask {
                        var seqs: [UInt64] = []
                        // Short requests: several expire (408) while the stream is idle.
                        let options = JetStream.ConsumeOptions(
                            start: .sequence(4),
                            expires: .milliseconds(300),
                            heartbeat: .milliseconds(100)
                        )
                        try await js.consume(stream: "T", options: options) { message in
                            seqs.append(message.seq)
                            return seqs.count == 6 ? .stop : .next
                        }
                        return seqs
                    }
                    // Published one by one while the reader waits, with pauses longer than its requests.
                    for i in 4...9 {
                        try await Task.sleep(for: .milliseconds(150))
                        try await self.fill(js, count: 1, from: i)
                    }
                    #expect(try await group.next() == [4, 5, 6, 7, 8, 9])
                }
            }
        }
    }

    @Test("a consumer deleted under the reader is replaced: nothing is lost or repeated")
    func survivesConsumerLoss() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "T", subjects: ["evd.>"])
                try await self.fill(js, count: 60)
                var seqs: [UInt64] = []
                var deleted = 0
                let options = JetStream.ConsumeOptions(start: .all, batch: 5, heartbeat: .milliseconds(200))
                try await js.consume(stream: "T", options: options) { message in
                    seqs.append(message.seq)
                    if seqs.count == 12 || seqs.count == 31 {
                        let names = try await nats.request(subject: "$JS.API.CONSUMER.NAMES.T", payload: [])
                        for name in try JSONValue(parsing: names.payload)["consumers"]?.arrayValue ?? [] {
                            _ = try await nats.request(subject: "$JS.API.CONSUMER.DELETE.T.\(name.stringValue ?? "")", payload: [])
                            deleted += 1
                        }
                    }
                    return seqs.count == 60 ? .stop : .next
                }
                #expect(deleted == 2)
                #expect(seqs == Array(1...60))
            }
        }
    }

    @Test("a missing stream is JetStream's 'stream not found'")
    func missingStream() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                await #expect {
                    try await js.consume(stream: "NOPE") { _ in .stop }
                } throws: { error in
                    (error as? JetStream.APIError)?.errCode == 10059
                }
            }
        }
    }

    @Test("the binary search finds the first message past a seq, around deleted messages and at both ends")
    func firstSequence() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "T", subjects: ["evd.>"])
                #expect(try await js.firstSequence(stream: "T") { _ in true } == 1)
                try await self.fill(js, count: 50)
                for seq in [25, 26, 27, 1, 50] {
                    _ = try await nats.request(subject: "$JS.API.STREAM.MSG.DELETE.T", payload: Array("{\"seq\":\(seq)}".utf8))
                }
                // The search may answer a deleted sequence (reading starts at the next message): what
                // counts is the first message read from there, and that nothing before it is skipped.
                func firstRead(after evdSeq: Int) async throws -> UInt64? {
                    let start = try await js.firstSequence(stream: "T") { message in
                        Int(message.headers["ce-sequence"] ?? "") ?? .max > evdSeq
                    }
                    let previous = (1..<50).filter { ![1, 25, 26, 27].contains($0) && 10 * $0 <= evdSeq }.max() ?? 0
                    #expect(start > UInt64(previous))
                    return try await js.message(stream: "T", atOrAfter: start)?.seq
                }
                #expect(try await firstRead(after: 0) == 2)  // the first message left is 2
                #expect(try await firstRead(after: 15) == 2)
                #expect(try await firstRead(after: 20) == 3)
                #expect(try await firstRead(after: 235) == 24)
                #expect(try await firstRead(after: 240) == 28)  // 25...27 are gone
                #expect(try await firstRead(after: 255) == 28)
                #expect(try await firstRead(after: 275) == 28)
                #expect(try await firstRead(after: 485) == 49)
                #expect(try await firstRead(after: 490) == nil)  // after the last message left: what comes next
                #expect(try await firstRead(after: 10_000) == nil)
                #expect(try await js.message(stream: "T", atOrAfter: 25)?.seq == 28)
                #expect(try await js.message(stream: "T", atOrAfter: 50) == nil)
            }
        }
    }

    @Test("a JetStream reply subject's metadata, in both forms")
    func ackMetadata() {
        let old = AckMetadata("$JS.ACK.T.c1.1.42.7.1796532767448049381.3")
        #expect(old == AckMetadata(stream: "T", consumer: "c1", streamSeq: 42, consumerSeq: 7, pending: 3))
        let new = AckMetadata("$JS.ACK.hub.ACCHASH.T.c1.1.42.7.1796532767448049381.3.rnd")
        #expect(new == AckMetadata(stream: "T", consumer: "c1", streamSeq: 42, consumerSeq: 7, pending: 3))
        #expect(AckMetadata("_INBOX.x.1") == nil)
        #expect(AckMetadata("$JS.ACK.T.c1.1.x.7.1.3") == nil)
    }
}
