/// Reads just enough of a SQL statement's text to tell what kind of write it is: the words outside
/// strings, quoted names, comments and parentheses.
///
/// SQLite's authorizer says which tables a statement writes but not how it resolves conflicts,
/// and that decides which committed event raw SQL yields (docs/events.md):
/// `INSERT OR IGNORE` and `ON CONFLICT DO NOTHING` → `insert-rows` with `ignore`;
/// `INSERT OR REPLACE` and `REPLACE` → `insert-rows` with `replace`;
/// `ON CONFLICT ... DO UPDATE` (an upsert) → `upsert-rows`.
enum SQLScanner {
    /// The top-level words of `sql`, upper-cased, in order (at most `limit`).
    static func topLevelWords(_ sql: String, limit: Int = 4096) -> [String] {
        let bytes = Array(sql.utf8)
        var words: [String] = []
        var depth = 0
        var i = 0
        func isWordByte(_ b: UInt8) -> Bool {
            (b >= 65 && b <= 90) || (b >= 97 && b <= 122) || (b >= 48 && b <= 57) || b == 95 || b >= 128
        }
        while i < bytes.count && words.count < limit {
            let b = bytes[i]
            switch b {
            case UInt8(ascii: "-") where i + 1 < bytes.count && bytes[i + 1] == UInt8(ascii: "-"):
                while i < bytes.count && bytes[i] != 10 { i += 1 }
            case UInt8(ascii: "/") where i + 1 < bytes.count && bytes[i + 1] == UInt8(ascii: "*"):
                i += 2
                while i + 1 < bytes.count && !(bytes[i] == UInt8(ascii: "*") && bytes[i + 1] == UInt8(ascii: "/")) { i += 1 }
                i += 2
            case UInt8(ascii: "'"), UInt8(ascii: "\""), UInt8(ascii: "`"):
                // A quoted string or name; a doubled quote inside it is part of it.
                i += 1
                while i < bytes.count {
                    if bytes[i] == b {
                        if i + 1 < bytes.count && bytes[i + 1] == b { i += 2; continue }
                        break
                    }
                    i += 1
                }
                i += 1
                if depth == 0 { words.append("") }  // a name: a word that is no keyword
            case UInt8(ascii: "["):
                while i < bytes.count && bytes[i] != UInt8(ascii: "]") { i += 1 }
                i += 1
                if depth == 0 { words.append("") }
            case UInt8(ascii: "("):
                depth += 1
                i += 1
            case UInt8(ascii: ")"):
                depth = max(0, depth - 1)
                i += 1
            default:
                if isWordByte(b) {
                    let start = i
                    while i < bytes.count && isWordByte(bytes[i]) { i += 1 }
                    if depth == 0 { words.append(String(decoding: bytes[start..<i], as: UTF8.self).uppercased()) }
                } else {
                    i += 1
                }
            }
        }
        return words
    }

    /// What kind of write a raw statement is, for the committed events of its direct inserts.
    static func intent(of sql: String) -> StatementIntent {
        let words = self.topLevelWords(sql)
        guard let verbIndex = words.firstIndex(where: { ["INSERT", "REPLACE", "UPDATE", "DELETE", "SELECT", "VALUES"].contains($0) })
        else { return .other }
        var intent = StatementIntent()
        switch words[verbIndex] {
        case "REPLACE":
            intent.kind = .insert
            intent.replace = true
        case "INSERT":
            intent.kind = .insert
            if verbIndex + 2 < words.count && words[verbIndex + 1] == "OR" {
                switch words[verbIndex + 2] {
                case "IGNORE": intent.ignore = true
                case "REPLACE": intent.replace = true
                default: break
                }
            }
            // ON CONFLICT [(target)] [WHERE ...] DO NOTHING | DO UPDATE SET ...
            var index = verbIndex + 1
            while index + 1 < words.count {
                if words[index] == "ON" && words[index + 1] == "CONFLICT",
                    let doIndex = words[(index + 2)...].firstIndex(of: "DO"), doIndex + 1 < words.count
                {
                    if words[doIndex + 1] == "UPDATE" {
                        intent.kind = .upsert
                        intent.ignore = false
                    } else if words[doIndex + 1] == "NOTHING" && intent.kind != .upsert {
                        intent.ignore = true
                    }
                    index = doIndex + 1
                }
                index += 1
            }
        default:
            return .other
        }
        return intent
    }
}
