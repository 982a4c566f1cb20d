/// Shell-style patterns for event names: `*` matches any run of characters, `?` exactly one.
public struct EventPattern: Sendable, Hashable {
    public let text: String
    private let bytes: [UInt8]
    /// Whether the pattern has a wildcard (else it names one event).
    public let isGlob: Bool

    public init(_ text: String) {
        self.text = text
        self.bytes = Array(text.utf8)
        self.isGlob = text.contains("*") || text.contains("?")
    }

    /// Whether `name` matches.
    public func matches(_ name: String) -> Bool {
        if !self.isGlob { return name == self.text }
        return Self.match(self.bytes[...], Array(name.utf8)[...])
    }

    /// Iterative wildcard matching with one backtrack point (linear for patterns like `a*b*c`).
    private static func match(_ pattern: ArraySlice<UInt8>, _ name: ArraySlice<UInt8>) -> Bool {
        var p = pattern.startIndex
        var n = name.startIndex
        var star: Int? = nil
        var starMatch = n
        while n < name.endIndex {
            if p < pattern.endIndex && (pattern[p] == UInt8(ascii: "?") || pattern[p] == name[n]) {
                p += 1
                n += 1
            } else if p < pattern.endIndex && pattern[p] == UInt8(ascii: "*") {
                star = p
                starMatch = n
                p += 1
            } else if let s = star {
                p = s + 1
                starMatch += 1
                n = starMatch
            } else {
                return false
            }
        }
        while p < pattern.endIndex && pattern[p] == UInt8(ascii: "*") { p += 1 }
        return p == pattern.endIndex
    }
}

/// Whether `name` is a custom event's name: it has a namespace (`myapp.deployed`, `myapp/deployed`).
public func isNamespacedEventName(_ name: String) -> Bool {
    name.utf8.contains { $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "/") }
}

/// The catalog name closest to `name` (for `unknown_event`'s suggestion), if any is close.
public func closestEventName(to name: String) -> String? {
    var best: (String, Int)? = nil
    for kind in EventKind.allCases {
        let distance = editDistance(name, kind.name)
        if distance <= max(2, name.count / 3), best == nil || distance < best!.1 { best = (kind.name, distance) }
    }
    return best?.0
}

private func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a.utf8)
    let b = Array(b.utf8)
    var previous = Array(0...b.count)
    for i in 1...max(a.count, 1) where !a.isEmpty {
        var current = [i] + Array(repeating: 0, count: b.count)
        for j in stride(from: 1, through: b.count, by: 1) {
            let cost = a[i - 1] == b[j - 1] ? 0 : 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
        }
        previous = current
    }
    return a.isEmpty ? b.count : previous[b.count]
}
