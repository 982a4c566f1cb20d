import EvdClient

/// An event ready to be published (and, if committed, journaled): its bytes are made once, for
/// the journal and every subscriber.
struct JournalEntry: Sendable {
    let name: String
    let kind: EventKind?
    let origin: EventOrigin
    /// For `where` filters of live subscribers.
    let properties: JSONObject
    /// The event after its envelope's subscription number (`WireLines.body`).
    let body: [UInt8]
    /// The same with the row images, for `rows: true` subscribers.
    let imagesBody: [UInt8]?
}

/// Where committed events that belong to no database transaction (custom events, `login`,
/// `logout`, `create-token`) are made durable before they are published
/// (`EventBus.publishJournaled`): the journal's state database (`Journal`, in Store).
protocol StateJournal: Sendable {
    /// Whether events are journaled at all (`--no-journal`: no).
    var isEnabled: Bool { get }
    /// Journals `entries` with the seqs of `reservation`, durably; returns once they are.
    func append(_ entries: [JournalEntry], _ reservation: SeqReservation) async throws
}
