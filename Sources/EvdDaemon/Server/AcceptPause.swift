import Logging
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Stops evd from spinning on `accept` when it is out of file descriptors, and accepts again once
/// one may be free.
///
/// **The fault.** When `accept` fails with `EMFILE` (the process's `RLIMIT_NOFILE`) or `ENFILE`
/// (the system's), the connection stays in the listen backlog and the socket stays readable. NIO's
/// server channel keeps its read pending after an accept error (only an accepted connection clears
/// it), so it stays registered with epoll, which reports the socket again at once: the event loop
/// called `accept` ~10,000 times a second, all failing, at a whole core's CPU. NIO's own
/// `AcceptBackoffHandler` (which `ServerBootstrap` installs) cannot help: it only delays the *next*
/// read the pipeline asks for, and with the read still pending none is asked for.
///
/// **What this does.** Its `Handler`, nearest the socket in the server channel's pipeline, turns
/// the channel's `autoRead` off at such an error, which makes NIO stop watching the socket, and
/// holds back every read asked for meanwhile. It accepts again after `pause`, or as soon as a
/// session ends (`connectionClosed`: its descriptor is free), whichever comes first; if the limit
/// still holds, that one `accept` fails and the pause starts over. The first error of an episode
/// logs one warning. The episode ends, with a notice that accepting resumed, once connections have
/// been accepted and `pause` has passed without another such error: a daemon that drains its
/// backlog and touches the limit again meanwhile (each freed descriptor taken by the next waiting
/// client) is one episode, not one warning per connection.
/// Connections wait in the backlog meanwhile (`ServerBootstrap`'s `backlog`: 256), and clients
/// beyond it are refused by the kernel (`EAGAIN`), as for any full listen queue.
final class AcceptPause: Sendable {
    /// How long accepting pauses at the limit when no session ends meanwhile.
    let pause: TimeAmount
    let logger: Logger
    /// Whether accepting is paused now (read by `connectionClosed` without a hop).
    private let paused = Atomic<Bool>(false)
    /// Resumes accepting, on the server channel's event loop (set by the handler once installed).
    private let wake = Mutex<(@Sendable () -> Void)?>(nil)

    init(pause: TimeAmount = .seconds(1), logger: Logger) {
        self.pause = pause
        self.logger = logger
    }

    /// A session's connection closed: if accepting is paused, it resumes now.
    func connectionClosed() {
        guard self.paused.load(ordering: .relaxed) else { return }
        self.wake.withLock { $0 }?()
    }

    /// The handler for the server channel (`ServerBootstrap.serverChannelInitializer`).
    func makeHandler() -> Handler { Handler(self) }

    /// Whether `error` is `accept` running out of descriptors.
    static func isOutOfDescriptors(_ error: any Error) -> Bool {
        guard let error = error as? IOError else { return false }
        return error.errnoCode == EMFILE || error.errnoCode == ENFILE
    }

    /// The server channel's side: pauses and resumes reading (accepting) on its event loop.
    final class Handler: ChannelDuplexHandler, RemovableChannelHandler {
        typealias InboundIn = any Channel
        typealias InboundOut = any Channel
        typealias OutboundIn = Never

        private let owner: AcceptPause
        private var context: ChannelHandlerContext?
        /// Reading is off (`autoRead` false) until `resume`.
        private var paused = false
        /// A read was asked for while paused.
        private var heldRead = false
        /// Since the first out-of-descriptors error, until accepting has gone `pause` without one.
        private var episode = false
        /// When the last out-of-descriptors error of the episode was.
        private var lastError = NIODeadline.distantPast
        private var resumption: Scheduled<Void>?
        /// The check that ends the episode, scheduled once a connection is accepted in it.
        private var episodeEnd: Scheduled<Void>?

        fileprivate init(_ owner: AcceptPause) {
            self.owner = owner
        }

        func handlerAdded(context: ChannelHandlerContext) {
            self.context = context
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            let eventLoop = context.eventLoop
            self.owner.wake.withLock { $0 = { eventLoop.execute { handler.value.resume() } } }
        }

        func handlerRemoved(context: ChannelHandlerContext) {
            self.owner.wake.withLock { $0 = nil }
            self.cancelTimers()
            self.context = nil
        }

        func channelInactive(context: ChannelHandlerContext) {
            self.cancelTimers()
            context.fireChannelInactive()
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if self.episode, self.episodeEnd == nil {
                self.scheduleEpisodeEnd(context, at: self.lastError + self.owner.pause)
            }
            context.fireChannelRead(data)
        }

        private func cancelTimers() {
            self.resumption?.cancel()
            self.resumption = nil
            self.episodeEnd?.cancel()
            self.episodeEnd = nil
        }

        /// Ends the episode at `deadline` if no out-of-descriptors error came in the `pause` before
        /// it; otherwise checks again `pause` after that error, or (paused now) at the next accept.
        private func scheduleEpisodeEnd(_ context: ChannelHandlerContext, at deadline: NIODeadline) {
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            self.episodeEnd = context.eventLoop.scheduleTask(deadline: deadline) {
                let this = handler.value
                this.episodeEnd = nil
                guard this.episode, let context = this.context else { return }
                if NIODeadline.now() >= this.lastError + this.owner.pause {
                    this.episode = false
                    this.owner.logger.notice("accepting connections again: file descriptors are free")
                } else if !this.paused {
                    this.scheduleEpisodeEnd(context, at: this.lastError + this.owner.pause)
                }
            }
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            guard AcceptPause.isOutOfDescriptors(error) else {
                context.fireErrorCaught(error)
                return
            }
            self.lastError = .now()
            if !self.episode {
                self.episode = true
                self.owner.logger.warning(
                    "out of file descriptors: accepting connections is paused until one is free (tried again every \(self.owner.pause.nanoseconds / 1_000_000) ms); raise the limit (ulimit -n, LimitNOFILE=) or lower --max-connections",
                    metadata: ["error": "\(error)"]
                )
            }
            self.pauseReading(context)
        }

        func read(context: ChannelHandlerContext) {
            if self.paused {
                self.heldRead = true
                return
            }
            context.read()
        }

        /// Stops watching the socket (NIO unregisters it from epoll) until `resume`.
        private func pauseReading(_ context: ChannelHandlerContext) {
            if !self.paused {
                self.paused = true
                self.owner.paused.store(true, ordering: .relaxed)
                try? context.channel.syncOptions?.setOption(.autoRead, value: false)
            }
            self.resumption?.cancel()
            let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
            self.resumption = context.eventLoop.scheduleTask(in: self.owner.pause) { handler.value.resume() }
        }

        /// Watches the socket again: the next `accept` either succeeds or pauses anew.
        fileprivate func resume() {
            guard self.paused, let context else { return }
            self.paused = false
            self.owner.paused.store(false, ordering: .relaxed)
            self.resumption?.cancel()
            self.resumption = nil
            // Turning `autoRead` on asks for a read at once (NIO's `read0`).
            try? context.channel.syncOptions?.setOption(.autoRead, value: true)
            if self.heldRead {
                self.heldRead = false
                context.read()
            }
        }
    }
}
