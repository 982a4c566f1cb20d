import EvdClient
import Foundation
import OrderedCollections
import Testing

@testable import EvdDaemon

/// Waits (bounded) until the daemon has at least `count` subscriptions: a spawned subscriber is ready.
func waitForSubscriptions(_ daemon: RunningDaemon, atLeast count: Int) async throws {
    for _ in 0..<500 {
        let stats = try await daemon.request("stats")
        if let n = stats["subscriptions"]?.intValue, n >= count { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    Issue.record("no subscriber appeared")
}

/// Parses NDJSON output into objects.
func jsonLines(_ text: String) -> [JSONObject] {
    text.split(separator: "\n").compactMap { try? JSONValue(parsing: String($0)).objectValue }
}

@Suite("evctl and evtail, as built binaries")
struct CLITests {
    let evctl = binaryPath("evctl")
    let evtail = binaryPath("evtail")

    @Test("evctl sql creates, inserts with parameters (JSON values, else strings) and selects")
    func evctlSQL() async throws {
        try await withRunningDaemon { daemon in
            let env = ["EVD_SOCKET": daemon.socketPath]
            let create = try await runProcess(
                self.evctl,
                ["sql", "create table dogs(id integer primary key, name text, age)"],
                environment: env
            )
            #expect(create.status == 0, "\(create.stderr)")
            let insert = try await runProcess(
                self.evctl,
                ["sql", "insert into dogs(name, age) values (?, ?)", "Rex", "4"],
                environment: env
            )
            #expect(insert.status == 0)
            #expect(jsonLines(insert.stdout).first?["changes"] == 1)
            // The socket given before the subcommand works as well as after it.
            let select = try await runProcess(
                self.evctl,
                ["--socket", daemon.socketPath, "sql", "select name, age, ? from dogs", "\"42\""]
            )
            #expect(select.status == 0, "\(select.stderr)")
            #expect(jsonLines(select.stdout).first?["rows"] == [["Rex", 4, "42"]])
            let after = try await runProcess(self.evctl, ["sql", "select count(*) from dogs", "--socket", daemon.socketPath])
            #expect(jsonLines(after.stdout).first?["rows"] == [[1]])
        }
    }

    @Test("evctl insert takes rows as JSON objects or arrays, with --alter and --return; evctl describe lists columns")
    func evctlInsert() async throws {
        try await withRunningDaemon { daemon in
            let env = ["EVD_SOCKET": daemon.socketPath]
            try await daemon.request(
                "create_table",
                ["table": "dogs", "columns": [["name": "id", "type": "integer"], ["name": "name"]], "pk": "id"]
            )
            let insert = try await runProcess(
                self.evctl,
                ["insert", "dogs", #"{"id": 1, "name": "Cleo"}"#, #"[{"id": 2, "name": "Rex"}, {"id": 3, "name": "Max"}]"#],
                environment: env
            )
            #expect(insert.status == 0, "\(insert.stderr)")
            #expect(jsonLines(insert.stdout).first?["inserted"] == 3)
            let altered = try await runProcess(
                self.evctl,
                ["insert", "dogs", "--alter", "--return", #"{"id": 4, "name": "Fido", "age": 3}"#],
                environment: env
            )
            #expect(altered.status == 0, "\(altered.stderr)")
            #expect(jsonLines(altered.stdout).first?["rows"] == [["id": 4, "name": "Fido", "age": 3]])
            let unknown = try await runProcess(self.evctl, ["insert", "dogs", #"{"id": 5, "colour": "red"}"#], environment: env)
            #expect(unknown.status == 1)
            #expect(unknown.stderr.contains("invalid columns: colour"))
            let bad = try await runProcess(self.evctl, ["insert", "dogs", "42"], environment: env)
            #expect(bad.status != 0)
            let described = try await runProcess(self.evctl, ["describe", "dogs"], environment: env)
            let names = jsonLines(described.stdout).first?["columns"]?.arrayValue?.map { $0["name"] }
            #expect(names == ["id", "name", "age"])
        }
    }

    @Test("evctl prints errors on stderr with a non-zero exit")
    func evctlErrors() async throws {
        try await withRunningDaemon { daemon in
            let env = ["EVD_SOCKET": daemon.socketPath]
            let failed = try await runProcess(self.evctl, ["sql", "select * from nothere"], environment: env)
            #expect(failed.status == 1)
            #expect(failed.stdout.isEmpty)
            #expect(failed.stderr.contains("sql_error"))
            #expect(failed.stderr.contains("no such table: nothere"))
        }
        let nobody = try await runProcess(self.evctl, ["--socket", "/tmp/evd-no-such-dir/evd.sock", "ping"])
        #expect(nobody.status == 69)
        #expect(nobody.stderr.contains("cannot connect"))
    }

    // MARK: evctl's exit statuses, one test each (documented in `evctl --help` and README.md)

    @Test("evctl exit status 0: the request succeeded, its result as one JSON line on stdout, nothing on stderr")
    func evctlExitOK() async throws {
        try await withRunningDaemon { daemon in
            let env = ["EVD_SOCKET": daemon.socketPath]
            for arguments in [["ping"], ["sql", "select 1"], ["emit", "myapp.ok"], ["events"], ["token", "create", "--json"]] {
                let result = try await runProcess(self.evctl, arguments, environment: env)
                #expect(result.status == 0, "\(arguments): \(result.stderr)")
                #expect(result.stderr.isEmpty, "\(arguments)")
                #expect(jsonLines(result.stdout).count == 1, "\(arguments): \(result.stdout)")
            }
            // token create prints the bare token by default, for EVD_TOKEN=$(evctl token create).
            let token = try await runProcess(self.evctl, ["token", "create"], environment: env)
            #expect(token.status == 0)
            #expect(token.stdout.hasPrefix("evd_") && token.stdout.hasSuffix("\n"), "\(token.stdout)")
        }
    }

    @Test("evctl exit status 1: evd answered with an error (on stderr, stdout empty)")
    func evctlExitErrorReply() async throws {
        try await withRunningDaemon { daemon in
            let env = ["EVD_SOCKET": daemon.socketPath]
            let cases: [([String], String)] = [
                (["sql", "select * from nothere"], "sql_error"),
                (["describe", "nothere"], "no_such_table"),
                (["emit", "nonamespace"], "unknown_event"),
                (["--token", "evd_forged", "ping"], "token_invalid"),
            ]
            for (arguments, code) in cases {
                let result = try await runProcess(self.evctl, arguments, environment: env)
                #expect(result.status == 1, "\(arguments): \(result.stderr)")
                #expect(result.stdout.isEmpty, "\(arguments)")
                #expect(result.stderr.hasPrefix("evctl: "), "\(arguments): \(result.stderr)")
                #expect(result.stderr.contains(code), "\(arguments): \(result.stderr)")
            }
        }
    }

    @Test("evctl exit status 64: a bad subcommand, option or argument, refused before anything is sent")
    func evctlExitUsage() async throws {
        // No daemon at this path: a usage error is reported before evctl would try to connect (69).
        let env = ["EVD_SOCKET": "/tmp/evd-no-such-dir/evd.sock"]
        let cases: [[String]] = [
            ["frobnicate"], ["sql"], ["ping", "--no-such-option"], ["insert", "dogs", "42"], ["emit", "myapp.x", "[1]"],
            ["token", "create", "--restrict-database", "nocolon"], ["token", "create", "--expires-after", "soon"],
        ]
        for arguments in cases {
            let result = try await runProcess(self.evctl, arguments, environment: env)
            #expect(result.status == 64, "\(arguments): \(result.stderr)")
            #expect(result.stdout.isEmpty, "\(arguments)")
            #expect(!result.stderr.isEmpty, "\(arguments)")
        }
    }

    @Test(
        "evctl exit status 69: no daemon to ask (no socket file, nobody listening, no right to the socket, or the connection ends before the answer), each said so a person can act on it"
    )
    func evctlExitUnavailable() async throws {
        try await withTemporaryDirectory { directory in
            // No such file.
            let missing = try await runProcess(self.evctl, ["--socket", directory + "/missing.sock", "ping"])
            #expect(missing.status == 69, "\(missing.stderr)")
            // What a person can act on: the reason and what to do, not the socket call's text.
            #expect(
                missing.stderr.hasPrefix(
                    "evctl: cannot connect to evd at \(directory)/missing.sock: No such file or directory (is evd running?"
                ),
                "\(missing.stderr)"
            )
            #expect(!missing.stderr.contains("descriptor"), "\(missing.stderr)")
            let tail = try await runProcess(self.evtail, ["--socket", directory + "/missing.sock"])
            #expect(tail.status == 69, "\(tail.stderr)")
            #expect(tail.stderr.hasPrefix("evtail: cannot connect to evd at"), "\(tail.stderr)")
            // A socket file nobody listens on (a daemon that died without removing it).
            let stale = directory + "/stale.sock"
            let fd = try boundUnixSocket(at: stale)
            close(fd)
            let refused = try await runProcess(self.evctl, ["--socket", stale, "sql", "select 1"])
            #expect(refused.status == 69, "\(refused.stderr)")
            #expect(refused.stdout.isEmpty)
            #expect(refused.stderr.contains("Connection refused (nothing answers there"), "\(refused.stderr)")
            // Another uid that may not open the socket (the test's directory is 0700, root's).
            let guarded = directory + "/guarded.sock"
            let listening = try boundUnixSocket(at: guarded)
            defer { close(listening) }
            listen(listening, 1)
            let denied = try await runProcess(
                "/usr/bin/setpriv",
                ["--reuid=65534", "--regid=65534", "--clear-groups", self.evctl, "--socket", guarded, "ping"]
            )
            #expect(denied.status == 69, "\(denied.stderr)")
            #expect(denied.stderr.contains("Permission denied (this user may not open evd's socket"), "\(denied.stderr)")
            // A peer that says hello, reads the request and hangs up without an answer.
            let vanishing = directory + "/vanishing.sock"
            let server = try boundUnixSocket(at: vanishing)
            listen(server, 1)
            Thread.detachNewThread { helloThenHangUp(server) }
            let cut = try await runProcess(self.evctl, ["--socket", vanishing, "ping"])
            #expect(cut.status == 69, "\(cut.stderr)")
            #expect(cut.stdout.isEmpty)
            #expect(cut.stderr.contains("closed"), "\(cut.stderr)")
        }
    }

    @Test("evctl --help documents the exit statuses")
    func evctlHelpExitStatuses() async throws {
        let help = try await runProcess(self.evctl, ["--help"])
        #expect(help.status == 0)
        for line in [
            "Exit status:", "0   the request succeeded", "1   evd answered with an error", "64  usage", "69  evd could not be reached",
        ] {
            #expect(help.stdout.contains(line), "\(line)\n\(help.stdout)")
        }
    }

    @Test("evctl ping, events, stats, emit")
    func evctlOthers() async throws {
        try await withRunningDaemon { daemon in
            let env = ["EVD_SOCKET": daemon.socketPath]
            let ping = try await runProcess(self.evctl, ["ping"], environment: env)
            #expect(ping.status == 0)
            #expect(ping.stdout == "{}\n")
            let events = try await runProcess(self.evctl, ["events"], environment: env)
            #expect(jsonLines(events.stdout).first?["events"]?.arrayValue?.count == EventKind.allCases.count)
            let emitted = try await runProcess(self.evctl, ["emit", "myapp.deployed", #"{"version":"1.2"}"#], environment: env)
            #expect(emitted.status == 0, "\(emitted.stderr)")
            #expect(jsonLines(emitted.stdout).first?["seq"]?.intValue != nil)
            let stats = try await runProcess(self.evctl, ["stats", "--json"], environment: env)
            #expect(jsonLines(stats.stdout).first?["events"]?["myapp.deployed"] == 1)
        }
    }

    @Test("evtail prints NDJSON into a pipe, filters with --where, and exits 0 after --count")
    func evtailCount() async throws {
        try await withRunningDaemon { daemon in
            let tail = try Spawned(
                self.evtail,
                ["--socket", daemon.socketPath, "--count", "2", "--where", "statement=select 2", "*_cursor_execute"]
            )
            try await waitForSubscriptions(daemon, atLeast: 1)
            try await daemon.request(.execute(.init(sql: "select 1")))
            try await daemon.request(.execute(.init(sql: "select 2")))
            let result = try await tail.finish()
            #expect(result.status == 0, "\(result.stderr)")
            let lines = jsonLines(result.stdout)
            #expect(lines.map { $0["event"] } == ["before_cursor_execute", "after_cursor_execute"])
            #expect(lines.allSatisfy { $0["statement"] == "select 2" && $0["type"] == "event" })
        }
    }

    @Test("evtail --cursor: a second run starts after what the first printed (evd keeps the position), then --since repositions")
    func evtailCursor() async throws {
        try await withRunningDaemon { daemon in
            var seqs: [Int64] = []
            for i in 0..<6 {
                seqs.append(try await daemon.request("emit", ["event": "app.n", "data": ["i": .integer(i)]])["seq"]!.intValue!)
            }
            func tail(_ arguments: [String]) async throws -> [Int64] {
                let result = try await runProcess(self.evtail, ["--socket", daemon.socketPath] + arguments)
                #expect(result.status == 0, "\(result.stderr)")
                return jsonLines(result.stdout).compactMap { $0["seq"]?.intValue }
            }
            // A new cursor starts at --since; each run acknowledges what it printed as it exits.
            #expect(try await tail(["--cursor", "t", "--since", String(seqs[0] - 1), "--count", "2", "app.*"]) == Array(seqs[0..<2]))
            #expect(try await tail(["--cursor", "t", "--count", "3", "app.*"]) == Array(seqs[2..<5]))
            #expect(try await tail(["--cursor", "t", "--count", "1", "app.*"]) == [seqs[5]])
            #expect(try await tail(["--cursor", "t", "--since", String(seqs[3]), "--count", "1", "app.*"]) == [seqs[4]])
            let refused = try await runProcess(self.evtail, ["--socket", daemon.socketPath, "--cursor", "t", "--resume", "--name", "x"])
            #expect(refused.status != 0 && refused.stderr.contains("--cursor"))
        }
    }

    @Test("evtail exits 0 on SIGTERM and on SIGINT")
    func evtailSignals() async throws {
        for signal in [SIGTERM, SIGINT] {
            try await withRunningDaemon { daemon in
                let tail = try Spawned(self.evtail, ["--socket", daemon.socketPath, "checkout"])
                try await waitForSubscriptions(daemon, atLeast: 1)
                kill(tail.process.processIdentifier, signal)
                let result = try await tail.finish()
                #expect(result.status == 0, "signal \(signal)")
                #expect(tail.process.terminationReason == .exit, "signal \(signal) killed evtail instead of a clean exit")
            }
        }
    }

    @Test("evtail | head -1 exits 0 when the pipe closes")
    func evtailClosedPipe() async throws {
        try await withRunningDaemon { daemon in
            let shell = try Spawned(
                "/bin/bash",
                ["-c", "set -o pipefail; '\(self.evtail)' --socket '\(daemon.socketPath)' '*_cursor_execute' | head -1"]
            )
            try await waitForSubscriptions(daemon, atLeast: 1)
            // Keep events coming until head has exited and evtail has noticed the closed pipe.
            for _ in 0..<500 where shell.process.isRunning {
                try await daemon.request(.execute(.init(sql: "select 1")))
                try await Task.sleep(for: .milliseconds(10))
            }
            let result = try await shell.finish()
            #expect(result.status == 0, "pipeline status \(result.status): \(result.stderr)")
            #expect(jsonLines(result.stdout).count == 1)
        }
    }

    @Test("evtail rejects an unknown event with the daemon's suggestion")
    func evtailUnknownEvent() async throws {
        try await withRunningDaemon { daemon in
            let result = try await runProcess(self.evtail, ["--socket", daemon.socketPath, "chekout"])
            #expect(result.status == 1)
            #expect(result.stderr.contains("unknown_event"))
            #expect(result.stderr.contains("checkout"))
        }
    }

    @Test("the Python stdlib example subscribes and prints events")
    func pythonExample() async throws {
        try await withRunningDaemon { daemon in
            let python = try Spawned(
                "/usr/bin/env",
                ["python3", repositoryRoot + "/scripts/examples/subscribe.py", "--count", "2", "*_cursor_execute"],
                environment: ["EVD_SOCKET": daemon.socketPath]
            )
            try await waitForSubscriptions(daemon, atLeast: 1)
            try await daemon.request(.execute(.init(sql: "select 40 + 2")))
            let result = try await python.finish()
            #expect(result.status == 0, "\(result.stderr)")
            let lines = jsonLines(result.stdout)
            #expect(lines.map { $0["event"] } == ["before_cursor_execute", "after_cursor_execute"])
            #expect(lines.last?["statement"] == "select 40 + 2")
        }
    }
}

/// Accepts one connection on `server`, sends a `hello`, reads until the request's newline, then
/// closes both: a daemon that dies mid-request. Blocking, so on a thread of its own; a 30 s receive
/// timeout bounds it if nobody comes.
private func helloThenHangUp(_ server: Int32) {
    defer { close(server) }
    var timeout = timeval(tv_sec: 30, tv_usec: 0)
    setsockopt(server, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let connection = accept(server, nil, nil)
    guard connection >= 0 else { return }
    defer { close(connection) }
    setsockopt(connection, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let hello = Array(#"{"type":"hello","protocol":1}"#.utf8) + [0x0a]
    _ = hello.withUnsafeBytes { send(connection, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    var byte: UInt8 = 0
    while true {
        let count = read(connection, &byte, 1)
        if count < 0 && errno == EINTR { continue }
        if count <= 0 || byte == 0x0a { return }
    }
}
