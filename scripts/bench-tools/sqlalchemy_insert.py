"""SQLAlchemy Core under the bulk-insert bench: in-process executemany into a fresh SQLite file.

    python sqlalchemy_insert.py --work DIR --total 200000 --batch 1000 --reps 3

Run with the bench venv's python. Opens the database as evd opens its own (journal_mode=WAL,
synchronous=NORMAL, foreign_keys=ON), creates one table per repetition, then times
`conn.execute(table.insert(), rows)` for each batch, each batch in its own transaction, as each evd
`insert` request is. The row dicts are built before timing. Prints one JSON line per repetition, or
{"error": ...}.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchrows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--total", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    try:
        import sqlalchemy as sa
    except ImportError as e:
        print(json.dumps({"error": f"sqlalchemy is not installed: {e}"}), flush=True)
        sys.exit(1)

    os.makedirs(args.work, exist_ok=True)
    db = os.path.join(args.work, "sqlalchemy.sqlite")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    engine = sa.create_engine(f"sqlite:///{db}")

    @sa.event.listens_for(engine, "connect")
    def pragmas(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode = wal", "synchronous = normal", "foreign_keys = on"):
            cur.execute(f"pragma {pragma}")
        cur.close()

    types = {"integer": sa.Integer, "text": sa.Text, "float": sa.Float}
    batches = benchrows.batches(args.total, args.batch)
    metadata = sa.MetaData()
    for rep in range(1, args.reps + 1):
        table = sa.Table(f"bench_{rep}", metadata,
                         *[sa.Column(n, types[t], primary_key=(n == "id")) for n, t in benchrows.COLUMNS])
        metadata.create_all(engine, tables=[table])
        insert = table.insert()
        lat = []
        start = time.perf_counter()
        for rows in batches:
            t = time.perf_counter()
            with engine.begin() as conn:
                conn.execute(insert, rows)
            lat.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        with engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
        if stored != args.total:
            print(json.dumps({"error": f"{table.name} holds {stored} rows, expected {args.total}"}), flush=True)
            sys.exit(1)
        print(json.dumps(benchrows.summary(args.total, args.batch, lat, elapsed, version=sa.__version__)), flush=True)


if __name__ == "__main__":
    main()
