#!/usr/bin/env python3
"""Print every committed row change as it happens: python3 listen.py [EVENT...]"""
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evd

with evd.Client() as client:
    for event in client.events(*sys.argv[1:] or ["insert-rows", "update-row", "delete-row"]):
        print(event["seq"], event["event"], event.get("table"), event.get("num_rows", event.get("pks")), flush=True)
