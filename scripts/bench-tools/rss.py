"""Samples a process's memory for scripts/bench's memory rows.

    python3 rss.py PID STOP_FILE [INTERVAL_MS] [TIMEOUT_S]

Reads VmRSS from /proc/PID/status every INTERVAL_MS (default 20) until STOP_FILE exists, the process
is gone, or TIMEOUT_S (default 120) have passed; then prints one JSON line: the RSS at the start, the
highest RSS sampled, the RSS and VmHWM (the kernel's own peak, over the process's whole life) at the
end, in kB, or {"error": ...}.
"""
import json
import os
import sys
import time


def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def main():
    pid, stop = int(sys.argv[1]), sys.argv[2]
    interval = (float(sys.argv[3]) if len(sys.argv) > 3 else 20) / 1000
    deadline = time.monotonic() + (float(sys.argv[4]) if len(sys.argv) > 4 else 120)
    try:
        first = last = status(pid)
    except OSError as e:
        print(json.dumps({"error": f"no process {pid}: {e}"}))
        sys.exit(1)
    peak, samples = first["VmRSS"], 1
    while not os.path.exists(stop) and time.monotonic() < deadline:
        time.sleep(interval)
        try:
            last = status(pid)
        except OSError:
            print(json.dumps({"error": f"process {pid} exited while sampled"}))
            sys.exit(1)
        peak, samples = max(peak, last["VmRSS"]), samples + 1
    print(json.dumps({"start_rss_kb": first["VmRSS"], "peak_rss_kb": peak, "rss_kb": last["VmRSS"],
                      "hwm_kb": last["VmHWM"], "samples": samples}))


if __name__ == "__main__":
    main()
