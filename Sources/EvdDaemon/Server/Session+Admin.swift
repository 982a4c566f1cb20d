import EvdClient
import OrderedCollections

/// `execution_options`, `stats`, `invalidate`, `dispose`: the session's and the daemon's settings and pools.
extension Session {
    func executionOptions(_ request: EvdOperation.ExecutionOptions, _ state: inout SessionState) throws -> JSONValue {
        try request.checkKnownOptions()
        let options = request.options
        if request.scope == .engine {
            try self.require(.admin)
            self.core.engineOptions.withLock { engine in
                for (key, value) in options { engine[key] = value }
            }
            self.core.bus.emit(.setEngineExecutionOptions, self.origin) { ["options": .object(options)] }
        } else {
            try self.require(.executeSQL)
            for (key, value) in options { state.options[key] = value }
            self.core.bus.emit(.setConnectionExecutionOptions, self.origin) { ["options": .object(options)] }
        }
        return ["options": .object(self.effectiveOptions(state))]
    }

    /// `invalidate`: closes one pooled connection (or all of a database's) as it comes back.
    func invalidate(_ request: EvdOperation.Invalidate) async throws -> JSONValue {
        let pool = try self.core.pool(request.database)
        let numbers = await pool.invalidate(
            number: request.connection.map(Int.init),
            soft: request.soft ?? false,
            origin: self.origin
        )
        return ["invalidated": .array(numbers.map { .integer($0) })]
    }

    /// Engine options overlaid with the session's own.
    func effectiveOptions(_ state: SessionState) -> JSONObject {
        var options = self.core.engineOptions.withLock { $0 }
        for (key, value) in state.options { options[key] = value }
        return options
    }
}
