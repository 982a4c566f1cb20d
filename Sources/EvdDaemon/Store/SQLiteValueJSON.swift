import CSQLite
import EvdClient

extension JSONValue {
    /// Writes a SQLite value as JSON, as `JSONValue(sqliteValue:)` then `write(into:)` would,
    /// without making the value (text is copied once, into `bytes`). `textIsUTF8`: the value's
    /// database keeps text in UTF-8, so its bytes are read as they are (as a blob, which needs no
    /// terminating NUL and so no copy); the value reads as a blob afterwards.
    static func write(sqliteValue value: OpaquePointer, textIsUTF8: Bool, into bytes: inout [UInt8]) {
        switch sqlite3_value_type(value) {
        case SQLITE_INTEGER:
            JSONWriter.appendInt(sqlite3_value_int64(value), to: &bytes)
        case SQLITE_FLOAT:
            JSONWriter.appendDouble(sqlite3_value_double(value), to: &bytes)
        case SQLITE_TEXT:
            let start = textIsUTF8 ? sqlite3_value_blob(value)?.assumingMemoryBound(to: UInt8.self) : sqlite3_value_text(value)
            guard let start else {
                JSONWriter.appendASCII(#""""#, to: &bytes)
                return
            }
            let utf8 = UnsafeBufferPointer(start: start, count: Int(sqlite3_value_bytes(value)))
            JSONWriter.appendText(utf8, to: &bytes)  // not UTF-8: {"$text_base64": ...}, as the value would
        case SQLITE_NULL:
            JSONWriter.appendASCII("null", to: &bytes)
        default:
            JSONValue(sqliteValue: value).write(into: &bytes)
        }
    }

    /// A SQLite value as JSON: INTEGER, REAL, TEXT, NULL, and BLOB as `{"$base64": ...}`.
    init(sqliteValue value: OpaquePointer) {
        switch sqlite3_value_type(value) {
        case SQLITE_INTEGER:
            self = .int(sqlite3_value_int64(value))
        case SQLITE_FLOAT:
            self = .double(sqlite3_value_double(value))
        case SQLITE_TEXT:
            let count = Int(sqlite3_value_bytes(value))
            guard let text = sqlite3_value_text(value) else {
                self = .string("")
                return
            }
            self = JSONValue(text: UnsafeBufferPointer(start: text, count: count))
        case SQLITE_BLOB:
            let count = Int(sqlite3_value_bytes(value))
            guard let blob = sqlite3_value_blob(value) else {
                self = ["$base64": ""]
                return
            }
            self = ["$base64": .string(Base64.encode(UnsafeRawBufferPointer(start: blob, count: count)))]
        default:
            self = .null
        }
    }
}
