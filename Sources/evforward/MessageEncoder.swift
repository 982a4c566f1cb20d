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

    private var headers: [UInt8] = []
    private var subject: [UInt8] = []

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
    mutating func encode(_ event: EventLine, replyTo: NATSConnection.ReplySubject, into buffer: inout ByteBuffer) -> Outcome {
        let database = event.database.map { event.string($0) }
        let table = event.table.map { event.string($0) }
        let name = event.string(event.event)
        let epoch = Array(event.raw(event.epoch))
        var msgID = epoch
        msgID.append(UInt8(ascii: ":"))
        Self.appendDecimal(event.seq, to: &msgID)

        self.subject.removeAll(keepingCapacity: true)
        self.subject += self.subjectPrefix
        self.subject.append(UInt8(ascii: "."))
        if let database { Self.appendToken(database, to: &self.subject) } else { self.subject.append(UInt8(ascii: "_")) }
        self.subject.append(UInt8(ascii: "."))
        Self.appendToken(name, to: &self.subject)
        if let table {
            self.subject.append(UInt8(ascii: "."))
            Self.appendToken(table, to: &self.subject)
        }

        self.headers.removeAll(keepingCapacity: true)
        self.headers += "NATS/1.0\r\nNats-Msg-Id: ".utf8
        self.headers += msgID
        switch self.fence {
        case .lastSequence(let sequence):
            self.headers += "\r\nNats-Expected-Last-Sequence: ".utf8
            Self.appendDecimal(Int64(sequence), to: &self.headers)
        case .lastMsgID(let previous):
            self.headers += "\r\nNats-Expected-Last-Msg-Id: ".utf8
            self.headers += previous
        }
        self.headers += "\r\nce-specversion: 1.0\r\nce-id: ".utf8
        self.headers += msgID
        self.headers += "\r\nce-source: ".utf8
        self.headers += self.sourcePrefix
        if let database { self.headers += Self.percentEncoded(database) } else { self.headers.append(UInt8(ascii: "_")) }
        self.headers += "\r\nce-type: ".utf8
        Self.appendHeaderValue(name, to: &self.headers)
        self.headers += "\r\nce-time: ".utf8
        Self.appendHeaderValue(event.string(event.time), to: &self.headers)
        if let table {
            self.headers += "\r\nce-subject: ".utf8
            Self.appendHeaderValue(table, to: &self.headers)
        }
        self.headers += "\r\nce-sequence: ".utf8
        Self.appendPadded(event.seq, to: &self.headers)
        self.headers += "\r\nce-epoch: ".utf8
        self.headers += epoch
        self.headers += "\r\ncontent-type: application/json\r\n\r\n".utf8

        let total = self.headers.count + event.bodyCount
        guard total <= self.maxPayload else { return .tooLarge(total) }
        buffer.writeString("HPUB ")
        buffer.writeBytes(self.subject)
        buffer.writeInteger(UInt8(ascii: " "))
        replyTo.write(into: &buffer)
        buffer.writeString(" \(self.headers.count) \(total)\r\n")
        buffer.writeBytes(self.headers)
        event.writeBody(into: &buffer)
        buffer.writeString("\r\n")
        self.fence = .lastMsgID(msgID)
        return .encoded
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

    /// `value` as exactly 20 decimal digits (`UInt64.max` has 20), so that text order is number order.
    static func appendPadded(_ value: Int64, to out: inout [UInt8]) {
        var digits = [UInt8](repeating: UInt8(ascii: "0"), count: 20)
        var rest = UInt64(max(value, 0))
        var index = 19
        while rest > 0 {
            digits[index] = UInt8(ascii: "0") + UInt8(rest % 10)
            rest /= 10
            index -= 1
        }
        out += digits
    }

    private static let hex = Array("0123456789ABCDEF".utf8)
}
