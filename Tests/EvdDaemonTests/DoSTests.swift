import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Denial of service by a local user of another uid (nobody): what a peer can make evd hold or do
/// is bounded, and evd goes on serving everyone else (docs/protocol.md, "Limits").
///
/// The memory tests run a real `evd` process (`EVD_BIN_DIR`), so that its resident size is its
/// own and not that of the test process with its many in-process daemons. Their bounds are loose
/// (tens of MiB above what the limits allow); without the limits the same attacks grow evd by
/// hundreds of MiB in seconds.
@Suite(
    "Denial of service (another uid)",
    .serialized,
    .enabled(
        if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv")
            && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"),
        "needs root, setpriv and /usr/bin/python3 to attack as another uid"
    )
)
struct DoSTests {
    // MARK: Unread responses (output backpressure)

    @Test(
        "pipelined events requests never read: evd stops reading the connection; its memory stays bounded and others are served"
    )
    func unreadResponses() async throws {
        try await withEvdProcess { evd in
            let baseline = try #require(residentBytes(of: evd.pid))
            // The catalog is the largest answer one can get with no grant at all.
            let attack = try asNobodyRunning(pipelineWithoutReading, [evd.socketPath, #"{"op":"events"}"#])
            let start = ContinuousClock.now
            var peak = baseline
            var pinged = false
            while attack.process.isRunning {
                peak = max(peak, residentBytes(of: evd.pid) ?? 0)
                if !pinged && ContinuousClock.now - start > .seconds(2) {
                    // Mid-attack, another client is served as usual.
                    #expect(try await evd.ping())
                    pinged = true
                }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(pinged)
            let report = try await attack.finish(within: 90)
            #expect(report.status == 0, "\(report.stderr)")
            let outcome = try JSONValue(parsing: report.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
            let sent = outcome["sent"]?.intValue ?? 0
            // evd stopped reading: the attacker's writes stopped going anywhere, for good.
            #expect(outcome["stalled"] == true, "evd read on: the attacker sent \(sent) bytes in 60 s")
            let grown = (peak - baseline) >> 20
            #expect(
                grown < 100,
                "evd grew by \(grown) MiB (from \(baseline >> 20) MiB) under unread pipelined responses"
            )
            print(
                "unread responses: evd's RSS \(baseline >> 20) MiB → peak \(peak >> 20) MiB; the attacker's writes stalled after \(sent) bytes"
            )
            #expect(try await evd.ping())
        }
    }

    @Test(
        "a result larger than --max-response-bytes gets response_too_large, stops early (memory bounded), and the connection goes on"
    )
    func hugeResult() async throws {
        let grant = #"[[grant]]\#nuid = 65534\#nactions = ["execute-sql"]\#n"#
        try await withEvdProcess(["--max-response-bytes", "\(8 << 20)"], config: grant) { evd in
            let baseline = try #require(residentBytes(of: evd.pid))
            // About 266 MB of result: a million rows of 256 hex digits.
            let huge =
                "with recursive c(x) as (select 1 union all select x + 1 from c limit 1000000) select x, hex(randomblob(128)) from c"
            let attack = try asNobodyRunning(
                requestsThenRead,
                [
                    evd.socketPath,
                    #"[{"op":"execute","id":1,"sql":"\#(huge)"},{"op":"execute","id":2,"sql":"select 42"}]"#,
                ]
            )
            var peak = baseline
            while attack.process.isRunning {
                peak = max(peak, residentBytes(of: evd.pid) ?? 0)
                try await Task.sleep(for: .milliseconds(20))
            }
            let report = try await attack.finish(within: 60)
            #expect(report.status == 0, "\(report.stderr)")
            let got = report.stdout.split(separator: "\n").compactMap {
                try? JSONValue(parsing: String($0)).objectValue
            }
            let answers = responses(got)
            #expect(answers[1]?["ok"] == false)
            #expect(answers[1]?["error"]?["code"] == "response_too_large")
            #expect(answers[1]?["error"]?["limit"] == "max-response-bytes")
            #expect(answers[1]?["error"]?["max"] == .integer(8 << 20))
            #expect(answers[2]?["result"]?["rows"] == [[42]], "the connection goes on")
            let grown = (peak - baseline) >> 20
            #expect(grown < 100, "evd grew by \(grown) MiB (from \(baseline >> 20) MiB) for one huge result")
            print("huge result: evd's RSS \(baseline >> 20) MiB → peak \(peak >> 20) MiB")
            #expect(try await evd.ping())
        }
    }

    @Test("a response over --max-response-bytes is refused whatever the op; one under it is whole")
    func responseBound() async throws {
        try await withRunningDaemon(configure: {
            openUp(&$0, grants: [Grant(who: .uid(65534), actions: [.executeSQL], database: "main")])
            $0.maxResponseBytes = 64 << 10
        }) { daemon in
            let got = responses(
                try await messages(
                    try asNobody(
                        daemon,
                        [
                            execute("select hex(zeroblob(40000))"),  // 80,000 hex digits in one row
                            execute("select hex(zeroblob(20000))"),
                            ["op": "events"],
                        ]
                    )
                )
            )
            #expect(got[1]?["error"]?["code"] == "response_too_large")
            #expect(got[1]?["error"]?["max"] == .integer(64 << 10))
            #expect(got[2]?["result"]?["rows"]?.arrayValue?.first?.arrayValue?.first?.stringValue?.utf8.count == 40000)
            #expect(got[3]?["ok"] == true)
        }
    }

    // MARK: Journal retention

    @Test("login/logout churn by another uid does not push root's committed changes out of the journal")
    func sessionChurnKeepsChanges() async throws {
        try await withRunningDaemon(configure: {
            openUp(&$0)
            $0.journal.keepEvents = 300
            $0.journal.pruneIntervalMs = 20
        }) { daemon in
            let inserted = try await daemon.withClient { evd -> Int64 in
                try await evd.request(.execute(.init(sql: "create table notes(id integer primary key, body text)")))
                let (_, head) = try await subscribeEvents(evd, ["insert-rows"])
                try await evd.request(.execute(.init(sql: "insert into notes(body) values ('kept')")))
                let event = try #require(await evd.nextMessage(ofType: "event"))
                #expect(event["seq"]?.intValue ?? 0 > head)
                return try #require(event["seq"]?.intValue)
            }
            // Nobody, with no grant at all: a few connections, a thousand logouts each.
            let churn = try (0..<3).map { _ in
                try asNobody(daemon, Array(repeating: ["op": "logout"], count: 1000), linger: 1)
            }
            for client in churn { _ = try await messages(client) }
            // Retention has cut the logins and logouts (the journal's floor moved past the insert).
            var floor: Int64 = 0
            let deadline = ContinuousClock.now + .seconds(30)
            while floor <= inserted && ContinuousClock.now < deadline {
                floor = try await daemon.request("stats")["journal"]?["floor"]?.intValue ?? 0
                if floor <= inserted { try await Task.sleep(for: .milliseconds(20)) }
            }
            #expect(floor > inserted, "retention never cut the session events")
            try await daemon.withClient { evd in
                _ = try await subscribeEvents(evd, ["insert-rows"], ["since": .int(inserted - 1)])
                let first = try #require(await evd.nextMessage(ofType: nil))
                #expect(first["type"] == "event", "got \(first) instead of the insert")
                #expect(first["seq"] == .int(inserted))
                #expect(first["table"] == "notes")
            }
            // The logins and logouts themselves were cut: asking for them says so.
            try await daemon.withClient { evd in
                _ = try await subscribeEvents(evd, ["logout"], ["since": .int(inserted - 1)])
                let first = try #require(await evd.nextMessage(ofType: nil))
                #expect(first["type"] == "notice")
                #expect(first["code"] == "gap")
            }
        }
    }

    // MARK: Subscription filters

    @Test(
        "a where filter over --max-filter-values is refused at subscribe, naming the limit; one within it matches as before"
    )
    func filterBound() async throws {
        let grants = [Grant(who: .uid(65534), actions: [.subscribe])]
        try await withRunningDaemon(configure: { openUp(&$0, grants: grants) }) { daemon in
            let tooMany: JSONValue = .array((0...1024).map { .integer($0) })  // 1025 values
            let refused = responses(
                try await messages(
                    try asNobody(daemon, [["op": "subscribe", "events": ["app.*"], "where": ["n": tooMany]]])
                )
            )
            #expect(refused[1]?["error"]?["code"] == "bad_request")
            #expect(refused[1]?["error"]?["field"] == "where")
            #expect(refused[1]?["error"]?["limit"] == "max-filter-values")
            #expect(refused[1]?["error"]?["max"] == 1024)
            #expect(try await daemon.request("stats")["subscriptions"] == 0)

            // 1000 even numbers and 5.0 (a real: equal to the integer 5, as before), and a name.
            var accepted: [JSONValue] = (0..<1000).map { .integer(2 * $0) }
            accepted.append(.double(5))
            let listener = try asNobody(
                daemon,
                [
                    [
                        "op": "subscribe", "events": ["app.*"],
                        "where": ["n": .array(accepted), "event": ["app.n", "app.end"]],
                    ]
                ],
                until: "app.end"
            )
            let deadline = ContinuousClock.now + .seconds(30)
            while try await daemon.request("stats")["subscriptions"] != 1 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            try await daemon.withClient { evd in
                for n: Int64 in [3, 5, 1998, 1999, 2000, 7] {
                    try await evd.request("emit", ["event": "app.n", "data": ["n": .int(n)]])
                }
                try await evd.request("emit", ["event": "app.other", "data": ["n": 4]])
                try await evd.request("emit", ["event": "app.n", "data": ["n": "4"]])
                try await evd.request("emit", ["event": "app.n", "data": ["n": [4]]])
                try await evd.request("emit", ["event": "app.end", "data": ["n": 0]])
            }
            let seen = try await messages(listener).filter { $0["type"] == "event" }
            #expect(seen.map { $0["n"] ?? .null } == [5, 1998, 0])
        }
    }

    // MARK: Flags and config keys

    @Test(
        "--max-response-bytes and --max-filter-values: [limits] keys, the flags win over them, the defaults, the ranges"
    )
    func limitFlags() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/evd.toml"
            try "[limits]\nmax_response_bytes = 1048576\nmax_filter_values = 50\n".write(
                toFile: path,
                atomically: true,
                encoding: .utf8
            )
            func check(_ arguments: [String]) async throws -> ProcessResult {
                try await runProcess(
                    binaryPath("evd"),
                    ["--state-dir", directory, "--check-config"] + arguments,
                    timeout: 30
                )
            }
            func limits(_ result: ProcessResult) throws -> JSONValue? {
                #expect(result.status == 0, "\(result.stderr)")
                return try JSONValue(parsing: result.stdout.trimmingCharacters(in: .whitespacesAndNewlines))["limits"]
            }
            let defaults = try limits(try await check([]))
            #expect(defaults?["max_response_bytes"] == .integer(64 << 20))
            #expect(defaults?["max_filter_values"] == 1024)
            let fromFile = try limits(try await check(["--config", path]))
            #expect(fromFile?["max_response_bytes"] == 1_048_576)
            #expect(fromFile?["max_filter_values"] == 50)
            let flagged = try limits(
                try await check(["--config", path, "--max-response-bytes", "65536", "--max-filter-values", "7"])
            )
            #expect(flagged?["max_response_bytes"] == 65536)
            #expect(flagged?["max_filter_values"] == 7)
            for (arguments, message) in [
                (["--max-response-bytes", "65535"], "--max-response-bytes must be at least 65536"),
                (["--max-filter-values", "0"], "--max-filter-values must be between 1 and 1000000"),
            ] {
                let bad = try await check(arguments)
                #expect(bad.status != 0, "\(arguments)")
                #expect(bad.stderr.contains(message), "\(arguments): \(bad.stderr)")
            }
            try "[limits]\nmax_filter_values = 0\n".write(toFile: path, atomically: true, encoding: .utf8)
            let badFile = try await check(["--config", path])
            #expect(badFile.status != 0)
            #expect(badFile.stderr.contains("max_filter_values"), "\(badFile.stderr)")
        }
    }
}

// MARK: Helpers

/// A client for the attack on evd's memory, run as nobody: writes `argv[2]` (one request line)
/// over and over without ever reading, until its writes have made no progress for 2 s (the
/// socket is full: evd reads no more) or 60 s have passed; prints how many bytes the socket took
/// and whether it stalled (`{"sent":N,"stalled":true}`), then holds the connection 3 s more.
private let pipelineWithoutReading = """
    import json, socket, sys, time
    path, line = sys.argv[1], sys.argv[2].encode() + b"\\n"
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.setblocking(False)
    chunk, pending, sent = line * 256, b"", 0
    start = last = time.time()
    stalled = False
    while time.time() < start + 60:
        if not pending:
            pending = chunk
        try:
            n = s.send(pending)
            pending = pending[n:]
            sent += n
            last = time.time()
        except BlockingIOError:
            if time.time() - last > 2:
                stalled = True
                break
            time.sleep(0.01)
    print(json.dumps({"sent": sent, "stalled": stalled}), flush=True)
    time.sleep(3)
    """

/// A client run as nobody: sends the requests of `argv[2]` (a JSON array) at once, then prints
/// every line it reads until each has its response (or the daemon closes, or 60 s pass).
private let requestsThenRead = """
    import json, socket, sys
    path, requests = sys.argv[1], json.loads(sys.argv[2])
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(60)
    s.sendall(b"".join(json.dumps(r).encode() + b"\\n" for r in requests))
    f = s.makefile("rb")
    waiting = {r["id"] for r in requests}
    while waiting:
        line = f.readline()
        if not line:
            break
        message = json.loads(line)
        if message.get("type") == "response":
            waiting.discard(message.get("id"))
            if len(line) > 4096:  # a result: its size, not its bytes
                message = {"type": "response", "id": message.get("id"), "ok": message.get("ok"), "bytes": len(line)}
        print(json.dumps(message), flush=True)
    """

/// Runs `script` with the system Python as nobody (uid and gid 65534, no groups).
private func asNobodyRunning(_ script: String, _ arguments: [String]) throws -> Spawned {
    try Spawned(
        "/usr/bin/setpriv",
        ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script] + arguments
    )
}

/// A running `evd` process serving a socket nobody may connect to.
private struct EvdProcess: Sendable {
    let child: EvdChild
    let socketPath: String
    var pid: Int32 { self.child.process.processIdentifier }

    /// Whether a ping on a fresh connection (as root) is answered.
    func ping() async throws -> Bool {
        try await EvdConnection.withConnection(socketPath: self.socketPath) { try await $0.request("ping") } == [:]
    }
}

/// Starts `evd` (the built binary) with `arguments` in a fresh directory nobody can reach, and a
/// config file with `config` when given; stops it after `body`.
private func withEvdProcess(
    _ arguments: [String] = [],
    config: String? = nil,
    _ body: (EvdProcess) async throws -> Void
)
    async throws
{
    try await withTemporaryDirectory { directory in
        #expect(chmod(directory, 0o755) == 0)
        var all = [
            "--socket", directory + "/evd.sock", "--state-dir", directory + "/state", "--db",
            "main=\(directory)/main.db",
            "--socket-mode", "0666", "--log-level", "error",
        ]
        if let config {
            FileManager.default.createFile(atPath: directory + "/evd.toml", contents: Data(config.utf8))
            all += ["--config", directory + "/evd.toml"]
        }
        let child = try EvdChild(binaryPath("evd"), all + arguments, directory: directory)
        defer { child.kill() }
        let evd = EvdProcess(child: child, socketPath: directory + "/evd.sock")
        let deadline = ContinuousClock.now + .seconds(60)
        var ready = false
        while !ready && child.process.isRunning && ContinuousClock.now < deadline {
            ready = (try? await evd.ping()) == true
            if !ready { try await Task.sleep(for: .milliseconds(50)) }
        }
        try #require(ready, "evd did not start")
        try await body(evd)
        child.signal(SIGTERM)
        let result = try await child.finish(within: 30)
        #expect(result.status == 0, "\(result.stderr)")
    }
}

/// The resident set size of process `pid` (`VmRSS`), in bytes.
private func residentBytes(of pid: Int32) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return line.split(separator: " ").dropFirst().first.flatMap { Int($0) }.map { $0 << 10 }
    }
    return nil
}
