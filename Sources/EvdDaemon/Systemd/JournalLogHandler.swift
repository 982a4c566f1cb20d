import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// swift-log's handler for a standard error that systemd connects to the journal
/// (`Systemd.stderrIsJournal`): one line per record, in the form sd-daemon(3) describes.
///
/// ```
/// <6>evd is ready databases=main=/var/lib/evd/main.db socket=fd 3
/// ```
///
/// No timestamp, level or label of its own: the journal stamps every line and knows the unit, and
/// the `<N>` prefix (a syslog priority) becomes the entry's `PRIORITY=` (`journalctl -p warning`
/// filters on it). A message of several lines is several entries, each with the prefix.
public struct JournalLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?

    /// One record at a time: lines of two threads never interleave within a write.
    private static let writing = Mutex(())

    /// A handler writing to standard error (the label is not printed: the journal names the unit).
    public init(label: String, metadataProvider: Logger.MetadataProvider? = LoggingSystem.metadataProvider) {
        self.metadataProvider = metadataProvider
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var metadata = self.metadata
        if let provided = self.metadataProvider?.get() { metadata.merge(provided) { _, new in new } }
        if let explicit = event.metadata { metadata.merge(explicit) { _, new in new } }
        if let error = event.error { metadata["error.message"] = "\(error)" }
        let bytes = Array(Self.format(level: event.level, message: "\(event.message)", metadata: metadata).utf8)
        Self.writing.withLock { _ in
            var offset = 0
            while offset < bytes.count {
                let written = bytes[offset...].withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
                if written < 0 && errno == EINTR { continue }
                guard written > 0 else { return }
                offset += written
            }
        }
    }

    /// The lines of one record: `<N>message key=value ...`, the metadata sorted by key.
    static func format(level: Logger.Level, message: String, metadata: Logger.Metadata) -> String {
        var text = message
        for key in metadata.keys.sorted() { text += " \(key)=\(metadata[key]!)" }
        let prefix = "<\(self.priority(level))>"
        return text.split(separator: "\n", omittingEmptySubsequences: false).map { prefix + $0 + "\n" }.joined()
    }

    /// The syslog priority of `level` (sd-daemon(3): 7 debug ... 2 critical).
    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7  // SD_DEBUG
        case .info: 6  // SD_INFO
        case .notice: 5  // SD_NOTICE
        case .warning: 4  // SD_WARNING
        case .error: 3  // SD_ERR
        case .critical: 2  // SD_CRIT
        }
    }
}
