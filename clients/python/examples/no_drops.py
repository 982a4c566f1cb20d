#!/usr/bin/env python3
"""A policy listener: denies DROP, caps a SELECT without LIMIT at --max-rows rows, allows the rest.

    python3 no_drops.py [--max-rows N] [--dry-run] [--count N]

Run it, then try `evctl sql "drop table dogs"` (error vetoed) and `evctl sql "select * from dogs"`.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evd

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--max-rows", type=int, default=1000, help="the LIMIT added to a SELECT without one")
parser.add_argument("--dry-run", action="store_true", help="report decisions without enforcing them")
parser.add_argument("--count", type=int, help="exit after answering this many vetoes")
args = parser.parse_args()

client = evd.Client()


@client.veto("before_cursor_execute", name="no-drops", mode="dry_run" if args.dry_run else "enforce")
def policy(veto):
    statement = veto["statement"].strip().rstrip(";")
    if re.match(r"drop\b", statement, re.IGNORECASE):
        print("deny:", statement, flush=True)
        return evd.deny("DROP is not allowed here")
    if re.match(r"select\b.*\bfrom\b", statement, re.IGNORECASE | re.DOTALL) and not re.search(r"\blimit\b", statement, re.IGNORECASE):
        print("modify:", statement, flush=True)
        return evd.modify(statement="%s limit %d" % (statement, args.max_rows))
    return evd.ALLOW


print("listening as subscription %d" % policy.subscription, flush=True)
try:
    client.serve(count=args.count)
except KeyboardInterrupt:
    pass
