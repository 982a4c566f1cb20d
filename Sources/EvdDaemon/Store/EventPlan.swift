import EvdClient
import OrderedCollections

/// A committed event as properties and JSON images: what a prepared transaction's log keeps
/// (`TwoPhase`), and how its events are published after a restart.
struct CommittedEvent: Sendable {
    let kind: EventKind
    var properties: JSONObject
    /// The row images as members that follow the properties, written out: `,"rows":[…]` or
    /// `,"before":{…},"after":{…}`.
    var images: [UInt8]?
}

/// A transaction's committed events, in order.
///
/// Those the capture recorded are not made all at once: a transaction of a million rows would
/// have a million events alive together. Instead this is a compact plan (a slot per event, the
/// grouped inserts made whole) over what the capture keeps anyway, and the events are made as
/// they are asked for, a chunk at a time, as runs (`publications(_:origin:wanted:)`): to journal
/// them before COMMIT, and again to publish them after it. So a big transaction's memory stays
/// about what its capture needs (see `PooledConnection.commit`). Valid until the capture is
/// discarded.
struct CommittedEvents {
    /// The capture the plan reads, or nil for events made already.
    private let capture: ChangeCapture?
    private let plan: CommittedEventPlan
    private let listed: [CommittedEvent]

    /// Events made already (a prepared transaction's, from its log).
    init(_ events: [CommittedEvent]) {
        self.capture = nil
        self.plan = CommittedEventPlan(database: "", images: false)
        self.listed = events
    }

    fileprivate init(capture: ChangeCapture, plan: CommittedEventPlan) {
        self.capture = capture
        self.plan = plan
        self.listed = []
    }

    var count: Int { self.capture == nil ? self.listed.count : self.plan.slots.count }

    var isEmpty: Bool { self.count == 0 }

    /// The catalog event of event `index`, without making the event.
    func kind(at index: Int) -> EventKind {
        guard let capture = self.capture else { return self.listed[index].kind }
        return capture.kind(of: self.plan.slots[index], in: self.plan)
    }

    /// The events of `range`, made for `origin`: runs of events that share their name and the
    /// start of their body (`EventRun`). Events of catalog events not in `wanted` are left
    /// unmade (`Publication.unwanted`): nobody would receive them. `stamp`: the transaction's
    /// members the events carry (the last of all `count` events ends it).
    func publications(
        _ range: Range<Int>,
        origin: EventOrigin,
        wanted: UInt64 = .max,
        stamp: TxStamp? = nil
    ) -> [Publication] {
        guard let capture = self.capture else {
            return zip(range, self.listed[range]).map { index, event in
                wanted & (1 << UInt64(event.kind.rawValue)) != 0
                    ? .entry(event.entry(origin: origin, stamp: stamp, end: index == self.listed.count - 1))
                    : .unwanted(event.kind, count: 1)
            }
        }
        return capture.publications(self.plan, range, origin: origin, wanted: wanted, stamp: stamp)
    }

    /// Every event as properties and JSON images (a prepared transaction's log keeps them).
    var all: [CommittedEvent] {
        guard self.capture != nil else { return self.listed }
        var events: [CommittedEvent] = []
        for publication in self.publications(0..<self.count, origin: .daemon) {
            guard case .run(let run) = publication else { continue }
            for index in 0..<run.count {
                var properties = run.properties(at: index)
                properties.removeValue(forKey: "session")
                properties.removeValue(forKey: "actor")
                var images: [UInt8]?
                if !run.imageRange(index).isEmpty {
                    var rendered: [UInt8] = []
                    run.images.withUnsafeBytes { bytes in
                        _ = RowImage.render(
                            event: UnsafeRawBufferPointer(rebasing: bytes[run.imageRange(index)]),
                            kind: run.kind,
                            columns: run.columns,
                            into: &rendered
                        )
                    }
                    images = rendered
                }
                events.append(CommittedEvent(kind: run.kind, properties: properties, images: images))
            }
        }
        return events
    }
}

/// How a transaction's committed events are made from its capture (`ChangeCapture.committedEvents`).
struct CommittedEventPlan {
    /// A grouped `insert-rows` / `upsert-rows` (or one a structured insert reports without rows),
    /// made whole: its images are those of all its rows.
    struct Group {
        let kind: EventKind
        var properties: JSONObject
        /// The positions in the capture of its rows, when images are recorded.
        var rows: [Int]
        var count: Int
    }

    let database: String
    /// Whether the events carry row images.
    let images: Bool
    /// Per event, in order: the position of its entry in the capture (a schema change, an updated
    /// or deleted row), or `~index` of its group.
    var slots: [Int] = []
    var groups: [Group] = []
    /// The shapes of the tables changed, read once: the events are made twice, alike.
    var shapes: [Int32: TableShape?] = [:]
}

extension ChangeCapture {
    // MARK: Committed events

    /// The committed events of everything recorded, in order. Call just before COMMIT (the
    /// events are journaled inside the transaction), and `discardAll` once they are published:
    /// they are made from what the capture keeps, as they are asked for.
    ///
    /// Inserts a statement made directly are one `insert-rows` (or `upsert-rows`) per table, at the
    /// place of the first; updates and deletes are one event per row. A row a `REPLACE` removed to
    /// put the new row with the same key in its place is part of the insert, not a `delete-row`.
    func committedEvents(database: String) -> CommittedEvents {
        guard !self.entries.isEmpty || !self.intents.isEmpty else { return CommittedEvents([]) }
        let replacedKeys = self.replacedKeys()
        var plan = CommittedEventPlan(database: database, images: self.images)
        var groupKeys: [GroupKey] = []
        var groupIndex: [GroupKey: Int] = [:]
        var reportedUnits: Set<Int32> = []
        // Rows come in long runs of one statement and table: what the last row needed is kept.
        var lastGroup: (key: GroupKey, index: Int)?
        var lastUnit: (unit: Int32, intent: StatementIntent)?
        var lastShape: Int32?
        for (position, entry) in self.entries.enumerated() {
            guard case .row(let change) = entry else {
                plan.slots.append(position)
                continue
            }
            if lastShape != change.table {
                if plan.shapes.index(forKey: change.table) == nil { plan.shapes[change.table] = self.shape(change.table) }
                lastShape = change.table
            }
            var intent = StatementIntent.other
            if change.depth == 0 {
                if lastUnit?.unit != change.unit { lastUnit = (change.unit, self.intents[change.unit] ?? .other) }
                intent = lastUnit!.intent
            }
            switch change.operation {
            case .insert,
                .update where intent.kind == .upsert:
                let groupKey = GroupKey(unit: intent.group ?? change.unit, table: change.table, direct: change.depth == 0)
                if let index = lastGroup?.key == groupKey ? lastGroup!.index : groupIndex[groupKey] {
                    lastGroup = (groupKey, index)
                    plan.groups[index].count += 1
                    if plan.images { plan.groups[index].rows.append(position) }
                } else {
                    let kind: EventKind = intent.kind == .upsert ? .upsertRows : .insertRows
                    var properties: JSONObject = [
                        "database": .string(database), "table": .string(self.tables[Int(change.table)]), "num_rows": 0,
                    ]
                    if kind == .insertRows {
                        properties["ignore"] = .bool(intent.ignore)
                        properties["replace"] = .bool(intent.replace)
                    }
                    plan.slots.append(~plan.groups.count)
                    plan.groups.append(
                        CommittedEventPlan.Group(kind: kind, properties: properties, rows: plan.images ? [position] : [], count: 1)
                    )
                    groupKeys.append(groupKey)
                    groupIndex[groupKey] = plan.groups.count - 1
                    lastGroup = (groupKey, plan.groups.count - 1)
                    if change.depth == 0 { reportedUnits.insert(intent.group ?? change.unit) }
                }
            case .update, .delete:
                if change.operation == .delete, replacedKeys.contains(position) { continue }
                plan.slots.append(position)
            }
        }
        for index in plan.groups.indices {
            plan.groups[index].properties["num_rows"] = .integer(plan.groups[index].count)
        }
        // A structured insert reports the rows it was given, even those SQLite ignored.
        var reportedGroups: Set<Int32> = []
        for (unit, intent) in self.intents.sorted(by: { $0.key < $1.key }) {
            let unit = intent.group ?? unit
            guard let reported = intent.reportedRows, let table = intent.table, reportedGroups.insert(unit).inserted else { continue }
            if let group = groupKeys.firstIndex(where: { $0.unit == unit && $0.direct }) {
                plan.groups[group].properties["num_rows"] = .integer(reported)
            } else if !reportedUnits.contains(unit), intent.kind != .other {
                var properties: JSONObject = ["database": .string(database), "table": .string(table), "num_rows": .integer(reported)]
                if intent.kind == .insert {
                    properties["ignore"] = .bool(intent.ignore)
                    properties["replace"] = .bool(intent.replace)
                }
                plan.slots.append(~plan.groups.count)
                plan.groups.append(
                    CommittedEventPlan.Group(
                        kind: intent.kind == .upsert ? .upsertRows : .insertRows,
                        properties: properties,
                        rows: [],
                        count: 0
                    )
                )
            }
        }
        return CommittedEvents(capture: self, plan: plan)
    }

    /// The catalog event of `plan`'s slot `slot`.
    func kind(of slot: Int, in plan: CommittedEventPlan) -> EventKind {
        if slot < 0 { return plan.groups[~slot].kind }
        switch self.entries[slot] {
        case .schema(let change): return change.kind
        case .row(let change): return change.operation == .delete ? .deleteRow : .updateRow
        }
    }

    private struct GroupKey: Hashable {
        let unit: Int32
        let table: Int32
        /// The statement's own inserts, not its triggers'.
        let direct: Bool
    }

    /// Positions of deletes a `REPLACE` made to put a row with the same key in place.
    private func replacedKeys() -> Set<Int> {
        guard self.intents.values.contains(where: \.replace) else { return [] }
        var replaced: Set<Int> = []
        var pendingDeletes: [Int32: [(position: Int, key: [JSONValue])]] = [:]  // per unit
        for (position, entry) in self.entries.enumerated() {
            guard case .row(let change) = entry, change.depth == 0, self.intents[change.unit]?.replace == true else { continue }
            let shape = self.shape(change.table)
            switch change.operation {
            case .delete:
                pendingDeletes[change.unit, default: []].append((position, Self.key(change, shape)))
            case .insert:
                let key = Self.key(change, shape, new: true)
                if let match = pendingDeletes[change.unit]?.firstIndex(where: { $0.key == key }) {
                    replaced.insert(pendingDeletes[change.unit]![match].position)
                    pendingDeletes[change.unit]!.remove(at: match)
                }
            case .update:
                break
            }
        }
        return replaced
    }

    /// A change's key: `[rowid]`, the key values recorded, or (recorded while the shape was
    /// unknown) the key taken from its whole row now that the shape is known.
    static func key(_ change: RowChange, _ shape: TableShape?, new: Bool = false) -> [JSONValue] {
        if change.keyIsRowid { return [.int(change.rowid)] }
        if let key = change.key { return key }
        guard let shape, !shape.keyIsRowid else { return [.int(change.rowid)] }
        guard let row = new || change.operation == .insert ? change.after : change.before else { return [.int(change.rowid)] }
        return shape.keyColumns.map { $0 < row.count ? row[$0] : .null }
    }
}
