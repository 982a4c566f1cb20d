import ArgumentParser
import EvdCLI
import EvdClient
import OrderedCollections

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Options every evctl subcommand takes, before or after the subcommand's name.
struct GlobalOptions: ParsableArguments {
    @Option(
        help: "The daemon's socket (default: $EVD_SOCKET, $RUNTIME_DIRECTORY/evd.sock, $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock)."
    )
    var socket: String?

    @Option(help: ArgumentHelp("Log in with this token first (default: $EVD_TOKEN).", valueName: "token"))
    var token: String?

    var socketPath: String { SocketPath.resolve(explicit: self.socket, environment: SocketPath.processEnvironment) }

    /// Sends one request and prints its result as JSON; an error goes to stderr (`ExitStatus`).
    /// `operation` may throw what the daemon would answer (a parameter no SQLite value can hold,
    /// say): it is reported the same way, and nothing is sent.
    /// The seq of the request's last committed event (the response's `seq`, read your writes) goes
    /// to stderr when that is a terminal: `evctl: seq N`.
    func call(_ operation: () throws(EvdError) -> EvdOperation) async throws {
        let (result, seq) = try await self.sendForResponse(operation)
        Terminal.writeStdout(JSONValue.object(result).jsonBytes + [0x0a])
        if let seq, Terminal.stderrIsTerminal { Terminal.writeStderr("evctl: seq \(seq)") }
    }

    /// Sends one request (after logging in with the token, if any) and returns its result. An error
    /// reply goes to stderr with `ExitStatus.errorReply`; no daemon, or a connection that ends before
    /// the reply, with `ExitStatus.unavailable`.
    func send(_ operation: () throws(EvdError) -> EvdOperation) async throws -> JSONObject {
        try await self.sendForResponse(operation).result
    }

    /// `send`, with the response's `seq` (nil when the request committed no event).
    func sendForResponse(_ operation: () throws(EvdError) -> EvdOperation) async throws -> (result: JSONObject, seq: Int64?) {
        let token = TokenSource.resolve(explicit: self.token, environment: SocketPath.processEnvironment)
        do {
            let request = try operation()
            return try await EvdConnection.withConnection(socketPath: self.socketPath) { evd in
                if let token { try await evd.login(token: token) }
                return try await evd.requestWithSeq(request)
            }
        } catch let error as EvdError {
            Terminal.writeStderr("evctl: \(error)")
            throw ExitCode(ExitStatus.errorReply)
        } catch {
            // EvdConnection.ConnectionError, or the channel's own error when the daemon goes away.
            Terminal.writeStderr("evctl: \(error)")
            throw ExitCode(ExitStatus.unavailable)
        }
    }
}

/// evctl's exit statuses, as `evctl --help` lists them. The two failures a script handles
/// differently are told apart: the daemon said no (retrying will not help) or there is no daemon
/// to ask (it may be starting or stopping). The usage and "unavailable" numbers are sysexits(3)'s,
/// the ones ArgumentParser already uses for a bad argument and evd for a bad config file.
enum ExitStatus {
    /// The request succeeded; its result is on stdout.
    static let ok: Int32 = 0
    /// evd answered with an error (`sql_error`, `permission_denied`, ...), printed on stderr.
    static let errorReply: Int32 = 1
    /// A bad subcommand, option or argument (EX_USAGE); nothing was sent.
    static let usage: Int32 = 64
    /// evd could not be reached, or the connection closed before the answer (EX_UNAVAILABLE).
    static let unavailable: Int32 = 69

    /// The table `evctl --help` prints.
    static let help = """
        Each result is one line of JSON on stdout (token create prints the bare
        token, or JSON with --json); errors go to stderr.

        Exit status:
          0   the request succeeded
          1   evd answered with an error (sql_error, permission_denied, ...)
          64  usage: a bad subcommand, option or argument; nothing was sent
          69  evd could not be reached (no socket, nobody listening, no
              permission to connect) or the connection closed before the answer
        """
}

/// evctl: the shell's client for evd.
@main
struct Evctl: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "evctl",
        abstract: "Talk to evd from the shell: run SQL, emit events, read the catalog and the counters.",
        discussion: ExitStatus.help,
        subcommands: [SQL.self, Insert.self, Describe.self, Emit.self, Token.self, Events.self, Stats.self, Ping.self]
    )

    /// Global options may come before the subcommand (`evctl --socket S sql ...`): move them after it,
    /// where ArgumentParser looks for them (after `token create` for `evctl --token T token create`).
    static func main() async {
        var arguments = Array(CommandLine.arguments.dropFirst())
        var globals: [String] = []
        // Each global taken from the front leaves the next argument first.
        while let argument = arguments.first, argument.hasPrefix("--") {
            if argument.hasPrefix("--socket=") || argument.hasPrefix("--token=") {
                globals.append(argument)
                arguments.removeFirst()
            } else if argument == "--socket" || argument == "--token", arguments.count > 1 {
                globals += [argument, arguments[1]]
                arguments.removeFirst(2)
            } else {
                break
            }
        }
        if !globals.isEmpty && !arguments.isEmpty {
            let at = arguments.count > 1 && arguments[0] == "token" && !arguments[1].hasPrefix("-") ? 2 : 1
            arguments.insert(contentsOf: globals, at: at)
        }
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
            commandName: "sql",
            abstract: "Run SQL; PARAMs bind to its ? placeholders (JSON values, else strings)."
        )
        @OptionGroup var global: GlobalOptions
        @Option(help: "The database (default: the daemon's first).") var database: String?
        @Argument(help: "The SQL statement(s).") var sql: String
        @Argument(help: "Parameters: each parses as JSON if it can (42, null, \"x\"), else is a string.") var params: [String] = []

        func run() async throws {
            try await self.global.call { () throws(EvdError) in
                let params = self.params.isEmpty ? SQLParameters.none : try SQLParameters(.array(self.params.map(Terminal.argumentValue)))
                return .execute(.init(sql: self.sql, params: params, database: self.database))
            }
        }
    }

    struct Insert: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "insert",
            abstract: "Insert rows into a table: each ROW is a JSON object (or a JSON array of them)."
        )
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
            let rows = JSONRows(objects: all) ?? JSONRows()
            let insert = StructuredOp.insert(
                table: self.table,
                rows: rows,
                ignore: self.ignore,
                replace: self.replace,
                alter: self.alter,
                returning: self.returning
            )
            try await self.global.call { .structured(insert, database: self.database) }
        }
    }

    struct Describe: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "describe", abstract: "Print a table's columns.")
        @OptionGroup var global: GlobalOptions
        @Option(help: "The database (default: the daemon's first).") var database: String?
        @Argument(help: "The table.") var table: String

        func run() async throws {
            try await self.global.call { .structured(.describe(table: self.table), database: self.database) }
        }
    }

    struct Emit: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "emit",
            abstract: "Publish a custom event (its name has a namespace: myapp.deployed)."
        )
        @OptionGroup var global: GlobalOptions
        @Argument(help: "The event's name.") var event: String
        @Argument(help: "Its properties, a JSON object.") var data: String?

        func run() async throws {
            var emit = EvdOperation.Emit(event: self.event)
            if let data {
                guard case .object(let object) = Terminal.argumentValue(data) else {
                    throw ValidationError("the event's data must be a JSON object")
                }
                emit.data = object
            }
            try await self.global.call { .emit(emit) }
        }
    }

    struct Token: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "token",
            abstract: "Make tokens: a token acts as you, narrowed.",
            subcommands: [Create.self]
        )

        struct Create: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                commandName: "create",
                abstract: "Print a new token that acts as you (or as your token), narrowed by its restrictions.",
                discussion: """
                    With any --restrict-* option the token may do only what one of them names.
                    Examples:
                      evctl token create --expires-after 3600 --restrict-all view-table
                      evctl token create --restrict-database main:insert-row --restrict-resource main:dogs:delete-row
                      EVD_TOKEN=$(evctl token create --restrict-all subscribe) evtail insert-rows
                    """
            )
            @OptionGroup var global: GlobalOptions
            @Option(help: "Seconds until the token expires (default: never, or when your own token does).")
            var expiresAfter: Int64?
            @Option(help: ArgumentHelp("An action allowed everywhere (repeatable).", valueName: "action"))
            var restrictAll: [String] = []
            @Option(help: ArgumentHelp("An action allowed in one database (repeatable).", valueName: "db:action"))
            var restrictDatabase: [String] = []
            @Option(help: ArgumentHelp("An action allowed on one table (repeatable).", valueName: "db:table:action"))
            var restrictResource: [String] = []
            @Flag(help: "Print the whole result as JSON ({\"token\": ...}) instead of the bare token.")
            var json = false

            func run() async throws {
                var request = EvdOperation.CreateToken(expiresAfter: self.expiresAfter)
                if !self.restrictAll.isEmpty { request.restrictAll = .array(self.restrictAll.map(JSONValue.string)) }
                var databases = JSONObject()
                for item in self.restrictDatabase {
                    guard let colon = item.lastIndex(of: ":"), colon != item.startIndex else {
                        throw ValidationError("--restrict-database takes DB:ACTION, not '\(item)'")
                    }
                    let database = String(item[..<colon])
                    databases[database] = .array(
                        (databases[database]?.arrayValue ?? []) + [.string(String(item[item.index(after: colon)...]))]
                    )
                }
                if !databases.isEmpty { request.restrictDatabase = databases }
                var resources = JSONObject()
                for item in self.restrictResource {
                    guard let first = item.firstIndex(of: ":"), let last = item.lastIndex(of: ":"), first < last,
                        first != item.startIndex, item.index(after: first) != last
                    else {
                        throw ValidationError("--restrict-resource takes DB:TABLE:ACTION, not '\(item)'")
                    }
                    let database = String(item[..<first])
                    let table = String(item[item.index(after: first)..<last])
                    var tables = resources[database]?.objectValue ?? [:]
                    tables[table] = .array((tables[table]?.arrayValue ?? []) + [.string(String(item[item.index(after: last)...]))])
                    resources[database] = .object(tables)
                }
                if !resources.isEmpty { request.restrictResource = resources }
                let result = try await self.global.send { .createToken(request) }
                if self.json {
                    Terminal.writeStdout(JSONValue.object(result).jsonBytes + [0x0a])
                } else {
                    // The bare token, so that `EVD_TOKEN=$(evctl token create ...)` works.
                    Terminal.writeStdout(Array(((result["token"]?.stringValue ?? "") + "\n").utf8))
                }
            }
        }
    }

    struct Events: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "events", abstract: "Print the event catalog.")
        @OptionGroup var global: GlobalOptions
        func run() async throws { try await self.global.call { .events } }
    }

    struct Stats: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "stats",
            abstract: "Print the daemon's counters: readable sections on a terminal, JSON otherwise.",
            discussion: """
                On a terminal: sections \(StatsFormatter.sections.joined(separator: ", ")). Into a pipe or a \
                file, like every evctl command: the `stats` result as the daemon sends it, one line of JSON \
                (its keys are listed in docs/protocol.md). --json and --human choose either way. Needs the \
                admin action.
                """
        )
        @OptionGroup var global: GlobalOptions
        @Flag(help: "Print the raw stats object as one line of JSON, even on a terminal.") var json = false
        @Flag(help: "Print readable sections, even into a pipe.") var human = false

        func run() async throws {
            let result = try await self.global.send { .stats }
            if self.json || (!self.human && isatty(STDOUT_FILENO) == 0) {
                Terminal.writeStdout(JSONValue.object(result).jsonBytes + [0x0a])
            } else {
                Terminal.writeStdout(Array(StatsFormatter.render(result).utf8))
            }
        }
    }

    struct Ping: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ping", abstract: "Check that evd answers.")
        @OptionGroup var global: GlobalOptions
        func run() async throws { try await self.global.call { .ping } }
    }
}
