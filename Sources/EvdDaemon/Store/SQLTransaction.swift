import CSQLite
import EvdClient
import OrderedCollections

extension SQLRun {
    /// Wraps a request: the body, `after_execute`, and the implicit transaction's end.
    func inRequest<T>(_ body: () throws(EvdError) -> (T, Int64)) throws(EvdError) -> T {
        let capture = self.connection.capture
        self.connection.observer.policy = self.policy
        defer { self.connection.observer.policy = nil }
        let twoPhase = self.connection.twoPhase  // its redo log needs every change, whole
        capture.active = twoPhase || self.pool.journal != nil || self.bus.wantsCommittedChanges || !capture.isEmpty
        capture.images = twoPhase || self.bus.wantsRowImages || self.pool.journal?.settings.rowImages == true
        let value: T
        let changes: Int64
        do {
            (value, changes) = try body()
        } catch {
            if self.implicitTransaction && (self.group?.memberOpen ?? self.sqlite.inTransaction) { self.rollback() }
            throw error
        }
        self.bus.emit(.afterExecute, self.origin) {
            var properties = self.requestProperties()
            properties["changes"] = .int(changes)
            return properties
        }
        if self.implicitTransaction {
            do {
                try self.vetoable(.commit) { self.transactionProperties() }
            } catch {
                self.rollback()  // a denied commit rolls back: nothing becomes visible
                throw error
            }
            do {
                if let group = self.group {
                    _ = try group.commitMember(self)  // committed with the group, later
                } else {
                    try self.connection.commit(
                        database: self.database,
                        origin: self.origin,
                        bus: self.bus,
                        journal: self.pool.journal
                    )
                }
            } catch {
                self.rollback()
                throw self.failed(error, statement: "COMMIT", parameters: .array([]))
            }
        }
        return value
    }

    func transactionProperties() -> JSONObject {
        var properties = self.base()
        properties["implicit"] = .bool(self.implicitTransaction)
        return properties
    }

    /// Opens the request's own transaction (`begin`, vetoable).
    func beginImplicit(immediate: Bool) throws(EvdError) {
        try self.beginEvent()
        try self.beginSQL(immediate: immediate)
    }

    /// The request's own transaction begins (`begin`, vetoable): SQLAlchemy's `Connection.begin`,
    /// before any execute. SQLite's `BEGIN` comes with the first statement (`beginSQL`), once evd
    /// knows whether it writes, as pysqlite's implicit BEGIN does.
    func beginEvent() throws(EvdError) {
        try self.vetoable(.begin) { self.transactionProperties() }
    }

    /// SQLite's `BEGIN` of the request's own transaction, after its `begin` event.
    func beginSQL(immediate: Bool) throws(EvdError) {
        if let group = self.group { return try group.beginMember(self) }
        do {
            try self.connection.run(own: immediate ? "BEGIN IMMEDIATE" : "BEGIN")
        } catch {
            throw self.failed(error, statement: immediate ? "BEGIN IMMEDIATE" : "BEGIN", parameters: .array([]))
        }
    }

    private func rollback() {
        if let group = self.group {
            group.rollbackMember()
        } else {
            self.connection.capture.discardAll()
            self.connection.schema.clear()  // the schema cookie goes back (see `SchemaCache`)
            try? self.sqlite.exec("ROLLBACK")
        }
        self.emitRollback()
    }

    /// `rollback`: the request's transaction ended without committing.
    func emitRollback() {
        self.bus.emit(.rollback, self.origin) { self.transactionProperties() }
    }
}
