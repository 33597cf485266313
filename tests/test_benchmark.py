"""tools/benchmark.py runs end to end at toy sizes, and its whole-run line adds up its parts."""
import re

import benchmark


def test_benchmark_runs_and_its_whole_run_estimate_adds_up(capsys):
    benchmark.main(benchmark.Bench(device="cpu", obs_dim=4, act_dim=2, diffusion_width=16, diffusion_depth=1,
                                   sample_steps=2, batch=20, repeats=1, threads=1, eval_env="Hopper-v4",
                                   eval_episodes=2, eval_workers=(1, 2)))
    out = capsys.readouterr().out
    hours = {k.strip(): float(v) for k, v in re.findall(r"^  (.+?)\s+([\d.]+) h", out, re.M)}
    parts = sum(v for k, v in hours.items() if "evaluations" not in k)
    for w in (1, 2):
        line = re.search(rf"evaluations, --eval-workers {w}\s+([\d.]+) h\s+total ([\d.]+) h", out)
        assert line, out
        assert abs(float(line[2]) - (parts + float(line[1]))) < 0.02 + 0.01 * float(line[2])
    assert "EDIS cycles (19)" in out  # the paper schedule: a cycle every 10k online steps from 10k, none at 200k
