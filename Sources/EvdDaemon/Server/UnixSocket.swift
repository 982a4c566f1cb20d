#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Connects `fd`, an `AF_UNIX` stream socket, to the socket file at `path`.
///
/// Returns `connect(2)`'s result: 0, or -1 with `errno` set. (NIO does the daemon's and clients'
/// own connections; this is for the few places that need a plain descriptor: the stale-socket
/// check at start-up, and tests that play a misbehaving peer.)
func connectUnixSocket(_ fd: Int32, to path: String) -> Int32 {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, byte) in bytes.prefix(raw.count - 1).enumerated() { raw[i] = byte }
    }
    return withUnsafePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
        }
    }
}
