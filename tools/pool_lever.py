"""What the energy pools' size, inpainting passes and the state and transition energies' negatives do
to the energies (docs/speed.md, "Pool levers"; docs/design.md §3.4, §3.5).

From the last checkpoint of a finished `edis_iql.py` run (its diffusion model, energies, policy and
buffers), each variant makes fresh pools, trains the energies from the checkpoint's weights as a cycle
does, and is scored on what the issue names as quality: the energies' InfoNCE loss and top-1 on one
common held-out pool (the run's --pool-size, two inpainting passes, its own seed; each variant's
state energy is scored against the state negatives it was trained with),
and what the guidance then does to 1,000 guided samples against unguided ones from the same noise
(log pi, state MMD^2 to the positive buffer, the simulator's dynamics error).

    python tools/pool_lever.py ~/edis_study/hopper_mr_iql/edis/seed0 --seeds 0,1,2
    python tools/pool_lever.py RUN_DIR --variants default,same-sa
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import edis_iql  # noqa: E402



def rebuild(run_dir: Path):
    cfg = json.loads((run_dir / "config.json").read_text())
    args = edis_iql.Args(**{k: v for k, v in cfg.items() if k in edis_iql.Args.__dataclass_fields__})
    device = torch.device("cpu")
    task = common.load_task(args.env, args.dataset)
    data, ds, da = task.data, task.data.observations.shape[1], task.data.actions.shape[1]
    obs_norm = common.Normalizer.fit(data.observations) if args.normalize_states else common.Normalizer.identity(ds)
    r_scale, r_bias = common.reward_scale_bias(task.source.family, data)
    offline = common.offline_buffer(data, obs_norm, r_scale, r_bias, device)
    online = common.Buffer(max(args.online_steps, 1), common.transition_dims(ds, da), device)
    edis = edis_iql.EDIS(args, offline, ds, da, bool(data.terminals.any()), device,
                         common.env_reward_fn(task, obs_norm, r_scale, r_bias))
    learner = edis_iql.IQL(ds, da, args, device, 1)
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    for name, obj in (("learner", learner), ("online", online), ("edis", edis)):
        obj.load_state_dict(state[name])
    check = common.TransitionCheck(task, obs_norm, r_scale, r_bias)
    return args, edis, learner.actor, offline, online, check


def pools_with(edis, policy, real, shares, seed: int, passes: int = 2, **overrides) -> dict:
    """Fresh pools with `passes` inpainting passes and the EDIS flags in `overrides` (they stay set)."""
    plain = edis_iql.heun_sample
    edis_iql.heun_sample = lambda *a, resample=1, **k: plain(*a, resample=min(resample, passes), **k)
    for k, v in overrides.items():
        setattr(edis.args, k, v)
    try:
        torch.manual_seed(seed)
        return edis.make_pools(policy, real, shares)
    finally:
        edis_iql.heun_sample = plain


def same_density_steps(steps: int, sigma_max: float, top: float = edis_iql.SIGMA_MAX) -> int:
    """Sampler steps from sigma_max that keep the density of a `steps`-step schedule from `top` (docs/design.md §2.3)."""
    r, lo = edis_iql.SIGMA_RHO, edis_iql.SIGMA_MIN ** (1 / edis_iql.SIGMA_RHO)
    return round((steps - 1) * (sigma_max ** (1 / r) - lo) / (top ** (1 / r) - lo)) + 1


def use_schedule(edis, sigma_max: float, steps: int):
    """The sampler's schedule and the energies' training levels for (sigma_max, steps), as the scripts set them."""
    edis.sigmas = edis_iql.karras_sigmas(steps, sigma_max)
    edis.train_sigmas = torch.tensor(edis_iql.queried_sigmas(steps, sigma_max=sigma_max), device=edis.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished edis_iql.py run (config.json, checkpoint.pt)")
    p.add_argument("--seeds", default="0,1,2", help="pool seeds per variant")
    p.add_argument("--variants", default="default,half,one-pass",
                   help="any of default (the defaults' pools at the run's size), half (half the rows), one-pass (one "
                        "inpainting pass), sigma-max-10 (pools, energy training and guided "
                        "samples under --sigma-max 10 with the steps that keep the schedule's density, 22 for "
                        "32; scored at the run's levels), same-sa (the transition energy's negatives inpainted "
                        "at the positive's own (s, a)), unguided-state-negatives (the state energy's negatives: "
                        "unguided samples)")
    a = p.parse_args()
    torch.set_num_threads(1)
    args, edis, policy, offline, online, check = rebuild(a.run_dir)
    real, shares = [offline, online], [1.0 - args.online_share, args.online_share]
    start = copy.deepcopy({"energies": edis.energies.state_dict(), "opt": edis.energy_opt.state_dict()})
    n = args.pool_size
    default = {"pool_size": n, "transition_negatives": "other-rows", "state_negatives": "inpainted"}
    held = {k: (None, None, torch.cat(v))
            for k, v in pools_with(edis, policy, real, shares, 10_000, **default).items()}
    own = (args.sigma_max, args.sample_steps)
    fast = (10.0, same_density_steps(args.sample_steps, 10.0, args.sigma_max))
    variants = {"default": (f"pool {n}, 2 passes", 2, own, {}),
                "half": (f"pool {n // 2}, 2 passes", 2, own, {"pool_size": n // 2}),
                "one-pass": (f"pool {n}, 1 pass", 1, own, {}),
                "sigma-max-10": (f"pool {n}, sigma_max 10, {fast[1]} steps", 2, fast, {}),
                "same-sa": (f"pool {n}, same-(s, a) negatives", 2, own, {"transition_negatives": "same-sa"}),
                "unguided-state-negatives": (f"pool {n}, unguided state negatives", 2, own, {"state_negatives": "unguided"})}
    unknown = set(a.variants.split(",")) - set(variants)
    if unknown:
        p.error(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(variants)}")
    diagnose = lambda samples, states, cycle: {f"gen/{n}_{k}": v for n, b in samples.items() if n in ("guided", "unguided")  # noqa: E731
                                               for k, v in check(b).items() if k == "dynamics_mse"}
    print(f"{a.run_dir}: {args.env}, {edis.cycles} cycles; held-out loss / top-1 at sigma <= 0.1, chance "
          f"{torch.log(torch.tensor(1.0 + args.energy_negatives)):.2f} / {1 / (1 + args.energy_negatives):.2f}")
    for name, passes, schedule, overrides in (variants[v] for v in a.variants.split(",")):
        use_schedule(edis, *schedule)
        for seed in map(int, a.seeds.split(",")):
            edis.energies.load_state_dict(start["energies"])
            edis.energy_opt.load_state_dict(copy.deepcopy(start["opt"]))  # Adam would update the saved moments in place
            pools = pools_with(edis, policy, real, shares, seed, passes, **{**default, **overrides})
            m = edis.train_energies(pools)
            with torch.no_grad(), edis.autocast():
                torch.manual_seed(0)
                loss, top1, _ = edis.energy_losses(held, 2, 8192, edis.low_sigmas)
            m.update(edis.guard_energies({f"energy/{k}_heldout_loss_low_sigma": loss[i] for i, k in enumerate(edis_iql.ENERGY_NAMES)}))
            d = edis.diagnostics(policy, offline, diagnose)
            row = {"variant": name, "seed": seed, **{f"{k}_loss": round(float(loss[i]), 3) for i, k in enumerate(edis_iql.ENERGY_NAMES)},
                   **{f"{k}_top1": round(float(top1[i]), 3) for i, k in enumerate(edis_iql.ENERGY_NAMES)},
                   "logpi_guided": round(float(d["gen/guided_policy_logprob"]), 3),
                   "logpi_pull": round(float(d["gen/guided_policy_logprob"] - d["gen/unguided_policy_logprob"]), 3),
                   "mmd_pull": round(float(d["gen/unguided_state_mmd"] - d["gen/guided_state_mmd"]), 4),
                   "dyn_guided": round(float(d["gen/guided_dynamics_mse"]), 4),
                   "dyn_unguided": round(float(d["gen/unguided_dynamics_mse"]), 4)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
