import EvdClient
import OrderedCollections

/// `evctl stats` for people: the `stats` object (docs/protocol.md) in titled sections of aligned
/// lines. A key this version does not know is still printed, under "Other", as JSON.
public enum StatsFormatter {
    /// The section titles, in the order they print.
    public static let sections = ["Sessions", "Events", "Delivery", "Vetoes", "Pools", "Journal"]

    /// The readable text of a `stats` result (ends with a newline).
    public static func render(_ stats: JSONObject) -> String {
        var known: Set<String> = []
        func take(_ key: String) -> JSONValue? {
            known.insert(key)
            return stats[key]
        }
        var out: [String] = []
        func section(_ title: String, _ lines: [String]) {
            if !out.isEmpty { out.append("") }
            out.append(title)
            out += lines.map { $0.isEmpty ? "" : "  " + $0 }
        }

        let seq = take("seq")
        let requests = take("requests")
        let sessions = take("sessions")
        section(
            "Sessions",
            self.pairs([
                ("connected", self.number(sessions?["current"])),
                ("accepted since start", self.number(sessions?["total"])),
                ("requests answered", self.number(requests)),
                ("subscriptions", self.number(take("subscriptions"))),
            ])
        )

        var events: [(String, String)] = [("head seq", self.number(seq))]
        let published = take("events")?.objectValue ?? [:]
        let total = published.values.reduce(Int64(0)) { $0 + ($1.intValue ?? 0) }
        events.append(("published since start", "\(total)"))
        for (name, count) in published.sorted(by: { $0.key < $1.key }) { events.append(("  " + name, self.number(count))) }
        section("Events", self.pairs(events))

        section(
            "Delivery",
            self.pairs([
                ("copies queued", self.number(take("deliveries"))),
                ("copies dropped", self.number(take("drops"))),
                ("lagged disconnects", self.number(take("lagged_disconnects"))),
            ])
        )

        let vetoes = take("vetoes")
        var vetoLines: [(String, String)] = [
            ("listeners", self.number(take("veto_listeners"))),
            ("pending", self.number(take("vetoes_pending"))),
            ("asked", self.number(vetoes?["asked"])),
            ("allowed", self.number(vetoes?["allowed"])),
            ("denied", self.number(vetoes?["denied"])),
            ("modified", self.number(vetoes?["modified"])),
            ("timed out", self.number(vetoes?["timed_out"])),
            ("invalid replies", self.number(vetoes?["invalid_replies"])),
            ("dry-run denials", self.number(vetoes?["dry_run_denied"])),
        ]
        if let latency = vetoes?["latency_us"]?.objectValue {
            let parts = ["p50", "p90", "p99", "max"].compactMap { key -> String? in
                guard let micros = latency[key]?.intValue else { return nil }
                return "\(key) ≤ \(self.duration(micros: micros))"
            }
            vetoLines.append(("reply latency", parts.isEmpty ? "none yet" : parts.joined(separator: ", ")))
        }
        section("Vetoes", self.pairs(vetoLines))

        let pools = take("pools")?.objectValue ?? [:]
        let columns = ["size", "open", "in_use", "idle", "waiting", "waits", "checkouts"]
        // A database whose file was deleted or replaced under evd is no longer served.
        let poolRows = pools.map { name, pool in
            [pool["lost"]?.boolValue == true ? "\(name) (lost: file deleted or replaced)" : name]
                + columns.map { self.number(pool[$0]) }
        }
        section("Pools", self.table(header: ["database"] + columns.map { $0.replacingUnderscores() }, rows: poolRows))

        let journal = take("journal")
        var journalLines: [String] = []
        if journal?["enabled"]?.boolValue == false {
            journalLines = ["off (--no-journal): nothing is kept for replay"]
        } else if let journal {
            let first = journal["first_seq"]?.intValue
            let last = journal["last_seq"]?.intValue
            journalLines = self.pairs([
                ("events held", self.number(journal["events"])),
                ("on disk", self.bytes(journal["bytes"]?.intValue)),
                ("seqs held", first.flatMap { first in last.map { "\(first) … \($0)" } } ?? "none"),
                ("retention floor", self.number(journal["floor"])),
            ])
            let sources = journal["sources"]?.arrayValue ?? []
            if !sources.isEmpty {
                journalLines.append("")
                journalLines += self.table(
                    header: ["source", "events", "bytes", "seqs", "path"],
                    rows: sources.map { source in
                        let seqs = source["first_seq"]?.intValue.flatMap { first in
                            source["last_seq"]?.intValue.map { "\(first) … \($0)" }
                        }
                        return [
                            source["database"]?.stringValue ?? "(evd's own)", self.number(source["events"]),
                            self.bytes(source["bytes"]?.intValue), seqs ?? "-", source["path"]?.stringValue ?? "",
                        ]
                    }
                )
            }
        }
        section("Journal", journalLines)

        let others = stats.filter { !known.contains($0.key) }
        if !others.isEmpty {
            section("Other", others.map { "\($0.key): " + String(decoding: $0.value.jsonBytes, as: UTF8.self) })
        }
        return out.joined(separator: "\n") + "\n"
    }

    /// `label   value` lines, the values aligned after the longest label.
    static func pairs(_ items: [(String, String)]) -> [String] {
        let width = items.map(\.0.count).max() ?? 0
        return items.map { $0.0.padding(to: width) + "  " + $0.1 }
    }

    /// A header and rows: the first column left-aligned, the others right-aligned, except a last
    /// column named `path`, left-aligned.
    static func table(header: [String], rows: [[String]]) -> [String] {
        guard !rows.isEmpty else { return ["(none)"] }
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
        return all.map { row in
            row.indices.map { column -> String in
                let leftAligned = column == 0 || header[column] == "path"
                let cell = row[column]
                if leftAligned { return column == row.count - 1 ? cell : cell.padding(to: widths[column]) }
                return String(repeating: " ", count: widths[column] - cell.count) + cell
            }.joined(separator: "  ")
        }
    }

    private static func number(_ value: JSONValue?) -> String {
        guard let value, !value.isNull else { return "-" }
        if let int = value.intValue { return "\(int)" }
        return String(decoding: value.jsonBytes, as: UTF8.self)
    }

    /// `512 µs`, `2 ms`, `1.5 s`.
    public static func duration(micros: Int64) -> String {
        if micros < 1000 { return "\(micros) µs" }
        if micros < 1_000_000 { return self.decimal(Double(micros) / 1000) + " ms" }
        return self.decimal(Double(micros) / 1_000_000) + " s"
    }

    /// `512 B`, `1.5 KiB`, `3.2 MiB`.
    public static func bytes(_ count: Int64?) -> String {
        guard let count else { return "-" }
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(count)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(count) B" : self.decimal(value) + " " + units[unit]
    }

    /// One decimal, none when it is zero: `1.5`, `2`.
    private static func decimal(_ value: Double) -> String {
        let tenths = Int64((value * 10).rounded())
        return tenths % 10 == 0 ? "\(tenths / 10)" : "\(tenths / 10).\(tenths % 10)"
    }
}

extension String {
    fileprivate func padding(to width: Int) -> String {
        self.count >= width ? self : self + String(repeating: " ", count: width - self.count)
    }

    fileprivate func replacingUnderscores() -> String {
        String(self.map { $0 == "_" ? " " : $0 })
    }
}
