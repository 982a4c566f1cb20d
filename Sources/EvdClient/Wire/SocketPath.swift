#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Where the daemon's socket is, resolved the same way by every executable (PROTOCOL.md §1).
public enum SocketPath {
    /// `--socket PATH`, else `$EVD_SOCKET`, else `$RUNTIME_DIRECTORY/evd.sock`, else
    /// `$XDG_RUNTIME_DIR/evd.sock`, else `/tmp/evd-$UID/evd.sock`.
    public static func resolve(explicit: String?, environment: [String: String]) -> String {
        if let explicit, !explicit.isEmpty { return explicit }
        return self.fromEnvironment(environment) ?? self.defaultPath
    }

    /// `/tmp/evd-$UID/evd.sock`: where evd and its clients meet when nothing names a socket. Its
    /// directory must be the user's own and private (`SocketDirectory.Rule.ownPrivate`): anyone
    /// can make that name in `/tmp` first.
    public static var defaultPath: String { "/tmp/evd-\(getuid())/evd.sock" }

    /// The path the environment names (`$EVD_SOCKET`, `$RUNTIME_DIRECTORY/evd.sock`,
    /// `$XDG_RUNTIME_DIR/evd.sock`), if any: the daemon lets it win over its config file's.
    public static func fromEnvironment(_ environment: [String: String]) -> String? {
        if let path = environment["EVD_SOCKET"], !path.isEmpty { return path }
        if let dir = environment["RUNTIME_DIRECTORY"], !dir.isEmpty {
            // systemd may pass several directories separated by ':'; the first is ours.
            let first = dir.split(separator: ":", maxSplits: 1).first.map(String.init) ?? dir
            return first + "/evd.sock"
        }
        if let dir = environment["XDG_RUNTIME_DIR"], !dir.isEmpty { return dir + "/evd.sock" }
        return nil
    }

    /// The process environment as a dictionary.
    public static var processEnvironment: [String: String] {
        var result: [String: String] = [:]
        var pointer = environ
        while let entry = pointer.pointee {
            let pair = String(cString: entry)
            if let eq = pair.firstIndex(of: "=") {
                result[String(pair[..<eq])] = String(pair[pair.index(after: eq)...])
            }
            pointer += 1
        }
        return result
    }
}
