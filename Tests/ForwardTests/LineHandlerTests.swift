import EvdClient
import NIOCore
import NIOEmbedded
import Synchronization
import Testing

@testable import evforward

@Suite("evd's byte stream split into lines and sorted")
struct LineHandlerTests {
    /// A handler on an `EmbeddedChannel`, with the queue and router it feeds.
    struct Fixture {
        let channel: EmbeddedChannel
        let events = AsyncQueue<[EvdLineConnection.Item]>(capacity: 8)
        let responses = ResponseRouter()
        let hello: EventLoopPromise<JSONObject>

        init() throws {
            let loop = EmbeddedEventLoop()
            self.hello = loop.makePromise()
            self.channel = EmbeddedChannel(loop: loop)
            try self.channel.pipeline.syncOperations.addHandler(
                EvdLineHandler(events: self.events, responses: self.responses, hello: self.hello)
            )
        }

        /// Feeds `text` in pieces of `size` bytes, each its own read.
        func feed(_ text: String, in size: Int) throws {
            let bytes = Array(text.utf8)
            for start in stride(from: 0, to: bytes.count, by: size) {
                try self.channel.writeInbound(ByteBuffer(bytes: bytes[start..<min(bytes.count, start + size)]))
            }
        }

        /// Everything queued so far, flattened.
        func items() -> [EvdLineConnection.Item] {
            self.events.popQueued(while: { _ in true }).flatMap { $0 }
        }
    }

    @Test("Lines cut anywhere across reads come out whole: hello, responses, events, notices", arguments: [1, 2, 7, 64, 4096])
    func anyCut(_ size: Int) async throws {
        let fixture = try Fixture()
        let answered = Mutex<JSONObject?>(nil)
        let id = try #require(fixture.responses.register { result in answered.withLock { $0 = try? result.get() } })
        let text =
            #"{"type":"hello","server":"evd","epoch":"00ff","seq":3}"# + "\n"
            + eventLine(seq: 4, epoch: "00ff") + "\r\n"
            + #"{"type":"response","id":\#(id),"ok":true,"result":{"cursor":"c","position":4}}"# + "\n"
            + #"{"type":"notice","code":"gap","from":1,"to":2}"# + "\n"
            + eventLine(seq: 5, epoch: "00ff") + "\n"
            + #"{"type":"event","seq":6,"#  // a partial line: not delivered
        try fixture.feed(text, in: size)
        #expect(try await fixture.hello.futureResult.get()["epoch"] == "00ff")
        #expect(answered.withLock { $0 }?["position"] == 4)
        let items = fixture.items()
        guard items.count == 3 else {
            Issue.record("\(items.count) items")
            return
        }
        guard case .event(let first) = items[0], case .message(let notice) = items[1], case .event(let second) = items[2] else {
            Issue.record("\(items)")
            return
        }
        #expect(first.seq == 4)
        #expect(second.seq == 5)
        #expect(notice["code"] == "gap")
        var body = ByteBuffer()
        first.writeBody(into: &body)
        #expect(String(buffer: body) == forwardedBody(eventLine(seq: 4, epoch: "00ff")))
        _ = try? fixture.channel.finish()
    }
}
