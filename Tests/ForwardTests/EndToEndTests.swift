import EvdClient
import Foundation
import NATSTestSupport
import Testing

@testable import NATSClient

/// A running evd (the built binary) on a socket in a temporary directory.
struct RunningEvd {
    let socketPath: String
    let child: Child

    /// Runs `body` on a fresh connection.
    func withClient<T: Sendable>(_ body: (EvdConnection) async throws -> T) async throws -> T {
        try await EvdConnection.withConnection(socketPath: self.socketPath, body)
    }

    /// Inserts `count` rows into `dogs`, one `insert` (so one `insert-rows` event) each.
    func insertRows(_ count: Int, from start: Int = 0) async throws {
        try await self.withClient { evd in
            for index in start..<(start + count) {
                try await evd.request("insert", ["table": "dogs", "rows": [["id": .integer(index), "name": .string("dog \(index)")]]])
            }
        }
    }

    /// Every journaled event so far, as a subscriber replaying from 0 receives it (by seq), and a
    /// custom `test.marker` event emitted to know where "so far" ends (it is journaled too, so it
    /// is one of them).
    func journaledEvents() async throws -> [Int64: JSONObject] {
        try await self.withClient { evd in
            var subscribe = EvdOperation.Subscribe(events: ["*"])
            subscribe.since = 0
            // A cursor's subscription receives journaled events only: what evforward forwards.
            subscribe.cursor = "reference-\(UUID().uuidString)"
            try await evd.request(.subscribe(subscribe))
            let marker = try await self.withClient { try await $0.request("emit", ["event": "test.marker"])["seq"]?.intValue }
            var events: [Int64: JSONObject] = [:]
            while let message = await evd.nextMessage() {
                guard message["type"] == "event", let seq = message["seq"]?.intValue else { continue }
                events[seq] = message
                if seq == marker { break }
            }
            return events
        }
    }
}

/// Starts evd (the built binary) with its socket, state and database in `directory` (a restart
/// with the same directory finds the same journal), and waits until it answers.
func launchEvd(in directory: String, name: String = "evd", extra: [String] = []) async throws -> RunningEvd {
    let child = try Child(
        binaryPath("evd"),
        [
            "--socket", directory + "/evd.sock", "--state-dir", directory + "/state", "--db",
            "main=\(directory)/main.db", "--log-level", "warning",
        ] + extra,
        stderr: directory + "/\(name).stderr"
    )
    let evd = RunningEvd(socketPath: directory + "/evd.sock", child: child)
    let ready = await eventually(within: 60) {
        guard child.isRunning else { return true }
        return (try? await evd.withClient { try await $0.request("ping") }) != nil
    }
    try #require(ready && child.isRunning, "evd did not start: \(child.stderr)")
    return evd
}

/// Starts evd (the built binary) with a `dogs` table in a fresh directory, runs `body`, stops it.
func withEvd(_ body: (RunningEvd) async throws -> Void) async throws {
    try await withTemporaryDirectory { directory in
        let evd = try await launchEvd(in: directory)
        try await evd.createDogs()
        try await body(evd)
        evd.child.signal(SIGTERM)
        _ = await evd.child.finish(within: 30)
    }
}

extension RunningEvd {
    /// Creates the table `dogs (id integer primary key, name text)`.
    func createDogs() async throws {
        _ = try await self.withClient { evd in
            try await evd.request(
                "create_table",
                ["table": "dogs", "columns": [["name": "id", "type": "integer"], ["name": "name", "type": "text"]], "pk": "id"]
            )
        }
    }
}

/// Starts the built evforward against `server` and `evd`; stderr in `directory`.
func startEvforward(
    _ server: NATSServer,
    _ evd: RunningEvd,
    stream: String = "EVD_E2E",
    directory: String,
    name: String = "fwd",
    extra: [String] = []
) throws -> Child {
    try Child(
        binaryPath("evforward"),
        ["--nats", "nats://127.0.0.1:\(server.port)", "--stream", stream, "--socket", evd.socketPath, "--log-level", "debug"] + extra,
        stderr: "\(directory)/\(name).stderr"
    )
}

extension JetStream.StoredMessage {
    /// The evd seq the forwarded event had (its `ce-sequence` header).
    var ceSequence: Int64? { self.headers["ce-sequence"].flatMap { Int64($0) } }
}

/// The evd seq (`ce-sequence`) of the stream's last message; 0 when it has none.
func lastSequence(_ js: JetStream, stream: String = "EVD_E2E") async throws -> Int64 {
    try await js.lastMessage(stream: stream)?.ceSequence ?? 0
}

/// Every message of `stream`, in stream order.
func streamMessages(_ js: JetStream, _ stream: String) async throws -> [JetStream.StoredMessage] {
    let info = try await js.streamInfo(name: stream)
    guard info.lastSeq > 0 else { return [] }
    var messages: [JetStream.StoredMessage] = []
    for seq in info.firstSeq...info.lastSeq {
        messages.append(try await js.getMessage(stream: stream, seq: seq))
    }
    return messages
}

extension Processes {
    @Suite("evforward end to end: real evd, real nats-server, the built binary", .serialized)
    struct EndToEndTests {
        @Test("Forwarded events match what a subscriber receives; a restart resumes with no duplicate and no gap")
        func forwardAndResume() async throws {
            try await withNATSServer { server in
                try await withEvd { evd in
                    try await withTemporaryDirectory { directory in
                        try await evd.insertRows(20)
                        _ = try await evd.withClient {
                            try await $0.request("emit", ["event": "myapp.deployed", "data": ["version": "1.2"]])
                        }
                        let first = try startEvforward(server, evd, directory: directory, name: "first")
                        try await withConnection(to: server) { nats in
                            let js = JetStream(connection: nats)
                            // Every connection logs in and out (journaled events too), so "everything"
                            // is everything up to a marker event, and then up to what was forwarded.
                            let marker = try #require(try await evd.journaledEvents().keys.max())
                            let all = await eventually(within: 60) { (try? await lastSequence(js)) ?? 0 >= marker }
                            #expect(all, "\(first.stderr)")
                            first.signal(SIGTERM)
                            #expect(await first.finish() == 0, "\(first.stderr)")
                            let firstLast = try await lastSequence(js)
                            // At a clean exit the cursor was acknowledged up to the last PubAck'ed event.
                            let cursors = try await evd.withClient { try await $0.request("stats")["cursors"]?.arrayValue ?? [] }
                            let cursor = cursors.first { $0["name"] == "evforward.EVD_E2E" }
                            #expect(cursor?["position"]?.intValue == firstLast, "\(cursors)")

                            // More events while no forwarder runs; then a second run.
                            try await evd.insertRows(15, from: 100)
                            let second = try startEvforward(server, evd, directory: directory, name: "second")
                            let secondMarker = try #require(try await evd.journaledEvents().keys.max())
                            let caughtUp = await eventually(within: 60) { (try? await lastSequence(js)) ?? 0 >= secondMarker }
                            #expect(caughtUp, "\(second.stderr)")
                            second.signal(SIGTERM)
                            #expect(await second.finish() == 0, "\(second.stderr)")
                            #expect(second.stderr.contains("from.seq=\(firstLast)"), "\(second.stderr)")
                            let messages = try await streamMessages(js, "EVD_E2E")
                            let journal = try await evd.journaledEvents()

                            // No duplicate, no gap: the stream's ce-sequences are exactly the journaled
                            // seqs up to the last one forwarded.
                            let sequences = messages.compactMap { $0.ceSequence }
                            let forwardedUpTo = sequences.last ?? 0
                            #expect(sequences == journal.keys.filter { $0 <= forwardedUpTo }.sorted())
                            #expect(Set(messages.compactMap { $0.headers["Nats-Msg-Id"] }).count == messages.count)
                            let expectedAfter = journal

                            // Each body is the event minus `subscription`, keys in the same order.
                            let epoch = try await evd.withClient { $0.hello["epoch"]?.stringValue }
                            for message in messages {
                                let seq = try #require(message.ceSequence)
                                var event = try #require(expectedAfter[seq])
                                event.removeValue(forKey: "subscription")
                                let body = try #require(try JSONValue(parsing: message.payload).objectValue)
                                #expect(Array(body.keys) == Array(event.keys))
                                #expect(body == event)
                                #expect(message.headers["Nats-Msg-Id"] == "\(epoch ?? ""):\(seq)")
                                #expect(message.headers["ce-type"] == event["event"]?.stringValue)
                                #expect(message.headers["ce-time"] == event["time"]?.stringValue)
                                let database = event["database"]?.stringValue
                                let table = event["table"]?.stringValue
                                #expect(message.headers["ce-subject"] == table)
                                var subject =
                                    "evd.\(database.map(NATSSubject.token) ?? "_").\(NATSSubject.token(event["event"]?.stringValue ?? ""))"
                                if let table { subject += ".\(NATSSubject.token(table))" }
                                #expect(message.subject == subject)
                            }
                            #expect(messages.contains { $0.subject == "evd._.myapp%2Edeployed" })
                        }
                    }
                }
            }
        }

        @Test("The stream is created with the documented configuration")
        func streamConfiguration() async throws {
            try await withNATSServer { server in
                try await withEvd { evd in
                    try await withTemporaryDirectory { directory in
                        let child = try startEvforward(
                            server,
                            evd,
                            stream: "EVD_CFG",
                            directory: directory,
                            extra: ["--subject-prefix", "acme.evd"]
                        )
                        try await withConnection(to: server) { nats in
                            let js = JetStream(connection: nats)
                            let created = await eventually(within: 60) { (try? await js.streamInfo(name: "EVD_CFG")) != nil }
                            #expect(created, "\(child.stderr)")
                            let config = try #require(try await js.streamInfo(name: "EVD_CFG").raw["config"]?.objectValue)
                            #expect(config["subjects"] == ["acme.evd.>"])
                            #expect(config["storage"] == "file")
                            #expect(config["retention"] == "limits")
                            let window: Int64? = config["duplicate_window"]?.intValue
                            #expect(window == Int64(600) * 1_000_000_000, "\(String(describing: config["duplicate_window"]))")
                            #expect(config["num_replicas"]?.intValue == 1)
                        }
                        child.signal(SIGTERM)
                        #expect(await child.finish() == 0, "\(child.stderr)")
                    }
                }
            }
        }

        @Test("A second evforward for the same stream and cursor is fenced off: exit 3")
        func secondForwarderFenced() async throws {
            try await withNATSServer { server in
                try await withEvd { evd in
                    try await withTemporaryDirectory { directory in
                        try await evd.insertRows(5)
                        let first = try startEvforward(server, evd, directory: directory, name: "first")
                        let forwarding = await eventually(within: 60) { first.stderr.contains("forwarding") }
                        #expect(forwarding, "\(first.stderr)")
                        let second = try startEvforward(server, evd, directory: directory, name: "second")
                        #expect(await second.finish() == 3, "\(second.stderr)")
                        #expect(second.stderr.contains("fenced"), "\(second.stderr)")
                        #expect(first.isRunning)
                        first.signal(SIGTERM)
                        #expect(await first.finish() == 0, "\(first.stderr)")
                    }
                }
            }
        }

        @Test("Two evforwards started at the same moment: one forwards, the other is fenced off (exit 3)")
        func twoAtOnce() async throws {
            try await withNATSServer { server in
                try await withEvd { evd in
                    try await withTemporaryDirectory { directory in
                        try await evd.insertRows(5)
                        let both = try [
                            startEvforward(server, evd, directory: directory, name: "a"),
                            startEvforward(server, evd, directory: directory, name: "b"),
                        ]
                        let oneExited = await eventually { both.contains { !$0.isRunning } }
                        #expect(oneExited)
                        let fenced = try #require(both.first { !$0.isRunning })
                        let survivor = try #require(both.first { $0.isRunning })
                        #expect(await fenced.finish() == 3, "\(fenced.stderr)")
                        #expect(fenced.stderr.contains("fenced"), "\(fenced.stderr)")
                        try await withConnection(to: server) { nats in
                            let js = JetStream(connection: nats)
                            let marker = try #require(try await evd.journaledEvents().keys.max())
                            #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= marker }, "\(survivor.stderr)")
                            let sequences = try await streamMessages(js, "EVD_E2E").compactMap {
                                $0.ceSequence
                            }
                            #expect(sequences == sequences.sorted() && Set(sequences).count == sequences.count)
                        }
                        survivor.signal(SIGTERM)
                        #expect(await survivor.finish() == 0, "\(survivor.stderr)")
                    }
                }
            }
        }

        @Test("Several --nats URLs: an unreachable one is logged and the next one is used")
        func serverList() async throws {
            try await withNATSServer { server in
                try await withEvd { evd in
                    try await withTemporaryDirectory { directory in
                        try await evd.insertRows(2)
                        let dead = try freePort()
                        let child = try Child(
                            binaryPath("evforward"),
                            [
                                "--nats", "nats://127.0.0.1:\(dead),nats://127.0.0.1:\(server.port)", "--stream", "EVD_E2E",
                                "--socket", evd.socketPath,
                            ],
                            stderr: directory + "/fwd.stderr"
                        )
                        try await withConnection(to: server) { nats in
                            let js = JetStream(connection: nats)
                            let marker = try #require(try await evd.journaledEvents().keys.max())
                            #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= marker }, "\(child.stderr)")
                        }
                        #expect(child.stderr.contains("nats.server=nats://127.0.0.1:\(dead)"), "\(child.stderr)")
                        child.signal(SIGTERM)
                        #expect(await child.finish() == 0, "\(child.stderr)")
                    }
                }
            }
        }

        @Test("With a token ($EVD_TOKEN) the cursor belongs to the token's actor; a bad token is exit 1")
        func token() async throws {
            try await withNATSServer { server in
                try await withEvd { evd in
                    try await withTemporaryDirectory { directory in
                        try await evd.insertRows(2)
                        let token = try #require(try await evd.withClient { try await $0.request("create_token")["token"]?.stringValue })
                        let actor = try await evd.withClient { try await $0.login(token: token)["id"]?.stringValue }
                        let child = try Child(
                            binaryPath("evforward"),
                            ["--nats", "nats://127.0.0.1:\(server.port)", "--stream", "EVD_E2E", "--socket", evd.socketPath],
                            stderr: directory + "/fwd.stderr",
                            environment: ["EVD_TOKEN": token]
                        )
                        try await withConnection(to: server) { nats in
                            let js = JetStream(connection: nats)
                            let marker = try #require(try await evd.journaledEvents().keys.max())
                            #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= marker }, "\(child.stderr)")
                        }
                        let cursors = try await evd.withClient { try await $0.request("stats")["cursors"]?.arrayValue ?? [] }
                        #expect(cursors.first { $0["name"] == "evforward.EVD_E2E" }?["owner"]?.stringValue == actor, "\(cursors)")
                        child.signal(SIGTERM)
                        #expect(await child.finish() == 0, "\(child.stderr)")

                        let bad = try Child(
                            binaryPath("evforward"),
                            ["--nats", "nats://127.0.0.1:\(server.port)", "--stream", "EVD_E2E", "--socket", evd.socketPath],
                            stderr: directory + "/bad.stderr",
                            environment: ["EVD_TOKEN": "evd_not_a_token"]
                        )
                        #expect(await bad.finish() == 1, "\(bad.stderr)")
                        #expect(bad.stderr.contains("evd refused the token"), "\(bad.stderr)")
                    }
                }
            }
        }

        @Test("Another writer in the stream fences evforward off: exit 3")
        func foreignWriterFenced() async throws {
            try await withNATSServer { server in
                try await withEvd { evd in
                    try await withTemporaryDirectory { directory in
                        try await evd.insertRows(3)
                        let child = try startEvforward(server, evd, directory: directory)
                        try await withConnection(to: server) { nats in
                            let js = JetStream(connection: nats)
                            let caughtUp = await eventually(within: 60) {
                                ((try? await js.streamInfo(name: "EVD_E2E"))?.messages ?? 0) >= 4
                            }
                            #expect(caughtUp, "\(child.stderr)")
                            // Someone else publishes into the stream; the next event's fence fails.
                            _ = try await js.publish(subject: "evd.main.intruder", headers: ["Nats-Msg-Id": "intruder"], payload: [])
                            try await evd.insertRows(1, from: 50)
                            #expect(await child.finish() == 3, "\(child.stderr)")
                            #expect(child.stderr.contains("fenced: another forwarder published to EVD_E2E"), "\(child.stderr)")
                        }
                    }
                }
            }
        }
    }
}
