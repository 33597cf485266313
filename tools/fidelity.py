"""How close the diffusion model's transitions come to the simulator's: against its pretraining steps
and size (the "model" lever of docs/study.md), against the sampler's schedule (--schedules), and by the
model's disagreement with itself (--self-check), measured on what the learner would consume.

From a finished `edis_iql.py` run (its data, normalization and EDIS sizes, read from config.json and
checkpoint.pt), a fresh denoiser is pretrained on the offline data as the run's pretraining does. At
each budget in --steps, the model's unguided samples and its inpainting of real offline (s, a) are
checked as a cycle's diagnostics check them (common.TransitionCheck: the next state's error against
the simulator's and its tail share, the reward's error, on mazes the share of impossible moves).
One JSON line per budget, with the seconds spent training so far.

    python tools/fidelity.py ~/edis_study/halfcheetah_mr_iql/edis/seed0 --steps 3000,10000,30000
    python tools/fidelity.py RUN_DIR --steps 3000 --width 512 --depth 4

With --self-check no model is trained: the run's own final model and energies draw guided and
unguided samples, and each sample's (r, s' - s, terminal) is compared with a second inpainting at its
own (s, a), a check that needs no simulator (the "disagreement", normalized units; self_tail: the
share beyond the 99th percentile of the real rows', the positive buffer's, as each cycle logs it). The tool
reports how well the disagreement finds the rows the simulator says are wrong (rank correlation with
the next state's error, AUROC for the tail rows and impossible moves) and what dropping the rows that
disagree most (--drop percentages) would leave; its first row is a control on real rows (the positive
buffer's) against the same rows with another row's next state (teleports), which the score must tell
apart.

    python tools/fidelity.py ~/edis_study/halfcheetah_mr_iql/edis/seed0 --self-check --drop 10,20

With --schedules the run's own model samples under each sampler schedule SIGMA_MAX:STEPS (the
scripts' --sigma-max and --sample-steps), --seeds times, with the budgets' checks on every row:
unguided samples, and inpaintings of real offline (s, a) and of real s.

    python tools/fidelity.py RUN_DIR --schedules 80:128,10:86,80:32,10:22 --rows 2000 --seeds 3
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pool_lever import rebuild  # the run's EDIS, buffers and checks; it also puts the scripts on sys.path
from benchmark import SCHEDULE_FORMAT, parse_schedule  # noqa: E402

import edis_iql  # noqa: E402


def ranks(v: np.ndarray) -> np.ndarray:
    """0-based ranks, ties sharing their mean rank."""
    r = np.empty(len(v))
    r[np.argsort(v, kind="stable")] = np.arange(len(v))
    _, group, count = np.unique(v, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=r) / count)[group]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score of a labelled row > score of an unlabelled one); nan without both kinds."""
    label = np.asarray(label, bool)
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    r = ranks(np.concatenate([pos, neg]))[: len(pos)] + 1
    return float((r.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def disagreement(edis, x: torch.Tensor) -> np.ndarray:
    """Per row: the distance between its (r, s' - s, terminal) and the model's second inpainting of
    them at its own (s, a) (EDIS.self_disagreement, the cycle's gen/{set}_self_tail check)."""
    return edis.self_disagreement(x)[0].numpy()


def self_check(edis, offline, check, rows: int, drops: list[int], seed: int):
    torch.manual_seed(seed)
    source = edis.positive_buffer if edis.positive_buffer.size else offline  # the cycle's reference rows
    real = source.sample(rows)
    teleported = {**real, "next_obs": real["next_obs"][torch.randperm(rows)]}
    d = disagreement(edis, edis.to_x({k: torch.cat([real[k], teleported[k]]) for k in real}))
    label = np.arange(2 * rows) >= rows
    threshold = np.quantile(d[~label], 0.99)  # as the cycle's gen/{set}_self_tail
    print(json.dumps({"set": "real vs teleported", "rows": rows, "real_disagreement": round(float(d[~label].mean()), 4),
                      "teleported_disagreement": round(float(d[label].mean()), 4),
                      "auroc_teleported": round(auroc(d, label), 4),
                      "teleported_self_tail": round(float(np.mean(d[label] > threshold)), 4)}), flush=True)
    for name, guided in (("guided", True), ("unguided", False)):
        x = edis.sample(rows, guided=guided)
        x = x[torch.isfinite(x).all(1)]  # as a cycle drops them
        d = disagreement(edis, x)
        x, d = x[torch.as_tensor(np.isfinite(d))], d[np.isfinite(d)]
        per_row = check.rows(edis.from_x(x), n_simulated=len(x))
        out = {"set": name, "rows": len(x), "nonfinite_dropped": rows - len(x), "disagreement": float(d.mean()),
               "self_tail": float(np.mean(d > threshold))}
        out.update({k: float(np.mean(v)) for k, v in per_row.items()})
        if "dynamics_mse" in per_row:
            out["spearman_dynamics_mse"] = spearman(d, per_row["dynamics_mse"])
            out["auroc_dynamics_tail"] = auroc(d, per_row["dynamics_tail"])
        if "wall_crossing" in per_row:
            out["auroc_wall_crossing"] = auroc(d, per_row["wall_crossing"])
        for q in drops:  # what the rows left after dropping the q% that disagree most would show
            keep = d <= np.quantile(d, 1 - q / 100)
            out.update({f"drop{q}_{k}": float(np.mean(v[keep])) for k, v in per_row.items()})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}), flush=True)


def schedules(edis, offline, check, specs: list[tuple[float, int]], rows: int, seeds: int, seed: int):
    """The run's own model under each (sigma_max, steps): its unguided samples and
    its inpaintings of real offline (s, a) and of real s, every row checked; mean and std over seeds."""
    for sigma_max, steps in specs:  # seeds seed, seed + 1, ... for every schedule
        edis.sigmas = edis_iql.karras_sigmas(steps, sigma_max)
        per_seed = {}
        for s in range(seed, seed + seeds):
            torch.manual_seed(100 + s)
            real, ref = edis.to_x(offline.sample(rows)), edis.to_x(offline.sample(rows))
            torch.manual_seed(s)
            sets = {"unguided": edis.sample(rows),
                    **dict(zip(("inpainted", "inpainted_s"), edis.inpaint([(real, edis.ds + edis.da), (real, edis.ds)])))}
            for name, x in sets.items():
                for k, v in check.rows(edis.from_x(x), n_simulated=rows).items():
                    per_seed.setdefault(f"{name}_{k}", []).append(float(np.mean(v)))
            per_seed.setdefault("unguided_mmd", []).append(edis_iql.rbf_mmd(sets["unguided"], ref).item())
        out = {"sigma_max": sigma_max, "steps": steps, "rows": rows, "seeds": seeds}
        for k, v in per_seed.items():
            out[k], out[f"{k}_std"] = round(float(np.mean(v)), 5), round(float(np.std(v)), 5)
        print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished edis_iql.py run (config.json, checkpoint.pt)")
    p.add_argument("--steps", default=None, help="pretraining budgets to check, increasing (default 3000,10000,30000)")
    p.add_argument("--width", type=int, default=None, help="denoiser width (default: the run's)")
    p.add_argument("--depth", type=int, default=None, help="denoiser residual blocks (default: the run's)")
    p.add_argument("--rows", type=int, default=1000, help="samples per set (budgets: the simulator replays the first "
                   "500, the maze move check takes every row; --self-check and --schedules replay every row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--self-check", action="store_true", help="check the run's own model by its disagreement "
                   "with itself, against the simulator (no pretraining; see above)")
    p.add_argument("--drop", default=None, help="with --self-check: percentages of the most disagreeing rows to drop "
                   "(default 10,20)")
    p.add_argument("--schedules", default=None, help="check the run's own model under sampler schedules "
                   "SIGMA_MAX:STEPS,... (no pretraining; see above)")
    p.add_argument("--seeds", type=int, default=None, help="with --schedules: seeds per schedule, from --seed on "
                   "(default 1)")
    a = p.parse_args()
    if a.self_check and a.schedules:
        p.error("--self-check and --schedules are two checks of the run's own model: give one")
    if (a.self_check or a.schedules) and (a.steps, a.width, a.depth) != (None, None, None):
        p.error("--self-check and --schedules check the run's own model: --steps, --width and --depth do not apply; "
                "drop them")
    if a.drop is not None and not a.self_check:
        p.error("--drop goes with --self-check; add --self-check or drop --drop")
    if a.seeds is not None and not a.schedules:
        p.error("--seeds goes with --schedules (the budgets and --self-check take one --seed)")
    seeds = 1 if a.seeds is None else a.seeds
    specs = [parse_schedule(s) for s in a.schedules.split(",")] if a.schedules else []
    if None in specs:
        p.error(f"--schedules {a.schedules}: give {SCHEDULE_FORMAT}, comma-separated, e.g. 80:128,10:86")
    if seeds < 1:
        p.error(f"--seeds {seeds}: must be at least 1")
    try:
        budgets = [int(s) for s in (a.steps or "3000,10000,30000").split(",")]
    except ValueError:
        budgets = []
    if not budgets or budgets != sorted(set(budgets)) or budgets[0] < 1:
        p.error(f"--steps {a.steps}: give increasing positive step counts, e.g. 3000,10000,30000")
    try:
        drops = [int(s) for s in (a.drop or "10,20").split(",")]
    except ValueError:
        drops = []
    if not drops or not all(0 < q < 100 for q in drops):
        p.error(f"--drop {a.drop}: give whole percentages between 0 and 100, e.g. 10,20")
    for name in ("width", "depth", "rows"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name} {getattr(a, name)}: must be at least 1")
    cfg = a.run_dir / "config.json"
    run = json.loads(cfg.read_text()) if cfg.exists() else {}
    if run.get("exp_name") != "edis_iql" or not run.get("edis") or not (a.run_dir / "checkpoint.pt").exists():
        p.error(f"{a.run_dir} is not a finished edis_iql.py run with EDIS on (config.json with exp_name edis_iql "
                f"and edis true, checkpoint.pt)")
    torch.set_num_threads(1)
    args, edis, _, offline, _, check = rebuild(a.run_dir)
    if a.self_check or specs:
        with torch.no_grad():
            if specs:
                return schedules(edis, offline, check, specs, a.rows, seeds, a.seed)
            return self_check(edis, offline, check, a.rows, drops, a.seed)
    if a.width is not None:
        edis.args.diffusion_width = a.width
    if a.depth is not None:
        edis.args.diffusion_depth = a.depth
    torch.manual_seed(a.seed)
    edis.new_model(len(edis.x_mean))
    done, spent = 0, 0.0
    for budget in budgets:
        t = time.time()
        edis.train_diffusion([offline], [1.0], budget - done)
        spent, done = spent + time.time() - t, budget
        with torch.no_grad(), torch.random.fork_rng():  # the checks draw apart from training: a budget's
            torch.manual_seed(a.seed + budget)           # model does not depend on the budgets before it
            sets = {"unguided": edis.sample(a.rows),
                    "inpainted": edis.inpaint([(edis.to_x(offline.sample(a.rows)), edis.ds + edis.da)])[0]}
        row = {"steps": budget, "seconds": round(spent, 1), "width": edis.model.inp.out_features,
               "depth": len(edis.model.blocks), "sample_steps": args.sample_steps,
               "sigma_max": args.sigma_max}
        for name, x in sets.items():
            row.update({f"{name}_{k}": round(v, 4) for k, v in check(edis.from_x(x)).items()})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
