"""summarize.py: the last evaluation of each run, grouped over seeds by (experiment, env, EDIS on/off)."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_run(d: Path, exp: str, edis: bool, scores: list[float]):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"exp_name": exp, "env": "hopper-medium-v2", "edis": edis}))
    recs = [{"step": 10 * i, "eval/normalized_score": s} for i, s in enumerate(scores)]
    recs.insert(1, {"step": 5, "losses/q": 1.0})  # records without the metric are skipped
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def test_summarize_groups_seeds_and_takes_the_last_evaluation(tmp_path):
    finals = [40.0, 50.0, 66.0]
    for seed, final in enumerate(finals):
        write_run(tmp_path / f"edis{seed}", "edis_iql", True, [0.0, 10.0, final])
    write_run(tmp_path / "base0", "edis_iql", False, [5.0, 7.0])
    out = subprocess.run([sys.executable, "summarize.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in out[1:]}
    n, mean, std = rows[("edis_iql", "hopper-medium-v2", "edis")]
    assert int(n) == 3
    assert float(mean) == round(statistics.mean(finals), 1)
    assert float(std) == round(statistics.stdev(finals), 1)
    assert rows[("edis_iql", "hopper-medium-v2", "no-edis")] == ["1", "7.0", "0.0"]
