import EvdClient
import Testing

@testable import EvdDaemon

// Issue 19, items 1–4: a value read from evd is the value stored, and the same JSON written back
// stores it again. The checks read evd's lines as bytes (`plainSocketExchange`): `1.0` and `1`
// parse to the same number in many clients, and the Swift client's own types normalize too.

/// Sends `requests` (one JSON text each) on one plain connection, and returns the lines evd wrote
/// (`hello` first) once `done` holds for them.
private func exchange(
    _ daemon: RunningDaemon,
    _ requests: [String],
    until done: @escaping @Sendable ([String]) -> Bool
) async -> [String] {
    let send = Array(requests.map { $0 + "\n" }.joined().utf8)
    let (bytes, _) = await plainSocketExchange(socketPath: daemon.socketPath, send: send, halfClose: false) { received in
        done(received.split(separator: 0x0a).map { String(decoding: $0, as: UTF8.self) })
    }
    return bytes.split(separator: 0x0a).map { String(decoding: $0, as: UTF8.self) }
}

/// The responses to `requests` (ids 1...n) on one plain connection, in order, as evd wrote them.
private func responses(_ daemon: RunningDaemon, _ requests: [String]) async -> [String] {
    let count = requests.count
    let lines = await exchange(daemon, requests) { lines in
        lines.filter { $0.hasPrefix(#"{"type":"response""#) }.count >= count
    }
    return lines.filter { $0.hasPrefix(#"{"type":"response""#) }
}

/// The first line of `lines` holding `event`, the lines being a subscriber's.
private func eventLine(_ lines: [String], _ event: String) -> String? {
    lines.first { $0.contains(#""event":"\#(event)""#) && $0.hasPrefix(#"{"type":"event""#) }
}

/// The `insert-rows` events with images that `requests` (after a subscription made first on the
/// same connection) cause, live; and the same events replayed from `since: 0` afterwards.
private func insertImages(_ daemon: RunningDaemon, count: Int, _ requests: [String]) async -> (live: [String], replayed: [String]) {
    let subscribe = #"{"op":"subscribe","id":"s","events":["insert-rows"],"rows":true}"#
    let isEvent: @Sendable (String) -> Bool = { $0.hasPrefix(#"{"type":"event""#) && $0.contains(#""event":"insert-rows""#) }
    let live = await exchange(daemon, [subscribe] + requests) { $0.filter(isEvent).count >= count }
    let replay = #"{"op":"subscribe","id":"r","events":["insert-rows"],"rows":true,"since":0}"#
    let replayed = await exchange(daemon, [replay]) { $0.filter(isEvent).count >= count }
    return (live.filter(isEvent), replayed.filter(isEvent))
}

@Suite("Values survive the wire unchanged (issue 19)")
struct ValueFidelityTests {
    // MARK: 1. A whole number in a REAL column is a real

    @Test("insert-rows images write a REAL column's whole number as 1.0, live and replayed, raw INSERT and the insert op")
    func realImages() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table t(r REAL)")))
            try await daemon.request(.execute(.init(sql: "create table u(a, r REAL)")))
            try await daemon.request(.execute(.init(sql: "create table v(id INTEGER PRIMARY KEY, r REAL)")))
            let (live, replayed) = await insertImages(
                daemon,
                count: 6,
                [
                    #"{"op":"execute","id":1,"sql":"insert into t values (1)"}"#,
                    #"{"op":"execute","id":2,"sql":"insert into t values (?)","params":[2.0]}"#,
                    #"{"op":"insert","id":3,"table":"t","rows":[{"r":3}]}"#,
                    #"{"op":"insert","id":4,"table":"t","rows":[{"r":4.0}]}"#,
                    #"{"op":"insert","id":5,"table":"u","rows":[{"a":"x","r":5}]}"#,
                    #"{"op":"insert","id":6,"table":"v","rows":[{"id":1,"r":6.0}]}"#,
                ]
            )
            let expected = [
                #""rows":[{"r":1.0}]"#, #""rows":[{"r":2.0}]"#, #""rows":[{"r":3.0}]"#, #""rows":[{"r":4.0}]"#,
                #""rows":[{"a":"x","r":5.0}]"#, #""rows":[{"id":1,"r":6.0}]"#,
            ]
            #expect(live.count == 6 && replayed.count == 6)
            for (index, images) in expected.enumerated() {
                #expect(live.count > index && live[index].contains(images), "live: \(live)")
                #expect(replayed.count > index && replayed[index].contains(images), "replayed: \(replayed)")
            }
        }
    }

    @Test("return rows (insert, upsert, update, RETURNING in execute) and execute rows write a REAL column's whole number as 1.0")
    func realReturnedRows() async throws {
        try await withRunningDaemon { daemon in
            let lines = await responses(
                daemon,
                [
                    #"{"op":"execute","id":1,"sql":"create table u(a, r REAL)"}"#,
                    #"{"op":"execute","id":2,"sql":"create table v(id INTEGER PRIMARY KEY, r REAL)"}"#,
                    #"{"op":"insert","id":3,"table":"u","rows":[{"a":"x","r":1}],"return":true}"#,
                    #"{"op":"insert","id":4,"table":"v","rows":[{"id":7,"r":2}],"return":true}"#,
                    #"{"op":"execute","id":5,"sql":"select r from u union all select r from v"}"#,
                    #"{"op":"update","id":6,"table":"v","pks":[7],"update":{"r":3},"return":true}"#,
                    #"{"op":"execute","id":7,"sql":"insert into u values ('y', 4) returning *, r + 1, a"}"#,
                    #"{"op":"upsert","id":8,"table":"v","rows":[{"id":7,"r":5},{"id":8,"r":6}],"return":true}"#,
                ]
            )
            #expect(lines.count == 8)
            guard lines.count == 8 else { return }
            #expect(lines[2].contains(#""rows":[{"a":"x","r":1.0}]"#), "\(lines[2])")
            #expect(lines[3].contains(#""rows":[{"id":7,"r":2.0}]"#), "\(lines[3])")
            #expect(lines[4].contains(#""rows":[[1.0],[2.0]]"#), "\(lines[4])")
            #expect(lines[5].contains(#""r":3.0"#), "\(lines[5])")
            #expect(lines[6].contains(#""rows":[["y",4.0,5.0,"y"]]"#), "\(lines[6])")
            #expect(lines[7].contains(#""rows":[{"id":7,"r":5.0},{"id":8,"r":6.0}]"#), "\(lines[7])")
        }
    }

    // MARK: 2. Integers beyond int64

    @Test("a request id is echoed byte for byte: beyond int64, with a fraction, an exponent, -0")
    func idEcho() async throws {
        try await withRunningDaemon { daemon in
            let ids = ["18446744073709551616", "-99999999999999999999", "1.50", "1e2", "-0", "12", #""x""#]
            let lines = await responses(daemon, ids.map { #"{"op":"ping","id":\#($0)}"# })
            #expect(lines.map { line in ids.first { line.hasPrefix(#"{"type":"response","id":\#($0),"#) } } == ids, "\(lines)")
        }
    }

    @Test("emit data keeps an integer beyond int64 exact, live and replayed")
    func emitBigInteger() async throws {
        try await withRunningDaemon { daemon in
            let subscribe = #"{"op":"subscribe","id":"s","events":["test.*"]}"#
            let emit = #"{"op":"emit","id":1,"event":"test.big","data":{"v":100000000000000000000,"w":-18446744073709551616}}"#
            let live = await exchange(daemon, [subscribe, emit]) { eventLine($0, "test.big") != nil }
            let replayed = await exchange(daemon, [#"{"op":"subscribe","id":"r","events":["test.*"],"since":0}"#]) {
                eventLine($0, "test.big") != nil
            }
            for line in [eventLine(live, "test.big"), eventLine(replayed, "test.big")] {
                #expect(line?.contains(#""v":100000000000000000000,"w":-18446744073709551616"#) == true, "\(line ?? "none")")
            }
        }
    }

    @Test("an integer parameter beyond int64 is bad_request naming it, never a REAL; a fraction still binds as REAL")
    func bigIntegerParameters() async throws {
        try await withRunningDaemon { daemon in
            let lines = await responses(
                daemon,
                [
                    #"{"op":"execute","id":1,"sql":"select ?","params":[9223372036854775808]}"#,
                    #"{"op":"execute","id":2,"sql":"select :n","params":{"n":-9223372036854775809}}"#,
                    #"{"op":"executemany","id":3,"sql":"select ?","params":[[1],[18446744073709551616]]}"#,
                    #"{"op":"execute","id":4,"sql":"create table t(v)"}"#,
                    #"{"op":"insert","id":5,"table":"t","rows":[{"v":1},{"v":9223372036854775808}]}"#,
                    #"{"op":"execute","id":6,"sql":"select typeof(?), ?","params":[9223372036854775808.0, 9223372036854775807]}"#,
                    #"{"op":"execute","id":7,"sql":"select count(*) from t"}"#,
                ]
            )
            #expect(lines.count == 7)
            guard lines.count == 7 else { return }
            for (index, field) in [(0, "params[0]"), (1, "params.n"), (2, "params[1][0]"), (4, "rows[1].v")] {
                #expect(lines[index].contains(#""code":"bad_request""#), "\(lines[index])")
                #expect(lines[index].contains(#""field":"\#(field)""#), "\(lines[index])")
            }
            #expect(lines[5].contains(#""rows":[["real",9223372036854775807]]"#), "\(lines[5])")
            #expect(lines[6].contains(#""rows":[[0]]"#), "\(lines[6])")
        }
    }

    // MARK: 3. ±Infinity

    @Test("±Infinity is {\"$real\":\"Infinity\"} in rows and row images, and binds back as a REAL")
    func infinity() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table f(id INTEGER PRIMARY KEY, r REAL)")))
            let (live, replayed) = await insertImages(
                daemon,
                count: 3,
                [
                    #"{"op":"execute","id":1,"sql":"insert into f values (1, 1e999)"}"#,
                    #"{"op":"execute","id":2,"sql":"insert into f values (2, ?)","params":[{"$real":"-Infinity"}]}"#,
                    #"{"op":"insert","id":3,"table":"f","rows":[{"id":3,"r":{"$real":"Infinity"}}]}"#,
                ]
            )
            let expected = [
                #""rows":[{"id":1,"r":{"$real":"Infinity"}}]"#, #""rows":[{"id":2,"r":{"$real":"-Infinity"}}]"#,
                #""rows":[{"id":3,"r":{"$real":"Infinity"}}]"#,
            ]
            for (index, images) in expected.enumerated() {
                #expect(live.count > index && live[index].contains(images), "live: \(live)")
                #expect(replayed.count > index && replayed[index].contains(images), "replayed: \(replayed)")
            }
            let lines = await responses(
                daemon,
                [
                    #"{"op":"execute","id":1,"sql":"select 1e999, -1e999, null"}"#,
                    #"{"op":"execute","id":2,"sql":"select id, typeof(r), r from f order by id"}"#,
                    #"{"op":"execute","id":3,"sql":"select ?","params":[{"$real":"NaN"}]}"#,
                    #"{"op":"update","id":4,"table":"f","pks":[3],"update":{"r":{"$real":"-Infinity"}},"return":true}"#,
                ]
            )
            #expect(lines.count == 4)
            guard lines.count == 4 else { return }
            #expect(lines[0].contains(#""rows":[[{"$real":"Infinity"},{"$real":"-Infinity"},null]]"#), "\(lines[0])")
            #expect(
                lines[1].contains(
                    #""rows":[[1,"real",{"$real":"Infinity"}],[2,"real",{"$real":"-Infinity"}],[3,"real",{"$real":"Infinity"}]]"#
                ),
                "\(lines[1])"
            )
            #expect(lines[2].contains(#""field":"params[0]""#), "\(lines[2])")
            #expect(lines[3].contains(#""r":{"$real":"-Infinity"}"#), "\(lines[3])")
        }
    }

    // MARK: 4. TEXT that is not UTF-8

    @Test("TEXT that is not UTF-8 is {\"$text_base64\":...} in rows and row images; valid text stays a string")
    func invalidUTF8() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table s(id INTEGER PRIMARY KEY, t TEXT)")))
            let (live, replayed) = await insertImages(
                daemon,
                count: 3,
                [
                    #"{"op":"execute","id":1,"sql":"insert into s values (1, cast(x'ff41' as text))"}"#,
                    #"{"op":"insert","id":2,"table":"s","rows":[{"id":2,"t":{"$text_base64":"/0E="}}]}"#,
                    #"{"op":"insert","id":3,"table":"s","rows":[{"id":3,"t":"é\u0001"}]}"#,
                ]
            )
            let expected = [
                #""rows":[{"id":1,"t":{"$text_base64":"/0E="}}]"#, #""rows":[{"id":2,"t":{"$text_base64":"/0E="}}]"#,
                #""rows":[{"id":3,"t":"é\u0001"}]"#,
            ]
            for (index, images) in expected.enumerated() {
                #expect(live.count > index && live[index].contains(images), "live: \(live)")
                #expect(replayed.count > index && replayed[index].contains(images), "replayed: \(replayed)")
            }
            let lines = await responses(
                daemon,
                [
                    #"{"op":"execute","id":1,"sql":"select cast(x'ff' as text), 'é', cast(x'c3a9' as text), cast(x'eda080' as text)"}"#,
                    #"{"op":"execute","id":2,"sql":"select id, typeof(t), hex(t) from s order by id"}"#,
                    #"{"op":"insert","id":3,"table":"s","rows":[{"id":4,"t":{"$text_base64":"not base64!"}}]}"#,
                    #"{"op":"update","id":4,"table":"s","pks":[2],"update":{"t":{"$text_base64":"gA=="}},"return":true}"#,
                ]
            )
            #expect(lines.count == 4)
            guard lines.count == 4 else { return }
            #expect(lines[0].contains(#""rows":[[{"$text_base64":"/w=="},"é","é",{"$text_base64":"7aCA"}]]"#), "\(lines[0])")
            #expect(lines[1].contains(#""rows":[[1,"text","FF41"],[2,"text","FF41"],[3,"text","C3A901"]]"#), "\(lines[1])")
            #expect(lines[2].contains(#""field":"rows[0].t""#), "\(lines[2])")
            #expect(lines[3].contains(#""t":{"$text_base64":"gA=="}"#), "\(lines[3])")
        }
    }

    @Test("execute binds {\"$text_base64\":...} as TEXT of those bytes")
    func invalidUTF8Parameter() async throws {
        try await withRunningDaemon { daemon in
            let lines = await responses(
                daemon,
                [
                    #"{"op":"execute","id":1,"sql":"select typeof(?1), hex(?1)","params":[{"$text_base64":"/0E="}]}"#
                ]
            )
            #expect(lines.first?.contains(#""rows":[["text","FF41"]]"#) == true, "\(lines)")
        }
    }
}
