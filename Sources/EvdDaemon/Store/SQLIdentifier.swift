/// Quoting for names and literals evd puts in SQL it writes itself.
enum SQLIdentifier {
    /// `"name"`, with embedded quotes doubled.
    static func quote(_ name: String) -> String {
        "\"" + name.split(separator: "\"", omittingEmptySubsequences: false).joined(separator: "\"\"") + "\""
    }

    /// `'text'`, with embedded quotes doubled.
    static func literal(_ text: String) -> String {
        "'" + text.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "''") + "'"
    }
}
