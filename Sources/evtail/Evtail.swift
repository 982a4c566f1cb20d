import OrderedCollections
import ArgumentParser
import EvdClient

/// evtail: watch evd's events, like `journalctl -f`.
@main
struct Evtail: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evtail",
        abstract: "Print evd's events as they happen: NDJSON into a pipe, one readable line each on a terminal.",
        discussion: """
            EVENT may be a name (insert-rows), a glob (before_*) or a custom name (myapp.deployed); default *.
            Examples:
              evtail 'before_*' checkout
              evtail insert-rows --where table=dogs --count 1
              evtail --json '*' | jq .event
            """
    )

    @Argument(help: "Events to watch: names or globs (* and ?).")
    var events: [String] = []

    @Option(help: "The daemon's socket (default: $EVD_SOCKET, $RUNTIME_DIRECTORY/evd.sock, $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock).")
    var socket: String?

    @Option(name: .customLong("where"), help: "Only events whose property K equals V (repeatable; V is JSON or a string).")
    var filters: [String] = []

    @Option(help: "Replay journaled events after this seq first.")
    var since: Int64?

    @Option(help: "Exit after this many events.")
    var count: Int?

    @Option(help: "A name for this subscription.")
    var name: String?

    @Flag(help: "Print raw NDJSON even on a terminal.")
    var json = false

    func validate() throws {
        if let count, count < 1 { throw ValidationError("--count must be at least 1") }
        for filter in self.filters where !filter.contains("=") {
            throw ValidationError("--where takes K=V, not '\(filter)'")
        }
    }

    func run() async throws {
        Terminal.exitQuietlyOnSignals()
        let socketPath = SocketPath.resolve(explicit: self.socket, environment: SocketPath.processEnvironment)
        var arguments: JSONObject = ["events": .array((self.events.isEmpty ? ["*"] : self.events).map(JSONValue.string))]
        var filter = JSONObject()
        for item in self.filters {
            let eq = item.firstIndex(of: "=")!
            let key = String(item[..<eq])
            let value = Terminal.argumentValue(String(item[item.index(after: eq)...]))
            switch filter[key] {
            case nil: filter[key] = value
            case .array(let values)?: filter[key] = .array(values + [value])
            case let existing?: filter[key] = .array([existing, value])
            }
        }
        if !filter.isEmpty { arguments["where"] = .object(filter) }
        if let since { arguments["since"] = .int(since) }
        if let name { arguments["name"] = .string(name) }
        let readable = !self.json && Terminal.stdoutIsTerminal
        let limit = self.count

        let outcome: Int32 = try await EvdConnection.withConnection(socketPath: socketPath) { evd in
            do {
                try await evd.request("subscribe", arguments)
            } catch let error as EvdError {
                Terminal.writeStderr("evtail: \(error)")
                return 1
            }
            var seen = 0
            while let message = await evd.nextMessage() {
                let type = message["type"]?.stringValue
                if readable {
                    Terminal.writeStdout(Array((EventFormatter.line(message) + "\n").utf8))
                } else {
                    Terminal.writeStdout(JSONValue.object(message).jsonBytes + [0x0a])
                }
                if type == "notice" && message["code"] == "shutdown" { return 0 }
                if type == "event" || type == "veto" {
                    seen += 1
                    if let limit, seen >= limit { return 0 }
                }
            }
            Terminal.writeStderr("evtail: evd closed the connection")
            return 1
        }
        if outcome != 0 { throw ExitCode(outcome) }
    }
}
