import EvdCLI
import EvdClient
import Foundation
import NATSClient

/// `evtail --nats URL --stream NAME`: evd's events read back from the JetStream stream `evforward`
/// fills, printed exactly as a local `evtail` prints them.
///
/// Each message's body is the event's JSON as a subscriber received it, minus `subscription`; on a
/// terminal it becomes `EventFormatter.line`, into a pipe the body itself. Events are matched by
/// name (the `ce-type` header) against the names and globs given, as the daemon matches a
/// subscription's. The server filters too where one subject can say the same: nats-server 2.9 takes
/// one filter subject per consumer, and an event's subject is `PREFIX.<db>.<event>` or
/// `PREFIX.<db>.<event>.<table>` depending on whether it has a table, so only a single event name
/// whose form the catalog fixes (`insert-rows` always has a table, `login` never) becomes
/// `PREFIX.*.insert-rows.*` or `PREFIX.*.login` (PREFIX read from the stream's one `PREFIX.>`
/// subject). Globs, several names and custom events are filtered here only.
///
/// `--since SEQ` (an evd seq) starts at the first message whose `ce-sequence` is greater, found by
/// binary search over the stream (`JetStream.firstSequence`); without it, only events stored from
/// now on are printed, as a local evtail starts live. It follows the stream until `--count` events
/// were printed or a signal; a lost connection is retried (every URL, backing off to 5 s) and
/// reading resumes after the last message handled.
struct NATSTail {
    /// One server to try: from `nats://host:port` (port 4222 when left out).
    struct Server: Equatable, CustomStringConvertible {
        var host: String
        var port: Int
        var description: String { "nats://\(self.host.contains(":") ? "[\(self.host)]" : self.host):\(self.port)" }
    }

    /// A URL evtail cannot use.
    struct BadURL: Error, CustomStringConvertible {
        var description: String
    }

    let servers: [Server]
    let stream: String
    let since: Int64?
    let count: Int?
    let readable: Bool
    let patterns: [String]

    /// Parses `--nats`: one URL or several separated by commas (`nats://a:4222,nats://b:4222`).
    static func servers(_ text: String) throws -> [Server] {
        var servers: [Server] = []
        for part in text.split(separator: ",").map({ $0.trimmingWhitespace() }) where !part.isEmpty {
            var rest = Substring(part)
            if let scheme = rest.range(of: "://") {
                guard rest[..<scheme.lowerBound] == "nats" else {
                    throw BadURL(description: "'\(part)': only nats:// URLs are supported (no TLS, no websocket)")
                }
                rest = rest[scheme.upperBound...]
            }
            if rest.hasSuffix("/") { rest = rest.dropLast() }
            guard !rest.contains("@") else { throw BadURL(description: "'\(part)': credentials in the URL are not supported") }
            var host = rest
            var port = 4222
            if rest.hasPrefix("["), let close = rest.firstIndex(of: "]") {
                host = rest[rest.index(after: rest.startIndex)..<close]
                let after = rest[rest.index(after: close)...]
                if after.hasPrefix(":") {
                    guard let value = Int(after.dropFirst()), (1...65535).contains(value) else {
                        throw BadURL(description: "'\(part)': bad port")
                    }
                    port = value
                }
            } else if let colon = rest.lastIndex(of: ":") {
                host = rest[..<colon]
                guard let value = Int(rest[rest.index(after: colon)...]), (1...65535).contains(value) else {
                    throw BadURL(description: "'\(part)': bad port")
                }
                port = value
            }
            guard !host.isEmpty else { throw BadURL(description: "'\(part)': no host") }
            servers.append(Server(host: String(host), port: port))
        }
        guard !servers.isEmpty else { throw BadURL(description: "--nats needs a URL such as nats://127.0.0.1:4222") }
        return servers
    }

    /// Reads and prints until done; the exit status (0: `--count` reached, 1: an error, said on stderr).
    func run() async -> Int32 {
        var printed = 0
        /// The last stream sequence handled; where a reconnection resumes.
        var position: UInt64?
        var start: JetStream.ConsumerStart = .new
        var filter: String?
        var backoff = Duration.milliseconds(100)
        var connectedOnce = false
        while true {
            let nats: NATSConnection
            do {
                nats = try await self.connect()
            } catch {
                guard connectedOnce else {
                    Terminal.writeStderr("evtail: cannot connect to NATS at \(self.urlsText): \(error)")
                    return 1
                }
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
                continue
            }
            let js = JetStream(connection: nats)
            do {
                if !connectedOnce {
                    (start, filter) = try await self.firstStart(js)
                    connectedOnce = true
                } else if let position {
                    start = .sequence(position + 1)
                }
                backoff = .milliseconds(100)
                let options = JetStream.ConsumeOptions(filterSubject: filter, start: start)
                try await js.consume(stream: self.stream, options: options) { message in
                    position = message.seq
                    guard self.handle(message) else { return .next }
                    printed += 1
                    if let count = self.count, printed >= count { return .stop }
                    return .next
                }
                try? await nats.close()
                return 0
            } catch  where connectedOnce && Self.isTransient(error) {
                // Once reading has begun, whatever a restarting server or cluster says is waited out.
                try? await nats.close()
                Terminal.writeStderr("evtail: \(Self.describe(error)); reconnecting")
            } catch let error as JetStream.APIError where error.errCode == 10059 {
                try? await nats.close()
                Terminal.writeStderr("evtail: NATS at \(self.urlsText) has no stream \(self.stream)")
                return 1
            } catch NATSError.noResponders {
                try? await nats.close()
                Terminal.writeStderr("evtail: JetStream is not enabled on NATS at \(self.urlsText) (no responders on $JS.API)")
                return 1
            } catch {
                try? await nats.close()
                Terminal.writeStderr("evtail: reading stream \(self.stream): \(error)")
                return 1
            }
            try? await Task.sleep(for: backoff)
            backoff = min(backoff * 2, .seconds(5))
        }
    }

    /// Whether `error` may pass when the server (or the cluster's leader) comes back: a lost connection,
    /// no answer, JetStream not (yet) available (503, no responders), the stream not (yet) loaded.
    static func isTransient(_ error: any Error) -> Bool {
        switch error {
        case NATSError.connectionClosed, NATSError.timeout, NATSError.noResponders: true
        case let error as JetStream.APIError: error.code == 503 || error.errCode == 10059
        default: false
        }
    }

    private static func describe(_ error: any Error) -> String {
        switch error {
        case NATSError.connectionClosed(let why): "lost the NATS connection (\(why))"
        case NATSError.timeout: "NATS did not answer in time"
        default: "\(error)"
        }
    }

    private var urlsText: String { self.servers.map(\.description).joined(separator: ",") }

    /// Connects to the first server that answers, in the order given.
    private func connect() async throws -> NATSConnection {
        var lastError: (any Error)?
        for server in self.servers {
            do {
                return try await NATSConnection.connect(host: server.host, port: server.port, timeout: .seconds(3))
            } catch {
                lastError = error
            }
        }
        throw lastError ?? NATSError.connectionClosed("no server")
    }

    /// Where the first consumer starts (after `--since`'s event, or at what is stored from now on) and
    /// the filter subject it can use. A missing stream is an error here, not an endless wait.
    private func firstStart(_ js: JetStream) async throws -> (JetStream.ConsumerStart, String?) {
        let info = try await js.streamInfo(name: self.stream)
        let subjects = info.raw["config"]?["subjects"]?.arrayValue?.compactMap(\.stringValue) ?? []
        let filter = Self.filterSubject(patterns: self.patterns, streamSubjects: subjects)
        guard let since = self.since else {
            // A sequence, not `.new`: a reconnection before the first event still starts there.
            return (.sequence(info.lastSeq + 1), filter)
        }
        let first = try await js.firstSequence(stream: self.stream) { message in
            (Self.evdSeq(message) ?? Int64.max) > since
        }
        return (.sequence(first), filter)
    }

    /// The catalog's journaled events that always carry a table, and those that never do.
    static let eventsWithTable: Set = [
        "insert-rows", "upsert-rows", "update-row", "delete-row", "create-table", "alter-table", "drop-table",
    ]
    static let eventsWithoutTable: Set = ["login", "logout", "create-token", "rename-table"]

    /// A filter subject that selects exactly the events `patterns` name, when there is one (see the
    /// type's comment); `nil` otherwise.
    static func filterSubject(patterns: [String], streamSubjects: [String]) -> String? {
        guard patterns.count == 1, let name = patterns.first, streamSubjects.count == 1, streamSubjects[0].hasSuffix(".>") else {
            return nil
        }
        let prefix = streamSubjects[0].dropLast(2)
        if Self.eventsWithTable.contains(name) { return "\(prefix).*.\(NATSSubject.token(name)).*" }
        if Self.eventsWithoutTable.contains(name) { return "\(prefix).*.\(NATSSubject.token(name))" }
        return nil
    }

    /// Prints `message` if it is an event the patterns select; whether it was printed.
    private func handle(_ message: JetStream.StoredMessage) -> Bool {
        guard let object = (try? JSONValue(parsing: message.payload))?.objectValue else {
            Terminal.writeStderr("evtail: stream message \(message.seq) is not an evd event (its body is not a JSON object); skipped")
            return false
        }
        let name = message.headers["ce-type"] ?? object["event"]?.stringValue ?? ""
        guard self.patterns.isEmpty || self.patterns.contains(where: { Self.glob($0, matches: name) }) else { return false }
        if let since = self.since, let seq = Self.evdSeq(message), seq <= since { return false }
        if self.readable {
            Terminal.writeStdout(Array((EventFormatter.line(object) + "\n").utf8))
        } else {
            var body = message.payload
            while let last = body.last, last == 0x0a || last == 0x0d { body.removeLast() }
            Terminal.writeStdout(body + [0x0a])
        }
        return true
    }

    /// The evd seq of a forwarded event: its `ce-sequence` header, else its body's `seq`.
    static func evdSeq(_ message: JetStream.StoredMessage) -> Int64? {
        if let text = message.headers["ce-sequence"], let seq = Int64(text) { return seq }
        return (try? JSONValue(parsing: message.payload))?["seq"]?.intValue
    }

    /// Shell-style matching as the daemon matches subscriptions: `*` any run of characters, `?` one.
    static func glob(_ pattern: String, matches name: String) -> Bool {
        EventPattern(pattern).matches(name)
    }
}

extension Substring {
    fileprivate func trimmingWhitespace() -> String {
        String(self.drop { $0 == " " }.reversed().drop { $0 == " " }.reversed())
    }
}
