import OrderedCollections

/// One veto the daemon is waiting on: answer it with `allow()`, `deny(_:)` or `modify(_:)` before
/// `deadline` (milliseconds from when it was sent) runs out.
public struct Veto: Sendable {
    /// The whole veto message: envelope (`seq`, `event`, `deadline_ms`, ...) and the event's properties.
    public let message: JSONObject
    let connection: EvdConnection

    /// A veto received on `connection` (from `vetoes(_:options:)`, or any `nextMessage()` of type `veto`).
    public init(message: JSONObject, connection: EvdConnection) {
        self.message = message
        self.connection = connection
    }

    /// The seq the reply must name.
    public var seq: Int64 { self.message["seq"]?.intValue ?? 0 }
    /// The event's name (`before_cursor_execute`).
    public var event: String { self.message["event"]?.stringValue ?? "" }
    /// How long the daemon waits for this reply, in milliseconds.
    public var deadlineMs: Int64 { self.message["deadline_ms"]?.intValue ?? 0 }
    /// A property of the event (`veto["statement"]`).
    public subscript(property: String) -> JSONValue? { self.message[property] }

    /// Lets the action go on.
    public func allow() async throws {
        try await self.reply(.allow)
    }

    /// Stops the action; the client that caused it gets `vetoed` with this reason.
    public func deny(_ reason: String? = nil) async throws {
        try await self.reply(.deny, reason: reason)
    }

    /// Lets the action go on with these mutable properties replaced (`["statement": "..."]`).
    public func modify(_ set: JSONObject) async throws {
        try await self.reply(.modify, set: set)
    }

    private func reply(_ action: EvdOperation.Reply.Action, reason: String? = nil, set: JSONObject? = nil) async throws {
        let reply = EvdOperation.reply(.init(seq: self.seq, action: action, reason: reason, set: set))
        try await self.connection.send(reply.request)
    }
}

extension EvdConnection {
    /// Subscribes as a veto listener for `events` (names or globs of vetoable events) and returns the
    /// vetoes as they arrive:
    ///
    /// ```swift
    /// for try await veto in try await evd.vetoes(["before_drop"]) { try await veto.deny("no drops") }
    /// ```
    ///
    /// `options` are the other `subscribe` arguments (`name`, `priority`, `timeoutMs`, `onTimeout`,
    /// `mode`); its `veto` is `events`. Events, notices and responses that are not vetoes are skipped.
    public func vetoes(_ events: [String], options: EvdOperation.Subscribe = .init()) async throws -> Vetoes {
        var subscribe = options
        subscribe.veto = events
        let result = try await self.request(.subscribe(subscribe))
        return Vetoes(connection: self, subscription: result["subscription"]?.intValue ?? 0)
    }

    /// The vetoes of one listener subscription, as an async sequence.
    public struct Vetoes: AsyncSequence, Sendable {
        public typealias Element = Veto
        let connection: EvdConnection
        /// The subscription's number.
        public let subscription: Int64

        public struct AsyncIterator: AsyncIteratorProtocol {
            let connection: EvdConnection

            public mutating func next() async throws -> Veto? {
                while let message = await self.connection.nextMessage() {
                    if message["type"] == "veto" { return Veto(message: message, connection: self.connection) }
                }
                return nil
            }
        }

        public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(connection: self.connection) }
    }
}
