"""summarize.py: runs grouped over seeds by (experiment, env, arm); final score, std, 95% t interval,
online AUC, ablation arms, unfinished runs left out, and the learning-curve plot."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE, ONLINE = 100, 200


def write_run(d: Path, exp: str, edis: bool, scores: list[float], online_from: int | None = None,
              metric: str = "eval/normalized_score", steps: list[int] | None = None, **cfg):
    """A run whose i-th evaluation has value scores[i] at steps[i] (default 50 apart); evaluations from
    index online_from on are online (charts/phase_online = 1)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"exp_name": exp, "env": "hopper-medium-v2", "edis": edis, **cfg}))
    steps = steps or [50 * (i + 1) for i in range(len(scores))]
    recs = [{"step": s, metric: v, "eval/return": 1.0,
             **({} if online_from is None else {"charts/phase_online": float(i >= online_from)})}
            for i, (s, v) in enumerate(zip(steps, scores))]
    recs.insert(1, {"step": 5, "losses/q": 1.0})  # records without the metric are skipped
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def summarize(*args) -> list[str]:
    return subprocess.run([sys.executable, "tools/summarize.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.splitlines()


def rows_of(out: list[str]) -> dict:
    """(experiment, env, arm) -> the numeric columns (seeds, offline, final, std, ci95, auc, auc_ci) and the metric."""
    rows = {}
    for line in out[1:]:
        f = line.split()
        if len(f) == 11:
            rows[tuple(f[:3])] = [int(f[3])] + [float("nan") if x == "-" else float(x) for x in f[4:10]] + [f[10]]
    return rows


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t, from its density by Simpson's rule and bisection."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x, n=2000):
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return lo


def test_summarize_groups_seeds_and_takes_the_last_evaluation(tmp_path):
    finals = [40.0, 50.0, 66.0]
    for seed, final in enumerate(finals):
        write_run(tmp_path / f"edis{seed}", "edis_iql", True, [0.0, 10.0, final])
    write_run(tmp_path / "base0", "edis_iql", False, [5.0, 7.0])
    rows = rows_of(summarize(tmp_path))
    n, _, mean, std, *_ = rows[("edis_iql", "hopper-medium-v2", "edis")]
    assert n == 3
    assert mean == round(statistics.mean(finals), 2)
    assert std == round(statistics.stdev(finals), 2)
    n, _, mean, std, ci, *_ = rows[("edis_iql", "hopper-medium-v2", "no-edis")]
    assert (n, mean) == (1, 7.0) and math.isnan(std) and math.isnan(ci)  # one seed: no spread


def test_summarize_ci_auc_ablation_arms_unfinished_and_plot(tmp_path):
    """Catches a wrong t interval, an AUC that mixes in offline evaluations, ablation arms pooled
    with full EDIS, a stopped run counted as finished, a resumed run's repeated evaluation counted
    twice, paired differences taken over mismatched seeds, and a plot that is not a PNG."""
    cfg = {"offline_steps": OFFLINE, "online_steps": ONLINE}
    steps = [50, 100, 150, 200, 250, 300]  # evaluations 0-1 offline, 2-5 online
    curves = {  # arm -> per-seed curves
        ("edis", 1.0): [[1, 2, 10, 20, 30, 40], [2, 3, 12, 22, 28, 35], [0, 1, 11, 19, 33, 44]],
        ("edis", 0.0): [[1, 2, 5, 6, 7, 8], [2, 4, 6, 8, 10, 12]],
        ("no-edis", 1.0): [[1, 2, 3, 4, 5, 6], [1, 3, 4, 4, 6, 7], [2, 2, 2, 3, 3, 5], [0, 1, 2, 3, 4, 9]],
    }
    for (mode, w), runs in curves.items():
        for seed, c in enumerate(runs):
            write_run(tmp_path / f"{mode}{w}" / str(seed), "edis_iql", mode == "edis", c, online_from=2, steps=steps,
                      state_guidance=w, policy_guidance=1.0, transition_guidance=1.0, seed=seed, **cfg)
    # a stopped run (last evaluation before offline + online steps): left out
    write_run(tmp_path / "stopped", "edis_iql", True, [50, 60, 70], online_from=2, steps=steps[:3], **cfg)
    # a resumed run that evaluated step 300 twice: the last record counts
    write_run(tmp_path / "resumed", "edis_iql", False, [1, 2, 3, 4, 5, 99, 6], online_from=2,
              steps=steps + [300], seed=4, **cfg)
    curves[("no-edis", 1.0)].append([1, 2, 3, 4, 5, 6])
    # a maze run without a normalized score: falls back to eval/success
    write_run(tmp_path / "maze", "edis_calql", True, [0.1, 0.2, 0.5], online_from=1, metric="eval/success",
              steps=[100, 200, 300], **cfg)

    png = tmp_path / "curves.png"
    out = summarize(tmp_path, "--plot", png)
    rows = rows_of(out)
    assert "(1 unfinished run(s) left out)" in out
    assert set(rows) == {("edis_iql", "hopper-medium-v2", a) for a in ("edis", "edis(state=0)", "no-edis")} | {
        ("edis_calql", "hopper-medium-v2", "edis")}
    for (mode, w), runs in curves.items():
        name = "no-edis" if mode == "no-edis" else ("edis" if w == 1.0 else "edis(state=0)")
        n, offline, final, std, ci, auc, auc_ci, metric = rows[("edis_iql", "hopper-medium-v2", name)]
        finals = [c[-1] for c in runs]
        aucs = [statistics.mean(c[2:]) for c in runs]  # online evaluations only
        t = t_quantile_975(len(runs) - 1)
        assert n == len(runs) and metric == "normalized_score"
        assert offline == pytest.approx(statistics.mean(c[1] for c in runs), abs=0.006)
        assert final == pytest.approx(statistics.mean(finals), abs=0.006)
        assert std == pytest.approx(statistics.stdev(finals), abs=0.006)
        assert ci == pytest.approx(t * statistics.stdev(finals) / math.sqrt(len(runs)), abs=0.006)
        assert auc == pytest.approx(statistics.mean(aucs), abs=0.006)
        assert auc_ci == pytest.approx(t * statistics.stdev(aucs) / math.sqrt(len(runs)), abs=0.006)
    n, offline, final, *_, auc, _, metric = rows[("edis_calql", "hopper-medium-v2", "edis")]
    assert (n, offline, final, auc, metric) == (1, 0.1, 0.5, 0.35, "success")

    # paired by seed: arm - no-edis over the seeds both arms have
    paired = {tuple(line.split()[:3]): [float(x) for x in line.split()[4:]] for line in out[out.index("paired by seed:") + 2:]
              if line.startswith("edis_")}
    assert set(paired) == {("edis_iql", "hopper-medium-v2", "edis"), ("edis_iql", "hopper-medium-v2", "edis(state=0)")}
    base = curves[("no-edis", 1.0)]
    for arm, w in (("edis", 1.0), ("edis(state=0)", 0.0)):
        runs = curves[("edis", w)]
        d_final = [c[-1] - base[s][-1] for s, c in enumerate(runs)]
        d_auc = [statistics.mean(c[2:]) - statistics.mean(base[s][2:]) for s, c in enumerate(runs)]
        t = t_quantile_975(len(runs) - 1)
        expected = [statistics.mean(d_final), t * statistics.stdev(d_final) / math.sqrt(len(runs)),
                    statistics.mean(d_auc), t * statistics.stdev(d_auc) / math.sqrt(len(runs))]
        assert paired[("edis_iql", "hopper-medium-v2", arm)] == pytest.approx(expected, abs=0.006)

    # --against edis: the ablation arm (and no-edis) minus full EDIS, seed by seed
    out = summarize(tmp_path, "--against", "edis")
    paired = {tuple(line.split()[:3]): [float(x) for x in line.split()[4:]] for line in out[out.index("paired by seed:") + 2:]
              if line.startswith("edis_")}
    assert set(paired) == {("edis_iql", "hopper-medium-v2", a) for a in ("edis(state=0)", "no-edis")}
    full = curves[("edis", 1.0)]
    d_final = [c[-1] - full[s][-1] for s, c in enumerate(curves[("edis", 0.0)])]
    assert paired[("edis_iql", "hopper-medium-v2", "edis(state=0)")][0] == pytest.approx(statistics.mean(d_final), abs=0.006)

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0  # something was drawn

    # --group-by splits groups by a config field
    out = summarize(tmp_path, "--group-by", "online_steps", "--metric", "eval/normalized_score")
    assert any("edis(state=0) online_steps=200" in line for line in out)


def test_arm_names_the_guidance_weights_off():
    """The arm label says which guidance weights differ from 1, and 'unguided' when all three are 0."""
    import importlib
    arm = importlib.import_module("summarize").arm
    assert arm({"edis": False, "state_guidance": 0.0}) == "no-edis"
    assert arm({"edis": True}) == "edis"
    assert arm({"edis": True, "state_guidance": 0.0, "policy_guidance": 1.0}) == "edis(state=0)"
    assert arm({"edis": True, "policy_guidance": 2.0, "transition_guidance": 0.0}) == "edis(policy=2,transition=0)"
    assert arm({"edis": True, "state_guidance": 0.0, "policy_guidance": 0.0, "transition_guidance": 0.0}) == "edis(unguided)"
    assert arm({"edis": True, "state_source": "model"}) == "edis"
    assert arm({"edis": True, "state_source": "positive"}) == "edis(states=positive)"  # not pooled with edis
    assert arm({"edis": True, "state_source": "positive", "transition_guidance": 0.0}) == "edis(transition=0,states=positive)"


def test_diagnostics_are_per_cycle_means_over_seeds(tmp_path):
    """Catches diagnostics pooled across cycles, across arms, or averaged over the wrong seeds: each
    cycle's line holds the mean (std) over the EDIS runs of that cycle's record; no-edis has none."""
    tails = {0: [0.1, 0.3], 1: [0.2, 0.5], 2: [0.6, 0.7]}  # seed -> guided dynamics tail at cycles 1, 2
    for seed, (c1, c2) in tails.items():
        d = tmp_path / f"edis{seed}"
        write_run(d, "edis_iql", True, [1.0, 2.0], seed=seed)
        with open(d / "metrics.jsonl", "a") as f:
            for cycle, v in ((1, c1), (2, c2)):
                f.write(json.dumps({"step": 10 * cycle, "edis/cycle": cycle, "gen/guided_dynamics_tail": v,
                                    "edis/fallback": float(seed == 2 and cycle == 2)}) + "\n")
    write_run(tmp_path / "base0", "edis_iql", False, [1.0, 2.0], seed=0)
    out = summarize(tmp_path, "--diagnostics")
    head = [i for i, line in enumerate(out) if "per-cycle diagnostics" in line]
    assert len(head) == 1 and out[head[0]].startswith("edis_iql hopper-medium-v2 edis:")
    rows = {line.split()[0]: line.split()[1:] for line in out[head[0] + 2:] if line.startswith("  ")}
    for cycle in (0, 1):
        v = [tails[s][cycle] for s in tails]
        assert rows["gen/guided_dynamics_tail"][2 * cycle] == f"{statistics.mean(v):.3f}"
        assert rows["gen/guided_dynamics_tail"][2 * cycle + 1] == f"({statistics.stdev(v):.3f})"
    assert rows["edis/fallback"][:4] == ["0.000", "(0.000)", "0.333", "(0.577)"]
    assert "gen/guided_reward_mse" not in rows  # not logged: no line
