import CSQLite
import EvdClient

/// The rows of some tables of one database as of one moment whose place in the journal is known
/// (`subscribe` with `snapshot`, issue 23): one read transaction on a pooled connection, held
/// open while the rows are read a page at a time, so that a table of any size streams in bounded
/// memory and every page belongs to the same snapshot.
///
/// Its `seq`: every committed change of the database with a seq up to it is in the snapshot, and
/// none after it. A database's committed events are journaled inside the transaction that commits
/// them (`PooledConnection.commit`), and its commits are serialized by SQLite's write lock with
/// their seqs reserved in commit order, so the journal's newest row the read transaction sees is
/// the newest change it sees. Should retention have emptied the journal, its floor (read before the
/// transaction began) stands in: everything up to it is gone from the journal, and a later change
/// would be in it.
///
/// Used from one task at a time; its SQLite work runs on the pool's threads.
final class TableSnapshot: @unchecked Sendable {
    let pool: ConnectionPool
    let connection: PooledConnection
    let tables: [String]
    let seq: Int64
    /// `PRAGMA schema_version` in the snapshot: the row events' `schema_version` for the same shape.
    let schemaVersion: Int64
    /// The most rows, and about the most bytes, one page holds.
    static let pageRows = 2048
    static let pageBytes = 1 << 20

    private var tableIndex = 0
    private var statement: SQLiteStatement?
    private var keys: [[UInt8]] = []
    private let textIsUTF8: Bool

    private init(
        pool: ConnectionPool,
        connection: PooledConnection,
        tables: [String],
        seq: Int64,
        schemaVersion: Int64,
        textIsUTF8: Bool
    ) {
        self.pool = pool
        self.connection = connection
        self.tables = tables
        self.seq = seq
        self.schemaVersion = schemaVersion
        self.textIsUTF8 = textIsUTF8
    }

    /// Begins the read transaction on `connection` (checked out for it) and finds its seq. Every
    /// table must exist (`no_such_table`) and be the client's, not evd's or SQLite's. On an error
    /// the transaction is rolled back; the caller gives the connection back.
    static func begin(
        pool: ConnectionPool,
        connection: PooledConnection,
        tables: [String],
        floor: Int64
    ) async throws -> TableSnapshot {
        try await pool.run { () throws -> TableSnapshot in
            let sqlite = connection.sqlite
            try sqlite.exec("BEGIN")
            do {
                // The transaction's snapshot is taken by its first read, this one.
                let journaled = try? sqlite.scalarInt("SELECT max(seq) FROM \(Journal.table)")
                for table in tables {
                    let lowered = table.lowercased()
                    // Names as SQLite matches them: without regard to case.
                    let exists =
                        try sqlite.scalarInt(
                            "SELECT count(*) FROM main.sqlite_schema WHERE type = 'table' AND name = \(SQLIdentifier.literal(table)) COLLATE NOCASE"
                        ) ?? 0
                    guard exists > 0, !lowered.hasPrefix("sqlite_"), !lowered.hasPrefix("_evd_") else {
                        throw EvdError(
                            .noSuchTable,
                            "no table '\(table)' in '\(pool.database.name)' to take a snapshot of",
                            extra: ["field": "snapshot", "table": .string(table)]
                        )
                    }
                }
                let utf8 = (try? sqlite.scalarText("PRAGMA main.encoding")) == "UTF-8"
                return TableSnapshot(
                    pool: pool,
                    connection: connection,
                    tables: tables,
                    seq: max(journaled ?? 0, floor),
                    schemaVersion: try sqlite.scalarInt("PRAGMA main.schema_version") ?? 0,
                    textIsUTF8: utf8
                )
            } catch {
                try? sqlite.exec("ROLLBACK")
                throw error
            }
        }
    }

    /// The next page: a table's name and its next rows as a JSON array of row objects (each value
    /// in evd's lossless forms, as `rows: true` images); nil once every table has been read.
    func nextPage() async throws -> (table: String, rows: [UInt8])? {
        try await self.pool.run { () throws -> (table: String, rows: [UInt8])? in
            while self.tableIndex < self.tables.count {
                let table = self.tables[self.tableIndex]
                let statement = try self.openStatement(table)
                var bytes: [UInt8] = [UInt8(ascii: "[")]
                bytes.reserveCapacity(64 * 1024)
                var count = 0
                while count < Self.pageRows, bytes.count < Self.pageBytes, try statement.step() {
                    if count > 0 { bytes.append(UInt8(ascii: ",")) }
                    self.appendRow(statement, to: &bytes)
                    count += 1
                }
                if count < Self.pageRows && bytes.count < Self.pageBytes {
                    // The table is done: the next page is the next table's.
                    self.statement = nil
                    self.tableIndex += 1
                }
                if count > 0 {
                    bytes.append(UInt8(ascii: "]"))
                    return (table, bytes)
                }
            }
            return nil
        }
    }

    /// Ends the read transaction (nothing was written: a rollback).
    func end() async {
        try? await self.pool.run {
            self.statement = nil
            try? self.connection.sqlite.exec("ROLLBACK")
        }
    }

    private func openStatement(_ table: String) throws(SQLiteError) -> SQLiteStatement {
        if let statement = self.statement { return statement }
        let sql = "SELECT * FROM \(SQLIdentifier.quote(table))"
        guard let statement = try self.connection.sqlite.prepare(SQLText(sql), from: 0) else {
            throw SQLiteError(code: SQLITE_ERROR, message: "no statement in \(sql)")
        }
        self.keys = statement.columnNames.enumerated().map { index, name in
            var key: [UInt8] = index == 0 ? [UInt8(ascii: "{")] : [UInt8(ascii: ",")]
            JSONWriter.appendString(name, to: &key)
            key.append(UInt8(ascii: ":"))
            return key
        }
        self.statement = statement
        return statement
    }

    private func appendRow(_ statement: SQLiteStatement, to bytes: inout [UInt8]) {
        for (index, key) in self.keys.enumerated() {
            bytes += key
            if let value = sqlite3_column_value(statement.handle, Int32(index)) {
                JSONValue.write(sqliteValue: value, textIsUTF8: self.textIsUTF8, into: &bytes)
            } else {
                JSONWriter.appendASCII("null", to: &bytes)
            }
        }
        bytes.append(UInt8(ascii: "}"))  // (a table has at least one column: the first key opened the object)
    }
}
