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
