import EvdClient
import NIOCore

/// One frame from a NATS server.
public enum NATSFrame: Sendable {
    /// `INFO {json}`: the server's identity and limits (`max_payload`, `headers`, `jetstream`).
    case info(JSONObject)
    /// `MSG` or `HMSG`, with the subscription id it was delivered to.
    case message(sid: String, NATSMessage)
    /// `PING`: must be answered with `PONG`.
    case ping
    /// `PONG`: the answer to our `PING`.
    case pong
    /// `+OK` (only in verbose mode).
    case ok
    /// `-ERR 'text'`, the text without its quotes.
    case error(String)
}

/// Splits a NATS server's byte stream into frames, within bounds.
///
/// A control line longer than `maxControlLine` or a message larger than `maxPayload` is a
/// `NATSError.protocolViolation` (thrown, so the pipeline sees `errorCaught` and the connection
/// closes); nothing a server sends can make this decoder trap or buffer without limit. `maxPayload`
/// follows the server's `INFO` (its `max_payload`), until then 1 MiB, NATS's default.
public struct NATSFrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = NATSFrame

    /// The longest control line accepted (INFO included), without its CRLF.
    public let maxControlLine: Int
    /// The largest message (header block plus payload) accepted, in bytes.
    public private(set) var maxPayload: Int

    /// Creates a decoder; `maxPayload` is replaced by the `max_payload` of the server's `INFO`.
    public init(maxControlLine: Int = 64 * 1024, maxPayload: Int = 1024 * 1024) {
        self.maxControlLine = maxControlLine
        self.maxPayload = maxPayload
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try self.decodeFrame(&buffer) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(frame))
        return .continue
    }

    public mutating func decodeLast(
        context: ChannelHandlerContext,
        buffer: inout ByteBuffer,
        seenEOF: Bool
    ) throws -> DecodingState {
        try self.decode(context: context, buffer: &buffer)
    }

    /// Takes one frame off the front of `buffer`, or nothing (and leaves `buffer` as it was) when it
    /// does not hold a whole frame yet.
    public mutating func decodeFrame(_ buffer: inout ByteBuffer) throws(NATSError) -> NATSFrame? {
        let view = buffer.readableBytesView
        guard let newline = view.firstIndex(of: 0x0a) else {
            if view.count > self.maxControlLine + 1 {
                throw .protocolViolation("a control line is longer than \(self.maxControlLine) bytes")
            }
            return nil
        }
        var lineEnd = newline
        if lineEnd > view.startIndex && view[lineEnd - 1] == 0x0d { lineEnd -= 1 }
        let lineLength = lineEnd - view.startIndex
        guard lineLength <= self.maxControlLine else {
            throw .protocolViolation("a control line is longer than \(self.maxControlLine) bytes")
        }
        let line = view[view.startIndex..<lineEnd]
        let consumedLine = newline - view.startIndex + 1
        let verb = line.prefix { $0 != 0x20 && $0 != 0x09 }
        let rest = line.dropFirst(verb.count).drop { $0 == 0x20 || $0 == 0x09 }
        // The frequent frames (a publisher's acks) without making a string of the verb.
        if verb.count == 3, Self.isVerb(verb, "MSG") {
            return try self.decodeMessage(&buffer, arguments: rest, consumedLine: consumedLine, withHeaders: false)
        }
        if verb.count == 4, Self.isVerb(verb, "HMSG") {
            return try self.decodeMessage(&buffer, arguments: rest, consumedLine: consumedLine, withHeaders: true)
        }
        switch String(decoding: verb, as: UTF8.self).uppercased() {
        case "PING":
            buffer.moveReaderIndex(forwardBy: consumedLine)
            return .ping
        case "PONG":
            buffer.moveReaderIndex(forwardBy: consumedLine)
            return .pong
        case "+OK":
            buffer.moveReaderIndex(forwardBy: consumedLine)
            return .ok
        case "-ERR":
            var text = String(decoding: rest, as: UTF8.self)
            if text.hasPrefix("'") && text.hasSuffix("'") && text.count >= 2 { text = String(text.dropFirst().dropLast()) }
            buffer.moveReaderIndex(forwardBy: consumedLine)
            return .error(text)
        case "INFO":
            let info: JSONObject
            do {
                guard let object = try JSONValue(parsing: Array(rest)).objectValue else {
                    throw NATSError.protocolViolation("INFO is not a JSON object")
                }
                info = object
            } catch {
                throw .protocolViolation("INFO is not a JSON object")
            }
            if let limit = info["max_payload"]?.intValue, limit > 0 { self.maxPayload = Int(limit) }
            buffer.moveReaderIndex(forwardBy: consumedLine)
            return .info(info)
        case "MSG":
            return try self.decodeMessage(&buffer, arguments: rest, consumedLine: consumedLine, withHeaders: false)
        case "HMSG":
            return try self.decodeMessage(&buffer, arguments: rest, consumedLine: consumedLine, withHeaders: true)
        default:
            throw .protocolViolation("unknown operation \(String(decoding: verb.prefix(16), as: UTF8.self).debugDescription)")
        }
    }

    /// `MSG <subject> <sid> [reply-to] <#bytes>` or `HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>`,
    /// then the bytes and a CRLF.
    private func decodeMessage(
        _ buffer: inout ByteBuffer,
        arguments: ByteBufferView.SubSequence,
        consumedLine: Int,
        withHeaders: Bool
    ) throws(NATSError) -> NATSFrame? {
        let fields = Self.fields(arguments)
        let verb = withHeaders ? "HMSG" : "MSG"
        let sizeCount = withHeaders ? 2 : 1
        guard fields.count == 2 + sizeCount || fields.count == 3 + sizeCount else {
            throw .protocolViolation("\(verb) has \(fields.count) arguments")
        }
        guard let total = Self.size(arguments[fields[fields.count - 1]]) else {
            throw .protocolViolation("\(verb) has a bad size")
        }
        var headerSize = 0
        if withHeaders {
            guard let size = Self.size(arguments[fields[fields.count - 2]]), size <= total else {
                throw .protocolViolation("HMSG has a bad header size")
            }
            headerSize = size
        }
        guard total <= self.maxPayload else {
            throw .protocolViolation("\(verb) of \(total) bytes exceeds max_payload \(self.maxPayload)")
        }
        // The payload and its CRLF must all be here before anything is taken.
        guard buffer.readableBytes >= consumedLine + total + 2 else { return nil }
        let body = buffer.getBytes(at: buffer.readerIndex + consumedLine, length: total) ?? []
        let trailer = buffer.getBytes(at: buffer.readerIndex + consumedLine + total, length: 2) ?? []
        guard trailer == [0x0d, 0x0a] else {
            throw .protocolViolation("\(verb)'s payload is not followed by CRLF")
        }
        var message = NATSMessage(
            subject: String(decoding: arguments[fields[0]], as: UTF8.self),
            replyTo: fields.count == 3 + sizeCount ? String(decoding: arguments[fields[2]], as: UTF8.self) : nil,
            payload: headerSize == 0 ? body : Array(body[headerSize...])
        )
        if withHeaders {
            let (headers, status, statusText) = try NATSHeaders.parse(body[..<headerSize])
            message.headers = headers
            message.status = status
            message.statusDescription = statusText
        }
        buffer.moveReaderIndex(forwardBy: consumedLine + total + 2)
        return .message(sid: String(decoding: arguments[fields[1]], as: UTF8.self), message)
    }

    /// Whether `verb` is `name` (upper-case ASCII), in any case.
    private static func isVerb(_ verb: ByteBufferView.SubSequence, _ name: StaticString) -> Bool {
        name.withUTF8Buffer { expected in
            verb.elementsEqual(expected) { $0 & 0xDF == $1 }
        }
    }

    /// The ranges of the space- or tab-separated fields of a control line's arguments (at most 8:
    /// more is malformed anyway).
    private static func fields(_ arguments: ByteBufferView.SubSequence) -> [Range<Int>] {
        var fields: [Range<Int>] = []
        fields.reserveCapacity(5)
        var start: Int?
        for index in arguments.indices {
            let byte = arguments[index]
            if byte == 0x20 || byte == 0x09 {
                if let begin = start {
                    fields.append(begin..<index)
                    start = nil
                    if fields.count > 8 { return fields }
                }
            } else if start == nil {
                start = index
            }
        }
        if let begin = start { fields.append(begin..<arguments.endIndex) }
        return fields
    }

    /// A size field: decimal digits only, at most 18 of them.
    private static func size(_ digits: ByteBufferView.SubSequence) -> Int? {
        guard !digits.isEmpty, digits.count <= 18 else { return nil }
        var value = 0
        for byte in digits {
            guard byte >= 0x30, byte <= 0x39 else { return nil }
            value = value * 10 + Int(byte - 0x30)
        }
        return value
    }
}
