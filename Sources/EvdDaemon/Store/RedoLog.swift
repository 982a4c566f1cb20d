import EvdClient

extension ChangeCapture {
    // MARK: The redo log of a prepared transaction

    /// Every row change recorded, in the order SQLite made them (triggers' and cascades' too), with
    /// whole rows, and the columns of each table changed: what re-applying the transaction after a
    /// crash takes (`TwoPhase`). `nil` when the transaction also changed the schema, which a redo
    /// log of rows cannot carry. Needs `images` on from the transaction's start.
    func redoLog() -> (changes: [RedoChange], columns: [String: [String]])? {
        var changes: [RedoChange] = []
        var columns: [String: [String]] = [:]
        for entry in self.entries {
            guard case .row(let change) = entry else { return nil }
            let table = self.tables[Int(change.table)]
            if columns[table] == nil { columns[table] = self.shape(change.table)?.columns ?? [] }
            changes.append(
                RedoChange(
                    table: table,
                    operation: change.operation,
                    rowid: change.rowid,
                    newRowid: change.newRowid,
                    before: change.before ?? self.values(of: change.beforeImage),
                    after: change.after ?? self.values(of: change.afterImage)
                )
            )
        }
        return (changes, columns)
    }

    /// A row image the hook wrote, read back as its values in column order (exact: integers and
    /// reals stay apart, and blobs are `{"$base64": ...}`).
    private func values(of image: Range<Int>?) -> [JSONValue]? {
        guard let image else { return nil }
        return RowImage.values(ofRow: self.imageBytes(image))
    }
}
