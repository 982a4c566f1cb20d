import EvdClient

/// The actions (Datasette's) a request needs before it runs, on its database (and table).
extension StructuredOp {
    var actions: [Action] {
        switch self {
        case .createTable(_, _, let rows, _, _, let replace, _):
            return [.createTable] + (rows != nil ? [.insertRow] : []) + (replace ? [.updateRow] : [])
        case .insert(_, _, _, let replace, let alter, _):
            return [.insertRow] + (replace ? [.updateRow] : []) + (alter ? [.alterTable] : [])
        case .upsert(_, _, let alter, _): return [.insertRow, .updateRow] + (alter ? [.alterTable] : [])
        case .update(_, _, _, let alter, _): return [.updateRow] + (alter ? [.alterTable] : [])
        case .delete: return [.deleteRow]
        case .dropTable: return [.dropTable]
        case .describe: return [.viewTable]
        }
    }
}
