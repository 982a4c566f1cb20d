#!/bin/sh
# request.sh OP [ARGS-JSON] — sends one request and prints its result (JSON) on stdout; an error
# goes to stderr as CODE: MESSAGE, with exit status 1.
#
#   ./request.sh ping
#   ./request.sh execute '{"sql": "select ? + 1", "params": [41]}'
#   ./request.sh events | jq -r '.events[].name'
set -eu
if [ -n "${EVD_CONNECTED:-}" ]; then
    # Run by socat below, with the socket as stdin and stdout: send the request, then skip the
    # hello and write the response to fd 3 (the caller's stdout).
    printf '%s\n' "$EVD_REQUEST"
    exec jq -cn 'first(inputs | select(.type == "response"))' >&3
fi
[ $# -ge 1 ] || { echo "usage: request.sh OP [ARGS-JSON]" >&2; exit 2; }
sock=$("$(dirname "$0")/evd-socket")
EVD_REQUEST=$(jq -cn --arg op "$1" --argjson args "${2:-{\}}" '$args + {op: $op, id: 1}')
response=$(EVD_CONNECTED=1 EVD_REQUEST="$EVD_REQUEST" socat -t 0.1 UNIX-CONNECT:"$sock" EXEC:"$0" 3>&1)
[ -n "$response" ] || { echo "request.sh: no response from $sock" >&2; exit 1; }
if [ "$(printf '%s\n' "$response" | jq .ok)" = true ]; then
    printf '%s\n' "$response" | jq -c .result
else
    printf '%s\n' "$response" | jq -r '.error | "\(.code): \(.message)"' >&2
    exit 1
fi
