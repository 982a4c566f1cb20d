import CSQLite
import EvdClient
import OrderedCollections

// MARK: Running

extension SQLRun {
    /// Runs a structured op in this request's transaction; returns its result.
    func perform(_ op: StructuredOp) throws(EvdError) -> JSONValue {
        try self.inRequest { () throws(EvdError) -> (JSONValue, Int64) in
            if self.implicitTransaction {
                let readOnly: Bool
                if case .describe = op { readOnly = true } else { readOnly = false }
                try self.beginImplicit(immediate: !readOnly)
                return try self.performInTransaction(op)
            }
            // In the session's transaction, a failed op must leave nothing half-written either.
            let mark = self.connection.capture.mark
            try self.evdSQL("SAVEPOINT evd_op")
            do throws(EvdError) {
                let result = try self.performInTransaction(op)
                try self.evdSQL("RELEASE evd_op")
                return result
            } catch {
                if self.sqlite.inTransaction { try? self.evdSQL("ROLLBACK TO evd_op; RELEASE evd_op") }
                self.connection.capture.truncate(to: mark)
                throw error
            }
        }
    }

    private func performInTransaction(_ op: StructuredOp) throws(EvdError) -> (JSONValue, Int64) {
        switch op {
        case .createTable(let table, let columns, let rows, let keys, let ignore, let replace, let alter):
            return try self.createTable(table, columns: columns, rows: rows, keys: keys, ignore: ignore, replace: replace, alter: alter)
        case .insert(let table, let rows, let ignore, let replace, let alter, let returning):
            let target = try self.existingTable(table)
            let (inserted, returned) = try self.insertRows(
                target,
                rows,
                mode: ignore ? .ignore : replace ? .replace : .plain,
                alter: alter,
                returning: returning
            )
            var result: JSONObject = ["inserted": .int(inserted)]
            if let returned { result["rows"] = .array(returned) }
            return (.object(result), inserted)
        case .upsert(let table, let rows, let alter, let returning):
            let target = try self.existingTable(table)
            let (upserted, returned) = try self.insertRows(target, rows, mode: .upsert, alter: alter, returning: returning)
            var result: JSONObject = ["upserted": .int(upserted)]
            if let returned { result["rows"] = .array(returned) }
            return (.object(result), upserted)
        case .update(let table, let key, let update, let alter, let returning):
            return try self.updateRow(try self.existingTable(table), key: key, update: update, alter: alter, returning: returning)
        case .delete(let table, let key):
            let target = try self.existingTable(table)
            let (clause, values) = try self.keyClause(target, try self.shape(of: target), key)
            let deleted = try self.runStatement("DELETE FROM \(SQLIdentifier.quote(target)) WHERE \(clause)", [values])
            guard deleted > 0 else { throw self.noSuchRow(target, key) }
            return (["deleted": .int(deleted)], deleted)
        case .dropTable(let table):
            let target = try self.existingTable(table)
            _ = try self.runStatement("DROP TABLE \(SQLIdentifier.quote(target))", [[]])
            return ([:], 0)
        case .describe(let table):
            return (["columns": .array(try self.describe(try self.existingTable(table)))], 0)
        }
    }

    // MARK: The ops

    private func createTable(
        _ table: String,
        columns: [StructuredOp.ColumnSpec]?,
        rows: JSONRows?,
        keys: [String],
        ignore: Bool,
        replace: Bool,
        alter: Bool
    ) throws(EvdError) -> (JSONValue, Int64) {
        let existing = try self.schemaSnapshot()[table.lowercased()]
        if let existing, existing.type != "table" {
            throw EvdError.badRequest(field: "table", "'\(existing.name)' is a \(existing.type), not a table")
        }
        if let existing {
            guard let rows else {
                throw EvdError.badRequest(field: "table", "table \"\(existing.name)\" already exists")
            }
            // An existing table takes the rows; a different key is an error, the same one is fine.
            let currentKeys = try self.columns(of: existing.name).filter { $0.pk > 0 }.sorted { $0.pk < $1.pk }.map(\.name)
            if !keys.isEmpty && !currentKeys.isEmpty && Set(keys.map { $0.lowercased() }) != Set(currentKeys.map { $0.lowercased() }) {
                throw EvdError.badRequest(field: keys.count > 1 ? "pks" : "pk", "pk cannot be changed for existing table")
            }
            let (inserted, _) = try self.insertRows(
                existing.name,
                rows,
                mode: ignore ? .ignore : replace ? .replace : .plain,
                alter: alter,
                returning: false
            )
            let schema = try self.schemaSnapshot()[table.lowercased()]?.sql ?? ""
            return (["table": .string(existing.name), "schema": .string(schema), "created": false, "inserted": .int(inserted)], inserted)
        }
        var definitions: [(name: String, type: String)]
        if let columns {
            let types = ["text": "TEXT", "integer": "INTEGER", "float": "REAL", "blob": "BLOB"]
            definitions = columns.map { ($0.name, types[$0.type] ?? "TEXT") }
        } else {
            definitions = Self.inferColumns(rows ?? JSONRows())
        }
        if keys.count == 1, !definitions.contains(where: { $0.name.lowercased() == keys[0].lowercased() }) {
            definitions.insert((keys[0], "INTEGER"), at: 0)  // sqlite-utils adds a missing key first
        }
        for key in keys where !definitions.contains(where: { $0.name.lowercased() == key.lowercased() }) {
            throw EvdError.badRequest(field: "pks", "pks names a column the table does not have: \(key)")
        }
        var lines = definitions.map { definition -> String in
            var line = "   \(SQLIdentifier.quote(definition.name)) \(definition.type)"
            if keys.count == 1 && keys[0].lowercased() == definition.name.lowercased() { line += " PRIMARY KEY" }
            return line
        }
        if keys.count > 1 { lines.append("   PRIMARY KEY (\(keys.map(SQLIdentifier.quote).joined(separator: ", ")))") }
        let sql = "CREATE TABLE \(SQLIdentifier.quote(table)) (\n\(lines.joined(separator: ",\n"))\n)"
        _ = try self.runStatement(sql, [[]])
        var inserted: Int64 = 0
        if let rows {
            (inserted, _) = try self.insertRows(
                table,
                rows,
                mode: ignore ? .ignore : replace ? .replace : .plain,
                alter: true,
                returning: false
            )
        }
        let schema = try self.schemaSnapshot()[table.lowercased()]?.sql ?? sql
        return (["table": .string(table), "schema": .string(schema), "created": true, "inserted": .int(inserted)], inserted)
    }

    enum InsertMode { case plain, ignore, replace, upsert }

    /// Inserts (or upserts) `rows` into `table` with one prepared statement over the union of their
    /// columns; a row without a column gets NULL for it, as in Datasette. Returns the rows SQLite
    /// changed, and with `returning` the rows as stored.
    private func insertRows(
        _ table: String,
        _ rows: JSONRows,
        mode: InsertMode,
        alter: Bool,
        returning: Bool
    ) throws(EvdError) -> (Int64, [JSONValue]?) {
        var intent = StatementIntent(kind: mode == .upsert ? .upsert : .insert, ignore: mode == .ignore, replace: mode == .replace)
        intent.reportedRows = rows.count
        intent.table = table
        intent.group = self.connection.capture.newGroup()
        var columnNames: OrderedSet<String> = []
        for run in rows.runs {
            for key in run.keys { columnNames.append(key) }
        }
        var columns = try self.columns(of: table)
        let shape = try self.shape(of: table)
        let isRowidTable = shape.keyColumns.isEmpty
        let known = Set(columns.map(\.name)).union(isRowidTable ? ["rowid"] : [])
        if mode == .upsert {
            let keyNames = isRowidTable ? ["rowid"] : shape.keyColumns.map { shape.columns[$0] }
            var problems: [String] = []
            for run in rows.runs {
                let missing = keyNames.filter { !run.keys.contains($0) }
                let positions = keyNames.compactMap { run.keys.firstIndex(of: $0) }
                for index in run.rows {
                    if !missing.isEmpty {
                        problems.append(
                            "Row \(index) is missing primary key column(s): \(missing.map { "\"\($0)\"" }.joined(separator: ", "))"
                        )
                        continue
                    }
                    let null = positions.filter { rows.cells[run.valueIndex(row: index, keyIndex: $0)].kind == .null }
                    if !null.isEmpty {
                        problems.append(
                            "Row \(index) has null primary key column(s): \(null.map { "\"\(run.keys[$0])\"" }.joined(separator: ", "))"
                        )
                    }
                }
            }
            if !problems.isEmpty { throw EvdError.badRequest(field: "rows", problems.joined(separator: "; ")) }
        }
        let unknown = columnNames.filter { !known.contains($0) }
        if !unknown.isEmpty {
            guard alter else {
                var problems: [String] = []
                for run in rows.runs {
                    let bad = run.keys.filter { !known.contains($0) }.sorted()
                    if bad.isEmpty { continue }
                    for index in run.rows { problems.append("Row \(index) has invalid columns: \(bad.joined(separator: ", "))") }
                }
                throw EvdError.badRequest(field: "rows", problems.joined(separator: "; ") + " (alter: true adds them)")
            }
            self.connection.capture.coalescesAlters = true
            defer { self.connection.capture.coalescesAlters = false }
            for name in unknown {
                let type = StructuredOp.inferredType(rows.column(name))
                _ = try self.runStatement("ALTER TABLE \(SQLIdentifier.quote(table)) ADD COLUMN \(SQLIdentifier.quote(name)) \(type)", [[]])
            }
            columns = try self.columns(of: table)
        }
        guard !rows.isEmpty else {
            self.connection.capture.beginUnit(intent)  // Datasette reports an empty insert too
            return (0, returning ? [] : nil)
        }
        // One statement per run of rows with the same columns: a row without a column gets the
        // column's default (insert) or keeps its value (upsert).
        var changed: Int64 = 0
        var returned: [JSONValue] = []
        for run in rows.runs {
            let (count, stored) = try self.insertRun(table, rows, run, shape: shape, mode: mode, intent: intent, returning: returning)
            changed += count
            returned += stored
        }
        return (changed, returning ? returned : nil)
    }

    /// Inserts a run of rows (all with the same columns) with one prepared statement.
    private func insertRun(
        _ table: String,
        _ rows: JSONRows,
        _ run: JSONRows.Run,
        shape: TableShape,
        mode: InsertMode,
        intent: StatementIntent,
        returning: Bool
    ) throws(EvdError) -> (Int64, [JSONValue]) {
        let names = run.keys
        let isRowidTable = shape.keyColumns.isEmpty
        let quotedNames = names.map(SQLIdentifier.quote).joined(separator: ", ")
        let placeholders = Array(repeating: "?", count: names.count).joined(separator: ", ")
        let verb: String
        switch mode {
        case .plain, .upsert: verb = "INSERT"
        case .ignore: verb = "INSERT OR IGNORE"
        case .replace: verb = "INSERT OR REPLACE"
        }
        var sql = "\(verb) INTO \(SQLIdentifier.quote(table)) (\(quotedNames)) VALUES (\(placeholders))"
        if mode == .upsert {
            let keyNames = isRowidTable ? [] : shape.keyColumns.map { shape.columns[$0] }
            let keySet = Set(keyNames.map { $0.lowercased() }).union(["rowid"])
            let updates = names.filter { !keySet.contains($0.lowercased()) }
            if isRowidTable {
                // A rowid is no conflict target: update by rowid, insert what was not there.
                return try self.upsertByRowid(table, rows, run, intent: intent, returning: returning)
            }
            sql += " ON CONFLICT(\(keyNames.map(SQLIdentifier.quote).joined(separator: ", "))) DO "
            sql +=
                updates.isEmpty
                ? "NOTHING"
                : "UPDATE SET " + updates.map { "\(SQLIdentifier.quote($0)) = excluded.\(SQLIdentifier.quote($0))" }.joined(separator: ", ")
        }
        if returning { sql += " RETURNING *" }
        // The values are stored as they are (`StructuredOp.rows` made them so), in `names` order.
        var returned: [JSONValue] = []
        let changed = try self.runStatement(sql, many: .rows(rows, run, images: try self.boundImages(table, names)), intent: intent) {
            statement in
            if returning { returned.append(Self.rowObject(statement)) }
        }
        return (changed, returned)
    }

    /// How the hook may write the after-images of a run of rows with the columns `names` from
    /// the values bound: when images are recorded and the run has every column of the table
    /// (else SQLite fills in defaults the hook must read back).
    private func boundImages(_ table: String, _ names: [String]) throws(EvdError) -> (table: String, columns: [ChangeCapture.BoundColumn])?
    {
        guard self.connection.capture.active, self.connection.capture.images else { return nil }
        let columns = try self.columns(of: table)
        var bound: [ChangeCapture.BoundColumn] = []
        for column in columns {
            guard let key = names.firstIndex(of: column.name) else { return nil }
            bound.append(ChangeCapture.BoundColumn(column, key: key))
        }
        return (table, bound)
    }

    private func upsertByRowid(
        _ table: String,
        _ rows: JSONRows,
        _ run: JSONRows.Run,
        intent: StatementIntent,
        returning: Bool
    ) throws(EvdError) -> (Int64, [JSONValue]) {
        var changed: Int64 = 0
        var returned: [JSONValue] = []
        let others = run.keys.filter { $0.lowercased() != "rowid" }
        for index in run.rows {
            let row = rows[index]
            let rowid = row["rowid"] ?? .null
            let values = others.map { row[$0] ?? .null }
            let tail = returning ? " RETURNING rowid, *" : ""
            let collect: (SQLiteStatement) -> Void = { if returning { returned.append(Self.rowObject($0)) } }
            var done: Int64 = 0
            if !others.isEmpty {
                let assignments = others.map { "\(SQLIdentifier.quote($0)) = ?" }.joined(separator: ", ")
                done = try self.runStatement(
                    "UPDATE \(SQLIdentifier.quote(table)) SET \(assignments) WHERE rowid = ?\(tail)",
                    [values + [rowid]],
                    intent: intent,
                    onRow: collect
                )
            } else if try self.rowExists(table, "rowid = ?", [rowid]) {
                done = 1
            }
            if done == 0 {
                let columns = (["rowid"] + others).map(SQLIdentifier.quote).joined(separator: ", ")
                let placeholders = Array(repeating: "?", count: others.count + 1).joined(separator: ", ")
                done = try self.runStatement(
                    "INSERT INTO \(SQLIdentifier.quote(table)) (\(columns)) VALUES (\(placeholders))\(tail)",
                    [[rowid] + values],
                    intent: intent,
                    onRow: collect
                )
            }
            changed += done
        }
        return (changed, returned)
    }

    private func updateRow(
        _ table: String,
        key: [JSONValue],
        update: JSONObject,
        alter: Bool,
        returning: Bool
    ) throws(EvdError) -> (JSONValue, Int64) {
        let shape = try self.shape(of: table)
        let (clause, keyValues) = try self.keyClause(table, shape, key)
        let known = Set(try self.columns(of: table).map(\.name))
        let unknown = update.keys.filter { !known.contains($0) }
        if !unknown.isEmpty {
            guard alter else {
                throw EvdError.badRequest(
                    field: "update.\(unknown[0])",
                    "no such column: \(unknown.joined(separator: ", ")) (alter: true adds it)"
                )
            }
            self.connection.capture.coalescesAlters = true
            defer { self.connection.capture.coalescesAlters = false }
            for name in unknown {
                let type = StructuredOp.inferredType([update[name] ?? .null])
                _ = try self.runStatement("ALTER TABLE \(SQLIdentifier.quote(table)) ADD COLUMN \(SQLIdentifier.quote(name)) \(type)", [[]])
            }
        }
        var assignments: [String] = []
        var values: [JSONValue] = []
        for (name, value) in update {
            assignments.append("\(SQLIdentifier.quote(name)) = ?")
            values.append(try StructuredOp.cell(value, field: "update.\(name)"))
        }
        if assignments.isEmpty {
            // Nothing to change is still an update of the row (Datasette emits update-row for it).
            let first = shape.keyColumns.first.map { SQLIdentifier.quote(shape.columns[$0]) } ?? "rowid"
            assignments.append("\(first) = \(first)")
        }
        let isRowidTable = shape.keyColumns.isEmpty
        let tail = returning ? (isRowidTable ? " RETURNING rowid, *" : " RETURNING *") : ""
        var returned: [JSONValue] = []
        let updated = try self.runStatement(
            "UPDATE \(SQLIdentifier.quote(table)) SET \(assignments.joined(separator: ", ")) WHERE \(clause)\(tail)",
            [values + keyValues]
        ) { statement in
            if returning { returned.append(Self.rowObject(statement)) }
        }
        guard updated > 0 else { throw self.noSuchRow(table, key) }
        var result: JSONObject = ["updated": .int(updated)]
        if returning { result["rows"] = .array(returned) }
        return (.object(result), updated)
    }

    /// `describe`: the columns, each passed through `column_reflect` (a listener's modified
    /// `column` is what the client gets).
    private func describe(_ table: String) throws(EvdError) -> [JSONValue] {
        var described: [JSONValue] = []
        for column in try self.columns(of: table) {
            var object = column.jsonObject
            let verdict = try self.vetoable(.columnReflect) {
                ["database": .string(self.database), "table": .string(table), "column": .object(object)]
            }
            if let modified = verdict?.properties["column"]?.objectValue { object = modified }
            described.append(.object(object))
        }
        return described
    }

    // MARK: Helpers

    /// The table's name as stored; `no_such_table` when there is no such table (a view is not one).
    private func existingTable(_ table: String) throws(EvdError) -> String {
        guard let entry = try self.schemaSnapshot()[table.lowercased()], entry.type == "table" else {
            throw EvdError(.noSuchTable, "Table not found: \(table)", extra: ["table": .string(table)])
        }
        return entry.name
    }

    private func shape(of table: String) throws(EvdError) -> TableShape {
        do {
            guard let shape = try self.connection.schema.shape(of: table, self.sqlite) else {
                throw EvdError(.noSuchTable, "Table not found: \(table)", extra: ["table": .string(table)])
            }
            return shape
        } catch let error as SQLiteError {
            throw error.evdError
        } catch {
            throw error as! EvdError
        }
    }

    /// `"a" = ? AND "b" = ?` for the table's primary key (the rowid when it declares none), checking
    /// that `key` has one value per key column.
    private func keyClause(_ table: String, _ shape: TableShape, _ key: [JSONValue]) throws(EvdError) -> (String, [JSONValue]) {
        let names = shape.keyColumns.isEmpty ? ["rowid"] : shape.keyColumns.map { shape.columns[$0] }
        guard names.count == key.count else {
            throw EvdError.badRequest(
                field: "pks",
                "\(table)'s primary key is (\(names.joined(separator: ", "))): pks needs \(names.count) value(s), got \(key.count)"
            )
        }
        let clause = names.map { $0 == "rowid" ? "rowid = ?" : "\(SQLIdentifier.quote($0)) = ?" }.joined(separator: " AND ")
        return (clause, key)
    }

    private func noSuchRow(_ table: String, _ key: [JSONValue]) -> EvdError {
        let text = String(decoding: JSONValue.array(key).jsonBytes, as: UTF8.self)
        return EvdError(.noSuchRow, "Record not found: \(text) in \(table)", extra: ["table": .string(table), "pks": .array(key)])
    }

    private func rowExists(_ table: String, _ clause: String, _ values: [JSONValue]) throws(EvdError) -> Bool {
        var found = false
        _ = try self.runStatement("SELECT 1 FROM \(SQLIdentifier.quote(table)) WHERE \(clause)", [values]) { _ in found = true }
        return found
    }

    private static func inferColumns(_ rows: JSONRows) -> [(name: String, type: String)] {
        var names: OrderedSet<String> = []
        for run in rows.runs { names.append(contentsOf: run.keys) }
        return names.map { ($0, StructuredOp.inferredType(rows.column($0))) }
    }

    private static func rowObject(_ statement: SQLiteStatement) -> JSONValue {
        var object = JSONObject()
        for (index, name) in statement.columnNames.enumerated() { object[name] = statement.column(index) }
        return .object(object)
    }

    /// Runs a statement evd wrote, once per parameter set, the way a client's statement runs: the
    /// statement and dialect events (vetoable, a listener may rewrite it), DDL events, and its
    /// changes captured for the committed events. Returns the rows it changed.
    @discardableResult
    func runStatement(
        _ sql: String,
        _ sets: [[JSONValue]],
        intent: StatementIntent = .other,
        onRow: (SQLiteStatement) -> Void = { _ in }
    ) throws(EvdError) -> Int64 {
        guard var statement = try self.prepare(SQLText(sql), from: 0) else {
            throw EvdError(.sqlError, "evd wrote an empty statement: \(sql)")
        }
        if sets.count == 1 {
            var cursor = 0
            var bound = try SQLParameters.positional(sets[0]).bind(statement, cursor: &cursor)
            if let verdict = try self.beforeCursorExecute(statement.sql, bound, executemany: false) {
                (statement, bound) = try self.rewrite(statement, bound, by: verdict)
            }
            let run = statement
            return try self.capturing(run, intent: intent) { () throws(EvdError) in
                try self.run(run, parameters: bound, executemany: false) { onRow(run) }
            }
        }
        return try self.runStatement(sql, many: .sets(sets.map(SQLParameters.positional)), intent: intent, onRow: onRow)
    }

    /// `runStatement` for an executemany: the statement once per parameter set.
    func runStatement(
        _ sql: String,
        many sets: ParameterSets,
        intent: StatementIntent,
        onRow: (SQLiteStatement) -> Void = { _ in }
    ) throws(EvdError) -> Int64 {
        guard let statement = try self.prepare(SQLText(sql), from: 0) else {
            throw EvdError(.sqlError, "evd wrote an empty statement: \(sql)")
        }
        return try self.runMany(statement, sets, intent: intent, onRow: onRow)
    }
}
