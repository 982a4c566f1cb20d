"""Prints scripts/bench's table and ratios from the probes' JSON lines in RESULTS_DIR.

    python3 report.py RESULTS_DIR JSON(0|1)

RESULTS_DIR holds meta.json (the sizes) and one NAME.jsonl per workload, one JSON object per
repetition. A repetition that failed is {"error": "..."}; its workload is then printed as
"n/a (reason)", and its figures are null in the JSON.
"""
import json
import os
import statistics
import sys

results, want_json = sys.argv[1], sys.argv[2] == "1"
meta = json.load(open(os.path.join(results, "meta.json")))


def load(name):
    """The repetitions of one workload, or (None, reason)."""
    path = os.path.join(results, name + ".jsonl")
    if not os.path.exists(path):
        return None, "not run"
    reps = []
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        try:
            reps.append(json.loads(line))
        except ValueError:
            return None, f"unreadable probe output: {line[:200]}"
    errors = [error_of(r) for r in reps if error_of(r)]
    if errors:
        failed = f" ({len(errors)} of {len(reps)} repetitions failed)" if len(reps) > 1 else ""
        return None, errors[0] + failed
    if not reps:
        return None, "no output"
    return reps, None


def error_of(rep):
    """A repetition's failure: its own, or its parts' (the cause before consequences like "stopped")."""
    if "error" in rep:
        return rep["error"]
    errors = [f"{key}: {part['error']}" for key, part in rep.items() if isinstance(part, dict) and "error" in part]
    causes = [e for e in errors if ": not run" not in e and ": stopped" not in e]
    return (causes or errors or [None])[0]


def med(reps, key):
    return statistics.median(r[key] for r in reps)


def spread(reps, key):
    return max(r[key] for r in reps) - min(r[key] for r in reps)


rows, by_key = [], {}


def row(key, name, reps, error=None, note="", unit="requests"):
    r = {"workload": name, "key": key, "unit": unit, "p50_us": None, "p99_us": None, "per_sec": None,
         "p50_spread_us": None, "per_sec_spread_pct": None, "note": note, "error": error}
    if reps:
        r["per_sec"] = round(med(reps, "per_sec"))
        r["per_sec_spread_pct"] = round(100 * spread(reps, "per_sec") / r["per_sec"], 1) if r["per_sec"] else None
        if all(x.get("p50_us") is not None for x in reps):
            r["p50_us"], r["p99_us"] = med(reps, "p50_us"), med(reps, "p99_us")
            r["p50_spread_us"] = round(spread(reps, "p50_us"), 2)
    rows.append(r)
    by_key[key] = r


# ---- Round-trip latency (issue: veto) ----
raw, raw_err = load("raw")
plain, plain_err = load("execute")
vetoed, vetoed_err = load("execute_veto")
row("raw", "raw ping-pong (2 processes, Unix socket)", raw, raw_err)
row("execute", "evd execute 'select 1' (no listener)", plain, plain_err)
row("execute_veto", "evd execute 'select 1' (1 allow-all veto listener)", vetoed, vetoed_err, "per s = vetoes/s")

def when(ms):
    return f"{ms:.1f} ms after" if ms >= 0 else f"{-ms:.1f} ms before"


# ---- Bulk insert (rows/s) ----
total, batch = meta["insert_rows"], meta["insert_batch"]


def evd_insert(key, name):
    """An evd bulk-insert row: rows/s until every row is acknowledged and its events received."""
    ev, ev_err = load(key)
    note = ""
    if ev:
        combined = []
        for rep in ev:
            ins, cnt = rep["insert"], rep["count"]
            done = max(ins["end_us"], cnt["last_us"])
            combined.append({"per_sec": total / ((done - ins["start_us"]) / 1e6), "p50_us": ins["p50_us"],
                             "p99_us": ins["p99_us"], "ack_per_sec": ins["per_sec"],
                             "event_lag_ms": (cnt["last_us"] - ins["end_us"]) / 1e3, "events": cnt["events"]})
        ev = combined
        note = (f"p50/p99 per {batch}-row request; acked at {med(ev, 'ack_per_sec'):.0f} rows/s; last insert-rows "
                f"event {when(med(ev, 'event_lag_ms'))} the last response ({med(ev, 'events'):.0f} events)")
    row(key, name, ev, ev_err, note, "rows")
    return ev


ev = evd_insert("insert_evd", f"bulk insert: evd insert x{batch} rows, 1 insert-rows subscriber (journal on)")
ev_off = evd_insert("insert_evd_nojournal", f"bulk insert: evd, the same with --no-journal")
ev_norows = evd_insert("insert_evd_norows", f"bulk insert: evd, the same with --no-journal-rows")
ds, ds_err = load("insert_datasette")
row("insert_datasette", f"bulk insert: Datasette {ds[0]['version'] if ds else '1.0a41'} POST /-/insert x{batch}",
    ds, ds_err, f"p50/p99 per request; HTTP over a Unix socket, keep-alive; client CPU "
    f"{100 * med(ds, 'client_cpu_share'):.0f}% of the time" if ds else "", "rows")
sa, sa_err = load("insert_sqlalchemy")
row("insert_sqlalchemy", f"bulk insert: SQLAlchemy {sa[0]['version'] if sa else ''} Core executemany x{batch}".replace("  ", " "),
    sa, sa_err, "p50/p99 per batch; in process, each batch committed, WAL + synchronous=NORMAL" if sa else "", "rows")

# ---- Update fan-out (events/s) ----
fan_rows = meta["fanout_rows"]
fo, fo_err = load("fanout_evd")
if fo:
    combined = []
    for rep in fo:
        ex, cnt = rep["exec"], rep["count"]
        combined.append({"per_sec": fan_rows / ((cnt["last_us"] - ex["start_us"]) / 1e6),
                         "update_ms": (ex["end_us"] - ex["start_us"]) / 1e3,
                         "after_ms": (cnt["last_us"] - ex["end_us"]) / 1e3})
    fo = combined
    note = (f"from sending the UPDATE to the subscriber's last event; the UPDATE's response took "
            f"{med(fo, 'update_ms'):.0f} ms, the last event came {when(med(fo, 'after_ms'))} it")
else:
    note = ""
if fo_err and "lagged" in fo_err:
    fo_err += " -- the subscriber overflowed its 10,000-event outbox (a known issue)"
row("fanout_evd", f"update fan-out: evd UPDATE of {fan_rows:,} rows, 1 update-row subscriber",
    fo, fo_err, note, "events")

# ---- Journal replay (events/s) ----
replay_events = meta["replay_events"]


def replay(key, name):
    """A replay row: events/s from sending `subscribe` (with since) to the last replayed event."""
    reps, err = load(key)
    note = ""
    if reps:
        reps = [{"per_sec": replay_events / ((r["last_us"] - r["start_us"]) / 1e6),
                 "first_ms": (r["first_us"] - r["start_us"]) / 1e3,
                 "mib_per_sec": r["bytes"] / 2**20 / ((r["last_us"] - r["start_us"]) / 1e6),
                 "bytes_per_event": r["bytes"] / r["events"]} for r in reps]
        note = (f"from sending subscribe (since) to the last event; first event after {med(reps, 'first_ms'):.1f} ms; "
                f"{med(reps, 'bytes_per_event'):.0f} B/event, {med(reps, 'mib_per_sec'):.0f} MiB/s")
    row(key, name, reps, err, note, "events")


replay("replay_evd", f"journal replay: evd subscribe since, {replay_events:,} update-row events")
replay("replay_rows_evd", f"journal replay: evd, the same with rows: true")

# ---- The table ----
def fmt(v, spec, width):
    return f"{v:{width}{spec}}" if v is not None else f"{'-':>{width}}"


w = max(len(r["workload"]) for r in rows)
print(f"{'workload':{w}} {'p50 µs':>9} {'p99 µs':>9} {'per s':>10} {'p50 spread':>10} {'per s ±':>8}  note")
for r in rows:
    if r["error"]:
        print(f"{r['workload']:{w}} n/a ({r['error']})")
        continue
    pct = f"{r['per_sec_spread_pct']:.0f}%" if r["per_sec_spread_pct"] is not None else "-"
    print(f"{r['workload']:{w}} {fmt(r['p50_us'], '.1f', 9)} {fmt(r['p99_us'], '.1f', 9)} "
          f"{fmt(r['per_sec'], '.0f', 10)} {fmt(r['p50_spread_us'], '.1f', 10)} {pct:>8}  {r['note']}")
print()

ratios, targets = {}, {}


def ok(flag):
    return "met" if flag else "NOT met"


if raw and plain and vetoed:
    added50 = med(vetoed, "p50_us") - med(plain, "p50_us")
    added99 = med(vetoed, "p99_us") - med(plain, "p99_us")
    r50, r99 = added50 / med(raw, "p50_us"), added99 / med(raw, "p99_us")
    ratios.update({"veto_added_p50_us": round(added50, 2), "veto_added_p99_us": round(added99, 2),
                   "veto_added_p50_vs_raw": round(r50, 2), "veto_added_p99_vs_raw": round(r99, 2),
                   "execute_p50_vs_raw": round(med(plain, "p50_us") / med(raw, "p50_us"), 2)})
    targets["veto_added_p50_vs_raw <= 2"] = r50 <= 2
    targets["veto_added_p99_vs_raw <= 3"] = r99 <= 3
    print(f"veto round trip added per statement: p50 {added50:.1f} µs = {r50:.2f}x raw p50 (target <= 2x); "
          f"p99 {added99:.1f} µs = {r99:.2f}x raw p99 (target <= 3x)")
    print(f"evd execute p50 = {ratios['execute_p50_vs_raw']:.2f}x the raw round trip")
else:
    print("veto round trip added per statement: n/a (a latency probe failed)")

e, d, s = (by_key[k]["per_sec"] for k in ("insert_evd", "insert_datasette", "insert_sqlalchemy"))
if e is not None:
    targets["evd_insert_rows_per_sec >= 600000"] = e >= 600_000
    print(f"bulk insert: evd {e:,.0f} rows/s (target >= 600,000: {ok(e >= 600_000)})")
else:
    print(f"bulk insert: evd n/a ({by_key['insert_evd']['error']})")
if e is not None and d:
    ratios["insert_evd_vs_datasette"] = round(e / d, 2)
    targets["insert_evd_vs_datasette >= 20"] = e / d >= 20
    print(f"bulk insert: evd / Datasette = {e / d:.1f}x (target >= 20x: {ok(e / d >= 20)})")
else:
    print("bulk insert: evd / Datasette = n/a")
if e is not None and s:
    ratios["insert_evd_vs_sqlalchemy"] = round(e / s, 2)
    print(f"bulk insert: evd / SQLAlchemy = {e / s:.2f}x")
else:
    print("bulk insert: evd / SQLAlchemy = n/a")
if s and d:
    ratios["insert_sqlalchemy_vs_datasette"] = round(s / d, 2)
    print(f"bulk insert: SQLAlchemy / Datasette = {s / d:.1f}x")
f = by_key["fanout_evd"]["per_sec"]
if f is not None:
    targets["fanout_events_per_sec >= 500000"] = f >= 500_000
    print(f"update fan-out: {f:,.0f} update-row events/s (target >= 500,000: {ok(f >= 500_000)})")
else:
    print(f"update fan-out: n/a ({by_key['fanout_evd']['error']})")


def cost(on, off):
    """1 - on/off from the medians, and its range over the repetitions (paired in run order)."""
    c = 1 - med(on, "per_sec") / med(off, "per_sec")
    paired = [1 - a["per_sec"] / b["per_sec"] for a, b in zip(on, off)]
    return c, min(paired), max(paired)


if ev and ev_off:
    c, lo, hi = cost(ev, ev_off)
    ratios["insert_journal_cost_pct"] = round(100 * c, 1)
    targets["insert_journal_cost_pct <= 20"] = c <= 0.20
    print(f"journal cost on bulk insert: 1 - on/off = {100 * c:.0f}% (per repetition {100 * lo:.0f}..{100 * hi:.0f}%; "
          f"target <= 20%: {ok(c <= 0.20)})")
else:
    print(f"journal cost on bulk insert: n/a ({by_key['insert_evd']['error'] or by_key['insert_evd_nojournal']['error']})")
if ev and ev_norows:
    c, lo, hi = cost(ev, ev_norows)
    ratios["insert_row_images_cost_pct"] = round(100 * c, 1)
    print(f"row images' cost on bulk insert: 1 - on/no-journal-rows = {100 * c:.0f}% (per repetition "
          f"{100 * lo:.0f}..{100 * hi:.0f}%)")
if ev_norows and ev_off:
    c, lo, hi = cost(ev_norows, ev_off)
    ratios["insert_journal_without_rows_cost_pct"] = round(100 * c, 1)
    print(f"journal without row images, cost on bulk insert: 1 - no-journal-rows/off = {100 * c:.0f}% "
          f"(per repetition {100 * lo:.0f}..{100 * hi:.0f}%)")
for key, label in (("replay_evd", "journal replay"), ("replay_rows_evd", "journal replay with rows")):
    r = by_key[key]["per_sec"]
    if r is not None:
        ratios[key + "_vs_target"] = round(r / 1_000_000, 2)
        if key == "replay_evd":
            targets["replay_events_per_sec >= 1000000"] = r >= 1_000_000
        print(f"{label}: {r:,.0f} update-row events/s = {r / 1_000_000:.2f}x the target of 1,000,000"
              + (f" ({ok(r >= 1_000_000)})" if key == "replay_evd" else ""))
    else:
        print(f"{label}: n/a ({by_key[key]['error']})")

if want_json:
    for r in rows:
        del r["key"]
    print(json.dumps({"n": meta["n"], "repetitions": meta["reps"], "insert_rows": total, "insert_batch": batch,
                      "fanout_rows": fan_rows, "replay_events": replay_events, "rows": rows, "ratios": ratios, "targets_met": targets}))
