import EvdClient
import Foundation
import Logging
import ServiceLifecycle
import Testing

@testable import EvdDaemon

// Attacks on evd's files, directories and sockets by another local user (nobody, 65534, through
// `setpriv`), and on its metrics endpoint by anyone who may connect to it.

/// Runs the system Python `script` (its arguments after it) as nobody.
func asNobodyPython(_ script: String, _ arguments: [String]) throws -> Spawned {
    try Spawned(
        "/usr/bin/setpriv",
        ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script] + arguments
    )
}

/// The one JSON object a finished script printed last.
func lastJSON(_ spawned: Spawned, within seconds: Double = 60) async throws -> JSONObject {
    let result = try await spawned.finish(within: seconds)
    #expect(result.status == 0, "\(result.stderr)")
    let line = result.stdout.split(separator: "\n").last.map(String.init) ?? ""
    return try #require(try JSONValue(parsing: line).objectValue, "\(result.stdout) \(result.stderr)")
}

/// The permission bits of `path` (not following a symlink), or nil when there is nothing there.
func modeBits(_ path: String) -> mode_t? {
    var info = stat()
    return lstat(path, &info) == 0 ? info.st_mode & 0o7777 : nil
}

/// A Unix socket bound at `path` (its file made with the process's umask), not yet listening.
func boundUnixSocket(at path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
    }
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard bound == 0 else {
        let reason = String(cString: strerror(errno))
        close(fd)
        throw RawUnixSocket.Failure(description: "cannot bind \(path): \(reason)")
    }
    return fd
}

/// A listening Unix socket bound at `path` (its file made with the process's umask).
func listeningUnixSocket(at path: String) throws -> Int32 {
    let fd = try boundUnixSocket(at: path)
    guard listen(fd, 8) == 0 else {
        let reason = String(cString: strerror(errno))
        close(fd)
        throw RawUnixSocket.Failure(description: "cannot listen on \(path): \(reason)")
    }
    return fd
}

/// A file of root's, mode 0600, that an attack tries to have evd open up.
func victimFile(in directory: String) -> String {
    let victim = directory + "/victim"
    FileManager.default.createFile(atPath: victim, contents: Data("secret".utf8))
    chmod(victim, 0o600)
    return victim
}

/// Starts a daemon with `configuration` and returns why it refused to start; nil when it started
/// (it is then stopped at once).
func startupRefusal(_ configuration: EvdConfiguration) async -> String? {
    let logger = Logger(label: "evd-test", factory: { _ in SwiftLogNoOpLogHandler() })
    let daemon = Daemon(configuration: configuration, logger: logger)
    let group = ServiceGroup(services: [daemon], logger: logger)
    return await withTaskGroup(of: Void.self) { tasks in
        tasks.addTask { try? await group.run() }
        defer { tasks.cancelAll() }
        do {
            try await daemon.waitUntilReady()
            await group.triggerGracefulShutdown()
            return nil
        } catch {
            return "\(error)"
        }
    }
}

/// Waits (up to `seconds`) until `condition` holds.
func eventually(within seconds: Double = 30, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(50))
    }
    return try await condition()
}

@Suite("File and socket security (another uid)")
struct FileSecurityTests {
    // MARK: 17. The metrics endpoint

    /// Opens more metrics connections than evd serves and keeps the `count` it took, each trickling
    /// a request, a byte of a header every 0.3 s (which kept an idle timer from ever firing); then
    /// scrapes on a fresh connection every 0.3 s until one
    /// gets 200 or `seconds` pass. Prints what happened.
    static let trickleThenScrape = """
        import json, socket, sys, time
        path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
        opened = []
        for _ in range(count + 8):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.setblocking(False)
            s.send(b"GET /metrics HTTP/1.1\\r\\nX-Slow: ")
            opened.append(s)
        # The connections beyond the limit are closed at once: keep those evd took (waiting, within
        # a bound, until evd has closed the 8 beyond it, however busy the machine).
        def still_open():
            kept = []
            for s in opened:
                try:
                    # Peeked, not read: an answer that came meanwhile is read whole later.
                    if s.recv(1, socket.MSG_PEEK) == b"":
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    continue
                kept.append(s)
            return kept
        settle = time.time() + 10
        held = still_open()
        while len(held) > count and time.time() < settle:
            time.sleep(0.1)
            held = still_open()
        holding = len(held)
        start = time.time()
        answers = {}
        request = b"GET /metrics HTTP/1.1\\r\\nHost: evd\\r\\n\\r\\n"
        deadline = time.time() + seconds
        scraped = None
        while time.time() < deadline and scraped is None:
            for s in list(held):
                try:
                    data = s.recv(65536)
                    if data == b"":
                        held.remove(s)
                    else:
                        answers[s.fileno()] = answers.get(s.fileno(), b"") + data
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    held.remove(s)
                    continue
                try:
                    s.send(b"a")
                except OSError:
                    # Closed by evd: what it wrote first is still to be read.
                    s.setblocking(True)
                    s.settimeout(1)
                    try:
                        while True:
                            data = s.recv(65536)
                            if not data:
                                break
                            answers[s.fileno()] = answers.get(s.fileno(), b"") + data
                    except OSError:
                        pass
                    held.remove(s)
            try:
                scraper = socket.socket(socket.AF_UNIX)
                scraper.connect(path)
                scraper.settimeout(5)
                scraper.sendall(request)
                reply = scraper.recv(65536)
                if reply.startswith(b"HTTP/1.1 200"):
                    scraped = time.time() - start
                scraper.close()
            except OSError:
                pass
            time.sleep(0.3)
        # Every held connection's answer, to its end (each is closed after its own timeout).
        drained = time.time() + 10
        for s in held:
            s.setblocking(True)
            s.settimeout(max(0.1, drained - time.time()))
            try:
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    answers[s.fileno()] = answers.get(s.fileno(), b"") + data
            except OSError:
                pass
        texts = [a.decode(errors="replace") for a in answers.values()]
        print(json.dumps({"held": holding, "scraped": scraped is not None, "after": scraped,
                          "timeouts": sum(1 for t in texts if t.startswith("HTTP/1.1 408")),
                          "sample": texts[0] if texts else ""}))
        """

    @Test("17: silent or trickling metrics connections are answered 408 and closed, so a scrape gets through")
    func metricsRequestTimeout() async throws {
        try await withTemporaryDirectory { directory in
            let metricsPath = directory + "/metrics.sock"
            try await withDaemon(
                in: directory,
                configure: {
                    openUp(&$0)
                    $0.metrics.socketPath = metricsPath
                    $0.metrics.requestTimeoutMs = 1000
                }
            ) { _, _ in
                let got = try await lastJSON(
                    try asNobodyPython(Self.trickleThenScrape, [metricsPath, String(MetricsEndpoint.maxConnections), "30"])
                )
                // (On a busy machine a connection beyond the limit may get its 408 before the accept
                // loop reaches it to close it: then it counts as held, and answered.)
                let held = got["held"]?.intValue ?? 0
                #expect(held >= Int64(MetricsEndpoint.maxConnections), "\(got)")
                #expect(got["scraped"] == true, "no scrape got through the trickling connections: \(got)")
                #expect(got["timeouts"]?.intValue == held, "every held connection is answered 408: \(got)")
                let sample = got["sample"]?.stringValue ?? ""
                #expect(sample.contains("request timeout") && sample.contains("1000 ms"), "\(sample)")
            }
        }
    }

    /// Sends `count` requests in one write and reads until the connection closes.
    static let pipeline = """
        import json, socket, sys
        path, count = sys.argv[1], int(sys.argv[2])
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(path)
        s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: evd\\r\\n\\r\\n" * count)
        data = b""
        closed = False
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except OSError:
            pass
        text = data.decode(errors="replace")
        print(json.dumps({"ok": text.count("HTTP/1.1 200"), "refused": text.count("HTTP/1.1 429"), "closed": closed,
                          "tail": text[-400:]}))
        """

    @Test("17: a connection that pipelines 40 scrapes gets a few answers, then 429, and is closed")
    func metricsPipeliningBound() async throws {
        try await withTemporaryDirectory { directory in
            let metricsPath = directory + "/metrics.sock"
            try await withDaemon(
                in: directory,
                configure: {
                    openUp(&$0)
                    $0.metrics.socketPath = metricsPath
                }
            ) { _, _ in
                let got = try await lastJSON(try asNobodyPython(Self.pipeline, [metricsPath, "40"]))
                let answered = got["ok"]?.intValue ?? 0
                #expect(answered >= 1 && answered <= Int64(MetricsEndpoint.maxPipelinedRequests), "\(got)")
                #expect(got["refused"] == 1, "\(got)")
                #expect(got["closed"] == true, "\(got)")
                #expect(got["tail"]?.stringValue?.contains("too many pipelined requests") == true, "\(got)")
            }
        }
    }

    @Test("17: stats and scrapes read running journal figures: rows slipped into the journal are not counted")
    func journalFiguresAreNotCounted() async throws {
        try await withRunningDaemon { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
            try await daemon.request("insert", ["table": "dogs", "rows": [["name": "Rex"], ["name": "Fido"]]])
            try await daemon.withClient { evd in
                let before = try await evd.request("stats")["journal"]
                // Rows written into the journal behind evd's back (below any seq it hands out, so
                // that retention leaves them be): a scrape that counted would see them.
                let forged = try await runProcess(
                    "/usr/bin/python3",
                    [
                        "-c",
                        """
                        import sqlite3, sys
                        db = sqlite3.connect(sys.argv[1])
                        db.executemany("insert into _evd_journal (seq, event, time, body) values (?, 'forged', '', x'00')",
                                       [(-i,) for i in range(1, 1001)])
                        db.commit()
                        """, daemon.databasePath,
                    ]
                )
                #expect(forged.status == 0, "\(forged.stderr)")
                let after = try await evd.request("stats")["journal"]
                // (A logout of an earlier connection may be journaled meanwhile: a few more, not 1000.)
                let added = (after?["events"]?.intValue ?? 0) - (before?["events"]?.intValue ?? 0)
                #expect(added >= 0 && added < 1000, "stats counted rows nobody journaled: \(added) more")
                #expect(after?["first_seq"] == before?["first_seq"])
                #expect((after?["first_seq"]?.intValue ?? 0) > 0)
            }
        }
    }

    @Test("17: the running journal figures follow retention exactly")
    func journalFiguresFollowRetention() async throws {
        try await withRunningDaemon(configure: {
            $0.journal.keepEvents = 10
            $0.journal.pruneIntervalMs = 50
        }) { daemon in
            try await daemon.request(.execute(.init(sql: "create table dogs(id integer primary key, name text)")))
            for index in 0..<30 {
                try await daemon.request("insert", ["table": "dogs", "rows": [["name": .string("dog \(index)")]]])
            }
            try await daemon.request("insert", ["table": "dogs", "rows": .array((0..<50).map { _ in ["name": "pup"] })])
            // One connection from here on: its requests journal nothing, so retention settles.
            try await daemon.withClient { evd in
                var seen: [Int64] = []
                let settled = try await eventually {
                    let stats = try await evd.request("stats")
                    // Retention runs per window: main's changes have a floor of their own.
                    let main = stats["journal"]?["sources"]?.arrayValue?.first { $0["database"] == "main" }
                    let floor = main?["floor"]?.intValue ?? -1
                    let held = try await evd.request(
                        "execute",
                        [
                            "sql": .string(
                                "select coalesce(sum(seq - max(case when first > 0 then first else seq end, \(floor) + 1) + 1), 0), min(max(case when first > 0 then first else seq end, \(floor) + 1)) from _evd_journal where seq > \(floor)"
                            )
                        ]
                    )
                    let row = held["rows"]?.arrayValue?.first?.arrayValue
                    let again = try await evd.request("stats")["journal"]?["sources"]?.arrayValue?
                        .first { $0["database"] == "main" }?["floor"]?.intValue
                    seen = [
                        floor, main?["events"]?.intValue ?? -1, row?.first?.intValue ?? -2,
                        main?["first_seq"]?.intValue ?? -1, row?.last?.intValue ?? -2,
                    ]
                    return floor > 0 && again == floor && seen[1] == seen[2] && seen[3] == seen[4]
                }
                #expect(settled, "the running figures never matched the journal: [floor, events, held, first_seq, held's first] \(seen)")
            }
        }
    }

    // MARK: 18. The socket's directory

    /// As nobody: makes `directory` (mode 0777) and, if `serve`, listens there on `evd.sock` like
    /// evd (a hello), printing every line a client sends, until `seconds` pass.
    static let impostor = """
        import json, os, socket, sys, time
        directory, serve, seconds = sys.argv[1], sys.argv[2] == "serve", float(sys.argv[3])
        os.mkdir(directory)
        os.chmod(directory, 0o777)
        received = []
        if serve:
            s = socket.socket(socket.AF_UNIX)
            s.bind(directory + "/evd.sock")
            os.chmod(directory + "/evd.sock", 0o777)
            s.listen(8)
            s.settimeout(0.2)
            deadline = time.time() + seconds
            while time.time() < deadline:
                try:
                    c, _ = s.accept()
                except socket.timeout:
                    continue
                c.settimeout(2)
                c.sendall(b'{"type":"hello","server":"evd","version":"0","protocol":1,"session":1}\\n')
                try:
                    received.append(c.recv(65536).decode(errors="replace"))
                except OSError:
                    pass
                c.close()
        print(json.dumps({"received": received}))
        """

    @Test("18: /tmp/evd-$UID made by another user: evd refuses to serve there, evctl refuses to connect there")
    func defaultSocketDirectoryOfAnotherUser() async throws {
        // A victim uid of its own for this run: its /tmp/evd-UID must not exist yet.
        let victim = (42_000..<43_000).lazy.map { UInt32($0) }.first { access("/tmp/evd-\($0)", F_OK) != 0 }!
        let directory = "/tmp/evd-\(victim)"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try await withTemporaryDirectory { home in
            chown(home, victim, victim)
            let asVictim = ["--reuid=\(victim)", "--regid=\(victim)", "--clear-groups", "/usr/bin/env", "-i", "PATH=/usr/bin:/bin"]

            // The directory exists before evd starts, the attacker's, mode 0777.
            var made = try await lastJSON(try asNobodyPython(Self.impostor, [directory, "", "0"]))
            #expect(made["received"] == [])
            let evd = try Spawned(
                "/usr/bin/setpriv",
                asVictim + [binaryPath("evd"), "--state-dir", home + "/state", "--db", "main=\(home)/main.db"]
            )
            let refused = try await evd.finish(within: 30)
            #expect(refused.status == 1)
            #expect(
                refused.stderr.contains("refusing the socket directory \(directory): it belongs to uid 65534"),
                "\(refused.stderr)"
            )
            try FileManager.default.removeItem(atPath: directory)

            // The attacker serves there: evctl (default path, and the same path named) sends it nothing.
            let impostor = try asNobodyPython(Self.impostor, [directory, "serve", "6"])
            #expect(await eventually { access(directory + "/evd.sock", F_OK) == 0 })
            let viaDefault = try await runProcess(
                "/usr/bin/setpriv",
                asVictim + ["EVD_TOKEN=evd_secret-of-the-victim", binaryPath("evctl"), "ping"]
            )
            #expect(viaDefault.status == 69)
            #expect(viaDefault.stderr.contains("refusing the socket directory \(directory)"), "\(viaDefault.stderr)")
            let named = try await runProcess(
                "/usr/bin/setpriv",
                asVictim + ["EVD_TOKEN=evd_secret-of-the-victim", binaryPath("evctl"), "--socket", directory + "/evd.sock", "ping"]
            )
            #expect(named.status == 69)
            #expect(named.stderr.contains("refusing the socket directory \(directory)"), "\(named.stderr)")
            made = try await lastJSON(impostor)
            #expect(made["received"] == [], "the impostor got: \(made)")
            try FileManager.default.removeItem(atPath: directory)

            // Without the attacker, evd makes the directory its own (0700) and evctl reaches it.
            let serving = try Spawned(
                "/usr/bin/setpriv",
                asVictim + [binaryPath("evd"), "--state-dir", home + "/state", "--db", "main=\(home)/main.db"]
            )
            defer { serving.process.terminate() }
            #expect(await eventually { access(directory + "/evd.sock", F_OK) == 0 })
            #expect(modeBits(directory) == 0o700)
            let ping = try await runProcess("/usr/bin/setpriv", asVictim + [binaryPath("evctl"), "ping"])
            #expect(ping.status == 0, "\(ping.stderr)")
            serving.process.terminate()
            let stopped = try await serving.finish(within: 30)
            #expect(stopped.status == 0, "\(stopped.stderr)")
        }
    }

    @Test("18: a client refuses a named socket in a directory others can write (and not sticky)")
    func namedSocketInAnOpenDirectory() async throws {
        try await withTemporaryDirectory { directory in
            chmod(directory, 0o777)  // so that nobody may make its directory there
            let shared = directory + "/shared"
            let impostor = try asNobodyPython(Self.impostor, [shared, "serve", "4"])
            #expect(await eventually { access(shared + "/evd.sock", F_OK) == 0 })
            do {
                try await EvdConnection.withConnection(socketPath: shared + "/evd.sock", token: "evd_secret") { _ in }
                Issue.record("connected to a socket in a directory anyone may write")
            } catch {
                #expect(
                    "\(error)".contains("refusing the socket directory \(shared): its mode 0777 (owner uid 65534)"),
                    "\(error)"
                )
            }
            let got = try await lastJSON(impostor)
            #expect(got["received"] == [], "the impostor got: \(got)")
        }
    }

    @Test("18: a state or socket directory another user made or can write stops evd, naming it")
    func daemonDirectoriesOfAnotherUser() async throws {
        try await withTemporaryDirectory { directory in
            chmod(directory, 0o755)
            func start(_ configure: (inout EvdConfiguration) -> Void) async -> String? {
                var configuration = EvdConfiguration(
                    socketPath: directory + "/run/evd.sock",
                    databases: [DatabaseConfig(name: "main", path: directory + "/main.db")],
                    stateDirectory: directory + "/state"
                )
                configure(&configuration)
                return await startupRefusal(configuration)
            }
            // Made by nobody before evd's first start.
            chmod(directory, 0o777)
            let made = try await runProcess(
                "/usr/bin/setpriv",
                ["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/mkdir", "-m", "755", directory + "/state", directory + "/run"]
            )
            #expect(made.status == 0, "\(made.stderr)")
            chmod(directory, 0o755)
            let state = await start { _ in }
            #expect(
                state?.contains("refusing the state directory \(directory)/state: it belongs to uid 65534") == true,
                "\(state ?? "started")"
            )
            #expect(access(directory + "/state/token-secret", F_OK) != 0)
            let socket = await start { $0.stateDirectory = directory + "/own-state" }
            #expect(
                socket?.contains("refusing the socket directory \(directory)/run: it belongs to uid 65534") == true,
                "\(socket ?? "started")"
            )
            // Root's, but anyone may write it (and it is not sticky).
            mkdir(directory + "/open", 0o777)
            chmod(directory + "/open", 0o777)
            let open = await start { $0.stateDirectory = directory + "/open" }
            #expect(open?.contains("refusing the state directory \(directory)/open: its mode 0777") == true, "\(open ?? "started")")
        }
    }

    // MARK: 19. The socket's mode

    @Test("19: a symlink swapped in at the socket's path while evd binds never gets the socket's mode; the socket does")
    func socketModeNeverFollowsASymlink() async throws {
        try await withTemporaryDirectory { directory in
            chmod(directory, 0o755)
            // A directory the attacker may write (not sticky), and a file of root's it wants opened up.
            let shared = directory + "/shared"
            mkdir(shared, 0o777)
            chmod(shared, 0o777)
            let victim = victimFile(in: directory)
            let path = shared + "/evd.sock"
            let swap = """
                import os, sys
                path, target = sys.argv[1], sys.argv[2]
                if os.path.lexists(path):
                    os.unlink(path)
                os.symlink(target, path)
                """
            let server = try await Daemon.bindSocketFile(at: path, mode: 0o660) { bindPath in
                let fd = try listeningUnixSocket(at: bindPath)
                // The attacker's move, at the worst moment: the socket is bound, its mode not yet set.
                let swapped = try await asNobodyPython(swap, [path, victim]).finish(within: 30)
                #expect(swapped.status == 0, "\(swapped.stderr)")
                return fd
            } close: { fd in
                close(fd)
            }
            defer { close(server) }
            #expect(modeBits(victim) == 0o600, "the victim's mode changed")
            var info = stat()
            #expect(lstat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK, "no socket at \(path)")
            #expect(modeBits(path) == 0o660)
            // The socket at the path is the one bound: it takes a connection.
            let client = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(client) }
            #expect(connectUnixSocket(client, to: path) == 0)
            // Nothing of the private directory it was bound in is left.
            let left = try FileManager.default.contentsOfDirectory(atPath: shared).filter { $0.hasPrefix(".evd-") }
            #expect(left.isEmpty, "\(left)")
        }
    }

    @Test("19: evd's socket gets --socket-mode whatever the umask, and a symlink placed at its path stops the start")
    func daemonSocketMode() async throws {
        try await withRunningDaemon(configure: { openUp(&$0, socketMode: 0o660) }) { daemon in
            #expect(modeBits(daemon.socketPath) == 0o660)
        }
        try await withTemporaryDirectory { directory in
            chmod(directory, 0o755)
            let sticky = directory + "/sticky"
            mkdir(sticky, 0o777)
            chmod(sticky, 0o1777)
            let victim = victimFile(in: directory)
            let placed = try await runProcess(
                "/usr/bin/setpriv",
                ["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/ln", "-s", victim, sticky + "/evd.sock"]
            )
            #expect(placed.status == 0, "\(placed.stderr)")
            var configuration = EvdConfiguration(
                socketPath: sticky + "/evd.sock",
                databases: [DatabaseConfig(name: "main", path: directory + "/main.db")],
                stateDirectory: directory + "/state"
            )
            configuration.socketMode = 0o666
            let refusal = await startupRefusal(configuration)
            #expect(refusal?.contains("exists and is not a socket") == true, "\(refusal ?? "evd started over a symlink")")
            #expect(modeBits(victim) == 0o600)
        }
    }

    // MARK: 20. Database and state files

    /// As nobody: tries to open each path for reading; prints what happened to each.
    static let readEach = """
        import json, sys
        result = {}
        for path in sys.argv[1:]:
            try:
                with open(path, "rb") as f:
                    f.read(16)
                result[path] = "read"
            except FileNotFoundError:
                result[path] = "missing"
            except PermissionError:
                result[path] = "denied"
        print(json.dumps(result))
        """

    @Test("20: under umask 022 the databases, their WAL and shm, the journal and the state files are 0600: nobody reads them")
    func databaseFilesArePrivate() async throws {
        try await withTemporaryDirectory { directory in
            // Every directory on the way is open to others: only the files' own modes protect them.
            chmod(directory, 0o755)
            let socket = directory + "/evd.sock"
            let state = directory + "/state"
            // An existing database file evd owns, made world-readable: narrowed at start.
            let other = directory + "/other.db"
            FileManager.default.createFile(atPath: other, contents: Data())
            chmod(other, 0o644)
            let evd = try Spawned(
                "/bin/sh",
                [
                    "-c", "umask 022; exec \"$0\" \"$@\"", binaryPath("evd"), "--socket", socket, "--db", "main=\(directory)/main.db",
                    "--db", "other=\(other)", "--state-dir", state,
                ]
            )
            defer { evd.process.terminate() }
            let up = await eventually { access(socket, F_OK) == 0 }
            #expect(up, "evd did not start")
            try await EvdConnection.withConnection(socketPath: socket) { evd in
                _ = try await evd.request(.execute(.init(sql: "create table secrets(id integer primary key, words text)")))
                _ = try await evd.request("insert", ["table": "secrets", "rows": [["words": "the committed secret"]]])
                _ = try await evd.request("execute", ["sql": "create table more(x)", "database": "other"])
                _ = try await evd.request("emit", ["event": "app.secret", "data": ["words": "a journaled secret"]])
                _ = try await evd.request("create_token", [:])
                // evd made the state directory 0700; open it up to see the files' own modes.
                chmod(state, 0o755)
                let files = [
                    "main.db", "main.db-wal", "main.db-shm", "other.db", "other.db-wal", "state/journal.db",
                    "state/journal.db-wal", "state/journal.db-shm", "state/twophase.db", "state/token-secret",
                ].map { directory + "/" + $0 }
                let got = try await lastJSON(try asNobodyPython(Self.readEach, files))
                for file in files {
                    #expect(got[file] == "denied", "\(file): \(got[file] ?? nil)")
                    #expect(modeBits(file) == 0o600, "\(file): mode \(String(modeBits(file) ?? 0, radix: 8))")
                }
            }
            evd.process.terminate()
            let stopped = try await evd.finish(within: 30)
            #expect(stopped.status == 0, "\(stopped.stderr)")
            #expect(stopped.stderr.contains("a database file was readable by other users: its mode is now 0600"), "\(stopped.stderr)")
            #expect(stopped.stderr.contains("\(other)"), "\(stopped.stderr)")
        }
    }
}
