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
            let create = try await runProcess(self.evctl, ["sql", "create table dogs(id integer primary key, name text, age)"], environment: env)
            #expect(create.status == 0, "\(create.stderr)")
            let insert = try await runProcess(self.evctl, ["sql", "insert into dogs(name, age) values (?, ?)", "Rex", "4"], environment: env)
            #expect(insert.status == 0)
            #expect(jsonLines(insert.stdout).first?["changes"] == 1)
            // The socket given before the subcommand works as well as after it.
            let select = try await runProcess(
                self.evctl, ["--socket", daemon.socketPath, "sql", "select name, age, ? from dogs", "\"42\""])
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
            try await daemon.request("create_table", ["table": "dogs", "columns": [["name": "id", "type": "integer"], ["name": "name"]], "pk": "id"])
            let insert = try await runProcess(
                self.evctl, ["insert", "dogs", #"{"id": 1, "name": "Cleo"}"#, #"[{"id": 2, "name": "Rex"}, {"id": 3, "name": "Max"}]"#],
                environment: env)
            #expect(insert.status == 0, "\(insert.stderr)")
            #expect(jsonLines(insert.stdout).first?["inserted"] == 3)
            let altered = try await runProcess(
                self.evctl, ["insert", "dogs", "--alter", "--return", #"{"id": 4, "name": "Fido", "age": 3}"#], environment: env)
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
        #expect(nobody.status != 0)
        #expect(nobody.stderr.contains("cannot connect"))
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
                ["--socket", daemon.socketPath, "--count", "2", "--where", "statement=select 2", "*_cursor_execute"])
            try await waitForSubscriptions(daemon, atLeast: 1)
            try await daemon.request("execute", ["sql": "select 1"])
            try await daemon.request("execute", ["sql": "select 2"])
            let result = try await tail.finish()
            #expect(result.status == 0, "\(result.stderr)")
            let lines = jsonLines(result.stdout)
            #expect(lines.map { $0["event"] } == ["before_cursor_execute", "after_cursor_execute"])
            #expect(lines.allSatisfy { $0["statement"] == "select 2" && $0["type"] == "event" })
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
                "/bin/bash", ["-c", "set -o pipefail; '\(self.evtail)' --socket '\(daemon.socketPath)' '*_cursor_execute' | head -1"])
            try await waitForSubscriptions(daemon, atLeast: 1)
            // Keep events coming until head has exited and evtail has noticed the closed pipe.
            for _ in 0..<500 where shell.process.isRunning {
                try await daemon.request("execute", ["sql": "select 1"])
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
                environment: ["EVD_SOCKET": daemon.socketPath])
            try await waitForSubscriptions(daemon, atLeast: 1)
            try await daemon.request("execute", ["sql": "select 40 + 2"])
            let result = try await python.finish()
            #expect(result.status == 0, "\(result.stderr)")
            let lines = jsonLines(result.stdout)
            #expect(lines.map { $0["event"] } == ["before_cursor_execute", "after_cursor_execute"])
            #expect(lines.last?["statement"] == "select 40 + 2")
        }
    }
}
