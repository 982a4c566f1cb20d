import Crypto
import EvdClient
import Foundation
import Logging
import OrderedCollections
import Synchronization
import Testing

@testable import EvdDaemon

/// Tokens as in Datasette (PROTOCOL.md §3 `login`/`logout`/`create_token`, §8; docs/protocol.md,
/// "Tokens"): signing, narrowing, expiry, forgery, restarts, the secret file, events and the CLIs.
@Suite("Tokens")
struct TokenTests {
    let evctl = binaryPath("evctl")
    let evtail = binaryPath("evtail")

    // MARK: login, logout

    @Test("login switches the session's actor to the token's (pid kept), and its events show it; logout goes back to the peer")
    func loginSwitchesActor() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { listener in
                _ = try await subscribeEvents(listener, ["login", "logout", "myapp.*"])
                let token = try await createToken(daemon, ["restrict_all": ["emit"], "expires_after": 3600])
                try await daemon.withClient { evd in
                    let peer = try #require(evd.hello["actor"]?.objectValue)
                    #expect(peer["token"] == nil)
                    let actor = try await evd.login(token: token)
                    #expect(actor["id"] == peer["id"])
                    #expect(actor["uid"] == peer["uid"])
                    #expect(actor["pid"] == peer["pid"])
                    let expires = try #require(actor["token"]?["expires"]?.stringValue)
                    #expect(expires.hasSuffix("Z"))
                    let emitted = try await evd.request("emit", ["event": "myapp.after-login"])
                    #expect(emitted["seq"] != nil)
                    try await evd.request("logout")
                    let again = try await evd.request("emit", ["event": "myapp.after-logout"])
                    #expect(again["seq"] != nil)
                }
                let events = try await collectEvents(listener, until: "myapp.after-logout")
                let login = try #require(events.first { $0["event"] == "login" && $0["method"] == "token" })
                #expect(login["actor"]?["token"]?["expires"]?.stringValue != nil)
                let during = try #require(events.first { $0["event"] == "myapp.after-login" })
                #expect(during["actor"]?["token"] != nil)
                #expect(during["session"] == login["session"])
                // logout is emitted as the token's actor; afterwards the session is its peer's again.
                let logout = try #require(events.first { $0["event"] == "logout" && $0["session"] == login["session"] })
                #expect(logout["actor"]?["token"] != nil)
                let after = try #require(events.first { $0["event"] == "myapp.after-logout" })
                #expect(after["actor"]?["token"] == nil)
                #expect(after["actor"]?["id"] == login["actor"]?["id"])
            }
        }
    }

    @Test("logout goes back to the peer actor: what the token forbade is allowed again")
    func logoutRestoresPeer() async throws {
        try await withRunningDaemon { daemon in
            let token = try await createToken(daemon, ["restrict_all": ["view-table"]])
            try await daemon.withClient { evd in
                try await evd.login(token: token)
                let denied = try await evd.expectError("emit", ["event": "myapp.x"])
                #expect(denied.code == "permission_denied")
                let result = try await evd.request("logout")
                #expect(result == [:])
                let emitted = try await evd.request("emit", ["event": "myapp.x"])
                #expect(emitted["seq"] != nil)
            }
        }
    }

    // MARK: Narrowing

    @Test("a token with restrict_all [view-table] cannot execute an INSERT or emit: permission_denied")
    func restrictAllNarrows() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
            let token = try await createToken(daemon, ["restrict_all": ["view-table"]])
            try await daemon.withClient { evd in
                try await evd.login(token: token)
                let insert = try await evd.expectError("execute", ["sql": "insert into dogs(name) values ('Rex')"])
                #expect(insert.code == "permission_denied")
                let emit = try await evd.expectError("emit", ["event": "myapp.x"])
                #expect(emit.code == "permission_denied")
                #expect(emit.extra["action"] == "emit")
                let minted = try await evd.expectError("create_token", [:])
                #expect(minted.code == "permission_denied")
                // What needs no permission still works.
                let pong = try await evd.request("ping")
                #expect(pong == [:])
            }
            let rows = try await daemon.request(.execute(.init(sql: "select count(*) from dogs")))
            #expect(rows["rows"] == [[0]])
        }
    }

    @Test("a token made by a token's session carries its maker's restrictions too, and expires no later")
    func tokenFromTokenNarrowsFurther() async throws {
        try await withRunningDaemon { daemon in
            let outer = try await createToken(daemon, ["restrict_all": ["create-token", "emit"], "expires_after": 3600])
            let (inner, outerExpiry) = try await daemon.withClient { evd in
                let actor = try await evd.login(token: outer)
                let expiry = try #require(actor["token"]?["expires"]?.stringValue)
                // Asking for more than the maker holds, and no expiry, gives a token that still
                // cannot do more, and expires with its maker.
                let result = try await evd.request("create_token", ["restrict_all": ["subscribe", "emit"]])
                return (try #require(result["token"]?.stringValue), expiry)
            }
            try await daemon.withClient { evd in
                let actor = try await evd.login(token: inner)
                #expect(actor["token"]?["expires"] == .string(outerExpiry))
                let subscribe = try await evd.expectError("subscribe", ["events": ["login"]])
                #expect(subscribe.code == "permission_denied")
                let emitted = try await evd.request("emit", ["event": "myapp.inner"])
                #expect(emitted["seq"] != nil)
                let minted = try await evd.expectError("create_token", [:])
                #expect(minted.code == "permission_denied")
            }
        }
    }

    @Test("restrict_database and restrict_resource: allowed only where named, and every set of a token's chain must allow")
    func restrictDatabaseAndResource() async throws {
        let authority = TokenAuthority(key: SymmetricKey(size: .bits256))
        let request = EvdOperation.CreateToken(
            restrictDatabase: ["main": ["view-table", "insert-row"]],
            restrictResource: ["other": ["dogs": ["delete-row"]]]
        )
        let (restrictions, given) = try TokenRestrictions.parse(request)
        #expect(given == "restrict_database")
        let root = Actor(uid: 0, gid: 0, pid: 1, user: "root")
        let token = authority.sign(TokenPayload(actor: root, restrictions: [restrictions], created: 0, expires: nil))
        let actor = try authority.verify(token, now: 10).actor(pid: 42)
        #expect(actor.pid == 42)
        let permissions = Permissions(ownerUID: 12345)
        let main = Resource(database: "main")
        let dogs = Resource(database: "main", table: "dogs")
        let otherDogs = Resource(database: "other", table: "dogs")
        #expect(permissions.allows(actor, .insertRow, on: main))
        #expect(permissions.allows(actor, .insertRow, on: dogs))
        #expect(!permissions.allows(actor, .deleteRow, on: dogs))
        #expect(permissions.allows(actor, .deleteRow, on: otherDogs))
        #expect(!permissions.allows(actor, .deleteRow, on: Resource(database: "other", table: "cats")))
        #expect(!permissions.allows(actor, .insertRow, on: otherDogs))
        #expect(!permissions.allows(actor, .emit))
        #expect(!permissions.isUnrestricted(actor))
        // A second set (a token made from this one's session) narrows further.
        var narrower = actor
        narrower.restrictions.append(TokenRestrictions(all: [.viewTable]))
        #expect(permissions.allows(narrower, .viewTable, on: dogs))
        #expect(!permissions.allows(narrower, .insertRow, on: dogs))

        // On the wire: a database-restricted token cannot do daemon-wide actions.
        try await withRunningDaemon { daemon in
            let token = try await createToken(daemon, ["restrict_database": ["main": ["view-table"]]])
            let resourceToken = try await createToken(daemon, ["restrict_resource": ["main": ["dogs": ["insert-row"]]]])
            for token in [token, resourceToken] {
                try await daemon.withClient { evd in
                    try await evd.login(token: token)
                    let emit = try await evd.expectError("emit", ["event": "myapp.x"])
                    #expect(emit.code == "permission_denied")
                    let stats = try await evd.expectError("stats")
                    #expect(stats.code == "permission_denied")
                }
            }
        }
    }

    @Test("restrict_database and restrict_resource narrow raw SQL and structured ops table by table")
    func restrictionsEndToEnd() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
            try await daemon.request(.execute(.init(sql: "create table cats(id integer primary key, name text)")))
            let token = try await createToken(
                daemon,
                [
                    "restrict_database": ["main": ["execute-sql", "view-table"]],
                    "restrict_resource": ["main": ["dogs": ["insert-row"]]],
                ]
            )
            try await daemon.withClient { evd in
                try await evd.login(token: token)
                try await evd.request(.execute(.init(sql: "insert into dogs(name) values ('Rex')")))
                try await evd.request("insert", ["table": "dogs", "rows": [["name": "Fido"]]])
                let rows = try await evd.request(.execute(.init(sql: "select count(*) from dogs")))
                #expect(rows["rows"] == [[2]])
                _ = try await evd.request(.execute(.init(sql: "select * from cats")))
                let raw = try await evd.expectError("execute", ["sql": "insert into cats(name) values ('Tom')"])
                #expect(raw.code == "permission_denied")
                #expect(raw.extra["table"] == "cats")
                let structured = try await evd.expectError("insert", ["table": "cats", "rows": [["name": "Tom"]]])
                #expect(structured.extra["action"] == "insert-row")
                let delete = try await evd.expectError("execute", ["sql": "delete from dogs"])
                #expect(delete.extra["action"] == "delete-row")
            }
        }
    }

    @Test("create_token checks every argument: bad_request naming the field")
    func createTokenValidation() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                let cases: [(JSONObject, String)] = [
                    (["expires_after": 0], "expires_after"),
                    (["expires_after": -5], "expires_after"),
                    (["expires_after": "60"], "expires_after"),
                    (["expires_after": 1.5], "expires_after"),
                    (["restrict_all": ["fly"]], "restrict_all"),
                    (["restrict_all": "view-table"], "restrict_all"),
                    (["restrict_all": [1]], "restrict_all"),
                    (["restrict_all": []], "restrict_all"),
                    (["restrict_database": ["main": ["fly"]]], "restrict_database.main"),
                    (["restrict_database": ["main": "view-table"]], "restrict_database.main"),
                    (["restrict_database": ["main"]], "restrict_database"),
                    (["restrict_resource": ["main": ["dogs": ["fly"]]]], "restrict_resource.main.dogs"),
                    (["restrict_resource": ["main": ["view-table"]]], "restrict_resource.main"),
                    (["restrict_resource": ["main": ["dogs": []]]], "restrict_resource"),
                    (["restrict_everything": ["view-table"]], "restrict_everything"),
                ]
                for (arguments, field) in cases {
                    let error = try await evd.expectError("create_token", arguments)
                    #expect(error.code == "bad_request", "\(arguments)")
                    #expect(error.extra["field"] == .string(field), "\(arguments): \(error)")
                }
                let login = try await evd.expectError("login", [:])
                #expect(login.code == "bad_request")
                #expect(login.extra["field"] == "token")
                let typed = try await evd.expectError("login", ["token": 5])
                #expect(typed.extra["field"] == "token")
            }
        }
    }

    // MARK: Expiry, forgery

    @Test(
        "expiry: a token with expires_after 1 gets token_expired at login once it has expired, and a session logged in with a token gets token_expired on its next request once it expires"
    )
    func expiry() async throws {
        try await withRunningDaemon { daemon in
            let token = try await createToken(daemon, ["expires_after": 1])
            try await Task.sleep(for: .milliseconds(2100))
            try await daemon.withClient { evd in
                let error = try await evd.expectError("login", ["token": .string(token)])
                #expect(error.code == "token_expired")
                // The failed login left the session as it was.
                let rows = try await evd.request(.execute(.init(sql: "select 1")))
                #expect(rows["rows"] == [[1]])
            }
            try await daemon.withClient { evd in
                let expires = try await loginExpiring(daemon, evd, after: 2)
                let pong = try await evd.request("ping")
                #expect(pong == [:])
                try await Task.sleep(until: expires + .milliseconds(100))
                let error = try await evd.expectError("execute", ["sql": "select 1"])
                #expect(error.code == "token_expired")
                let stillPong = try await evd.request("ping")
                #expect(stillPong == [:])
                // logout gets the session out of it.
                try await evd.request("logout")
                let rows = try await evd.request(.execute(.init(sql: "select 1")))
                #expect(rows["rows"] == [[1]])
            }
        }
    }

    @Test("expiry: a session that subscribed under a token is closed when the token expires")
    func expiryEndsSubscriptions() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.withClient { evd in
                var subscribed = false
                // A stalled machine may let the short token expire before the subscription is made.
                for _ in 0..<5 where !subscribed {
                    _ = try await loginExpiring(daemon, evd, after: 3)
                    subscribed = (try? await subscribeEvents(evd, ["myapp.*"])) != nil
                }
                try #require(subscribed)
                // The connection ends within about a second of the expiry (no event is expected:
                // on a stalled machine the token may expire before one could be delivered).
                let ended = await firstValue(within: 15) { () async -> Bool? in
                    while await evd.nextMessage() != nil {}
                    return true
                }
                #expect(ended == true)
            }
        }
    }

    @Test("forgery: a changed payload, a changed signature, another secret's token and garbage all get token_invalid")
    func forgery() async throws {
        try await withRunningDaemon { daemon in
            let token = try await createToken(daemon, ["restrict_all": ["view-table"]])
            let dot = try #require(token.firstIndex(of: "."))
            let payloadPart = String(token[token.index(token.startIndex, offsetBy: 4)..<dot])
            let signature = String(token[token.index(after: dot)...])
            // The payload with its restrictions removed, signed with the same signature.
            let payloadJSON = try #require(Base64URL.decode(Array(payloadPart.utf8)))
            var payload = try #require(try JSONValue(parsing: payloadJSON).objectValue)
            payload["restrictions"] = []
            let widened = "evd_" + Base64URL.encode(JSONValue.object(payload).jsonBytes) + "." + signature
            func flip(_ text: String, at offset: Int) -> String {
                var bytes = Array(text.utf8)
                bytes[offset] = bytes[offset] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
                return String(decoding: bytes, as: UTF8.self)
            }
            let otherSecret = TokenAuthority(key: SymmetricKey(size: .bits256)).sign(
                TokenPayload(actor: Actor(uid: 0, gid: 0, pid: 1, user: "root"), restrictions: [], created: 0, expires: nil)
            )
            let forged: [String] = [
                widened,
                flip(token, at: 10),  // a payload byte
                flip(token, at: token.utf8.count - 1),  // the signature's last character
                flip(token, at: token.utf8.count - 20),
                "evd_" + payloadPart + ".",
                "evd_" + payloadPart,
                String(token.dropFirst(4)),
                token + "A",
                token + ".x",
                otherSecret,
                "garbage", "", "evd_", "evd_.", "evd_!!!.???",
            ]
            try await daemon.withClient { evd in
                for candidate in forged {
                    let error = try await evd.expectError("login", ["token": .string(candidate)])
                    #expect(error.code == "token_invalid", "\(candidate)")
                }
                // Still the peer's session: nothing was switched.
                let emitted = try await evd.request("emit", ["event": "myapp.still-me"])
                #expect(emitted["seq"] != nil)
                // The genuine one works.
                let actor = try await evd.login(token: token)
                #expect(actor["token"] != nil)
            }
        }
    }

    // MARK: Restarts, the secret file

    @Test("tokens survive a restart of the daemon on the same state directory")
    func survivesRestart() async throws {
        try await withTemporaryDirectory { directory in
            let token = try await withDaemon(in: directory) { daemon, _ in
                try await createToken(daemon, ["restrict_all": ["emit"]])
            }
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    let actor = try await evd.login(token: token)
                    #expect(actor["token"] != nil)
                    let emitted = try await evd.request("emit", ["event": "myapp.after-restart"])
                    #expect(emitted["seq"] != nil)
                }
            }
            // Deleting the secret revokes every token: the next start makes a new one.
            unlink(directory + "/state/token-secret")
            try await withDaemon(in: directory) { daemon, _ in
                try await daemon.withClient { evd in
                    let error = try await evd.expectError("login", ["token": .string(token)])
                    #expect(error.code == "token_invalid")
                }
            }
        }
    }

    @Test("the secret is 32 bytes in STATE_DIR/token-secret with mode 0600; a secret others can read stops evd from starting")
    func secretFile() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/state/token-secret"
            try await withDaemon(in: directory) { _, _ in }
            var info = stat()
            #expect(stat(path, &info) == 0)
            #expect(info.st_mode & 0o777 == 0o600)
            #expect(info.st_size == 32)
            #expect(!FileManager.default.fileExists(atPath: path + ".new"))
            let first = try #require(FileManager.default.contents(atPath: path))
            try await withDaemon(in: directory) { _, _ in }
            #expect(FileManager.default.contents(atPath: path) == first)

            for (mode, reason) in [(mode_t(0o644), "others may read"), (0o640, "others may read"), (0o604, "others may read")] {
                chmod(path, mode)
                await #expect {
                    try await withDaemon(in: directory) { _, _ in }
                } throws: { error in
                    "\(error)".contains(reason) && "\(error)".contains("token-secret")
                }
            }
            chmod(path, 0o600)
            // A secret of the wrong size is refused too.
            let handle = try #require(FileHandle(forWritingAtPath: path))
            try handle.truncate(atOffset: 16)
            try handle.close()
            await #expect {
                try await withDaemon(in: directory) { _, _ in }
            } throws: { error in
                "\(error)".contains("16 bytes")
            }
        }
    }

    // MARK: Events and logs

    @Test("create-token emits its arguments (never the token), and no event or log line carries the token")
    func createTokenEvent() async throws {
        let records = LogRecords()
        let logger = Logger(label: "evd-test") { _ in RecordingLogHandler(records: records) }
        try await withTemporaryDirectory { directory in
            try await withDaemon(in: directory, logger: logger) { daemon, _ in
                try await daemon.withClient { listener in
                    _ = try await subscribeEvents(listener, ["*"])
                    let arguments: JSONObject = [
                        "expires_after": 600, "restrict_all": ["view-table", "emit"],
                        "restrict_database": ["main": ["insert-row"]],
                        "restrict_resource": ["main": ["dogs": ["delete-row"]]],
                    ]
                    let token = try await createToken(daemon, arguments)
                    let plain = try await createToken(daemon, [:])
                    try await daemon.withClient { evd in
                        try await evd.login(token: token)
                        try await evd.request("emit", ["event": "myapp.done", "data": ["ok": true]])
                        _ = try await evd.expectError("login", ["token": .string(token + "x")])
                    }
                    let events = try await collectEvents(listener, until: "myapp.done")
                    let created = events.filter { $0["event"] == "create-token" }
                    #expect(created.count == 2)
                    let first = try #require(created.first)
                    #expect(first["expires_after"] == 600)
                    #expect(first["restrict_all"] == ["emit", "view-table"])
                    #expect(first["restrict_database"] == ["main": ["insert-row"]])
                    #expect(first["restrict_resource"] == ["main": ["dogs": ["delete-row"]]])
                    #expect(first["token"] == nil)
                    #expect(first["seq"]?.intValue != nil)
                    let second = try #require(created.last)
                    #expect(second["expires_after"] == .null)
                    #expect(second["restrict_all"] == [])
                    #expect(second["restrict_database"] == [:])
                    #expect(second["restrict_resource"] == [:])
                    for event in events {
                        let text = String(decoding: JSONValue.object(event).jsonBytes, as: UTF8.self)
                        for secret in [token, plain] {
                            #expect(!text.contains(secret))
                            #expect(!text.contains(String(secret.split(separator: ".")[1])))
                        }
                    }
                    // The journal keeps no token either.
                    let replayed = try await daemon.withClient { evd in
                        _ = try await subscribeEvents(evd, ["create-token", "login"], ["since": 0])
                        return try await collectEvents(evd, until: "create-token", occurrence: 2)
                    }
                    #expect(replayed.filter { $0["event"] == "create-token" }.count == 2)
                    for event in replayed {
                        #expect(!String(decoding: JSONValue.object(event).jsonBytes, as: UTF8.self).contains(token))
                    }
                    let secret = try #require(FileManager.default.contents(atPath: directory + "/state/token-secret"))
                    let secretText = Base64URL.encode(Array(secret))
                    let lines = records.all
                    #expect(!lines.isEmpty)
                    for line in lines {
                        for needle in [token, plain, String(token.split(separator: ".")[1]), secretText] {
                            #expect(!line.contains(needle), "\(line)")
                        }
                    }
                }
            }
        }
    }

    // MARK: CLIs

    @Test("evctl token create prints a token; evctl --token and EVD_TOKEN log in with it; evtail --token too")
    func cliTokens() async throws {
        try await withRunningDaemon { daemon in
            let env = ["EVD_SOCKET": daemon.socketPath]
            let created = try await runProcess(
                self.evctl,
                [
                    "token", "create", "--expires-after", "600", "--restrict-all", "view-table", "--restrict-all", "subscribe",
                    "--restrict-database", "main:insert-row", "--restrict-resource", "main:dogs:delete-row",
                ],
                environment: env
            )
            #expect(created.status == 0, "\(created.stderr)")
            let token = created.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(token.hasPrefix("evd_"))
            #expect(!token.contains("\n"))

            // With the token (as an option before or after the subcommand, or from the environment),
            // emit is denied.
            for (arguments, environment) in [
                (["--token", token, "emit", "myapp.x"], env),
                (["emit", "myapp.x", "--token", token], env),
                (["emit", "myapp.x"], env.merging(["EVD_TOKEN": token]) { $1 }),
            ] {
                let denied = try await runProcess(self.evctl, arguments, environment: environment)
                #expect(denied.status == 1, "\(arguments)")
                #expect(denied.stderr.contains("permission_denied"), "\(arguments): \(denied.stderr)")
            }
            let plain = try await runProcess(self.evctl, ["emit", "myapp.x"], environment: env)
            #expect(plain.status == 0, "\(plain.stderr)")
            let ping = try await runProcess(self.evctl, ["--token", token, "ping"], environment: env)
            #expect(ping.status == 0, "\(ping.stderr)")
            // A token that narrows further, made with a token; a bad token is reported.
            let nested = try await runProcess(self.evctl, ["--token", token, "token", "create"], environment: env)
            #expect(nested.status == 1)
            #expect(nested.stderr.contains("permission_denied"))
            let bad = try await runProcess(self.evctl, ["ping"], environment: env.merging(["EVD_TOKEN": "evd_nope.nope"]) { $1 })
            #expect(bad.status == 1)
            #expect(bad.stderr.contains("token_invalid"))
            let badAction = try await runProcess(self.evctl, ["token", "create", "--restrict-all", "fly"], environment: env)
            #expect(badAction.status == 1)
            #expect(badAction.stderr.contains("restrict_all"))
            let badShape = try await runProcess(self.evctl, ["token", "create", "--restrict-database", "main"], environment: env)
            #expect(badShape.status != 0)

            // evtail subscribes as the token: subscribe is allowed, and its login event shows it.
            let tail = try Spawned(
                self.evtail,
                ["--socket", daemon.socketPath, "--count", "1", "myapp.*"],
                environment: ["EVD_TOKEN": token]
            )
            try await waitForSubscriptions(daemon, atLeast: 1)
            try await daemon.request("emit", ["event": "myapp.seen"])
            let result = try await tail.finish()
            #expect(result.status == 0, "\(result.stderr)")
            #expect(jsonLines(result.stdout).first?["event"] == "myapp.seen")
            let emitToken = try await createToken(daemon, ["restrict_all": ["emit"]])
            let refused = try await runProcess(self.evtail, ["--socket", daemon.socketPath, "--token", emitToken, "--count", "1", "*"])
            #expect(refused.status == 1)
            #expect(refused.stderr.contains("permission_denied"))
        }
    }
}

/// Logs `evd` in with a fresh token that expires after `seconds`, trying again (a few times) when a
/// stalled machine lets it expire before the login; returns when it will have expired for sure.
func loginExpiring(_ daemon: RunningDaemon, _ evd: EvdConnection, after seconds: Int64) async throws -> ContinuousClock.Instant {
    for _ in 0..<5 {
        let token = try await createToken(daemon, ["expires_after": .int(seconds)])
        // The expiry is ceil(creation time + seconds): at most a second past now + seconds.
        let expired = ContinuousClock.now + .seconds(seconds) + .seconds(1)
        do {
            try await evd.login(token: token)
            return expired
        } catch let error as EvdError where error.code == "token_expired" {
            continue
        }
    }
    throw EvdError(.timeout, "the machine is too slow to log in within \(seconds) s")
}

/// Creates a token on a fresh connection (as the test's own uid).
func createToken(_ daemon: RunningDaemon, _ arguments: JSONObject) async throws -> String {
    let result = try await daemon.request("create_token", arguments)
    return try #require(result["token"]?.stringValue)
}

/// Every log line a `RecordingLogHandler` saw, message and metadata.
final class LogRecords: Sendable {
    private let lines = Mutex<[String]>([])
    func append(_ line: String) { self.lines.withLock { $0.append(line) } }
    var all: [String] { self.lines.withLock { $0 } }
}

/// Records every log line, at every level, as text.
struct RecordingLogHandler: LogHandler {
    let records: LogRecords
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { self.metadata[key] }
        set { self.metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let all = self.metadata.merging(event.metadata ?? [:]) { $1 }
        self.records.append("\(event.level) \(event.message) \(all)")
    }
}
