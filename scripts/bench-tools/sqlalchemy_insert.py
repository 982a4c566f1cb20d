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
import sqlalchemy_engine  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--total", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sa, engine = sqlalchemy_engine.fresh_engine(args.work, "sqlalchemy.sqlite")

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
