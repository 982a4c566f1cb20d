import CSQLite
import EvdClient
import OrderedCollections

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An error from SQLite: its extended result code, the code's name and SQLite's message.
public struct SQLiteError: Error, Sendable, CustomStringConvertible {
    /// The extended result code (`SQLITE_CONSTRAINT_UNIQUE` is 2067).
    public let extendedCode: Int32
    /// SQLite's message (`UNIQUE constraint failed: dogs.id`).
    public let message: String
    /// The statement that failed, when there was one.
    public let sql: String?

    /// The primary result code (`SQLITE_CONSTRAINT` is 19).
    public var primaryCode: Int32 { self.extendedCode & 0xff }
    /// The extended code's name, as `sqlite_code` reports it on the wire.
    public var codeName: String {
        sqliteResultCodeNames[self.extendedCode] ?? sqliteResultCodeNames[self.primaryCode] ?? "SQLITE_\(self.extendedCode)"
    }

    /// Whether the connection that raised this should be invalidated: it can no longer be trusted.
    public var invalidatesConnection: Bool {
        [SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_NOTADB, SQLITE_CANTOPEN, SQLITE_FULL].contains(self.primaryCode)
    }

    /// Whether this is a lock conflict another connection holds (the wire's `busy`).
    public var isBusy: Bool { self.primaryCode == SQLITE_BUSY || self.primaryCode == SQLITE_LOCKED }

    public init(code: Int32, message: String, sql: String? = nil) {
        self.extendedCode = code
        self.message = message
        self.sql = sql
    }

    public var description: String { "\(self.codeName): \(self.message)" }

    /// The error as the wire's error object `{code, message, sqlite_code}`.
    public var evdError: EvdError {
        EvdError(self.isBusy ? .busy : .sqlError, self.message, extra: ["sqlite_code": .string(self.codeName)])
    }
}
