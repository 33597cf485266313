"""Table of final scores over seeds: for every run directory below ROOT (default runs/), the last
evaluation in metrics.jsonl, grouped by (script, env, EDIS on/off) from config.json.
Usage: python summarize.py [ROOT] [--metric eval/success]"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def final_eval(run_dir: Path, metric: str) -> float | None:
    last = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if metric in rec:
            last = rec[metric]
    return last


def main(argv: list[str]):
    metric = "eval/normalized_score"
    if "--metric" in argv:
        i = argv.index("--metric")
        metric = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    root = Path(argv[0] if argv else "runs")
    groups = defaultdict(list)
    for cfg_path in sorted(root.rglob("config.json")):
        cfg = json.loads(cfg_path.read_text())
        if not (cfg_path.parent / "metrics.jsonl").exists():
            continue
        value = final_eval(cfg_path.parent, metric)
        if value is not None:
            groups[(cfg["exp_name"], cfg["env"], "edis" if cfg["edis"] else "no-edis")].append(value)
    if not groups:
        print(f"no run directory with {metric} below {root}")
        return
    print(f"{'experiment':20s} {'env':32s} {'mode':8s} {'seeds':>5s} {'mean':>8s} {'std':>7s}   ({metric}, last evaluation)")
    for (exp, env, mode), v in sorted(groups.items()):
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{exp:20s} {env:32s} {mode:8s} {len(v):5d} {statistics.mean(v):8.1f} {std:7.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
