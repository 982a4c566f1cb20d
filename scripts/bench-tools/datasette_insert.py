"""Datasette's write API under the bulk-insert bench: rows/s through POST /db/TABLE/-/insert.

    python datasette_insert.py --work DIR --total 200000 --batch 1000 --reps 3

Run with the bench venv's python (datasette==1.0a41 installed). Starts `datasette serve` on a Unix
socket (like evd's, so neither side pays for TCP) with a fresh WAL database, a root API token and
max_insert_rows raised to the batch size; creates one table per repetition via POST /db/-/create, then
times the insert batches one after another over one keep-alive connection (http.client). All request
bodies are encoded before timing. Prints one JSON line per repetition, or {"error": ...}.

`client_cpu_share` is the client's CPU time over the elapsed time: near 0 means the client waited on
Datasette nearly all the time, so it is not the bottleneck.
"""
import argparse
import http.client
import json
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


def fail(message):
    print(json.dumps({"error": message}), flush=True)
    sys.exit(1)


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
    ap.add_argument("--timeout", type=float, default=120, help="seconds, per repetition")
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
         "--setting", "max_insert_rows", str(args.batch),
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
        batches = benchrows.batches(args.total, args.batch)
        bodies = [json.dumps({"rows": rows}).encode() for rows in batches]
        for rep in range(1, args.reps + 1):
            table = f"bench_{rep}"
            create = {"table": table, "columns": [{"name": n, "type": t} for n, t in benchrows.COLUMNS], "pk": "id"}
            status, data = request(conn, "POST", f"/{dbname}/-/create", json.dumps(create).encode(), headers)
            if status != 201:
                fail(f"POST /{dbname}/-/create: {status} {data[:300]!r}")
            path = f"/{dbname}/{table}/-/insert"
            lat = []
            cpu0 = time.process_time()
            start = time.perf_counter()
            for body in bodies:
                t = time.perf_counter()
                status, data = request(conn, "POST", path, body, headers)
                lat.append(time.perf_counter() - t)
                if status != 201:
                    fail(f"POST {path}: {status} {data[:300]!r}")
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu0
            status, data = request(conn, "GET", f"/{dbname}/-/query.json?sql=select+count(*)+as+n+from+{table}&_shape=array",
                                   None, headers)
            stored = json.loads(data)[0]["n"] if status == 200 else None
            if stored != args.total:
                fail(f"{table} holds {stored} rows, expected {args.total}")
            print(json.dumps(benchrows.summary(args.total, args.batch, lat, elapsed, version=version,
                                               client_cpu_share=round(cpu / elapsed, 3))), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
