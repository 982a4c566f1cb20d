import OrderedCollections
import ArgumentParser
import EvdClient

/// Options every evctl subcommand takes, before or after the subcommand's name.
struct GlobalOptions: ParsableArguments {
    @Option(help: "The daemon's socket (default: $EVD_SOCKET, $RUNTIME_DIRECTORY/evd.sock, $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock).")
    var socket: String?

    var socketPath: String { SocketPath.resolve(explicit: self.socket, environment: SocketPath.processEnvironment) }

    /// Sends one request and prints its result as JSON; an error goes to stderr with exit status 1.
    func call(_ op: String, _ arguments: JSONObject = [:]) async throws {
        let outcome: Result<JSONObject, EvdError> = try await EvdConnection.withConnection(socketPath: self.socketPath) { evd in
            do {
                return .success(try await evd.request(op, arguments))
            } catch let error as EvdError {
                return .failure(error)
            }
        }
        switch outcome {
        case .success(let result):
            Terminal.writeStdout(JSONValue.object(result).jsonBytes + [0x0a])
        case .failure(let error):
            Terminal.writeStderr("evctl: \(error)")
            throw ExitCode(1)
        }
    }
}

/// evctl: the shell's client for evd.
@main
struct Evctl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evctl",
        abstract: "Talk to evd from the shell: run SQL, emit events, read the catalog and the counters.",
        subcommands: [SQL.self, Insert.self, Describe.self, Emit.self, Events.self, Stats.self, Ping.self]
    )

    /// Global options may come before the subcommand (`evctl --socket S sql ...`): move them after it,
    /// where ArgumentParser looks for them.
    static func main() async {
        var arguments = Array(CommandLine.arguments.dropFirst())
        var globals: [String] = []
        var index = 0
        while index < arguments.count, arguments[index].hasPrefix("--") {
            let argument = arguments[index]
            if argument.hasPrefix("--socket=") {
                globals.append(argument)
                arguments.remove(at: index)
            } else if argument == "--socket", index + 1 < arguments.count {
                globals += [argument, arguments[index + 1]]
                arguments.removeSubrange(index...(index + 1))
            } else {
                break
            }
        }
        if !globals.isEmpty && !arguments.isEmpty { arguments.insert(contentsOf: globals, at: 1) }
        Terminal.exitQuietlyOnSignals()
        do {
            var command = try parseAsRoot(arguments)
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }
}

extension Evctl {
    struct SQL: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "sql", abstract: "Run SQL; PARAMs bind to its ? placeholders (JSON values, else strings).")
        @OptionGroup var global: GlobalOptions
        @Option(help: "The database (default: the daemon's first).") var database: String?
        @Argument(help: "The SQL statement(s).") var sql: String
        @Argument(help: "Parameters: each parses as JSON if it can (42, null, \"x\"), else is a string.") var params: [String] = []

        func run() async throws {
            var arguments: JSONObject = ["sql": .string(self.sql)]
            if !self.params.isEmpty { arguments["params"] = .array(self.params.map(Terminal.argumentValue)) }
            if let database { arguments["database"] = .string(database) }
            try await self.global.call("execute", arguments)
        }
    }

    struct Insert: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "insert", abstract: "Insert rows into a table: each ROW is a JSON object (or a JSON array of them).")
        @OptionGroup var global: GlobalOptions
        @Option(help: "The database (default: the daemon's first).") var database: String?
        @Flag(help: "Skip rows whose primary key exists.") var ignore = false
        @Flag(help: "Replace rows whose primary key exists.") var replace = false
        @Flag(help: "Add columns the table does not have yet.") var alter = false
        @Flag(name: .customLong("return"), help: "Print the rows as stored.") var returning = false
        @Argument(help: "The table.") var table: String
        @Argument(help: "The rows: JSON objects, or JSON arrays of objects.") var rows: [String]

        func run() async throws {
            var all: [JSONValue] = []
            for text in self.rows {
                switch Terminal.argumentValue(text) {
                case .object(let row): all.append(.object(row))
                case .array(let rows) where rows.allSatisfy({ $0.objectValue != nil }): all += rows
                default: throw ValidationError("each ROW must be a JSON object or an array of objects: \(text)")
                }
            }
            var arguments: JSONObject = ["table": .string(self.table), "rows": .array(all)]
            if self.ignore { arguments["ignore"] = true }
            if self.replace { arguments["replace"] = true }
            if self.alter { arguments["alter"] = true }
            if self.returning { arguments["return"] = true }
            if let database { arguments["database"] = .string(database) }
            try await self.global.call("insert", arguments)
        }
    }

    struct Describe: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "describe", abstract: "Print a table's columns.")
        @OptionGroup var global: GlobalOptions
        @Option(help: "The database (default: the daemon's first).") var database: String?
        @Argument(help: "The table.") var table: String

        func run() async throws {
            var arguments: JSONObject = ["table": .string(self.table)]
            if let database { arguments["database"] = .string(database) }
            try await self.global.call("describe", arguments)
        }
    }

    struct Emit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "emit", abstract: "Publish a custom event (its name has a namespace: myapp.deployed).")
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The event's name.") var event: String
        @Argument(help: "Its properties, a JSON object.") var data: String?

        func run() async throws {
            var arguments: JSONObject = ["event": .string(self.event)]
            if let data {
                guard case .object(let object) = Terminal.argumentValue(data) else {
                    throw ValidationError("the event's data must be a JSON object")
                }
                arguments["data"] = .object(object)
            }
            try await self.global.call("emit", arguments)
        }
    }

    struct Events: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "events", abstract: "Print the event catalog.")
        @OptionGroup var global: GlobalOptions
        func run() async throws { try await self.global.call("events") }
    }

    struct Stats: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "stats", abstract: "Print the daemon's counters.")
        @OptionGroup var global: GlobalOptions
        func run() async throws { try await self.global.call("stats") }
    }

    struct Ping: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ping", abstract: "Check that evd answers.")
        @OptionGroup var global: GlobalOptions
        func run() async throws { try await self.global.call("ping") }
    }
}
