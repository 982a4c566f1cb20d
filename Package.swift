// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "evd",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "evd", targets: ["evd"]),
        .executable(name: "evtail", targets: ["evtail"]),
        .executable(name: "evctl", targets: ["evctl"]),
        .executable(name: "evforward", targets: ["evforward"]),
        .library(name: "EvdClient", targets: ["EvdClient"]),
        .library(name: "EvdDaemon", targets: ["EvdDaemon"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // The system libsqlite3 (Debian: libsqlite3-dev), with its pre-update hook and session extension.
        .systemLibrary(
            name: "CSQLite",
            pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]
        ),
        // The wire format of PROTOCOL.md and a small async client: shared by the daemon, the CLIs and tests.
        .target(
            name: "EvdClient",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "OrderedCollections", package: "swift-collections"),
            ],
            linkerSettings: [.linkedLibrary("m")]
        ),
        // The small part of the NATS client protocol (and JetStream's API) that forwarding into NATS needs:
        // no Swift NATS client is among the packages these machines can fetch (issue 21).
        .target(
            name: "NATSClient",
            dependencies: [
                "EvdClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "DequeModule", package: "swift-collections"),
            ]
        ),
        // The command-line tools' shared helpers (terminal output, evtail's event lines, evctl's stats text,
        // the token source): internal to this package, not part of the EvdClient library.
        .target(
            name: "EvdCLI",
            dependencies: [
                "EvdClient",
                .product(name: "OrderedCollections", package: "swift-collections"),
            ]
        ),
        // Everything evd does, as a library so that tests run the real thing in-process.
        .target(
            name: "EvdDaemon",
            dependencies: [
                "CSQLite",
                "EvdClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "OrderedCollections", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .executableTarget(
            name: "evd",
            dependencies: [
                "EvdDaemon",
                "EvdClient",
                .product(name: "OrderedCollections", package: "swift-collections"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .executableTarget(
            name: "evtail",
            dependencies: [
                "EvdClient",
                "EvdCLI",
                "NATSClient",
                .product(name: "OrderedCollections", package: "swift-collections"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "evctl",
            dependencies: [
                "EvdClient",
                "EvdCLI",
                .product(name: "OrderedCollections", package: "swift-collections"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Forwards evd's journaled events into NATS JetStream (docs/forwarding.md).
        .executableTarget(
            name: "evforward",
            dependencies: [
                "EvdClient",
                "EvdCLI",
                "NATSClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "OrderedCollections", package: "swift-collections"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ]
        ),
        // scripts/bench's probe for the forwarding rows: JetStream's own publish rate through NATSClient,
        // commit-to-stream lag, a paced emitter (not installed).
        .executableTarget(
            name: "natsbench",
            dependencies: [
                "NATSClient",
                "EvdClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "DequeModule", package: "swift-collections"),
            ]
        ),
        .testTarget(
            name: "EvdClientTests",
            dependencies: [
                "EvdClient",
                "EvdCLI",
                .product(name: "OrderedCollections", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        // What the NATS tests share: a real nats-server on a free port, processes started with posix_spawn.
        .target(
            name: "NATSTestSupport",
            dependencies: ["NATSClient", "EvdClient"],
            path: "Tests/NATSTestSupport"
        ),
        // Against a real nats-server (scripts/deps installs it), never a mock.
        .testTarget(
            name: "NATSClientTests",
            dependencies: [
                "NATSClient",
                "NATSTestSupport",
                "EvdClient",
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        // evforward against a real nats-server, a real evd and the built binaries.
        .testTarget(
            name: "ForwardTests",
            dependencies: [
                "evforward",
                "NATSClient",
                "NATSTestSupport",
                "EvdClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "EvdDaemonTests",
            dependencies: [
                "EvdDaemon",
                "EvdClient",
                "EvdCLI",
                // ConfigPrecedenceTests calls evd's `configuration(file:environment:)` directly.
                "evd",
                "CSQLite",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "OrderedCollections", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "InMemoryLogging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
