import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

/// Veto listeners that fail in ways a listener should not: one that never reads its messages, one
/// that is stopped. Neither may cost evd unbounded memory or its pool, nor its clients the full
/// timeout on every request (docs/protocol.md "Vetoes").
@Suite("Veto faults")
struct VetoFaultTests {
    // MARK: A listener that never reads

    @Test(
        "vetoes to a listener that never reads count against its outbox: beyond the bound on_timeout decides at once, memory stays bounded"
    )
    func neverReadingListener() async throws {
        let requests = 2000
        let run = try await NeverReadingRun.run(bound: 4 << 20, requests: requests)
        #expect(run.answered == requests, "every request is answered (the listener's on_timeout allows it)")
        let stats = run.stats
        let skipped = try #require(stats["vetoes"]?["skipped_outbox_full"]?.intValue)
        // Each veto was waited for (and timed out), or sent to the listener once it was tripped,
        // or — once its outbox was full — decided at once, not sent.
        func sent(_ stats: JSONObject) -> Int64 {
            (stats["vetoes"]?["timed_out"]?.intValue ?? 0) + (stats["vetoes"]?["skipped_tripped"]?.intValue ?? 0)
        }
        let warmSkipped = run.warmup["vetoes"]?["skipped_outbox_full"]?.intValue ?? 0
        // Only what fits in the outbox (a 4 MiB bound: about 60 messages) is sent.
        #expect(skipped - warmSkipped > Int64(requests / 2), "\(JSONValue.object(stats))")
        #expect(sent(stats) - sent(run.warmup) + (skipped - warmSkipped) == Int64(requests), "\(JSONValue.object(stats))")
        #expect(stats["vetoes_pending"] == 0)
        // 2000 messages of 64 KiB are 125 MiB: queued, they would all stay. The bound holds 4.
        let grown = run.after - run.before
        #expect(grown < 48 << 20, "evd grew by \(grown >> 20) MiB (\(run.before >> 20) → \(run.after >> 20) MiB)")
        #expect(run.metrics.contains("evd_vetoes_skipped_total{reason=\"outbox_full\"} \(skipped)"), "\(run.metrics)")
    }

    @Test("what a listener that never reads had queued is freed when it dies")
    func neverReadingListenerDies() async throws {
        // A bound large enough to queue every message: about 62 MiB of vetoes wait for the listener.
        let run = try await NeverReadingRun.run(bound: 256 << 20, requests: 1000)
        #expect(run.answered == 1000)
        let grown = run.after - run.before
        try #require(grown > 32 << 20, "the vetoes were queued: evd grew by \(grown >> 20) MiB")
        #expect(
            run.released - run.before < grown / 2,
            "evd held \(run.released >> 20) MiB after the listener died (\(run.before >> 20) MiB before its vetoes, \(run.after >> 20) MiB with them)"
        )
    }

    /// Runs the evd binary with `--max-queued-bytes bound`, subscribes a `before_execute` listener
    /// (timeout 1 ms, on_timeout allow) that never reads, sends `requests` requests of 64 KiB from
    /// four other clients, then closes the listener; measures evd's resident memory all along.
    private struct NeverReadingRun {
        /// Requests answered with their rows.
        var answered = 0
        /// evd's RSS before the requests, after them, and once the listener is gone.
        var before = 0, after = 0, released = 0
        /// `stats` before the requests (after a few to warm up), and after them.
        var warmup: JSONObject = [:], stats: JSONObject = [:]
        /// `GET /metrics` after the requests.
        var metrics = ""

        static func run(bound: Int, requests: Int) async throws -> NeverReadingRun {
            try await withTemporaryDirectory { directory in
                let socket = directory + "/evd.sock"
                let metrics = directory + "/metrics.sock"
                let evd = try EvdChild(
                    binaryPath("evd"),
                    [
                        "--socket", socket, "--state-dir", directory + "/state", "--db", "main=\(directory)/main.db",
                        "--log-level", "error", "--max-queued-bytes", "\(bound)", "--metrics-socket", metrics,
                    ],
                    directory: directory
                )
                defer { evd.kill() }
                let ready = await eventually(within: 60) {
                    (try? await EvdConnection.withConnection(socketPath: socket) { try await $0.request("ping") }) != nil
                }
                try #require(ready, "evd did not start")
                let pid = evd.process.processIdentifier
                var run = NeverReadingRun()

                // Subscribes, then never reads again (a small receive buffer: it fills at once).
                let stuck = try RawUnixSocket(path: socket, receiveBuffer: 4096)
                defer { stuck.close() }
                try stuck.send(
                    #"{"op":"subscribe","veto":["before_execute"],"name":"deaf","timeout_ms":1,"on_timeout":"allow"}"# + "\n"
                )
                try await Self.waitForListeners(1, socket)

                // 64 KiB requests from four clients: each veto message carries the whole request.
                let padding = String(repeating: "x", count: 64 << 10)
                let sql: JSONObject = ["sql": "select length(?)", "params": [.string(padding)]]
                run.warmup = try await EvdConnection.withConnection(socketPath: socket) { evd in
                    for _ in 0..<20 { _ = try await evd.request("execute", sql) }
                    return try await evd.request("stats")
                }
                run.before = try #require(residentBytes(of: pid))
                run.answered = try await runWithDeadline(seconds: 300, "\(requests) large requests beside a listener that never reads") {
                    try await withThrowingTaskGroup(of: Int.self) { group in
                        for _ in 0..<4 {
                            group.addTask {
                                try await EvdConnection.withConnection(socketPath: socket) { evd in
                                    var answered = 0
                                    for _ in 0..<(requests / 4) {
                                        if try await evd.request("execute", sql)["rows"] == [[.integer(64 << 10)]] { answered += 1 }
                                    }
                                    return answered
                                }
                            }
                        }
                        return try await group.reduce(0, +)
                    }
                }
                run.after = try #require(residentBytes(of: pid))
                run.stats = try await EvdConnection.withConnection(socketPath: socket) { try await $0.request("stats") }
                run.metrics = try await httpRequest(.unix(metrics), "GET /metrics").body

                // The listener dies: what it had queued goes with it. Its outbox is discarded when
                // its channel closes, which may come a moment after the listener is unregistered: RSS
                // is read until it has come down (the test's bound), or for at most 10 s.
                stuck.close()
                try await Self.waitForListeners(0, socket)
                let (before, after) = (run.before, run.after)
                var released = 0
                _ = await eventually(within: 10) {
                    released = residentBytes(of: pid) ?? after
                    return released - before < (after - before) / 2
                }
                run.released = released
                print(
                    "VetoFaultTests: --max-queued-bytes \(bound >> 20) MiB, \(requests) requests of 64 KiB: RSS \(run.before >> 20) MiB before, \(run.after >> 20) MiB after, \(run.released >> 20) MiB once the listener is gone"
                )
                evd.signal(SIGTERM)
                let result = try await evd.finish(within: 30)
                #expect(result.status == 0, "\(result.stderr)")
                return run
            }
        }

        /// Waits until evd has `count` veto listeners.
        private static func waitForListeners(_ count: Int64, _ socket: String) async throws {
            try await EvdConnection.withConnection(socketPath: socket) { evd in
                let reached = await eventually(within: 20) {
                    (try? await evd.request("stats")["veto_listeners"]?.intValue) == count
                }
                try #require(reached, "evd never had \(count) veto listeners")
            }
        }
    }

    // MARK: A stopped listener

    @Test("a stopped listener holds no pooled connection, trips after consecutive timeouts, and is asked again once it replies")
    func stoppedListener() async throws {
        try await withTemporaryDirectory { directory in
            let metrics = directory + "/metrics.sock"
            try await withDaemon(
                in: directory,
                configure: {
                    $0.poolSize = 2
                    $0.checkoutTimeoutMs = 1000
                    $0.metrics.socketPath = metrics
                }
            ) { daemon, _ in
                let listener = try EvdChild(
                    "/usr/bin/python3",
                    ["-c", allowingListener, daemon.socketPath],
                    directory: directory
                )
                defer { listener.kill() }
                try await waitUntilStats(daemon, "the listener to subscribe") { $0["veto_listeners"] == 1 }
                // It answers while it runs.
                #expect(try await daemon.request(.execute(.init(sql: "select 1")))["rows"] == [[1]])
                try await waitUntilStats(daemon, "its first answer") { $0["vetoes"]?["allowed"] == 1 }

                listener.signal(SIGSTOP)
                // Every request waits for the stopped listener's timeout (2 s), then its on_timeout
                // allows it: with a pool of 2 and a 1 s checkout timeout, none may hold a connection
                // while it waits.
                let first = try await Self.concurrentRequests(daemon, 30)
                #expect(first.filter { $0 != nil } == [], "every request succeeds")
                let tripped = try await daemon.request("stats")
                let timedOut = try #require(tripped["vetoes"]?["timed_out"]?.intValue)
                let skippedBefore = try #require(tripped["vetoes"]?["skipped_tripped"]?.intValue)
                #expect(timedOut >= Int64(VetoListener.tripAfter), "\(JSONValue.object(tripped))")
                #expect(timedOut + skippedBefore == 30, "\(JSONValue.object(tripped))")
                #expect(tripped["veto_listeners_tripped"] == 1, "\(JSONValue.object(tripped))")

                // Tripped: its vetoes are decided by on_timeout at once, none waits for it.
                let second = try await Self.concurrentRequests(daemon, 30)
                #expect(second.filter { $0 != nil } == [], "every request succeeds")
                let stats = try await daemon.request("stats")
                #expect(stats["vetoes"]?["timed_out"]?.intValue == timedOut, "\(JSONValue.object(stats))")
                let skipped = try #require(stats["vetoes"]?["skipped_tripped"]?.intValue)
                #expect(skipped == skippedBefore + 30, "\(JSONValue.object(stats))")
                let body = try await httpRequest(.unix(metrics), "GET /metrics").body
                #expect(body.contains("evd_vetoes_skipped_total{reason=\"tripped\"} \(skipped)"), "\(body)")
                #expect(body.contains("evd_veto_listeners_tripped 1"), "\(body)")

                // It comes back and replies (late) to what it was sent: it is asked, and waited for, again.
                listener.signal(SIGCONT)
                try await waitUntilStats(daemon, "the listener's circuit to close") { $0["veto_listeners_tripped"] == 0 }
                #expect(try await daemon.request(.execute(.init(sql: "select 2")))["rows"] == [[2]])
                try await waitUntilStats(daemon, "its answer once it is back") { $0["vetoes"]?["allowed"] == 2 }
                let after = try await daemon.request("stats")
                #expect(after["vetoes"]?["skipped_tripped"]?.intValue == skipped, "\(JSONValue.object(after))")
                listener.kill()
            }
        }
    }

    /// Sends `count` `execute`s at once, each from its own connection; returns each one's error
    /// (`nil`: it succeeded).
    private static func concurrentRequests(_ daemon: RunningDaemon, _ count: Int) async throws -> [String?] {
        try await runWithDeadline(seconds: 120, "\(count) concurrent requests") {
            await withTaskGroup(of: String?.self) { group in
                for n in 0..<count {
                    group.addTask {
                        do {
                            let rows = try await daemon.request("execute", ["sql": "select ?", "params": [.integer(Int64(n))]])["rows"]
                            return rows == [[.integer(Int64(n))]] ? nil : "wrong rows: \(String(describing: rows))"
                        } catch {
                            return "\(error)"
                        }
                    }
                }
                var errors: [String?] = []
                for await error in group { errors.append(error) }
                return errors
            }
        }
    }
}

/// A veto listener for `before_execute` (timeout 2 s, on_timeout allow) that allows every veto it
/// reads, run as its own process so that it can be stopped (`argv[1]`: evd's socket).
private let allowingListener = """
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(json.dumps({"op": "subscribe", "veto": ["before_execute"], "name": "stoppable",
                          "timeout_ms": 2000, "on_timeout": "allow"}).encode() + b"\\n")
    for line in s.makefile("rb"):
        message = json.loads(line)
        if message.get("type") == "veto":
            s.sendall(json.dumps({"op": "reply", "seq": message["seq"], "action": "allow"}).encode() + b"\\n")
    """

/// The resident set size of process `pid` (`VmRSS`), in bytes.
private func residentBytes(of pid: Int32) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return line.split(separator: " ").dropFirst().first.flatMap { Int($0) }.map { $0 << 10 }
    }
    return nil
}
