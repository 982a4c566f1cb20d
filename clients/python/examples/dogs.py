#!/usr/bin/env python3
"""Requests and errors: creates a table, inserts rows, reads them back, and shows an EvdError."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evd

with evd.Client(timeout=10) as client:
    print("connected as", client.actor["id"], "to", client.hello["databases"])
    client.execute("create table if not exists dogs(id integer primary key, name text)")
    client.request("insert", table="dogs", rows=[{"name": "Rex"}, {"name": "Cleo"}])
    result = client.execute("select id, name from dogs order by id")
    for row in result["rows"]:
        print(dict(zip(result["columns"], row)))
    try:
        client.execute("select * from no_such_table")
    except evd.EvdError as error:
        print("error:", error.code, error.sqlite_code, "-", error.message)
