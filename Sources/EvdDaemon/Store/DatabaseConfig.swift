/// A database evd serves: `--db NAME=PATH`.
public struct DatabaseConfig: Sendable, Equatable {
    public var name: String
    public var path: String

    public init(name: String, path: String) {
        self.name = name
        self.path = path
    }

    /// An in-memory database: nothing of it survives the daemon.
    var isInMemory: Bool { self.path == ":memory:" || self.path.contains("mode=memory") }
}
