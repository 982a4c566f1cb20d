import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Where the built executables are: `$EVD_BIN_DIR` (scripts/test sets it), else `.build/debug`.
public func binaryPath(_ name: String) -> String {
    if let dir = ProcessInfo.processInfo.environment["EVD_BIN_DIR"], !dir.isEmpty { return dir + "/" + name }
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    return root.appendingPathComponent(".build/debug/\(name)").path
}

/// A loopback TCP port that was free a moment ago (bound, then released).
public func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) { pointer in
        pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { raw in
            bind(fd, raw, length) == 0 && getsockname(fd, raw, &length) == 0
        }
    }
    guard bound else { throw NATSServer.StartFailed(description: "cannot bind a loopback port") }
    return Int(UInt16(bigEndian: address.sin_port))
}
