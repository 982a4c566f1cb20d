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
subscribed, subscribed_err = load("execute_sub")
row("execute_sub", "evd execute 'select 1' (1 plain subscriber, before/after_cursor_execute)", subscribed, subscribed_err,
    "the subscriber reads both events of every statement")
sal, sal_err = load("listener_sqlalchemy")
row("listener_sqlalchemy", f"SQLAlchemy {sal[0]['version'] if sal else ''} Core 'select 1' in process, "
    "listeners on before/after_cursor_execute".replace("  ", " "), sal, sal_err,
    f"without listeners p50 {med(sal, 'plain_p50_us'):.1f} µs; added p50 {med(sal, 'added_p50_us'):.2f} µs, "
    f"mean {med(sal, 'added_mean_us'):.2f} µs" if sal else "")

# ---- Single-row inserts (issue 8) ----
single_n, conc_n, clients = meta["single_inserts"], meta["concurrent_inserts"], meta["clients"]
i1, i1_err = load("insert1_evd")
row("insert1_evd", f"single-row insert, 1 client: evd insert ({single_n:,} requests)", i1, i1_err,
    "one row per request, each its own transaction", "rows")
d1, d1_err = load("insert1_datasette")
row("insert1_datasette", f"single-row insert, 1 client: Datasette /-/insert ({meta['datasette_single']:,} requests)",
    d1, d1_err, f"HTTP over a Unix socket, keep-alive; client CPU {100 * med(d1, 'client_cpu_share'):.0f}% of the time"
    if d1 else "", "rows")
i8, i8_err = load("insert8_evd")
row("insert8_evd", f"single-row inserts, {clients} clients: evd insert, commit groups ({conc_n:,} rows)", i8, i8_err,
    f"{clients} client processes, one row per request (autocommit, committed in groups); p50/p99 per request", "rows")
i8a, i8a_err = load("insert8_evd_alone")
row("insert8_evd_alone", f"single-row inserts, {clients} clients: evd insert, group_commit false ({conc_n:,} rows)", i8a,
    i8a_err, f"the same, each request its own COMMIT (execution option group_commit: false)", "rows")
r8, r8_err = load("insert8_raw")
row("insert8_raw", f"single-row inserts, {clients} clients: raw SQLite {r8[0]['version'] if r8 else ''} autocommit "
    f"({conc_n:,} rows)".replace("  ", " "), r8, r8_err,
    f"C, {clients} threads, a connection each; WAL, synchronous=NORMAL, busy_timeout=5000; p50/p99 per INSERT", "rows")
ds8, ds8_err = load("insert8_datasette")
row("insert8_datasette", f"single-row inserts, {clients} clients: Datasette /-/insert "
    f"({meta['datasette_concurrent']:,} rows)", ds8, ds8_err, f"{clients} client processes, one row per request", "rows")

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
ev_pipelined = evd_insert("insert_evd_pipelined", f"bulk insert: evd, the same with {meta['insert_depth']} requests in flight")
ds, ds_err = load("insert_datasette")
row("insert_datasette", f"bulk insert: Datasette {ds[0]['version'] if ds else '1.0a41'} POST /-/insert x{batch}",
    ds, ds_err, f"p50/p99 per request; HTTP over a Unix socket, keep-alive; client CPU "
    f"{100 * med(ds, 'client_cpu_share'):.0f}% of the time" if ds else "", "rows")
sa, sa_err = load("insert_sqlalchemy")
row("insert_sqlalchemy", f"bulk insert: SQLAlchemy {sa[0]['version'] if sa else ''} Core executemany x{batch}".replace("  ", " "),
    sa, sa_err, "p50/p99 per batch; in process, each batch committed, WAL + synchronous=NORMAL" if sa else "", "rows")

rb, rb_err = load("insert_raw")
row("insert_raw", f"bulk insert: raw SQLite {rb[0]['version'] if rb else ''} x{batch}, prepared INSERT".replace("  ", " "),
    rb, rb_err, "p50/p99 per batch; C, one connection, each batch committed, WAL + synchronous=NORMAL" if rb else "", "rows")

# ---- Update fan-out (events/s) ----
fan_rows = meta["fanout_rows"]
fo, fo_err = load("fanout_evd")
if fo:
    combined = []
    for rep in fo:
        ex, cnt = rep["exec"], rep["count"]
        combined.append({"per_sec": fan_rows / ((cnt["last_us"] - ex["start_us"]) / 1e6),
                         "update_ms": (ex["end_us"] - ex["start_us"]) / 1e3,
                         "after_ms": (cnt["last_us"] - ex["end_us"]) / 1e3,
                         "resumes": cnt.get("resumes", 0)})
    fo = combined
    note = (f"from sending the UPDATE to the subscriber's last event; the UPDATE's response took "
            f"{med(fo, 'update_ms'):.0f} ms, the last event came {when(med(fo, 'after_ms'))} it; "
            f"the subscriber lagged out and resumed with since {med(fo, 'resumes'):.0f} times (median)")
else:
    note = ""
if fo_err and "lagged" in fo_err:
    fo_err += " -- the subscriber overflowed its outbox"
row("fanout_evd", f"update fan-out: evd UPDATE of {fan_rows:,} rows, 1 update-row subscriber",
    fo, fo_err, note, "events")

# ---- Events delivered to 1 and to 10 subscribers (issue 8; at equal payload size: issue 24) ----
sized = meta.get("event_payload_bytes")
sized_how = {"measured": "evd's update-row event line in this run",
             "default": "a representative update-row event line; evd's UPDATE row failed"}.get(meta.get("event_payload_source"), "")
for subs in (1, 10):
    for system, label in (("evd_update", f"evd UPDATE of {meta['pubsub_rows']:,} rows, update-row"),
                          ("evd_emit", f"evd emit x{meta['emit_events']:,}, pipelined"),
                          ("redis", f"Redis {meta['redis_version']} PUBLISH x{meta['pubsub_events']:,}, pipelined"),
                          ("nats", f"NATS {meta['nats_version']} PUB x{meta['pubsub_events']:,}, pipelined"),
                          ("redis_sized", f"Redis {meta['redis_version']} PUBLISH x{meta['pubsub_events']:,}, pipelined, "
                                          f"at evd's event size ({sized} B payload)"),
                          ("nats_sized", f"NATS {meta['nats_version']} PUB x{meta['pubsub_events']:,}, pipelined, "
                                         f"at evd's event size ({sized} B payload)")):
        key = f"events_{system}_{subs}"
        reps, err = load(key)
        note = ""
        if reps:
            note = ((f"per s = deliveries to all {subs}; " if subs > 1 else "")
                    + f"publisher done at {med(reps, 'pub_per_sec'):,.0f} messages/s; {med(reps, 'bytes_per_msg'):.0f} B/message"
                    + (f" (payload {reps[0]['payload_bytes']} B: {sized_how})" if system.endswith("_sized") else ""))
        if err and "lagged" in err:
            err += " -- a subscriber overflowed its 10,000-event outbox"
        row(key, f"events to {subs} subscriber{'s' if subs > 1 else ''}: {label}", reps, err, note, "events")

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

# ---- Snapshot then stream (rows/s, issue 23) ----
snap_rows = meta.get("snapshot_rows", 0)
snap, snap_err = load("snapshot_evd")
note = ""
if snap:
    snap = [{"per_sec": r["rows"] / ((r["end_us"] - r["start_us"]) / 1e6),
             "mb_per_sec": r["bytes"] / (r["end_us"] - r["start_us"]),
             "first_ms": (r["first_us"] - r["start_us"]) / 1e3, "stream_us": r["stream_us"], "pages": r["pages"],
             "bytes_per_row": r["bytes"] / r["rows"], "caught_up_us": r.get("caught_up_us", -1)} for r in snap]
    note = (f"from sending subscribe to snapshot_end; {med(snap, 'pages'):.0f} pages, {med(snap, 'bytes_per_row'):.0f} B/row, "
            f"{med(snap, 'mb_per_sec'):.0f} MB/s; first page after {med(snap, 'first_ms'):.1f} ms; then stream: a row "
            f"inserted after snapshot_end arrived {med(snap, 'stream_us'):.0f} µs after its insert was sent"
            + (f" (caught_up {med(snap, 'caught_up_us'):.0f} µs after snapshot_end)"
               if all(r["caught_up_us"] >= 0 for r in snap) else ""))
row("snapshot_evd", f"snapshot then stream: evd subscribe snapshot, {snap_rows:,}-row table", snap, snap_err, note, "rows")
snap_raw, snap_raw_err = load("snapshot_raw")
row("snapshot_raw", f"snapshot anchor: raw SQLite {snap_raw[0]['version'] if snap_raw else ''} select * stepped, "
    f"{snap_rows:,} rows".replace("  ", " "), snap_raw, snap_raw_err,
    "C, one connection, one read transaction, every value fetched; no JSON, no socket" if snap_raw else "", "rows")

# ---- Forwarding into NATS JetStream (issue 21) ----
fwd_events = meta.get("forward_events", 0)
jsraw, jsraw_err = load("forward_jsraw")
row("forward_jsraw", f"JetStream publish, acked, pipelined (raw): natsbench x{fwd_events:,}, 4096 in flight, one-node file stream",
    jsraw, jsraw_err, f"Swift, NATSClient's pipelined path evforward uses; {jsraw[0]['body_bytes']} B bodies + evforward's headers"
    if jsraw else "", "events")
# Issue 24: evd's emit is durable (journaled before its OK), so JetStream's acked publish is its anchor.
emd, emd_err = load("emit_durable")
if emd:
    emd = [dict(r, per_sec=r["pub_per_sec"], per_sec_delivered=r["per_sec"]) for r in emd]  # the rate at which emits are acknowledged
row("emit_durable", f"emit pipelined (durable): evd emit x{fwd_events:,}, every one acknowledged, main daemon",
    emd, emd_err, f"C probe, all requests pipelined; per s = acknowledgements (journaled); its 1 subscriber got "
    f"{med(emd, 'per_sec_delivered'):,.0f}/s at {med(emd, 'bytes_per_msg'):.0f} B/event line" if emd else "", "events")
fwd, fwd_err = load("forward_evd")
row("forward_evd", f"forwarding: evforward, {fwd_events:,} journaled update-row events into a one-node stream", fwd, fwd_err,
    f"from evforward's start until the stream holds the journal's last seq; {med(fwd, 'messages'):,.0f} messages"
    if fwd else "", "events")
lag_reps, lag_err = load("forward_lag")
row("forward_lag", f"forwarding lag: commit -> read from the stream at {meta.get('forward_rate', 0):,} emits/s "
    f"for {meta.get('forward_seconds', 0)} s", lag_reps, lag_err,
    f"arrival at a stream reader minus the event's time; emitted at {med(lag_reps, 'emitted_per_sec'):,.0f}/s; "
    f"max {med(lag_reps, 'max_us') / 1e3:.1f} ms" if lag_reps else "", "events")

# ---- SQLAlchemy ORM: sqlite:/// in process vs evd:/// (issue 22) ----
orm_phases = (("singles", f"{meta.get('orm_singles', 1000):,} single-row inserts (add + commit)", "rows"),
              ("bulk", f"{meta.get('orm_bulk', 10000):,}-row bulk insert (insert(Model), dicts)", "rows"),
              ("reads", f"{meta.get('orm_reads', 1000):,} point reads (session.get, fresh Session)", "reads"))
orm = {}
for target, label in (("sqlite", "sqlite:/// in process"), ("evd", "evd:///")):
    reps, err = load(f"orm_{target}")
    for ph, name, unit in orm_phases:
        prep = [r[ph] for r in reps] if reps else None
        note = ""
        if prep:
            note = f"SQLAlchemy {reps[0]['version']}, SQLite {reps[0]['sqlite_version']}"
            if "p50_us" not in prep[0]:
                note += "; one statement, one transaction"
            counted = prep[0].get("requests")
            if counted:
                per_op = sum(counted.values()) / prep[0]["n"]
                ops = ", ".join(f"{op} {n:,}" for op, n in counted.items())
                note += (f"; {per_op:.0f} requests per operation ({ops})" if per_op >= 1
                         else f"; {sum(counted.values())} requests ({ops})")
        row(f"orm_{ph}_{target}", f"ORM: {name}, {label}", prep, err, note, unit)
        orm[(ph, target)] = by_key[f"orm_{ph}_{target}"]

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

# ---- Memory (RSS) ----
mem_rows = []


def mem_row(key, name, field, note=""):
    reps, err = load(key)
    r = {"workload": name, "key": key, "mb": None, "mb_spread": None, "hwm_mb": None, "note": note, "error": err}
    if reps:
        r["mb"] = round(med(reps, field) / 1024, 1)
        r["mb_spread"] = round(spread(reps, field) / 1024, 1)
        r["hwm_mb"] = round(med(reps, "hwm_kb") / 1024, 1)
    r["reps"] = reps
    mem_rows.append(r)
    return r


stall_rows = meta["stall_rows"]
m_idle = mem_row("mem_idle", "evd idle, 1 s after start", "rss_kb")
m_subs = mem_row("mem_subs", f"evd with {meta['idle_subscribers']:,} idle subscribers (a connection each)", "rss_kb")
churned = meta.get("churn_connections", 10000)
m_churn = mem_row("mem_churn", f"KB per connection after {churned:,} connections (each reads hello and closes)", "rss_kb")
if m_churn["reps"]:
    m_churn["kb_per_connection"] = round(med(m_churn["reps"], "kb_per_connection"), 2)
    m_churn["note"] = (f"{m_churn['kb_per_connection']:.2f} KB per connection: RSS from "
                       f"{med(m_churn['reps'], 'start_rss_kb') / 1024:.1f} MB to this over them (after 1,000 to warm up)")
m_upd = mem_row("mem_update", f"evd peak during an UPDATE of {stall_rows:,} rows, nobody subscribed", "peak_rss_kb")
m_stall = mem_row("mem_stalled", f"evd peak during the same UPDATE, 1 stalled subscriber", "peak_rss_kb")
for r in (m_upd, m_stall):
    if r["reps"]:
        r["note"] = f"before the UPDATE {med(r['reps'], 'start_rss_kb') / 1024:.0f} MB; the UPDATE took {med(r['reps'], 'update_ms'):,.0f} ms"
if m_stall["reps"]:
    drops = [x["drops"] for x in m_stall["reps"] if x.get("drops") is not None]
    if drops:
        m_stall["note"] += f"; {statistics.median(drops):,.0f} events dropped for it (on_overflow: drop)"
w = max([w] + [len(r["workload"]) for r in mem_rows])
print(f"{'memory (RSS)':{w}} {'MB':>9} {'spread':>9} {'VmHWM MB':>10}  note")
for r in mem_rows:
    if r["error"]:
        print(f"{r['workload']:{w}} n/a ({r['error']})")
        continue
    print(f"{r['workload']:{w}} {r['mb']:9.1f} {r['mb_spread']:9.1f} {r['hwm_mb']:10.1f}  {r['note']}")
print(f"{'':{w}} outbox limit: {meta['outbox_limit'] or 'unknown'}")
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

if plain and subscribed:
    added = med(subscribed, "p50_us") - med(plain, "p50_us")
    ratios["subscriber_added_p50_us"] = round(added, 2)
    targets["subscriber_added_p50_us <= 3"] = added <= 3
    anchor = (f"; SQLAlchemy's in-process listeners add p50 {med(sal, 'added_p50_us'):.2f} µs, mean "
              f"{med(sal, 'added_mean_us'):.2f} µs" if sal else f"; SQLAlchemy anchor n/a ({sal_err})")
    if sal:
        ratios["sqlalchemy_listener_added_p50_us"] = med(sal, "added_p50_us")
        ratios["sqlalchemy_listener_added_mean_us"] = med(sal, "added_mean_us")
    print(f"plain subscriber on before/after_cursor_execute, added per statement: p50 {added:.1f} µs "
          f"(target <= 3 µs: {ok(added <= 3)}){anchor}")
else:
    print(f"plain subscriber on before/after_cursor_execute, added per statement: n/a ({subscribed_err or plain_err})")

if i1 and raw:
    r = med(i1, "p50_us") / med(raw, "p50_us")
    ratios["insert1_p50_vs_raw"] = round(r, 2)
    targets["insert1_p50_vs_raw <= 3"] = r <= 3
    print(f"single-row insert, 1 client: evd p50 {med(i1, 'p50_us'):.1f} µs = {r:.2f}x the raw round trip (target <= 3x: "
          f"{ok(r <= 3)})")
else:
    print(f"single-row insert, 1 client: evd vs raw ping-pong n/a ({i1_err or raw_err})")
if i1 and d1:
    r = med(d1, "p50_us") / med(i1, "p50_us")
    ratios["insert1_datasette_p50_vs_evd"] = round(r, 2)
    targets["insert1_faster_than_datasette >= 25"] = r >= 25
    print(f"single-row insert, 1 client: Datasette p50 / evd p50 = {r:.1f}x (target >= 25x: {ok(r >= 25)})")
else:
    print(f"single-row insert, 1 client: evd vs Datasette n/a ({i1_err or d1_err})")
if i8 and r8:
    r = med(i8, "per_sec") / med(r8, "per_sec")
    ratios["insert8_evd_vs_raw"] = round(r, 3)
    targets["insert8_evd_vs_raw >= 1.0"] = r >= 1.0
    print(f"single-row inserts, {clients} clients: evd (commit groups) = {100 * r:.0f}% of raw SQLite autocommit "
          f"(target >= 100%: {ok(r >= 1.0)})")
else:
    print(f"single-row inserts, {clients} clients: evd vs raw SQLite n/a ({i8_err or r8_err})")
if i8a and r8:
    r = med(i8a, "per_sec") / med(r8, "per_sec")
    ratios["insert8_evd_alone_vs_raw"] = round(r, 3)
    print(f"single-row inserts, {clients} clients: evd without groups = {100 * r:.0f}% of raw SQLite autocommit")
if i8 and i8a:
    r = med(i8, "per_sec") / med(i8a, "per_sec")
    ratios["insert8_groups_vs_alone"] = round(r, 2)
    print(f"single-row inserts, {clients} clients: commit groups / one COMMIT per request = {r:.2f}x")
if i8 and ds8:
    r = med(i8, "per_sec") / med(ds8, "per_sec")
    ratios["insert8_evd_vs_datasette"] = round(r, 2)
    print(f"single-row inserts, {clients} clients: evd / Datasette = {r:.1f}x")

e, d, s = (by_key[k]["per_sec"] for k in ("insert_evd", "insert_datasette", "insert_sqlalchemy"))
if e is not None:
    targets["evd_insert_rows_per_sec >= 600000"] = e >= 600_000
    print(f"bulk insert: evd {e:,.0f} rows/s (target >= 600,000: {ok(e >= 600_000)})")
else:
    print(f"bulk insert: evd n/a ({by_key['insert_evd']['error']})")
pipelined = by_key["insert_evd_pipelined"]["per_sec"]
if pipelined is not None:
    ratios["insert_evd_pipelined_rows_per_sec"] = pipelined
    print(f"bulk insert, {meta['insert_depth']} requests in flight: evd {pipelined:,.0f} rows/s (not a target: the "
          "targets are taken one request at a time)")
if e is not None and d:
    ratios["insert_evd_vs_datasette"] = round(e / d, 2)
    targets["insert_evd_vs_datasette >= 20"] = e / d >= 20
    print(f"bulk insert: evd / Datasette = {e / d:.1f}x (target >= 20x: {ok(e / d >= 20)})")
else:
    print("bulk insert: evd / Datasette = n/a")
if e is not None and s:
    ratios["insert_evd_vs_sqlalchemy"] = round(e / s, 2)
    targets["insert_evd_vs_sqlalchemy >= 1.5"] = e / s >= 1.5
    print(f"bulk insert: evd / SQLAlchemy = {e / s:.2f}x (target >= 1.5x: {ok(e / s >= 1.5)})")
else:
    print("bulk insert: evd / SQLAlchemy = n/a")
rbs = by_key["insert_raw"]["per_sec"]
if e is not None and rbs:
    ratios["insert_evd_vs_raw"] = round(e / rbs, 3)
    print(f"bulk insert: evd = {100 * e / rbs:.0f}% of raw SQLite; SQLAlchemy = "
          + (f"{100 * s / rbs:.0f}%" if s else "n/a"))
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

r = by_key["snapshot_evd"]["per_sec"]
if r is not None:
    targets["snapshot_rows_per_sec >= 1000000"] = r >= 1_000_000
    ratios["snapshot_rows_per_sec"] = r
    ratios["snapshot_mb_per_sec"] = round(med(snap, "mb_per_sec"), 1)
    ratios["snapshot_stream_us"] = round(med(snap, "stream_us"))
    raw_rate = by_key["snapshot_raw"]["per_sec"]
    if raw_rate:
        ratios["snapshot_vs_raw_sqlite"] = round(r / raw_rate, 3)
    print(f"snapshot then stream: {snap_rows:,} rows at {r:,.0f} rows/s (target >= 1,000,000: {ok(r >= 1_000_000)}), "
          f"{med(snap, 'mb_per_sec'):.0f} MB/s, stream after snapshot {med(snap, 'stream_us'):.0f} µs"
          + (f"; = {r / raw_rate:.2f}x raw SQLite's select * ({raw_rate:,.0f} rows/s)" if raw_rate else
             f"; raw SQLite n/a ({by_key['snapshot_raw']['error']})"))
else:
    print(f"snapshot then stream: n/a ({by_key['snapshot_evd']['error']})")

# Events delivered: the better of evd's two ways against the targets, and against Redis and NATS.
for subs, target in ((1, 1_200_000), (10, 4_500_000)):
    evd = [(by_key[f"events_{k}_{subs}"]["per_sec"], name) for k, name in (("evd_update", "UPDATE"), ("evd_emit", "emit"))
           if by_key[f"events_{k}_{subs}"]["per_sec"] is not None]
    label = f"events to {subs} subscriber{'s' if subs > 1 else ''}"
    if not evd:
        print(f"{label}: evd n/a ({by_key[f'events_evd_update_{subs}']['error']})")
        continue
    best, how = max(evd)
    if how != "UPDATE":
        how += f"; the UPDATE row is n/a: {by_key[f'events_evd_update_{subs}']['error'].split(': {')[0][:120]}"
    targets[f"events_{subs}_per_sec >= {target}"] = best >= target
    parts = []
    for peer, name in (("redis", "Redis"), ("nats", "NATS")):
        p = by_key[f"events_{peer}_{subs}"]["per_sec"]
        if p:
            ratios[f"events_{subs}_evd_vs_{peer}"] = round(best / p, 3)
            parts.append(f"{best / p:.2f}x {name}")
            if peer == "redis":
                targets[f"events_{subs}_evd_ahead_of_redis"] = best >= p
        else:
            parts.append(f"{name} n/a")
    print(f"{label}: evd ({how}) {best:,.0f}/s (target >= {target:,}: {ok(best >= target)}) = " + ", ".join(parts))
    # Issue 24: at equal payload size (the anchors' messages as large as evd's update-row event lines).
    parts = []
    for peer, name in (("redis", "Redis"), ("nats", "NATS")):
        p = by_key[f"events_{peer}_sized_{subs}"]["per_sec"]
        if not p:
            parts.append(f"{name} n/a ({by_key[f'events_{peer}_sized_{subs}']['error']})")
            continue
        each = []
        for k, kname in (("evd_update", "UPDATE"), ("evd_emit", "emit")):
            e = by_key[f"events_{k}_{subs}"]["per_sec"]
            if e:
                ratios[f"events_{subs}_{k}_vs_{peer}_at_event_size"] = round(e / p, 3)
                each.append(f"{kname} {e / p:.2f}x")
        ratios[f"events_{subs}_evd_vs_{peer}_at_event_size"] = round(best / p, 3)
        if peer == "redis" and subs == 10:
            targets["events_10_evd_ahead_of_redis_at_event_size"] = best >= p
        parts.append(f"{name} {p:,.0f}/s: evd {best / p:.2f}x (" + ", ".join(each) + ")")
    print(f"{label} at evd's event size ({sized} B payloads, {meta.get('event_payload_source')}): " + "; ".join(parts)
          + (f" (target: evd >= Redis: {ok(targets['events_10_evd_ahead_of_redis_at_event_size'])})"
             if subs == 10 and "events_10_evd_ahead_of_redis_at_event_size" in targets else ""))

# SQLAlchemy ORM (issue 22): no target; the ratio is the cost of going out of process, kept visible.
for ph, name, unit in orm_phases:
    a, b = orm[(ph, "sqlite")], orm[(ph, "evd")]
    label = "ORM: " + name.split(" (")[0]
    if a["per_sec"] and b["per_sec"]:
        r = b["per_sec"] / a["per_sec"]
        ratios[f"orm_{ph}_evd_vs_sqlite"] = round(r, 3)
        ratios[f"orm_{ph}_sqlite_per_sec"] = a["per_sec"]
        ratios[f"orm_{ph}_evd_per_sec"] = b["per_sec"]
        print(f"{label}: sqlite:/// {a['per_sec']:,.0f}/s, evd:/// {b['per_sec']:,.0f}/s, evd/sqlite = {r:.2f}x "
              f"(the cost of going out of process; no target, to be driven down)")
    else:
        print(f"{label}: evd/sqlite n/a ({a['error'] or b['error']})")

# emit (durable) vs JetStream's acked publish (issue 24): the target is to be ahead of it.
e, js = by_key["emit_durable"]["per_sec"], by_key["forward_jsraw"]["per_sec"]
if e is not None and js:
    ratios["emit_durable_vs_jetstream_acked"] = round(e / js, 3)
    targets["emit_durable_ahead_of_jetstream_acked"] = e >= js
    print(f"emit pipelined (durable): {e:,.0f}/s = {e / js:.2f}x JetStream's acked pipelined publish ({js:,.0f}/s; "
          f"target: ahead of it: {ok(e >= js)})")
elif e is not None:
    print(f"emit pipelined (durable): {e:,.0f}/s; JetStream acked publish n/a ({by_key['forward_jsraw']['error']})")
else:
    print(f"emit pipelined (durable): n/a ({by_key['emit_durable']['error']})")

# Forwarding.
r = by_key["forward_evd"]["per_sec"]
if r is not None:
    targets["forward_events_per_sec >= 300000"] = r >= 300_000
    raw_rate = by_key["forward_jsraw"]["per_sec"]
    if raw_rate:
        ratios["forward_vs_jetstream_raw"] = round(r / raw_rate, 3)
    print(f"forwarding: evforward {r:,.0f} events/s (target >= 300,000: {ok(r >= 300_000)})"
          + (f" = {r / raw_rate:.2f}x JetStream's raw publish rate ({raw_rate:,.0f}/s)" if raw_rate else
             f"; JetStream raw n/a ({by_key['forward_jsraw']['error']})"))
else:
    print(f"forwarding: n/a ({by_key['forward_evd']['error']})")
lag_row = by_key["forward_lag"]
if lag_row["p99_us"] is not None:
    p99_ms = lag_row["p99_us"] / 1e3
    targets["forward_lag_p99_ms <= 50"] = p99_ms <= 50
    ratios["forward_lag_p50_ms"] = round(lag_row["p50_us"] / 1e3, 2)
    ratios["forward_lag_p99_ms"] = round(p99_ms, 2)
    print(f"forwarding lag at {meta.get('forward_rate', 0):,} events/s: p50 {lag_row['p50_us'] / 1e3:.1f} ms, "
          f"p99 {p99_ms:.1f} ms (target p99 <= 50 ms: {ok(p99_ms <= 50)})")
else:
    print(f"forwarding lag: n/a ({lag_row['error']})")

# Memory.
for r, limit, key in ((m_idle, 20, "mem_idle_mb <= 20"), (m_subs, 60, "mem_1000_subscribers_mb <= 60")):
    if r["mb"] is not None:
        targets[key] = r["mb"] <= limit
        print(f"memory: {r['workload']}: {r['mb']:.1f} MB (target <= {limit} MB: {ok(r['mb'] <= limit)})")
    else:
        print(f"memory: {r['workload']}: n/a ({r['error']})")
if m_churn.get("kb_per_connection") is not None:
    ratios["mem_kb_per_connection"] = m_churn["kb_per_connection"]
    print(f"memory: {m_churn['kb_per_connection']:.2f} KB per connection after {churned:,} connections")
if m_stall["mb"] is not None and m_upd["mb"] is not None:
    import re
    added = m_stall["mb"] - m_upd["mb"]
    ratios["mem_stalled_added_mb"] = round(added, 1)
    limit = re.search(r"(\d+) MiB", meta["outbox_limit"] or "")
    verdict = "no outbox byte limit known"
    if limit:
        bound = int(limit.group(1)) * 1.048576  # MiB in MB
        targets["mem_stalled_added_mb <= outbox limit"] = added <= bound
        verdict = f"target: within the outbox limit of {limit.group(1)} MiB: {ok(added <= bound)}"
    print(f"memory: a stalled subscriber adds {added:.1f} MB to the UPDATE's peak ({m_stall['mb']:.0f} vs "
          f"{m_upd['mb']:.0f} MB; {verdict})")
else:
    print(f"memory: stalled subscriber n/a ({m_stall['error'] or m_upd['error']})")

if want_json:
    for r in rows:
        del r["key"]
    for r in mem_rows:
        del r["key"], r["reps"]
    print(json.dumps({"n": meta["n"], "repetitions": meta["reps"], "insert_rows": total, "insert_batch": batch,
                      "fanout_rows": fan_rows, "replay_events": replay_events, "meta": meta, "rows": rows,
                      "memory": mem_rows, "ratios": ratios, "targets_met": targets}))
