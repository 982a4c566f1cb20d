#!/usr/bin/env python3
"""Subscribe to evd's events and print each one as a JSON line. Python standard library only.

    python3 scripts/examples/subscribe.py                     # every event
    python3 scripts/examples/subscribe.py '*_cursor_execute'  # names or globs
    python3 scripts/examples/subscribe.py --count 2 --where table=dogs insert-rows

The socket is found as every evd program finds it: --socket, $EVD_SOCKET,
$RUNTIME_DIRECTORY/evd.sock, $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock.
"""

import argparse
import json
import os
import socket
import sys


def socket_path(explicit=None):
    """Resolve the daemon's socket path as PROTOCOL.md section 1 says."""
    if explicit:
        return explicit
    if os.environ.get("EVD_SOCKET"):
        return os.environ["EVD_SOCKET"]
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.environ["RUNTIME_DIRECTORY"].split(":")[0] + "/evd.sock"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.environ["XDG_RUNTIME_DIR"] + "/evd.sock"
    return "/tmp/evd-%d/evd.sock" % os.getuid()


def messages(sock):
    """Yield each JSON message the daemon sends, one per line."""
    buffered = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


def main():
    parser = argparse.ArgumentParser(description="Print evd's events as JSON lines.")
    parser.add_argument("events", nargs="*", default=["*"], help="event names or globs")
    parser.add_argument("--socket", help="the daemon's socket path")
    parser.add_argument("--count", type=int, help="exit after this many events")
    parser.add_argument("--where", action="append", default=[], metavar="K=V",
                        help="only events whose property K equals V (V parsed as JSON if it can be)")
    args = parser.parse_args()

    where = {}
    for item in args.where:
        key, _, text = item.partition("=")
        try:
            where[key] = json.loads(text)
        except ValueError:
            where[key] = text

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path(args.socket))
    incoming = messages(sock)
    hello = next(incoming)
    assert hello["type"] == "hello", hello

    request = {"op": "subscribe", "id": 1, "events": args.events}
    if where:
        request["where"] = where
    sock.sendall((json.dumps(request) + "\n").encode())

    seen = 0
    for message in incoming:
        if message["type"] == "response":
            if not message["ok"]:
                print("subscribe failed: %s" % message["error"], file=sys.stderr)
                return 1
            continue
        print(json.dumps(message), flush=True)
        if message["type"] == "event":
            seen += 1
            if args.count and seen >= args.count:
                return 0
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
