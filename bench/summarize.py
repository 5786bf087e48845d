#!/usr/bin/env python3
"""Medians (with min and max) of rookery-bench JSON results.

summarize.py DIR                  table of every scenario in DIR (name-N.json files)
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


if __name__ == "__main__":
    main()
