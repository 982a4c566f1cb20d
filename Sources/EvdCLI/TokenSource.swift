import EvdClient

/// Where a command-line tool takes its token from: `--token TOKEN`, else `$EVD_TOKEN`; none when
/// both are empty or unset (the connection then acts as the peer's own uid).
public enum TokenSource {
    public static func resolve(explicit: String?, environment: [String: String]) -> String? {
        if let explicit, !explicit.isEmpty { return explicit }
        if let token = environment["EVD_TOKEN"], !token.isEmpty { return token }
        return nil
    }
}
