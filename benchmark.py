"""Cost of each EDIS phase at a given size, measured on random data, and what one EDIS cycle and one
learner update cost at the paper's settings. Usage: python benchmark.py [--device cuda] [--sample-steps 128]

Every figure is a wall-clock time measured here (after a warm-up, with device syncs around each
timed block); the per-cycle line multiplies them by the cycle's step counts."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

import common
import edis_calql
import edis_iql


@dataclass
class Bench:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """device to measure"""
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
    batch: int = 2_000
    """samples per timed sampler call (the run uses --gen-batch-size)"""
    repeats: int = 3
    """timed repetitions of each block (the minimum is reported)"""


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main(b: Bench):
    device = common.pick_device(b.device)
    ds, da = b.obs_dim, b.act_dim
    n = 5_000
    dims = common.transition_dims(ds, da)
    offline = common.Buffer(n, dims, device)
    offline.add(obs=torch.randn(n, ds), actions=torch.rand(n, da) * 2 - 1, rewards=torch.randn(n),
                next_obs=torch.randn(n, ds), terminals=torch.zeros(n))
    args = edis_iql.Args(diffusion_width=b.diffusion_width, diffusion_depth=b.diffusion_depth,
                         sample_steps=b.sample_steps, gen_batch_size=b.batch)
    edis = edis_iql.EDIS(args, offline, ds, da, False, device)
    edis.positive_buffer.add(**offline.sample(2_000))
    iql = edis_iql.IQL(ds, da, args, device, 10**6)
    calql = edis_calql.CalQL(ds, da, edis_calql.Args(), device)
    actor = iql.actor
    pools = {k: (torch.randn(b.batch, edis.x_mean.numel(), device=device),) * 2
             for k in ("positive", "unguided", "with_pi", "real", "inpainted")}
    known = offline.sample(b.batch)
    batch = {**offline.sample(256), "mc_return": torch.zeros(256, device=device)}

    def energy_step():
        loss = sum(l for l, _ in edis.energy_losses(pools, 0, args.energy_batch_size))
        edis.energy_opt.zero_grad()
        loss.backward()
        edis.energy_opt.step()

    r = {
        "diffusion train step (batch 256)": timed(lambda: edis.train_diffusion([offline], 1), device, b.repeats),
        "energy train step (3 x 256 groups x 11)": timed(energy_step, device, b.repeats),
        f"unguided sampling, {b.batch} samples": timed(lambda: edis.sample(b.batch), device, b.repeats),
        f"guided sampling, {b.batch} samples": timed(lambda: edis.sample(b.batch, guided=True), device, b.repeats),
        f"inpainting, {b.batch} samples": timed(lambda: edis.inpaint(known), device, b.repeats),
        "policy actions for the pool": timed(lambda: actor.sample(known["obs"]), device, b.repeats),
        "IQL update (batch 256)": timed(lambda: iql.update(batch), device, b.repeats),
        "Cal-QL update (batch 256)": timed(lambda: calql.update(batch), device, b.repeats),
    }
    params = sum(p.numel() for p in edis.model.parameters())
    print(f"device={device} denoiser={b.diffusion_width}x{b.diffusion_depth} ({params / 1e6:.2f} M params) "
          f"D={edis.x_mean.numel()} sample_steps={b.sample_steps}")
    for k, v in r.items():
        print(f"  {k:45s} {v * 1e3:10.1f} ms")
    per = {k: v / b.batch for k, v in r.items() if "samples" in k}
    unguided, guided, inpaint = per.values()
    d = edis_iql.EDISArgs()  # the paper's cycle
    cycle = {"diffusion fine-tune": d.diffusion_finetune_steps * r["diffusion train step (batch 256)"],
             "pools (unguided + inpainted)": d.pool_size * (unguided + inpaint),
             "energy training": d.energy_steps * r["energy train step (3 x 256 groups x 11)"],
             "generation (guided)": d.num_generated * guided}
    print(f"one EDIS cycle at the paper's settings (finetune {d.diffusion_finetune_steps}, pools {d.pool_size}, "
          f"energy {d.energy_steps}, generated {d.num_generated}):")
    for k, v in cycle.items():
        print(f"  {k:45s} {v:10.1f} s")
    print(f"  {'total':45s} {sum(cycle.values()):10.1f} s")


if __name__ == "__main__":
    main(tyro.cli(Bench, description=__doc__))
