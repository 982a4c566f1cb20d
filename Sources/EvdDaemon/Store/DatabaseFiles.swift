#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The modes of evd's database files: 0600, whatever the umask.
///
/// SQLite creates a database file with 0644 less the umask, and its `-wal` and `-shm` with the
/// mode of the database file (narrowing a new one to exactly that mode). Under the common umask
/// 022 every committed row would be readable by every local user straight from the WAL. So evd
/// creates each database file itself, mode 0600, before SQLite opens it (`createPrivately`): the
/// `-wal` and `-shm` then follow. Files that exist already with a wider mode are narrowed at start
/// when evd owns them (`narrow`); evd has no setting for a group to share them with, so 0600 it is.
enum DatabaseFiles {
    /// The mode of every database file evd creates or narrows.
    static let mode: mode_t = 0o600
    /// The files SQLite keeps next to a database.
    static let companions = ["-wal", "-shm", "-journal"]

    /// The file a database path names: the path itself, the path of a `file:` URI, or nil for an
    /// in-memory or temporary database (`:memory:`, `""`, `mode=memory`).
    static func file(of path: String) -> String? {
        guard !path.isEmpty, path != ":memory:", !path.contains("mode=memory") else { return nil }
        guard path.hasPrefix("file:") else { return path }
        var file = path.dropFirst("file:".count)
        if let query = file.firstIndex(where: { $0 == "?" || $0 == "#" }) { file = file[..<query] }
        // file:///x is the path /x; file://localhost/x too.
        if file.hasPrefix("//") {
            file = file.dropFirst(2)
            guard let slash = file.firstIndex(of: "/") else { return nil }
            file = file[slash...]
        }
        // A %-escaped URI path is left to SQLite (evd creates nothing for it).
        guard !file.isEmpty, !file.contains("%") else { return nil }
        return String(file)
    }

    /// Creates the database file at `path` (a path or `file:` URI) with mode 0600 if there is none,
    /// so that SQLite's `SQLITE_OPEN_CREATE` finds it (an empty file is an empty database) and
    /// creates its `-wal` and `-shm` 0600 too. Nothing happens for an existing file (see `narrow`)
    /// or an in-memory database; a failure is left to SQLite's open, which reports its own.
    static func createPrivately(_ path: String) {
        guard let file = Self.file(of: path) else { return }
        let fd = open(file, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, Self.mode)
        guard fd >= 0 else { return }
        // The umask only takes bits away; this makes it exactly 0600 whatever it is.
        _ = fchmod(fd, Self.mode)
        close(fd)
    }

    /// What `narrow` did or could not do to one file.
    struct Narrowing: Sendable {
        let path: String
        /// Its mode before.
        let mode: mode_t
        let owner: uid_t
        /// Whether it is 0600 now; false when it is not evd's to change (or `fchmod` failed).
        let narrowed: Bool

        var modeText: String { "0" + String(self.mode, radix: 8) }
    }

    /// Narrows the database file at `path` and its `-wal`, `-shm` and `-journal` to 0600 where
    /// another user may read or write them, and returns what it found. A file evd's uid does not
    /// own is left alone (and reported: its owner must fix it). A symlink is judged by its target,
    /// and is neither followed for nor created by anything but the database's own path.
    static func narrow(_ path: String) -> [Narrowing] {
        guard let file = Self.file(of: path) else { return [] }
        var found: [Narrowing] = []
        for (index, name) in ([file] + Self.companions.map { file + $0 }).enumerated() {
            // The database's own path may be a symlink its owner made; a companion never is one of SQLite's.
            let fd = open(name, O_RDONLY | O_CLOEXEC | (index == 0 ? 0 : O_NOFOLLOW) | O_NONBLOCK)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            var info = stat()
            guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_mode & 0o077 != 0 else { continue }
            let mine = info.st_uid == geteuid()
            let narrowed = mine && fchmod(fd, Self.mode) == 0
            found.append(Narrowing(path: name, mode: info.st_mode & 0o7777, owner: info.st_uid, narrowed: narrowed))
        }
        return found
    }
}
