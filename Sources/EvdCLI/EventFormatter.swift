import EvdClient
import OrderedCollections

/// One readable line per message, for `evtail` on a terminal:
/// `10:00:00.123456 #1235 insert-rows schema_version=3 database=main table=dogs num_rows=2  (uid:1000 s17 tx1234)`;
/// a transaction's last event says `tx1234 end`.
public enum EventFormatter {
    static let envelope: Set<String> = [
        "type", "seq", "epoch", "event", "time", "subscription", "session", "actor", "tx", "tx_last", "tx_end",
    ]

    public static func line(_ message: JSONObject) -> String {
        switch message["type"]?.stringValue {
        case "event", "veto":
            let time =
                message["time"]?.stringValue.map { text -> String in
                    guard let t = text.firstIndex(of: "T") else { return text }
                    return String(text[text.index(after: t)...].dropLast())
                } ?? "-"
            var parts = [time, "#\(message["seq"]?.intValue.map(String.init) ?? "?")", message["event"]?.stringValue ?? "?"]
            if message["type"] == "veto" { parts.append("VETO?") }
            for (key, value) in message where !envelope.contains(key) {
                parts.append("\(key)=\(Self.compact(value))")
            }
            var who: [String] = []
            if let actor = message["actor"]?["id"]?.stringValue { who.append(actor) }
            if let session = message["session"]?.intValue { who.append("s\(session)") }
            if let tx = message["tx"]?.intValue { who.append(message["tx_end"] == true ? "tx\(tx) end" : "tx\(tx)") }
            if !who.isEmpty { parts.append(" (\(who.joined(separator: " ")))") }
            return parts.joined(separator: " ")
        case "notice":
            var parts = ["--", "notice", message["code"]?.stringValue ?? "?"]
            for (key, value) in message where key != "type" && key != "code" {
                parts.append("\(key)=\(Self.compact(value))")
            }
            return parts.joined(separator: " ")
        default:
            return String(decoding: JSONValue.object(message).jsonBytes, as: UTF8.self)
        }
    }

    /// A value as it reads best: strings bare when they have no spaces, everything else as JSON.
    static func compact(_ value: JSONValue) -> String {
        if case .string(let s) = value, !s.isEmpty, !s.contains(where: { $0 == " " || $0 == "\"" || $0 == "\n" }) {
            return s
        }
        let text = String(decoding: value.jsonBytes, as: UTF8.self)
        return text.count > 200 ? String(text.prefix(197)) + "..." : text
    }
}
