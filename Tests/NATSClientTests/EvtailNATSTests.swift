import EvdClient
import Foundation
import NATSClient
import NATSTestSupport
import Testing

/// `evtail --nats`: the real evtail binary reading a real nats-server's stream, filled in evforward's
/// format, compared line for line with what a local evtail prints for the same events of a real evd.
@Suite("evtail --nats against a real nats-server and evd", .timeLimit(.minutes(2)))
struct EvtailNATSTests {
    @Test("the same lines as a local evtail, as JSON and on a terminal; --since and names/globs select alike")
    func sameOutputAsLocal() async throws {
        try await withEvd { socket in
            try await EvdConnection.withConnection(socketPath: socket) { evd in
                _ = try await evd.request("create_table", ["table": "dogs", "columns": [["name": "name", "type": "text"]]])
                _ = try await evd.request("insert", ["table": "dogs", "rows": [["name": "Rex"]]])
                _ = try await evd.request("emit", ["event": "nt.deployed", "data": ["version": "1.2", "note": "a b"]])
                _ = try await evd.request("insert", ["table": "dogs", "rows": [["name": "Cleo"], ["name": "Bo"]]])
                _ = try await evd.request("emit", ["event": "nt.other", "data": ["n": 2]])
            }
            let local = ["--socket", socket, "--since", "0", "--count", "5", "insert-rows", "create-table", "nt.*"]
            let localJSON = try await runTool(arguments: local + ["--json"])
            #expect(localJSON.status == 0, "\(localJSON.stderr)")
            let events = try localJSON.stdout.split(separator: "\n").map { line in
                try #require(try JSONValue(parsing: Array(line.utf8)).objectValue)
            }
            try #require(events.count == 5)
            let localTerminal = try await runTool(arguments: local, terminal: true)
            #expect(localTerminal.status == 0)

            try await withNATSServer { server in
                try await withConnection(to: server) { nats in
                    let js = JetStream(connection: nats)
                    try await js.createStream(name: "EVD_T", subjects: ["evd.>"])
                    // A login event (not among the names asked for) goes in front: it must be skipped.
                    var forwarded = events
                    forwarded.insert(
                        ["type": "event", "seq": 1, "event": "login", "time": "2026-01-01T00:00:00.000000Z", "method": "peercred"],
                        at: 0
                    )
                    for event in forwarded { try await publishLikeEvforward(js, event) }
                    let url = "nats://127.0.0.1:\(server.port)"
                    let remote = [
                        "--nats", url, "--stream", "EVD_T", "--since", "0", "--count", "5", "insert-rows", "create-table", "nt.*",
                    ]
                    let remoteJSON = try await runTool(arguments: remote + ["--json"])
                    #expect(remoteJSON.status == 0, "\(remoteJSON.stderr)")
                    let expected = events.map { event -> String in
                        var body = event
                        body["subscription"] = nil
                        return String(decoding: JSONValue.object(body).jsonBytes, as: UTF8.self) + "\n"
                    }
                    #expect(remoteJSON.stdout == expected.joined())
                    let remoteTerminal = try await runTool(arguments: remote, terminal: true)
                    #expect(remoteTerminal.status == 0)
                    #expect(remoteTerminal.stdout == localTerminal.stdout)
                    #expect(remoteTerminal.stdout.split(separator: "\n").count == 5)

                    // --since an evd seq, and one glob: what a local evtail prints for the same.
                    let second = try #require(events[1]["seq"]?.intValue)
                    let sinceLocal = try await runTool(
                        arguments: ["--socket", socket, "--since", "\(second)", "--count", "2", "nt.*"],
                        terminal: true
                    )
                    let sinceRemote = try await runTool(
                        arguments: ["--nats", url, "--stream", "EVD_T", "--since", "\(second)", "--count", "2", "nt.*"],
                        terminal: true
                    )
                    #expect(sinceRemote.status == 0)
                    #expect(sinceRemote.stdout == sinceLocal.stdout)
                    #expect(sinceRemote.stdout.contains("nt.deployed") && sinceRemote.stdout.contains("nt.other"))

                    // One name (a server-side filter subject): still what a local evtail prints.
                    let oneLocal = try await runTool(
                        arguments: ["--socket", socket, "--since", "0", "--count", "2", "insert-rows"],
                        terminal: true
                    )
                    let oneRemote = try await runTool(
                        arguments: ["--nats", url, "--stream", "EVD_T", "--since", "0", "--count", "2", "insert-rows"],
                        terminal: true
                    )
                    #expect(oneRemote.status == 0)
                    #expect(oneRemote.stdout == oneLocal.stdout)
                    #expect(oneRemote.stdout.split(separator: "\n").count == 2)
                }
            }
        }
    }

    @Test("through the real evforward: the same lines as a local evtail, on a terminal and as JSON; SIGTERM stops evforward with 0")
    func throughEvforward() async throws {
        try await withEvd { socket in
            try await withNATSServer { server in
                let url = "nats://127.0.0.1:\(server.port)"
                let forwarder = try Spawned(binaryPath("evforward"), ["--nats", url, "--stream", "EVD_E2E", "--socket", socket])
                defer { forwarder.terminate() }
                try await EvdConnection.withConnection(socketPath: socket) { evd in
                    _ = try await evd.request("create_table", ["table": "dogs", "columns": [["name": "name", "type": "text"]]])
                    _ = try await evd.request("insert", ["table": "dogs", "rows": [["name": "Rex"]]])
                    _ = try await evd.request("emit", ["event": "nt.deployed", "data": ["version": "1.2", "note": "a b"]])
                }
                let names = ["insert-rows", "create-table", "nt.*"]
                let local = try await runTool(arguments: ["--socket", socket, "--since", "0", "--count", "3"] + names, terminal: true)
                #expect(local.status == 0)
                // evtail --nats waits for what evforward has not stored yet: no polling needed.
                let remote = try await runTool(
                    arguments: ["--nats", url, "--stream", "EVD_E2E", "--since", "0", "--count", "3"] + names,
                    terminal: true
                )
                #expect(remote.status == 0, "\(remote.stdout)")
                #expect(remote.stdout == local.stdout)
                #expect(remote.stdout.split(separator: "\n").count == 3)
                let localJSON = try await runTool(arguments: ["--socket", socket, "--since", "0", "--count", "3", "--json"] + names)
                let remoteJSON = try await runTool(
                    arguments: ["--nats", url, "--stream", "EVD_E2E", "--since", "0", "--count", "3", "--json"] + names
                )
                let withoutSubscription = try localJSON.stdout.split(separator: "\n").map { line -> String in
                    var object = try #require(try JSONValue(parsing: Array(line.utf8)).objectValue)
                    object["subscription"] = nil
                    return String(decoding: JSONValue.object(object).jsonBytes, as: UTF8.self) + "\n"
                }
                #expect(remoteJSON.stdout == withoutSubscription.joined())
                forwarder.terminate()
                let stopped = try await forwarder.finish(within: 30)
                #expect(stopped.status == 0, "\(stopped.stderr)")
            }
        }
    }

    @Test("without --since it starts live: what was stored before is not printed, what comes later is")
    func followsLive() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "EVD_T", subjects: ["evd.>"])
                try await publishLikeEvforward(js, syntheticEvent(seq: 1))
                let tail = try Spawned(
                    binaryPath("evtail"),
                    ["--nats", "nats://127.0.0.1:\(server.port)", "--stream", "EVD_T", "--count", "2", "--json"]
                )
                // Ready once its consumer exists.
                let deadline = ContinuousClock.now + .seconds(20)
                while try await js.streamInfo(name: "EVD_T").raw["state"]?["consumer_count"]?.intValue == 0,
                    ContinuousClock.now < deadline
                {
                    try await Task.sleep(for: .milliseconds(20))
                }
                for seq in 2...3 { try await publishLikeEvforward(js, syntheticEvent(seq: Int64(seq))) }
                let result = try await tail.finish(within: 20)
                #expect(result.status == 0, "\(result.stderr)")
                let seqs = result.stdout.split(separator: "\n").map { try? JSONValue(parsing: Array($0.utf8))["seq"]?.intValue }
                #expect(seqs == [2, 3])
            }
        }
    }

    @Test("one event name whose subject form is fixed becomes the consumer's filter subject; the output is the same")
    func filterSubject() async throws {
        try await withNATSServer { server in
            try await withConnection(to: server) { nats in
                let js = JetStream(connection: nats)
                try await js.createStream(name: "EVD_T", subjects: ["evd.>"])
                let tail = try Spawned(
                    binaryPath("evtail"),
                    ["--nats", "nats://127.0.0.1:\(server.port)", "--stream", "EVD_T", "--count", "1", "--json", "insert-rows"]
                )
                var filter: String?
                let deadline = ContinuousClock.now + .seconds(20)
                while filter == nil, ContinuousClock.now < deadline {
                    let list = try await nats.request(subject: "$JS.API.CONSUMER.LIST.EVD_T", payload: [])
                    filter = try JSONValue(parsing: list.payload)["consumers"]?.arrayValue?.first?["config"]?["filter_subject"]?.stringValue
                    if filter == nil { try await Task.sleep(for: .milliseconds(20)) }
                }
                #expect(filter == "evd.*.insert-rows.*")
                var login = syntheticEvent(seq: 1)
                login["event"] = "login"
                login["table"] = nil
                login["database"] = nil
                try await publishLikeEvforward(js, login)
                try await publishLikeEvforward(js, syntheticEvent(seq: 2))
                let result = try await tail.finish(within: 20)
                #expect(result.status == 0, "\(result.stderr)")
                #expect(result.stdout.split(separator: "\n").map { try? JSONValue(parsing: Array($0.utf8))["seq"]?.intValue } == [2])
            }
        }
    }

    @Test("a NATS server restart while following: evtail reconnects and goes on after the last event it printed")
    func reconnects() async throws {
        let port = try freePort()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("evtail-nats-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: directory) }
        let arguments = ["-js", "-sd", directory.appendingPathComponent("js").path, "-a", "127.0.0.1", "-p", "\(port)"]
        var server = try Spawned(try NATSServer.executable(), arguments)
        defer { server.terminate() }
        func publish(_ seqs: ClosedRange<Int64>) async throws {
            var nats: NATSConnection?
            for _ in 0..<250 where nats == nil {
                nats = try? await NATSConnection.connect(host: "127.0.0.1", port: port)
                if nats == nil { try await Task.sleep(for: .milliseconds(20)) }
            }
            let connection = try #require(nats)
            let js = JetStream(connection: connection)
            try await js.createStream(name: "EVD_T", subjects: ["evd.>"])
            for seq in seqs { try await publishLikeEvforward(js, syntheticEvent(seq: seq)) }
            try await connection.close()
        }
        try await publish(1...2)
        let tail = try Spawned(
            binaryPath("evtail"),
            ["--nats", "nats://127.0.0.1:\(port)", "--stream", "EVD_T", "--since", "0", "--count", "4", "--json"]
        )
        let deadline = ContinuousClock.now + .seconds(20)
        while tail.outputSoFar.split(separator: "\n").count < 2, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        server.terminate()
        _ = try await server.finish(within: 20)
        server = try Spawned(try NATSServer.executable(), arguments)
        try await publish(3...4)
        let result = try await tail.finish(within: 30)
        #expect(result.status == 0, "\(result.stderr)")
        let seqs = result.stdout.split(separator: "\n").map { try? JSONValue(parsing: Array($0.utf8))["seq"]?.intValue }
        #expect(seqs == [1, 2, 3, 4])
        #expect(result.stderr.contains("reconnecting"))
    }

    @Test("errors: unreachable NATS, a missing stream, a bad URL, --nats without --stream: a clear message and a non-zero status")
    func errors() async throws {
        // A port nobody listens on: bound, then closed.
        let closedPort = try freePort()
        let unreachable = try await runTool(arguments: ["--nats", "nats://127.0.0.1:\(closedPort)", "--stream", "S"])
        #expect(unreachable.status == 1)
        #expect(unreachable.stderr.contains("evtail: cannot connect to NATS at nats://127.0.0.1:\(closedPort)"))
        try await withNATSServer { server in
            let missing = try await runTool(arguments: ["--nats", "127.0.0.1:\(server.port)", "--stream", "NOPE", "--since", "3"])
            #expect(missing.status == 1)
            #expect(missing.stderr.contains("has no stream NOPE"), "\(missing.stderr)")
            let missingLive = try await runTool(arguments: ["--nats", "127.0.0.1:\(server.port)", "--stream", "NOPE"])
            #expect(missingLive.status == 1)
            #expect(missingLive.stderr.contains("has no stream NOPE"), "\(missingLive.stderr)")
        }
        let badURL = try await runTool(arguments: ["--nats", "tls://x:1", "--stream", "S"])
        #expect(badURL.status != 0)
        #expect(badURL.stderr.contains("only nats:// URLs"))
        let noStream = try await runTool(arguments: ["--nats", "nats://127.0.0.1:4222"])
        #expect(noStream.status != 0)
        #expect(noStream.stderr.contains("--nats needs --stream"))
        let withSocket = try await runTool(arguments: ["--nats", "nats://127.0.0.1:4222", "--stream", "S", "--socket", "/x"])
        #expect(withSocket.status != 0)
        #expect(withSocket.stderr.contains("--nats goes only with"))
    }
}

// MARK: Helpers

/// An event as evd would send it (with a `subscription`, which forwarding drops).
private func syntheticEvent(seq: Int64) -> JSONObject {
    [
        "type": "event", "seq": .integer(seq), "epoch": "0123456789abcdef", "event": "insert-rows",
        "time": "2026-01-01T00:00:00.000000Z", "subscription": 1, "session": 3, "actor": ["id": "uid:1000"],
        "database": "main", "table": "dogs", "num_rows": 1,
    ]
}

/// Publishes `event` as evforward does (docs and /work/spec21.md): subject `evd.<db>.<event>[.<table>]`,
/// the body without `subscription`, `Nats-Msg-Id` and the CloudEvents headers.
private func publishLikeEvforward(_ js: JetStream, _ event: JSONObject) async throws {
    var body = event
    body["subscription"] = nil
    let seq = event["seq"]?.intValue ?? 0
    let epoch = event["epoch"]?.stringValue ?? "0000000000000000"
    let name = event["event"]?.stringValue ?? ""
    var subject = "evd.\(NATSSubject.token(event["database"]?.stringValue ?? "_")).\(NATSSubject.token(name))"
    var headers: NATSHeaders = [
        "Nats-Msg-Id": "\(epoch):\(seq)", "ce-specversion": "1.0", "ce-id": "\(epoch):\(seq)", "ce-type": name,
        "ce-time": event["time"]?.stringValue ?? "",
    ]
    if let table = event["table"]?.stringValue {
        subject += ".\(NATSSubject.token(table))"
        headers["ce-subject"] = table
    }
    let padded = String(seq)
    headers["ce-sequence"] = String(repeating: "0", count: max(0, 20 - padded.count)) + padded
    _ = try await js.publish(subject: subject, headers: headers, payload: JSONValue.object(body).jsonBytes)
}

/// Runs evtail to completion; `terminal: true` runs it under `script(1)`, on a pseudo-terminal (its
/// readable lines; the terminal's CR LF become LF).
private func runTool(arguments: [String], terminal: Bool = false) async throws -> ToolResult {
    let evtail = binaryPath("evtail")
    guard terminal else { return try await Spawned(evtail, arguments).finish(within: 30) }
    let command = ([evtail] + arguments).map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }.joined(separator: " ")
    var result = try await Spawned("/usr/bin/script", ["-qec", command, "/dev/null"]).finish(within: 30)
    result.stdout = result.stdout.replacingOccurrences(of: "\r\n", with: "\n")
    return result
}

/// Starts the built evd on a temporary socket, state directory and database; runs `body`; stops it.
private func withEvd(_ body: (String) async throws -> Void) async throws {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("evtail-nats-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let socket = directory.appendingPathComponent("evd.sock").path
    let evd = try Spawned(
        binaryPath("evd"),
        [
            "--socket", socket, "--state-dir", directory.appendingPathComponent("state").path,
            "--db", "main=" + directory.appendingPathComponent("main.db").path, "--log-level", "error",
        ]
    )
    defer { evd.terminate() }
    let deadline = ContinuousClock.now + .seconds(30)
    while !FileManager.default.fileExists(atPath: socket) {
        guard evd.isRunning, ContinuousClock.now < deadline else {
            let result = try await evd.finish(within: 1)
            throw NATSServer.StartFailed(description: "evd did not start: \(result.stderr)")
        }
        try await Task.sleep(for: .milliseconds(20))
    }
    try await body(socket)
    evd.terminate()
    _ = try await evd.finish(within: 30)
}
