"""How close the diffusion model's transitions come to the simulator's, against its pretraining steps
and size: the "model" lever of docs/study.md, measured on what the learner would consume.

From a finished `edis_iql.py` run (its data, normalization and EDIS sizes, read from config.json and
checkpoint.pt), a fresh denoiser is pretrained on the offline data as the run's pretraining does. At
each budget in --steps, the model's unguided samples and its inpainting of real offline (s, a) are
checked as a cycle's diagnostics check them (common.TransitionCheck: the next state's error against
the simulator's and its tail share, the reward's error, on mazes the share of impossible moves).
One JSON line per budget, with the seconds spent training so far.

    python tools/fidelity.py ~/edis_study/halfcheetah_mr_iql/edis/seed0 --steps 3000,10000,30000
    python tools/fidelity.py RUN_DIR --steps 3000 --width 512 --depth 4
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pool_lever import rebuild  # the run's EDIS, buffers and checks, as the pool-lever tool rebuilds them


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished edis_iql.py run (config.json, checkpoint.pt)")
    p.add_argument("--steps", default="3000,10000,30000", help="pretraining budgets to check, increasing")
    p.add_argument("--width", type=int, default=None, help="denoiser width (default: the run's)")
    p.add_argument("--depth", type=int, default=None, help="denoiser residual blocks (default: the run's)")
    p.add_argument("--rows", type=int, default=1000, help="samples per set (the simulator replays the first 500; "
                   "the maze move check takes every row)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    try:
        budgets = [int(s) for s in a.steps.split(",")]
    except ValueError:
        budgets = []
    if not budgets or budgets != sorted(set(budgets)) or budgets[0] < 1:
        p.error(f"--steps {a.steps}: give increasing positive step counts, e.g. 3000,10000,30000")
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
               "depth": len(edis.model.blocks), "sample_steps": args.sample_steps}
        for name, x in sets.items():
            row.update({f"{name}_{k}": round(v, 4) for k, v in check(edis.from_x(x)).items()})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
