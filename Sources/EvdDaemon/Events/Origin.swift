import EvdClient

#if canImport(Glibc)
import OrderedCollections
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Whose work caused an event: a session and its actor, or the daemon itself (both `null`).
///
/// The envelope fragment `,"session":S,"actor":{...}` is encoded once per origin, not once per event.
public struct EventOrigin: Sendable {
    public let session: UInt64?
    public let actor: Actor?
    /// `,"session":…,"actor":…` ready to splice into an event.
    let envelopeFragment: [UInt8]

    public init(session: UInt64?, actor: Actor?) {
        self.session = session
        self.actor = actor
        var bytes: [UInt8] = Array(#","session":"#.utf8)
        if let session { JSONWriter.appendInt(Int64(session), to: &bytes) } else { bytes += Array("null".utf8) }
        bytes += Array(#","actor":"#.utf8)
        (actor?.jsonValue ?? .null).write(into: &bytes)
        self.envelopeFragment = bytes
    }

    /// The daemon's own work.
    public static let daemon = EventOrigin(session: nil, actor: nil)
}
