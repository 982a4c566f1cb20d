import EvdClient

/// `ack` (docs/protocol.md, "Durable cursors"): handled the moment it arrives, like `reply`, so
/// that a consumer acknowledging while its cursor's replay is still being sent — the replay holds
/// the session's request queue until it is written — gets its position stored now, and a client
/// that waits for the answer before reading on cannot deadlock with the replay waiting for it to
/// read.
///
/// Acks are answered in the order they arrive, each once its position is on disk. They are written
/// in batches: while one batch is written (on the thread pool), the acks that arrive wait, and the
/// next batch stores each cursor's highest once. At most `maxPipelinedRequests` acks wait; one
/// more gets `busy` at once.
struct PendingAcks: Sendable {
    struct Ack: Sendable {
        let id: JSONValue
        let subscription: Int64
        let seq: Int64
    }

    var waiting: [Ack] = []
    /// A batch is being written (its task answers `waiting` too before it ends).
    var writing = false
}

extension Session {
    /// Answers an `ack` request (on the connection's event loop): argument, permission and range
    /// errors at once; a valid one once its cursor's position is on disk.
    func handleAck(_ request: Request) {
        let id = request["id"] ?? .null
        let ack: PendingAcks.Ack
        do {
            try self.checkTokenExpiry(EvdOperation.Name.ack.rawValue)
            guard case .ack(let subscription, let seq) = try EvdOperation(parsing: request) else { return }
            try self.require(.subscribe)
            ack = .init(id: id.isScalar ? id : .null, subscription: subscription, seq: seq)
        } catch {
            self.respond(id: id.isScalar ? id : .null, .failure(Self.wireError(error)))
            return
        }
        let limit = self.core.configuration.maxPipelinedRequests
        let start = self.acks.withLock { acks -> Bool? in
            guard acks.waiting.count < limit else { return nil }
            acks.waiting.append(ack)
            if acks.writing { return false }
            acks.writing = true
            return true
        }
        switch start {
        case nil:
            self.respond(
                id: ack.id,
                .failure(
                    EvdError(
                        .busy,
                        "\(limit) acks of this connection are waiting to be stored (--max-pending-requests); wait for their answers",
                        extra: ["limit": "max-pending-requests", "max": .integer(limit)]
                    )
                )
            )
        case true?:
            Task { await self.writeAcks() }
        case false?:
            break
        }
    }

    /// Stores and answers the waiting acks, batch after batch, until none waits.
    private func writeAcks() async {
        while true {
            let batch = self.acks.withLock { acks -> [PendingAcks.Ack] in
                defer { acks.waiting.removeAll(keepingCapacity: true) }
                if acks.waiting.isEmpty { acks.writing = false }
                return acks.waiting
            }
            guard !batch.isEmpty else { return }
            await self.store(batch)
        }
    }

    /// Each cursor's highest acknowledged seq of `batch`, stored once; then each ack's answer.
    private func store(_ batch: [PendingAcks.Ack]) async {
        var outcomes: [Outcome] = Array(repeating: .responded, count: batch.count)
        var highest: [String: Int64] = [:]
        var cursorOf: [Int: String] = [:]
        let stable = self.core.bus.stableSeq
        for (index, ack) in batch.enumerated() {
            guard let cursors = self.core.cursors, let name = cursors.name(following: Int(ack.subscription), session: self.id) else {
                outcomes[index] = .failure(
                    EvdError.badRequest(field: "subscription", "subscription \(ack.subscription) of this session follows no cursor")
                )
                continue
            }
            guard ack.seq <= stable else {
                outcomes[index] = .failure(
                    EvdError.badRequest(field: "seq", "seq \(ack.seq) is beyond the newest event delivered (\(stable))")
                )
                continue
            }
            cursorOf[index] = name
            highest[name] = max(highest[name] ?? ack.seq, ack.seq)
        }
        var positions: [String: Result<Int64, EvdError>] = [:]
        if let cursors = self.core.cursors {
            for (name, seq) in highest {
                do {
                    positions[name] = .success(try await self.core.threadPool.runIfActive { try cursors.acknowledge(name, through: seq) })
                } catch {
                    self.logger.error("could not store a cursor's position", metadata: ["cursor": "\(name)", "error": "\(error)"])
                    positions[name] = .failure(EvdError(.internalError, "could not store the position of cursor '\(name)': \(error)"))
                }
            }
        }
        for (index, ack) in batch.enumerated() {
            if let name = cursorOf[index], let position = positions[name] {
                switch position {
                case .success(let position): outcomes[index] = .result(["cursor": .string(name), "position": .int(position)])
                case .failure(let error): outcomes[index] = .failure(error)
                }
            }
            self.respond(id: ack.id, outcomes[index])
        }
    }
}
