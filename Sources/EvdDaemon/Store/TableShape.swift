import CSQLite
import EvdClient

/// A table's columns and primary key, as the committed events need them.
struct TableShape: Sendable {
    let columns: [String]
    /// Indexes into `columns` of the primary key, in key order; empty for a rowid table without one.
    let keyColumns: [Int]
    /// The key is the rowid (no declared key, or an `INTEGER PRIMARY KEY` alias).
    let keyIsRowid: Bool
    /// For each column, 1 when it has REAL affinity, else 0; empty when none has. SQLite keeps a
    /// whole number in such a column as an integer in the record, and the pre-update hook reads
    /// an inserted row from the record (`sqlite3_preupdate_new`), so the images make it a real
    /// again, as a `SELECT` reads it.
    var reals: [UInt8] = []

    /// `row` (as the hook read it) with the integers of REAL columns as the reals they are.
    func realified(_ row: [JSONValue]) -> [JSONValue] {
        guard !self.reals.isEmpty, row.count == self.reals.count else { return row }
        var row = row
        for index in row.indices where self.reals[index] != 0 {
            if case .int(let int) = row[index] { row[index] = .double(Double(int)) }
        }
        return row
    }
}

extension TableShape {
    /// Reads a table's columns and key with `PRAGMA table_xinfo` and `pragma_table_list`.
    static func read(_ table: String, on connection: SQLiteConnection) throws(SQLiteError) -> TableShape? {
        let quoted = SQLIdentifier.quote(table)
        guard let info = try connection.prepare(SQLText("PRAGMA main.table_xinfo(\(quoted))"), from: 0) else { return nil }
        var columns: [String] = []
        var keyed: [(position: Int64, column: Int, type: String)] = []
        var reals: [UInt8] = []
        while try info.step() {
            let name = info.column(1).stringValue ?? ""
            let type = info.column(2).stringValue ?? ""
            let pk = info.column(5).intValue ?? 0
            if pk > 0 { keyed.append((pk, columns.count, type)) }
            columns.append(name)
            reals.append(ColumnAffinity(declaredType: type) == .real ? 1 : 0)
        }
        guard !columns.isEmpty else { return nil }
        keyed.sort { $0.position < $1.position }
        var withoutRowid = false
        if let list = try connection.prepare(
            SQLText("SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = \(SQLIdentifier.literal(table))"),
            from: 0
        ),
            try list.step()
        {
            withoutRowid = list.column(0).intValue == 1
        }
        let rowidAlias = !withoutRowid && keyed.count == 1 && keyed[0].type.uppercased() == "INTEGER"
        return TableShape(
            columns: columns,
            keyColumns: keyed.map(\.column),
            keyIsRowid: keyed.isEmpty || rowidAlias,
            reals: reals.contains(1) ? reals : []
        )
    }
}
