extension Supervisor {
    /// systemd's notify protocol (sd_notify(3)), when `environment` has `NOTIFY_SOCKET`: `READY=1`
    /// once evd accepts connections, `WATCHDOG=1` every half `WATCHDOG_USEC`, a `STATUS=` line with
    /// live counts (`StatusReporter`), and `STOPPING=1` when it begins to stop. Without
    /// `NOTIFY_SOCKET` every notification is a no-op and nothing runs.
    public static func systemd(environment: [String: String]) -> Supervisor {
        var whileServing: [@Sendable (DaemonCore) async -> Void] = []
        if let interval = Systemd.watchdogInterval(environment: environment) {
            whileServing.append { core in
                while !Task.isCancelled && !core.shuttingDown.load(ordering: .relaxed) {
                    Systemd.notify("WATCHDOG=1", environment: environment)
                    try? await Task.sleep(for: interval)
                }
            }
        }
        whileServing.append { core in
            await StatusReporter(core: core, environment: environment)?.run()
        }
        return Supervisor(
            ready: { Systemd.notify("READY=1\nSTATUS=serving", environment: environment) },
            stopping: { Systemd.notify("STOPPING=1\nSTATUS=stopping: finishing in-flight requests", environment: environment) },
            whileServing: whileServing
        )
    }
}
