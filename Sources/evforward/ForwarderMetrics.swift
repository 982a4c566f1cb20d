import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// The forwarder's counters and gauges, read by the progress log and the metrics endpoint.
final class ForwarderMetrics: Sendable {
    /// Events stored by JetStream (PubAck without `duplicate`).
    let forwarded = Atomic<Int>(0)
    /// PubAcks with `duplicate: true`: an event the stream already held (a retry).
    let duplicates = Atomic<Int>(0)
    /// Publishes that failed (refused, timed out, lost with the connection), and events too large.
    let publishErrors = Atomic<Int>(0)
    /// Publishes refused by the fence (another writer), and subscribes refused with `cursor_in_use`.
    let fenceConflicts = Atomic<Int>(0)
    /// Messages sent and not yet acknowledged.
    let inFlight = Atomic<Int>(0)
    /// The newest seq evd is known to have (the subscribe response's head, or a later event).
    let head = Atomic<Int>(0)
    /// The highest seq up to which every event is PubAck'ed.
    let acknowledged = Atomic<Int>(0)

    /// evd's head minus the last PubAck'ed seq (0 before the first subscription).
    var lag: Int { max(0, self.head.load(ordering: .relaxed) - self.acknowledged.load(ordering: .relaxed)) }

    /// The Prometheus text exposition of every metric.
    func exposition() -> String {
        func metric(_ name: String, _ type: String, _ help: String, _ value: Int) -> String {
            "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n\(name) \(value)\n"
        }
        return metric("evd_forward_forwarded_total", "counter", "Events stored in the stream.", self.forwarded.load(ordering: .relaxed))
            + metric("evd_forward_lag_events", "gauge", "evd's head seq minus the last PubAck'ed seq.", self.lag)
            + metric(
                "evd_forward_publish_errors_total",
                "counter",
                "Publishes that failed or events too large to publish.",
                self.publishErrors.load(ordering: .relaxed)
            )
            + metric(
                "evd_forward_duplicates_total",
                "counter",
                "PubAcks saying the stream already held the event.",
                self.duplicates.load(ordering: .relaxed)
            )
            + metric(
                "evd_forward_fence_conflicts_total",
                "counter",
                "Publishes or subscribes refused because another forwarder is at work.",
                self.fenceConflicts.load(ordering: .relaxed)
            )
            + metric("evd_forward_in_flight", "gauge", "Messages sent and not yet acknowledged.", self.inFlight.load(ordering: .relaxed))
    }
}

/// A minimal HTTP/1.1 endpoint: `GET /metrics` answers the Prometheus text, anything else 404; one
/// request per connection (`Connection: close`). Nothing it serves is secret, and it only reads
/// atomics, so it needs no more bounds than a short backlog.
final class MetricsServer: Sendable {
    private let channel: any Channel

    private init(channel: any Channel) {
        self.channel = channel
    }

    /// The address the server is bound to (the port chosen when 0 was asked for).
    var localAddress: SocketAddress? { self.channel.localAddress }

    /// Binds `host:port` and serves `metrics` there until `close()`.
    static func bind(host: String, port: Int, metrics: ForwarderMetrics) async throws -> MetricsServer {
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 16)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(metrics: metrics))
                }
            }
            .bind(host: host, port: port)
            .get()
        return MetricsServer(channel: channel)
    }

    /// Stops listening.
    func close() async {
        try? await self.channel.close()
    }
}

/// Answers one request with the metrics (or 404) and closes the connection.
private final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let metrics: ForwarderMetrics
    private var path: String?

    init(metrics: ForwarderMetrics) {
        self.metrics = metrics
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head):
            self.path = head.method == .GET ? String(head.uri.split(separator: "?").first ?? "") : nil
        case .body:
            break
        case .end:
            let found = self.path == "/metrics"
            let body = found ? self.metrics.exposition() : "not found\n"
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: found ? "text/plain; version=0.0.4; charset=utf-8" : "text/plain")
            headers.add(name: "Content-Length", value: String(body.utf8.count))
            headers.add(name: "Connection", value: "close")
            let head = HTTPResponseHead(version: .http1_1, status: found ? .ok : .notFound, headers: headers)
            context.write(Self.wrapOutboundOut(.head(head)), promise: nil)
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            let channel = context.channel
            context.writeAndFlush(Self.wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        }
    }
}
