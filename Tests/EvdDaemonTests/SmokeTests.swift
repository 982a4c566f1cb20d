import EvdClient
import Foundation
import OrderedCollections
import Testing

@testable import EvdDaemon

@Suite("Smoke")
struct SmokeTests {
    @Test("hello, ping and a round trip of SQL")
    func helloAndSQL() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                #expect(evd.hello["type"] == "hello")
                #expect(evd.hello["server"] == "evd")
                #expect(evd.hello["protocol"] == 1)
                #expect(evd.hello["databases"] == ["main"])
                #expect(evd.hello["actor"]?["uid"]?.intValue == Int64(getuid()))
                #expect(try await evd.request("ping") == [:])
                try await evd.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
                let insert = try await evd.request("execute", ["sql": "insert into dogs(name) values (?)", "params": ["Rex"]])
                #expect(insert["changes"] == 1)
                #expect(insert["last_insert_rowid"] == 1)
                let select = try await evd.request(.execute(.init(sql: "select id, name from dogs")))
                #expect(select["columns"] == ["id", "name"])
                #expect(select["rows"] == [[1, "Rex"]])
            }
        }
    }
}
