"""Datasette's write API under the insert benches: POST /db/TABLE/-/insert.

    python datasette_insert.py --work DIR --total 200000 --batch 1000 --reps 3 [--single N] [--concurrent N --clients 8]

Workloads, each in a fresh table per repetition, all against one server:
  bulk        --total rows in --batch-row requests, one after another (rows/s)
  single      --single one-row requests from one client, one after another (p50/p99 latency)
  concurrent  --concurrent one-row requests from --clients client processes between them, each
              sending its next request when the last one is answered; they start together (rows/s)

Run with the bench venv's python (datasette==1.0a41 installed). Starts `datasette serve` on a Unix
socket (like evd's, so neither side pays for TCP) with a fresh WAL database, a root API token and
max_insert_rows raised to the batch size; creates one table per repetition via POST /db/-/create, then
times the insert batches one after another over one keep-alive connection (http.client). All request
bodies are encoded before timing. Prints one JSON line per repetition with its "workload", or
{"error": ..., "workload": ...} (workload "all" when the server could not be set up).

`client_cpu_share` is the client's CPU time over the elapsed time: near 0 means the client waited on
Datasette nearly all the time, so it is not the bottleneck.
"""
import argparse
import http.client
import json
import multiprocessing
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchrows  # noqa: E402


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def fail(message, workload="all"):
    print(json.dumps({"error": message, "workload": workload}), flush=True)
    sys.exit(1)


class Failure(Exception):
    pass


def post_each(conn, path, bodies, headers, clock):
    """POSTs the bodies one after another on conn; returns each one's latency by clock (seconds)."""
    lat = []
    for body in bodies:
        t = clock()
        status, data = request(conn, "POST", path, body, headers)
        lat.append(clock() - t)
        if status != 201:
            raise Failure(f"POST {path}: {status} {data[:300]!r}")
    return lat


def concurrent_client(sock, path, headers, bodies, timeout, barrier, results):
    """One client of the concurrent workload: its bodies one after another, after the barrier."""
    try:
        conn = UnixHTTPConnection(sock, timeout=timeout)
        conn.connect()
        barrier.wait(timeout)
        start = time.monotonic()
        lat = post_each(conn, path, bodies, headers, time.monotonic)
        results.put({"start": start, "end": time.monotonic(), "lat": lat})
    except Exception as e:  # noqa: BLE001 -- any failure is the row's reason
        results.put({"error": f"{type(e).__name__}: {e}"})
        barrier.abort()


def concurrent(sock, path, headers, bodies, clients, timeout):
    """CLIENTS processes send BODIES between them (client k: bodies k, k+CLIENTS, ...), each its next
    request when the last is answered; rows/s from their common start until the last is done."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=concurrent_client, args=(sock, path, headers, bodies[k::clients], timeout, barrier, results))
             for k in range(clients)]
    for p in procs:
        p.start()
    try:
        outs = [results.get(timeout=timeout + 30) for _ in procs]
    except Exception:  # noqa: BLE001 -- queue.Empty: a client hung
        raise Failure(f"a client did not finish within {timeout + 30:.0f} s")
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise Failure(errors[0])
    lat = sorted(x for o in outs for x in o["lat"])
    elapsed = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    return {"n": len(lat), "batch": 1, "p50_us": round(lat[len(lat) // 2] * 1e6, 2),
            "p99_us": round(lat[int(len(lat) * 0.99)] * 1e6, 2), "per_sec": round(len(lat) / elapsed)}


def request(conn, method, path, body, headers):
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, data


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--total", type=int, default=200000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--single", type=int, default=0, help="one-row requests from one client, per repetition")
    ap.add_argument("--concurrent", type=int, default=0, help="one-row requests from --clients clients, per repetition")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=120, help="seconds, per request")
    args = ap.parse_args()

    bindir = os.path.dirname(sys.executable)
    datasette = os.path.join(bindir, "datasette")
    os.makedirs(args.work, exist_ok=True)
    db = os.path.join(args.work, "db.sqlite")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    with sqlite3.connect(db) as c:
        c.execute("pragma journal_mode = wal")
    sock = os.path.join(args.work, "datasette.sock")
    if os.path.exists(sock):
        os.remove(sock)
    secret = secrets.token_hex(16)
    token = subprocess.run([datasette, "create-token", "root", "--secret", secret], check=True,
                           capture_output=True, text=True).stdout.strip()
    log = open(os.path.join(args.work, "datasette.log"), "w")
    server = subprocess.Popen(
        [datasette, "serve", db, "--uds", sock, "--secret", secret, "--root",
         "--setting", "max_insert_rows", str(max(args.batch, 1)),
         "--plugins-dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasette-plugins")],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.connect(sock)
                probe.close()
                break
            except OSError:
                probe.close()
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                fail("datasette did not start: " + open(log.name).read()[-300:])
            time.sleep(0.05)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn = UnixHTTPConnection(sock, timeout=args.timeout)
        status, data = request(conn, "GET", "/-/versions.json", None, {})
        if status != 200:
            fail(f"GET /-/versions.json: {status} {data[:200]!r}")
        version = json.loads(data)["datasette"]["version"]
        status, data = request(conn, "GET", "/-/plugins.json", None, {})
        if status != 200 or "bench_pragmas" not in data.decode():
            fail(f"the bench_pragmas plugin is not loaded: {status} {data[:200]!r}")
        dbname = "db"

        def create(table):
            body = {"table": table, "columns": [{"name": n, "type": t} for n, t in benchrows.COLUMNS], "pk": "id"}
            status, data = request(conn, "POST", f"/{dbname}/-/create", json.dumps(body).encode(), headers)
            if status != 201:
                raise Failure(f"POST /{dbname}/-/create: {status} {data[:300]!r}")

        def check_count(table, expected):
            status, data = request(conn, "GET", f"/{dbname}/-/query.json?sql=select+count(*)+as+n+from+{table}&_shape=array",
                                   None, headers)
            stored = json.loads(data)[0]["n"] if status == 200 else None
            if stored != expected:
                raise Failure(f"{table} holds {stored} rows, expected {expected}")

        workloads = [("bulk", args.total, args.batch)]
        if args.single:
            workloads.append(("single", args.single, 1))
        if args.concurrent:
            workloads.append(("concurrent", args.concurrent, 1))
        for workload, total, batch in workloads:
            bodies = [json.dumps({"rows": rows}).encode() for rows in benchrows.batches(total, batch)]
            for rep in range(1, args.reps + 1):
                table = f"{workload}_{rep}"
                try:
                    create(table)
                    path = f"/{dbname}/{table}/-/insert"
                    if workload == "concurrent":
                        out = concurrent(sock, path, headers, bodies, args.clients, args.timeout)
                        conn.close()  # idle meanwhile: the server may have closed it (keep-alive timeout)
                        out.update({"clients": args.clients, "version": version})
                    else:
                        cpu0 = time.process_time()
                        start = time.perf_counter()
                        lat = post_each(conn, path, bodies, headers, time.perf_counter)
                        elapsed = time.perf_counter() - start
                        cpu = time.process_time() - cpu0
                        out = benchrows.summary(total, batch, lat, elapsed, version=version,
                                                client_cpu_share=round(cpu / elapsed, 3))
                    check_count(table, total)
                except (Failure, OSError, http.client.HTTPException) as e:
                    print(json.dumps({"error": str(e) or type(e).__name__, "workload": workload}), flush=True)
                    if isinstance(e, Failure):
                        break
                    conn.close()  # a timeout or a broken connection: the next workload gets a fresh one
                    conn = UnixHTTPConnection(sock, timeout=args.timeout)
                    break
                out["workload"] = workload
                print(json.dumps(out), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
