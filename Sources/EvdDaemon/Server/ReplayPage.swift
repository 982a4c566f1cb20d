import EvdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A page of a replay: the journaled events one subscription receives, as the lines it reads.
///
/// Hot path: a row's stored body is spliced into the line as it is (the journal keeps the bytes
/// live delivery wrote), so a replayed event costs its envelope's few fields and two copies of its
/// body: out of SQLite, and into the socket's buffer. A run's events are written as live delivery
/// writes them (`EventLine`), row images made from their binary form the same way. Only a
/// `where` filter parses the body.
struct ReplayPage: ReplayedEvents {
    let subscription: Int
    /// The events' lines, one after another.
    private(set) var bytes: [UInt8] = []
    /// Each event's seq and the offset of its line in `bytes`, in seq order.
    private var starts: [Start] = []
    /// How many journaled events the page read, matched or not (0: the replay is complete).
    private(set) var read = 0
    /// The seq of the last event read.
    private(set) var lastRead: Int64 = 0
    /// The journal's floor, loaded after the rows were read: what is at or below it may be missing.
    private(set) var floor: Int64 = 0
    /// A damaged row the page passed instead of reading events (`Journal.Reader.Damage`): its seqs
    /// are a gap.
    private(set) var damage: Journal.Reader.Damage?

    private struct Start: Sendable {
        let seq: Int64
        let offset: Int
    }

    private init(subscription: Int) {
        self.subscription = subscription
    }

    /// The number of events.
    var count: Int { self.starts.count }
    /// The seq of the first event (0 when there is none).
    var firstSeq: Int64 { self.starts.first?.seq ?? 0 }
    /// The seq of the last event (0 when there is none).
    var lastSeq: Int64 { self.starts.last?.seq ?? 0 }

    /// Reads the next page (at most `limit` events) of `reader` for `subscription`, then the floor of
    /// `journal` (capped at `through`). Blocks on SQLite: call it off the event loops.
    static func read(
        _ reader: Journal.Reader,
        limit: Int,
        for subscription: Subscription,
        journal: Journal,
        through: Int64
    ) throws(SQLiteError) -> ReplayPage {
        var page = ReplayPage(subscription: subscription.id)
        page.bytes.reserveCapacity(limit * 160)
        // What follows the time: its closing quote and the subscription number.
        var tail: [UInt8] = [UInt8(ascii: "\"")]
        JSONWriter.appendASCII(WireLines.subscriptionKey, to: &tail)
        JSONWriter.appendInt(Int64(subscription.id), to: &tail)
        var names = NameCache(epoch: journal.epoch)
        let read = try reader.next(limit: limit) { row, from, to, budget in
            guard let name = names.lookUp(row.name, for: subscription) else {
                let taken = min(budget, Int(to - from + 1))
                page.lastRead = from + Int64(taken) - 1
                return taken
            }
            if row.isRun {
                let taken = page.append(run: row, from: from, to: to, budget: budget, name: name, tail: tail, for: subscription)
                page.lastRead = from + Int64(taken) - 1
                return taken
            }
            page.lastRead = row.seq
            page.append(row, name: name, tail: tail, for: subscription)
            return 1
        }
        page.read = read
        if let damage = reader.damage {
            page.damage = damage
            page.lastRead = damage.to
        }
        // Retention raises a floor before it deletes: loaded after the read, it covers every
        // row the read may have missed. Only the windows whose events the subscription can
        // receive count: the churn of others' logins does not make a gap in its insert-rows.
        page.floor = min(journal.floor(of: subscription.mayReceive(from:)), through)
        return page
    }

    /// Appends `row` as `subscription` receives it, unless its `where` filter or what its actor may
    /// view rejects it.
    private mutating func append(_ row: Journal.Reader.Row, name: NameCache.Name, tail: [UInt8], for subscription: Subscription) {
        // The body is the event after `"subscription":N`: `,"session":…,"actor":…,props…}` and a
        // newline. With images, the body without them is the same bytes up to its closing `}`.
        let plain: UnsafeBufferPointer<UInt8>? = row.plain.map { UnsafeBufferPointer(rebasing: row.stored[..<($0 - 2)]) }
        if !subscription.acceptsAll {
            var object: [UInt8] = [UInt8(ascii: "{")]
            if let plain {
                object += plain.dropFirst()
                object += [UInt8(ascii: "}"), UInt8(ascii: "\n")]
            } else {
                object += row.stored.dropFirst()
            }
            guard let parsed = try? JSONValue(parsing: object), let properties = parsed.objectValue,
                subscription.visibility?.allows(properties) ?? true,
                subscription.filter.passes(
                    name: name.text,
                    session: properties["session"] ?? .null,
                    actor: properties["actor"]?["id"] ?? .null,
                    properties: properties
                )
            else { return }
        }
        self.starts.append(Start(seq: row.seq, offset: self.bytes.count))
        WireLines.appendStart(seq: row.seq, to: &self.bytes)
        self.bytes += name.head
        self.bytes.append(contentsOf: row.time)
        self.bytes += tail
        if let plain, !subscription.wantsRows {
            self.bytes.append(contentsOf: plain)
            self.bytes.append(UInt8(ascii: "}"))
            self.bytes.append(UInt8(ascii: "\n"))
        } else {
            self.bytes.append(contentsOf: row.stored)
        }
    }

    /// Appends the events `from...to` (at most `budget`) of a row that holds a run, as
    /// `subscription` receives them (`RunDelivery` writes them live); returns how many it read.
    private mutating func append(
        run row: Journal.Reader.Row,
        from: Int64,
        to: Int64,
        budget: Int,
        name: NameCache.Name,
        tail: [UInt8],
        for subscription: Subscription
    ) -> Int {
        let wanted = min(budget, Int(to - from + 1))
        guard let kind = name.kind, let run = PackedRun(UnsafeRawBufferPointer(row.stored)) else { return wanted }
        let columns = subscription.wantsRows ? run.columnNames.map(ColumnKeys.init) : []
        let skip = Int(from - row.first)
        var taken = 0
        _ = run.forEachEvent { index, eventTail, image in
            guard index >= skip else { return true }
            let seq = row.first + Int64(index)
            let eventTail = eventTail.bindMemory(to: UInt8.self)
            if !subscription.acceptsAll {
                var object: [UInt8] = [UInt8(ascii: "{")]
                EventLine.appendBody(common: run.common, tail: eventTail, image: nil, kind: kind, columns: [], to: &object)
                if object.count > 1 { object[1] = UInt8(ascii: " ") }  // the body's leading comma
                if let properties = (try? JSONValue(parsing: object))?.objectValue,
                    subscription.visibility?.allows(properties) ?? true,
                    subscription.filter.passes(
                        name: name.text,
                        session: properties["session"] ?? .null,
                        actor: properties["actor"]?["id"] ?? .null,
                        properties: properties
                    )
                {
                    self.appendRunEvent(seq, name, row.time, tail, run.common, eventTail, image, kind, columns, subscription)
                }
            } else {
                self.appendRunEvent(seq, name, row.time, tail, run.common, eventTail, image, kind, columns, subscription)
            }
            taken += 1
            return taken < wanted
        }
        // A run shorter than its seqs say (it never is: evd wrote it) has nothing more to give.
        return max(taken, wanted)
    }

    private mutating func appendRunEvent(
        _ seq: Int64,
        _ name: NameCache.Name,
        _ time: UnsafeBufferPointer<UInt8>,
        _ tail: [UInt8],
        _ common: UnsafeRawBufferPointer,
        _ eventTail: UnsafeBufferPointer<UInt8>,
        _ image: UnsafeRawBufferPointer,
        _ kind: EventKind,
        _ columns: [ColumnKeys],
        _ subscription: Subscription
    ) {
        self.starts.append(Start(seq: seq, offset: self.bytes.count))
        WireLines.appendStart(seq: seq, to: &self.bytes)
        self.bytes += name.head
        self.bytes.append(contentsOf: time)
        self.bytes += tail
        EventLine.appendBody(
            common: common,
            tail: eventTail,
            image: subscription.wantsRows ? image : nil,
            kind: kind,
            columns: columns,
            to: &self.bytes
        )
    }

    /// Drops the events at or below `seq` (retention removed rows up to it: a notice `gap` says so).
    mutating func drop(through seq: Int64) {
        guard let kept = self.starts.firstIndex(where: { $0.seq > seq }) else {
            self.bytes.removeAll()
            self.starts.removeAll()
            return
        }
        guard kept > 0 else { return }
        let offset = self.starts[kept].offset
        self.bytes.removeSubrange(..<offset)
        self.starts = self.starts[kept...].map { Start(seq: $0.seq, offset: $0.offset - offset) }
    }

    /// Whether a subscription wants events of a name, and their heads' part for it, remembered
    /// for the run of rows with the same name (a replay reads long runs of one event).
    private struct NameCache {
        struct Name {
            let text: String
            /// The catalog event (`nil`: a custom one).
            let kind: EventKind?
            /// `,"epoch":…,"event":…,"time":"` (`WireLines.appendName` and the time's opening quote).
            let head: [UInt8]
        }

        let epoch: JournalEpoch
        private var last: [UInt8]?
        private var lastName: Name?

        init(epoch: JournalEpoch) {
            self.epoch = epoch
        }

        /// The name, when `subscription` wants its events; `nil` when not.
        mutating func lookUp(_ bytes: UnsafeBufferPointer<UInt8>, for subscription: Subscription) -> Name? {
            if let last = self.last, last.count == bytes.count,
                bytes.isEmpty || last.withUnsafeBufferPointer({ memcmp($0.baseAddress!, bytes.baseAddress!, bytes.count) == 0 })
            {
                return self.lastName
            }
            self.last = Array(bytes)
            let text = String(decoding: bytes, as: UTF8.self)
            let wanted: Bool
            let kind = EventKind(name: text)
            if let kind {
                wanted = subscription.kinds & (1 << UInt64(kind.rawValue)) != 0
            } else {
                wanted = subscription.matches(customName: text)
            }
            var head: [UInt8] = []
            WireLines.appendName(bytes, epoch: self.epoch, to: &head)
            head.append(UInt8(ascii: "\""))
            self.lastName = wanted ? Name(text: text, kind: kind, head: head) : nil
            return self.lastName
        }
    }
}

extension Subscription {
    /// Whether any event of a journal's retention window can reach this subscription: its names
    /// match some of the window's events, and (for a database's) its `where` allows the database.
    func mayReceive(from window: Journal.Window) -> Bool {
        switch window {
        case .sessions:
            return self.kinds & (1 << UInt64(EventKind.login.rawValue) | 1 << UInt64(EventKind.logout.rawValue)) != 0
        case .state:
            // `create-token`, or custom events: any glob might match one, and so does a namespaced name.
            return self.kinds & 1 << UInt64(EventKind.createToken.rawValue) != 0
                || self.patterns.contains { $0.isGlob || isNamespacedEventName($0.text) }
        case .database(let name):
            return self.kinds & EventKind.committedChanges != 0 && self.filter.mayPass("database", .string(name))
        }
    }
}
