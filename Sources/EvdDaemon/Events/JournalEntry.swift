import EvdClient

/// An event ready to be published (and, if committed, journaled): its bytes are made once, for
/// the journal and every subscriber.
struct JournalEntry: Sendable {
    let name: String
    let kind: EventKind?
    let origin: EventOrigin
    /// For `where` filters of live subscribers.
    let properties: JSONObject
    /// The event after its envelope's subscription number (`EventBus.body`).
    let body: [UInt8]
    /// The same with the row images, for `rows: true` subscribers.
    let imagesBody: [UInt8]?
}
