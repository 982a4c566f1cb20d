#!/usr/bin/env bash
# The memory of one huge transaction: a release evd on a temp socket and state dir fills
# `big(id integer primary key, v integer not null)` with ROWS rows (default 1,000,000), then runs
# `update big set v = v + 1` UPDATES times (default 2), and reports after each step VmHWM (the
# kernel's peak RSS since the last step: it is reset before each) and VmRSS (now, 1 s after the
# step's response, with its anonymous, file-backed and shared parts) from /proc/PID/status, in MB.
#
#   scripts/bench-tools/bigtx-rss.sh [-- EVD_FLAGS...]
#
# Environment: ROWS, UPDATES, SUBSCRIBE=1 (one update-row subscriber that reads and discards every
# event, `rows: true` with SUBSCRIBE=rows), EVD_BENCH_SCRATCH (scratch path, .build), EVD (the evd
# binary to run instead of the release build's, e.g. an older one to compare).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROWS="${ROWS:-1000000}"
UPDATES="${UPDATES:-2}"
SUBSCRIBE="${SUBSCRIBE:-}"
scratch="${EVD_BENCH_SCRATCH:-.build}"
[ "${1:-}" = "--" ] && shift
evd_binary="${EVD:-$(swift build -c release --scratch-path "$scratch" --show-bin-path)/evd}"
work="$(mktemp -d /tmp/evd-bigtx-XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$evd_binary" --socket "$work/evd.sock" --state-dir "$work/state" --log-level warning "$@" &
evd=$!
pids+=($evd)
for _ in $(seq 100); do [ -S "$work/evd.sock" ] && break; sleep 0.05; done

python3 - "$work/evd.sock" "$evd" "$ROWS" "$UPDATES" "$SUBSCRIBE" <<'PY'
import json, socket, sys, threading, time

path, pid, rows, updates, subscribe = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def status():
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) // 1024
    return fields

def reset_peak():
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")

class Connection:
    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.file.readline()  # hello
        self.next = 0

    def request(self, message):
        self.next += 1
        message["id"] = self.next
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = json.loads(self.file.readline())
            if reply.get("type") == "response" and reply.get("id") == self.next:
                if not reply.get("ok"):
                    sys.exit(f"request failed: {reply}")
                return reply

events = [0]
if subscribe:
    listener = Connection()
    request = {"op": "subscribe", "events": ["update-row"]}
    if subscribe == "rows":
        request["rows"] = True
    listener.request(request)
    def drain():
        for line in listener.file:
            events[0] += 1
    threading.Thread(target=drain, daemon=True).start()

client = Connection()
def step(name, sql):
    reset_peak()
    started = time.monotonic()
    client.request({"op": "execute", "sql": sql})
    took = time.monotonic() - started
    time.sleep(1)
    figures = status()
    print(f"{name:<8} {took:6.2f} s   peak (VmHWM) {figures['VmHWM']:5d} MB   after (VmRSS) {figures['VmRSS']:5d} MB"
          f" (anon {figures['RssAnon']}, file {figures['RssFile']}, shmem {figures['RssShmem']})"
          + (f"   events received {events[0]}" if subscribe else ""), flush=True)

figures = status()
print(f"start               peak (VmHWM) {figures['VmHWM']:5d} MB   after (VmRSS) {figures['VmRSS']:5d} MB")
client.request({"op": "execute", "sql": "create table big (id integer primary key, v integer not null)"})
step("fill", "insert into big (id, v) with recursive c(x) as (select 1 union all select x + 1 from c "
     f"where x < {rows}) select x, 0 from c")
for n in range(updates):
    step(f"update {n + 1}", "update big set v = v + 1")
PY
