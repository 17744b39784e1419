"""Where `make test`'s time goes, from PV_JAX_TEST_PROFILE files (tests/conftest.py).

    PV_JAX_TEST_PROFILE=/tmp/a.jsonl make test
    python bench/test_profile.py /tmp/a.jsonl            # totals and the slowest tests, as JSON
    python bench/test_profile.py /tmp/a.jsonl /tmp/b.jsonl   # and the per-test change from a to b

Seconds are each test's wall time in its worker (setup and teardown included) and jax's compile
events within it: ``trace`` (Python tracing to a jaxpr), ``lower`` (jaxpr to MLIR) and
``compile`` (XLA's backend), with the number of compiles; a process the test starts (train_tpu.py,
the web app's server) is not seen.
"""

from __future__ import annotations

import argparse
import json

EVENTS = {
    "trace": "/jax/core/compile/jaxpr_trace_duration",
    "lower": "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "compile": "/jax/core/compile/backend_compile_duration",
    "cache_saved": "/jax/compilation_cache/compile_time_saved_sec",
}


def load(path: str) -> dict[str, dict]:
    """Test id -> {wall, trace, lower, compile, cache_saved, compiles} (the last row per test)."""
    rows = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            ev = r["events"]
            row = {"wall": r["wall"]}
            row |= {k: ev.get(name, (0.0, 0))[0] for k, name in EVENTS.items()}
            row["compiles"] = ev.get(EVENTS["compile"], (0.0, 0))[1]
            rows[r["test"]] = row
    return rows


def totals(rows: dict[str, dict]) -> dict:
    """Sums over the tests, rounded to seconds."""
    keys = ("wall", "trace", "lower", "compile", "cache_saved", "compiles")
    return {"tests": len(rows)} | {k: round(sum(r[k] for r in rows.values()), 1) for k in keys}


def main(argv: list[str] | None = None) -> dict:
    """Print (and return) the JSON summary of one profile, or of two and their difference."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("profiles", nargs="+", help="one or two PV_JAX_TEST_PROFILE files")
    p.add_argument("--top", type=int, default=15, help="how many tests to list")
    args = p.parse_args(argv)
    if len(args.profiles) > 2:
        p.error(f"one or two profiles, got {len(args.profiles)}")
    runs = [load(path) for path in args.profiles]
    out = {"totals": [totals(r) for r in runs]}
    last = runs[-1]
    slowest = sorted(last, key=lambda t: -last[t]["wall"])[: args.top]
    out["slowest"] = [{"test": t} | {k: round(v, 1) for k, v in last[t].items()} for t in slowest]
    if len(runs) == 2:
        a, b = runs
        common = sorted(set(a) & set(b), key=lambda t: b[t]["wall"] - a[t]["wall"])
        out["gained"] = [
            {"test": t, "wall": [round(a[t]["wall"], 1), round(b[t]["wall"], 1)]}
            for t in common[: args.top]
        ]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
