import EvdClient
import Foundation
import OrderedCollections
import Testing

@testable import EvdDaemon

/// `evtail --veto` (PROTOCOL.md §9) as a built binary: a policy listener that denies, or decides by
/// running a command.
@Suite("evtail as a veto listener")
struct EvtailVetoTests {
    let evtail = binaryPath("evtail")

    /// Runs evtail with `arguments` against `daemon` while `body` runs, then stops it (SIGTERM) and
    /// returns its output.
    func withEvtail(
        _ daemon: RunningDaemon,
        _ arguments: [String],
        _ body: () async throws -> Void
    ) async throws -> ProcessResult {
        let before = try await daemon.request("stats")["subscriptions"]?.intValue ?? 0
        let tail = try Spawned(self.evtail, ["--socket", daemon.socketPath] + arguments)
        try await waitForSubscriptions(daemon, atLeast: Int(before) + 1)
        do {
            try await body()
        } catch {
            kill(tail.process.processIdentifier, SIGTERM)
            _ = try? await tail.finish()
            throw error
        }
        #expect(tail.process.isRunning, "evtail exited early")
        kill(tail.process.processIdentifier, SIGTERM)
        let result = try await tail.finish()
        #expect(result.status == 0, "\(result.stderr)")
        return result
    }

    @Test("--deny REASON: the request fails with vetoed and that reason")
    func deny() async throws {
        try await withRunningDaemon { daemon in
            let result = try await self.withEvtail(
                daemon,
                ["--veto", "before_cursor_execute", "--deny", "no way", "--name", "policy", "--timeout-ms", "20000"]
            ) {
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    vetoExpectVetoed(error, event: "before_cursor_execute", by: "policy", reason: "no way")
                }
            }
            // It prints what it decided, as NDJSON into a file.
            let vetoes = jsonLines(result.stdout).filter { $0["type"] == "veto" }
            #expect(vetoes.count == 1)
            #expect(vetoes.first?["statement"] == "select 1")
        }
    }

    @Test("--where narrows what evtail is asked to decide")
    func denyWhere() async throws {
        try await withRunningDaemon { daemon in
            _ = try await self.withEvtail(
                daemon,
                [
                    "--veto", "before_cursor_execute", "--where", "statement=select 1", "--deny", "not this", "--name", "p", "--timeout-ms",
                    "20000",
                ]
            ) {
                try await daemon.withClient { evd in
                    let allowed = try await evd.request(.execute(.init(sql: "select 2")))
                    #expect(allowed["rows"] == [[2]])
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    vetoExpectVetoed(error, event: "before_cursor_execute", by: "p", reason: "not this")
                }
            }
        }
    }

    @Test("--exec: a non-zero exit denies, with the command's stdout or its status as the reason")
    func execDenies() async throws {
        try await withRunningDaemon { daemon in
            _ = try await self.withEvtail(daemon, ["--veto", "before_cursor_execute", "--exec", "exit 3", "--timeout-ms", "20000"]) {
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    #expect(error.code == "vetoed")
                    #expect(error.extra["reason"]?.stringValue?.contains("exited with status 3") == true, "\(error)")
                }
            }
        }
        try await withRunningDaemon { daemon in
            let script = #"cat >/dev/null; echo "not on my watch"; exit 1"#
            _ = try await self.withEvtail(daemon, ["--veto", "before_cursor_execute", "--exec", script, "--timeout-ms", "20000"]) {
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("execute", ["sql": "select 1"])
                    #expect(error.code == "vetoed")
                    #expect(error.extra["reason"] == "not on my watch", "\(error)")
                }
            }
        }
    }

    @Test("--exec: the veto's JSON on stdin; exit 0 allows; a JSON object with set on stdout modifies")
    func execAllowsAndModifies() async throws {
        try await withRunningDaemon { daemon in
            // Allows, and the veto's JSON reached the command.
            let seen = daemon.directory + "/seen.json"
            _ = try await self.withEvtail(
                daemon,
                ["--veto", "before_cursor_execute", "--exec", "cat > '\(seen)'; exit 0", "--timeout-ms", "20000"]
            ) {
                let result = try await daemon.request(.execute(.init(sql: "select 1")))
                #expect(result["rows"] == [[1]])
            }
            let input = try #require(FileManager.default.contents(atPath: seen))
            let veto = try JSONValue(parsing: String(decoding: input, as: UTF8.self))
            #expect(veto["type"] == "veto")
            #expect(veto["statement"] == "select 1")
        }
        try await withRunningDaemon { daemon in
            let script = #"cat >/dev/null; echo '{"set":{"statement":"select 2"}}'"#
            _ = try await self.withEvtail(daemon, ["--veto", "before_cursor_execute", "--exec", script, "--timeout-ms", "20000"]) {
                let result = try await daemon.request(.execute(.init(sql: "select 1")))
                #expect(result["rows"] == [[2]])
            }
        }
    }

    @Test("--exec: a command that runs past the deadline does not wedge evtail; on_timeout decides")
    func execPastDeadline() async throws {
        try await withRunningDaemon { daemon in
            let result = try await self.withEvtail(
                daemon,
                ["--veto", "before_cursor_execute", "--timeout-ms", "300", "--on-timeout", "allow", "--exec", "sleep 5"]
            ) {
                try await daemon.withClient { evd in
                    for n in 1...2 {
                        let inFlight = VetoInFlight { try await evd.request("execute", ["sql": .string("select \(n)")]) }
                        let rows = try await inFlight.value(within: 20)?["rows"]
                        #expect(rows == [[.integer(n)]])
                    }
                }
            }
            #expect(jsonLines(result.stdout).filter { $0["type"] == "veto" }.count == 2)
        }
    }

    @Test("--dry-run: a deny is recorded, not enforced")
    func dryRun() async throws {
        try await withRunningDaemon { daemon in
            try await withVetoTestClient(daemon, ["events": ["before_cursor_execute"]]) { plain in
                _ = try await self.withEvtail(
                    daemon,
                    ["--veto", "before_cursor_execute", "--deny", "no way", "--dry-run", "--name", "audit", "--timeout-ms", "20000"]
                ) {
                    let result = try await daemon.request(.execute(.init(sql: "select 1")))
                    #expect(result["rows"] == [[1]])
                }
                let event = try #require(try await plain.event("before_cursor_execute"))
                #expect(event["outcome"]?["action"] == "allow")
                let dryRun = event["outcome"]?["dry_run"]?.arrayValue ?? []
                #expect(dryRun.count == 1)
                #expect(dryRun.first?["by"] == "audit")
                #expect(dryRun.first?["action"] == "deny")
                #expect(dryRun.first?["reason"] == "no way")
            }
            #expect(try await vetoStatistics(daemon)["dry_run_denied"] == 1)
        }
    }

    @Test("--exec/--deny without --veto, or --veto without either, is a usage error")
    func usage() async throws {
        for arguments in [["--deny", "x"], ["--veto", "before_drop"], ["--veto", "before_drop", "--deny", "x", "--exec", "true"]] {
            let result = try await runProcess(self.evtail, ["--socket", "/nonexistent/evd.sock"] + arguments)
            #expect(result.status != 0, "\(arguments)")
            #expect(!result.stderr.isEmpty, "\(arguments)")
        }
    }
}
