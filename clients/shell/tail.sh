#!/bin/sh
# tail.sh [EVENT...] — subscribes (default: every event) and prints each event as one JSON line,
# like `evtail --json`. COUNT=N exits after N events; WHERE='{"table":"dogs"}' filters;
# SINCE=SEQ replays journaled events after SEQ first.
#
#   ./tail.sh insert-rows update-row delete-row
#   COUNT=1 ./tail.sh 'myapp.*' | jq .version
set -eu
if [ -n "${EVD_CONNECTED:-}" ]; then
    # Run by socat below, with the socket as stdin and stdout: subscribe, then print the events
    # on fd 3 (the caller's stdout). A failed subscribe goes to stderr and ends it.
    printf '%s\n' "$EVD_REQUEST"
    status=0
    # socat ignores SIGPIPE and jq would inherit that: restore it, so `tail.sh | head -1` ends.
    env --default-signal=PIPE jq -cn --unbuffered --argjson count "${COUNT:-0}" '
        def events: inputs
            | if .type == "response" and .ok == false
              then (.error | "tail.sh: subscribe: \(.code): \(.message)\n" | halt_error(1))
              else select(.type == "event") end;
        if $count > 0 then limit($count; events) else events end' >&3 || status=$?
    # socat does not pass on an exit status: leave a failure (not a closed pipe) in a file for
    # the first run, and exit 0 so socat has nothing to complain about.
    [ "$status" = 0 ] || [ "$status" = 141 ] || echo "$status" >"$EVD_STATUS"
    exit 0
fi
sock=$("$(dirname "$0")/evd-socket")
EVD_REQUEST=$(jq -cn --argjson where "${WHERE:-null}" --argjson since "${SINCE:-null}" \
    '{op: "subscribe", id: 1, events: ($ARGS.positional | if length == 0 then ["*"] else . end)}
     + (if $where then {where: $where} else {} end) + (if $since then {since: $since} else {} end)' \
    --args "$@")
. "$(dirname "$0")/evd-stream"
evd_stream "$sock"
