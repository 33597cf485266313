"""Cost of each EDIS phase at a given size, measured on random data, and what one EDIS cycle and one
learner update cost at the paper's settings. Usage: python tools/benchmark.py [--device cuda] [--precision fp32]
With --schedules 80:128 10:86 the sampler units are also timed under each schedule, the
schedules interleaved in this process (round-robin), for ratios that a drifting machine does not skew.

Every figure is a wall-clock time measured here (after a warm-up, with device syncs around each
timed block, the minimum over repeats); the per-cycle lines multiply them by the cycle's counts."""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts, from anywhere
import common  # noqa: E402
import edis_calql  # noqa: E402
import edis_iql  # noqa: E402


@dataclass
class Bench:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device to measure"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """denoiser arithmetic, as the scripts' --precision"""
    obs_dim: int = 29
    """state dimension (29: AntMaze; 11: Hopper)"""
    act_dim: int = 8
    """action dimension"""
    diffusion_width: int = 1024
    """denoiser width (paper: 1024)"""
    diffusion_depth: int = 6
    """denoiser residual blocks (paper: 6)"""
    sample_steps: int = 128
    """sampler steps (paper: 128)"""
    sigma_max: float = 80.0
    """the sampler's largest noise level, as the scripts' --sigma-max (paper: 80)"""
    batch: int = 1_000
    """samples per timed sampler call (the run uses --gen-batch-size)"""
    repeats: int = 3
    """timed repetitions of each block (the minimum is reported)"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    compile: bool = False
    """also time the learner updates under --compile (torch.compile; 7-14 s of compiling each on a quiet CPU)"""
    eval_env: str = "Ant-v4"
    """env of the evaluation benchmark (Ant-v4: AntMaze's robot, dense reward): one evaluation of an untrained IQL actor, per worker count"""
    eval_episodes: int = 10
    """episodes of the evaluation benchmark (0: skip it)"""
    eval_workers: tuple[int, ...] = (1, 2)
    """worker counts to time the same evaluation with (1: in the main process), as --eval-workers"""
    schedules: tuple[str, ...] = ()
    """sampler schedules SIGMA_MAX:STEPS whose sampler units to time against each other, interleaved,
    --repeats rounds after a warm-up; medians, and each round's ratio to the first"""


def once(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    return min(once(fn, device) for _ in range(repeats))


SCHEDULE_FORMAT = "SIGMA_MAX:STEPS with a finite SIGMA_MAX above 0.1 and STEPS at least 2"


def parse_schedule(spec: str) -> tuple[float, int] | None:
    """(sigma_max, steps) from SIGMA_MAX:STEPS, or None if it is not one (tools/fidelity.py reads its
    --schedules with it too)."""
    f = spec.split(":")
    try:
        out = float(f[0]), int(f[1])
    except (ValueError, IndexError):
        return None
    ok = len(f) == 2 and math.isfinite(out[0]) and out[0] > 0.1 and out[1] >= 2
    return out if ok else None


def compare_schedules(b: Bench, edis, x, device, fixed: float):
    """The three sampler units under each schedule, interleaved; per row, medians over the rounds; and
    the paper's cycle at each from those and the fixed units (fine-tune and energy steps)."""
    specs = {s: parse_schedule(s) for s in b.schedules}  # checked in main()
    units = {"unguided sample": lambda: edis.sample(b.batch), "guided sample": lambda: edis.sample(b.batch, guided=True),
             "inpainted sample": lambda: edis.inpaint([(x, edis.ds)])}
    times = {(s, u): [] for s in specs for u in units}
    plain = edis.sigmas
    for rnd in range(b.repeats + 1):  # round 0: warm-up
        for s, (sigma_max, steps) in specs.items():
            edis.sigmas = edis_iql.karras_sigmas(steps, sigma_max)
            for u, fn in units.items():
                t = once(fn, device)
                if rnd:
                    times[s, u].append(t / b.batch)
    edis.sigmas = plain
    first = b.schedules[0]
    d = edis_iql.EDISArgs()
    print(f"sampler schedules, interleaved ({b.repeats} rounds; ms per row, median; in brackets each round's ratio to {first}):")
    for s in specs:
        med = {u: statistics.median(times[s, u]) for u in units}
        ratios = {u: " ".join(f"{v / w:.2f}" for v, w in zip(times[s, u], times[first, u])) for u in units}
        cycle = fixed + d.pool_size * med["unguided sample"] + edis.inpainted_pools() * d.pool_size * med["inpainted sample"] \
            + d.num_generated * med["guided sample"]
        print(f"  {s:14s} " + "  ".join(f"{u.split()[0]} {med[u] * 1e3:7.2f} ({ratios[u]})" for u in units)
              + f"  cycle {cycle:8.1f} s")


def evaluation(b: Bench, device):
    """The same episodes (same seeds, same policy) serially and in worker processes: wall time and
    whether the returns agree."""
    import gymnasium as gym
    import numpy as np
    common._register_robotics()
    env = gym.make(b.eval_env)
    ds, da = common.flatten_obs(env.reset(seed=0)[0]).shape[0], env.action_space.shape[0]
    env.close()
    torch.manual_seed(0)
    actor = edis_iql.IQL(ds, da, edis_iql.Args(), device, 1).actor
    norm = common.Normalizer(np.zeros(ds, np.float32), np.ones(ds, np.float32))

    def policy(obs):
        with torch.no_grad():
            return actor.mode(torch.as_tensor(obs, device=device)).cpu().numpy()

    steps = [0]

    def counted(obs):
        steps[0] += len(obs)
        return policy(obs)

    print(f"evaluation: {b.eval_episodes} episodes of {b.eval_env}, an untrained IQL actor")
    per_step = {}
    for w in b.eval_workers:
        ev = common.Evaluator(lambda: gym.make(b.eval_env), norm, b.eval_episodes, 0, None, workers=w)
        steps[0] = 0
        t = time.perf_counter()
        out = ev(counted)
        t = time.perf_counter() - t
        ev.close()
        per_step[w] = t / steps[0]
        print(f"  workers={w:<3d} {t:8.2f} s  ({per_step[w] * 1e6:.0f} us per env step)   "
              f"return {out['eval/return']:.6f} (std {out['eval/return_std']:.6f})")
    return per_step


def whole_run(r: dict, cycle_s: float, eval_per_step: dict):
    """Expected wall time of `edis_iql.py --env antmaze-large-diverse-v2` (the paper preset: 1M
    offline updates, 100k pretraining steps, 200k online steps, an EDIS cycle every 10k from 10k,
    60 evaluations of 100 episodes of 1,000 steps) from the unit costs measured above. An estimate:
    the evaluation unit's robot (Ant-v4) stands in for AntMaze, and nothing overlaps."""
    a = edis_iql.Args()
    cycles = len(range(a.edis_start, a.online_steps, a.edis_every))
    evals = a.offline_steps // a.offline_eval_every + a.online_steps // a.eval_every
    serial = eval_per_step[min(eval_per_step)]
    parts = {"offline IQL updates": a.offline_steps * r["IQL update (batch 256)"],
             "diffusion pretraining": a.diffusion_pretrain_steps * r["diffusion train step (batch 256)"],
             "online steps (env step + IQL update)": a.online_steps * (serial + r["IQL update (batch 256)"]),
             f"EDIS cycles ({cycles})": cycles * cycle_s}
    print("a whole paper run (antmaze-large-diverse-v2, IQL), estimated from the units above:")
    for k, v in parts.items():
        print(f"  {k:45s} {v / 3600:10.2f} h")
    for w, c in sorted(eval_per_step.items()):
        t = evals * 100 * 1000 * c
        print(f"  {f'{evals} evaluations, --eval-workers {w}':45s} {t / 3600:10.2f} h   total {(sum(parts.values()) + t) / 3600:.2f} h")


def main(b: Bench):
    for s in b.schedules:  # bad input stops here, not after minutes of timing
        if parse_schedule(s) is None:
            sys.exit(f"--schedules {s}: give {SCHEDULE_FORMAT}, e.g. 80:128 10:86")
    if b.threads:
        torch.set_num_threads(b.threads)
    device = common.pick_device(b.device)
    ds, da = b.obs_dim, b.act_dim
    n = 5_000
    dims = common.transition_dims(ds, da)
    offline = common.Buffer(n, dims, device)
    offline.add(obs=torch.randn(n, ds), actions=torch.rand(n, da) * 2 - 1, rewards=torch.randn(n),
                next_obs=torch.randn(n, ds), terminals=torch.zeros(n))
    args = edis_iql.Args(diffusion_width=b.diffusion_width, diffusion_depth=b.diffusion_depth,
                         sample_steps=b.sample_steps, sigma_max=b.sigma_max, gen_batch_size=b.batch,
                         precision=b.precision)
    edis = edis_iql.EDIS(args, offline, ds, da, False, device)
    edis.positive_buffer.add(**offline.sample(2_000))
    iql = edis_iql.IQL(ds, da, args, device, 10**6)
    calql = edis_calql.CalQL(ds, da, edis_calql.Args(), device)
    x = edis.to_x(offline.sample(b.batch))
    pools = {k: (torch.randn(b.batch, x.shape[1], device=device),) * 2
             for k in ("state_positive", "state_negative", "policy_positive", "transition_negative", "unguided", "real")}
    batch = {**offline.sample(256), "mc_return": torch.zeros(256, device=device)}

    def energy_step():
        with edis.autocast():
            losses, _, offsets = edis.energy_losses(pools, 0, args.energy_batch_size)
        edis.energy_opt.zero_grad()
        (losses + edis_iql.OFFSET_WEIGHT * offsets).sum().backward()
        edis.energy_opt.step()

    r = {
        "diffusion train step (batch 256)": timed(lambda: edis.train_diffusion([offline], [1.0], 1), device, b.repeats),
        "energy train step (3 x 256 groups x 11)": timed(energy_step, device, b.repeats),
        "unguided sample": timed(lambda: edis.sample(b.batch), device, b.repeats) / b.batch,
        "guided sample": timed(lambda: edis.sample(b.batch, guided=True), device, b.repeats) / b.batch,
        "inpainted sample": timed(lambda: edis.inpaint([(x, ds)]), device, b.repeats) / b.batch,
        "IQL update (batch 256)": timed(lambda: iql.update(batch), device, b.repeats),
        "Cal-QL update (batch 256)": timed(lambda: calql.update(batch), device, b.repeats),
    }
    if b.compile:
        iql_c = edis_iql.IQL(ds, da, edis_iql.Args(compile=True), device, 10**6)
        calql_c = edis_calql.CalQL(ds, da, edis_calql.Args(compile=True), device)
        r["IQL update, --compile"] = timed(lambda: iql_c.update(batch), device, b.repeats)
        r["Cal-QL update, --compile"] = timed(lambda: calql_c.update(batch), device, b.repeats)
    params = sum(p.numel() for p in edis.model.parameters())
    print(f"device={device} threads={torch.get_num_threads()} precision={'bf16 autocast' if edis.bf16 else 'fp32'} "
          f"denoiser={b.diffusion_width}x{b.diffusion_depth} ({params / 1e6:.2f} M params) "
          f"D={x.shape[1]} sample_steps={b.sample_steps} sigma_max={b.sigma_max:g} sampler batch={b.batch}")
    for k, v in r.items():
        print(f"  {k:45s} {v * 1e3:10.2f} ms")
    d = edis_iql.EDISArgs()  # the paper's cycle
    n_inpainted = edis.inpainted_pools() * d.pool_size  # the paper's state negatives: the default, as here
    cycle = {"diffusion fine-tune": d.diffusion_finetune_steps * r["diffusion train step (batch 256)"],
             "pools (unguided + inpainted)": d.pool_size * r["unguided sample"] + n_inpainted * r["inpainted sample"],
             "energy training": d.energy_steps * r["energy train step (3 x 256 groups x 11)"],
             "generation (guided)": d.num_generated * r["guided sample"]}
    print(f"one EDIS cycle at the paper's settings (finetune {d.diffusion_finetune_steps}, pools {d.pool_size} unguided "
          f"+ {n_inpainted} inpainted, energy {d.energy_steps}, generated {d.num_generated}, {b.sample_steps} steps):")
    for k, v in cycle.items():
        print(f"  {k:45s} {v:10.1f} s")
    print(f"  {'total':45s} {sum(cycle.values()):10.1f} s")
    if b.schedules:
        compare_schedules(b, edis, x, device, cycle["diffusion fine-tune"] + cycle["energy training"])
    if b.eval_episodes:
        whole_run(r, sum(cycle.values()), evaluation(b, device))


if __name__ == "__main__":
    main(tyro.cli(Bench, description=__doc__))
