import EvdClient
import Foundation
import NATSTestSupport
import NIOCore
import Testing

@testable import NATSClient
@testable import evforward

/// Publishes `lines` (event lines) as one batch with `encoder`, returning each PubAck or error.
func publish(
    _ lines: [String],
    with encoder: inout MessageEncoder,
    on nats: NATSConnection
) async throws -> [Result<
    JetStream.PubAck, any Error
>] {
    let events = try lines.map { try EventLine(ByteBuffer(string: $0)) }
    let pending = try nats.sendRequests(count: events.count) { index, replyTo, buffer in
        encoder.encode(events[index], replyTo: replyTo, into: &buffer) == .encoded
    }
    return try await pending.replies().map { reply in reply.flatMap { message in Result { try JetStream.parsePubAck(message.payload) } } }
}

/// An encoder like the forwarder's for stream `info` (its last sequence as the first fence).
func encoder(after lastSequence: UInt64, maxPayload: Int = 1 << 20) -> MessageEncoder {
    MessageEncoder(subjectPrefix: "evd", host: "db1.example", maxPayload: maxPayload, fence: .lastSequence(lastSequence))
}

extension Processes {
    @Suite("Publishing into a real nats-server")
    struct PublishTests {
        @Test("Subject, headers and body of forwarded events, read back from the stream")
        func readBack() async throws {
            try await withNATSServer { server in
                try await withConnection(to: server) { nats in
                    let js = JetStream(connection: nats)
                    try await js.createStream(name: "EVD_T", subjects: ["evd.>"], duplicateWindow: .seconds(600))
                    var coder = encoder(after: 0)
                    let lines = [
                        eventLine(seq: 10),
                        eventLine(seq: 11, event: "myapp.deployed", database: nil, table: nil, extra: #""version":"1.2""#),
                        eventLine(seq: 12, database: "my db", table: "a.b*c"),
                    ]
                    let acks = try await publish(lines, with: &coder, on: nats)
                    #expect(try acks.map { try $0.get().seq } == [1, 2, 3])
                    let first = try await js.getMessage(stream: "EVD_T", seq: 1)
                    #expect(first.subject == "evd.main.insert-rows.dogs")
                    #expect(String(decoding: first.payload, as: UTF8.self) == forwardedBody(lines[0]))
                    #expect(first.headers["Nats-Msg-Id"] == "0123456789abcdef:10")
                    #expect(first.headers["ce-id"] == "0123456789abcdef:10")
                    #expect(first.headers["ce-specversion"] == "1.0")
                    #expect(first.headers["ce-source"] == "evd://db1.example/main")
                    #expect(first.headers["ce-type"] == "insert-rows")
                    #expect(first.headers["ce-time"] == "2026-11-21T10:00:00.123456Z")
                    #expect(first.headers["ce-subject"] == "dogs")
                    #expect(first.headers["ce-sequence"] == "00000000000000000010")
                    #expect(first.headers["ce-epoch"] == "0123456789abcdef")
                    #expect(first.headers["content-type"] == "application/json")
                    #expect(first.headers["Nats-Expected-Last-Sequence"] == "0")
                    let custom = try await js.getMessage(stream: "EVD_T", seq: 2)
                    #expect(custom.subject == "evd._.myapp%2Edeployed")
                    #expect(custom.headers["ce-source"] == "evd://db1.example/_")
                    #expect(custom.headers["ce-subject"] == nil)
                    #expect(custom.headers["Nats-Expected-Last-Msg-Id"] == "0123456789abcdef:10")
                    let odd = try await js.getMessage(stream: "EVD_T", seq: 3)
                    #expect(odd.subject == "evd.my%20db.insert-rows.a%2Eb%2Ac")
                    #expect(odd.headers["ce-source"] == "evd://db1.example/my%20db")
                    #expect(odd.headers["ce-subject"] == "a.b*c")
                    // The last message gives the resume point.
                    let last = try #require(try await js.lastMessage(stream: "EVD_T"))
                    #expect(
                        Forwarder.resumePoint(last: last, lastSequence: 3) == .init(streamSequence: 3, epoch: "0123456789abcdef", seq: 12)
                    )
                }
            }
        }

        @Test("A retried batch is all duplicates: nothing is stored twice")
        func retry() async throws {
            try await withNATSServer { server in
                try await withConnection(to: server) { nats in
                    let js = JetStream(connection: nats)
                    try await js.createStream(name: "EVD_T", subjects: ["evd.>"], duplicateWindow: .seconds(600))
                    let lines = (1...50).map { eventLine(seq: Int64($0)) }
                    var first = encoder(after: 0)
                    _ = try await publish(lines, with: &first, on: nats)
                    // A forwarder that lost the PubAcks: it starts again from the same point.
                    var again = encoder(after: 0)
                    let acks = try await publish(lines, with: &again, on: nats)
                    #expect(try acks.allSatisfy { try $0.get().duplicate })
                    #expect(try await js.streamInfo(name: "EVD_T").messages == 50)
                }
            }
        }

        /// nats-server 2.9.10's order of checks, which the fence relies on: the duplicate check comes
        /// first (a duplicate is acknowledged `duplicate` whatever its expectations say), then
        /// `Nats-Expected-Last-Sequence` — 0 included, on an empty stream — then
        /// `Nats-Expected-Last-Msg-Id`.
        @Test("nats-server: duplicate before expectations; expected last sequence 0 is checked")
        func serverOrderOfChecks() async throws {
            try await withNATSServer { server in
                try await withConnection(to: server) { nats in
                    let js = JetStream(connection: nats)
                    try await js.createStream(name: "EVD_T", subjects: ["evd.>"], duplicateWindow: .seconds(600))
                    _ = try await js.publish(subject: "evd.x", headers: ["Nats-Msg-Id": "a"], payload: [])
                    // A duplicate Msg-Id with a wrong expected last msg id: acknowledged as a duplicate.
                    let both = try await js.publish(
                        subject: "evd.x",
                        headers: ["Nats-Msg-Id": "a", "Nats-Expected-Last-Msg-Id": "wrong"],
                        payload: []
                    )
                    #expect(both.duplicate)
                    // Expected last sequence 0 on a stream that holds a message: refused (10071).
                    await #expect {
                        try await js.publish(
                            subject: "evd.x",
                            headers: ["Nats-Msg-Id": "b", "Nats-Expected-Last-Sequence": "0"],
                            payload: []
                        )
                    } throws: {
                        ($0 as? JetStream.APIError)?.errCode == 10071
                    }
                    // A wrong expected last msg id: refused (10070).
                    await #expect {
                        try await js.publish(
                            subject: "evd.x",
                            headers: ["Nats-Msg-Id": "c", "Nats-Expected-Last-Msg-Id": "zzz"],
                            payload: []
                        )
                    } throws: {
                        ($0 as? JetStream.APIError)?.errCode == 10070
                    }
                }
            }
        }

        @Test("Two writers on one stream: the one whose predecessor is gone is refused, and stores nothing after")
        func fence() async throws {
            try await withNATSServer { server in
                try await withConnection(to: server) { nats in
                    let js = JetStream(connection: nats)
                    try await js.createStream(name: "EVD_T", subjects: ["evd.>"], duplicateWindow: .seconds(600))
                    // Both read an empty stream; A (one epoch) publishes first.
                    var a = encoder(after: 0)
                    var b = encoder(after: 0)
                    let aAcks = try await publish((1...5).map { eventLine(seq: $0, epoch: "aaaa") }, with: &a, on: nats)
                    #expect(aAcks.allSatisfy { (try? $0.get()) != nil })
                    let bAcks = try await publish((1...5).map { eventLine(seq: $0, epoch: "bbbb") }, with: &b, on: nats)
                    for ack in bAcks {
                        #expect(throws: JetStream.APIError.self) { try ack.get() }
                    }
                    #expect((bAcks.first.flatMap { try? $0.mapError { $0 as! JetStream.APIError }.get() }) == nil)
                    if case .failure(let error as JetStream.APIError) = bAcks[0] { #expect(error.errCode == 10071) }
                    if case .failure(let error as JetStream.APIError) = bAcks[1] { #expect(error.errCode == 10070) }
                    // A goes on: its chain is intact.
                    let more = try await publish((6...8).map { eventLine(seq: $0, epoch: "aaaa") }, with: &a, on: nats)
                    #expect(more.allSatisfy { (try? $0.get()) != nil })
                    #expect(try await js.streamInfo(name: "EVD_T").messages == 8)
                }
            }
        }

        @Test("An event larger than max_payload is not sent; the chain goes on without it")
        func tooLarge() async throws {
            try await withNATSServer { server in
                try await withConnection(to: server) { nats in
                    let js = JetStream(connection: nats)
                    try await js.createStream(name: "EVD_T", subjects: ["evd.>"], duplicateWindow: .seconds(600))
                    var coder = encoder(after: 0, maxPayload: 2000)
                    let big = eventLine(seq: 2, extra: #""blob":"\#(String(repeating: "x", count: 3000))""#)
                    let acks = try await publish([eventLine(seq: 1), big, eventLine(seq: 3)], with: &coder, on: nats)
                    #expect((try? acks[0].get()) != nil)
                    #expect(throws: NATSError.self) { try acks[1].get() }
                    #expect((try? acks[2].get()) != nil)
                    #expect(try await js.streamInfo(name: "EVD_T").messages == 2)
                }
            }
        }
    }
}
