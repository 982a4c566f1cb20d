import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Mirror of Linux's `struct ucred` (Glibc does not export it to Swift): what `SO_PEERCRED` returns.
struct PeerCredentials: Sendable, Equatable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0

    /// Reads the peer's credentials from a connected Unix socket channel.
    static func of(_ channel: any Channel) -> EventLoopFuture<PeerCredentials> {
        guard let provider = channel as? any SocketOptionProvider else {
            return channel.eventLoop.makeFailedFuture(ChannelError.operationUnsupported)
        }
        return provider.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED))
    }

    /// The actor these credentials make (PROTOCOL.md §8).
    var actor: Actor {
        let user = Actor.userName(uid: self.uid)
        return Actor(uid: self.uid, gid: self.gid, pid: self.pid, user: user, groups: Actor.groups(user: user, gid: self.gid))
    }
}
