import EvdClient

/// Every line the daemon writes to a client (PROTOCOL.md), built in one place: events, vetoes,
/// responses, `hello` and notices. Each function returns (or appends) a whole line, newline
/// included, byte for byte what PROTOCOL.md shows.
///
/// The event encoders are on the hot path: an event's bytes are made once and shared by every
/// subscriber (its `prefix` up to the subscription number and its `body` after it), and a run of
/// row events or a replayed page is written from `appendStart`, `appendName` and `subscriptionKey`
/// without a line of its own in between.
enum WireLines {}

// MARK: Events

extension WireLines {
    /// An event's bytes after the subscription number: the envelope's origin, the transaction's
    /// members (`stamp`, for a committed event; `end`: it is the transaction's last), the
    /// properties, the closing brace and newline.
    static func body(
        _ origin: EventOrigin,
        _ properties: JSONObject,
        kind: EventKind? = nil,
        stamp: TxStamp? = nil,
        end: Bool = false
    ) -> [UInt8] {
        var body = origin.envelopeFragment
        stamp?.appendMembers(kind: kind, to: &body)
        for (key, value) in properties {
            body.append(UInt8(ascii: ","))
            JSONWriter.appendString(key, to: &body)
            body.append(UInt8(ascii: ":"))
            value.write(into: &body)
        }
        if stamp != nil, end { JSONWriter.appendASCII(TxStamp.endMember, to: &body) }
        body.append(UInt8(ascii: "}"))
        body.append(UInt8(ascii: "\n"))
        return body
    }

    /// An event's bytes up to its subscription number:
    /// `{"type":"event","seq":…,"epoch":…,"event":…,"time":…,"subscription":`. `time` is quoted;
    /// `nil`: now.
    static func prefix(seq: Int64, epoch: JournalEpoch, name: String, time: [UInt8]?) -> [UInt8] {
        var prefix: [UInt8] = []
        prefix.reserveCapacity(140)
        var name = name  // `withUTF8` is mutating; a native string neither copies nor allocates
        name.withUTF8 { Self.appendHead(seq: seq, epoch: epoch, name: $0, to: &prefix) }
        if let time { prefix += time } else { EventTime.appendNow(to: &prefix) }
        JSONWriter.appendASCII(Self.subscriptionKey, to: &prefix)
        return prefix
    }

    /// Appends an event's bytes up to its time: `{"type":"event","seq":…,"epoch":…,"event":…,"time":`.
    /// `name` is UTF-8. (A replay writes its events with its two parts, `subscriptionKey` and the
    /// body.)
    @inline(__always)
    static func appendHead(seq: Int64, epoch: JournalEpoch, name: UnsafeBufferPointer<UInt8>, to bytes: inout [UInt8]) {
        Self.appendStart(seq: seq, to: &bytes)
        Self.appendName(name, epoch: epoch, to: &bytes)
    }

    /// The head's first part: `{"type":"event","seq":…`.
    @inline(__always)
    static func appendStart(seq: Int64, to bytes: inout [UInt8]) {
        JSONWriter.appendASCII(#"{"type":"event","seq":"#, to: &bytes)
        JSONWriter.appendInt(seq, to: &bytes)
    }

    /// The head's second part, the same for every event of one name: `,"epoch":…,"event":…,"time":`.
    static func appendName(_ name: UnsafeBufferPointer<UInt8>, epoch: JournalEpoch, to bytes: inout [UInt8]) {
        bytes += epoch.field
        JSONWriter.appendASCII(#","event":"#, to: &bytes)
        JSONWriter.appendEscaped(name, to: &bytes)
        JSONWriter.appendASCII(#","time":"#, to: &bytes)
    }

    /// What follows an event's quoted time, before its subscription number.
    static let subscriptionKey: StaticString = #","subscription":"#
}

// MARK: Vetoes

extension WireLines {
    /// The `veto` message asking listener `subscription` about event `name` (PROTOCOL.md §4): its
    /// time is now; `deadlineMs` is at least 1.
    static func veto(
        seq: Int64,
        epoch: JournalEpoch,
        name: String,
        subscription: Int,
        origin: EventOrigin,
        deadlineMs: Int64,
        properties: JSONObject
    ) -> [UInt8] {
        var line: [UInt8] = Array(#"{"type":"veto","seq":"#.utf8)
        JSONWriter.appendInt(seq, to: &line)
        line += epoch.field
        line += Array(#","event":"#.utf8)
        JSONWriter.appendString(name, to: &line)
        line += Array(#","time":"#.utf8)
        EventTime.appendNow(to: &line)
        line += Array(#","subscription":"#.utf8)
        JSONWriter.appendInt(Int64(subscription), to: &line)
        line += origin.envelopeFragment
        line += Array(#","deadline_ms":"#.utf8)
        JSONWriter.appendInt(max(1, deadlineMs), to: &line)
        for (key, value) in properties {
            line.append(UInt8(ascii: ","))
            JSONWriter.appendString(key, to: &line)
            line.append(UInt8(ascii: ":"))
            value.write(into: &line)
        }
        line += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
        return line
    }
}
