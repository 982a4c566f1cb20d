"""The SQLAlchemy anchors' engine: a fresh SQLite file opened as evd opens its own."""
import json
import os
import sys

# What evd sets on every connection (ConnectionPool's pragmas, `do_connect`).
EVD_PRAGMAS = ("journal_mode = wal", "synchronous = normal", "foreign_keys = on")


def fresh_engine(work, name):
    """(sqlalchemy, engine) on WORK/NAME, removed first, with evd's pragmas on every connection.
    Prints {"error": ...} and exits 1 when sqlalchemy is not installed."""
    try:
        import sqlalchemy as sa
    except ImportError as e:
        print(json.dumps({"error": f"sqlalchemy is not installed: {e}"}), flush=True)
        sys.exit(1)
    os.makedirs(work, exist_ok=True)
    db = os.path.join(work, name)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    engine = sa.create_engine(f"sqlite:///{db}")
    with_evd_pragmas(sa, engine)
    return sa, engine


def with_evd_pragmas(sa, engine):
    """Sets evd's pragmas on every connection `engine` opens."""

    @sa.event.listens_for(engine, "connect")
    def pragmas(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        for pragma in EVD_PRAGMAS:
            cur.execute(f"pragma {pragma}")
        cur.close()
