import EvdClient
import Foundation
import Testing

@testable import EvdDaemon

// Clients that run as another uid (nobody, 65534), for the tests that attack evd as a local user
// with few grants or none would.

/// A client that runs as another user (nobody, 65534): the system Python, dropped to that uid and
/// gid with `setpriv`, talks to the daemon the tests run as root. It sends `requests` one after
/// another, then reads on until an event named `until` arrives (or `linger` seconds pass), and
/// prints every message it got as one JSON line (`{"connect_error": errno}` if it could not
/// connect). With a `reply` object, it answers every veto it reads with it (`{"op":"reply","seq":N}`
/// and the object's members): a veto listener as another user.
let otherUserClient = """
    import json, socket, sys, time
    path, requests, until, linger = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    reply = json.loads(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] else None
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError as error:
        print(json.dumps({"connect_error": error.errno}))
        sys.exit(0)
    s.settimeout(linger)
    f = s.makefile("rb")
    def read():
        line = f.readline()
        if not line:
            return None
        message = json.loads(line)
        print(json.dumps(message), flush=True)
        if reply is not None and message.get("type") == "veto":
            s.sendall(json.dumps(dict(reply, op="reply", seq=message["seq"])).encode() + b"\\n")
        return message
    read()
    for number, request in enumerate(requests, 1):
        s.sendall(json.dumps(dict(request, id=number)).encode() + b"\\n")
        while True:
            message = read()
            if message is None or message.get("type") == "response" and message.get("id") == number:
                break
    if until:
        try:
            while True:
                message = read()
                if message is None or message.get("event") == until:
                    break
        except OSError:
            pass
    """

/// Runs `otherUserClient` as nobody against `daemon`.
func asNobody(
    _ daemon: RunningDaemon,
    _ requests: [JSONObject],
    until: String = "",
    linger: Double = 10,
    reply: JSONObject? = nil
) throws -> Spawned {
    let requestsJSON = String(decoding: JSONValue.array(requests.map(JSONValue.object)).jsonBytes, as: UTF8.self)
    let replyJSON = reply.map { String(decoding: JSONValue.object($0).jsonBytes, as: UTF8.self) } ?? ""
    return try Spawned(
        "/usr/bin/setpriv",
        [
            "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", otherUserClient, daemon.socketPath,
            requestsJSON, until, String(linger), replyJSON,
        ]
    )
}

/// Another uid (65534) as a veto listener on `before_cursor_execute` (`on_timeout: allow`) that
/// answers every veto by rewriting the statement to `statement`, until the test emits `app.stop`;
/// returns once the daemon counts it as a listener.
func asNobodyRewriter(_ daemon: RunningDaemon, to statement: String) async throws -> Spawned {
    let listener = try asNobody(
        daemon,
        [
            [
                "op": "subscribe", "events": ["app.stop"], "veto": ["before_cursor_execute"], "timeout_ms": 30000,
                "on_timeout": "allow",
            ]
        ],
        until: "app.stop",
        linger: 30,
        reply: ["action": "modify", "set": ["statement": .string(statement)]]
    )
    try await waitForStats(daemon) { $0["veto_listeners"] == 1 }
    return listener
}

/// The messages a finished `asNobody` client printed.
func messages(_ spawned: Spawned) async throws -> [JSONObject] {
    let result = try await spawned.finish(within: 30)
    #expect(result.status == 0, "\(result.stderr)")
    return result.stdout.split(separator: "\n").compactMap { try? JSONValue(parsing: String($0)).objectValue }
}

/// The responses among `messages`, by request number.
func responses(_ messages: [JSONObject]) -> [Int64: JSONObject] {
    var byID: [Int64: JSONObject] = [:]
    for message in messages where message["type"] == "response" {
        if let id = message["id"]?.intValue { byID[id] = message }
    }
    return byID
}

func execute(_ sql: String) -> JSONObject { ["op": "execute", "sql": .string(sql)] }

/// Lets nobody reach the socket: the test directory is mkdtemp's 0700, the socket `mode`.
func openUp(_ configuration: inout EvdConfiguration, socketMode: mode_t = 0o666, grants: [Grant] = []) {
    chmod((configuration.socketPath as NSString).deletingLastPathComponent, 0o755)
    configuration.socketMode = socketMode
    configuration.grants = grants
}

/// Grants for nobody (65534): raw SQL on `main`, and inserting into and reading `table` only.
func nobodyMayInsertInto(_ table: String) -> [Grant] {
    [
        Grant(who: .uid(65534), actions: [.executeSQL], database: "main"),
        Grant(who: .uid(65534), actions: [.insertRow, .viewTable], database: "main", table: table),
    ]
}

/// Waits (up to 20 s) until root's `stats` satisfy `condition`: for a test to know that another
/// uid's client has got as far as it should.
func waitForStats(_ daemon: RunningDaemon, _ condition: (JSONObject) -> Bool) async throws {
    let deadline = ContinuousClock.now + .seconds(20)
    while ContinuousClock.now < deadline {
        if condition(try await daemon.request("stats")) { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    Issue.record("stats never showed what the test waited for")
}
