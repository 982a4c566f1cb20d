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

    @Test("a response of a request that committed events says the last one's seq beside its result; one that committed none says none")
    func seqInResponses() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { writer in
                try await daemon.withClient { reader in
                    _ = try await subscribeEvents(reader, ["*-rows", "*-row", "create-table", "create-token", "login", "logout", "app.*"])
                    var named: [(what: String, seq: Int64)] = []
                    /// The whole response of `op`: its result as the contract has it, `seq` beside it.
                    func send(_ op: String, _ arguments: JSONObject = [:]) async throws -> JSONObject {
                        let response = try await writer.rawRequest(op, arguments)
                        #expect(response["ok"] == true, "\(op): \(response)")
                        return response
                    }
                    func note(_ what: String, _ response: JSONObject) throws {
                        named.append((what, try #require(response["seq"]?.intValue, "\(what): \(response)")))
                    }
                    try note("create", try await send("execute", ["sql": "create table t(id integer primary key, v)"]))
                    let insert = try await send("execute", ["sql": "insert into t(v) values (1), (2)"])
                    try note("insert", insert)
                    #expect(insert["result"] == ["columns": [], "rows": [], "changes": 2, "last_insert_rowid": 2])
                    #expect(try await send("execute", ["sql": "select * from t"])["seq"] == nil)
                    try note("structured", try await send("insert", ["table": "t", "rows": [["v": 3]]]))
                    // In a transaction, the commit says it; its statements do not.
                    _ = try await send("begin")
                    #expect(try await send("execute", ["sql": "update t set v = v + 1"])["seq"] == nil)
                    let commit = try await send("commit")
                    try note("commit", commit)
                    #expect(commit["result"] == [:])
                    _ = try await send("begin")
                    #expect(try await send("commit")["seq"] == nil, "a transaction that changed nothing")
                    try note("create_token", try await send("create_token"))
                    let token = try #require(try await send("create_token")["result"]?["token"])
                    try note("login", try await send("login", ["token": token]))
                    try note("logout", try await send("logout"))
                    let emit = try await send("emit", ["event": "app.x"])
                    try note("emit", emit)
                    #expect(emit["result"]?["seq"] == emit["seq"])
                    // Every seq named is an event the subscriber gets; `wait` for the last.
                    let last = try #require(named.last?.seq)
                    #expect(try await reader.request("wait", ["seq": .int(last)]) == [:])
                    var events: [JSONObject] = []
                    while let message = await reader.nextMessage(ofType: "event", within: 10) {
                        events.append(message)
                        if message["seq"]?.intValue == last { break }
                    }
                    let seqs = Set(events.compactMap { $0["seq"]?.intValue })
                    for (what, seq) in named {
                        #expect(seqs.contains(seq), "\(what): \(seq) is not an event the subscriber got")
                    }
                    #expect(named.map(\.seq) == named.map(\.seq).sorted(), "each request's seq after the one before")
                    // The update in the transaction: the commit's seq is its update-row events' last.
                    let updates = events.filter { $0["event"] == "update-row" }.compactMap { $0["seq"]?.intValue }
                    #expect(updates.count == 3 && updates.max() == named.first { $0.what == "commit" }?.seq)
                }
            }
        }
    }

    @Test("commit_twophase of a prepared transaction, from another session, says the seq of its last event")
    func seqOfATwoPhaseCommit() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(id integer primary key, v)")))
            try await daemon.withClient { first in
                try await first.request("begin_twophase", ["xid": "x1"])
                try await first.request(.execute(.init(sql: "insert into t(v) values (1)")))
                try await first.request("prepare_twophase", ["xid": "x1"])
            }
            try await daemon.withClient { other in
                _ = try await subscribeEvents(other, ["insert-rows"])
                let response = try await other.rawRequest("commit_twophase", ["xid": "x1"])
                #expect(response["result"] == [:])
                let seq = try #require(response["seq"]?.intValue, "\(response)")
                let event = try #require(await other.nextMessage(ofType: "event", within: 10))
                #expect(event["seq"]?.intValue == seq && event["event"] == "insert-rows")
            }
        }
    }
}
