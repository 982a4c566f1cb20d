#!/usr/bin/env python3
"""Keep an in-memory copy of a table in sync: its rows now, then every change, with no gap and no
duplicate (evd's snapshot then stream).

    python3 mirror.py TABLE [--until EVENT] [--json]

Prints one line per change (`+ {row}`, `~ {row}`, `- {key}`) after `snapshot: N rows as of seq S`.
With --until, it stops at that custom event (say `mirror.stop`, from `evctl emit mirror.stop`) and,
with --json, prints the copy as JSON (its rows by primary key, sorted). Standard library only.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evd

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("table")
parser.add_argument("--until", help="stop at this custom event (a name with a namespace: mirror.stop)")
parser.add_argument("--json", action="store_true", help="at the end, print the copy as JSON")
args = parser.parse_args()

with evd.Client() as client:
    columns = client.request("describe", table=args.table)["columns"]
    keys = [c["name"] for c in sorted((c for c in columns if c["pk"]), key=lambda c: c["pk"])] or [c["name"] for c in columns]

    def key(row):
        return tuple(row[k] for k in keys)

    copy = {}
    events = ["insert-rows", "upsert-rows", "update-row", "delete-row"] + ([args.until] if args.until else [])
    for kind, item in client.snapshot_and_follow(args.table, events=events):
        if kind == "row":
            copy[key(item)] = item
        elif kind == "end":
            print("snapshot: %d rows as of seq %d" % (len(copy), item), flush=True)
        elif kind == "event":
            name = item["event"]
            if name == args.until:
                break
            if item.get("table") != args.table:
                continue
            if name in ("insert-rows", "upsert-rows"):
                for row in item["rows"]:
                    copy[key(row)] = row
                    print("+", json.dumps(row, default=repr), flush=True)
            elif name == "update-row":
                copy.pop(key(item["before"]), None)
                copy[key(item["after"])] = item["after"]
                print("~", json.dumps(item["after"], default=repr), flush=True)
            elif name == "delete-row":
                copy.pop(key(item["before"]), None)
                print("-", json.dumps(list(key(item["before"])), default=repr), flush=True)

if args.json:
    print(json.dumps([copy[k] for k in sorted(copy)], default=repr))
