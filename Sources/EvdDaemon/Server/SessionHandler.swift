import DequeModule
import EvdClient
import NIOCore
import Synchronization

/// A connection's channel handler: the event-loop side of a `Session`.
///
/// Everything latency-critical happens here, on the connection's event loop, without a hop to
/// another thread: a line is parsed as it arrives, a veto `reply` is handled at once (it wakes the
/// database thread waiting for it), other requests go to the session's inbox, and the outbox is
/// flushed (one write for everything queued). Two things apply back-pressure, and while either
/// does the handler stops asking the socket for more, so a client that pipelines without reading
/// answers is slowed down instead of growing memory: the inbox holding `capacity` requests, and
/// the connection's unwritten output reaching its bound (`Outbox.hasRoom`; reading resumes once
/// a write brings it below).
final class SessionHandler: ChannelDuplexHandler {
    typealias InboundIn = LineFrame
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var session: Session?
    private var context: ChannelHandlerContext?
    /// The inbox is full: reads wait until the executor takes a request.
    private var paused = false
    /// A read was asked for while there was no session yet, the inbox was full or the output was
    /// at its bound.
    private var readPending = false
    /// The client's input ended (half-close or close).
    private var inputEnded = false
    /// Lines read before the session was attached: NIO drains the socket when it sees the peer's
    /// EOF, even while reads are held, so a client that writes and half-closes at once is read early.
    private var early: [LineFrame] = []

    init() {}

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    /// The connection is gone (NIO removes every handler when it closes): the handler lets go of
    /// its session. It must: `attach` gave the session's outbox and inbox callbacks that hold this
    /// handler, so handler and session held each other, and neither was ever freed: every
    /// connection, even one that only read `hello`, left ~5.5 KB behind (its `Session`, `Outbox`,
    /// `RequestInbox`, logger metadata and this handler).
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.session = nil
        self.early = []
    }

    /// Starts serving `session` on this connection (on the event loop): output flows, reads start.
    func attach(_ session: Session) {
        guard let context else { return }
        context.eventLoop.assertInEventLoop()
        self.session = session
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let eventLoop = context.eventLoop
        session.outbox.attach { eventLoop.execute { handler.value.flush() } }
        session.inbox.onRoom { eventLoop.execute { handler.value.resumeReading() } }
        if session.core.configuration.writeThrough {
            WriteThrough.make(for: context.channel).whenSuccess { writeThrough in
                if let writeThrough { session.outbox.adopt(writeThrough) }
            }
        }
        for frame in self.early { self.receive(frame, session) }
        self.early = []
        if !context.channel.isActive {
            self.inputEnded = true
            session.outbox.close()
        }
        if self.inputEnded { session.inputEnded() }
        self.resumeReading()
    }

    // MARK: Input

    func read(context: ChannelHandlerContext) {
        guard let session, !self.paused, session.outbox.hasRoom else {
            self.readPending = true
            return
        }
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = self.unwrapInboundIn(data)
        if let session {
            self.receive(frame, session)
        } else {
            self.early.append(frame)
        }
    }

    private func receive(_ frame: LineFrame, _ session: Session) {
        let item: Session.Inbound
        switch frame {
        case .tooLong:
            let limit = session.core.configuration.maxLineBytes
            item = .failure(EvdError(.lineTooLong, "line longer than \(limit) bytes"))
        case .line(let buffer):
            guard let parsed = Session.parse(buffer) else { return }
            if case .request(let request) = parsed, request["op"] == .string(EvdOperation.Name.reply.rawValue) {
                session.handleReply(request.object)
                return
            }
            if case .request(let request) = parsed, request["op"] == .string(EvdOperation.Name.ack.rawValue) {
                session.handleAck(request)
                return
            }
            item = parsed
        }
        if !session.inbox.offer(item) { self.paused = true }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event { self.endInput() }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.endInput()
        // Nobody can receive output any more: stop queueing it and free what is queued (the peer is gone).
        self.session?.outbox.discard()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.session?.logger.debug("connection failed", metadata: ["error": "\(error)"])
        context.close(promise: nil)
    }

    private func endInput() {
        guard !self.inputEnded else { return }
        self.inputEnded = true
        self.session?.inputEnded()
    }

    /// The inbox has room again (or the session has just been attached).
    private func resumeReading() {
        guard self.session != nil else { return }
        self.paused = false
        self.readIfHeld()
    }

    /// Issues the read that was held back, once nothing holds it any more.
    private func readIfHeld() {
        guard let context, let session, self.readPending, !self.paused, session.outbox.hasRoom else { return }
        self.readPending = false
        context.read()
    }

    // MARK: Output

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { self.flush() }
        context.fireChannelWritabilityChanged()
    }

    /// Writes everything the outbox holds, while the socket takes it. When it stops taking it, the
    /// rest waits for `channelWritabilityChanged`.
    private func flush() {
        guard let context, let outbox = self.session?.outbox else { return }
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        while context.channel.isWritable {
            switch outbox.take() {
            case .idle:
                return
            case .close:
                // Not at once: what was handed to the channel before (a `lagged` notice, the last
                // responses) may still wait for the socket, and closing now would drop it. An empty
                // write completes after every write before it.
                let channel = context.channel
                context.writeAndFlush(self.wrapOutboundOut(channel.allocator.buffer(capacity: 0))).whenComplete { _ in
                    channel.close(promise: nil)
                }
                return
            case .batch(let chunks, let bytes, let closeAfter):
                var buffer = context.channel.allocator.buffer(capacity: bytes)
                for chunk in chunks { chunk.write(into: &buffer) }
                // Until the batch is written, lines must queue behind it (`Outbox.enqueue(line:)`).
                let written = context.writeAndFlush(self.wrapOutboundOut(buffer))
                written.whenComplete { _ in
                    // Its bytes no longer count against the output bound: reading may resume.
                    outbox.written(bytes: bytes)
                    handler.value.readIfHeld()
                }
                if closeAfter {
                    let channel = context.channel
                    written.whenComplete { _ in channel.close(promise: nil) }
                    return
                }
            }
        }
    }
}

/// The requests a session's reader hands its executor, in order.
///
/// The event loop offers (never waits); the executor task pops. `offer` reports when the inbox is
/// full, and `onRoom` is told when the executor has made room again.
typealias RequestInbox = AsyncQueue<Session.Inbound>
