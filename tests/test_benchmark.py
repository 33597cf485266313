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


def test_benchmark_times_sampler_schedules_interleaved(capsys):
    """--schedules: one line per schedule with the three sampler units and a cycle, each round's ratio to
    the first (1.00 for the first itself)."""
    benchmark.main(benchmark.Bench(device="cpu", obs_dim=4, act_dim=2, diffusion_width=16, diffusion_depth=1,
                                   sample_steps=4, batch=20, repeats=2, threads=1, eval_episodes=0,
                                   schedules=("80:4", "10:3")))
    out = capsys.readouterr().out
    rows = re.findall(r"^  (\S+)\s+unguided .* inpainted\s+[\d.]+ \(([\d. ]+)\)\s+cycle\s+([\d.]+) s$", out, re.M)
    assert [r[0] for r in rows] == ["80:4", "10:3"], out
    assert rows[0][1] == "1.00 1.00" and len(rows[1][1].split()) == 2
