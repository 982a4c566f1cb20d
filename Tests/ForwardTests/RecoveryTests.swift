import EvdClient
import Foundation
import NATSTestSupport
import Testing

@testable import NATSClient

/// A nats-server (JetStream, file storage in `directory`) that can be stopped and started again
/// at the same address with the same streams: the first start lets the server pick a free port
/// (`-p -1`, read from its ports file), the later ones ask for that port again.
final class RestartableNATS {
    private(set) var port = 0
    let directory: String
    private var process: Child?

    init(directory: String) {
        self.directory = directory
    }

    var server: NATSServer { NATSServer(port: self.port, directory: URL(fileURLWithPath: self.directory)) }

    /// Starts it and waits until it accepts connections.
    func start() async throws {
        let port = self.port == 0 ? "-1" : String(self.port)
        let process = try Child(
            try NATSServer.executable(),
            ["-js", "-sd", self.directory + "/js", "-a", "127.0.0.1", "-p", port, "--ports_file_dir", self.directory],
            stderr: self.directory + "/nats.log"
        )
        self.process = process
        if self.port == 0 {
            let portsFile = "\(self.directory)/nats-server_\(process.processIdentifier).ports"
            let found = await eventually(within: 30) {
                guard let data = FileManager.default.contents(atPath: portsFile), let json = try? JSONValue(parsing: [UInt8](data)),
                    let url = (json["nats"] ?? json["client"])?.arrayValue?.first?.stringValue,
                    let last = url.split(separator: ":").last, let value = Int(last)
                else { return false }
                self.port = value
                return true
            }
            try #require(found, "nats-server wrote no ports file")
        }
        let up = await eventually(within: 30) {
            guard let nats = try? await NATSConnection.connect(host: "127.0.0.1", port: self.port) else { return false }
            try? await nats.close()
            return true
        }
        try #require(up && process.isRunning, "nats-server did not start on port \(self.port)")
    }

    /// Stops it (SIGTERM) and waits for the exit.
    func stop() {
        guard let process = self.process else { return }
        process.signal(SIGTERM)
        while process.isRunning { usleep(5_000) }
        self.process = nil
    }

    deinit { self.stop() }
}

extension Processes {
    @Suite("evforward across failures of evd and NATS", .serialized)
    struct RecoveryTests {
        @Test("evd restarts under a running evforward: it reconnects, and every event is in the stream once")
        func evdRestart() async throws {
            try await withNATSServer { server in
                try await withTemporaryDirectory { directory in
                    var evd = try await launchEvd(in: directory)
                    try await evd.createDogs()
                    try await evd.insertRows(10)
                    let forwarder = try startEvforward(server, evd, directory: directory)
                    try await withConnection(to: server) { nats in
                        let js = JetStream(connection: nats)
                        let marker = try #require(try await evd.journaledEvents().keys.max())
                        #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= marker }, "\(forwarder.stderr)")

                        evd.child.signal(SIGTERM)
                        #expect(await evd.child.finish() == 0)
                        evd = try await launchEvd(in: directory, name: "evd2")
                        try await evd.insertRows(10, from: 100)
                        let secondMarker = try #require(try await evd.journaledEvents().keys.max())
                        #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= secondMarker }, "\(forwarder.stderr)")
                        #expect(forwarder.stderr.contains("forwarding interrupted; retrying"), "\(forwarder.stderr)")

                        forwarder.signal(SIGTERM)
                        #expect(await forwarder.finish() == 0, "\(forwarder.stderr)")
                        let sequences = try await streamMessages(js, "EVD_E2E").compactMap {
                            $0.ceSequence
                        }
                        let journal = try await evd.journaledEvents()
                        #expect(sequences == journal.keys.filter { $0 <= (sequences.last ?? 0) }.sorted())
                    }
                    evd.child.signal(SIGTERM)
                    _ = await evd.child.finish()
                }
            }
        }

        @Test("nats-server restarts: evforward retries meanwhile, then forwards what happened, nothing twice")
        func natsRestart() async throws {
            try await withTemporaryDirectory { directory in
                let nats = RestartableNATS(directory: directory)
                try await nats.start()
                try await withEvd { evd in
                    try await evd.insertRows(10)
                    let forwarder = try startEvforward(nats.server, evd, directory: directory)
                    let marker = try #require(try await evd.journaledEvents().keys.max())
                    try await withConnection(to: nats.server) { connection in
                        let js = JetStream(connection: connection)
                        #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= marker }, "\(forwarder.stderr)")
                    }
                    nats.stop()
                    try await evd.insertRows(10, from: 100)
                    let retried = await eventually {
                        forwarder.stderr.components(separatedBy: "forwarding interrupted; retrying").count > 2
                    }
                    #expect(retried, "\(forwarder.stderr)")
                    #expect(forwarder.isRunning)
                    try await nats.start()
                    let secondMarker = try #require(try await evd.journaledEvents().keys.max())
                    try await withConnection(to: nats.server) { connection in
                        let js = JetStream(connection: connection)
                        #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= secondMarker }, "\(forwarder.stderr)")
                        forwarder.signal(SIGTERM)
                        #expect(await forwarder.finish() == 0, "\(forwarder.stderr)")
                        let messages = try await streamMessages(js, "EVD_E2E")
                        let sequences = messages.compactMap { $0.ceSequence }
                        let journal = try await evd.journaledEvents()
                        #expect(sequences == journal.keys.filter { $0 <= (sequences.last ?? 0) }.sorted())
                        #expect(try await js.streamInfo(name: "EVD_E2E").messages == UInt64(messages.count))
                    }
                }
                nats.stop()
            }
        }

        @Test("Live events faster than NATS takes them: evd disconnects it (lagged), it resumes, nothing lost or doubled")
        func lagged() async throws {
            try await withNATSServer { server in
                try await withTemporaryDirectory { directory in
                    let evd = try await launchEvd(in: directory, extra: ["--max-queued-events", "50"])
                    try await evd.createDogs()
                    try await evd.insertRows(300)
                    // One message in flight at a time: far slower than evd produces a burst.
                    let forwarder = try startEvforward(server, evd, directory: directory, extra: ["--max-in-flight", "1"])
                    try await withConnection(to: server) { nats in
                        let js = JetStream(connection: nats)
                        let marker = try #require(try await evd.journaledEvents().keys.max())
                        #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= marker }, "\(forwarder.stderr)")
                        // Live now: one UPDATE makes 300 update-row events at once.
                        _ = try await evd.withClient { try await $0.request("execute", ["sql": "update dogs set name = name || '!'"]) }
                        let burst = try #require(try await evd.journaledEvents().keys.max())
                        #expect(await eventually { (try? await lastSequence(js)) ?? 0 >= burst }, "\(forwarder.stderr)")
                        forwarder.signal(SIGTERM)
                        #expect(await forwarder.finish() == 0, "\(forwarder.stderr)")
                        let sequences = try await streamMessages(js, "EVD_E2E").compactMap {
                            $0.ceSequence
                        }
                        let journal = try await evd.journaledEvents()
                        #expect(sequences == journal.keys.filter { $0 <= (sequences.last ?? 0) }.sorted())
                        #expect(forwarder.stderr.contains("evd reports this subscription lagged"), "\(forwarder.stderr)")
                    }
                    evd.child.signal(SIGTERM)
                    _ = await evd.child.finish()
                }
            }
        }

        /// Why the first message after a (re)connect is fenced by the stream's last *sequence*, not by
        /// its last Msg-Id (issue 21's plan): nats-server 2.9.10 rebuilds the last Msg-Id after a
        /// restart only from messages inside the duplicate window.
        @Test("nats-server forgets the last Msg-Id across a restart once it is outside the duplicate window")
        func lastMsgIDForgotten() async throws {
            try await withTemporaryDirectory { directory in
                let nats = RestartableNATS(directory: directory)
                try await nats.start()
                try await withConnection(to: nats.server) { connection in
                    let js = JetStream(connection: connection)
                    try await js.createStream(name: "L", subjects: ["l.>"], duplicateWindow: .seconds(1))
                    _ = try await js.publish(subject: "l.x", headers: ["Nats-Msg-Id": "m1"], payload: [])
                }
                nats.stop()
                try await Task.sleep(for: .milliseconds(1500))  // m1 leaves the 1 s window
                try await nats.start()
                try await withConnection(to: nats.server) { connection in
                    let js = JetStream(connection: connection)
                    await #expect {
                        try await js.publish(
                            subject: "l.x",
                            headers: ["Nats-Msg-Id": "m2", "Nats-Expected-Last-Msg-Id": "m1"],
                            payload: []
                        )
                    } throws: {
                        ($0 as? JetStream.APIError)?.errCode == 10070
                    }
                    // The sequence is still known: the fence evforward uses passes.
                    let ack = try await js.publish(
                        subject: "l.x",
                        headers: ["Nats-Msg-Id": "m3", "Nats-Expected-Last-Sequence": "1"],
                        payload: []
                    )
                    #expect(ack.seq == 2)
                }
                nats.stop()
            }
        }

        @Test("Metrics on --metrics-listen: Prometheus text with the forwarded count")
        func metrics() async throws {
            try await withNATSServer { server in
                try await withEvd { evd in
                    try await withTemporaryDirectory { directory in
                        try await evd.insertRows(3)
                        let port = try freePort()
                        let forwarder = try startEvforward(
                            server,
                            evd,
                            directory: directory,
                            extra: ["--metrics-listen", "127.0.0.1:\(port)"]
                        )
                        var text = ""
                        let counted = await eventually {
                            text = httpGet(port: port, path: "/metrics") ?? ""
                            guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("evd_forward_forwarded_total ") }),
                                let value = Int(line.split(separator: " ").last ?? "")
                            else { return false }
                            // create-table and the three insert-rows at least.
                            return value >= 4
                        }
                        #expect(counted, "\(text)\n\(forwarder.stderr)")
                        for name in [
                            "evd_forward_forwarded_total", "evd_forward_lag_events", "evd_forward_publish_errors_total",
                            "evd_forward_duplicates_total", "evd_forward_fence_conflicts_total", "evd_forward_in_flight",
                        ] {
                            #expect(text.contains("# TYPE \(name) "), "\(name)")
                        }
                        forwarder.signal(SIGTERM)
                        #expect(await forwarder.finish() == 0, "\(forwarder.stderr)")
                    }
                }
            }
        }
    }
}

/// `GET path` on 127.0.0.1:port over a plain socket (Foundation on Linux has no HTTP without
/// FoundationNetworking); the response's text, headers included, or nil.
func httpGet(port: Int, path: String) -> String? {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var timeout = timeval(tv_sec: 5, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = UInt16(port).bigEndian
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else { return nil }
    let request = Array("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".utf8)
    guard send(fd, request, request.count, 0) == request.count else { return nil }
    var response: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = recv(fd, &chunk, chunk.count, 0)
        guard count > 0 else { break }
        response += chunk[0..<count]
    }
    return String(decoding: response, as: UTF8.self)
}
