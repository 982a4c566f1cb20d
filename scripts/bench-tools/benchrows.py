"""The bulk-insert bench's rows, identical to the ones evdbench.c builds (bench_row there)."""

TAGS = ("alpha", "beta", "gamma", "delta")

COLUMNS = [("id", "integer"), ("name", "text"), ("score", "float"), ("tag", "text")]


def row(i):
    return {"id": i, "name": f"name-{i:011d}", "score": (i % 1000) * 0.25 + 0.125, "tag": TAGS[i % 4]}


def batches(total, batch):
    """Lists of rows: ids 1..total in batches of `batch` rows."""
    return [[row(i) for i in range(first, min(first + batch, total + 1))] for first in range(1, total + 1, batch)]


def summary(total, batch, latencies_s, elapsed_s, **extra):
    """One repetition as the JSON object the report reads (the shape evdbench prints)."""
    lat = sorted(latencies_s)
    out = {"n": total, "batch": batch, "batches": len(lat), "p50_us": round(lat[len(lat) // 2] * 1e6, 2),
           "p99_us": round(lat[int(len(lat) * 0.99)] * 1e6, 2), "per_sec": round(total / elapsed_s)}
    out.update(extra)
    return out
