import NATSClient
import NIOCore

/// Builds each event's NATS message — subject, headers, body — and writes it as one `HPUB`.
///
/// Subject: `PREFIX.<database>.<event>[.<table>]`, each token escaped by `NATSSubject.token`'s rule,
/// `_` for an event without a database. Headers (docs/forwarding.md): `Nats-Msg-Id` and `ce-id`
/// `<epoch>:<seq>`, the fence header, `ce-specversion`, `ce-source` `evd://<host>/<database or _>`,
/// `ce-type`, `ce-time`, `ce-subject` (the table), `ce-sequence` (20 digits), `ce-epoch`,
/// `content-type`. Body: the event line without its `subscription` member.
///
/// The fence: every message names its predecessor — the first after a (re)connect with
/// `Nats-Expected-Last-Sequence` (the stream's last sequence when the forwarder looked), each later
/// one with `Nats-Expected-Last-Msg-Id` (the message before it) — so a message of a second
/// writer anywhere in the stream makes the next message of ours fail instead of being stored.
struct MessageEncoder {
    /// The fence the next message carries.
    enum Fence: Equatable {
        /// `Nats-Expected-Last-Sequence: N`: the stream's last sequence number.
        case lastSequence(UInt64)
        /// `Nats-Expected-Last-Msg-Id: ID`: the message sent before this one.
        case lastMsgID([UInt8])
    }

    /// What `encode` did with an event.
    enum Outcome: Equatable {
        case encoded
        /// Headers and body exceed the server's `max_payload`: nothing was written.
        case tooLarge(Int)
    }

    /// The subject prefix's bytes (one or more tokens, validated by the CLI).
    let subjectPrefix: [UInt8]
    /// `evd://<host>/`.
    let sourcePrefix: [UInt8]
    /// The largest message (headers plus body) the server accepts.
    let maxPayload: Int
    /// The fence of the next message encoded.
    var fence: Fence

    /// Scratch space reused for every message: the header block, the subject, the Msg-Id.
    private var headers = ByteBuffer()
    private var subject = ByteBuffer()
    private var msgID: [UInt8] = []

    /// An encoder for subjects under `subjectPrefix`, `ce-source` on `host`, whose first message
    /// carries `fence`.
    init(subjectPrefix: String, host: String, maxPayload: Int, fence: Fence) {
        self.subjectPrefix = Array(subjectPrefix.utf8)
        self.sourcePrefix = Array("evd://".utf8) + Self.percentEncoded(Array(host.utf8)) + [UInt8(ascii: "/")]
        self.maxPayload = maxPayload
        self.fence = fence
        self.headers.reserveCapacity(1024)
        self.subject.reserveCapacity(256)
    }

    /// Writes `event` as an `HPUB` to `replyTo` into `buffer`; afterwards the next message's fence
    /// names this one. A message too large for the server is not written and leaves the fence as
    /// it was (the stream never sees it, so the next message's predecessor is unchanged).
    ///
    /// The hot path: string members without escapes (all of them, in practice) are copied from the
    /// line as they are; only an escaped one is decoded first.
    mutating func encode(_ event: EventLine, replyTo: NATSConnection.ReplySubject, into buffer: inout ByteBuffer) -> Outcome {
        let epoch = event.raw(event.epoch)
        self.msgID.removeAll(keepingCapacity: true)
        self.msgID += epoch
        self.msgID.append(UInt8(ascii: ":"))
        Self.appendDecimal(event.seq, to: &self.msgID)

        self.subject.clear()
        self.subject.writeBytes(self.subjectPrefix)
        self.subject.writeInteger(UInt8(ascii: "."))
        if let database = event.database {
            self.write(event, database, to: \.subject, as: .token)
        } else {
            self.subject.writeInteger(UInt8(ascii: "_"))
        }
        self.subject.writeInteger(UInt8(ascii: "."))
        self.write(event, event.event, to: \.subject, as: .token)
        if let table = event.table {
            self.subject.writeInteger(UInt8(ascii: "."))
            self.write(event, table, to: \.subject, as: .token)
        }

        self.headers.clear()
        self.headers.writeStaticString("NATS/1.0\r\nNats-Msg-Id: ")
        self.headers.writeBytes(self.msgID)
        switch self.fence {
        case .lastSequence(let sequence):
            self.headers.writeStaticString("\r\nNats-Expected-Last-Sequence: ")
            self.headers.writeString(String(sequence))
        case .lastMsgID(let previous):
            self.headers.writeStaticString("\r\nNats-Expected-Last-Msg-Id: ")
            self.headers.writeBytes(previous)
        }
        self.headers.writeStaticString("\r\nce-specversion: 1.0\r\nce-id: ")
        self.headers.writeBytes(self.msgID)
        self.headers.writeStaticString("\r\nce-source: ")
        self.headers.writeBytes(self.sourcePrefix)
        if let database = event.database {
            self.write(event, database, to: \.headers, as: .uriSegment)
        } else {
            self.headers.writeInteger(UInt8(ascii: "_"))
        }
        self.headers.writeStaticString("\r\nce-type: ")
        self.write(event, event.event, to: \.headers, as: .headerValue)
        self.headers.writeStaticString("\r\nce-time: ")
        self.write(event, event.time, to: \.headers, as: .headerValue)
        if let table = event.table {
            self.headers.writeStaticString("\r\nce-subject: ")
            self.write(event, table, to: \.headers, as: .headerValue)
        }
        self.headers.writeStaticString("\r\nce-sequence: ")
        Self.writePadded(event.seq, to: &self.headers)
        self.headers.writeStaticString("\r\nce-epoch: ")
        self.headers.writeBytes(epoch)
        self.headers.writeStaticString("\r\ncontent-type: application/json\r\n\r\n")

        let total = self.headers.readableBytes + event.bodyCount
        guard total <= self.maxPayload else { return .tooLarge(total) }
        buffer.writeStaticString("HPUB ")
        buffer.writeImmutableBuffer(self.subject)
        buffer.writeInteger(UInt8(ascii: " "))
        replyTo.write(into: &buffer)
        buffer.writeInteger(UInt8(ascii: " "))
        Self.writeDecimal(self.headers.readableBytes, to: &buffer)
        buffer.writeInteger(UInt8(ascii: " "))
        Self.writeDecimal(total, to: &buffer)
        buffer.writeStaticString("\r\n")
        buffer.writeImmutableBuffer(self.headers)
        event.writeBody(into: &buffer)
        buffer.writeStaticString("\r\n")
        self.fence = .lastMsgID(self.msgID)
        return .encoded
    }

    /// How a string member is written.
    private enum Form {
        /// A subject token (`appendToken`).
        case token
        /// A URI path segment (`percentEncoded`).
        case uriSegment
        /// A header value (`appendHeaderValue`).
        case headerValue
    }

    /// Writes the string member at `range` of `event` in `form` into the scratch buffer `target`:
    /// straight from the line when nothing needs escaping.
    private mutating func write(_ event: EventLine, _ range: Range<Int>, to target: WritableKeyPath<Self, ByteBuffer>, as form: Form) {
        let raw = event.raw(range)
        let plain: Bool
        switch form {
        case .token:
            plain = !raw.isEmpty && !raw.contains { Self.tokenEscaped($0) || $0 == UInt8(ascii: "\\") }
        case .uriSegment:
            plain = raw.allSatisfy(Self.isUnreserved)
        case .headerValue:
            // A JSON string holds no raw control byte: without `\` it is clean.
            plain = !raw.contains(UInt8(ascii: "\\"))
        }
        if plain {
            self[keyPath: target].writeBytes(raw)
            return
        }
        let value = event.string(range)
        var out: [UInt8] = []
        switch form {
        case .token: Self.appendToken(value, to: &out)
        case .uriSegment: out = Self.percentEncoded(value)
        case .headerValue: Self.appendHeaderValue(value, to: &out)
        }
        self[keyPath: target].writeBytes(out)
    }

    private static func tokenEscaped(_ byte: UInt8) -> Bool {
        switch byte {
        case 0...0x20, 0x7f, UInt8(ascii: "."), UInt8(ascii: "*"), UInt8(ascii: ">"), UInt8(ascii: "%"): true
        default: false
        }
    }

    private static func isUnreserved(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
            UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
            true
        default: false
        }
    }

    /// A non-negative number in decimal.
    static func writeDecimal(_ value: Int, to buffer: inout ByteBuffer) {
        var digits:
            (
                UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                UInt8, UInt8, UInt8
            ) = (
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            )
        var rest = UInt64(max(value, 0))
        var count = 0
        withUnsafeMutableBytes(of: &digits) { bytes in
            repeat {
                bytes[19 - count] = UInt8(ascii: "0") + UInt8(rest % 10)
                rest /= 10
                count += 1
            } while rest > 0
            buffer.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[(20 - count)...]))
        }
    }

    /// `value` as exactly 20 decimal digits (`UInt64.max` has 20), so that text order is number order.
    static func writePadded(_ value: Int64, to buffer: inout ByteBuffer) {
        var digits:
            (
                UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                UInt8, UInt8, UInt8
            ) = (
                48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48, 48
            )
        var rest = UInt64(max(value, 0))
        withUnsafeMutableBytes(of: &digits) { bytes in
            var index = 19
            while rest > 0 {
                bytes[index] = UInt8(ascii: "0") + UInt8(rest % 10)
                rest /= 10
                index -= 1
            }
            buffer.writeBytes(bytes)
        }
    }

    /// `NATSSubject.token`'s escaping, on bytes: `.`, `*`, `>`, `%`, space and control bytes as `%XX`.
    static func appendToken(_ bytes: [UInt8], to out: inout [UInt8]) {
        if bytes.isEmpty {
            out.append(UInt8(ascii: "%"))
            return
        }
        for byte in bytes {
            switch byte {
            case 0...0x20, 0x7f, UInt8(ascii: "."), UInt8(ascii: "*"), UInt8(ascii: ">"), UInt8(ascii: "%"):
                out += [UInt8(ascii: "%"), Self.hex[Int(byte >> 4)], Self.hex[Int(byte & 0x0f)]]
            default:
                out.append(byte)
            }
        }
    }

    /// A URI path segment: every byte but RFC 3986's unreserved ones as `%XX`.
    static func percentEncoded(_ bytes: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                UInt8(ascii: "~"):
                out.append(byte)
            default:
                out += [UInt8(ascii: "%"), Self.hex[Int(byte >> 4)], Self.hex[Int(byte & 0x0f)]]
            }
        }
        return out
    }

    /// A header value: as it is, but a control byte (which could end the line) as `%XX`.
    static func appendHeaderValue(_ bytes: [UInt8], to out: inout [UInt8]) {
        for byte in bytes {
            if byte < 0x20 || byte == 0x7f {
                out += [UInt8(ascii: "%"), Self.hex[Int(byte >> 4)], Self.hex[Int(byte & 0x0f)]]
            } else {
                out.append(byte)
            }
        }
    }

    static func appendDecimal(_ value: Int64, to out: inout [UInt8]) {
        if value == 0 {
            out.append(UInt8(ascii: "0"))
            return
        }
        var digits: [UInt8] = []
        var rest = value.magnitude
        while rest > 0 {
            digits.append(UInt8(ascii: "0") + UInt8(rest % 10))
            rest /= 10
        }
        if value < 0 { out.append(UInt8(ascii: "-")) }
        out += digits.reversed()
    }

    /// `value` as exactly 20 decimal digits, appended to `out`.
    static func appendPadded(_ value: Int64, to out: inout [UInt8]) {
        var buffer = ByteBuffer()
        Self.writePadded(value, to: &buffer)
        out += buffer.readableBytesView
    }

    private static let hex = Array("0123456789ABCDEF".utf8)
}
