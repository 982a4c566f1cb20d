import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// `evd --config FILE --check-config`: the real binary reads the file, layers the flags over it and
/// prints the effective settings, or refuses with the key named.
@Suite("Config file")
struct ConfigFileTests {
    static let fullExample = """
        socket = "/run/evd-test/evd.sock"
        socket_mode = "0660"
        state_dir = "/var/lib/evd-test"
        pool_size = 8
        max_line_bytes = 65536
        veto_budget_ms = 2000
        log_level = "notice"

        [[database]]
        name = "main"
        path = "/var/lib/evd-test/main.db"

        [[database]]
        name = "audit"
        path = "/var/lib/evd-test/audit.db"

        [limits]
        max_connections = 100
        max_connections_per_uid = 10
        max_subscriptions = 20
        max_pending_requests = 64
        max_queued_events = 500
        max_queued_bytes = 1048576

        [journal]
        enabled = true
        rows = false
        keep_events = 5000
        keep_seconds = 3600

        [metrics]
        socket = "/run/evd-test/metrics.sock"
        listen = "127.0.0.1:9187"
        request_timeout_ms = 2500

        [[grant]]
        group = "nogroup"
        actions = ["subscribe", "view-table"]
        database = "main"
        """

    /// Runs `evd --check-config` on `text` with `flags`, without the environment's socket and
    /// state settings (so that the file's show).
    private func check(_ text: String, _ flags: [String] = []) async throws -> ProcessResult {
        try await withTemporaryDirectory { directory in
            let path = directory + "/evd.toml"
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            let unset = ["EVD_SOCKET", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR", "STATE_DIRECTORY", "XDG_STATE_HOME"]
            return try await runProcess(
                "/usr/bin/env",
                unset.flatMap { ["-u", $0] } + [binaryPath("evd"), "--config", path, "--check-config"] + flags,
                timeout: 30
            )
        }
    }

    @Test("a full example is accepted and printed; flags win over the file")
    func fullExample() async throws {
        let result = try await self.check(Self.fullExample, ["--pool-size", "3", "--no-journal"])
        #expect(result.status == 0, "\(result.stderr)")
        let effective = try JSONValue(parsing: result.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(effective["socket"] == "/run/evd-test/evd.sock")
        #expect(effective["socket_mode"] == "0660")
        #expect(effective["state_dir"] == "/var/lib/evd-test")
        #expect(effective["database"]?.arrayValue?.map { $0["name"] } == ["main", "audit"])
        #expect(effective["pool_size"] == 3)
        #expect(effective["veto_budget_ms"] == 2000)
        #expect(effective["limits"]?["max_subscriptions"] == 20)
        #expect(effective["limits"]?["max_queued_events"] == 500)
        #expect(effective["limits"]?["max_queued_bytes"] == 1_048_576)
        #expect(effective["journal"]?["enabled"] == false)
        #expect(effective["journal"]?["rows"] == false)
        #expect(effective["journal"]?["keep_events"] == 5000)
        #expect(effective["grant"]?[0]?["group"] == "nogroup")
        #expect(effective["metrics"]?["socket"] == "/run/evd-test/metrics.sock")
        #expect(effective["metrics"]?["listen"] == "127.0.0.1:9187")
        #expect(effective["metrics"]?["request_timeout_ms"] == 2500)
    }

    @Test("the metrics flags win over [metrics]; without either, there is no endpoint")
    func metricsFlags() async throws {
        let flagged = try await self.check(Self.fullExample, ["--metrics-listen", "[::1]:9100", "--metrics-socket", "/tmp/m.sock"])
        #expect(flagged.status == 0, "\(flagged.stderr)")
        let effective = try JSONValue(parsing: flagged.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(effective["metrics"]?["listen"] == "[::1]:9100")
        #expect(effective["metrics"]?["socket"] == "/tmp/m.sock")

        let timeout = try await self.check(Self.fullExample, ["--metrics-request-timeout-ms", "700"])
        #expect(timeout.status == 0, "\(timeout.stderr)")
        #expect(
            try JSONValue(parsing: timeout.stdout.trimmingCharacters(in: .whitespacesAndNewlines))["metrics"]?["request_timeout_ms"] == 700
        )

        let plain = try await self.check("pool_size = 2")
        #expect(plain.status == 0, "\(plain.stderr)")
        let defaults = try JSONValue(parsing: plain.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(defaults["metrics"]?["listen"] == .null)
        #expect(defaults["metrics"]?["socket"] == .null)
        #expect(defaults["metrics"]?["request_timeout_ms"] == 5000)

        let bad = try await self.check("", ["--metrics-listen", "nowhere"])
        #expect(bad.status != 0)
        #expect(bad.stderr.contains("--metrics-listen"), "\(bad.stderr)")
        let short = try await self.check("", ["--metrics-request-timeout-ms", "5"])
        #expect(short.status != 0)
        #expect(short.stderr.contains("--metrics-request-timeout-ms must be between 100 and 600000"), "\(short.stderr)")
        let badFile = try await self.check("[metrics]\nrequest_timeout_ms = 0")
        #expect(badFile.status != 0)
        #expect(badFile.stderr.contains("request_timeout_ms must be an integer in 100...600000"), "\(badFile.stderr)")
    }

    @Test("the subscriber queue bounds: [limits] keys, the flags win over them, the defaults without either")
    func queueLimits() async throws {
        let file = "[limits]\nmax_queued_events = 500\nmax_queued_bytes = 1048576"
        let fromFile = try await self.check(file)
        #expect(fromFile.status == 0, "\(fromFile.stderr)")
        let read = try JSONValue(parsing: fromFile.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(read["limits"]?["max_queued_events"] == 500)
        #expect(read["limits"]?["max_queued_bytes"] == 1_048_576)

        let flagged = try await self.check(file, ["--max-queued-events", "7", "--max-queued-bytes", "65536"])
        #expect(flagged.status == 0, "\(flagged.stderr)")
        let overridden = try JSONValue(parsing: flagged.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(overridden["limits"]?["max_queued_events"] == 7)
        #expect(overridden["limits"]?["max_queued_bytes"] == 65536)

        let plain = try await self.check("pool_size = 2")
        #expect(plain.status == 0, "\(plain.stderr)")
        let defaults = try JSONValue(parsing: plain.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(defaults["limits"]?["max_queued_events"] == 10000)
        #expect(defaults["limits"]?["max_queued_bytes"] == 16_777_216)

        for (flag, message) in [
            (["--max-queued-events", "0"], "--max-queued-events must be at least 1"),
            (["--max-queued-bytes", "65535"], "--max-queued-bytes must be at least 65536"),
        ] {
            let bad = try await self.check(file, flag)
            #expect(bad.status != 0, "\(flag)")
            #expect(bad.stderr.contains(message), "\(flag): \(bad.stderr)")
        }
    }

    @Test("each kind of mistake stops evd, naming the key")
    func mistakes() async throws {
        let cases: [(String, String)] = [
            ("pool_size = 0", "pool_size"),
            ("pool_size = \"four\"", "pool_size"),
            ("socket_mode = \"999\"", "socket_mode"),
            ("socket = \"relative/evd.sock\"", "socket"),
            ("log_level = \"loud\"", "log_level"),
            ("colour = \"blue\"", "colour"),
            ("[limits]\nmax_subscriptions = -1", "max_subscriptions"),
            ("[limits]\nmax_sessions = 5", "max_sessions"),
            ("[limits]\nmax_queued_events = 0", "max_queued_events"),
            ("[limits]\nmax_queued_bytes = 4096", "max_queued_bytes"),
            ("[limits]\nmax_queued_bytes = \"16M\"", "max_queued_bytes"),
            ("[journal]\nenabled = \"yes\"", "enabled"),
            ("[metrics]\nlisten = \"localhost\"", "listen"),
            ("[metrics]\nlisten = \"127.0.0.1:70000\"", "listen"),
            ("[metrics]\nlisten = 9187", "listen"),
            ("[metrics]\nsocket = \"metrics.sock\"", "socket"),
            ("[metrics]\nport = 9187", "port"),
            ("metrics = \"127.0.0.1:9187\"", "[metrics]"),
            ("[[database]]\nname = \"main\"", "name and path"),
            ("[[database]]\nname = \"a\"\npath = \"/x\"\n[[database]]\nname = \"a\"\npath = \"/y\"", "twice"),
            ("[[grant]]\nuser = \"nobody\"\nactions = [\"fly\"]", "fly"),
            ("not toml at all", "not valid TOML"),
        ]
        for (text, key) in cases {
            let result = try await self.check(text)
            #expect(result.status != 0, "\(text)")
            #expect(result.stderr.contains(key), "\(text): \(result.stderr)")
        }
    }
}

extension JSONValue {
    fileprivate subscript(index: Int) -> JSONValue? {
        guard let array = self.arrayValue, index < array.count else { return nil }
        return array[index]
    }
}
