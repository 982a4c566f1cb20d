"""Gives Datasette's connections the durability evd's have (WAL, synchronous=NORMAL), so the bulk-insert
comparison measures the servers, not fsync policy. The database file is put in WAL mode before Datasette
starts; this sets synchronous, which is per connection."""
from datasette import hookimpl


@hookimpl
def prepare_connection(conn):
    conn.execute("pragma synchronous = normal")
