import DequeModule
import EvdClient
import Logging
import NATSClient
import NIOCore
import ServiceLifecycle
import Synchronization

/// Forwards evd's journaled events into a JetStream stream, effectively once (docs/forwarding.md).
///
/// Each session: connect to NATS, make sure the stream exists, read its last message (the resume
/// point), connect to evd, subscribe with the cursor from there, then publish pipelined — batches in
/// flight up to `maxInFlight` messages — and acknowledge the cursor as PubAcks come back. Any
/// failure ends the session; the next starts over after a back-off (100 ms doubling to 5 s).
/// Graceful shutdown finishes what is in flight, acknowledges it to evd and returns.
final class Forwarder: Service, CustomStringConvertible {
    let configuration: ForwarderConfiguration
    let metrics: ForwarderMetrics
    private let logger: Logger
    private let stopping = StopSignal()

    var description: String { "Forwarder(stream: \(self.configuration.stream), cursor: \(self.configuration.cursor))" }

    /// A forwarder for `configuration`, counting in `metrics`, logging to `logger`.
    init(configuration: ForwarderConfiguration, metrics: ForwarderMetrics, logger: Logger) {
        self.configuration = configuration
        self.metrics = metrics
        self.logger = logger
    }

    /// Runs sessions until graceful shutdown (then returns) or a `ForwarderError` (thrown).
    func run() async throws {
        try await withGracefulShutdownHandler {
            try await self.loop()
        } onGracefulShutdown: {
            self.stopping.signal()
        }
    }

    /// How long after a session of ours that followed the cursor ended a `cursor_in_use` is taken
    /// for that session's connection, which evd may not have seen close yet, rather than another
    /// forwarder's.
    static let cursorReleaseGrace = Duration.seconds(10)

    /// Sessions one after another, with back-off between failed ones, until told to stop.
    private func loop() async throws {
        var backoff = Duration.milliseconds(100)
        var attempt = 0
        // When the last session that followed the cursor ended.
        var followedUntil: ContinuousClock.Instant?
        while !self.stopping.isSignalled {
            let server = self.configuration.servers[attempt % self.configuration.servers.count]
            attempt += 1
            let grace = followedUntil.map { ContinuousClock.now - $0 < Self.cursorReleaseGrace } ?? false
            do {
                let outcome = try await self.session(server: server, cursorGrace: grace)
                if outcome.followed { followedUntil = .now }
                if outcome.progressed { backoff = .milliseconds(100) }
                if self.stopping.isSignalled { break }
                self.logger.info("session ended; starting over", metadata: ["nats.server": "\(server)"])
            } catch let error as ForwarderError {
                throw error
            } catch let failure as SessionFailure {
                if failure.outcome.followed { followedUntil = .now }
                if failure.outcome.progressed { backoff = .milliseconds(100) }
                self.logger.warning(
                    "forwarding interrupted; retrying",
                    metadata: ["error": "\(failure.error)", "nats.server": "\(server)", "retry.in": "\(backoff)"]
                )
            } catch {
                self.logger.warning(
                    "forwarding interrupted; retrying",
                    metadata: ["error": "\(error)", "nats.server": "\(server)", "retry.in": "\(backoff)"]
                )
            }
            await self.stopping.sleep(for: backoff)
            backoff = min(backoff * 2, .seconds(5))
        }
        self.logger.info("stopped", metadata: ["forwarded": "\(self.metrics.forwarded.load(ordering: .relaxed))"])
    }

    /// What a session got done.
    struct SessionOutcome {
        /// Whether an event was PubAck'ed (then the back-off starts again from its shortest).
        var progressed = false
        /// Whether it followed the cursor (then evd may still hold the cursor for it a moment).
        var followed = false
    }

    /// A session's failure, with what it got done before.
    struct SessionFailure: Error {
        var error: any Error
        var outcome: SessionOutcome
    }

    /// The cursor was in use just after a session of ours followed it: most likely evd has not yet
    /// seen that session's connection close. Retried, not fenced.
    struct CursorStillHeld: Error, CustomStringConvertible {
        var cursor: String
        var description: String { "cursor \(self.cursor) is still in use, presumably by this forwarder's previous connection" }
    }

    /// Where to resume, read from the stream's last message.
    struct ResumePoint: Sendable, Equatable {
        /// The stream's last sequence number (0: it never held a message).
        var streamSequence: UInt64
        /// The evd epoch and seq of the last message, when it is one of ours.
        var epoch: String?
        var seq: Int64?
    }

    /// Reads the resume point from `last`, the stream's last message (nil: none), whose sequence
    /// is `lastSequence` (the stream's `last_seq` when it holds no message).
    static func resumePoint(last: JetStream.StoredMessage?, lastSequence: UInt64) -> ResumePoint {
        guard let last else { return ResumePoint(streamSequence: lastSequence) }
        var point = ResumePoint(streamSequence: last.seq)
        if let sequence = last.headers["ce-sequence"].flatMap({ Int64($0) }) {
            point.seq = sequence
            point.epoch =
                last.headers["ce-epoch"] ?? last.headers["Nats-Msg-Id"].flatMap { $0.split(separator: ":").first.map(String.init) }
        }
        return point
    }

    /// Makes sure the stream exists: created with the documented configuration when missing.
    func ensureStream(_ jetStream: JetStream) async throws -> JetStream.StreamInfo {
        do {
            let info = try await jetStream.streamInfo(name: self.configuration.stream)
            let config = info.raw["config"]?.objectValue ?? [:]
            let window = config["duplicate_window"]?.intValue ?? 0
            if window < 600 * 1_000_000_000 {
                self.logger.warning(
                    "the stream's duplicate window is under 600 s: a retry after a long outage may be stored twice",
                    metadata: ["stream": "\(self.configuration.stream)", "duplicate_window.ns": "\(window)"]
                )
            }
            return info
        } catch let error as JetStream.APIError where error.errCode == 10059 {
            self.logger.info(
                "creating the stream",
                metadata: ["stream": "\(self.configuration.stream)", "replicas": "\(self.configuration.replicas)"]
            )
            do {
                return try await jetStream.createStream(
                    name: self.configuration.stream,
                    subjects: ["\(self.configuration.subjectPrefix).>"],
                    storage: .file,
                    duplicateWindow: self.configuration.duplicateWindow,
                    replicas: self.configuration.replicas
                )
            } catch let error as JetStream.APIError where error.errCode == 10065 || error.errCode == 10058 {
                // Another forwarder (started at the same moment) may have made it meanwhile: then
                // its subjects overlap ours because it is ours.
                if let made = try? await jetStream.streamInfo(name: self.configuration.stream) { return made }
                throw ForwarderError.fatal(
                    "cannot create stream \(self.configuration.stream): its subjects \(self.configuration.subjectPrefix).> overlap another stream's (choose another --subject-prefix, or name that stream with --stream)"
                )
            }
        }
    }

    /// One session; returns what it got done when it ends without an error (asked to stop, or evd
    /// said it is shutting down). Errors other than `ForwarderError` are wrapped in
    /// `SessionFailure`. With `cursorGrace`, a `cursor_in_use` is retried, not fenced.
    private func session(server: NATSAddress, cursorGrace: Bool) async throws -> SessionOutcome {
        let nats: NATSConnection
        do {
            nats = try await NATSConnection.connect(host: server.host, port: server.port, timeout: self.configuration.timeout)
        } catch {
            throw SessionFailure(error: error, outcome: SessionOutcome())
        }
        let pump = Pump(forwarder: self, nats: nats, cursorGrace: cursorGrace)
        do {
            try await pump.run()
            try? await nats.close()
            return pump.outcome
        } catch let error as ForwarderError {
            try? await nats.close()
            throw error
        } catch {
            try? await nats.close()
            throw SessionFailure(error: error, outcome: pump.outcome)
        }
    }

    /// One session's work: its connections' state and the in-flight batches.
    private final class Pump {
        let forwarder: Forwarder
        let nats: NATSConnection
        let jetStream: JetStream
        var configuration: ForwarderConfiguration { self.forwarder.configuration }
        var metrics: ForwarderMetrics { self.forwarder.metrics }
        var logger: Logger { self.forwarder.logger }

        /// What this session got done.
        var outcome = SessionOutcome()
        /// Whether `cursor_in_use` may be the previous session's connection (`CursorStillHeld`).
        let cursorGrace: Bool

        /// A batch sent and not yet wholly acknowledged.
        struct Flight {
            var replies: NATSConnection.PendingReplies
            /// The events' seqs, in the order sent; `skipped` marks those too large to send.
            var seqs: [Int64]
            var skipped: [Bool]
        }

        private var flights = Deque<Flight>()
        private var inFlight = 0
        /// The highest seq with every event up to it PubAck'ed (or skipped).
        private var acknowledged: Int64 = 0
        /// The seq last acknowledged to evd (sent), and when.
        private var ackSent: Int64 = 0
        private var ackTime = ContinuousClock.now
        /// The seq of the last event taken from evd (to drop any repeat).
        private var lastTaken: Int64 = 0

        /// A session of `forwarder` over the NATS connection `nats`.
        init(forwarder: Forwarder, nats: NATSConnection, cursorGrace: Bool) {
            self.forwarder = forwarder
            self.nats = nats
            self.cursorGrace = cursorGrace
            self.jetStream = JetStream(connection: nats, timeout: forwarder.configuration.timeout)
        }

        /// Makes sure of the stream, reads the resume point, connects to evd and forwards.
        func run() async throws {
            let info = try await self.forwarder.ensureStream(self.jetStream)
            let last = try await self.jetStream.lastMessage(stream: self.configuration.stream)
            let resume = Forwarder.resumePoint(last: last, lastSequence: info.lastSeq)
            do {
                try await EvdLineConnection.withConnection(socketPath: self.configuration.socketPath, token: self.configuration.token) {
                    evd in
                    try await self.forward(from: evd, resume: resume)
                }
            } catch let error as EvdError
                where error.code == ErrorCode.tokenInvalid.rawValue || error.code == ErrorCode.tokenExpired.rawValue
            {
                // Retrying cannot make a token valid: a new one must be configured.
                throw ForwarderError.fatal("evd refused the token (--token or $EVD_TOKEN): \(error)")
            }
        }

        /// Subscribes with the cursor and forwards until the connection ends or the forwarder stops.
        private func forward(from evd: EvdLineConnection, resume: ResumePoint) async throws {
            guard let epoch = evd.hello["epoch"]?.stringValue else {
                throw ForwarderError.fatal(
                    "evd at \(self.configuration.socketPath) does not support durable cursors (its hello has no epoch): upgrade evd"
                )
            }
            var subscribe = EvdOperation.Subscribe(events: self.configuration.events)
            subscribe.cursor = self.configuration.cursor
            subscribe.name = "evforward \(self.configuration.stream)"
            if let seq = resume.seq, resume.epoch == epoch {
                subscribe.since = seq
            } else if resume.streamSequence == 0 {
                // A stream that never held a message: everything the journal holds (nothing in it
                // can be a duplicate), whatever the cursor's position.
                subscribe.since = 0
            } else if !(try await self.cursorExists(evd)) {
                // Messages of another journal in the stream, and a new cursor: everything journaled.
                subscribe.since = 0
            }
            let result: JSONObject
            do {
                result = try await evd.request(.subscribe(subscribe))
            } catch let error as EvdError {
                switch error.code {
                case ErrorCode.cursorInUse.rawValue where self.cursorGrace:
                    throw CursorStillHeld(cursor: self.configuration.cursor)
                case ErrorCode.cursorInUse.rawValue:
                    self.metrics.fenceConflicts.add(1, ordering: .relaxed)
                    throw ForwarderError.fenced(
                        "fenced: cursor \(self.configuration.cursor) is in use by another subscriber (another evforward for \(self.configuration.stream)?)"
                    )
                case ErrorCode.permissionDenied.rawValue, ErrorCode.badRequest.rawValue, ErrorCode.unknownOp.rawValue,
                    ErrorCode.tokenInvalid.rawValue, ErrorCode.tokenExpired.rawValue:
                    throw ForwarderError.fatal("evd refused the subscription: \(error)")
                default:
                    throw error
                }
            }
            guard let subscription = result["subscription"]?.intValue else {
                throw ForwarderError.fatal("evd's subscribe response has no subscription")
            }
            self.outcome.followed = true
            let position = result["cursor"]?["position"]?.intValue ?? subscribe.since ?? 0
            self.acknowledged = position
            self.ackSent = position
            self.lastTaken = position
            self.metrics.acknowledged.store(Int(position), ordering: .relaxed)
            self.metrics.head.store(Int(result["seq"]?.intValue ?? position), ordering: .relaxed)
            self.logger.info(
                "forwarding",
                metadata: [
                    "stream": "\(self.configuration.stream)", "cursor": "\(self.configuration.cursor)",
                    "from.seq": "\(position)", "evd.epoch": "\(epoch)", "stream.last_seq": "\(resume.streamSequence)",
                ]
            )
            let fence: MessageEncoder.Fence = .lastSequence(resume.streamSequence)
            var encoder = MessageEncoder(
                subjectPrefix: self.configuration.subjectPrefix,
                host: self.configuration.host,
                maxPayload: self.nats.maxPayload,
                fence: fence
            )
            let epochBytes = Array(epoch.utf8)
            var progress = Progress(start: self.metrics.forwarded.load(ordering: .relaxed))
            var pending: [EventLine] = []
            var pendingIndex = 0
            defer { self.metrics.inFlight.store(0, ordering: .relaxed) }
            while !self.forwarder.stopping.isSignalled {
                // Once everything taken is sent, take whatever evd has queued (never more: what
                // waits in evd's queue, and then in the socket, is what holds evd back), and send as
                // much as the in-flight bound allows.
                if pendingIndex == pending.count {
                    pending.removeAll(keepingCapacity: true)
                    pendingIndex = 0
                    if let items = self.takeQueued(evd) { try self.accept(items, epoch: epochBytes, into: &pending) }
                }
                while pendingIndex < pending.count && self.inFlight < self.configuration.maxInFlight {
                    let room = min(self.configuration.maxInFlight - self.inFlight, self.configuration.batchSize)
                    let end = min(pending.count, pendingIndex + room)
                    try self.send(pending[pendingIndex..<end], encoder: &encoder)
                    pendingIndex = end
                }
                if !self.flights.isEmpty {
                    // Events arriving meanwhile queue up for the next round.
                    try await self.completeOldest()
                } else {
                    // Nothing in flight: wait for evd, bounded, for the periodic work below.
                    switch await Self.wait(for: evd.events, within: self.configuration.ackInterval) {
                    case .items(let items): try self.accept(items, epoch: epochBytes, into: &pending)
                    case .timeout: break
                    case .finished: throw EvdLineConnection.ConnectionError(description: "evd closed the connection")
                    }
                }
                self.maybeAck(evd, subscription: subscription)
                progress.log(self)
            }
            // Stopping: what was sent is finished and acknowledged; what was not sent is left to
            // the next run (the cursor, and the stream's last message, say where it resumes).
            while !self.flights.isEmpty { try await self.completeOldest() }
            await self.finalAck(evd, subscription: subscription)
        }

        /// Every batch already queued, flattened (nil when none).
        private func takeQueued(_ evd: EvdLineConnection) -> [EvdLineConnection.Item]? {
            let batches = evd.events.popQueued(while: { _ in true })
            guard !batches.isEmpty else { return nil }
            return batches.flatMap { $0 }
        }

        /// Takes events (checking epoch and order) into `pending`, and acts on notices.
        private func accept(
            _ items: [EvdLineConnection.Item],
            epoch: [UInt8],
            into pending: inout [EventLine]
        ) throws {
            for item in items {
                switch item {
                case .event(let event):
                    guard event.seq > self.lastTaken else { continue }
                    guard event.raw(event.epoch).elementsEqual(epoch) else {
                        throw EvdLineConnection.ConnectionError(description: "an event of another epoch: evd's journal changed")
                    }
                    self.lastTaken = event.seq
                    pending.append(event)
                    if event.seq > self.metrics.head.load(ordering: .relaxed) {
                        self.metrics.head.store(Int(event.seq), ordering: .relaxed)
                    }
                case .message(let message):
                    try self.notice(message)
                }
            }
        }

        /// A notice from evd: gaps are logged, `lagged` and `shutdown` end the session.
        private func notice(_ message: JSONObject) throws {
            guard message["type"] == "notice" else { return }
            switch message["code"]?.stringValue {
            case "gap":
                self.logger.error(
                    "evd no longer holds some events: they cannot be forwarded",
                    metadata: ["gap.from": "\(message["from"] ?? nil)", "gap.to": "\(message["to"] ?? nil)"]
                )
            case "lagged":
                self.logger.warning("evd reports this subscription lagged", metadata: ["notice": "\(JSONValue.object(message).jsonString)"])
            case "shutdown":
                throw EvdLineConnection.ConnectionError(description: "evd is shutting down")
            default:
                self.logger.debug("notice", metadata: ["notice": "\(JSONValue.object(message).jsonString)"])
            }
        }

        /// Encodes and sends `events` as one batch.
        private func send(_ events: ArraySlice<EventLine>, encoder: inout MessageEncoder) throws {
            var skipped = [Bool](repeating: false, count: events.count)
            let base = events.startIndex
            // Each message: its body, about 400 bytes of headers, and the HPUB line.
            let capacity = events.reduce(0) { $0 + $1.bodyCount + 600 }
            let replies = try self.nats.sendRequests(count: events.count, capacity: capacity, timeout: self.configuration.timeout) {
                index,
                replyTo,
                buffer in
                let event = events[base + index]
                switch encoder.encode(event, replyTo: replyTo, into: &buffer) {
                case .encoded:
                    return true
                case .tooLarge(let size):
                    skipped[index] = true
                    self.logger.error(
                        "event too large for the NATS server's max_payload: not forwarded",
                        metadata: ["seq": "\(event.seq)", "size": "\(size)", "max_payload": "\(self.nats.maxPayload)"]
                    )
                    self.metrics.publishErrors.add(1, ordering: .relaxed)
                    return false
                }
            }
            self.flights.append(Flight(replies: replies, seqs: events.map(\.seq), skipped: skipped))
            self.inFlight += events.count
            self.metrics.inFlight.store(self.inFlight, ordering: .relaxed)
        }

        /// Waits for the oldest batch's PubAcks; a refusal by the fence ends the forwarder, any other
        /// failure the session.
        private func completeOldest() async throws {
            let flight = self.flights.removeFirst()
            self.inFlight -= flight.seqs.count
            self.metrics.inFlight.store(self.inFlight, ordering: .relaxed)
            let replies = try await flight.replies.replies()
            var forwarded = 0
            var duplicates = 0
            defer {
                self.metrics.forwarded.add(forwarded, ordering: .relaxed)
                self.metrics.duplicates.add(duplicates, ordering: .relaxed)
                self.metrics.acknowledged.store(Int(self.acknowledged), ordering: .relaxed)
                if forwarded + duplicates > 0 { self.outcome.progressed = true }
            }
            for (index, reply) in replies.enumerated() {
                let seq = flight.seqs[index]
                if flight.skipped[index] {
                    self.acknowledged = seq
                    continue
                }
                do {
                    let message = try reply.get()
                    if message.status == 503 {
                        throw NATSError.noResponders(subject: "the stream \(self.configuration.stream)'s subjects")
                    }
                    let ack = try JetStream.parsePubAck(message.payload)
                    if ack.duplicate { duplicates += 1 } else { forwarded += 1 }
                    self.acknowledged = seq
                } catch let error as JetStream.APIError where error.errCode == 10070 || error.errCode == 10071 {
                    self.metrics.fenceConflicts.add(1, ordering: .relaxed)
                    throw ForwarderError.fenced(
                        "fenced: another forwarder published to \(self.configuration.stream) (\(error.errorDescription)); this one stops"
                    )
                } catch {
                    self.metrics.publishErrors.add(replies.count - index, ordering: .relaxed)
                    throw error
                }
            }
        }

        /// Acknowledges the cursor when 100 ms passed or 10,000 events were PubAck'ed since the last
        /// time; the response is not waited for (a failure is logged: the next ack repeats it).
        private func maybeAck(_ evd: EvdLineConnection, subscription: Int64) {
            guard self.acknowledged > self.ackSent else { return }
            let now = ContinuousClock.now
            guard self.acknowledged - self.ackSent >= self.configuration.ackEvents || now - self.ackTime >= self.configuration.ackInterval
            else { return }
            let seq = self.acknowledged
            let logger = self.logger
            evd.send(.ack(subscription: subscription, seq: seq)) { result in
                if case .failure(let error) = result {
                    logger.warning("evd did not take the cursor's ack", metadata: ["seq": "\(seq)", "error": "\(error)"])
                }
            }
            self.ackSent = seq
            self.ackTime = now
        }

        /// The last ack, waited for (bounded) while the events still arriving are read and dropped,
        /// so that the response is never stuck behind them. Sent even when the periodic one already
        /// named the same seq: that one's answer may not have come back yet (an ack at or below the
        /// position changes nothing).
        private func finalAck(_ evd: EvdLineConnection, subscription: Int64) async {
            guard self.acknowledged > 0 else { return }
            let seq = self.acknowledged
            let timeout = self.configuration.timeout
            let outcome: Result<JSONObject, any Error>? = await withTaskGroup(of: Result<JSONObject, any Error>?.self) { group in
                group.addTask {
                    do {
                        return .success(try await evd.request(.ack(subscription: subscription, seq: seq)))
                    } catch {
                        return .failure(error)
                    }
                }
                group.addTask {
                    while await evd.events.pop() != nil {}
                    return nil
                }
                group.addTask {
                    try? await Task.sleep(for: timeout)
                    return .failure(NATSError.timeout)
                }
                var outcome: Result<JSONObject, any Error>?
                while let next = await group.next() {
                    if let next {
                        outcome = next
                        break
                    }
                }
                group.cancelAll()
                return outcome
            }
            switch outcome {
            case .success?:
                self.ackSent = seq
                self.logger.info("acknowledged to evd", metadata: ["cursor": "\(self.configuration.cursor)", "seq": "\(seq)"])
            case .failure(let error)?:
                self.logger.warning("evd did not take the last ack", metadata: ["seq": "\(seq)", "error": "\(error)"])
            case nil:
                self.logger.warning("evd closed before the last ack", metadata: ["seq": "\(seq)"])
            }
        }

        /// Whether evd already has the cursor (`stats`' `cursors`); when `stats` cannot say (it
        /// needs `admin`), `true`: the cursor's own position is the safe choice (a new cursor then
        /// starts live).
        private func cursorExists(_ evd: EvdLineConnection) async throws -> Bool {
            guard let stats = try? await evd.request(.stats), let cursors = stats["cursors"]?.arrayValue else { return true }
            return cursors.contains { $0["name"]?.stringValue == self.configuration.cursor }
        }

        /// What a bounded wait on the event queue gave.
        enum Wait {
            case items([EvdLineConnection.Item])
            case timeout
            case finished
        }

        /// The next batch (and any queued behind it), or `.timeout` after `duration`.
        static func wait(for queue: AsyncQueue<[EvdLineConnection.Item]>, within duration: Duration) async -> Wait {
            await withTaskGroup(of: Wait.self) { group in
                group.addTask {
                    if let batch = await queue.pop() { return .items(batch) }
                    return Task.isCancelled ? .timeout : .finished
                }
                group.addTask {
                    try? await Task.sleep(for: duration)
                    return .timeout
                }
                var items: [EvdLineConnection.Item] = []
                var finished = false
                if let first = await group.next() {
                    group.cancelAll()
                    for result in [first] + (await group.reduce(into: []) { $0.append($1) }) {
                        switch result {
                        case .items(let batch): items += batch
                        case .finished: finished = true
                        case .timeout: break
                        }
                    }
                }
                if !items.isEmpty {
                    items += queue.popQueued(while: { _ in true }).flatMap { $0 }
                    return .items(items)
                }
                return finished ? .finished : .timeout
            }
        }
    }

    /// The progress log: every `progressInterval`, the forwarded count, the rate and the lag.
    private struct Progress {
        var lastTime = ContinuousClock.now
        var lastCount: Int

        /// Progress counted from `start` forwarded events.
        init(start: Int) {
            self.lastCount = start
        }

        /// Logs a `progress` line when `progressInterval` has passed since the last one.
        mutating func log(_ pump: Pump) {
            let now = ContinuousClock.now
            let elapsed = now - self.lastTime
            guard elapsed >= pump.configuration.progressInterval else { return }
            let count = pump.metrics.forwarded.load(ordering: .relaxed)
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            let rate = Int(Double(count - self.lastCount) / max(seconds, 0.001))
            pump.logger.info(
                "progress",
                metadata: [
                    "forwarded": "\(count)", "rate.per_s": "\(rate)", "lag.events": "\(pump.metrics.lag)",
                    "duplicates": "\(pump.metrics.duplicates.load(ordering: .relaxed))",
                ]
            )
            self.lastTime = now
            self.lastCount = count
        }
    }
}
