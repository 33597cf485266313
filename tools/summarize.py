"""Table (and optional learning-curve plot) of a tree of runs, over seeds.

For every run directory below ROOT (default runs/) holding config.json and metrics.jsonl it takes
the evaluations of one metric (default eval/normalized_score; a run without it, such as a PointMaze
run, falls back to eval/success), and groups runs by (experiment, env, arm). The arm is edis or
no-edis, and names the guidance weights that are not 1, e.g. edis(state=0), or edis(unguided) when
all three are 0; --group-by adds config fields to the key. Per group it prints, over seeds:
  offline  mean of the last offline evaluation (where online fine-tuning starts)
  final    mean of the last evaluation, with its std and the half-width of its 95% confidence
           interval (Student t, n-1 degrees of freedom)
  auc      area under the online curve: the mean of a run's online evaluations (charts/phase_online
           == 1), averaged over seeds, with its 95% half-width
and, for every arm of a group that has a no-edis arm, the differences arm - no-edis seed by seed
(d_final, d_auc, with 95% half-widths): the runs of a seed share the offline phase, so this paired
difference is the sharper test. --against edis subtracts the full EDIS arm instead (an ablation).
Runs whose last evaluation is before offline_steps + online_steps (stopped, or still running) are
left out and counted.

With --diagnostics it also prints, per EDIS arm, the per-cycle diagnostics (docs/design.md §7) as
mean and std over seeds, cycle by cycle: what the learner consumes (guided and unguided samples, the
model's inpainting at real (s, a), the real positive buffer), the energies' held-out losses, the
guards.

Usage: python tools/summarize.py [ROOT] [--metric eval/success] [--group-by dataset,utd] [--plot curves.png] [--against edis]
                           [--diagnostics]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

FALLBACK = ("eval/normalized_score", "eval/success")
GUIDANCE = ("state", "policy", "transition")
# two-sided 95% Student t quantiles t_{0.975}(df), df = 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964  # beyond the table: Cornish-Fisher expansion to 1/df^2, error < 1e-4 for df > 30
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std_ci(v: list[float]) -> tuple[float, float, float]:
    """Mean, sample std and the half-width of the 95% t interval of the mean (nan for one value)."""
    if len(v) < 2:
        return v[0], float("nan"), float("nan")
    s = statistics.stdev(v)
    return statistics.mean(v), s, t975(len(v) - 1) * s / math.sqrt(len(v))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def evaluations(recs: list[dict], metric: str | None) -> tuple[str, dict[int, tuple[float, bool]]] | None:
    """(metric used, step -> (value, online?)) of a run's evaluation records; a step logged twice (a
    resumed run re-evaluating) keeps its last record. None when the run has none of the metric."""
    for m in ([metric] if metric else FALLBACK):
        evals = {r["step"]: (r[m], r.get("charts/phase_online") == 1.0) for r in recs if m in r}
        if evals:
            return m, dict(sorted(evals.items()))
    return None


def arm(cfg: dict) -> str:
    if not cfg.get("edis", True):
        return "no-edis"
    weights = [cfg.get(f"{k}_guidance", 1.0) for k in GUIDANCE]
    states = [f"states={cfg['state_source']}"] if cfg.get("state_source", "model") != "model" else []
    if not any(weights):
        return f"edis({','.join(['unguided', *states])})"
    off = [f"{k}={w:g}" for k, w in zip(GUIDANCE, weights) if w != 1.0] + states
    return f"edis({','.join(off)})" if off else "edis"


def collect(root: Path, metric: str | None, group_by: list[str]):
    """group key -> list of runs (dict with curve, offline, final, auc); plus the unfinished count."""
    groups, unfinished = defaultdict(list), 0
    for cfg_path in sorted(root.rglob("config.json")):
        d = cfg_path.parent
        if not (d / "metrics.jsonl").exists():
            continue
        cfg = json.loads(cfg_path.read_text())
        recs = records(d)
        got = evaluations(recs, metric)
        if got is None:
            continue
        m, evals = got
        end = cfg.get("offline_steps", 0) + cfg.get("online_steps", 0)
        if "online_steps" in cfg and max(evals) < end:
            unfinished += 1
            continue
        offline = [v for v, online in evals.values() if not online]
        online = [v for v, on in evals.values() if on]
        key = (cfg["exp_name"], cfg["env"], arm(cfg), *(f"{f}={cfg.get(f)}" for f in group_by))
        groups[key].append({"metric": m, "curve": {s: v for s, (v, _) in evals.items()}, "final": evals[max(evals)][0],
                            "offline": offline[-1] if offline else None,
                            "auc": statistics.mean(online) if online else None,
                            "offline_steps": cfg.get("offline_steps"), "seed": cfg.get("seed"),
                            "cycles": {int(r["edis/cycle"]): r for r in recs if "edis/cycle" in r}})
    return groups, unfinished


def fmt(x, width=7):
    return f"{x:{width}.2f}" if x is not None and not math.isnan(x) else f"{'-':>{width}s}"


def table(groups) -> list[str]:
    w = max(22, *(len(" ".join(key[2:])) for key in groups))
    lines = [f"{'experiment':12s} {'env':32s} {'arm':{w}s} {'seeds':>5s} {'offline':>7s} {'final':>7s} {'std':>7s} "
             f"{'ci95':>7s} {'auc':>7s} {'auc_ci':>7s}  metric"]
    for key, runs in sorted(groups.items()):
        mean, std, ci = mean_std_ci([r["final"] for r in runs])
        off = [r["offline"] for r in runs if r["offline"] is not None]
        aucs = [r["auc"] for r in runs if r["auc"] is not None]
        auc, _, auc_ci = mean_std_ci(aucs) if aucs else (None, None, None)
        exp, env, a, *extra = key
        metrics = sorted({r["metric"].split("/")[-1] for r in runs})
        lines.append(f"{exp:12s} {env:32s} {' '.join([a, *extra]):{w}s} {len(runs):5d} "
                     f"{fmt(statistics.mean(off) if off else None)} {fmt(mean)} {fmt(std)} {fmt(ci)} {fmt(auc)} "
                     f"{fmt(auc_ci)}  {','.join(metrics)}")
    return lines


def paired(groups, against: str = "no-edis") -> list[str]:
    """Each arm minus the arm `against`, seed by seed (the arms of a seed share the offline phase),
    over the seeds both have: mean difference of the final score and of the online AUC, with 95%
    half-widths."""
    lines = []
    for key, runs in sorted(groups.items()):
        base = groups.get((*key[:2], against, *key[3:]))
        if key[2] == against or base is None:
            continue
        def unique(rs):  # seed -> run, for seeds that name one run only
            seeds = [r["seed"] for r in rs]
            return {r["seed"]: r for r in rs if r["seed"] is not None and seeds.count(r["seed"]) == 1}
        mine, by_seed = unique(runs), unique(base)
        pairs = [(mine[s], by_seed[s]) for s in sorted(mine.keys() & by_seed.keys())]
        if not pairs:
            continue
        d_final = mean_std_ci([a["final"] - b["final"] for a, b in pairs])
        d_auc = [a["auc"] - b["auc"] for a, b in pairs if a["auc"] is not None and b["auc"] is not None]
        d_auc = mean_std_ci(d_auc) if d_auc else (None, None, None)
        if not lines:
            w = max(22, *(len(" ".join(k[2:])) for k in groups))
            lines.append(f"{'experiment':12s} {'env':32s} {'arm - ' + against:{w}s} {'pairs':>5s} {'d_final':>7s} "
                         f"{'ci95':>7s} {'d_auc':>7s} {'ci95':>7s}")
        lines.append(f"{key[0]:12s} {key[1]:32s} {' '.join(key[2:]):{w}s} {len(pairs):5d} {fmt(d_final[0])} "
                     f"{fmt(d_final[2])} {fmt(d_auc[0])} {fmt(d_auc[2])}")
    return lines


# The per-cycle diagnostics worth a line, in this order: what the learner consumes, then the energies
# and the guards (a key a run does not log is skipped).
SETS = ("guided", "unguided", "inpainted", "positive")
DIAGNOSTICS = (*(f"gen/{s}_{m}" for m in ("dynamics_mse", "dynamics_tail", "reward_mse", "terminal_error", "wall_crossing")
                 for s in SETS),
               *(f"gen/{s}_self_tail" for s in ("guided", "unguided", "positive")),
               *(f"gen/{s}_actions_out_of_box" for s in SETS[:2]),
               *(f"gen/{s}_{m}" for m in ("policy_logprob", "state_mmd") for s in SETS[:2]),
               *(f"energy/{k}_heldout_loss_low_sigma" for k in GUIDANCE), "energy/transition_heldout_top1_low_sigma",
               *(f"edis/{k}_guides" for k in GUIDANCE), "edis/policy_pulls", "edis/state_pulls",
               "gen/guidance_clip_rate", "edis/fallback")


def diagnostics(groups) -> list[str]:
    """Per EDIS arm: each diagnostic's mean (std) over seeds at every cycle."""
    lines = []
    for key, runs in sorted(groups.items()):
        cycles = sorted({c for r in runs for c in r["cycles"]})
        if not cycles:
            continue
        lines.append(f"\n{' '.join(key)}: per-cycle diagnostics, mean (std) over {len(runs)} seed(s)")
        lines.append(f"  {'metric':44s}" + "".join(f"{'cycle ' + str(c):>16s}" for c in cycles))
        for name in DIAGNOSTICS:
            cells = []
            for c in cycles:
                v = [r["cycles"][c][name] for r in runs if c in r["cycles"] and name in r["cycles"][c]]
                m, sd, _ = mean_std_ci(v) if v else (None, None, None)
                cells.append(f"{m:8.3f} ({sd:5.3f})" if v and len(v) > 1 else f"{m:8.3f}        " if v else f"{'-':>16s}")
            if any(c.strip() != "-" for c in cells):
                lines.append(f"  {name:44s}" + "".join(f"{c:>16s}" for c in cells))
    return lines


def plot(groups, path: Path):
    """Metric against step, mean +- std over seeds per arm, one panel per (experiment, env, group-by)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = defaultdict(dict)
    for (exp, env, a, *extra), runs in sorted(groups.items()):
        panels[(exp, env, *extra)][a] = runs
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False, dpi=100)
    for ax, (panel, arms) in zip(axes.flat, panels.items()):
        for a, runs in arms.items():
            steps = sorted({s for r in runs for s in r["curve"]})
            vals = [[r["curve"][s] for r in runs if s in r["curve"]] for s in steps]
            mu = [statistics.mean(v) for v in vals]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            line, = ax.plot(steps, mu, marker="o", ms=3, label=f"{a} (n={len(runs)})")
            ax.fill_between(steps, [m - s for m, s in zip(mu, sd)], [m + s for m, s in zip(mu, sd)],
                            color=line.get_color(), alpha=0.2)
        boundary = {r["offline_steps"] for runs in arms.values() for r in runs}
        if len(boundary) == 1 and None not in boundary:
            ax.axvline(boundary.pop(), color="0.5", ls="--", lw=1)  # offline -> online
        metric = sorted({r["metric"] for runs in arms.values() for r in runs})
        ax.set(title=" ".join(panel[:2]) + "".join(f"\n{e}" for e in panel[2:]), xlabel="step (offline updates + online env steps)", ylabel=", ".join(metric))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="runs")
    p.add_argument("--metric", default=None, help=f"metric to read (default: the first of {', '.join(FALLBACK)} a run has)")
    p.add_argument("--group-by", default="", help="comma-separated config.json fields added to the group key")
    p.add_argument("--plot", type=Path, default=None, help="write learning curves to this PNG")
    p.add_argument("--against", default="no-edis", help="the arm the paired differences subtract, e.g. edis for an ablation")
    p.add_argument("--diagnostics", action="store_true", help="also print each EDIS arm's per-cycle diagnostics")
    args = p.parse_args(argv)
    groups, unfinished = collect(Path(args.root), args.metric, [f for f in args.group_by.split(",") if f])
    if not groups:
        print(f"no finished run with {args.metric or ' or '.join(FALLBACK)} below {args.root}"
              + (f" ({unfinished} unfinished)" if unfinished else ""))
        return
    print("\n".join(table(groups)))
    if diff := paired(groups, args.against):
        print("\npaired by seed:\n" + "\n".join(diff))
    if args.diagnostics:
        print("\n".join(diagnostics(groups)))
    if unfinished:
        print(f"({unfinished} unfinished run(s) left out)")
    if args.plot:
        plot(groups, args.plot)
        print(f"curves: {args.plot}")


if __name__ == "__main__":
    main()
