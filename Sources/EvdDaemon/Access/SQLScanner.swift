/// Reads just enough of a SQL statement's text to tell what kind of write it is: the words outside
/// strings, quoted names, comments and parentheses.
///
/// SQLite's authorizer says which tables a statement writes but not how it resolves conflicts,
/// and that decides which committed event raw SQL yields (docs/events.md):
/// `INSERT OR IGNORE` and `ON CONFLICT DO NOTHING` → `insert-rows` with `ignore`;
/// `INSERT OR REPLACE` and `REPLACE` → `insert-rows` with `replace`;
/// `ON CONFLICT ... DO UPDATE` (an upsert) → `upsert-rows`.
enum SQLScanner {
    /// The top-level words of `sql`, upper-cased, in order (at most `limit`); a quoted name is an
    /// empty word (a word that is no keyword).
    static func topLevelWords(_ sql: String, limit: Int = 4096) -> [String] {
        self.topLevelWords(sql.utf8, limit: limit)
    }

    /// `topLevelWords` of a statement's bytes.
    static func topLevelWords(_ bytes: some Collection<UInt8>, limit: Int = 4096) -> [String] {
        self.tokens(bytes, limit: limit, topLevelOnly: true).compactMap { token in
            switch token {
            case .word(let word): word.uppercased()
            case .name: ""
            case .punctuation: nil
            }
        }
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

/// What the authorizer cannot tell from its action codes about a client's statement, read from the
/// statement's text and its database's schema before it is prepared (for actors that do not hold
/// everything: see `SQLPolicy`).
struct StatementFacts: Sendable, Equatable {
    /// The statement resolves conflicts by replacing rows (`REPLACE INTO`, `INSERT OR REPLACE`,
    /// `UPDATE OR REPLACE`): its inserts and updates may delete rows.
    var replaces = false
    /// The new name `ALTER TABLE ... RENAME TO` gives its table.
    var renamedTo: String?
    /// The tables (lower-cased) with an `ON CONFLICT REPLACE` constraint: a plain INSERT or UPDATE
    /// of them may delete rows too.
    var replacingTables: Set<String> = []
}

extension SQLScanner {
    /// One token of SQL text: a keyword or bare name (as written), a quoted name (as written
    /// inside its quotes), or a punctuation byte. Comments and whitespace are skipped; a
    /// single-quoted string yields `.name` (SQLite takes it for a name where one is due).
    enum Token: Equatable {
        case word(String)
        case name(String)
        case punctuation(UInt8)

        /// Whether this is the bare word `keyword` (upper-case), in any case.
        func `is`(_ keyword: String) -> Bool {
            if case .word(let word) = self { return word.uppercased() == keyword }
            return false
        }

        /// The name this token stands for, if it can stand for one.
        var name: String? {
            switch self {
            case .word(let word), .name(let word): return word
            case .punctuation: return nil
            }
        }
    }

    /// The tokens of `bytes`, stopping after `limit` tokens or at a top-level `;` if `oneStatement`;
    /// only those outside parentheses if `topLevelOnly` (and then no punctuation).
    static func tokens(
        _ bytes: some Collection<UInt8>,
        limit: Int = 4096,
        oneStatement: Bool = false,
        topLevelOnly: Bool = false
    ) -> [Token] {
        let bytes = Array(bytes)
        var tokens: [Token] = []
        var depth = 0
        var i = 0
        func isWordByte(_ b: UInt8) -> Bool {
            (b >= 65 && b <= 90) || (b >= 97 && b <= 122) || (b >= 48 && b <= 57) || b == 95 || b == 36 || b >= 128
        }
        while i < bytes.count && tokens.count < limit {
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
                let kept = !topLevelOnly || depth == 0
                var text: [UInt8] = []
                i += 1
                while i < bytes.count {
                    if bytes[i] == b {
                        if i + 1 < bytes.count && bytes[i + 1] == b {
                            if kept { text.append(b) }
                            i += 2
                            continue
                        }
                        break
                    }
                    if kept { text.append(bytes[i]) }
                    i += 1
                }
                i += 1
                if kept { tokens.append(.name(String(decoding: text, as: UTF8.self))) }
            case UInt8(ascii: "["):
                let start = i + 1
                while i < bytes.count && bytes[i] != UInt8(ascii: "]") { i += 1 }
                if !topLevelOnly || depth == 0 {
                    tokens.append(.name(String(decoding: bytes[start..<min(i, bytes.count)], as: UTF8.self)))
                }
                i += 1
            default:
                if isWordByte(b) {
                    let start = i
                    while i < bytes.count && isWordByte(bytes[i]) { i += 1 }
                    if !topLevelOnly || depth == 0 { tokens.append(.word(String(decoding: bytes[start..<i], as: UTF8.self))) }
                } else {
                    if b == UInt8(ascii: "(") { depth += 1 }
                    if b == UInt8(ascii: ")") { depth = max(0, depth - 1) }
                    if b == UInt8(ascii: ";") && depth == 0 && oneStatement { return tokens }
                    if b > 32 && !topLevelOnly { tokens.append(.punctuation(b)) }
                    i += 1
                }
            }
        }
        return tokens
    }

    /// The facts of the statement that starts `bytes` (`replaces`, `renamedTo`; the schema's
    /// `replacingTables` are the caller's to add).
    static func facts(of bytes: some Collection<UInt8>) -> StatementFacts {
        let tokens = self.tokens(bytes, oneStatement: true)
        var facts = StatementFacts()
        var depth = 0
        for (index, token) in tokens.enumerated() {
            switch token {
            case .punctuation(UInt8(ascii: "(")): depth += 1
            case .punctuation(UInt8(ascii: ")")): depth = max(0, depth - 1)
            case let word where depth == 0 && word.is("REPLACE"):
                // `REPLACE INTO`, `INSERT OR REPLACE`, `UPDATE OR REPLACE` (not the function replace()).
                if index + 1 < tokens.count && tokens[index + 1].is("INTO") { facts.replaces = true }
                if index >= 2, tokens[index - 1].is("OR"), tokens[index - 2].is("INSERT") || tokens[index - 2].is("UPDATE") {
                    facts.replaces = true
                }
            default: break
            }
        }
        // ALTER TABLE [schema.]table RENAME TO new (not RENAME [COLUMN] a TO b).
        if tokens.count >= 5, tokens[0].is("ALTER"), tokens[1].is("TABLE"),
            let rename = tokens.firstIndex(where: { $0.is("RENAME") }), rename + 2 < tokens.count, tokens[rename + 1].is("TO")
        {
            facts.renamedTo = tokens[rename + 2].name
        }
        return facts
    }

    /// Whether a `CREATE TABLE` statement declares a constraint that resolves conflicts by
    /// replacing (`... ON CONFLICT REPLACE`, anywhere in its column or table constraints).
    static func declaresReplace(_ createSQL: String) -> Bool {
        let tokens = self.tokens(createSQL.utf8)
        guard tokens.count >= 3 else { return false }
        for index in 0..<(tokens.count - 2)
        where tokens[index].is("ON") && tokens[index + 1].is("CONFLICT") && tokens[index + 2].is("REPLACE") {
            return true
        }
        return false
    }
}

/// What one statement means for the committed events its rows produce (PROTOCOL.md §6.5).
///
/// Raw SQL gets its intent from the statement's text (`SQLIntent.of`); the structured ops set
/// theirs. Inserts made directly by the statement (not by its triggers) are reported together as
/// one `insert-rows` — or `upsert-rows` for an upsert — per table.
struct StatementIntent: Sendable, Equatable {
    enum Kind: Sendable, Equatable { case insert, upsert, other }
    var kind: Kind = .other
    var ignore = false
    var replace = false
    /// The row count to report instead of the rows SQLite changed: Datasette's `num_rows` is the
    /// number of rows the request gave (ignored ones included).
    var reportedRows: Int?
    /// The table that `reportedRows` and an event with no changed rows are about.
    var table: String?
    /// Statements with the same group report their inserts together (one structured op that
    /// runs several statements); `nil`: the statement alone.
    var group: Int32?

    static let other = StatementIntent()
}
