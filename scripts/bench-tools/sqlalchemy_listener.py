"""SQLAlchemy's own cost of a listener on before/after_cursor_execute: the anchor for what one evd
subscriber to those events adds per statement.

    python sqlalchemy_listener.py --work DIR --n 20000 --reps 3

Run with the bench venv's python. One engine on a SQLite file opened as evd opens its own
(journal_mode=WAL, synchronous=NORMAL, foreign_keys=ON); one connection runs `select 1` and fetches
its rows N times without listeners, then N times with a listener on before_cursor_execute and one on
after_cursor_execute (each counts its calls, as a subscriber counts events), then the listeners are
removed. Per repetition, prints one JSON line: p50/p99 per statement with and without, and the added
µs (p50 and mean), or {"error": ...}.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sqlalchemy_engine  # noqa: E402


def timed(conn, stmt, n):
    """Per-statement latencies (s) of N executions, and their total (s)."""
    lat = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        conn.execute(stmt).all()
        lat.append(time.perf_counter() - t)
    return sorted(lat), time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sa, engine = sqlalchemy_engine.fresh_engine(args.work, "listener.sqlite")

    calls = [0, 0]

    def before(conn, cursor, statement, parameters, context, executemany):
        calls[0] += 1

    def after(conn, cursor, statement, parameters, context, executemany):
        calls[1] += 1

    stmt = sa.text("select 1")
    with engine.connect() as conn:
        timed(conn, stmt, args.n // 10)  # warm up: the statement cache, the pool
        for _ in range(args.reps):
            plain, plain_total = timed(conn, stmt, args.n)
            sa.event.listen(engine, "before_cursor_execute", before)
            sa.event.listen(engine, "after_cursor_execute", after)
            calls[:] = [0, 0]
            listened, listened_total = timed(conn, stmt, args.n)
            sa.event.remove(engine, "before_cursor_execute", before)
            sa.event.remove(engine, "after_cursor_execute", after)
            if calls != [args.n, args.n]:
                print(json.dumps({"error": f"the listeners were called {calls} times, not {args.n} each"}), flush=True)
                sys.exit(1)
            n = args.n
            p50 = lambda lat: lat[len(lat) // 2] * 1e6  # noqa: E731
            p99 = lambda lat: lat[int(len(lat) * 0.99)] * 1e6  # noqa: E731
            print(json.dumps({
                "n": n, "version": sa.__version__,
                "plain_p50_us": round(p50(plain), 2), "plain_p99_us": round(p99(plain), 2),
                "p50_us": round(p50(listened), 2), "p99_us": round(p99(listened), 2),
                "per_sec": round(n / listened_total), "plain_per_sec": round(n / plain_total),
                "added_p50_us": round(p50(listened) - p50(plain), 3),
                "added_mean_us": round((listened_total - plain_total) / n * 1e6, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
