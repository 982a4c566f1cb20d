import EvdClient

extension ChangeCapture {
    /// The events of `plan`'s slots `range`, made from what the capture keeps, as runs, with
    /// their transaction's members (`stamp`; the plan's last event ends the transaction).
    ///
    /// Hot path (a million-row UPDATE makes a million `update-row`s): a row's event is its key
    /// written after the start its table's events share, and its images copied as the hook wrote
    /// them; nothing else is made per event (the transaction's members are in the shared start).
    func publications(
        _ plan: CommittedEventPlan,
        _ range: Range<Int>,
        origin: EventOrigin,
        wanted: UInt64,
        stamp: TxStamp?
    ) -> [Publication] {
        var builder = RunBuilder(origin: origin, images: plan.images, stamp: stamp)
        var lastShape: (table: Int32, shape: TableShape?)?
        let last = stamp == nil ? -1 : plan.slots.count - 1
        for index in range {
            let slot = plan.slots[index]
            let end = index == last
            let kind = self.kind(of: slot, in: plan)
            guard wanted & (1 << UInt64(kind.rawValue)) != 0 else {
                builder.skip(kind)
                continue
            }
            if slot < 0 {
                // A grouped insert: its properties, then all its rows' images.
                let group = plan.groups[~slot]
                builder.start(kind, table: -1) { _ in }
                builder.tail { tail in
                    Self.appendProperties(group.properties, to: &tail)
                    Self.close(&tail, end: end)
                }
                if plan.images {
                    builder.image { image, columns in
                        RowImage.appendVarint(group.count == 0 ? 0 : group.rows.count, to: &image)
                        for position in group.rows {
                            guard case .row(let change) = self.entries[position] else { continue }
                            self.appendSlot(change.afterImage, change.after, change, plan, &columns, to: &image)
                        }
                    }
                } else {
                    builder.endEvent()
                }
                continue
            }
            switch self.entries[slot] {
            case .schema(let change):
                builder.start(kind, table: -1) { _ in }
                builder.tail { tail in
                    var properties: JSONObject = ["database": .string(plan.database)]
                    properties.merge(change.properties) { _, new in new }
                    Self.appendProperties(properties, to: &tail)
                    Self.close(&tail, end: end)
                }
                builder.endEvent()
            case .row(let change):
                if lastShape?.table != change.table { lastShape = (change.table, plan.shapes[change.table] ?? nil) }
                let shape = lastShape!.shape
                builder.start(kind, table: change.table) { common in
                    JSONWriter.appendASCII(#","database":"#, to: &common)
                    JSONWriter.appendString(plan.database, to: &common)
                    JSONWriter.appendASCII(#","table":"#, to: &common)
                    JSONWriter.appendString(self.tables[Int(change.table)], to: &common)
                    JSONWriter.appendASCII(#","pks":"#, to: &common)
                }
                builder.tail { tail in
                    if change.keyIsRowid {
                        tail.append(UInt8(ascii: "["))
                        JSONWriter.appendInt(change.rowid, to: &tail)
                        tail.append(UInt8(ascii: "]"))
                    } else {
                        JSONValue.array(Self.key(change, shape)).write(into: &tail)
                    }
                    Self.close(&tail, end: end)
                }
                if plan.images {
                    builder.image { image, columns in
                        self.appendSlot(change.beforeImage, change.before, change, plan, &columns, to: &image)
                        if change.operation == .update {
                            self.appendSlot(change.afterImage, change.after, change, plan, &columns, to: &image)
                        }
                    }
                } else {
                    builder.endEvent()
                }
            }
        }
        return builder.finish()
    }

    /// Ends an event's tail: `,"tx_end":true` when it is the transaction's last, then the
    /// closing brace and newline.
    @inline(__always)
    private static func close(_ tail: inout [UInt8], end: Bool) {
        if end { JSONWriter.appendASCII(TxStamp.endMember, to: &tail) }
        tail += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
    }

    /// Writes properties as the members of an event's body: `,"key":value` each.
    private static func appendProperties(_ properties: JSONObject, to bytes: inout [UInt8]) {
        for (key, value) in properties {
            bytes.append(UInt8(ascii: ","))
            JSONWriter.appendString(key, to: &bytes)
            bytes.append(UInt8(ascii: ":"))
            value.write(into: &bytes)
        }
    }

    /// Appends a row slot of an event's image (`RowImage.render(event:…)`): the image the hook
    /// wrote, or one made of the row's values (recorded while the shape was unknown, named by
    /// the shape read at commit); none (`null`) without either.
    private func appendSlot(
        _ written: Range<Int>?,
        _ row: [JSONValue]?,
        _ change: RowChange,
        _ plan: CommittedEventPlan,
        _ columns: inout RunBuilder.Columns,
        to image: inout [UInt8]
    ) {
        if let written, change.columns >= 0 {
            RowImage.appendVarint(columns.local(capture: change.columns, self.columnSets) + 1, to: &image)
            image.append(contentsOf: self.imageBytes(written))
        } else if let row {
            let shape = plan.shapes[change.table] ?? nil
            RowImage.appendVarint(columns.local(names: shape?.columns ?? []) + 1, to: &image)
            RowImage.append(row: shape?.realified(row) ?? row, to: &image)
        } else {
            RowImage.appendVarint(0, to: &image)
        }
    }
}

/// Makes runs of events (`EventRun`) one event at a time: an event of the same catalog event and
/// table as the one before joins its run, sharing the start of its body.
private struct RunBuilder {
    /// The column sets a run's images use, numbered for the run.
    struct Columns {
        var sets: [ColumnKeys] = []
        /// The capture's set numbers, to the run's.
        private var fromCapture: [Int32: Int] = [:]
        private var byNames: [[String]: Int] = [:]

        private var last: (capture: Int32, local: Int)?

        @inline(__always)
        mutating func local(capture set: Int32, _ sets: [ColumnKeys]) -> Int {
            if let last = self.last, last.capture == set { return last.local }
            let local = self.fromCapture[set] ?? self.local(names: sets[Int(set)].names, keys: sets[Int(set)])
            self.fromCapture[set] = local
            self.last = (set, local)
            return local
        }

        mutating func local(names: [String], keys: ColumnKeys? = nil) -> Int {
            if let known = self.byNames[names] { return known }
            self.sets.append(keys ?? ColumnKeys(names))
            self.byNames[names] = self.sets.count - 1
            return self.sets.count - 1
        }
    }

    let origin: EventOrigin
    let images: Bool
    /// The transaction's members every event carries after the origin's.
    let stamp: TxStamp?
    private var output: [Publication] = []
    private var kind: EventKind?
    private var table: Int32 = -1
    private var common: [UInt8] = []
    private var tails: [UInt8] = []
    private var tailEnds: [Int] = []
    private var imageBytes: [UInt8] = []
    private var imageEnds: [Int] = []
    private var columns = Columns()
    private var unwanted: (kind: EventKind, count: Int)?

    init(origin: EventOrigin, images: Bool, stamp: TxStamp?) {
        self.origin = origin
        self.images = images
        self.stamp = stamp
    }

    /// An event nobody wants: counted, not made.
    mutating func skip(_ kind: EventKind) {
        self.flushRun()
        if let unwanted = self.unwanted, unwanted.kind == kind {
            self.unwanted!.count += 1
        } else {
            self.flushUnwanted()
            self.unwanted = (kind, 1)
        }
    }

    /// Starts an event of `kind` about `table` (-1: none in its common start): it joins the run
    /// when the one before was the same, else a new run starts with the common start
    /// `writeCommon` appends after the origin's and the transaction's members.
    @inline(__always)
    mutating func start(_ kind: EventKind, table: Int32, _ writeCommon: (inout [UInt8]) -> Void) {
        self.flushUnwanted()
        if self.kind == kind, self.table == table, self.tailEnds.count < Journal.maxRunEvents { return }
        self.flushRun()
        self.kind = kind
        self.table = table
        self.common = self.origin.envelopeFragment
        self.stamp?.appendMembers(kind: kind, to: &self.common)
        writeCommon(&self.common)
    }

    @inline(__always)
    mutating func tail(_ write: (inout [UInt8]) -> Void) {
        write(&self.tails)
        self.tailEnds.append(self.tails.count)
    }

    /// The event's images, then its end.
    @inline(__always)
    mutating func image(_ write: (inout [UInt8], inout Columns) -> Void) {
        write(&self.imageBytes, &self.columns)
        self.imageEnds.append(self.imageBytes.count)
    }

    /// The end of an event without images.
    @inline(__always)
    mutating func endEvent() {
        self.imageEnds.append(self.imageBytes.count)
    }

    private mutating func flushRun() {
        guard let kind = self.kind, !self.tailEnds.isEmpty else { return }
        self.output.append(
            .run(
                EventRun(
                    kind: kind,
                    origin: self.origin,
                    common: self.common,
                    tails: self.tails,
                    tailEnds: self.tailEnds,
                    images: self.imageBytes,
                    imageEnds: self.imageEnds,
                    columns: self.columns.sets
                )
            )
        )
        self.kind = nil
        self.tails = []
        self.tailEnds = []
        self.imageBytes = []
        self.imageEnds = []
        self.columns = Columns()
    }

    private mutating func flushUnwanted() {
        guard let unwanted = self.unwanted else { return }
        self.output.append(.unwanted(unwanted.kind, count: unwanted.count))
        self.unwanted = nil
    }

    mutating func finish() -> [Publication] {
        self.flushRun()
        self.flushUnwanted()
        return self.output
    }
}
