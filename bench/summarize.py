#!/usr/bin/env python3
"""Medians (with min and max) of rookery-bench JSON results.

summarize.py DIR                  table of every scenario in DIR (name-N.json files), then
                                  the ratios to the machine's limits measured in the same run
summarize.py --median F... KEY    median of figure KEY over files F
"""
import glob, json, os, re, statistics, sys


def figure(doc, key):
    value = doc["figures"]
    for part in key.split("."):
        value = value[part]
    return float(value)


def main():
    if sys.argv[1] == "--median":
        files, key = sys.argv[2:-1], sys.argv[-1]
        print(statistics.median(figure(json.load(open(f)), key) for f in files))
        return
    directory = sys.argv[1]
    groups = {}
    for path in sorted(glob.glob(os.path.join(directory, "*-[0-9].json"))):
        name = re.sub(r"-\d+\.json$", "", os.path.basename(path))
        groups.setdefault(name, []).append(json.load(open(path)))
    for name, docs in groups.items():
        print(f"## {name} ({len(docs)} runs)")
        keys = set()
        for d in docs:
            src = d.get("figures", d)
            for k, v in src.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.add(k)
                elif isinstance(v, dict) and "p99_ms" in v:
                    keys.update(f"{k}.{q}" for q in ("p50_ms", "p99_ms", "max_ms"))
        for k in sorted(keys):
            values = []
            for d in docs:
                src = d.get("figures", d)
                try:
                    v = src
                    for part in k.split("."):
                        v = v[part]
                    values.append(float(v))
                except (KeyError, TypeError, ValueError):
                    pass
            if values:
                print(f"  {k:40} median {statistics.median(values):12.2f}  min {min(values):12.2f}  max {max(values):12.2f}")
        verdicts = [d.get("verdict") for d in docs if d.get("verdict")]
        if verdicts:
            clean = all(v["clean"] for v in verdicts)
            print(f"  verdict: {'clean' if clean else 'NOT CLEAN'} in {len(verdicts)} runs")
    ratios(groups)


def median(docs, key):
    values = []
    for d in docs:
        v = d.get("figures", d)
        try:
            for part in key.split("."):
                v = v[part]
            values.append(float(v))
        except (KeyError, TypeError, ValueError):
            pass
    return statistics.median(values) if values else None


# (what, scenario, its figure, the limit it is measured against)
RATIOS = [
    ("acked msgs/s / pgbench 1 row/tx commits/s", "throughput", "acked_per_s",
     "pgbench_single_row_commits_per_s"),
    ("acked msgs/s / pgbench 100 rows/tx rows/s", "throughput", "acked_per_s",
     "pgbench_100_rows_per_s"),
    ("fan-out deliveries/s / plain broadcast baseline", "fanout", "deliveries_per_s",
     "broadcast_fanout_deliveries_per_s"),
]


def ratios(groups):
    limits = groups.get("limits")
    if not limits:
        return
    print("## ratios of medians to the limits of the same run")
    for what, scenario, key, limit in RATIOS:
        ours = median(groups.get(scenario, []), key)
        theirs = median(limits, limit)
        if ours is not None and theirs:
            print(f"  {what:50} {ours / theirs:6.3f}  ({ours:.0f} / {theirs:.0f})")


if __name__ == "__main__":
    main()
