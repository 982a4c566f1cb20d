import CSQLite
import EvdClient
import OrderedCollections

extension SQLText {
    /// Whether the text is one INSERT, UPDATE, DELETE or REPLACE statement (what a commit group
    /// takes, `ConnectionPool.groups`). A script, or a statement that starts otherwise (a `WITH`,
    /// a `SELECT`, a `PRAGMA`), is not.
    var isOneWrite: Bool {
        guard let range = self.nextStatement(from: 0), self.nextStatement(from: range.upperBound) == nil else { return false }
        guard let verb = SQLScanner.topLevelWords(self.utf8[range], limit: 1).first else { return false }
        return ["INSERT", "UPDATE", "DELETE", "REPLACE"].contains(verb)
    }

    /// The statement at `range` (from `nextStatement`) as text of its own: `self` when it is all of it.
    func statement(_ range: Range<Int>) -> SQLText {
        range == 0..<(self.utf8.count - 1) ? self : SQLText(String(decoding: self.utf8[range], as: UTF8.self))
    }

    /// The bytes of the next statement of a script from `offset`: from its first byte that is not
    /// whitespace (or the `;` of an empty statement) to its `;`, or to the end of the text; `nil`
    /// when nothing but whitespace, comments and `;` remains. Found before anything is prepared, so
    /// that `before_cursor_execute` can show a statement SQLite cannot prepare: a `;` ends the
    /// statement when `sqlite3_complete` says the text up to it is complete (a `;` in a string, a
    /// quoted name, a comment or a trigger's body does not). What runs is prepared from exactly
    /// these bytes, and must be exactly one statement (`SQLRun.prepareStatement`).
    ///
    /// `sqlite3_complete` is asked only at a statement's first `;` (which ends any statement but a
    /// trigger) and at a `;` after `; END` (the only `;` that ends a trigger), not at every `;` of a
    /// trigger's body: asking it at each, about all the text so far, took time quadratic in the
    /// body's length.
    func nextStatement(from offset: Int) -> Range<Int>? {
        enum Token { case semicolon, end, other }
        let bytes = self.utf8
        let end = bytes.count - 1
        func isSpace(_ b: UInt8) -> Bool { b == 32 || (9...13).contains(b) }
        func isWordByte(_ b: UInt8) -> Bool {
            (b >= 65 && b <= 90) || (b >= 97 && b <= 122) || (b >= 48 && b <= 57) || b == 95 || b == 36 || b >= 128
        }
        var i = offset
        var start = offset
        var last: Token?
        var beforeLast: Token?
        var semicolons = 0
        func note(_ token: Token) {
            beforeLast = last
            last = token
        }
        func skipEmpty() {
            while i < end && (isSpace(bytes[i]) || bytes[i] == UInt8(ascii: ";")) { i += 1 }
            start = i
            (last, beforeLast, semicolons) = (nil, nil, 0)
        }
        skipEmpty()
        while i < end {
            let b = bytes[i]
            switch b {
            case UInt8(ascii: "-") where i + 1 < end && bytes[i + 1] == UInt8(ascii: "-"):
                while i < end && bytes[i] != 10 { i += 1 }
            case UInt8(ascii: "/") where i + 1 < end && bytes[i + 1] == UInt8(ascii: "*"):
                i += 2
                while i + 1 < end && !(bytes[i] == UInt8(ascii: "*") && bytes[i + 1] == UInt8(ascii: "/")) { i += 1 }
                i = min(i + 2, end)
            case UInt8(ascii: "'"), UInt8(ascii: "\""), UInt8(ascii: "`"), UInt8(ascii: "["):
                let close = b == UInt8(ascii: "[") ? UInt8(ascii: "]") : b
                note(.other)
                i += 1
                while i < end {
                    if bytes[i] == close {
                        if close != UInt8(ascii: "]") && i + 1 < end && bytes[i + 1] == close {
                            i += 2
                            continue
                        }
                        break
                    }
                    i += 1
                }
                i = min(i + 1, end)
            case UInt8(ascii: ";"):
                i += 1
                guard last != nil else {
                    skipEmpty()  // an empty statement (comments and a `;`)
                    continue
                }
                semicolons += 1
                let mayEnd = semicolons == 1 || (last == .end && beforeLast == .semicolon)
                note(.semicolon)
                guard mayEnd else { continue }
                var prefix = Array(bytes[start..<i])
                prefix.append(0)
                let complete = prefix.withUnsafeBufferPointer { buffer in
                    buffer.withMemoryRebound(to: CChar.self) { sqlite3_complete($0.baseAddress!) != 0 }
                }
                if complete { return start..<i }
            default:
                if isWordByte(b) {
                    let wordStart = i
                    while i < end && isWordByte(bytes[i]) { i += 1 }
                    let isEnd =
                        i - wordStart == 3 && (bytes[wordStart] | 0x20) == UInt8(ascii: "e")
                        && (bytes[wordStart + 1] | 0x20) == UInt8(ascii: "n") && (bytes[wordStart + 2] | 0x20) == UInt8(ascii: "d")
                    note(isEnd ? .end : .other)
                } else {
                    if !isSpace(b) { note(.other) }
                    i += 1
                }
            }
        }
        return last != nil ? start..<end : nil
    }
}
