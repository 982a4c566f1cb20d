import EvdClient
import OrderedCollections

/// A veto listener's `reply` (PROTOCOL.md §4), handled on the event loop as it arrives.
extension Session {
    /// Handles a `reply` at once, even while this connection's own request runs. A valid reply gets
    /// no response; an invalid one gets an error response (with the reply's `id`) and, when it
    /// names a pending veto, counts as no answer: the listener's `on_timeout` decides.
    func handleReply(_ request: JSONObject) {
        let id = request["id"] ?? .null
        var arguments = Arguments(request)
        var pending: PendingVeto?
        do {
            let seq = try arguments.requiredInt("seq")
            // Missing or ill-typed arguments are reported first, as for every op; a reply that
            // names a pending veto still resolves it (as no answer) below.
            var parsed: (action: String, reason: String?, set: JSONObject?)?
            var invalid: EvdError?
            do throws(EvdError) {
                parsed = (try arguments.requiredString("action"), try arguments.string("reason"), try arguments.object("set"))
                try arguments.finish()
            } catch {
                invalid = error
            }
            guard let veto = self.core.bus.pendingVetoes.find(session: self.id, seq: seq) else {
                // Late, most likely (it timed out, or was sent while the listener was tripped):
                // still a sign of life, which closes a tripped listener's circuit.
                self.core.bus.vetoListenersReplied(session: self.id)
                throw invalid ?? EvdError.badRequest(field: "seq", "no veto is pending for this connection with seq \(seq)")
            }
            pending = veto
            if let invalid { throw invalid }
            guard let parsed else { return }
            let (action, reason, set) = parsed
            let decision: VetoDecision
            switch action {
            case "allow":
                decision = .allow
            case "deny":
                decision = .deny(reason: reason)
            case "modify":
                guard let set else { throw EvdError.badRequest(field: "set", "modify needs 'set': the properties to replace") }
                for key in set.keys where !veto.mutable.contains(key) {
                    let allowed = veto.mutable.isEmpty ? "none" : veto.mutable.sorted().joined(separator: ", ")
                    throw EvdError.badRequest(field: "set.\(key)", "'\(key)' is not a mutable property of this event (mutable: \(allowed))")
                }
                try Self.checkModification(set)
                decision = .modify(set)
            default:
                throw EvdError.badRequest(field: "action", "'action' must be one of allow, deny, modify, not '\(action)'")
            }
            if !veto.resolve(decision) {
                throw EvdError.badRequest(field: "seq", "the veto with seq \(seq) was already decided (it timed out)")
            }
        } catch {
            pending?.resolve(.noAnswer(.invalidReply))
            self.respond(id: id.isScalar ? id : .null, .failure(Self.wireError(error)))
        }
    }

    /// Checks the type of each replaced property: what evd then runs must make sense.
    static func checkModification(_ set: JSONObject) throws(EvdError) {
        for (key, value) in set {
            let ok: Bool
            switch key {
            case "statement": ok = value.stringValue != nil
            case "parameters": ok = value.arrayValue != nil || value.objectValue != nil
            case "request", "pragmas", "column": ok = value.objectValue != nil
            case "error": ok = value["code"]?.stringValue != nil && value["message"]?.stringValue != nil
            default: ok = true
            }
            if !ok { throw EvdError.badRequest(field: "set.\(key)", "'\(key)' has the wrong type (\(value.typeName))") }
        }
    }
}
