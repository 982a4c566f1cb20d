#!/usr/bin/env python3
"""A veto listener that refuses every DELETE statement (SQLAlchemy's session.delete included).

    python3 no_deletes.py [--table NAME] [--count N]

Standard library only (evd's client). Deleting is what this policy audits: the application gets
error `vetoed` (through SQLAlchemy: OperationalError whose .orig is evd.dbapi.Vetoed).
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evd

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--table", help="refuse deletes from this table only")
parser.add_argument("--count", type=int, help="exit after answering this many vetoes")
args = parser.parse_args()

client = evd.Client()


@client.veto("before_cursor_execute", name="no-deletes")
def policy(veto):
    match = re.match(r"\s*delete\s+from\s+[\"`\[]?(\w+)", veto["statement"], re.IGNORECASE)
    if match and (args.table is None or match.group(1).lower() == args.table.lower()):
        return evd.deny("deleting from %s needs a ticket" % match.group(1))
    return evd.ALLOW


print("listening as subscription %d" % policy.subscription, flush=True)
try:
    client.serve(count=args.count)
except KeyboardInterrupt:
    pass
