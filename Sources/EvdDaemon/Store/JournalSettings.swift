/// How the journal keeps committed events (PROTOCOL.md §5; `evd --journal-*`).
public struct JournalSettings: Sendable {
    /// Whether committed events are journaled at all (`--no-journal` turns it off: then `since`
    /// can replay nothing and gets notice `gap`).
    public var enabled = true
    /// Keep at least the newest this many journaled events of each retention window
    /// (`Journal.Window`); 0: no limit by count.
    public var keepEvents = 1_000_000
    /// Drop journaled events older than this many seconds (in every window); 0: no limit by age.
    public var keepSeconds = 7 * 86_400
    /// How often retention runs, in milliseconds.
    public var pruneIntervalMs = 1000
    /// Whether row images are journaled with every change (`--no-journal-rows` turns it off):
    /// then a `rows: true` subscriber that replays gets them even for changes made while nobody
    /// asked for them — what a cache rebuilt from the journal needs. Off, changes record only
    /// their keys unless a `rows: true` subscription exists at the time.
    public var rowImages = true
    /// The most events of one retention window that durable cursors keep beyond what retention
    /// keeps (`--cursor-max-retained-events`): a cursor that acknowledges nothing pins the
    /// journal up to this, and past it its next replay gets notice `gap`. 0: cursors pin nothing.
    public var cursorMaxRetainedEvents = 10_000_000

    public init() {}
}
