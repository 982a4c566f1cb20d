import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A second descriptor of a connection's socket, for writing a line from the thread that made it.
///
/// Why: a response or a veto is made on a database thread. Handing it to the connection's event
/// loop to write wakes that loop's thread first, and on a machine whose cores sleep when idle a
/// wake-up costs as much as the whole round trip to the client (`scripts/bench`'s raw ping-pong
/// measures it; docs/performance.md has the figures). Written here, the bytes reach the kernel at
/// once and the loop sleeps on. `Outbox` uses it only when nothing else is queued or being written
/// on the connection, so the order of the output is kept; when the socket cannot take the whole
/// line, the rest goes the usual way.
///
/// NIO does not hand out a channel's descriptor, so it is found by the socket's cookie (`SO_COOKIE`,
/// unique per socket for the kernel's lifetime) among the process's open descriptors, and
/// duplicated: the duplicate stays valid whatever NIO does with its own, and is closed when the
/// outbox closes.
final class WriteThrough: Sendable {
    let descriptor: CInt

    private init(descriptor: CInt) {
        self.descriptor = descriptor
    }

    deinit {
        close(self.descriptor)
    }

    /// Linux's `SO_COOKIE` (Glibc's module does not export it).
    private static let cookieOption: CInt = 57

    /// Finds the channel's socket and duplicates it (on the channel's event loop, where its
    /// descriptor cannot be closed meanwhile); `nil` when the platform cannot tell.
    static func make(for channel: any Channel) -> EventLoopFuture<WriteThrough?> {
        channel.eventLoop.assertInEventLoop()
        guard let provider = channel as? any SocketOptionProvider else { return channel.eventLoop.makeSucceededFuture(nil) }
        return provider.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(Self.cookieOption))
            .map { (cookie: UInt64) in Self.duplicate(cookie: cookie).map(WriteThrough.init) }
            .recover { _ in nil }
    }

    private static func cookie(of descriptor: CInt) -> UInt64? {
        var cookie: UInt64 = 0
        var length = socklen_t(MemoryLayout<UInt64>.size)
        guard getsockopt(descriptor, SOL_SOCKET, Self.cookieOption, &cookie, &length) == 0 else { return nil }
        return cookie
    }

    private static let nameOffset = MemoryLayout<dirent>.offset(of: \dirent.d_name)!

    /// The descriptor found last: the next connection's is usually just above it (a process gets
    /// the lowest free number), so it is looked for there first, and the directory of every open
    /// descriptor is read only when that fails.
    private static let lastFound = Atomic<CInt>(0)

    /// A duplicate of the open descriptor whose socket has `cookie`.
    private static func duplicate(cookie: UInt64) -> CInt? {
        let hint = Self.lastFound.load(ordering: .relaxed)
        let near = (max(0, hint - 16)...(hint + 64)).first { Self.cookie(of: $0) == cookie }
        guard let descriptor = near ?? Self.scan(for: cookie) else { return nil }
        Self.lastFound.store(descriptor, ordering: .relaxed)
        let copy = fcntl(descriptor, F_DUPFD_CLOEXEC, 0)
        guard copy >= 0 else { return nil }
        guard Self.cookie(of: copy) == cookie else {
            close(copy)
            return nil
        }
        return copy
    }

    /// The open descriptor whose socket has `cookie`, from the list of every open descriptor.
    private static func scan(for cookie: UInt64) -> CInt? {
        guard let directory = opendir("/proc/self/fd") else { return nil }
        defer { closedir(directory) }
        while let entry = readdir(directory) {
            // Not `entry.pointee`: a record is only as long as its name, shorter than `dirent`.
            let name = String(cString: UnsafeRawPointer(entry).advanced(by: Self.nameOffset).assumingMemoryBound(to: CChar.self))
            if let descriptor = CInt(name), Self.cookie(of: descriptor) == cookie { return descriptor }
        }
        return nil
    }

    /// What `write` did.
    enum Written {
        /// Every byte went.
        case all
        /// The first `count` bytes went (maybe none): the socket is full; the rest must wait.
        case part(Int)
    }

    /// Writes what the socket takes now, without waiting. An error (the peer left) counts as
    /// nothing written: the event loop's own write meets the same error and closes the channel.
    func write(_ bytes: [UInt8]) -> Written {
        var sent = 0
        while sent < bytes.count {
            let result = bytes.withUnsafeBytes { raw in
                send(self.descriptor, raw.baseAddress! + sent, raw.count - sent, CInt(MSG_NOSIGNAL | MSG_DONTWAIT))
            }
            if result > 0 {
                sent += result
            } else if result < 0 && errno == EINTR {
                continue
            } else {
                return .part(sent)
            }
        }
        return .all
    }
}
