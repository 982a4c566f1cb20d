import CSQLite
import EvdClient
import Logging
import NIOCore
import NIOPosix
import Prometheus
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// evd: serves its databases and events on a Unix socket until asked to stop.
///
/// A `Service`: run it in a `ServiceGroup` with `gracefulShutdownSignals: [.sigterm, .sigint]`.
/// On graceful shutdown it stops accepting, answers new requests with `shutting_down`, sends
/// notice `shutdown`, lets in-flight requests finish (within `shutdownGraceMs`), closes every
/// session, disposes the pools and removes the socket file it created.
public final class Daemon: Service, CustomStringConvertible {
    /// Why evd could not start: printed as its one-line reason.
    public struct StartupError: Error, CustomStringConvertible {
        public let description: String
    }

    public let configuration: EvdConfiguration
    let logger: Logger
    /// What the daemon tells whoever supervises it (systemd, when evd's main says so).
    let supervisor: Supervisor
    private let readiness = ReadySignal()
    /// The Prometheus figures (served with `--metrics-socket` / `--metrics-listen`).
    let metrics: DaemonMetrics

    public var description: String { "evd(\(self.configuration.listenFD.map { "fd \($0)" } ?? self.configuration.socketPath))" }

    /// `metrics`: the registry the daemon reports into (a fresh one by default; see `DaemonMetrics`).
    /// `supervisor`: what to tell a supervisor (`Supervisor.systemd(environment:)`; none by default).
    public init(
        configuration: EvdConfiguration,
        logger: Logger,
        supervisor: Supervisor = .none,
        metrics: PrometheusCollectorRegistry = PrometheusCollectorRegistry()
    ) {
        self.configuration = configuration
        self.logger = logger
        self.supervisor = supervisor
        self.metrics = DaemonMetrics(registry: metrics)
    }

    /// Waits until the daemon accepts connections (tests use this instead of polling).
    public func waitUntilReady() async throws {
        try await self.readiness.wait()
    }

    public func run() async throws {
        do {
            try await self.serve()
        } catch {
            self.readiness.fail(error)
            throw error
        }
    }

    private func serve() async throws {
        // A big transaction's capture and events are a few large buffers: each gets a mapping of
        // its own, so that the memory goes back to the system when the transaction ends (see
        // `PooledConnection.commit`). Small allocations, all the common work makes, are unaffected.
        _ = evd_malloc_mmap_threshold(1 << 20)
        // Setting the mmap threshold also fixes glibc's trim threshold at 128 KiB: every request
        // that built and freed a few hundred KiB (a 1000-row insert) gave the pages back and
        // faulted them in again for the next. Up to 8 MiB stay free for reuse instead.
        _ = evd_malloc_trim_threshold(8 << 20)
        try self.prepareDirectories()
        self.narrowDatabaseFiles()
        let tokens = try self.openTokenSecret()
        let totalConnections = self.configuration.poolSize * self.configuration.databases.count
        // One thread per pooled connection (a thread may block on SQLite's busy wait), and two
        // for the journal's own work (custom events, replays, retention). (Each database's WAL
        // checkpoints have a thread of their own: `Checkpointer`.)
        let threadPool = NIOThreadPool(numberOfThreads: totalConnections + 2)
        threadPool.start()
        // Sessions' requests, SQLite work included: a thread per pooled connection (each may
        // block in SQLite), and two for the requests that hold no connection meanwhile.
        let databaseThreads = DatabaseThreads(count: totalConnections + 2)
        databaseThreads.start()
        defer { databaseThreads.shutdown() }
        let group = MultiThreadedEventLoopGroup.singleton
        let (journal, head) = try await self.openJournal(on: threadPool)
        let bus = EventBus(lastSeq: head, epoch: journal.epoch, lease: journal.lease, vetoLatency: self.metrics.observeVetoLatency)
        let core = DaemonCore(
            configuration: self.configuration,
            bus: bus,
            journal: journal.settings.enabled ? journal : nil,
            threadPool: threadPool,
            databaseThreads: databaseThreads,
            eventLoop: group.next(),
            tokens: tokens,
            reportLost: { [logger] database, file, loss in
                // Once per database: every later request on it fails with SQLITE_READONLY_DBMOVED.
                logger.error(
                    "a database file was deleted or replaced while evd had it open: evd stopped serving that database; put the right file in place and restart evd",
                    metadata: [
                        "db.name": "\(database)", "db.path": "\(file)", "db.loss": "\(loss.rawValue)",
                        "db.recovery": "until evd stops, a deleted file can still be copied from /proc/\(getpid())/fd",
                    ]
                )
            }
        )

        let acceptPause = AcceptPause(logger: self.logger)
        let server: NIOAsyncChannel<AcceptedConnection, Never>
        let createdPath: String?
        var endpoint: MetricsEndpoint?
        do {
            if let cursors = core.cursors {
                do {
                    try await threadPool.runIfActive { try cursors.open() }
                } catch {
                    throw StartupError(description: "cannot open the cursors in \(self.configuration.stateDirectory): \(error)")
                }
            }
            try await self.recoverPreparedTransactions(core)
            endpoint = try await MetricsEndpoint.bind(self.configuration, group: group, logger: self.logger)
            (server, createdPath) = try await self.bind(group: group, acceptPause: acceptPause)
        } catch {
            endpoint?.close()
            await core.twoPhase.releaseAll()
            core.twoPhase.log.close()
            core.cursors?.close()
            journal.close()
            try? await threadPool.shutdownGracefully()
            throw error
        }
        self.logger.info(
            "evd is ready",
            metadata: [
                "socket": "\(self.configuration.listenFD.map { "fd \($0)" } ?? self.configuration.socketPath)",
                "databases": "\(self.configuration.databases.map { "\($0.name)=\($0.path)" }.joined(separator: ","))",
            ]
        )
        self.supervisor.ready()
        self.readiness.signal()

        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { tasks in
                if journal.settings.enabled {
                    tasks.addTask { await self.keepRetention(journal, core: core) }
                }
                tasks.addTask { await self.endExpiredSubscribers(core) }
                if self.configuration.maxStatementMs > 0 {
                    tasks.addTask { await self.interruptOverdueStatements(core) }
                }
                if let endpoint {
                    tasks.addTask { await endpoint.serve(self.metrics, core: core, logger: self.logger) }
                }
                for work in self.supervisor.whileServing {
                    tasks.addTask { await work(core) }
                }
                do {
                    try await server.executeThenClose { inbound in
                        for try await connection in inbound {
                            tasks.addTask {
                                await self.serveConnection(connection, core: core)
                                // Its descriptor is free: at the fd limit, accepting resumes.
                                acceptPause.connectionClosed()
                            }
                        }
                    }
                } catch {
                    self.logger.error("accepting connections failed", metadata: ["error": "\(error)"])
                }
                await self.drainSessions(core)
                tasks.cancelAll()
            }
        } onGracefulShutdown: {
            core.shuttingDown.store(true, ordering: .relaxed)
            self.supervisor.stopping()
            self.logger.info("evd is stopping")
            server.channel.close(promise: nil)
        }

        // Prepared transactions are rolled back here and prepared again at the next start.
        await core.twoPhase.releaseAll()
        core.twoPhase.log.close()
        for pool in core.pools.values {
            await pool.dispose(origin: .daemon)
            await pool.checkpointer?.close()
        }
        core.cursors?.close()
        journal.close()
        try? await threadPool.shutdownGracefully()
        if let createdPath { unlink(createdPath) }
        self.logger.info("evd stopped")
    }

    /// Opens the journal (with `--no-journal`, only the seq lease is kept: seqs never go back) and
    /// returns it with the last seq that may have been used.
    private func openJournal(on threadPool: NIOThreadPool) async throws -> (Journal, head: Int64) {
        let journal = Journal(
            stateDirectory: self.configuration.stateDirectory,
            databases: self.configuration.databases,
            settings: self.configuration.journal,
            threadPool: threadPool
        )
        do {
            let opening = try await threadPool.runIfActive {
                let opening = try journal.open()
                // The one count of what the journal holds; from now on it is kept up to date.
                if journal.settings.enabled { journal.running.load(journal) }
                return opening
            }
            if opening.stateWasLost {
                self.logger.error(
                    "the state directory \(self.configuration.stateDirectory) was lost (or emptied) since evd last ran: the databases show seqs up to \(opening.head), so seqs continue after that; the custom, login, logout and create-token events journaled there are gone (a replay of them gets notice gap), and so are tokens and prepared two-phase transactions"
                )
            }
            return (journal, opening.head)
        } catch {
            try? await threadPool.shutdownGracefully()
            throw StartupError(description: "cannot open the journal in \(self.configuration.stateDirectory): \(error)")
        }
    }

    /// Reads the token secret, or makes it on the first start.
    private func openTokenSecret() throws -> TokenAuthority {
        do {
            return try TokenAuthority.load(stateDirectory: self.configuration.stateDirectory)
        } catch {
            throw StartupError(description: error.description)
        }
    }

    /// Opens the two-phase log and holds every transaction it has prepared again, before any
    /// client can connect (their locks are taken before anyone else's).
    private func recoverPreparedTransactions(_ core: DaemonCore) async throws {
        do {
            try await core.threadPool.runIfActive { try core.twoPhase.log.open() }
            for line in try await core.twoPhase.recover(pools: core.pools) {
                self.logger.notice("two-phase recovery: \(line)")
            }
        } catch {
            throw StartupError(
                description: "cannot recover prepared two-phase transactions in \(self.configuration.stateDirectory): \(error)"
            )
        }
    }

    /// Tells every session the daemon is stopping, waits for in-flight requests (within the
    /// grace period), then closes them all and waits (at most a second) until their queued
    /// output — responses, the shutdown notice — is written.
    private func drainSessions(_ core: DaemonCore) async {
        core.shuttingDown.store(true, ordering: .relaxed)
        // Pending vetoes resolve by their listeners' on_timeout now: nobody waits on a listener
        // while the daemon stops.
        core.bus.pendingVetoes.resolveAll(.noAnswer(.shutdown))
        let sessions = core.sessions.all
        for session in sessions { session.noticeShutdown() }
        await Self.waitUntil(.now + .milliseconds(self.configuration.shutdownGraceMs)) {
            for session in sessions { await session.settled() }
        }
        // What still runs past the grace period is interrupted: a statement that never ends must
        // not keep the daemon from stopping.
        for pool in core.pools.values { pool.interruptAll(.shutdown) }
        await Self.waitUntil(.now + .seconds(1)) {
            for session in sessions { await session.settled() }
        }
        for session in core.sessions.all { session.close() }
        // The caller cancels the session tasks next; a writer cancelled mid-flush loses what was
        // queued, so give them time to finish on their own (a peer that reads nothing cannot hold
        // shutdown beyond the bound).
        await Self.waitUntil(.now + .seconds(1)) { await core.sessions.allRemoved() }
        // Whoever is left has stopped reading: close their connections so shutdown is bounded.
        for session in core.sessions.all { session.forceClose() }
    }

    /// Runs `body` until it returns or `deadline` passes, whichever is first (then `body`'s task is
    /// cancelled: its waits end).
    private static func waitUntil(_ deadline: ContinuousClock.Instant, _ body: @escaping @Sendable () async -> Void) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await body() }
            group.addTask { try? await Task.sleep(until: deadline) }
            await group.next()
            group.cancelAll()
        }
    }

    // MARK: Connections

    private func serveConnection(_ connection: AcceptedConnection, core: DaemonCore) async {
        let channel = connection.channel
        let credentials: PeerCredentials
        do {
            credentials = try connection.credentials.get()
        } catch {
            self.logger.warning("could not read peer credentials", metadata: ["error": "\(error)"])
            try? await channel.close()
            return
        }
        let id: UInt64
        switch core.sessions.admit(
            uid: credentials.uid,
            limit: self.configuration.maxSessions,
            perUIDLimit: self.configuration.maxSessionsPerUID
        )
        {
        case .success(let admitted):
            id = admitted
        case .failure(let refusal):
            await self.refuse(channel, refusal, uid: credentials.uid)
            return
        }
        // The actor's user name and groups come from the password and group databases (NSS: files,
        // perhaps LDAP), calls that may block: on the thread pool, not the cooperative pool.
        let actor: Actor
        do {
            actor = try await core.threadPool.runIfActive { credentials.actor }
        } catch {
            core.sessions.remove(id)  // the pool is stopping: so is evd
            try? await channel.close()
            return
        }
        let session = Session(id: id, actor: actor, core: core, logger: self.logger)
        core.sessions.add(session)
        if core.shuttingDown.load(ordering: .relaxed) {
            session.noticeShutdown()
            session.close()
        }
        await session.run(channel: channel)
        core.sessions.remove(id)
    }

    /// Answers a connection over a limit with one `too_many_connections` error (id null, no
    /// hello), naming the limit, and closes it.
    private func refuse(_ channel: any Channel, _ refusal: SessionRegistry.Refusal, uid: UInt32) async {
        let error: EvdError
        switch refusal {
        case .total(let limit):
            self.logger.warning("refused a connection: too many", metadata: ["peer.uid": "\(uid)"])
            error = EvdError(
                .tooManyConnections,
                "evd serves at most \(limit) connections (--max-connections)",
                extra: ["limit": "max-connections", "max": .integer(limit)]
            )
        case .perUID(let limit):
            self.logger.warning("refused a connection: too many for its uid", metadata: ["peer.uid": "\(uid)"])
            error = EvdError(
                .tooManyConnections,
                "evd serves at most \(limit) connections per uid (--max-connections-per-uid), and uid \(uid) has \(limit)",
                extra: ["limit": "max-connections-per-uid", "max": .integer(limit)]
            )
        }
        var buffer = channel.allocator.buffer(capacity: 256)
        buffer.writeBytes(WireLines.response(id: .null, error: error))
        try? await channel.writeAndFlush(buffer)
        try? await channel.close()
    }

    /// Binds the socket, or adopts systemd's; returns the path to remove at exit (nil when adopted).
    /// At its file-descriptor limit, evd pauses accepting (`AcceptPause`).
    private func bind(
        group: MultiThreadedEventLoopGroup,
        acceptPause: AcceptPause
    ) async throws -> (NIOAsyncChannel<AcceptedConnection, Never>, String?) {
        let maxLineBytes = self.configuration.maxLineBytes
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(acceptPause.makeHandler())
                }
            }
            .childChannelOption(.allowRemoteHalfClosure, value: true)
        // The peer's credentials are read here, before the channel's first read: a peer that has
        // already hung up (or reset) would otherwise have its channel closed under the getsockopt.
        let initializer: @Sendable (any Channel) -> EventLoopFuture<AcceptedConnection> = { channel in
            PeerCredentials.of(channel)
                .map { Result<PeerCredentials, any Error>.success($0) }
                .recover { .failure($0) }
                .flatMapThrowing { credentials in
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineFrameDecoder(maxLineBytes: maxLineBytes)))
                    try channel.pipeline.syncOperations.addHandler(SessionHandler())
                    return AcceptedConnection(channel: channel, credentials: credentials)
                }
        }
        if let fd = self.configuration.listenFD {
            let server = try await bootstrap.bind(fd, childChannelInitializer: initializer)
            return (server, nil)
        }
        let path = self.configuration.socketPath
        try Self.removeStaleSocket(at: path)
        let server = try await Self.bindSocketFile(at: path, mode: self.configuration.socketMode) { staging in
            do {
                return try await bootstrap.bind(unixDomainSocketPath: staging, childChannelInitializer: initializer)
            } catch {
                throw StartupError(description: "cannot listen on \(path): \(error)")
            }
        } close: {
            try? await $0.channel.close()
        }
        return (server, path)
    }

    /// Binds a listening socket with `bind` (given the path to bind at) and puts it at `path` with
    /// `mode` (`SocketFile`: never a `chmod` of a path another user could redirect).
    static func bindSocketFile<Server>(
        at path: String,
        mode: mode_t,
        _ bind: (String) async throws -> Server,
        close: (Server) async -> Void
    ) async throws -> Server {
        let file: SocketFile
        do {
            file = try SocketFile(path: path)
        } catch {
            throw StartupError(description: error.description)
        }
        defer { file.removeStaging() }
        let server = try await bind(file.stagingPath)
        do {
            try file.install(mode: mode)
        } catch {
            await close(server)
            throw StartupError(description: error.description)
        }
        return server
    }

    /// Refuses to start when a live daemon answers on `path`; removes a stale socket file.
    static func removeStaleSocket(at path: String) throws {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard (info.st_mode & S_IFMT) == S_IFSOCK else {
            throw StartupError(description: "\(path) exists and is not a socket; refusing to replace it")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let connected = connectUnixSocket(fd, to: path)
        if connected == 0 {
            throw StartupError(description: "another evd is already serving \(path)")
        }
        unlink(path)
    }
}

/// A connection as the listener hands it over: its channel and its peer's credentials
/// (`SO_PEERCRED`), read as it was accepted.
struct AcceptedConnection: Sendable {
    let channel: any Channel
    let credentials: Result<PeerCredentials, any Error>
}
