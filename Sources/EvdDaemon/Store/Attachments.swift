import CSQLite
import EvdClient

/// A database a session attached (`ATTACH DATABASE 'file' AS name`). SQLite keeps an attachment
/// on its connection; evd keeps it on the session, which attaches it again on every connection
/// it checks out later (`PooledConnection.reattach`): it lasts for the session, as it would on a
/// connection of its own, and no other session ever sees it (such a connection is closed at
/// checkin, `AuthorizerObserver.leftSessionState`).
struct Attachment: Sendable, Equatable {
    /// The schema's name (`s` in `s.t`).
    let name: String
    /// The file's full path, as SQLite reports it (`PRAGMA database_list`).
    let file: String
    /// Whether SQLite opened it read-only (`mode=ro`): it is attached read-only again.
    let readOnly: Bool

    /// The URI it is attached again by: its file, never created (`mode=rw`: a file deleted since
    /// fails instead of coming back empty), read-only if it was.
    var uri: String {
        var path = ""
        for character in self.file.unicodeScalars {
            switch character {
            case "%": path += "%25"
            case "?": path += "%3f"
            case "#": path += "%23"
            default: path.unicodeScalars.append(character)
            }
        }
        // `file://` and an empty authority: a path that starts with `//` stays a path.
        return "file://" + path + (self.readOnly ? "?mode=ro" : "?mode=rw")
    }
}

/// Why a session's attachments could not all be attached again on a connection it checked out:
/// the error its request fails with, and the attachments the session keeps.
struct ReattachError: Error {
    let error: EvdError
    let kept: [Attachment]
}

extension PooledConnection {
    /// The databases attached to the connection (`main` and `temp` aside), read on evd's own path:
    /// no policy judges it. In-memory ones (no file) are left out: another connection could not
    /// attach them again with their contents.
    func attachedDatabases() throws(SQLiteError) -> [Attachment] {
        guard let list = try self.sqlite.prepare(SQLText("PRAGMA database_list"), from: 0) else { return [] }
        var attachments: [Attachment] = []
        while try list.step() {
            guard let name = list.column(1).stringValue, name != "main", name != "temp",
                let file = list.column(2).stringValue, !file.isEmpty
            else { continue }
            let readOnly = sqlite3_db_readonly(self.sqlite.handle, name) == 1
            attachments.append(Attachment(name: name, file: file, readOnly: readOnly))
        }
        return attachments
    }

    /// Attaches a session's `attachments` on this connection, before its request's first
    /// statement (and before its BEGIN), each judged by `policy` (the session's actor now) as the
    /// client's own ATTACH would be. The connection is then closed at checkin, as after the
    /// client's own ATTACH, so that no other session inherits them.
    ///
    /// Throws a `ReattachError`: a refused attachment fails the request with `permission_denied`
    /// and the session keeps none; one whose file fails (deleted since, not a database) fails it
    /// with SQLite's error and the session keeps the others; a lock conflict (`busy`) keeps all.
    func reattach(_ attachments: [Attachment], policy: SQLPolicy?) throws(ReattachError) {
        guard !attachments.isEmpty else { return }
        self.observer.leftSessionState = true
        for (index, attachment) in attachments.enumerated() {
            do {
                try self.attach(attachment, policy: policy)
            } catch let refusal as EvdError {
                throw ReattachError(error: refusal, kept: [])
            } catch let error as SQLiteError {
                var failure = error.evdError
                failure.message =
                    "the session's attached database '\(attachment.name)' (\(attachment.file)) could not be attached again"
                    + (error.isBusy ? "" : ", and is no longer attached") + ": " + error.message
                failure.extra["schema"] = .string(attachment.name)
                var kept = attachments
                if !error.isBusy { kept.remove(at: index) }
                throw ReattachError(error: failure, kept: kept)
            } catch {
                throw ReattachError(error: EvdError(.internalError, "\(error)"), kept: attachments)
            }
        }
    }

    /// `ATTACH DATABASE ? AS ?`, its file and name bound, prepared and stepped with the client's
    /// judging on: the authorizer checks it against `policy`, and notes the state it leaves.
    private func attach(_ attachment: Attachment, policy: SQLPolicy?) throws {
        let observer = self.observer
        observer.clearStatementRecord()
        observer.policy = policy
        observer.rewriters = []
        observer.facts = StatementFacts()
        observer.judgingClientSQL = true
        defer {
            observer.judgingClientSQL = false
            observer.policy = nil
        }
        let statement: SQLiteStatement?
        do {
            statement = try self.sqlite.prepare(SQLText("ATTACH DATABASE ? AS ?"), from: 0)
        } catch {
            if let refused = observer.refused {
                var denied = refused.policy.refused(refused.action, table: refused.table)
                denied.message +=
                    ": the session's attached database '\(attachment.name)' cannot be attached again there, and the session no longer has any attachment"
                denied.extra["schema"] = .string(attachment.name)
                throw denied
            }
            throw error
        }
        guard let statement else { return }
        try statement.bind(text: attachment.uri, at: 1)
        try statement.bind(text: attachment.name, at: 2)
        _ = try statement.step()
    }
}
