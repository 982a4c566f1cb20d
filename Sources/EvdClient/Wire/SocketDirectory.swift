#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Whether a directory can be trusted to hold evd's socket (or its state): a socket in a directory
/// another user can write can be swapped for theirs, and a client would then hand its token to an
/// impostor; a state directory another user can write lets them delete or replace evd's secret.
///
/// Three rules, from strictest:
/// - `.ownPrivate` — the default `/tmp/evd-$UID` (daemon and clients): anyone can create that name
///   in `/tmp` first, so it must be a real directory (never a symlink), owned by the caller's own
///   uid, and writable by nobody else.
/// - `.daemonOwned` — a directory evd serves from or keeps state in (`--socket`'s parent,
///   `--metrics-socket`'s, `--state-dir`): owned by evd's uid or root, and writable by nobody else —
///   unless it is root's and sticky (`/tmp`), where nobody may remove or rename another's file.
/// - `.clientShared` — the parent of a socket a client was told about (`--socket`, `$EVD_SOCKET`,
///   the runtime directories): its owner may be anyone (typically the daemon's own user, as
///   systemd's `/run/evd`), but a directory that others can write must be sticky and owned by root
///   or by the client itself.
public enum SocketDirectory {
    /// Which of the rules applies.
    public enum Rule: Sendable {
        case ownPrivate
        case daemonOwned
        case clientShared
    }

    /// Why a directory is refused: its description names the directory and what is wrong with it.
    public struct Untrusted: Error, CustomStringConvertible, Sendable {
        public let description: String
    }

    /// The rule a client applies to the directory of the socket at `path`: `.ownPrivate` for the
    /// default path, `.clientShared` for any other.
    public static func clientRule(for path: String) -> Rule {
        path == SocketPath.defaultPath ? .ownPrivate : .clientShared
    }

    /// Checks the directory that holds the socket at `path` by `rule`, as the calling process's
    /// effective uid. A directory that does not exist passes: there is no socket in it to connect to,
    /// and connecting then fails with its own error. `what` names the directory's role in errors.
    public static func checkParent(
        of path: String,
        rule: Rule,
        what: String = "socket directory"
    ) throws(Untrusted) {
        try self.check(self.parent(of: path), rule: rule, what: what, missingIsFine: true)
    }

    /// Checks `directory` by `rule`; `missingIsFine` lets a directory that does not exist pass.
    public static func check(
        _ directory: String,
        rule: Rule,
        what: String,
        missingIsFine: Bool = false
    ) throws(Untrusted) {
        var info = stat()
        // The default directory is looked at itself (a symlink there is someone's trap); the
        // others may be symlinks to a directory (`/var/run` -> `/run`): the directory is judged.
        let found = rule == .ownPrivate ? lstat(directory, &info) : stat(directory, &info)
        guard found == 0 else {
            if errno == ENOENT && missingIsFine { return }
            throw Untrusted(description: "cannot check the \(what) \(directory): \(String(cString: strerror(errno)))")
        }
        let me = geteuid()
        let mode = info.st_mode & 0o7777
        let othersWrite = mode & 0o022 != 0
        let sticky = mode & S_ISVTX != 0
        let modeText = "0" + String(mode, radix: 8)
        if rule == .ownPrivate && (info.st_mode & S_IFMT) == S_IFLNK {
            throw Untrusted(
                description: "refusing the \(what) \(directory): it is a symlink, not a directory; another user may have "
                    + "placed it to intercept evd's socket (remove it, or name a socket with --socket or $EVD_SOCKET)"
            )
        }
        guard (info.st_mode & S_IFMT) == S_IFDIR else {
            throw Untrusted(description: "refusing the \(what) \(directory): it is not a directory")
        }
        switch rule {
        case .ownPrivate:
            guard info.st_uid == me else {
                throw Untrusted(
                    description: "refusing the \(what) \(directory): it belongs to uid \(info.st_uid), not to uid \(me); "
                        + "another user may have made it to intercept evd's socket (remove it, or name a socket with "
                        + "--socket or $EVD_SOCKET)"
                )
            }
            guard !othersWrite else {
                throw Untrusted(
                    description: "refusing the \(what) \(directory): its mode \(modeText) lets other users replace the "
                        + "socket in it (chmod 700 it)"
                )
            }
        case .daemonOwned:
            guard info.st_uid == me || info.st_uid == 0 else {
                throw Untrusted(
                    description: "refusing the \(what) \(directory): it belongs to uid \(info.st_uid), not to evd's uid "
                        + "\(me) or root, and its owner could replace or delete what evd keeps there"
                )
            }
            guard !othersWrite || (sticky && info.st_uid == 0) else {
                throw Untrusted(
                    description: "refusing the \(what) \(directory): its mode \(modeText) lets other users replace or "
                        + "delete what evd keeps there (chmod go-w it, or use a directory only evd's user can write)"
                )
            }
        case .clientShared:
            guard !othersWrite || (sticky && (info.st_uid == 0 || info.st_uid == me)) else {
                throw Untrusted(
                    description: "refusing the \(what) \(directory): its mode \(modeText) (owner uid \(info.st_uid)) "
                        + "lets other users replace the socket in it with their own"
                )
            }
        }
    }

    /// The directory part of `path` (`.` for a bare name).
    public static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
