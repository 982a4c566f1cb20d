import EvdClient

/// The journal's epoch: a random id made when the journal is created, carried by `hello` and by
/// every event and veto (`"epoch":"…"`, 16 lowercase hex digits). A seq means something only
/// within its epoch: a client that kept "seq 500" and finds another epoch knows the history it
/// resumed from was wiped and recreated, and refetches instead of resuming into the wrong one.
/// `Journal.open` reads it (from the state database, else from any database's `_evd_meta`, so
/// that a lost state directory keeps it) or makes it.
public struct JournalEpoch: Sendable, Hashable, CustomStringConvertible {
    /// The id (63 bits: SQLite keeps it as a positive INTEGER).
    public let value: Int64
    /// `,"epoch":"…"`: the bytes an event's head carries after its seq.
    let field: [UInt8]

    public init(value: Int64) {
        self.value = value
        var field: [UInt8] = Array(#","epoch":""#.utf8)
        field += Array(Self.text(value).utf8)
        field.append(UInt8(ascii: "\""))
        self.field = field
    }

    /// A new random epoch.
    public static func random() -> JournalEpoch {
        JournalEpoch(value: Int64.random(in: 1...Int64.max))
    }

    /// The epoch as clients see it: 16 lowercase hex digits.
    public var description: String { Self.text(self.value) }

    private static func text(_ value: Int64) -> String {
        let hex = String(UInt64(bitPattern: value), radix: 16)
        return String(repeating: "0", count: max(0, 16 - hex.count)) + hex
    }
}
