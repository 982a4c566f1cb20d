import EvdClient
import Testing

@testable import EvdDaemon

/// Read your writes (issue 23): `wait` answers once every event up to a seq has been delivered to
/// the session's own subscriptions, so the answer comes after those events on the connection.
@Suite("Read your writes")
struct ReadYourWritesTests {
    @Test("wait for a seq not committed yet answers once it is, after its event, on the waiting session")
    func waitForAFutureSeq() async throws {
        try await withRunningDaemon { daemon in
            // Both connected first: a connection's login is a committed event too.
            try await daemon.withClient { writer in
                try await daemon.withClient { reader in
                    try await self.waitThenWrite(reader: reader, writer: writer)
                }
            }
        }
    }

    private func waitThenWrite(reader: EvdConnection, writer: EvdConnection) async throws {
        let (_, stable) = try await subscribeEvents(reader, ["app.*"])
        // Sent, not awaited: the answer is read below, in order with the events.
        try await reader.send(["op": "wait", "id": "w", "seq": .int(stable + 1), "timeout_ms": 30000])
        let seq = try #require(try await writer.request("emit", ["event": "app.written"])["seq"]?.intValue)
        #expect(seq == stable + 1)
        var order: [String] = []
        while let message = await reader.nextMessage(ofType: nil, within: 30) {
            if message["type"] == "event" { order.append("event \(message["seq"]?.intValue ?? -1)") }
            if message["type"] == "response" {
                #expect(message["ok"] == true && message["id"] == "w", "\(message)")
                order.append("response")
                break
            }
        }
        #expect(order == ["event \(seq)", "response"])
    }

    @Test("wait for a seq delivered already answers at once; one never committed is timeout, naming what was delivered")
    func waitAtOnceAndTimeout() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let seq = try #require(try await evd.request("emit", ["event": "app.one"])["seq"]?.intValue)
                #expect(try await evd.request("wait", ["seq": .int(seq)]) == [:])
                #expect(try await evd.request("wait", ["seq": 0]) == [:])
                let error = try await evd.expectError("wait", ["seq": .int(seq + 1000), "timeout_ms": 50])
                #expect(error.code == "timeout")
                #expect(error.extra["seq"]?.intValue == seq + 1000)
                #expect((error.extra["delivered"]?.intValue ?? -1) >= seq)
            }
        }
    }

    @Test("wait's arguments: seq required and not negative, timeout_ms 1-60000, nothing else")
    func waitArguments() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                for (arguments, field) in [
                    ([:], "seq"), (["seq": -1], "seq"), (["seq": "1"], "seq"), (["seq": 1, "timeout_ms": 0], "timeout_ms"),
                    (["seq": 1, "timeout_ms": 60001], "timeout_ms"), (["seq": 1, "database": "main"], "database"),
                ] as [(JSONObject, String)] {
                    let error = try await evd.expectError("wait", arguments)
                    #expect(error.code == "bad_request" && error.extra["field"]?.stringValue == field, "\(arguments): \(error)")
                }
            }
        }
    }

    @Test("wait needs no permission: another uid with no grant may wait (it learns only how far delivery is)")
    func waitAsAnotherUid() async throws {
        try await withRunningDaemon(configure: { openUp(&$0) }) { daemon in
            let seq = try #require(try await daemon.request("emit", ["event": "app.one"])["seq"]?.intValue)
            let wait: JSONObject = ["op": "wait", "seq": .int(seq)]
            let emit: JSONObject = ["op": "emit", "event": "app.two"]
            let got = responses(try await messages(try asNobody(daemon, [wait, emit])))
            #expect(got[1]?["ok"] == true, "\(String(describing: got[1]))")
            #expect(got[2]?["error"]?["code"] == "permission_denied", "\(String(describing: got[2]))")
        }
    }
}
