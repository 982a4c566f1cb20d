import ArgumentParser
import EvdClient
import EvdDaemon
import Testing

@testable import evd

/// The effective configuration `evd FLAGS` builds with the config file `toml` in `environment`:
/// `Evd.configuration(file:environment:)`, where precedence is decided, called directly.
private func effective(
    _ flags: [String] = [],
    file toml: String = "",
    environment: [String: String] = [:]
) throws
    -> EvdConfiguration
{
    let command = try Evd.parse(flags)
    return try command.configuration(file: try ConfigFile.parse(toml), environment: environment)
}

/// One setting a flag and the file can both give: its flag, its file text, and how to read it.
struct ConfigSetting: Sendable, CustomTestStringConvertible {
    let flag: [String]
    let file: String
    let read: @Sendable (EvdConfiguration) -> String
    let defaultValue: String
    let fileValue: String
    let flagValue: String
    var testDescription: String { self.flag[0] }
}

let configSettings: [ConfigSetting] = [
    ConfigSetting(
        flag: ["--pool-size", "3"],
        file: "pool_size = 8",
        read: { "\($0.poolSize)" },
        defaultValue: "4",
        fileValue: "8",
        flagValue: "3"
    ),
    ConfigSetting(
        flag: ["--socket-mode", "0660"],
        file: #"socket_mode = "0640""#,
        read: { String($0.socketMode, radix: 8) },
        defaultValue: "600",
        fileValue: "640",
        flagValue: "660"
    ),
    ConfigSetting(
        flag: ["--max-line-bytes", "4096"],
        file: "max_line_bytes = 2048",
        read: { "\($0.maxLineBytes)" },
        defaultValue: "1048576",
        fileValue: "2048",
        flagValue: "4096"
    ),
    ConfigSetting(
        flag: ["--veto-budget-ms", "200"],
        file: "veto_budget_ms = 100",
        read: { "\($0.vetoBudgetMs)" },
        defaultValue: "5000",
        fileValue: "100",
        flagValue: "200"
    ),
    ConfigSetting(
        flag: ["--max-connections", "20"],
        file: "[limits]\nmax_connections = 10",
        read: { "\($0.maxSessions)" },
        defaultValue: "1024",
        fileValue: "10",
        flagValue: "20"
    ),
    ConfigSetting(
        flag: ["--max-connections-per-uid", "6"],
        file: "[limits]\nmax_connections_per_uid = 5",
        read: { "\($0.maxSessionsPerUID)" },
        defaultValue: "256",
        fileValue: "5",
        flagValue: "6"
    ),
    ConfigSetting(
        flag: ["--max-subscriptions", "8"],
        file: "[limits]\nmax_subscriptions = 7",
        read: { "\($0.maxSubscriptions)" },
        defaultValue: "256",
        fileValue: "7",
        flagValue: "8"
    ),
    ConfigSetting(
        flag: ["--max-pending-requests", "10"],
        file: "[limits]\nmax_pending_requests = 9",
        read: { "\($0.maxPipelinedRequests)" },
        defaultValue: "256",
        fileValue: "9",
        flagValue: "10"
    ),
    ConfigSetting(
        flag: ["--max-queued-events", "12"],
        file: "[limits]\nmax_queued_events = 11",
        read: { "\($0.outboxLimits.maxEventsPerSubscription)" },
        defaultValue: "10000",
        fileValue: "11",
        flagValue: "12"
    ),
    ConfigSetting(
        flag: ["--max-queued-bytes", "196608"],
        file: "[limits]\nmax_queued_bytes = 131072",
        read: { "\($0.outboxLimits.maxBytes)" },
        defaultValue: "16777216",
        fileValue: "131072",
        flagValue: "196608"
    ),
    ConfigSetting(
        flag: ["--max-response-bytes", "327680"],
        file: "[limits]\nmax_response_bytes = 262144",
        read: { "\($0.maxResponseBytes)" },
        defaultValue: "67108864",
        fileValue: "262144",
        flagValue: "327680"
    ),
    ConfigSetting(
        flag: ["--max-filter-values", "14"],
        file: "[limits]\nmax_filter_values = 13",
        read: { "\($0.maxFilterValues)" },
        defaultValue: "1024",
        fileValue: "13",
        flagValue: "14"
    ),
    // 0 means "no limit": a 0 in the file is a value, not an absent one; a flag's 0 wins too.
    ConfigSetting(
        flag: ["--max-statement-ms", "15"],
        file: "[limits]\nmax_statement_ms = 0",
        read: { "\($0.maxStatementMs)" },
        defaultValue: "30000",
        fileValue: "0",
        flagValue: "15"
    ),
    ConfigSetting(
        flag: ["--idle-transaction-ms", "0"],
        file: "[limits]\nidle_transaction_ms = 16",
        read: { "\($0.idleTransactionMs)" },
        defaultValue: "60000",
        fileValue: "16",
        flagValue: "0"
    ),
    // The default share follows the pool size (4 - 1).
    ConfigSetting(
        flag: ["--max-pool-share", "1"],
        file: "[limits]\nmax_pool_share = 2",
        read: { "\($0.poolShare)" },
        defaultValue: "3",
        fileValue: "2",
        flagValue: "1"
    ),
    ConfigSetting(
        flag: ["--journal-keep-events", "0"],
        file: "[journal]\nkeep_events = 17",
        read: { "\($0.journal.keepEvents)" },
        defaultValue: "1000000",
        fileValue: "17",
        flagValue: "0"
    ),
    ConfigSetting(
        flag: ["--journal-keep-seconds", "19"],
        file: "[journal]\nkeep_seconds = 18",
        read: { "\($0.journal.keepSeconds)" },
        defaultValue: "604800",
        fileValue: "18",
        flagValue: "19"
    ),
    ConfigSetting(
        flag: ["--metrics-request-timeout-ms", "2000"],
        file: "[metrics]\nrequest_timeout_ms = 1000",
        read: { "\($0.metrics.requestTimeoutMs)" },
        defaultValue: "5000",
        fileValue: "1000",
        flagValue: "2000"
    ),
    ConfigSetting(
        flag: ["--metrics-socket", "/tmp/flag-metrics.sock"],
        file: "[metrics]\nsocket = \"/run/file-metrics.sock\"",
        read: { $0.metrics.socketPath ?? "none" },
        defaultValue: "none",
        fileValue: "/run/file-metrics.sock",
        flagValue: "/tmp/flag-metrics.sock"
    ),
    ConfigSetting(
        flag: ["--metrics-listen", "[::1]:9001"],
        file: "[metrics]\nlisten = \"127.0.0.1:9000\"",
        read: { $0.metrics.listen?.description ?? "none" },
        defaultValue: "none",
        fileValue: "127.0.0.1:9000",
        flagValue: "[::1]:9001"
    ),
]

@Suite("Configuration precedence (flags over environment over file over defaults)")
struct ConfigPrecedenceTests {
    @Test("each setting: the default alone, the file over the default, the flag over the file", arguments: configSettings)
    func flagOverFileOverDefault(_ setting: ConfigSetting) throws {
        #expect(setting.read(try effective()) == setting.defaultValue)
        #expect(setting.read(try effective(file: setting.file)) == setting.fileValue)
        #expect(setting.read(try effective(setting.flag, file: setting.file)) == setting.flagValue)
        #expect(setting.read(try effective(setting.flag)) == setting.flagValue)
    }

    @Test("one flag does not reset what the file gives for another setting")
    func flagsAndFileMix() throws {
        let config = try effective(["--pool-size", "2"], file: "pool_size = 9\nmax_line_bytes = 2048\n[limits]\nmax_connections = 10")
        #expect(config.poolSize == 2)
        #expect(config.maxLineBytes == 2048)
        #expect(config.maxSessions == 10)
        #expect(config.maxSubscriptions == 256)
        // The share's default follows the effective pool size.
        #expect(config.poolShare == 1)
    }

    @Test("journal switches: on by default; the file can turn them off; the flags turn them off over the file")
    func journalSwitches() throws {
        let byDefault = try effective()
        #expect(byDefault.journal.enabled && byDefault.journal.rowImages)
        let file = try effective(file: "[journal]\nenabled = false\nrows = false")
        #expect(!file.journal.enabled && !file.journal.rowImages)
        let flags = try effective(["--no-journal", "--no-journal-rows"], file: "[journal]\nenabled = true\nrows = true")
        #expect(!flags.journal.enabled && !flags.journal.rowImages)
        let one = try effective(["--no-journal-rows"], file: "[journal]\nenabled = true")
        #expect(one.journal.enabled && !one.journal.rowImages)
    }

    @Test("socket: --socket, then $EVD_SOCKET, $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR, then the file, then /tmp/evd-UID")
    func socket() throws {
        let file = #"socket = "/run/file/evd.sock""#
        let environment = [
            "EVD_SOCKET": "/env/evd.sock", "RUNTIME_DIRECTORY": "/run/evd:/run/other", "XDG_RUNTIME_DIR": "/run/user/1000",
        ]
        #expect(try effective(["--socket", "/flag/evd.sock"], file: file, environment: environment).socketPath == "/flag/evd.sock")
        #expect(try effective(file: file, environment: environment).socketPath == "/env/evd.sock")
        var noEVD = environment
        noEVD["EVD_SOCKET"] = nil
        #expect(try effective(file: file, environment: noEVD).socketPath == "/run/evd/evd.sock")
        // A login session's $XDG_RUNTIME_DIR wins over the file's socket (documented: the
        // environment wins over the file).
        #expect(try effective(file: file, environment: ["XDG_RUNTIME_DIR": "/run/user/1000"]).socketPath == "/run/user/1000/evd.sock")
        // Empty variables count as unset.
        #expect(try effective(file: file, environment: ["EVD_SOCKET": "", "XDG_RUNTIME_DIR": ""]).socketPath == "/run/file/evd.sock")
        #expect(try effective().socketPath == SocketPath.defaultPath)
    }

    @Test(
        "state directory: --state-dir, then $STATE_DIRECTORY, $XDG_STATE_HOME/evd, then the file, then ~/.local/state/evd; the default database lives there"
    )
    func stateDirectory() throws {
        let file = #"state_dir = "/var/lib/file-evd""#
        let environment = ["STATE_DIRECTORY": "/var/lib/evd:/var/lib/more", "XDG_STATE_HOME": "/home/u/.state", "HOME": "/home/u"]
        let flagged = try effective(["--state-dir", "/flag/state"], file: file, environment: environment)
        #expect(flagged.stateDirectory == "/flag/state")
        #expect(flagged.databases == [DatabaseConfig(name: "main", path: "/flag/state/main.db")])
        #expect(try effective(file: file, environment: environment).stateDirectory == "/var/lib/evd")
        #expect(try effective(file: file, environment: ["XDG_STATE_HOME": "/home/u/.state"]).stateDirectory == "/home/u/.state/evd")
        let fromFile = try effective(file: file, environment: ["HOME": "/home/u"])
        #expect(fromFile.stateDirectory == "/var/lib/file-evd")
        #expect(fromFile.databases == [DatabaseConfig(name: "main", path: "/var/lib/file-evd/main.db")])
        #expect(try effective(environment: ["HOME": "/home/u"]).stateDirectory == "/home/u/.local/state/evd")
        #expect(try effective().stateDirectory == "/root/.local/state/evd")
    }

    @Test("databases: every --db replaces the file's list, in the order given; the file's replaces the default")
    func databases() throws {
        let file = """
            [[database]]
            name = "f1"
            path = "/data/f1.db"
            [[database]]
            name = "f2"
            path = "/data/f2.db"
            """
        let flagged = try effective(["--db", "b=/x/b.db", "--db", "a=/x/a.db"], file: file)
        #expect(flagged.databases == [DatabaseConfig(name: "b", path: "/x/b.db"), DatabaseConfig(name: "a", path: "/x/a.db")])
        let fromFile = try effective(file: file)
        #expect(fromFile.databases == [DatabaseConfig(name: "f1", path: "/data/f1.db"), DatabaseConfig(name: "f2", path: "/data/f2.db")])
        #expect(throws: (any Error).self) { try effective(["--db", "a=/x/1.db", "--db", "a=/x/2.db"]) }
    }

    @Test("grants come from the file, whatever the flags")
    func grants() throws {
        let config = try effective(["--pool-size", "2"], file: "[[grant]]\nuid = 4242\nactions = [\"subscribe\"]")
        #expect(config.grants.count == 1)
        #expect(config.grants.first?.who == .uid(4242))
        #expect(config.grants.first?.actions == [.subscribe])
        #expect(try effective().grants.isEmpty)
    }
}
