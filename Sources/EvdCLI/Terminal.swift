import EvdClient

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Output helpers the command-line tools share: unbuffered writes, a clean exit on a closed pipe
/// (`evtail | head -1`) and on SIGINT/SIGTERM.
public enum Terminal {
    /// Whether standard output is a terminal (readable output) or a pipe/file (NDJSON).
    public static var stdoutIsTerminal: Bool { isatty(1) == 1 }
    public static var stderrIsTerminal: Bool { isatty(2) == 1 }

    /// Exits 0 on SIGINT, SIGTERM and SIGPIPE-as-EPIPE, as a well-behaved filter does.
    public static func exitQuietlyOnSignals() {
        signal(SIGPIPE, SIG_IGN)
        signal(SIGINT) { _ in _exit(0) }
        signal(SIGTERM) { _ in _exit(0) }
    }

    /// Writes all of `bytes` to standard output; exits 0 if the reader has gone away.
    public static func writeStdout(_ bytes: [UInt8]) {
        if !self.writeAll(fd: 1, bytes) { _exit(0) }
    }

    /// Writes a line to standard error.
    public static func writeStderr(_ text: String) {
        _ = self.writeAll(fd: 2, Array((text.hasSuffix("\n") ? text : text + "\n").utf8))
    }

    private static func writeAll(fd: Int32, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0 {
                    if errno == EINTR { continue }
                    return false
                }
                offset += n
            }
            return true
        }
    }

    /// A command-line argument as a JSON value: what parses as JSON is that value, anything else is
    /// a string (`Rex` → "Rex", `42` → 42, `"42"` → "42").
    public static func argumentValue(_ text: String) -> JSONValue {
        (try? JSONValue(parsing: text)) ?? .string(text)
    }
}
