import DequeModule
import EvdClient
import Foundation
import NATSClient
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

// scripts/bench's probe for the forwarding rows: JetStream's own publish rate through NATSClient
// (the anchor evforward is measured against), waiting for a stream to reach an evd seq, the lag from
// an event's commit to its arrival from the stream, and a paced evd emitter. Each prints one JSON
// line; a failure prints {"error": ...} and exits 1.
//
//   natsbench publish HOST:PORT STREAM COUNT WINDOW       pipelined JetStream publishes, WINDOW in flight
//   natsbench wait HOST:PORT STREAM EVDSEQ TIMEOUT_S       until the stream's last ce-sequence >= EVDSEQ
//   natsbench lag HOST:PORT STREAM EVENT COUNT TIMEOUT_S READY
//                                                          COUNT messages of EVENT read live: arrival - ce-time
//   natsbench emit SOCKET EVENT RATE SECONDS               evd emits at RATE/s, pipelined in 10 ms slices
//   natsbench delete HOST:PORT STREAM                      deletes a stream (missing is fine)

/// Prints one JSON line.
func emitJSON(_ object: JSONObject) {
    print(String(decoding: JSONValue.object(object).jsonBytes, as: UTF8.self))
}

/// Prints `{"error": text}` and exits 1.
func fail(_ text: String) -> Never {
    emitJSON(["error": .string(text)])
    exit(1)
}

/// The wall clock in microseconds since the epoch (the clock evd stamps event times with).
func wallMicros() -> Int64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return Int64(now.tv_sec) * 1_000_000 + Int64(now.tv_nsec) / 1000
}

/// An RFC 3339 UTC time as evd writes it (`2026-01-01T10:00:00.123456Z`) in microseconds since the epoch.
func micros(rfc3339 text: String) -> Int64? {
    let bytes = Array(text.utf8)
    guard bytes.count >= 20, bytes[4] == UInt8(ascii: "-"), bytes[10] == UInt8(ascii: "T") else { return nil }
    func number(_ range: Range<Int>) -> Int64? { Int64(String(decoding: bytes[range], as: UTF8.self)) }
    guard let year = number(0..<4), let month = number(5..<7), let day = number(8..<10), let hour = number(11..<13),
        let minute = number(14..<16), let second = number(17..<19)
    else { return nil }
    var fraction: Int64 = 0
    var digits = 0
    var index = 19
    if bytes[index] == UInt8(ascii: ".") {
        index += 1
        while index < bytes.count, bytes[index] >= UInt8(ascii: "0"), bytes[index] <= UInt8(ascii: "9") {
            if digits < 6 {
                fraction = fraction * 10 + Int64(bytes[index] - UInt8(ascii: "0"))
                digits += 1
            }
            index += 1
        }
    }
    while digits < 6 {
        fraction *= 10
        digits += 1
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = month <= 2 ? year - 1 : year
    let era = (y >= 0 ? y : y - 399) / 400
    let yoe = y - era * 400
    let doy = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
    let days = era * 146_097 + doe - 719_468
    return ((days * 24 + hour) * 60 + minute) * 60_000_000 + second * 1_000_000 + fraction
}

/// Connects to `HOST:PORT`.
func connect(_ address: String) async -> NATSConnection {
    guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else {
        fail("not HOST:PORT: \(address)")
    }
    do {
        return try await NATSConnection.connect(host: String(address[..<colon]), port: port)
    } catch {
        fail("cannot connect to NATS at \(address): \(error)")
    }
}

/// The evd seq in a stored message's `ce-sequence`, else in its body.
func evdSeq(_ message: JetStream.StoredMessage) -> Int64 {
    if let text = message.headers["ce-sequence"], let seq = Int64(text) { return seq }
    return (try? JSONValue(parsing: message.payload))?["seq"]?.intValue ?? 0
}

/// JetStream's publish rate: COUNT messages shaped like evforward's (its headers, a ~240-byte event
/// body) into a fresh one-node stream configured as evforward makes it, through the same pipelined
/// path evforward publishes with (`NATSConnection.sendRequests`: batches of 512 written in one
/// write each, at most WINDOW messages unacknowledged, every PubAck parsed and checked).
func publish(_ arguments: [String]) async {
    guard arguments.count == 4, let count = Int(arguments[2]), let window = Int(arguments[3]), window >= 1 else {
        fail("usage: publish HOST:PORT STREAM COUNT WINDOW")
    }
    let nats = await connect(arguments[0])
    let stream = arguments[1]
    let js = JetStream(connection: nats, timeout: .seconds(30))
    do {
        try await js.createStream(name: stream, subjects: ["jsbench.>"], storage: .file, duplicateWindow: .seconds(600))
    } catch {
        fail("cannot create stream \(stream): \(error)")
    }
    let epoch = "0123456789abcdef"
    let subject = "jsbench.main.update-row.big"
    /// One HPUB, as evforward writes it: the CloudEvents headers and the event's JSON.
    func encode(_ seq: Int, _ replyTo: NATSConnection.ReplySubject, _ buffer: inout ByteBuffer) -> Int {
        let id = "\(epoch):\(seq)"
        let padded = String(seq)
        let headers =
            "NATS/1.0\r\nNats-Msg-Id: \(id)\r\nce-specversion: 1.0\r\nce-id: \(id)\r\nce-source: evd://bench/main\r\n"
            + "ce-type: update-row\r\nce-time: 2026-01-01T00:00:00.000000Z\r\nce-subject: big\r\n"
            + "ce-sequence: \(String(repeating: "0", count: 20 - padded.count) + padded)\r\n\r\n"
        let body =
            "{\"type\":\"event\",\"seq\":\(seq),\"epoch\":\"\(epoch)\",\"event\":\"update-row\",\"time\":\"2026-01-01T00:00:00.000000Z\","
            + "\"session\":17,\"actor\":{\"id\":\"uid:1000\",\"uid\":1000,\"gid\":1000,\"pid\":4242,\"user\":\"alice\"},"
            + "\"database\":\"main\",\"table\":\"big\",\"pks\":[\(seq)]}"
        buffer.writeString("HPUB \(subject) ")
        replyTo.write(into: &buffer)
        buffer.writeString(" \(headers.utf8.count) \(headers.utf8.count + body.utf8.count)\r\n")
        buffer.writeString(headers)
        buffer.writeString(body)
        buffer.writeString("\r\n")
        return body.utf8.count
    }
    let batchSize = min(512, window)
    var bodyBytes = 0
    var pending = Deque<NATSConnection.PendingReplies>()
    var inFlight = 0
    var sent = 0
    let start = ContinuousClock.now
    do {
        func settle(_ batch: NATSConnection.PendingReplies) async throws {
            for reply in try await batch.replies() {
                let ack = try JetStream.parsePubAck(try reply.get().payload)
                guard !ack.duplicate else { throw NATSError.protocolViolation("an unexpected duplicate PubAck") }
            }
            inFlight -= batch.count
        }
        while sent < count {
            let size = min(batchSize, count - sent)
            while inFlight + size > window, let oldest = pending.popFirst() { try await settle(oldest) }
            let first = sent + 1
            let batch = try nats.sendRequests(count: size, timeout: .seconds(30)) { index, replyTo, buffer in
                bodyBytes = encode(first + index, replyTo, &buffer)
                return true
            }
            pending.append(batch)
            inFlight += size
            sent += size
        }
        while let oldest = pending.popFirst() { try await settle(oldest) }
    } catch {
        fail("publishing: \(error)")
    }
    let seconds = (ContinuousClock.now - start) / .seconds(1)
    try? await nats.close()
    emitJSON([
        "messages": .integer(count), "seconds": .double(seconds), "per_sec": .double(Double(count) / seconds),
        "body_bytes": .integer(bodyBytes), "window": .integer(window),
    ])
}

/// Waits until the stream's last message carries evd seq EVDSEQ or later; prints when (wall clock, ns)
/// and how many messages the stream holds.
func wait(_ arguments: [String]) async {
    guard arguments.count == 4, let target = Int64(arguments[2]), let timeout = Int(arguments[3]) else {
        fail("usage: wait HOST:PORT STREAM EVDSEQ TIMEOUT_S")
    }
    let nats = await connect(arguments[0])
    let js = JetStream(connection: nats)
    let deadline = ContinuousClock.now + .seconds(timeout)
    var last: Int64 = 0
    while ContinuousClock.now < deadline {
        if let message = try? await js.lastMessage(stream: arguments[1]) {
            last = evdSeq(message)
            if last >= target {
                let end = wallMicros()
                let info = try? await js.streamInfo(name: arguments[1])
                emitJSON(["end_us": .integer(end), "messages": .integer(info?.messages ?? 0), "last_seq": .integer(last)])
                return
            }
        }
        try? await Task.sleep(for: .milliseconds(5))
    }
    fail("the stream reached evd seq \(last), not \(target), within \(timeout) s")
}

/// Reads COUNT messages of EVENT as they are stored and prints the commit-to-arrival lag (arrival
/// here minus the event's `ce-time`) at p50/p99/max, and the arrival rate.
func lag(_ arguments: [String]) async {
    guard arguments.count == 6, let count = Int(arguments[3]), count > 0, let timeout = Int(arguments[4]) else {
        fail("usage: lag HOST:PORT STREAM EVENT COUNT TIMEOUT_S READY")
    }
    let nats = await connect(arguments[0])
    let stream = arguments[1]
    let event = arguments[2]
    let js = JetStream(connection: nats)
    let start: UInt64
    do {
        start = try await js.streamInfo(name: stream).lastSeq + 1
    } catch {
        fail("no stream \(stream): \(error)")
    }
    // Everything stored from here on is read, whenever the consumer is made: ready now.
    _ = FileManager.default.createFile(atPath: arguments[5], contents: nil)
    var lags: [Int64] = []
    lags.reserveCapacity(count)
    var first: Int64 = 0
    var last: Int64 = 0
    let finished = await withTaskGroup(of: Bool.self) { group in
        group.addTask {
            try? await Task.sleep(for: .seconds(timeout))
            return false
        }
        group.addTask {
            var collected: [Int64] = []
            var firstArrival: Int64 = 0
            var lastArrival: Int64 = 0
            let options = JetStream.ConsumeOptions(start: .sequence(start), batch: 4096)
            try? await js.consume(stream: stream, options: options) { message in
                guard message.headers["ce-type"] == event, let committed = message.headers["ce-time"].flatMap(micros) else {
                    return .next
                }
                let now = wallMicros()
                if collected.isEmpty { firstArrival = now }
                lastArrival = now
                collected.append(now - committed)
                return collected.count >= count ? .stop : .next
            }
            LagResult.shared.set(collected, firstArrival, lastArrival)
            return collected.count >= count
        }
        let done = await group.next() ?? false
        group.cancelAll()
        return done
    }
    (lags, first, last) = LagResult.shared.get()
    guard finished, !lags.isEmpty else { fail("only \(lags.count) of \(count) \(event) messages within \(timeout) s") }
    lags.sort()
    func percentile(_ p: Double) -> Int64 { lags[min(lags.count - 1, Int(Double(lags.count) * p))] }
    let seconds = Double(max(last - first, 1)) / 1e6
    emitJSON([
        "events": .integer(lags.count), "p50_us": .integer(percentile(0.5)), "p99_us": .integer(percentile(0.99)),
        "max_us": .integer(lags.last!), "per_sec": .double(Double(lags.count) / seconds),
    ])
}

/// Hands the lag task's figures to the caller (a child task cannot write the caller's variables).
final class LagResult: @unchecked Sendable {
    // @unchecked Sendable: every access holds `lock`.
    static let shared = LagResult()
    private let lock = NSLock()
    private var lags: [Int64] = []
    private var first: Int64 = 0
    private var last: Int64 = 0

    func set(_ lags: [Int64], _ first: Int64, _ last: Int64) {
        self.lock.withLock { (self.lags, self.first, self.last) = (lags, first, last) }
    }

    func get() -> ([Int64], Int64, Int64) {
        self.lock.withLock { (self.lags, self.first, self.last) }
    }
}

/// Emits EVENT at RATE per second for SECONDS: every 10 ms, the slice due so far, pipelined in one
/// write; a reader thread counts the responses. Prints what was sent and the rate achieved.
func emit(_ arguments: [String]) {
    guard arguments.count == 4, let rate = Int(arguments[2]), rate > 0, let seconds = Double(arguments[3]) else {
        fail("usage: emit SOCKET EVENT RATE SECONDS")
    }
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let path = Array(arguments[0].utf8)
    guard path.count < MemoryLayout.size(ofValue: address.sun_path) else { fail("socket path too long") }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (index, byte) in path.enumerated() { raw[index] = byte }
    }
    let connected = withUnsafePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard connected == 0 else { fail("cannot connect to \(arguments[0])") }
    let total = Int(Double(rate) * seconds)
    let line = Array("{\"op\":\"emit\",\"event\":\"\(arguments[1])\"}\n".utf8)
    let done = DispatchSemaphore(value: 0)
    let responses = ResponseCounter()
    // The hello line and one response per emit.
    Thread.detachNewThread {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        var lines = 0
        var errors = 0
        var text: [UInt8] = []
        while lines < total + 1 {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            for byte in buffer[0..<n] {
                if byte == 0x0a {
                    lines += 1
                    if errors == 0, text.count < 4096, String(decoding: text, as: UTF8.self).contains("\"ok\":false") {
                        errors += 1
                        responses.firstError = String(decoding: text, as: UTF8.self)
                    }
                    text.removeAll(keepingCapacity: true)
                } else if text.count < 4096 {
                    text.append(byte)
                }
            }
        }
        responses.lines = lines
        done.signal()
    }
    let start = ContinuousClock.now
    var sent = 0
    var slice = 0
    while sent < total {
        slice += 1
        let due = min(total, Int(Double(rate) * 0.01 * Double(slice)))
        if due > sent {
            var bytes: [UInt8] = []
            bytes.reserveCapacity((due - sent) * line.count)
            for _ in sent..<due { bytes += line }
            var offset = 0
            while offset < bytes.count {
                let n = bytes[offset...].withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
                if n <= 0 { fail("evd closed the connection after \(sent) emits") }
                offset += n
            }
            sent = due
        }
        let next = start + .milliseconds(10 * slice)
        if next > ContinuousClock.now { Thread.sleep(forTimeInterval: (next - ContinuousClock.now) / .seconds(1)) }
    }
    let sending = (ContinuousClock.now - start) / .seconds(1)
    if done.wait(timeout: .now() + 60) == .timedOut { fail("evd answered \(responses.lines) of \(total) emits within 60 s") }
    if let error = responses.firstError { fail("an emit failed: \(error)") }
    close(fd)
    emitJSON(["sent": .integer(sent), "seconds": .double(sending), "per_sec": .double(Double(sent) / sending)])
}

/// What the emitter's reader thread found (read once it signalled).
final class ResponseCounter: @unchecked Sendable {
    // @unchecked Sendable: written by the reader thread before it signals, read after the wait.
    var lines = 0
    var firstError: String?
}

/// Deletes a stream; a missing one is fine.
func delete(_ arguments: [String]) async {
    guard arguments.count == 2 else { fail("usage: delete HOST:PORT STREAM") }
    let nats = await connect(arguments[0])
    _ = try? await nats.request(subject: "$JS.API.STREAM.DELETE.\(arguments[1])", payload: [])
    try? await nats.close()
    emitJSON(["deleted": .string(arguments[1])])
}

let arguments = Array(CommandLine.arguments.dropFirst())
switch arguments.first {
case "publish": await publish(Array(arguments.dropFirst()))
case "wait": await wait(Array(arguments.dropFirst()))
case "lag": await lag(Array(arguments.dropFirst()))
case "emit": emit(Array(arguments.dropFirst()))
case "delete": await delete(Array(arguments.dropFirst()))
default: fail("usage: natsbench publish|wait|lag|emit|delete ...")
}
