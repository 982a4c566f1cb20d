import CSQLite
import EvdClient
import Logging
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The daemon's directories and database files at start: created with their modes, refused when
/// another user could have made or can write them.
extension Daemon {
    /// Creates the state directory, the socket's directory and each database's directory, and
    /// refuses a state or socket directory that another user could have made or can write
    /// (`SocketDirectory`): there they could delete the token secret, or put their own socket where
    /// clients look for evd's.
    func prepareDirectories() throws {
        try Self.makeDirectories(self.configuration.stateDirectory, mode: 0o700)
        try Self.checkDirectory(self.configuration.stateDirectory, rule: .daemonOwned, what: "state directory")
        if self.configuration.listenFD == nil {
            try Self.prepareSocketDirectory(for: self.configuration.socketPath)
        }
        for database in self.configuration.databases where !database.path.hasPrefix("file:") && database.path != ":memory:" {
            try Self.makeDirectories(SocketDirectory.parent(of: database.path), mode: 0o700)
        }
    }

    /// Creates the directory of the socket at `path` and checks it: the default `/tmp/evd-$UID`
    /// must be evd's own and private, any other must be evd's or root's and writable by nobody
    /// else (unless sticky and root's, as `/tmp`).
    static func prepareSocketDirectory(for path: String) throws {
        let directory = SocketDirectory.parent(of: path)
        let rule: SocketDirectory.Rule = path == SocketPath.defaultPath ? .ownPrivate : .daemonOwned
        // A symlink at the default directory's name (dangling or not) is never made into a
        // directory: `mkdir` does not follow it, and the check after refuses it.
        try Self.makeDirectories(directory, mode: 0o700)
        try Self.checkDirectory(directory, rule: rule, what: "socket directory")
    }

    /// `SocketDirectory.check`, its refusal as a `StartupError`.
    static func checkDirectory(
        _ directory: String,
        rule: SocketDirectory.Rule,
        what: String,
        missingIsFine: Bool = false
    ) throws {
        do {
            try SocketDirectory.check(directory, rule: rule, what: what, missingIsFine: missingIsFine)
        } catch {
            throw StartupError(description: error.description)
        }
    }

    /// Narrows every database file evd serves or keeps (and their `-wal`, `-shm`) that other users
    /// may read to 0600 (`DatabaseFiles`), and says so; one evd does not own is only reported.
    func narrowDatabaseFiles() {
        let state = ["journal.db", "twophase.db", "cursors.db"].map { self.configuration.stateDirectory + "/" + $0 }
        for path in self.configuration.databases.map(\.path) + state {
            for file in DatabaseFiles.narrow(path) {
                let metadata: Logger.Metadata = [
                    "file.path": "\(file.path)", "file.mode": "\(file.modeText)", "file.uid": "\(file.owner)",
                ]
                if file.narrowed {
                    self.logger.warning("a database file was readable by other users: its mode is now 0600", metadata: metadata)
                } else {
                    self.logger.warning(
                        "a database file is readable by other users and evd cannot narrow it (not its owner): chmod 600 it",
                        metadata: metadata
                    )
                }
            }
        }
    }

    /// `mkdir -p` with `mode` for the directories it creates.
    static func makeDirectories(_ path: String, mode: mode_t) throws {
        var info = stat()
        if stat(path, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFDIR else { throw StartupError(description: "\(path) is not a directory") }
            return
        }
        let parent = SocketDirectory.parent(of: path)
        if parent != path && parent != "." && parent != "/" { try makeDirectories(parent, mode: mode) }
        if mkdir(path, mode) != 0 && errno != EEXIST {
            throw StartupError(description: "cannot create \(path): \(String(cString: strerror(errno)))")
        }
    }
}
