import EvdClient

/// The transaction a committed event belongs to, as the event's envelope-like members say it
/// (docs/protocol.md, "Transactions"): `tx`, the seq of the transaction's first event (its id:
/// seqs are daemon-wide and never reused, and a transaction's events have consecutive seqs);
/// `tx_last`, the seq of its last; `tx_end: true` on that last event only; and, on row events,
/// `schema_version`, the database's `PRAGMA schema_version` as of the commit.
///
/// They are written into the event's body right after the envelope's `session` and `actor`
/// (`tx_end` at its end, before any row images), so the journal keeps them with the body and a
/// replay writes them byte for byte: for a run of events (`EventRun`) they are part of the start
/// the events share, and only the transaction's last event has a byte more of its own.
struct TxStamp: Sendable, Equatable {
    /// The seq of the transaction's first event: its id.
    let tx: Int64
    /// The seq of its last event.
    let last: Int64
    /// The database's schema version at the commit, for row events (`nil`: none, e.g. custom events).
    let schemaVersion: Int64?

    /// The stamp of a transaction whose events have the seqs of `reservation`.
    init(_ reservation: SeqReservation, schemaVersion: Int64? = nil) {
        self.init(tx: reservation.first, last: reservation.last, schemaVersion: schemaVersion)
    }

    init(tx: Int64, last: Int64, schemaVersion: Int64? = nil) {
        self.tx = tx
        self.last = last
        self.schemaVersion = schemaVersion
    }

    /// The keys these members use: an `emit`'s data may not have them.
    static let keys: [String] = ["tx", "tx_last", "tx_end", "schema_version"]

    /// `,"tx_end":true`: the last event's member, before its closing brace.
    static let endMember: StaticString = #","tx_end":true"#

    /// Appends `,"tx":…,"tx_last":…` and, for a row event of `kind`, `,"schema_version":…`: what
    /// follows the envelope's `actor`.
    @inline(__always)
    func appendMembers(kind: EventKind?, to bytes: inout [UInt8]) {
        JSONWriter.appendASCII(#","tx":"#, to: &bytes)
        JSONWriter.appendInt(self.tx, to: &bytes)
        JSONWriter.appendASCII(#","tx_last":"#, to: &bytes)
        JSONWriter.appendInt(self.last, to: &bytes)
        if let schemaVersion = self.schemaVersion, let kind, kind.isRowEvent {
            JSONWriter.appendASCII(#","schema_version":"#, to: &bytes)
            JSONWriter.appendInt(schemaVersion, to: &bytes)
        }
    }

    /// The same members as properties (for `where` filters of an event made with its properties;
    /// `end`: it is the transaction's last, with `tx_end`).
    func add(to properties: inout JSONObject, kind: EventKind?, end: Bool) {
        properties["tx"] = .int(self.tx)
        properties["tx_last"] = .int(self.last)
        if let schemaVersion = self.schemaVersion, let kind, kind.isRowEvent {
            properties["schema_version"] = .int(schemaVersion)
        }
        if end { properties["tx_end"] = .bool(true) }
    }
}

extension EventKind {
    /// The row events (`insert-rows`, `upsert-rows`, `update-row`, `delete-row`): those that
    /// carry `schema_version`.
    var isRowEvent: Bool {
        switch self {
        case .insertRows, .upsertRows, .updateRow, .deleteRow: return true
        default: return false
        }
    }
}
