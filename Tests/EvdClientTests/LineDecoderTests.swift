import EvdClient
import NIOCore
import NIOEmbedded
import Testing

/// `LineFrameDecoder` on an `EmbeddedChannel`: bytes in as the socket would deliver them, frames
/// out, no socket and no timing.
@Suite("Line decoder (EmbeddedChannel)")
struct LineDecoderTests {
    /// A channel with the decoder of `maxLineBytes`, as the daemon and `EvdConnection` install it.
    private func channel(maxLineBytes: Int = 16) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineFrameDecoder(maxLineBytes: maxLineBytes)))
        return channel
    }

    /// Writes `reads` one read at a time, then returns every frame decoded, lines as strings and
    /// `.tooLong` as `nil`.
    private func frames(_ channel: EmbeddedChannel, _ reads: [String]) throws -> [String?] {
        for read in reads { try channel.writeInbound(ByteBuffer(string: read)) }
        return try self.readAll(channel)
    }

    private func readAll(_ channel: EmbeddedChannel) throws -> [String?] {
        var frames: [String?] = []
        while let frame = try channel.readInbound(as: LineFrame.self) {
            switch frame {
            case .line(let buffer): frames.append(String(buffer: buffer))
            case .tooLong: frames.append(nil)
            }
        }
        return frames
    }

    @Test("a line split across reads is one frame, once its newline arrives")
    func splitAcrossReads() throws {
        let channel = try self.channel()
        #expect(try self.frames(channel, [#"{"id""#]) == [])
        #expect(try self.frames(channel, [#":1,"#, #""x":2}"#]) == [])
        #expect(try self.frames(channel, ["\n"]) == [#"{"id":1,"x":2}"#])
        // A newline alone in its own read, then a line byte by byte.
        #expect(try self.frames(channel, "ab\n".map(String.init)) == ["ab"])
        #expect(try channel.finish().isClean)
    }

    @Test("several lines in one read are as many frames, in order; an empty line is an empty frame")
    func severalInOneRead() throws {
        let channel = try self.channel()
        #expect(try self.frames(channel, ["one\ntwo\n\nthree\nfo"]) == ["one", "two", "", "three"])
        #expect(try self.frames(channel, ["ur\n"]) == ["four"])
        #expect(try channel.finish().isClean)
    }

    @Test("CRLF: the \\r before the newline is dropped; a \\r elsewhere stays")
    func crlf() throws {
        let channel = try self.channel()
        #expect(try self.frames(channel, ["a\r\nb\r", "\n", "c\rd\n", "\r\n", "\r\r\n"]) == ["a", "b", "c\rd", "", "\r"])
        #expect(try channel.finish().isClean)
    }

    @Test("the bound counts the bytes before the newline: max bytes pass, one more is tooLong (a \\r counts)")
    func boundExact() throws {
        let channel = try self.channel(maxLineBytes: 8)
        #expect(try self.frames(channel, ["12345678\n"]) == ["12345678"])
        #expect(try self.frames(channel, ["123456789\n"]) == [nil])
        #expect(try self.frames(channel, ["1234567\r\n"]) == ["1234567"])
        // PROTOCOL.md: the limit counts the bytes before the \n, the \r included.
        #expect(try self.frames(channel, ["12345678\r\n"]) == [nil])
        #expect(try self.frames(channel, ["ok\n"]) == ["ok"])
        #expect(try channel.finish().isClean)
    }

    @Test("an over-long line in one read: one tooLong, and the lines around it still come")
    func tooLongInOneRead() throws {
        let channel = try self.channel(maxLineBytes: 8)
        let long = String(repeating: "x", count: 40)
        #expect(try self.frames(channel, ["before\n\(long)\nafter\n"]) == ["before", nil, "after"])
        #expect(try channel.finish().isClean)
    }

    @Test("an over-long line across reads: tooLong as soon as the bound is passed, once; the rest is skipped through its newline")
    func tooLongAcrossReads() throws {
        let channel = try self.channel(maxLineBytes: 8)
        #expect(try self.frames(channel, ["12345678"]) == [])
        // The bound is passed before any newline: reported now, not when the line ends.
        #expect(try self.frames(channel, ["9"]) == [nil])
        // Skipped, however much more comes, and reported only once.
        #expect(try self.frames(channel, [String(repeating: "y", count: 100), String(repeating: "z", count: 100)]) == [])
        // The newline ends the skipping; what follows it in the same read is a line.
        #expect(try self.frames(channel, ["zz\nnext\n"]) == ["next"])
        // Recovered: a long line again is reported again.
        #expect(try self.frames(channel, ["123456789", "\nlast\n"]) == [nil, "last"])
        #expect(try channel.finish().isClean)
    }

    @Test("at EOF a partial last line is dropped, not delivered; complete lines before it are")
    func eofPartialLine() throws {
        let channel = try self.channel()
        try channel.writeInbound(ByteBuffer(string: "whole\npart"))
        #expect(try self.readAll(channel) == ["whole"])
        // finish() closes the channel: the decoder's decodeLast runs and must neither deliver the
        // partial line nor leave it behind (ByteToMessageHandler reports leftover bytes as an error).
        let left = try channel.finish()
        #expect(left.isClean)
    }

    @Test("at EOF while skipping an over-long line: nothing more is delivered")
    func eofWhileDiscarding() throws {
        let channel = try self.channel(maxLineBytes: 4)
        #expect(try self.frames(channel, ["ok\n123456"]) == ["ok", nil])
        #expect(try self.frames(channel, ["789"]) == [])
        #expect(try channel.finish().isClean)
    }

    @Test("input closed (half-close) delivers the lines before it and drops the partial one")
    func inputClosed() throws {
        let channel = try self.channel()
        try channel.writeInbound(ByteBuffer(string: "a\nb\nc"))
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(try self.readAll(channel) == ["a", "b"])
        #expect(try channel.finish().isClean)
    }
}
