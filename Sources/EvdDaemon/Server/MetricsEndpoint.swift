#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import EvdClient
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import Synchronization

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
            labels: [], buckets: Self.vetoLatencyBuckets)
    }

    /// Records one veto listener's answer time (`EventBus`'s `vetoLatency`).
    var observeVetoLatency: @Sendable (Duration) -> Void {
        { [vetoLatency] in vetoLatency.record($0) }
    }

    /// The Prometheus text format of the daemon's figures now.
    func render(_ core: DaemonCore) async -> [UInt8] {
        let journal = await core.measureJournal()
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
                "evd_events_published_total", [("event", name)], "Events published since start, by name.", to: int(count))
        }
        self.counter("evd_deliveries_total", "Event copies queued to subscribers.", to: int(stats["deliveries"]))
        self.counter("evd_drops_total", "Event copies discarded by an overflow policy.", to: int(stats["drops"]))
        self.counter(
            "evd_lagged_disconnects_total", "Subscribers disconnected for lagging (overflow: disconnect).",
            to: int(stats["lagged_disconnects"]))
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
                "evd_vetoes_total", [("outcome", outcome)], "Veto listeners' decisions, by outcome.", to: int(vetoes?[key]))
        }
        self.counter(
            "evd_veto_dry_run_denials_total", "Denials by dry-run listeners (recorded, not enforced).",
            to: int(vetoes?["dry_run_denied"]))
        self.gauge("evd_veto_listeners", "Live veto listeners.", to: int(stats["veto_listeners"]))
        self.gauge("evd_vetoes_pending", "Vetoes waiting for a listener's reply.", to: int(stats["vetoes_pending"]))

        for (database, pool) in stats["pools"]?.objectValue ?? [:] {
            let labels = [("database", database)]
            self.gauge("evd_pool_size", labels, "Connections a database's pool may open.", to: int(pool["size"]))
            for state in ["in_use", "idle"] {
                self.gauge(
                    "evd_pool_connections", labels + [("state", state)], "Open pooled connections, in use or idle.",
                    to: int(pool[state]))
            }
            self.gauge("evd_pool_waiting", labels, "Requests waiting for a pooled connection now.", to: int(pool["waiting"]))
            self.counter("evd_pool_waits_total", labels, "Checkouts that had to wait for a connection.", to: int(pool["waits"]))
            self.counter("evd_pool_checkouts_total", labels, "Connections checked out of the pool.", to: int(pool["checkouts"]))
        }

        self.gauge("evd_journal_events", "Committed events the journal holds for replay.", to: Int64(journal?.events ?? 0))
        self.gauge("evd_journal_bytes", "Bytes the journal takes on disk.", to: Int64(journal?.bytes ?? 0))
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
    /// A connection that sends nothing for this long is closed.
    static let idleTimeout: TimeAmount = .seconds(60)

    let listeners: [Listener]
    private let connections = Atomic<Int>(0)
    private let closed = Atomic<Bool>(false)

    private init(listeners: [Listener]) {
        self.listeners = listeners
    }

    /// Binds what `configuration.metrics` names; nil when it names nothing.
    static func bind(
        _ configuration: EvdConfiguration, group: any EventLoopGroup, logger: Logger
    ) async throws -> MetricsEndpoint? {
        let settings = configuration.metrics
        guard settings.isEnabled else { return nil }
        var listeners: [Listener] = []
        do {
            if let path = settings.socketPath {
                guard path != configuration.socketPath || configuration.listenFD != nil else {
                    throw Daemon.StartupError(description: "the metrics socket cannot be evd's own socket (\(path))")
                }
                try Daemon.removeStaleSocket(at: path)
                let server = try await Self.bootstrap(group).bind(unixDomainSocketPath: path) { Self.initialize($0) }
                listeners.append(Listener(server: server, createdPath: path, address: path))
                if chmod(path, configuration.socketMode) != 0 {
                    throw Daemon.StartupError(
                        description: "cannot set the mode of the metrics socket \(path): \(String(cString: strerror(errno)))")
                }
            }
            if let address = settings.listen {
                let server = try await Self.bootstrap(group)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .bind(host: address.host, port: address.port) { Self.initialize($0) }
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

    private static func bootstrap(_ group: any EventLoopGroup) -> ServerBootstrap {
        ServerBootstrap(group: group).serverChannelOption(.backlog, value: 16)
    }

    private static func initialize(_ channel: any Channel) -> EventLoopFuture<Connection> {
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: Self.idleTimeout))
            try channel.pipeline.syncOperations.addHandler(CloseWhenIdle())
            try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
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
                    metadata: ["error": "\(error)", "metrics.address": "\(listener.address)"])
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
        to head: HTTPRequestHead, _ outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>,
        _ channel: any Channel, _ metrics: DaemonMetrics, core: DaemonCore
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
            body = await metrics.render(core)
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

/// Closes a connection when `IdleStateHandler` says it has sent nothing for a while.
private final class CloseWhenIdle: ChannelInboundHandler, Sendable {
    typealias InboundIn = NIOAny

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }
}
