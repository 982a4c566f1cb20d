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

/// The daemon's background work while it serves: journal retention, expired tokens' subscriptions,
/// statements past `--max-statement-ms`.
extension Daemon {
    /// Applies the journal's retention every `pruneIntervalMs` until shutdown.
    func keepRetention(_ journal: Journal, core: DaemonCore) async {
        while !Task.isCancelled && !core.shuttingDown.load(ordering: .relaxed) {
            do {
                try await core.threadPool.runIfActive {
                    try journal.prune(keepingAfter: { core.cursors?.lowestPosition(pinning: $0) })
                }
            } catch let error as SQLiteError where error.isBusy {
                // A long write transaction holds the database: retention tries again next time.
                self.logger.debug("journal retention postponed: the database is busy", metadata: ["error": "\(error)"])
            } catch {
                self.logger.warning("journal retention failed", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: .milliseconds(self.configuration.journal.pruneIntervalMs))
        }
    }

    /// Once a second until shutdown, closes every session that holds subscriptions (or veto
    /// listeners) under a token that has expired — its current actor's, or the one a subscription
    /// was made under before a `logout` or another `login`: its stream ends with the token. (Each
    /// subscription's visibility already shows nothing from the expiry on.) A session without
    /// subscriptions is kept; its next request gets `token_expired`.
    func endExpiredSubscribers(_ core: DaemonCore) async {
        while !Task.isCancelled && !core.shuttingDown.load(ordering: .relaxed) {
            let now = TokenAuthority.now()
            for session in core.sessions.all
            where
                (session.actor.token?.isExpired(at: now) == true
                || Double(session.subscriptionsExpire.load(ordering: .relaxed)) <= now)
                && session.hasSubscriptions.load(ordering: .relaxed) > 0 && !session.outbox.isClosing
            {
                session.logger.debug("token expired: closing the session and its subscriptions")
                session.close()
            }
            try? await Task.sleep(for: .seconds(1))
        }
    }

    /// Ten times a second until shutdown, interrupts every client statement that has run longer
    /// than `--max-statement-ms` (its client gets `timeout`): so the limit holds within 100 ms.
    func interruptOverdueStatements(_ core: DaemonCore) async {
        while !Task.isCancelled && !core.shuttingDown.load(ordering: .relaxed) {
            for pool in core.pools.values { pool.interruptOverdue() }
            try? await Task.sleep(for: .milliseconds(100))
        }
    }
}
