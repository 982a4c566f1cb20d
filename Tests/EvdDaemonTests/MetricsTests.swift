import EvdCLI
import EvdClient
import Foundation
import InMemoryLogging
import Logging
import NIOCore
import NIOPosix
import Testing

@testable import EvdDaemon

/// `stats` complete, the Prometheus endpoint (`--metrics-socket`, `--metrics-listen`) read by
/// Prometheus' own Python parser, and `evctl stats` for people and for scripts.
@Suite("Metrics")
struct MetricsTests {
    // MARK: stats

    @Test("stats has every documented key, with figures that fit what happened")
    func statsComplete() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "CREATE TABLE dogs (id INTEGER PRIMARY KEY, name TEXT)")))
            let stats = try await Self.insertDogs(daemon, ["Rex", "Fido", "Bo"])

            #expect(stats["events"]?["insert-rows"] == 3)
            let seq = try #require(stats["seq"]?.intValue)
            #expect((stats["deliveries"]?.intValue ?? 0) >= 3)
            #expect(stats["drops"] == 0)
            #expect(stats["lagged_disconnects"] == 0)
            #expect((stats["subscriptions"]?.intValue ?? 0) >= 2)  // the subscriber and the veto listener
            #expect((stats["sessions"]?["current"]?.intValue ?? 0) >= 3)
            #expect((stats["sessions"]?["total"]?.intValue ?? 0) >= 5)
            #expect((stats["requests"]?.intValue ?? 0) >= 5)

            let vetoes = try #require(stats["vetoes"])
            #expect(vetoes["asked"] == 3)
            #expect(vetoes["allowed"] == 3)
            for key in ["denied", "modified", "timed_out", "invalid_replies", "dry_run_denied"] {
                #expect(vetoes[key] == 0, "vetoes.\(key)")
            }
            let latency = try #require(vetoes["latency_us"])
            for key in ["p50", "p90", "p99", "max"] {
                #expect((latency[key]?.intValue ?? 0) > 0, "vetoes.latency_us.\(key)")
            }
            #expect((latency["p50"]?.intValue ?? 0) <= (latency["p99"]?.intValue ?? 0))
            #expect(stats["veto_listeners"] == 1)
            #expect(stats["vetoes_pending"] == 0)

            let pool = try #require(stats["pools"]?["main"])
            #expect(pool["size"] == 4)
            #expect(pool["in_use"] == 0)
            #expect((pool["open"]?.intValue ?? 0) >= 1)
            #expect(pool["idle"] == pool["open"])
            #expect(pool["waiting"] == 0)
            #expect(pool["waits"]?.intValue != nil)
            #expect((pool["checkouts"]?.intValue ?? 0) >= 4)

            let journal = try #require(stats["journal"])
            #expect(journal["enabled"] == true)
            #expect((journal["events"]?.intValue ?? 0) >= 4)  // create-table and three insert-rows
            #expect((journal["bytes"]?.intValue ?? 0) > 0)
            let first = try #require(journal["first_seq"]?.intValue)
            let last = try #require(journal["last_seq"]?.intValue)
            #expect(first >= 1 && first <= last && last <= seq)
            #expect(journal["floor"] == 0)
            let sources = try #require(journal["sources"]?.arrayValue)
            #expect(sources.map { $0["database"] } == [.null, "main"])
            #expect(sources.reduce(0) { $0 + ($1["events"]?.intValue ?? 0) } == journal["events"]?.intValue)
            #expect(sources.reduce(0) { $0 + ($1["bytes"]?.intValue ?? 0) } == journal["bytes"]?.intValue)
            #expect(sources[1]["path"] == .string(daemon.databasePath))
            // The database's committed events are in its own journal table.
            #expect((sources[1]["events"]?.intValue ?? 0) >= 4)

            // docs/protocol.md shows every key in its example and names each top-level one in its table.
            let documentation = try String(contentsOfFile: repositoryRoot + "/docs/protocol.md", encoding: .utf8)
            for key in Self.keys(of: .object(stats)) {
                #expect(documentation.contains("\"\(key)\":"), "stats key \(key) is not in docs/protocol.md's example")
            }
            for key in stats.keys {
                #expect(
                    documentation.contains("| `\(key)`") || documentation.contains("| `\(key).") || documentation.contains(", `\(key)` |"),
                    "stats key \(key) is not in docs/protocol.md's table"
                )
            }
        }
    }

    @Test("with --no-journal, stats says so")
    func statsWithoutJournal() async throws {
        try await withRunningDaemon(configure: { $0.journal.enabled = false }) { daemon in
            let stats = try await daemon.request("stats")
            let journal = try #require(stats["journal"])
            #expect(journal["enabled"] == false)
            #expect(journal["events"] == 0)
            #expect(journal["first_seq"] == .null)
        }
    }

    // MARK: The Prometheus endpoint

    @Test("GET /metrics on --metrics-socket parses with prometheus_client and counts what happened")
    func metricsOverUnixSocket() async throws {
        try await withTemporaryDirectory { directory in
            let metricsPath = directory + "/metrics.sock"
            // A stale socket file (nobody listens on it) is replaced.
            try Self.makeStaleSocket(at: metricsPath)
            try await withDaemon(in: directory, configure: { $0.metrics.socketPath = metricsPath }) { daemon, _ in
                try await daemon.request(.execute(.init(sql: "CREATE TABLE dogs (id INTEGER PRIMARY KEY, name TEXT)")))
                let stats = try await Self.insertDogs(daemon, ["Rex", "Fido"])
                let reply = try await httpRequest(.unix(metricsPath), "GET /metrics")
                #expect(reply.status == 200)
                #expect(reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8")
                let families = try await parseWithPrometheusClient(reply.body)

                #expect(families.value("evd_events_published_total", ["event": "insert-rows"]) == 2)
                #expect(families.type(of: "evd_events_published_total") == "counter")
                #expect(families.value("evd_vetoes_total", ["outcome": "allowed"]) == 2)
                #expect(families.value("evd_vetoes_total", ["outcome": "denied"]) == 0)
                #expect(families.value("evd_vetoes_asked_total") == 2)
                #expect(families.type(of: "evd_veto_latency_seconds") == "histogram")
                #expect(families.value("evd_veto_latency_seconds_count") == 2)
                #expect(families.value("evd_veto_latency_seconds_bucket", ["le": "+Inf"]) == 2)
                #expect((families.value("evd_veto_latency_seconds_sum") ?? 0) > 0)
                #expect(families.value("evd_pool_connections", ["database": "main", "state": "in_use"]) == 0)
                #expect((families.value("evd_pool_connections", ["database": "main", "state": "idle"]) ?? 0) >= 1)
                #expect(families.value("evd_pool_size", ["database": "main"]) == 4)
                #expect(families.value("evd_pool_waits_total", ["database": "main"]) != nil)
                #expect(families.value("evd_sessions") != nil)
                #expect(families.value("evd_subscriptions") != nil)
                #expect(families.value("evd_drops_total") == 0)
                #expect(families.value("evd_lagged_disconnects_total") == 0)
                #expect((families.value("evd_deliveries_total") ?? 0) >= 2)
                #expect((families.value("evd_journal_events") ?? 0) >= 3)
                #expect((families.value("evd_journal_bytes") ?? 0) > 0)
                #expect((families.value("evd_seq") ?? 0) >= Double(stats["seq"]?.intValue ?? 1))
                #expect(families.value("evd_journal_last_seq") != nil)

                // docs/configuration.md names every family served.
                let documentation = try String(contentsOfFile: repositoryRoot + "/docs/configuration.md", encoding: .utf8)
                for family in Set(families.samples.map(\.family)) {
                    #expect(documentation.contains("`\(family)"), "\(family) is not in docs/configuration.md")
                }

                // Counters are the daemon's totals at every scrape, never added up twice.
                let again = try await parseWithPrometheusClient(try await httpRequest(.unix(metricsPath), "GET /metrics").body)
                #expect(again.value("evd_events_published_total", ["event": "insert-rows"]) == 2)
                #expect(again.value("evd_vetoes_asked_total") == 2)

                let missing = try await httpRequest(.unix(metricsPath), "GET /nothing-here")
                #expect(missing.status == 404)
                let posted = try await httpRequest(.unix(metricsPath), "POST /metrics")
                #expect(posted.status == 405)
                let head = try await httpRequest(.unix(metricsPath), "HEAD /metrics")
                #expect(head.status == 200 && head.body.isEmpty)
            }
            // The socket the daemon made is gone with it.
            #expect(access(metricsPath, F_OK) != 0)
        }
    }

    @Test("--metrics-listen serves /metrics over TCP (port 0: the bound port is logged)")
    func metricsOverTCP() async throws {
        try await withTCPMetricsDaemon { daemon, _, address, port in
            #expect(address.hasPrefix("127.0.0.1:") && port > 0)

            try await daemon.request("emit", ["event": "test.metrics"])
            // A label value with what the text format must escape.
            let awkward = "test/\"quoted\"\\name"
            try await daemon.request("emit", ["event": .string(awkward)])
            try await daemon.request("emit", ["event": .string(awkward)])
            let reply = try await httpRequest(.tcp(host: "127.0.0.1", port: port), "GET /metrics")
            #expect(reply.status == 200)
            let families = try await parseWithPrometheusClient(reply.body)
            #expect(families.value("evd_events_published_total", ["event": "test.metrics"]) == 1)
            #expect(families.value("evd_events_published_total", ["event": awkward]) == 2)
            let missing = try await httpRequest(.tcp(host: "127.0.0.1", port: port), "GET /")
            #expect(missing.status == 404)

            // Keep-alive and pipelining: two requests in one write, two answers in order.
            let both = try await httpExchange(
                .tcp(host: "127.0.0.1", port: port),
                "GET /metrics HTTP/1.1\r\nHost: evd\r\n\r\nGET /other HTTP/1.1\r\nHost: evd\r\nConnection: close\r\n\r\n"
            )
            // (HTTP's lines end with \r\n, the metrics' own with \n.)
            let statusLines = both.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("HTTP/1.1 ") }
            #expect(statusLines == ["HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found"])
        }
    }

    @Test("a metrics socket where a live daemon answers stops the start")
    func metricsSocketInUse() async throws {
        try await withRunningDaemon { first in
            var configuration = EvdConfiguration(
                socketPath: first.directory + "/second.sock",
                databases: [DatabaseConfig(name: "main", path: first.directory + "/second.db")],
                stateDirectory: first.directory + "/second-state"
            )
            configuration.metrics.socketPath = first.socketPath  // the first daemon answers there
            let daemon = Daemon(configuration: configuration, logger: Logger(label: "t", factory: { _ in SwiftLogNoOpLogHandler() }))
            await #expect(throws: Daemon.StartupError.self) { try await daemon.run() }
            // The first daemon's socket is untouched.
            let pong = try await first.request("ping")
            #expect(pong == [:])
        }
    }

    // MARK: evctl stats

    @Test("evctl stats prints JSON into a pipe, sections with --human, and --json wins")
    func evctlStats() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "CREATE TABLE t (x)")))
            let piped = try await runProcess(binaryPath("evctl"), ["--socket", daemon.socketPath, "stats"])
            #expect(piped.status == 0, "\(piped.stderr)")
            let pipedObject = try JSONValue(parsing: piped.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
            #expect(pipedObject["events"]?["create-table"] == 1)

            let human = try await runProcess(binaryPath("evctl"), ["--socket", daemon.socketPath, "stats", "--human"])
            #expect(human.status == 0, "\(human.stderr)")
            for section in ["Sessions", "Events", "Delivery", "Vetoes", "Pools", "Journal"] {
                #expect(human.stdout.contains("\n\(section)\n") || human.stdout.hasPrefix("\(section)\n"), "\(section)")
            }
            #expect(human.stdout.contains("create-table"))
            #expect(human.stdout.contains("main"))
            #expect(human.stdout.contains("events held"))

            let raw = try await runProcess(binaryPath("evctl"), ["stats", "--json", "--human", "--socket", daemon.socketPath])
            #expect(raw.status == 0, "\(raw.stderr)")
            let object = try JSONValue(parsing: raw.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
            #expect(object["events"]?["create-table"] == 1)
            #expect(object["journal"]?["enabled"] == true)
            #expect(object["pools"]?["main"]?["size"] == 4)
        }
    }

    @Test("the readable stats keep keys they do not know, under Other")
    func formatterKeepsUnknownKeys() {
        let text = StatsFormatter.render(["seq": 5, "shiny_new_counter": 7, "journal": ["enabled": false]])
        #expect(text.contains("Other\n  shiny_new_counter: 7"))
        #expect(text.contains("off (--no-journal)"))
        #expect(StatsFormatter.bytes(1536) == "1.5 KiB")
        #expect(StatsFormatter.duration(micros: 2048) == "2 ms")
    }

    // MARK: Helpers

    /// Subscribes a plain subscriber to `insert-rows` and a veto listener (that allows) to
    /// `before_cursor_execute`, inserts one row per name with SQL, and returns `stats` once the
    /// subscriber has every insert-rows event.
    private static func insertDogs(_ daemon: RunningDaemon, _ names: [String]) async throws -> JSONObject {
        try await withVetoTestClient(daemon, ["events": ["insert-rows"]]) { subscriber in
            try await withVetoTestClient(daemon, ["veto": ["before_cursor_execute"]], decide: VetoAnswer.always(VetoAnswer.allow)) { _ in
                for name in names {
                    try await daemon.request("execute", ["sql": "INSERT INTO dogs (name) VALUES (?)", "params": [.string(name)]])
                }
                try await subscriber.waitUntil("every insert-rows") {
                    $0.filter { $0["event"] == "insert-rows" }.count == names.count
                }
                return try await daemon.request("stats")
            }
        }
    }

    /// Every key of `value` at any depth, except the names under `events` and `pools` (event and
    /// database names).
    private static func keys(of value: JSONValue) -> Set<String> {
        switch value {
        case .object(let object):
            var keys = Set(object.keys)
            for (key, child) in object {
                if key == "events" { continue }
                if key == "pools" {
                    for pool in (child.objectValue ?? [:]).values { keys.formUnion(Self.keys(of: pool)) }
                    continue
                }
                keys.formUnion(Self.keys(of: child))
            }
            return keys
        case .array(let items):
            return items.reduce(into: Set<String>()) { $0.formUnion(Self.keys(of: $1)) }
        default:
            return []
        }
    }

    /// Leaves a socket file at `path` that nobody listens on (as a daemon killed with -9 does).
    private static func makeStaleSocket(at path: String) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8) + [0])
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(bound == 0)
    }
}

// MARK: HTTP and the Python parser

/// Where an HTTP request goes.
enum HTTPTarget {
    case unix(String)
    case tcp(host: String, port: Int)
}

/// A parsed HTTP response.
struct HTTPReply {
    let status: Int
    /// Header names in lower case.
    let headers: [String: String]
    let body: String
}

/// Sends `requestLine` (`GET /metrics`) as one HTTP/1.1 request with `Connection: close` and
/// reads the response.
func httpRequest(_ target: HTTPTarget, _ requestLine: String) async throws -> HTTPReply {
    let raw = try await httpExchange(target, requestLine + " HTTP/1.1\r\nHost: evd\r\nConnection: close\r\n\r\n")
    guard let split = raw.range(of: "\r\n\r\n") else {
        Issue.record("no complete HTTP response: \(raw)")
        return HTTPReply(status: 0, headers: [:], body: "")
    }
    let lines = raw[..<split.lowerBound].split(separator: "\r\n")
    let status = lines.first.flatMap { Int($0.split(separator: " ")[1]) } ?? 0
    var headers: [String: String] = [:]
    for line in lines.dropFirst() {
        guard let colon = line.firstIndex(of: ":") else { continue }
        headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
    return HTTPReply(status: status, headers: headers, body: String(raw[split.upperBound...]))
}

/// Writes `request` on a fresh connection and returns everything read until the server closes it.
func httpExchange(_ target: HTTPTarget, _ request: String) async throws -> String {
    let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
    let wrap: @Sendable (any Channel) -> EventLoopFuture<NIOAsyncChannel<ByteBuffer, ByteBuffer>> = { channel in
        channel.eventLoop.makeCompletedFuture { try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel) }
    }
    let channel: NIOAsyncChannel<ByteBuffer, ByteBuffer>
    switch target {
    case .unix(let path): channel = try await bootstrap.connect(unixDomainSocketPath: path, channelInitializer: wrap)
    case .tcp(let host, let port): channel = try await bootstrap.connect(host: host, port: port, channelInitializer: wrap)
    }
    let bytes = try await channel.executeThenClose { inbound, outbound in
        try await outbound.write(ByteBuffer(string: request))
        var bytes: [UInt8] = []
        for try await buffer in inbound { bytes += buffer.readableBytesView }
        return bytes
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// The samples of a Prometheus text, as `prometheus_client` reads them.
struct MetricFamilies {
    struct Sample {
        let name: String
        /// The family's name (a counter's without `_total`, as prometheus_client names it).
        let family: String
        let labels: [String: String]
        let value: Double
        let type: String
    }

    let samples: [Sample]

    /// The value of the sample `name` whose labels include `labels`.
    func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        self.samples.first { sample in sample.name == name && labels.allSatisfy { sample.labels[$0.key] == $0.value } }?.value
    }

    /// The type of the family a sample named `name` belongs to.
    func type(of name: String) -> String? {
        self.samples.first { $0.name.hasPrefix(name) }?.type
    }
}

/// Parses `text` with Python's `prometheus_client` (the parser Prometheus' own Python client
/// ships). The package must be installed (scripts/deps does it): without it this fails, it does
/// not skip.
func parseWithPrometheusClient(_ text: String) async throws -> MetricFamilies {
    let script = """
        import json, sys
        from prometheus_client.parser import text_string_to_metric_families
        out = []
        with open(sys.argv[1], encoding="utf-8") as f:
            for family in text_string_to_metric_families(f.read()):
                for s in family.samples:
                    out.append({"name": s.name, "family": family.name, "labels": s.labels, "value": s.value, "type": family.type})
        print(json.dumps(out))
        """
    return try await withTemporaryDirectory { directory in
        let path = directory + "/metrics.txt"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        let result = try await runProcess("/usr/bin/env", ["python3", "-c", script, path])
        #expect(result.status == 0, "prometheus_client could not parse /metrics (is it installed? scripts/deps): \(result.stderr)")
        guard result.status == 0 else { return MetricFamilies(samples: []) }
        let parsed = try JSONValue(parsing: result.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        let samples = (parsed.arrayValue ?? []).map { sample in
            MetricFamilies.Sample(
                name: sample["name"]?.stringValue ?? "",
                family: sample["family"]?.stringValue ?? "",
                labels: (sample["labels"]?.objectValue ?? [:]).reduce(into: [:]) { $0[$1.key] = $1.value.stringValue },
                value: sample["value"]?.doubleValue ?? .nan,
                type: sample["type"]?.stringValue ?? ""
            )
        }
        return MetricFamilies(samples: samples)
    }
}

/// Runs a daemon serving `/metrics` over TCP on a free loopback port (`metrics.listen` port 0) for
/// `body`, with its log, and the address it logged for the endpoint, and that address's port.
func withTCPMetricsDaemon(
    _ body: @Sendable (RunningDaemon, _ logs: InMemoryLogHandler, _ address: String, _ port: Int) async throws -> Void
) async throws {
    let logs = InMemoryLogHandler()
    try await withTemporaryDirectory { directory in
        try await withDaemon(
            in: directory,
            configure: { $0.metrics.listen = HostPort(host: "127.0.0.1", port: 0) },
            logger: Logger(label: "evd-test", factory: { _ in logs })
        ) { daemon, _ in
            let entry = logs.entries.first { $0.message.description == "metrics endpoint is listening" }
            let address = try #require(entry?.metadata["metrics.address"]?.description)
            try await body(daemon, logs, address, try #require(HostPort(parsing: address)?.port))
        }
    }
}
