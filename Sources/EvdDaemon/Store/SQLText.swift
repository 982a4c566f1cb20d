import CSQLite
import EvdClient
import OrderedCollections

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// SQL text kept as NUL-terminated UTF-8, so statements can be prepared one after another by offset.
public struct SQLText: Sendable {
    public let text: String
    /// The UTF-8 bytes followed by a NUL.
    let utf8: [UInt8]

    public init(_ text: String) {
        self.text = text
        self.utf8 = Array(text.utf8) + [0]
    }

    /// Whether only whitespace remains from `offset`.
    public func isBlank(from offset: Int) -> Bool {
        self.utf8[offset..<(self.utf8.count - 1)].allSatisfy { $0 == 32 || ($0 >= 9 && $0 <= 13) }
    }
}
