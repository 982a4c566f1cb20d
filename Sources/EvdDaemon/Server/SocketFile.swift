import EvdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Puts a listening Unix socket at its path with its mode, without a path lookup another process
/// can redirect.
///
/// **Why not `bind(path)` then `chmod(path)`.** Between the two, whoever can write the socket's
/// directory can replace the new socket with a symlink, and `chmod` follows it: evd (often root)
/// would give the link's target the socket's mode (0666 makes any file world-writable). `fchmod`
/// on the socket's descriptor does not help on Linux (it changes the socket's inode, not the file
/// `bind` makes), and `umask` around `bind` is process-wide: every thread's files would get it
/// meanwhile (the thread pool, SQLite, the tests' other daemons in one process).
///
/// **What it does instead.** The socket is bound in a fresh directory of its own (`mkdtemp`, mode
/// 0700, next to the final path so that `rename` stays on one file system), where no one else can
/// place anything: `chmod` there reaches the socket and nothing else. Then `rename` moves it to
/// its path in one step; `rename` never follows a symlink at its destination, it replaces the link
/// itself. The private directory is removed. (The socket's own address, as `getsockname` or `ss -x`
/// report it, stays the private name; clients connect by the final path, which names the same
/// socket.)
struct SocketFile {
    /// The path clients connect to.
    let path: String
    /// The private directory the socket is bound in.
    let stagingDirectory: String
    /// Where to bind: in `stagingDirectory`.
    var stagingPath: String { self.stagingDirectory + "/s" }

    /// Why a socket could not be put in place.
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// Makes the private directory for a socket at `path`.
    init(path: String) throws(Failure) {
        self.path = path
        var template = Array((SocketDirectory.parent(of: path) + "/.evd-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw Failure(
                description: "cannot create a private directory next to \(path) to bind in: \(String(cString: strerror(errno)))"
            )
        }
        self.stagingDirectory = String(cString: made)
    }

    /// Once the socket is bound at `stagingPath`: gives it `mode` and moves it to `path`,
    /// replacing a stale socket (or whatever else `removeStaleSocket` let through meanwhile).
    func install(mode: mode_t) throws(Failure) {
        if chmod(self.stagingPath, mode) != 0 {
            throw Failure(description: "cannot set the mode of \(self.path): \(String(cString: strerror(errno)))")
        }
        if rename(self.stagingPath, self.path) != 0 {
            throw Failure(description: "cannot move the socket into place at \(self.path): \(String(cString: strerror(errno)))")
        }
    }

    /// Removes the private directory (and the socket in it, if it was never moved). Safe to call
    /// more than once.
    func removeStaging() {
        unlink(self.stagingPath)
        rmdir(self.stagingDirectory)
    }
}
