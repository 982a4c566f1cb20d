import EvdClient
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// evd's Prometheus metrics: the `stats` figures under Prometheus names, in a registry of the
/// daemon's own.
///
/// **Why a registry per daemon, not swift-metrics' global system.** Tests run many daemons in one
/// process, and `MetricsSystem.bootstrap` may be called once per process: a global registry would
/// mix their counters. So each `Daemon` owns a `PrometheusCollectorRegistry` (`evd`'s `@main`
/// passes one in and also bootstraps swift-metrics with it, so that anything reporting through
/// swift-metrics lands on the same endpoint).
///
/// **Why filled at scrape time.** The event path counts with atomics and the bus's lock it takes
/// anyway (PROTOCOL.md's hot paths); a swift-metrics or Prometheus call per event would add a lock
/// or a dictionary lookup to every event. So each scrape reads `stats` and sets the collectors
/// from it: counters are set to the daemon's totals (reset, then incremented by the total, under
/// `scrape` so that no two scrapes interleave). Only the veto latency histogram is recorded as it
/// happens, once per veto reply — a veto has already waited for its listener.
final class DaemonMetrics: Sendable {
    let registry: PrometheusCollectorRegistry
    /// How long veto listeners take to answer (`evd_veto_latency_seconds`).
    let vetoLatency: DurationHistogram
    /// Serializes the set-then-emit of concurrent scrapes.
    private let scrape = Mutex(ScrapeState())

    /// The families with a label set that can come and go (the journal's seqs when it is empty).
    private struct ScrapeState {
        var journalSeqGauges: [String: Gauge] = [:]
        /// Each durable cursor's position and lag gauges, by cursor name.
        var cursorGauges: [String: [Gauge]] = [:]
    }

    static let vetoLatencyBuckets: [Duration] = [
        .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1), .microseconds(2500),
        .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50), .milliseconds(100),
        .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500), .seconds(5), .seconds(10),
    ]

    init(registry: PrometheusCollectorRegistry) {
        self.registry = registry
        self.vetoLatency = registry.makeDurationHistogram(
            descriptor: Self.name("evd_veto_latency_seconds", "How long veto listeners took to answer (a timeout counts at its deadline)."),
            labels: [],
            buckets: Self.vetoLatencyBuckets
        )
    }

    /// Records one veto listener's answer time (`EventBus`'s `vetoLatency`).
    var observeVetoLatency: @Sendable (Duration) -> Void {
        { [vetoLatency] in vetoLatency.record($0) }
    }

    /// The Prometheus text format of the daemon's figures now.
    func render(_ core: DaemonCore) -> [UInt8] {
        let journal = core.journalFigures()
        let stats = core.statistics(journal: journal)
        return self.scrape.withLock { state in
            self.update(from: stats, journal: journal, &state)
            return self.registry.emitToBuffer()
        }
    }

    /// Sets every collector from a `stats` result.
    private func update(from stats: JSONValue, journal: Journal.Figures?, _ state: inout ScrapeState) {
        func int(_ value: JSONValue?) -> Int64 { value?.intValue ?? 0 }
        self.gauge("evd_seq", "The newest seq handed out.", to: int(stats["seq"]))
        for (name, count) in stats["events"]?.objectValue ?? [:] {
            self.counter(
                "evd_events_published_total",
                [("event", name)],
                "Events published since start, by name.",
                to: int(count)
            )
        }
        self.counter("evd_deliveries_total", "Event copies queued to subscribers.", to: int(stats["deliveries"]))
        self.counter("evd_drops_total", "Event copies discarded by an overflow policy.", to: int(stats["drops"]))
        self.counter(
            "evd_lagged_disconnects_total",
            "Subscribers disconnected for lagging (overflow: disconnect).",
            to: int(stats["lagged_disconnects"])
        )
        self.gauge("evd_subscriptions", "Live subscriptions (veto listeners included).", to: int(stats["subscriptions"]))
        self.gauge("evd_sessions", "Connected client sessions.", to: int(stats["sessions"]?["current"]))
        self.counter("evd_sessions_accepted_total", "Client sessions accepted since start.", to: int(stats["sessions"]?["total"]))
        self.counter("evd_requests_total", "Requests answered since start.", to: int(stats["requests"]))

        let vetoes = stats["vetoes"]
        self.counter("evd_vetoes_asked_total", "Veto listeners asked to decide.", to: int(vetoes?["asked"]))
        for (outcome, key) in [
            ("allowed", "allowed"), ("denied", "denied"), ("modified", "modified"), ("timed_out", "timed_out"),
            ("invalid_reply", "invalid_replies"),
        ] {
            self.counter(
                "evd_vetoes_total",
                [("outcome", outcome)],
                "Veto listeners' decisions, by outcome.",
                to: int(vetoes?[key])
            )
        }
        self.counter(
            "evd_veto_dry_run_denials_total",
            "Denials by dry-run listeners (recorded, not enforced).",
            to: int(vetoes?["dry_run_denied"])
        )
        for (reason, key) in [("outbox_full", "skipped_outbox_full"), ("tripped", "skipped_tripped")] {
            self.counter(
                "evd_vetoes_skipped_total",
                [("reason", reason)],
                "Vetoes decided by on_timeout at once, without waiting: the listener's output was at its bound, or the listener was tripped.",
                to: int(vetoes?[key])
            )
        }
        self.gauge("evd_veto_listeners", "Live veto listeners.", to: int(stats["veto_listeners"]))
        self.gauge(
            "evd_veto_listeners_tripped",
            "Veto listeners tripped by consecutive timeouts (not waited for until they reply).",
            to: int(stats["veto_listeners_tripped"])
        )
        self.gauge("evd_vetoes_pending", "Vetoes waiting for a listener's reply.", to: int(stats["vetoes_pending"]))

        for (database, pool) in stats["pools"]?.objectValue ?? [:] {
            let labels = [("database", database)]
            self.gauge("evd_pool_size", labels, "Connections a database's pool may open.", to: int(pool["size"]))
            for state in ["in_use", "idle"] {
                self.gauge(
                    "evd_pool_connections",
                    labels + [("state", state)],
                    "Open pooled connections, in use or idle.",
                    to: int(pool[state])
                )
            }
            self.gauge("evd_pool_waiting", labels, "Requests waiting for a pooled connection now.", to: int(pool["waiting"]))
            self.counter("evd_pool_waits_total", labels, "Checkouts that had to wait for a connection.", to: int(pool["waits"]))
            self.counter("evd_pool_checkouts_total", labels, "Connections checked out of the pool.", to: int(pool["checkouts"]))
            self.counter("evd_commit_groups_total", labels, "Commit groups run (one COMMIT each).", to: int(pool["commit_groups"]))
            self.counter(
                "evd_grouped_requests_total",
                labels,
                "Requests committed in a commit group.",
                to: int(pool["grouped_requests"])
            )
            self.gauge(
                "evd_database_lost",
                labels,
                "1 once the database's file was deleted or replaced while evd had it open: evd no longer serves it.",
                to: pool["lost"]?.boolValue == true ? 1 : 0
            )
        }

        self.gauge("evd_journal_events", "Committed events the journal holds for replay.", to: Int64(journal?.events ?? 0))
        self.gauge("evd_journal_bytes", "Bytes the journal takes on disk.", to: Int64(journal?.bytes ?? 0))
        self.counter(
            "evd_journal_damaged_rows_total",
            "Journal rows that failed their checksum when a replay read them (not sent: notice gap).",
            to: Int64(journal?.damagedRows ?? 0)
        )
        // The lowest and highest seq held exist only while the journal holds something.
        for (name, help, value) in [
            ("evd_journal_first_seq", "The lowest seq the journal holds.", journal?.firstSeq),
            ("evd_journal_last_seq", "The highest seq the journal holds.", journal?.lastSeq),
        ] {
            if let value {
                let gauge = state.journalSeqGauges[name] ?? self.registry.makeGauge(descriptor: Self.name(name, help))
                state.journalSeqGauges[name] = gauge
                gauge.set(to: Double(value))
            } else if let gauge = state.journalSeqGauges.removeValue(forKey: name) {
                self.registry.unregisterGauge(gauge)
            }
        }
        self.updateCursors(stats["cursors"]?.arrayValue ?? [], &state)
    }

    /// Each durable cursor's position and lag, labelled with its name; a deleted cursor's go.
    private func updateCursors(_ cursors: [JSONValue], _ state: inout ScrapeState) {
        self.gauge("evd_cursors", "Durable cursors evd keeps.", to: Int64(cursors.count))
        var seen: Set<String> = []
        for cursor in cursors {
            guard let name = cursor["name"]?.stringValue else { continue }
            seen.insert(name)
            let gauges =
                state.cursorGauges[name] ?? [
                    self.registry.makeGauge(
                        descriptor: Self.name("evd_cursor_position", "The last seq a durable cursor acknowledged."),
                        labels: [("cursor", name)]
                    ),
                    self.registry.makeGauge(
                        descriptor: Self.name("evd_cursor_lag_events", "How many seqs the head is past a durable cursor's position."),
                        labels: [("cursor", name)]
                    ),
                ]
            state.cursorGauges[name] = gauges
            gauges[0].set(to: Double(cursor["position"]?.intValue ?? 0))
            gauges[1].set(to: Double(cursor["lag"]?.intValue ?? 0))
        }
        for (name, gauges) in state.cursorGauges where !seen.contains(name) {
            for gauge in gauges { self.registry.unregisterGauge(gauge) }
            state.cursorGauges[name] = nil
        }
    }

    private func counter(_ name: String, _ help: String, to value: Int64) {
        self.counter(name, [], help, to: value)
    }

    private func gauge(_ name: String, _ help: String, to value: Int64) {
        self.gauge(name, [], help, to: value)
    }

    private func counter(_ name: String, _ labels: [(String, String)], _ help: String, to value: Int64) {
        let counter = self.registry.makeCounter(descriptor: Self.name(name, help), labels: labels)
        counter.reset()
        counter.increment(by: max(0, value))
    }

    private func gauge(_ name: String, _ labels: [(String, String)], _ help: String, to value: Int64) {
        self.registry.makeGauge(descriptor: Self.name(name, help), labels: labels).set(to: Double(value))
    }

    /// A whole metric name (its unit suffix included) and its help.
    private static func name(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }
}

/// The Prometheus endpoint (`--metrics-socket`, `--metrics-listen`): `GET /metrics` over a
/// minimal HTTP/1.1 (keep-alive, pipelining), 404 for any other path.
///
/// Every listener starts with the daemon (a failure to bind stops the start) and stops when the
/// task serving it is cancelled, which the daemon does once its sessions are drained. The Unix
/// socket it created is removed then; a stale one found at start is replaced (as the main socket's).
///
/// Anyone who can connect may scrape, without a token, so what a peer can make it hold or do is
/// bounded (`MetricsConnectionGuard`): `maxConnections` at once; a connection that has not sent a
/// whole request within `requestTimeoutMs` (from its start, or from the end of the previous
/// answer) is answered 408 and closed, so that silent or trickling peers cannot keep the slots; and
/// at most `maxPipelinedRequests` requests may wait for their answers on one connection (more are
/// answered 429 and the connection closed). A scrape itself reads counters only: the journal's
/// figures are kept up to date as events are journaled (`Journal.RunningFigures`), never counted.
final class MetricsEndpoint: Sendable {
    typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>

    /// One listening socket.
    struct Listener: Sendable {
        let server: NIOAsyncChannel<Connection, Never>
        /// The socket file to remove at exit (nil: TCP).
        let createdPath: String?
        /// Where it listens, for the log.
        let address: String
    }

    /// Connections served at once, in all; more are closed at once.
    static let maxConnections = 64
    /// Requests one connection may have sent ahead of their answers (Prometheus sends one at a time).
    static let maxPipelinedRequests = 4

    let listeners: [Listener]
    private let connections = Atomic<Int>(0)
    private let closed = Atomic<Bool>(false)

    private init(listeners: [Listener]) {
        self.listeners = listeners
    }

    /// Binds what `configuration.metrics` names; nil when it names nothing.
    static func bind(
        _ configuration: EvdConfiguration,
        group: any EventLoopGroup,
        logger: Logger
    ) async throws -> MetricsEndpoint? {
        let settings = configuration.metrics
        guard settings.isEnabled else { return nil }
        var listeners: [Listener] = []
        do {
            if let path = settings.socketPath {
                guard path != configuration.socketPath || configuration.listenFD != nil else {
                    throw Daemon.StartupError(description: "the metrics socket cannot be evd's own socket (\(path))")
                }
                try Daemon.checkDirectory(
                    SocketDirectory.parent(of: path),
                    rule: .daemonOwned,
                    what: "metrics socket's directory",
                    missingIsFine: true
                )
                try Daemon.removeStaleSocket(at: path)
                let server = try await Daemon.bindSocketFile(at: path, mode: configuration.socketMode) { staging in
                    try await Self.bootstrap(group, logger: logger).bind(unixDomainSocketPath: staging) { Self.initialize($0, settings) }
                } close: {
                    try? await $0.channel.close()
                }
                listeners.append(Listener(server: server, createdPath: path, address: path))
            }
            if let address = settings.listen {
                let server = try await Self.bootstrap(group, logger: logger)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .bind(host: address.host, port: address.port) { Self.initialize($0, settings) }
                let bound = server.channel.localAddress.map(Self.describe) ?? address.description
                listeners.append(Listener(server: server, createdPath: nil, address: bound))
            }
        } catch {
            MetricsEndpoint(listeners: listeners).close()
            if let error = error as? Daemon.StartupError { throw error }
            let place = [settings.socketPath, settings.listen?.description].compactMap { $0 }.joined(separator: " and ")
            throw Daemon.StartupError(description: "cannot serve metrics on \(place): \(error)")
        }
        for listener in listeners {
            logger.info("metrics endpoint is listening", metadata: ["metrics.address": "\(listener.address)"])
        }
        return MetricsEndpoint(listeners: listeners)
    }

    /// At the file-descriptor limit a listener pauses accepting for a second at a time instead of
    /// spinning (`AcceptPause`).
    private static func bootstrap(_ group: any EventLoopGroup, logger: Logger) -> ServerBootstrap {
        ServerBootstrap(group: group).serverChannelOption(.backlog, value: 16)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(AcceptPause(logger: logger).makeHandler())
                }
            }
    }

    private static func initialize(_ channel: any Channel, _ settings: MetricsSettings) -> EventLoopFuture<Connection> {
        channel.eventLoop.makeCompletedFuture {
            let pipeline = channel.pipeline.syncOperations
            try pipeline.configureHTTPServerPipeline(withErrorHandling: true)
            // Between the request decoder and the pipelining handler: it sees every request as
            // it is decoded (the pipelining handler holds back all but the one being answered).
            let guardHandler = MetricsConnectionGuard(
                requestTimeout: .milliseconds(Int64(settings.requestTimeoutMs)),
                maxPipelined: Self.maxPipelinedRequests
            )
            try pipeline.addHandler(guardHandler, position: .before(try pipeline.handler(type: HTTPServerPipelineHandler.self)))
            return try Connection(wrappingChannelSynchronously: channel)
        }
    }

    /// `127.0.0.1:9187`, `[::1]:9187`.
    private static func describe(_ address: SocketAddress) -> String {
        guard let ip = address.ipAddress, let port = address.port else { return "\(address)" }
        return HostPort(host: ip, port: port).description
    }

    /// Serves every listener until the calling task is cancelled, then closes them all.
    func serve(_ metrics: DaemonMetrics, core: DaemonCore, logger: Logger) async {
        await withTaskCancellationHandler {
            await withDiscardingTaskGroup { group in
                for listener in self.listeners {
                    group.addTask { await self.accept(on: listener, metrics, core: core, logger: logger) }
                }
            }
        } onCancel: {
            self.close()
        }
        self.close()
    }

    /// Closes the listening sockets (not the connections: their tasks end with the serving task)
    /// and removes the socket file. Safe to call more than once.
    func close() {
        guard !self.closed.exchange(true, ordering: .relaxed) else { return }
        for listener in self.listeners {
            listener.server.channel.close(promise: nil)
            if let path = listener.createdPath { unlink(path) }
        }
    }

    private func accept(on listener: Listener, _ metrics: DaemonMetrics, core: DaemonCore, logger: Logger) async {
        do {
            try await withThrowingDiscardingTaskGroup { group in
                try await listener.server.executeThenClose { inbound in
                    for try await connection in inbound {
                        guard self.connections.add(1, ordering: .relaxed).newValue <= Self.maxConnections else {
                            self.connections.subtract(1, ordering: .relaxed)
                            try? await connection.channel.close()
                            continue
                        }
                        group.addTask {
                            defer { self.connections.subtract(1, ordering: .relaxed) }
                            await Self.serve(connection, metrics, core: core, logger: logger)
                        }
                    }
                }
            }
        } catch {
            // Closing the listener at shutdown ends `inbound` without an error; this is another failure.
            if !self.closed.load(ordering: .relaxed) {
                logger.error(
                    "accepting metrics connections failed",
                    metadata: ["error": "\(error)", "metrics.address": "\(listener.address)"]
                )
            }
        }
    }

    /// Answers one connection's requests in order until it closes, idles out or the task is cancelled.
    private static func serve(_ connection: Connection, _ metrics: DaemonMetrics, core: DaemonCore, logger: Logger) async {
        let channel = connection.channel
        do {
            try await withTaskCancellationHandler {
                try await connection.executeThenClose { inbound, outbound in
                    var request: HTTPRequestHead?
                    for try await part in inbound {
                        switch part {
                        case .head(let head):
                            request = head
                        case .body:
                            break  // a request body means nothing here: dropped, never kept
                        case .end:
                            guard let head = request else { continue }
                            request = nil
                            try await Self.respond(to: head, outbound, channel, metrics, core: core)
                            if !head.isKeepAlive { return }
                        }
                    }
                }
            } onCancel: {
                channel.close(promise: nil)
            }
        } catch {
            logger.debug("a metrics connection failed", metadata: ["error": "\(error)"])
        }
    }

    private static func respond(
        to head: HTTPRequestHead,
        _ outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>,
        _ channel: any Channel,
        _ metrics: DaemonMetrics,
        core: DaemonCore
    ) async throws {
        let path = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        var headers = HTTPHeaders()
        let status: HTTPResponseStatus
        var body: [UInt8]
        if path != "/metrics" {
            status = .notFound
            body = Array("not found: evd serves GET /metrics\n".utf8)
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        } else if head.method != .GET && head.method != .HEAD {
            status = .methodNotAllowed
            body = Array("method not allowed: use GET\n".utf8)
            headers.add(name: "Allow", value: "GET, HEAD")
            headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        } else {
            status = .ok
            body = metrics.render(core)
            headers.add(name: "Content-Type", value: "text/plain; version=0.0.4; charset=utf-8")
        }
        headers.add(name: "Content-Length", value: "\(body.count)")
        if !head.isKeepAlive { headers.add(name: "Connection", value: "close") }
        if head.method == .HEAD { body = [] }
        try await outbound.write(.head(HTTPResponseHead(version: head.version, status: status, headers: headers)))
        if !body.isEmpty { try await outbound.write(.body(.byteBuffer(ByteBuffer(bytes: body)))) }
        // The end goes through the channel, awaited until it is written: the writer's `write`
        // returns once a part is in the pipeline, and closing then (`Connection: close`) would cut
        // off what the socket had not taken yet. The pipeline keeps the parts in order.
        try await channel.writeAndFlush(HTTPServerResponsePart.end(nil))
    }
}

/// Bounds what one metrics connection may hold: the time it takes to send a whole request, and
/// the requests it sends ahead of their answers.
///
/// It sits between the HTTP request decoder and `HTTPServerPipelineHandler`, so it sees requests as
/// they are decoded (a read may hold many) and the answers as they leave.
/// - **Request timeout.** Whenever no whole request is waiting for its answer (from the start, and
///   after each answer), a timer runs; a request's end stops it. When it fires, the peer has sent
///   nothing, or only part of a request (a byte at a time keeps no idle timer from firing), for the
///   whole `requestTimeout`: it gets `408 Request Timeout` and is closed.
/// - **Pipelining.** A request that would be the `maxPipelined + 1`th sent ahead of its answer is
///   not passed on, nor is anything after it: once the requests already passed on are answered,
///   the peer gets `429 Too Many Requests` and is closed. Each request costs a render; this keeps
///   one write of many requests from making evd render them all.
final class MetricsConnectionGuard: ChannelDuplexHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let requestTimeout: TimeAmount
    private let maxPipelined: Int
    /// Requests passed on, whole requests passed on, and answers (their ends) written.
    private var passed = 0
    private var complete = 0
    private var answered = 0
    /// Over the pipelining bound: nothing more is passed on, and the connection ends after the
    /// answers it owes.
    private var refusing = false
    /// The connection is being answered with an error and closed.
    private var closing = false
    private var timer: Scheduled<Void>?

    init(requestTimeout: TimeAmount, maxPipelined: Int) {
        self.requestTimeout = requestTimeout
        self.maxPipelined = maxPipelined
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { self.startTimer(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        if self.timer == nil { self.startTimer(context) }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.stopTimer()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.stopTimer()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.refusing && !self.closing else { return }  // dropped: never answered
        switch self.unwrapInboundIn(data) {
        case .head:
            if self.passed - self.answered >= self.maxPipelined {
                self.refusing = true
                if self.answered == self.complete && self.passed == self.complete {
                    self.refuse(context, .tooManyRequests, Self.pipeliningMessage(self.maxPipelined))
                }
                return
            }
            self.passed += 1
        case .body:
            break
        case .end:
            self.complete += 1
            self.stopTimer()
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard case .end = self.unwrapOutboundIn(data) else {
            context.write(data, promise: promise)
            return
        }
        self.answered += 1
        context.write(data, promise: promise)
        if self.refusing && self.answered == self.passed {
            self.refuse(context, .tooManyRequests, Self.pipeliningMessage(self.maxPipelined))
        } else if self.answered == self.complete && !self.closing {
            self.startTimer(context)
        }
    }

    static func pipeliningMessage(_ max: Int) -> String {
        "too many pipelined requests: evd's metrics endpoint answers at most \(max) requests sent ahead of their answers on one connection, and closes it\n"
    }

    static func timeoutMessage(_ timeout: TimeAmount) -> String {
        "request timeout: evd's metrics endpoint closes a connection that has not sent a whole request within \(timeout.nanoseconds / 1_000_000) ms (--metrics-request-timeout-ms)\n"
    }

    private func startTimer(_ context: ChannelHandlerContext) {
        self.stopTimer()
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        self.timer = context.eventLoop.scheduleTask(in: self.requestTimeout) {
            let guardHandler = handler.value
            guardHandler.timer = nil
            // A whole request is being answered: the timer restarts after its answer.
            guard guardHandler.answered == guardHandler.complete, !guardHandler.closing else { return }
            guardHandler.refuse(bound.value, .requestTimeout, Self.timeoutMessage(guardHandler.requestTimeout))
        }
    }

    private func stopTimer() {
        self.timer?.cancel()
        self.timer = nil
    }

    /// Answers `status` with `message` (no answer is in progress) and closes the connection once
    /// it is written.
    private func refuse(_ context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ message: String) {
        guard !self.closing else { return }
        self.closing = true
        self.stopTimer()
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        headers.add(name: "Content-Length", value: "\(message.utf8.count)")
        headers.add(name: "Connection", value: "close")
        context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: message)))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(self.wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }
}
