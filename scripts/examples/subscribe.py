#!/usr/bin/env python3
"""Subscribe to evd's events and print each one as a JSON line. Python standard library only:
it uses clients/python/evd.py, evd's Python client.

    python3 scripts/examples/subscribe.py                     # every event
    python3 scripts/examples/subscribe.py '*_cursor_execute'  # names or globs
    python3 scripts/examples/subscribe.py --count 2 --where table=dogs insert-rows

The socket is found as every evd program finds it: --socket, $EVD_SOCKET,
$RUNTIME_DIRECTORY/evd.sock, $XDG_RUNTIME_DIR/evd.sock, /tmp/evd-$UID/evd.sock.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients", "python"))
import evd  # noqa: E402


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

    try:
        client = evd.Client(args.socket)
        events = client.events(*args.events, **({"where": where} if where else {}))
    except evd.EvdError as error:
        print("subscribe failed: %s" % error, file=sys.stderr)
        return 1
    for seen, event in enumerate(events, 1):
        print(json.dumps(event), flush=True)
        if args.count and seen >= args.count:
            break
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, BrokenPipeError):
        sys.exit(0)
