import EvdCLI
import EvdClient
import OrderedCollections
import Testing

@Suite("evtail's readable lines")
struct EventFormatterTests {
    @Test("an event reads as time, seq, name, properties, then who")
    func eventLine() throws {
        let event = try JSONValue(
            parsing:
                #"{"type":"event","seq":1235,"event":"insert-rows","time":"2026-11-21T10:00:00.123456Z","subscription":3,"session":17,"actor":{"id":"uid:1000","uid":1000},"database":"main","table":"dogs","num_rows":2,"note":"two words"}"#
        ).objectValue!
        #expect(
            EventFormatter.line(event)
                == #"10:00:00.123456 #1235 insert-rows database=main table=dogs num_rows=2 note="two words"  (uid:1000 s17)"#
        )
    }

    @Test("a committed event shows its transaction with who; its last event says end")
    func transactionLine() throws {
        let middle = try JSONValue(
            parsing:
                #"{"type":"event","seq":1235,"event":"update-row","time":"2026-11-21T10:00:00.123456Z","subscription":3,"session":17,"actor":{"id":"uid:1000","uid":1000},"tx":1234,"tx_last":1236,"schema_version":3,"database":"main","table":"dogs","pks":[1]}"#
        ).objectValue!
        #expect(
            EventFormatter.line(middle)
                == #"10:00:00.123456 #1235 update-row schema_version=3 database=main table=dogs pks=[1]  (uid:1000 s17 tx1234)"#
        )
        var last = middle
        last["seq"] = 1236
        last["tx_end"] = true
        #expect(EventFormatter.line(last).hasSuffix("pks=[1]  (uid:1000 s17 tx1234 end)"))
    }

    @Test("a notice reads as its code and fields")
    func noticeLine() throws {
        let notice = try JSONValue(parsing: #"{"type":"notice","code":"lagged","subscription":3,"last_seq":9}"#).objectValue!
        #expect(EventFormatter.line(notice) == "-- notice lagged subscription=3 last_seq=9")
    }

    @Test("command-line values are JSON when they parse, else strings")
    func argumentValues() {
        #expect(Terminal.argumentValue("Rex") == "Rex")
        #expect(Terminal.argumentValue("42") == 42)
        #expect(Terminal.argumentValue("null") == .null)
        #expect(Terminal.argumentValue("\"42\"") == "42")
        #expect(Terminal.argumentValue("{\"a\":1}") == ["a": 1])
    }
}
