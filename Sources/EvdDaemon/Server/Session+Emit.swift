import EvdClient
import OrderedCollections

/// `emit`: custom events, journaled in groups (PROTOCOL.md §3).
extension Session {
    /// A custom event an `emit` asks for, checked.
    struct CustomEvent {
        let name: String
        let data: JSONObject
    }

    /// Runs a run of consecutive `emit` requests (as admitted, in order), answering each.
    ///
    /// **Why in groups.** Each emit must be journaled before it is answered, and a commit costs
    /// about the same for one event as for hundreds; a pipelining publisher, answered one commit
    /// per emit, got about 7k emits/s. So the executor takes every emit the reader has already
    /// queued behind the first (never waiting for more: a lone emit is not delayed) and journals
    /// them with one reservation of consecutive seqs and one commit, shared with other sessions'
    /// through the journal's group commit (`Journal.appendToState`). The answers then go out in
    /// request order with increasing seqs, each after its event was committed and published (so
    /// a subscriber gets the events in seq order, each before its emit's answer, as one at a
    /// time). Only emits are grouped: any other request ends the run, and so ordering against it
    /// is as before. A refused emit is answered in its place, after the emits before it.
    func executeEmits(_ requests: [Admission]) async {
        var checked: [(id: JSONValue, event: CustomEvent)] = []
        for request in requests {
            let refusal: (id: JSONValue, error: EvdError)
            switch request {
            case .refuse(let id, let error):
                refusal = (id, error)
            case .run(let id, let request):
                do {
                    try self.checkTokenExpiry("emit")
                    checked.append((id, try self.checkEmit(try EvdOperation.Emit(arguments: request.object))))
                    continue
                } catch {
                    refusal = (id, Self.wireError(error))
                }
            }
            await self.journalEmits(checked)
            checked = []
            self.respond(id: refusal.id, .failure(refusal.error))
        }
        await self.journalEmits(checked)
    }

    /// Journals and publishes checked emits together, then answers each.
    private func journalEmits(_ emits: [(id: JSONValue, event: CustomEvent)]) async {
        guard !emits.isEmpty else { return }
        do {
            let seqs = try await self.publishEmits(emits.map(\.event))
            // The answers as one chunk: one write for the run, not a syscall per emit.
            var lines: [UInt8] = []
            lines.reserveCapacity(emits.count * 72)
            for (emit, seq) in zip(emits, seqs) { lines += WireLines.response(id: emit.id, result: ["seq": .int(seq)], seq: seq) }
            self.outbox.enqueue(line: lines)
        } catch {
            let failure = Self.wireError(error)
            for emit in emits { self.respond(id: emit.id, .failure(failure)) }
        }
    }

    /// Checks an `emit` request's arguments and the session's permission.
    func checkEmit(_ request: EvdOperation.Emit) throws -> CustomEvent {
        let name = request.event
        let data = request.data ?? [:]
        guard isNamespacedEventName(name) else {
            if EventKind(name: name) != nil {
                throw EvdError.badRequest(
                    field: "event",
                    "'\(name)' is a catalog event; emit publishes custom events, whose names have a namespace (myapp.deployed)"
                )
            }
            throw EvdError(
                .unknownEvent,
                "unknown event '\(name)': a custom event's name has a namespace (myapp.deployed)",
                extra: ["field": "event", "event": .string(name)]
            )
        }
        // Byte scans: `String.contains(String)` would be Foundation's, a search costlier than the journal write.
        guard !name.utf8.contains(where: { $0 == UInt8(ascii: "*") || $0 == UInt8(ascii: "?") }) else {
            throw EvdError.badRequest(field: "event", "an event name cannot contain '*' or '?'")
        }
        for key in data.keys where Self.envelopeKeys.contains(key) {
            throw EvdError.badRequest(field: "data.\(key)", "'\(key)' is an envelope key and cannot be an event property")
        }
        try self.require(.emit)
        return CustomEvent(name: name, data: data)
    }

    /// Publishes custom events, in order; returns their seqs. A custom event is a committed event:
    /// the client's OK means it is journaled. (Custom events always get a seq: only an unwanted
    /// catalog event goes without one.)
    func publishEmits(_ events: [CustomEvent]) async throws -> [Int64] {
        try await self.core.bus.publishJournaled(
            events.map { ($0.name, nil, $0.data) },
            origin: self.origin,
            journal: self.core.journal
        )
    }

    /// Whether a request is an `emit` (which the executor runs in groups).
    static func isEmit(_ request: JSONObject) -> Bool { request["op"] == .string(EvdOperation.Name.emit.rawValue) }

    /// The keys an event's envelope has, and the transaction's members a committed event carries
    /// beside them (`TxStamp`): an `emit`'s data may not use them.
    static let envelopeKeys: Set<String> = Set(
        ["type", "seq", "epoch", "event", "time", "subscription", "session", "actor"] + TxStamp.keys
    )
}
