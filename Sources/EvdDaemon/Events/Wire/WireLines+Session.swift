import EvdClient

// MARK: Responses and hello

extension WireLines {
    /// A successful response: `{"type":"response","id":…,"ok":true,"result":…}`.
    static func response(id: JSONValue, result: JSONValue, seq: Int64? = nil) -> [UInt8] {
        var bytes: [UInt8] = Array(#"{"type":"response","id":"#.utf8)
        id.write(into: &bytes)
        bytes += Array(#","ok":true,"result":"#.utf8)
        result.write(into: &bytes)
        if let seq {
            bytes += Array(#","seq":"#.utf8)
            JSONWriter.appendInt(seq, to: &bytes)
        }
        bytes += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
        return bytes
    }

    /// A failed response: `{"type":"response","id":…,"ok":false,"error":{…}}`.
    static func response(id: JSONValue, error: EvdError) -> [UInt8] {
        var bytes: [UInt8] = Array(#"{"type":"response","id":"#.utf8)
        id.write(into: &bytes)
        bytes += Array(#","ok":false,"error":"#.utf8)
        JSONValue.object(error.jsonObject).write(into: &bytes)
        bytes += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
        return bytes
    }

    /// The first line of every connection (PROTOCOL.md §2).
    static func hello(version: String, session: UInt64, actor: Actor, databases: [String], seq: Int64, epoch: JournalEpoch) -> [UInt8] {
        let hello: JSONValue = [
            "type": "hello", "server": "evd", "version": .string(version), "protocol": 1,
            "session": .integer(session), "actor": actor.jsonValue,
            "databases": .array(databases.map(JSONValue.string)),
            "seq": .int(seq), "epoch": .string(epoch.description),
        ]
        return hello.jsonBytes + [0x0a]
    }
}

// MARK: Notices

extension WireLines {
    /// Notice `shutdown`: the daemon is stopping.
    static func shutdownNotice() -> [UInt8] {
        Array(#"{"type":"notice","code":"shutdown"}"#.utf8) + [0x0a]
    }

    /// Notice `idle_transaction_timeout`: the session's transaction on `database` sat idle longer
    /// than `maxMs` and was rolled back.
    static func idleTransactionTimeoutNotice(database: String, maxMs: Int) -> [UInt8] {
        var line = Array(#"{"type":"notice","code":"idle_transaction_timeout","database":"#.utf8)
        JSONWriter.appendString(database, to: &line)
        line += Array(#","max_ms":"#.utf8)
        JSONWriter.appendInt(Int64(maxMs), to: &line)
        line += Array("}\n".utf8)
        return line
    }

    /// Notice `gap`: events `from...to` are gone (retention, or no journal) and will not be replayed.
    static func gapNotice(from: Int64, to: Int64) -> [UInt8] {
        let gap: JSONValue = ["type": "notice", "code": "gap", "from": .int(from), "to": .int(to)]
        return gap.jsonBytes + [0x0a]
    }

    /// A page of a snapshot (`subscribe` with `snapshot`, issue 23): event `snapshot-rows` with
    /// `database`, `table` and `rows` (a JSON array of row objects, written already). Its `seq` is
    /// null: the rows are the table as of the snapshot's seq (notice `snapshot_end`), not a change
    /// with a seq of its own. `session` and `actor` are null: the daemon read them. `schemaVersion`:
    /// the database's schema version in the snapshot, as row events carry theirs.
    static func snapshotRows(
        subscription: Int,
        epoch: JournalEpoch,
        database: String,
        table: String,
        schemaVersion: Int64,
        rows: [UInt8]
    ) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(rows.count + 256)
        JSONWriter.appendASCII(#"{"type":"event","seq":null"#, to: &bytes)
        bytes += epoch.field
        JSONWriter.appendASCII(#","event":"snapshot-rows","time":"#, to: &bytes)
        EventTime.appendNow(to: &bytes)
        JSONWriter.appendASCII(Self.subscriptionKey, to: &bytes)
        JSONWriter.appendInt(Int64(subscription), to: &bytes)
        JSONWriter.appendASCII(#","session":null,"actor":null,"schema_version":"#, to: &bytes)
        JSONWriter.appendInt(schemaVersion, to: &bytes)
        JSONWriter.appendASCII(#","database":"#, to: &bytes)
        JSONWriter.appendString(database, to: &bytes)
        JSONWriter.appendASCII(#","table":"#, to: &bytes)
        JSONWriter.appendString(table, to: &bytes)
        JSONWriter.appendASCII(#","rows":"#, to: &bytes)
        bytes += rows
        bytes += [UInt8(ascii: "}"), 0x0a]
        return bytes
    }

    /// Notice `snapshot_end`: `subscription`'s snapshot is complete, as of `seq`; the committed
    /// events after `seq` follow.
    static func snapshotEndNotice(subscription: Int, seq: Int64) -> [UInt8] {
        let notice: JSONValue = ["type": "notice", "code": "snapshot_end", "subscription": .integer(subscription), "seq": .int(seq)]
        return notice.jsonBytes + [0x0a]
    }

    /// Notice `caught_up`: `subscription`'s replay (`since`, a cursor) has sent everything up to
    /// `seq`; its live events follow.
    static func caughtUpNotice(subscription: Int, seq: Int64) -> [UInt8] {
        let notice: JSONValue = ["type": "notice", "code": "caught_up", "subscription": .integer(subscription), "seq": .int(seq)]
        return notice.jsonBytes + [0x0a]
    }

    /// Notice `lagged` for `on_overflow: drop`: `dropped` events of `subscription`, `from...to`,
    /// were discarded.
    static func laggedDroppedNotice(subscription: Int, dropped: Int, from: Int64, to: Int64) -> [UInt8] {
        let notice: JSONValue = [
            "type": "notice", "code": "lagged", "subscription": .integer(subscription),
            "dropped": .integer(dropped), "from": .int(from), "to": .int(to),
        ]
        return notice.jsonBytes + [0x0a]
    }

    /// Notice `lagged` for `on_overflow: disconnect`: `subscription` overflowed; `lastSeq` is where
    /// to resume (`since`). The connection closes after it.
    static func laggedDisconnectNotice(subscription: Int, lastSeq: Int64) -> [UInt8] {
        let notice: JSONValue = [
            "type": "notice", "code": "lagged", "subscription": .integer(subscription), "last_seq": .int(lastSeq),
        ]
        return notice.jsonBytes + [0x0a]
    }
}
