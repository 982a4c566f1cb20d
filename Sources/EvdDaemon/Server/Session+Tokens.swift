import EvdClient
import OrderedCollections

/// `login`, `logout` and `create_token` (PROTOCOL.md §3, §8): tokens as in Datasette.
extension Session {
    /// Ops a session whose token has expired may still send: they need no permission, and `login`
    /// and `logout` are how it gets out of that state.
    static let opsAfterTokenExpiry: Set<String> = Set([EvdOperation.Name.ping, .events, .login, .logout].map(\.rawValue))

    /// Throws `token_expired` when the session logged in with a token that has expired since,
    /// unless `op` is one of `opsAfterTokenExpiry`.
    func checkTokenExpiry(_ op: String) throws(EvdError) {
        guard let token = self.actor.token, let expires = token.expires, token.isExpired(at: TokenAuthority.now()),
            !Self.opsAfterTokenExpiry.contains(op)
        else { return }
        throw EvdError(
            .tokenExpired,
            "this session's token expired at \(EventTime.text(unixSeconds: expires)); log in with another token, or log out"
        )
    }

    /// `login {token}`: the session's actor becomes the token's (with the connection's pid).
    /// Returns the result and the `login` event's seq.
    func login(token: String) async throws -> (JSONValue, Int64?) {
        let payload: TokenPayload
        do {
            payload = try self.core.tokens.verify(token, now: TokenAuthority.now())
        } catch {
            // The token itself is never logged.
            self.logger.debug("token login refused", metadata: ["error.code": "\(error.code)"])
            throw error
        }
        let actor = payload.actor(pid: self.peerActor.pid)
        self.setActor(actor)
        self.logger.debug("logged in with a token", metadata: ["actor.uid": "\(actor.uid)"])
        let seq = await self.publishSessionEvent(.login, ["method": "token"])
        return (["actor": actor.jsonValue], seq)
    }

    /// `logout`: emits `logout` as the current actor, then the session is its peer's again.
    /// Returns the event's seq (nil: none given).
    func logout() async -> Int64? {
        let seq = await self.publishSessionEvent(.logout, [:])
        self.setActor(self.peerActor)
        return seq
    }

    /// `create_token`: a token for the session's actor, narrowed by the restrictions asked for and
    /// by every restriction the session's own token carries, expiring no later than that token.
    /// Returns the result and the `create-token` event's seq.
    func createToken(_ request: EvdOperation.CreateToken) async throws -> (JSONValue, Int64?) {
        let expiresAfter = request.expiresAfter
        let (restrictions, given) = try TokenRestrictions.parse(request)
        if let field = given, !restrictions.namesAnyAction {
            throw EvdError.badRequest(
                field: field,
                "the restrictions name no action, so the token could do nothing; name at least one action"
            )
        }
        try self.require(.createToken)
        let actor = self.actor
        let now = TokenAuthority.now()
        // Whole seconds, rounded up: the token lasts at least expires_after seconds.
        var expires = expiresAfter.map { Int64((now + Double($0)).rounded(.up)) }
        if let inherited = actor.token?.expires { expires = min(expires ?? inherited, inherited) }
        let payload = TokenPayload(
            actor: actor,
            restrictions: actor.restrictions + (given == nil ? [] : [restrictions]),
            created: Int64(now),
            expires: expires
        )
        let token = self.core.tokens.sign(payload)
        var properties: JSONObject = ["expires_after": expiresAfter.map(JSONValue.int) ?? .null]
        for (key, value) in restrictions.jsonValue.objectValue ?? [:] { properties[key] = value }
        // A committed event: the client's OK means it is journaled (never with the token).
        let seq = try await self.publishJournaled(.createToken, properties)
        return (["token": .string(token)], seq)
    }
}
