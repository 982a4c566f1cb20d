import EvdClient
import Foundation
import NATSClient

/// A real `nats-server` with JetStream in a temporary directory, on a free loopback port.
public struct NATSServer {
    public struct Missing: Error, CustomStringConvertible {
        public var description: String {
            "nats-server is not installed (looked at $NATS_SERVER, in PATH and /usr/sbin): run scripts/deps, which installs it"
        }
    }

    public struct StartFailed: Error, CustomStringConvertible {
        public var description: String

        public init(description: String) {
            self.description = description
        }
    }

    public let port: Int
    public let directory: URL

    public init(port: Int, directory: URL) {
        self.port = port
        self.directory = directory
    }

    /// The executable: `$NATS_SERVER` when set, else on PATH, else Debian's /usr/sbin (not on every
    /// user's PATH). Missing is a failure, never a skip.
    public static func executable() throws -> String {
        if let chosen = ProcessInfo.processInfo.environment["NATS_SERVER"] {
            guard FileManager.default.isExecutableFile(atPath: chosen) else { throw Missing() }
            return chosen
        }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        for directory in path.split(separator: ":") + ["/usr/sbin", "/usr/local/sbin"] {
            let candidate = "\(directory)/nats-server"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw Missing()
    }
}

/// Starts a nats-server (`-js -sd DIR -a 127.0.0.1 -p -1 --ports_file_dir DIR`, plus `config` as a
/// config file when given), runs `body` with it, and stops it.
public func withNATSServer<Result>(
    config: String? = nil,
    _ body: (NATSServer) async throws -> Result
) async throws -> Result {
    let executable = try NATSServer.executable()
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("nats-test-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    var arguments = ["-js", "-sd", directory.appendingPathComponent("js").path, "-a", "127.0.0.1", "-p", "-1"]
    arguments += ["--ports_file_dir", directory.path]
    if let config {
        let file = directory.appendingPathComponent("server.conf")
        try config.write(to: file, atomically: true, encoding: .utf8)
        arguments += ["-c", file.path]
    }
    let log = directory.appendingPathComponent("server.log")
    // Spawned, not Foundation's Process, which crashes when the test process has many descriptors open.
    let process = try Spawned(executable, arguments, log: log.path)
    defer {
        if !process.isRunning {
            // It died under the test: what it said is the only clue.
            let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
            FileHandle.standardError.write(
                Data("nats-server (port file in \(directory.path)) exited during the test:\n\(output.suffix(4000))\n".utf8)
            )
        }
        process.terminate()
        var waited = 0
        while process.isRunning {
            if waited == 2_000 { process.signal(SIGKILL) }  // 10 s
            usleep(5_000)
            waited += 1
        }
    }
    let portsFile = directory.appendingPathComponent("nats-server_\(process.processIdentifier).ports")
    var port: Int?
    for _ in 0..<200 {
        if let data = try? Data(contentsOf: portsFile), let json = try? JSONValue(parsing: [UInt8](data)),
            let url = (json["nats"] ?? json["client"])?.arrayValue?.first?.stringValue,
            let last = url.split(separator: ":").last, let value = Int(last)
        {
            port = value
            break
        }
        guard process.isRunning else { break }
        try await Task.sleep(for: .milliseconds(25))
    }
    guard let port else {
        let output = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        throw NATSServer.StartFailed(description: "nats-server did not start: \(output)")
    }
    return try await body(NATSServer(port: port, directory: directory))
}

/// Connects to `server`, runs `body`, closes.
public func withConnection<Result>(
    to server: NATSServer,
    _ body: (NATSConnection) async throws -> Result
) async throws -> Result {
    let connection = try await NATSConnection.connect(host: "127.0.0.1", port: server.port)
    do {
        let result = try await body(connection)
        try await connection.close()
        return result
    } catch {
        try? await connection.close()
        throw error
    }
}
