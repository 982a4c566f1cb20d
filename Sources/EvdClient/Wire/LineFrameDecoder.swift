import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// One inbound frame of the NDJSON stream.
public enum LineFrame: Sendable, Equatable {
    /// A complete line, without its `\n` (and without a `\r` before it).
    case line(ByteBuffer)
    /// A line longer than the limit; its bytes were discarded through the next `\n`.
    case tooLong
}

/// Splits a byte stream into lines, keeping the connection usable when a line is too long.
///
/// NIOExtras' `LineBasedFrameDecoder` closes the connection on an over-long line; PROTOCOL.md §1 wants
/// the line answered with `line_too_long` and the connection kept, so this decoder reports
/// `.tooLong` once and then skips everything up to and including the next newline.
public struct LineFrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = LineFrame

    /// The longest line accepted, in bytes, not counting the newline.
    public let maxLineBytes: Int
    /// Whether we are skipping the rest of an over-long line.
    private var discarding = false
    /// How far into the buffer we already looked for a newline, so each byte is scanned once.
    private var scanned = 0

    /// Creates a decoder that accepts lines of at most `maxLineBytes` bytes.
    public init(maxLineBytes: Int) {
        self.maxLineBytes = maxLineBytes
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        let scanned = self.scanned
        // memchr: a request's line can be megabytes long.
        let found = buffer.withUnsafeReadableBytes { bytes -> Int? in
            guard bytes.count > scanned, let base = bytes.baseAddress else { return nil }
            guard let hit = memchr(base + scanned, 0x0A, bytes.count - scanned) else { return nil }
            return base.distance(to: UnsafeRawPointer(hit))
        }
        if let length = found {
            self.scanned = 0
            if self.discarding {
                self.discarding = false
                buffer.moveReaderIndex(forwardBy: length + 1)
                return .continue
            }
            if length > self.maxLineBytes {
                buffer.moveReaderIndex(forwardBy: length + 1)
                context.fireChannelRead(Self.wrapInboundOut(.tooLong))
                return .continue
            }
            var line = buffer.readSlice(length: length)!
            buffer.moveReaderIndex(forwardBy: 1)
            if line.readableBytesView.last == UInt8(ascii: "\r") {
                line.moveWriterIndex(to: line.writerIndex - 1)
            }
            context.fireChannelRead(Self.wrapInboundOut(.line(line)))
            return .continue
        }
        // No newline yet.
        if self.discarding {
            buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
            self.scanned = 0
        } else if buffer.readableBytes > self.maxLineBytes {
            // Too long already: report it now and drop what we have, so memory stays bounded.
            buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
            self.scanned = 0
            self.discarding = true
            context.fireChannelRead(Self.wrapInboundOut(.tooLong))
        } else {
            self.scanned = buffer.readableBytes
        }
        return .needMoreData
    }

    public mutating func decodeLast(
        context: ChannelHandlerContext,
        buffer: inout ByteBuffer,
        seenEOF: Bool
    ) throws -> DecodingState {
        while try self.decode(context: context, buffer: &buffer) == .continue {}
        // A partial last line (no newline before EOF) is not a message: drop it.
        buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
        self.scanned = 0
        return .needMoreData
    }
}
