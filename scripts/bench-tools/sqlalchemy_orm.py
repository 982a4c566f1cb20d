"""The SQLAlchemy ORM workload, on whatever URL it is given: `sqlite:///FILE` in process, or `evd:///DB`.

    python sqlalchemy_orm.py --url sqlite:////tmp/w/orm.sqlite --reps 3
    python sqlalchemy_orm.py --url 'evd:///main?socket=/tmp/w/evd.sock' --reps 3

Run with the bench venv's python; `evd:///` needs the `evd` package installed there (its entry point
registers the dialect). A sqlite:/// file is removed first and opened as evd opens its own
databases (journal_mode=WAL, synchronous=NORMAL, foreign_keys=ON on every connection); on evd the
daemon sets those itself. Each repetition maps a declarative model (benchrows' columns: id integer
primary key, name, score, tag) onto a fresh table (dropped first if it exists) and times, each on
its own:

  singles  SINGLES single-row inserts, each `session.add(obj); session.commit()` in one Session
           (ids assigned by the database, read back as the ORM reads them)
  bulk     a BULK-row insert in one transaction, the 2.0 ORM bulk INSERT:
           `session.execute(insert(Model), list_of_dicts); session.commit()` (the dicts are built
           before timing)
  reads    READS point reads by primary key, each `session.get(Model, id)` in a fresh Session (an
           empty identity map, so every read reaches the database), ids spread over the table

then checks the row count (SINGLES + BULK) and drops the table. Prints one JSON line per
repetition: per phase n, seconds, per_sec and (singles, reads) p50/p99 per operation in µs, and on
evd the requests the driver sent in it by op (evd.Client.submit counted: what a round trip per
statement costs is the gap to sqlite:///), with the versions; or {"error": ...}.
"""
import argparse
import collections
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchrows  # noqa: E402
from sqlalchemy_engine import with_evd_pragmas  # noqa: E402


def fail(message):
    print(json.dumps({"error": message}), flush=True)
    sys.exit(1)


# Requests sent to evd, by op, since the last phase (evd only).
requests = collections.Counter()


def count_requests():
    import evd

    submit = evd.Client.submit  # every request goes through it, awaited (request) or not

    def counted(self, op, **args):
        requests[op] += 1
        return submit(self, op, **args)

    evd.Client.submit = counted


def phase(n, latencies, elapsed, counted):
    out = {"n": n, "seconds": round(elapsed, 6), "per_sec": round(n / elapsed, 1)}
    if latencies:
        lat = sorted(latencies)
        out["p50_us"] = round(lat[len(lat) // 2] * 1e6, 2)
        out["p99_us"] = round(lat[int(len(lat) * 0.99)] * 1e6, 2)
    if counted:
        out["requests"] = dict(sorted(requests.items()))
    requests.clear()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--singles", type=int, default=1000)
    ap.add_argument("--bulk", type=int, default=10000)
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--table", default="orm_bench", help="table name prefix (REP is appended)")
    args = ap.parse_args()
    try:
        import sqlalchemy as sa
        from sqlalchemy import orm
    except ImportError as e:
        fail(f"sqlalchemy is not installed: {e}")

    url = sa.engine.make_url(args.url)
    in_process = url.get_backend_name() == "sqlite" and url.get_driver_name() in ("pysqlite", "")
    if in_process:
        db = url.database
        if not db or db == ":memory:":
            fail("sqlite:/// needs a file (the bench compares files on disk)")
        os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
    shown = f"{url.drivername}:///{url.database or ''}"  # no query: it may hold a token
    try:
        engine = sa.create_engine(url)
    except Exception as e:  # e.g. NoSuchModuleError: the evd package is not installed
        fail(f"create_engine({shown}): {type(e).__name__}: {str(e).splitlines()[0]}")
    counted = not in_process and engine.dialect.driver == "evd"
    if counted:
        count_requests()
    if in_process:
        with_evd_pragmas(sa, engine)

    types = {"integer": sa.Integer, "text": sa.Text, "float": sa.Float}
    try:
        with engine.connect() as conn:
            sqlite_version = conn.exec_driver_sql("select sqlite_version()").scalar()
    except Exception as e:
        fail(f"connecting to {shown}: {type(e).__name__}: {str(e).splitlines()[0]}")

    total = args.singles + args.bulk
    for rep in range(1, args.reps + 1):
        class Base(orm.DeclarativeBase):
            pass

        attrs = {"__tablename__": f"{args.table}_{rep}"}
        for name, kind in benchrows.COLUMNS:
            attrs[name] = orm.mapped_column(types[kind], primary_key=(name == "id"))
        Model = type(f"OrmBench{rep}", (Base,), attrs)
        table = Model.__table__
        # Values as in the other bench rows, without the id: the database assigns it.
        def values(i):
            row = benchrows.row(i)
            del row["id"]
            return row

        try:
            Base.metadata.drop_all(engine)
            Base.metadata.create_all(engine)
            requests.clear()

            # (a) single-row inserts, a commit each
            lat = []
            with orm.Session(engine) as session:
                start = time.perf_counter()
                for i in range(1, args.singles + 1):
                    t = time.perf_counter()
                    session.add(Model(**values(i)))
                    session.commit()
                    lat.append(time.perf_counter() - t)
                singles = phase(args.singles, lat, time.perf_counter() - start, counted)

            # (b) the ORM bulk INSERT of BULK rows, one transaction
            rows = [values(i) for i in range(args.singles + 1, total + 1)]
            with orm.Session(engine) as session:
                start = time.perf_counter()
                session.execute(sa.insert(Model), rows)
                session.commit()
                bulk = phase(args.bulk, [], time.perf_counter() - start, counted)

            # (c) point reads by primary key, a fresh Session (identity map) each
            ids = [random.Random(rep * 7919 + k).randint(1, total) for k in range(args.reads)]
            lat = []
            start = time.perf_counter()
            for i in ids:
                t = time.perf_counter()
                with orm.Session(engine) as session:
                    obj = session.get(Model, i)
                    name = obj.name if obj is not None else None
                lat.append(time.perf_counter() - t)
                if name != f"name-{i:011d}":
                    fail(f"{table.name}: session.get(id={i}) gave name {name!r}, expected 'name-{i:011d}'")
            reads = phase(args.reads, lat, time.perf_counter() - start, counted)

            with engine.connect() as conn:
                stored = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
            if stored != total:
                fail(f"{table.name} holds {stored} rows, expected {total}")
            Base.metadata.drop_all(engine)
        except SystemExit:
            raise
        except Exception as e:
            fail(f"{table.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print(json.dumps({"url": url.drivername, "singles": singles, "bulk": bulk, "reads": reads,
                          "version": sa.__version__, "sqlite_version": sqlite_version,
                          "python": "%d.%d.%d" % sys.version_info[:3]}), flush=True)
    engine.dispose()


if __name__ == "__main__":
    main()
