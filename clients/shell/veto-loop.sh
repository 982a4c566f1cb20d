#!/bin/sh
# veto-loop.sh — a policy listener: allows every SQL statement except DROP, which it denies.
# Prints each reply it sends. NAME names the listener (the "by" a denied client sees);
# COUNT=N exits after N decisions.
#
#   ./veto-loop.sh &
#   evctl sql "drop table dogs"     # evctl: vetoed: ... by no-drop: DROP is not allowed
set -eu
if [ -n "${EVD_CONNECTED:-}" ]; then
    # Run by socat below, with the socket as stdin and stdout: subscribe, then turn each veto into
    # a reply; tee sends it to the daemon and shows it on fd 3 (the caller's stdout). An error
    # response (a failed subscribe, a rejected reply) goes to stderr and ends it.
    printf '%s\n' "$EVD_REQUEST"
    { jq -cn --unbuffered --argjson count "${COUNT:-0}" '
        def replies: inputs
            | if .type == "response" and .ok == false
              then (.error | "veto-loop.sh: \(.code): \(.message)\n" | halt_error(1))
              else select(.type == "veto") end
            | if (.statement | test("^\\s*drop\\b"; "i"))
              then {op: "reply", seq, action: "deny", reason: "DROP is not allowed"}
              else {op: "reply", seq, action: "allow"} end;
        if $count > 0 then limit($count; replies) else replies end' || echo $? >"$EVD_STATUS"
    } | tee -a /dev/fd/3  # -a: /dev/fd/3 is reopened, and a file must not be truncated
    exit 0  # socat does not pass on an exit status: a failure is left in $EVD_STATUS
fi
sock=$("$(dirname "$0")/evd-socket")
EVD_REQUEST=$(jq -cn --arg name "${NAME:-no-drop}" \
    '{op: "subscribe", id: 1, veto: ["before_cursor_execute"], name: $name}')
. "$(dirname "$0")/evd-stream"
evd_stream "$sock"
