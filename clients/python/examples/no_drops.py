#!/usr/bin/env python3
"""A policy listener: denies DROP statements, rewrites `select now()` for SQLite, allows the rest.

    python3 no_drops.py [--dry-run] [--count N]

Run it, then try `evctl sql "drop table dogs"` (error vetoed) and `evctl sql "select now()"`.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evd

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dry-run", action="store_true", help="report decisions without enforcing them")
parser.add_argument("--count", type=int, help="exit after answering this many vetoes")
args = parser.parse_args()

client = evd.Client()


@client.veto("before_cursor_execute", name="no-drops", mode="dry_run" if args.dry_run else "enforce")
def policy(veto):
    statement = veto["statement"]
    if re.match(r"\s*drop\b", statement, re.IGNORECASE):
        print("deny:", statement, flush=True)
        return evd.deny("DROP is not allowed here")
    if re.fullmatch(r"\s*select\s+now\(\)\s*", statement, re.IGNORECASE):
        print("modify:", statement, flush=True)
        return evd.modify(statement="select datetime('now')")
    return evd.ALLOW


print("listening as subscription %d" % policy.subscription, flush=True)
try:
    client.serve(count=args.count)
except KeyboardInterrupt:
    pass
