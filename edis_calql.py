"""EDIS + Cal-QL: Energy-guided Diffusion Sampling for offline-to-online RL (Liu et al., ICML 2024,
https://proceedings.mlr.press/v235/liu24ao.html) on top of Calibrated Q-Learning (Nakamoto et al., 2023).

Offline: Cal-QL on the dataset, and an EDM diffusion model of its transitions. Online: every
`edis_every` env steps, fine-tune the diffusion model, learn three energies (state, policy,
transition) by contrast, and replace the generated buffer with energy-guided samples that follow
the current policy's distribution; the learner trains on online + generated transitions.
Design and math: docs/design.md. Run `python edis_calql.py --help` for every flag.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import Buffer, UserError


# ==============================================================================================
# EDIS begin: everything below up to "EDIS end" is the same text in edis_iql.py and edis_calql.py
# ==============================================================================================
@dataclass
class EDISArgs:
    # --- EDIS schedule ---
    edis: bool = True
    """use EDIS; --no-edis replays offline data in place of generated data (the baseline)"""
    edis_start: int = 10_000
    """online transitions collected before the first EDIS cycle (offline data fills the share until then)"""
    edis_every: int = 10_000
    """online env steps between EDIS cycles"""
    generated_ratio: float = 0.5
    """share of each online learner batch drawn from the generated buffer (rho)"""
    num_generated: int = 100_000
    """guided samples generated per cycle; they replace the generated buffer"""
    gen_batch_size: int = 25_000
    """samples per batched sampler call"""
    positive_buffer_size: int = 10_000
    """most recent online transitions that stand for the current policy's state distribution d^pi"""
    # --- diffusion model (EDM over normalized transitions) ---
    diffusion_width: int = 1024
    """residual MLP width of the denoiser"""
    diffusion_depth: int = 6
    """residual blocks of the denoiser"""
    diffusion_lr: float = 3e-4
    """AdamW learning rate of the denoiser"""
    diffusion_batch_size: int = 256
    """denoiser training batch"""
    diffusion_pretrain_steps: int = 100_000
    """denoiser updates on the offline data before the online phase"""
    diffusion_finetune_steps: int = 10_000
    """denoiser updates on offline + online data at each cycle (warm start)"""
    online_share: float = 0.5
    """share of online rows in the fine-tune batches and in the transition energy's real rows (rest offline)"""
    diffusion_restart: bool = False
    """retrain the denoiser from scratch (pretrain steps) at each cycle instead of fine-tuning"""
    state_source: Literal["model", "positive"] = "model"
    """where generated states come from: the model, guided by the state energy (the paper), or the
    positive buffer's real states, with (a, r, s') generated for them (the state energy then unused)"""
    next_state: Literal["step", "absolute"] = "step"
    """what the model generates for s': the step s' - s, standardized (default), or s' itself as the paper"""
    env_reward: bool = True
    """give generated transitions the env's own reward r(s') where the env defines one (goal mazes);
    --no-env-reward keeps the reward the model generates"""
    sample_steps: int = 128
    """Heun sampler steps (sigma from --sigma-max to 0.002)"""
    sigma_max: float = 80.0
    """the schedule's first noise level (EDM's and the paper's 80; the first step's churn then asks the
    model at up to sqrt(2) times it). The data are standardized, so the steps above ~10 shrink noise the
    model hardly trained on: --sigma-max 10 --sample-steps 86 keeps the 128-step schedule's density below
    10 at 0.67x the sampler's work (docs/speed.md)"""
    # --- energies (noise-conditioned density ratios, InfoNCE) ---
    energy_steps: int = 4_000
    """energy training steps per cycle"""
    energy_batch_size: int = 256
    """InfoNCE groups per energy training step"""
    energy_negatives: int = 10
    """negatives per positive (K)"""
    energy_lr: float = 1e-3
    """Adam learning rate of the energies"""
    pool_size: int = 20_000
    """rows per energy pool drawn each cycle (unguided samples; state, policy and transition inpaintings)"""
    state_negatives: Literal["inpainted", "unguided"] = "inpainted"
    """the state energy's negatives: the model's (a, r, s') inpainted at its own sampled states, as its
    positives are at the positive buffer's (the inpainting's bias cancels; default), or the unguided
    samples themselves (one inpainting job fewer; the energy then also learns the bias, and its
    gradient pulls actions away from pi: design §3.5)"""
    transition_negatives: Literal["other-rows", "same-sa"] = "other-rows"
    """the transition energy's negatives for a real row: the model's (r, s') inpainted at other real
    rows' (s, a) (default), or K inpaintings at the row's own (s, a) as the reference code does
    (same sampling cost, pool-size / K distinct real rows)"""
    state_guidance: float = 1.0
    """weight of the state energy in the guided score (0 turns it off)"""
    policy_guidance: float = 1.0
    """weight of the policy energy in the guided score (0 turns it off)"""
    transition_guidance: float = 1.0
    """weight of the transition energy in the guided score (0 turns it off)"""
    diag_samples: int = 2_000
    """unguided and guided samples (same seed) compared by the per-cycle diagnostics"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """arithmetic of the denoiser and the energies (training, sampling, guidance; weights stay fp32):
    auto = bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere"""


SIGMA_MIN, SIGMA_MAX, SIGMA_RHO = 0.002, 80.0, 7.0
S_CHURN, S_NOISE = 80.0, 1.003
ENERGY_NAMES = ("state", "policy", "transition")


def edm_scalings(sigma: torch.Tensor):
    """EDM preconditioning with sigma_data = 1 (Karras et al. 2022, Table 1)."""
    c_skip = 1.0 / (sigma**2 + 1.0)
    c_out = sigma / torch.sqrt(sigma**2 + 1.0)
    c_in = 1.0 / torch.sqrt(sigma**2 + 1.0)
    return c_skip, c_out, c_in, torch.log(sigma) / 4.0


class FourierFeatures(nn.Module):
    """Fixed random Fourier features of c_noise(sigma)."""

    def __init__(self, n_freq: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(n_freq) * 2 * math.pi)
        self.dim = 2 * n_freq

    def forward(self, c_noise):  # (B, 1) -> (B, 2 n_freq)
        f = c_noise * self.freqs
        return torch.cat([f.cos(), f.sin()], dim=-1)


class Denoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), F a residual MLP (docs/design.md §2)."""

    def __init__(self, dim: int, width: int, depth: int, dim_t: int = 256):
        super().__init__()
        self.fourier = FourierFeatures()
        self.time = nn.Sequential(nn.Linear(self.fourier.dim, dim_t), nn.SiLU(), nn.Linear(dim_t, dim_t))
        self.proj = nn.Linear(dim, dim_t)
        self.inp = nn.Linear(dim_t, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, dim)

    def forward(self, x, sigma):  # sigma: (B, 1), or (1, 1) shared by all rows
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
        h = self.inp(self.proj(c_in * x) + self.time(self.fourier(c_noise)))
        for block in self.blocks:
            h = h + block(F.relu(h))
        return c_skip * x + c_out * self.out(F.relu(h))


def diffusion_loss(model: Denoiser, x):
    """EDM loss: ln sigma ~ N(-1.2, 1.2^2), weight (sigma^2 + 1) / sigma^2, mean over coordinates."""
    sigma = torch.exp(torch.randn(len(x), 1, device=x.device) * 1.2 - 1.2)
    weight = (sigma**2 + 1.0) / sigma**2
    return (weight * (model(x + sigma * torch.randn_like(x), sigma) - x) ** 2).mean()


def karras_sigmas(n: int, sigma_max: float = SIGMA_MAX) -> list[float]:
    """sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, then sigma_n = 0. Python
    floats: the sampler loop never asks the device for a number."""
    a, b = sigma_max ** (1 / SIGMA_RHO), SIGMA_MIN ** (1 / SIGMA_RHO)
    return [(a + i / max(n - 1, 1) * (b - a)) ** SIGMA_RHO for i in range(n)] + [0.0]


def churn_gamma(sigma: float, n: int, everywhere: bool) -> float:
    return min(S_CHURN / n, math.sqrt(2) - 1) if everywhere or 0.05 <= sigma <= 50 else 0.0


@torch.no_grad()
def heun_sample(denoise, x, sigmas, guide=None, known=None, resample: int = 1, tick=None):
    """The one EDM sampler (Heun, 2nd order, stochastic churn) behind unguided sampling, guided
    sampling and inpainting. x: noise * sigmas[0]; denoise(x, sigma) -> D(x; sigma); guide(x, sigma)
    -> grad_x sum_k w_k f_k (added to the score); known = (mask, values): inpainting by replacement,
    with churn kept on down to sigma_min and each step done `resample` times (RePaint-style).
    tick(rows), if given, is called after every pass of a step (progress display; host ints only)."""
    n = len(sigmas) - 1

    def slope(x, s):  # d = (x - D)/sigma = -sigma * score; guidance adds -sigma * grad f
        sig = torch.full((1, 1), s, device=x.device)  # one sigma for all rows: the time embedding is computed once
        d = (x - denoise(x, sig)) / s
        return d if guide is None else d - s * guide(x, s)

    def impose(x, s):  # known coordinates at noise level s
        return x if known is None else torch.where(known[0], known[1] + s * torch.randn_like(x), x)

    x = impose(x, sigmas[0])
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = churn_gamma(s, n, everywhere=known is not None)
        s_hat = s * (1 + gamma)
        for r in range(resample):
            x_hat = x + math.sqrt(s_hat**2 - s**2) * S_NOISE * torch.randn_like(x)
            d = slope(x_hat, s_hat)
            x_next = x_hat + (s_next - s_hat) * d
            if s_next > 0:
                x_next = x_hat + (s_next - s_hat) * 0.5 * (d + slope(x_next, s_next))
            x_next = impose(x_next, s_next)
            if r < resample - 1:  # back to sigma_i and redo the step
                x = x_next + math.sqrt(s**2 - s_next**2) * torch.randn_like(x)
            if tick is not None:
                tick(len(x))
        x = x_next
    return x


def queried_sigmas(n: int, everywhere: bool = False, sigma_max: float = SIGMA_MAX) -> list[float]:
    """Every noise level at which the sampler calls the model (sigma_i and sigma_hat_i): the energies
    are trained on exactly these."""
    s = karras_sigmas(n, sigma_max)
    return sorted({x for i in range(n) for x in (s[i], s[i] * (1 + churn_gamma(s[i], n, everywhere)))})


def mlp(inp: int, out: int, hidden: int = 256, layers: int = 2, act=nn.ReLU) -> nn.Sequential:
    dims = [inp] + [hidden] * layers
    return nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), act())],
                         nn.Linear(hidden, out))


class Energies(nn.Module):
    """f_k(x_sigma, sigma) ~ -E_k, the noised log density ratio of Thm 3.1's factor k (state, policy,
    transition). Each reads the whole noised transition: at sigma > 0 the noised s' still tells
    about the clean s, so even the state ratio depends on every coordinate (docs/design.md §3).
    The n energies are one ensemble with weights (n, in, out): one forward and one backward of
    batched matmuls evaluate and differentiate all of them."""

    def __init__(self, dim: int, n: int = 3, hidden: int = 256, layers: int = 3):
        super().__init__()
        self.fourier = FourierFeatures()
        sizes = [dim + self.fourier.dim] + [hidden] * layers + [1]
        bounds = [1 / math.sqrt(i) for i in sizes[:-1]]  # nn.Linear's default init, per member
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(n, i, o).uniform_(-b, b))
                                        for i, o, b in zip(sizes[:-1], sizes[1:], bounds))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(n, 1, o).uniform_(-b, b))
                                       for o, b in zip(sizes[1:], bounds))

    def forward(self, x, sigma):
        """x: (n, N, D), row j of slice k is energy k's input (x.expand(n, N, D) shares one batch);
        sigma: broadcastable to (n, N, 1). Returns (n, N)."""
        _, _, c_in, c_noise = edm_scalings(sigma)
        emb = self.fourier(c_noise)
        h = torch.cat([c_in * x, emb.expand(*x.shape[:-1], emb.shape[-1])], -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            h = F.silu(h) if i < len(self.weights) - 1 else h
        return h.squeeze(-1)


def info_nce(energies: Energies, pos, neg, sigma):
    """InfoNCE of every energy at once, -log softmax of the positive among 1 + K: pos (n, B, D),
    neg (n, B, K, D), all members of a group noised with the group's sigma (n, B, 1). Returns
    (loss, top-1 accuracy, offset), each (n,) on the device; offset is the mean square of the groups'
    mean negative logits, a level the loss cannot see (see OFFSET_WEIGHT)."""
    u = torch.cat([pos[:, :, None], neg], 2)
    n, B, G, D = u.shape
    sig = sigma[:, :, None].expand(n, B, G, 1)
    logits = energies((u + sig * torch.randn_like(u)).reshape(n, B * G, D), sig.reshape(n, B * G, 1)).reshape(n, B, G).float()
    return (-logits.log_softmax(-1)[..., 0].mean(1), (logits.argmax(-1) == 0).float().mean(1),
            logits[..., 1:].mean(-1).pow(2).mean(1))


# InfoNCE is blind to a constant added to all logits of a group, so nothing holds the energies' level
# (any c(sigma)) in place, and Adam turns rounding-size gradients along that direction into full
# steps: warm-started over maze cycles, the transition energy's mean logit went -1 -> -13 -> -26 ->
# -103 -> -174 while its informative spread stayed below 3, until bf16 rounding (0.27 at -174) swamped
# the ratio and its loss rose above chance (design §3.4). A small pull of the mean logit of each
# group's negatives (drawn from the model itself) to 0 pins that level and leaves the ratio, which
# lives in the differences, alone; pulling the positive too shrank the ratio (wider guided actions).
OFFSET_WEIGHT = 0.01


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast for the networks of EDIS: asked for, or (auto) where the hardware runs bf16 natively."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # native only: emulated bf16 is slower
    try:  # oneDNN's own check for native CPU bf16 (AVX512-BF16 / AMX)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_sample(buffers: list[Buffer], shares: list[float], n: int) -> dict:
    """n rows, a share of them from each buffer (host arithmetic only; the last takes the rounding)."""
    counts = [int(round(n * s)) for s in shares[:-1]]
    counts.append(n - sum(counts))
    return common.cat_batches(*[b.sample(c) for b, c in zip(buffers, counts) if c > 0])


def rbf_mmd(x, y):
    """Squared MMD with an RBF kernel, bandwidth = median distance of the pooled points."""
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z) ** 2
    h = d2.median().clamp_min(1e-6)
    k = torch.exp(-d2 / h)
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


class EDIS:
    """What EDIS adds to a learner: a diffusion model of transitions, three energies, the positive
    buffer (recent online data ~ d^pi) and the generated buffer (guided samples)."""

    def __init__(self, args: EDISArgs, offline: Buffer, ds: int, da: int, terminals: bool, device, reward_fn=None,
                 action_box: bool = True):
        self.args, self.device, self.ds, self.da = args, device, ds, da
        self.action_box = action_box  # actions live in [-1, 1], as every task's do (common.load_task maps them there)
        self.reward_fn = reward_fn if args.env_reward else None  # the env's r(s'), where it has one
        self.fields = ["obs", "actions", "rewards", "next_obs"] + (["terminals"] if terminals else [])
        self.dims = {"obs": ds, "actions": da, "rewards": 1, "next_obs": ds, "terminals": 1}
        dim = sum(self.dims[f] for f in self.fields)
        # Fixed normalizer of transitions (offline statistics), so a warm-started model keeps its space.
        x = self.raw(offline.all())
        self.x_mean, self.x_std = x.mean(0), x.std(0).clamp_min(1e-3)
        self.energies = Energies(dim, len(ENERGY_NAMES)).to(device)
        self.energy_opt = torch.optim.Adam(self.energies.parameters(), lr=args.energy_lr)
        state_w = args.state_guidance if args.state_source == "model" else 0.0  # real states need no steering
        self.weights = torch.tensor([state_w, args.policy_guidance, args.transition_guidance], device=device)
        self.active = torch.ones(len(ENERGY_NAMES), device=device)  # 0: that energy failed its held-out check this cycle
        self.new_model(dim)
        self.positive_buffer = Buffer(args.positive_buffer_size, common.transition_dims(ds, da), device)
        self.generated_buffer = Buffer(args.num_generated, common.transition_dims(ds, da), device)
        self.sigmas = karras_sigmas(args.sample_steps, args.sigma_max)
        levels = queried_sigmas(args.sample_steps, sigma_max=args.sigma_max)
        self.train_sigmas = torch.tensor(levels, device=device)
        self.low_sigmas = torch.tensor([s for s in levels if s <= 0.1], device=device)  # where ratios are sharp
        self.bf16 = use_bf16(args.precision, torch.device(device))
        self.clip = 10.0 * math.sqrt(dim)  # a safety net only: a correct energy stays far below it
        self.clip_fired = torch.zeros((), device=device)
        self.cycles = 0

    def new_model(self, dim: int):
        a = self.args
        self.model = Denoiser(dim, a.diffusion_width, a.diffusion_depth).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)  # what samples: a moving average of the weights
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.diffusion_lr)

    # --- transitions <-> normalized vectors x = [s, a, r, s' - s, (terminal)] ---
    def raw(self, batch: dict):
        """[s, a, r, s' - s, (terminal)]: the model learns the step, not s' itself (docs/design.md §1)."""
        step = {"next_obs": batch["next_obs"] - batch["obs"]} if self.args.next_state == "step" else {}
        return torch.cat([{**batch, **step}[f].reshape(len(batch["obs"]), -1) for f in self.fields], 1)

    def to_x(self, batch: dict):
        return (self.raw(batch) - self.x_mean) / self.x_std

    def from_x(self, x) -> dict:
        parts = torch.split(x * self.x_std + self.x_mean, [self.dims[f] for f in self.fields], 1)
        out = dict(zip(self.fields, parts))
        out["rewards"] = out["rewards"].squeeze(1)
        # The learners act in [-1, 1] (common.load_task maps every task there) and the simulators clip a
        # control to its range, so a generated action beyond the box is the transition of the clipped one.
        # Unclipped, it is an action no policy takes (on the study's models 11-76% of rows had one).
        if self.action_box:
            out["actions"] = out["actions"].clamp(-1, 1)
        if self.args.next_state == "step":
            out["next_obs"] = out["obs"] + out["next_obs"]
        if self.reward_fn is not None:
            out["rewards"] = self.reward_fn(out["next_obs"])
        out["terminals"] = (out["terminals"].squeeze(1) > 0.5).float() if "terminals" in out else torch.zeros_like(out["rewards"])
        return out

    def clip_actions(self, x):
        """x (model space) with its actions clipped to the box, as from_x hands them to the learner."""
        if not self.action_box:
            return x
        act = slice(self.ds, self.ds + self.da)
        low, high = (-1 - self.x_mean[act]) / self.x_std[act], (1 - self.x_mean[act]) / self.x_std[act]
        return torch.cat([x[:, :self.ds], torch.clamp(x[:, act], low, high), x[:, act.stop:]], 1)

    # --- diffusion ---
    def autocast(self):
        """The networks' arithmetic: bf16 matmuls where enabled (weights, optimizers and the sampler's
        state stay fp32)."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def denoise(self, x, sigma):
        with self.autocast():
            return self.ema(x, sigma)

    def train_diffusion(self, buffers: list[Buffer], shares: list[float], steps: int, tick=None) -> dict:
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            with self.autocast():
                loss = diffusion_loss(self.model, self.to_x(mixed_sample(buffers, shares, self.args.diffusion_batch_size)))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            with torch.no_grad():  # EMA, decay 0.995: one fused update, no host-side counter
                torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1.0 - 0.995)
            total += loss.detach()
            if tick is not None:
                tick(1)
        return {"diffusion/loss": total / max(steps, 1)}

    def guide(self, x, sigma: float):
        """Sum_k w_k grad_x f_k(x, sigma) w.r.t. the whole transition: one forward and one backward
        for all three energies; the term sigma * guidance is clipped per sample at 10 sqrt(D)
        (counted in clip_fired)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            with self.autocast():
                f = self.energies(x.expand(len(self.weights), *x.shape), torch.full((1, 1, 1), sigma, device=x.device))
            (grad,) = torch.autograd.grad((f.float() * (self.weights * self.active)[:, None]).sum(), x)
        norm = sigma * grad.norm(dim=1, keepdim=True)
        self.clip_fired += (norm > self.clip).sum()
        return grad * (self.clip / norm.clamp_min(1e-12)).clamp(max=1.0)

    def sample(self, n: int, guided: bool = False, known: tuple | None = None, tick=None) -> torch.Tensor:
        """n normalized transitions from the EMA model, in batches of gen_batch_size. known =
        (mask, values), both (n, D): inpaint the coordinates where mask is True, row by row."""
        out = []
        for i in range(0, n, self.args.gen_batch_size):
            m = min(self.args.gen_batch_size, n - i)
            kn = None if known is None else (known[0][i:i + m], known[1][i:i + m])
            x = torch.randn(m, len(self.x_mean), device=self.device) * self.sigmas[0]
            out.append(heun_sample(self.denoise, x, self.sigmas, guide=self.guide if guided else None,
                                   known=kn, resample=2 if known is not None else 1, tick=tick))
        return torch.cat(out)

    def generate(self, n: int, guided: bool, tick=None) -> torch.Tensor:
        """What the learner gets: n whole transitions from the model, or (--state-source positive)
        the positive buffer's real states completed by the model, s known and the rest inpainted."""
        if self.args.state_source == "model":
            return self.sample(n, guided=guided, tick=tick)
        return self.inpaint([(self.to_x(self.positive_buffer.sample(n)), self.ds)], tick, guided)[0]

    def sampler_work(self, n: int, inpainted: bool = False) -> int:
        """Rows x step passes that sampling n rows takes (the progress bar's unit): inpainting does
        every step twice."""
        return n * (len(self.sigmas) - 1) * (2 if inpainted else 1)

    def guide_rows(self, n: int, inpainted: bool = False) -> int:
        """Rows that guide() sees when n rows are sampled guided: two per step pass, one in the last
        step's (to sigma = 0)."""
        return n * (2 if inpainted else 1) * (2 * (len(self.sigmas) - 1) - 1)

    def inpaint(self, jobs: list[tuple[torch.Tensor, int]], tick=None, guided: bool = False) -> list[torch.Tensor]:
        """Each job (x, k): complete the rows of x given their first k coordinates ([s] for k = ds,
        [s, a] for k = ds + da), guided or not. All jobs run as one batched sampler call."""
        x = torch.cat([v for v, _ in jobs])
        known = torch.cat([torch.full((len(v),), k, device=self.device) for v, k in jobs])
        mask = torch.arange(x.shape[1], device=self.device) < known[:, None]
        return list(self.sample(len(x), guided=guided, known=(mask, x), tick=tick).split([len(v) for v, _ in jobs]))

    # --- energies ---
    def inpainted_pools(self) -> int:
        """Inpainted pools per cycle: state positives (and negatives), policy positives, transition negatives."""
        return 4 if self.args.state_negatives == "inpainted" else 3

    def pool_work(self) -> int:
        return self.sampler_work(self.args.pool_size) + self.sampler_work(self.inpainted_pools() * self.args.pool_size, inpainted=True)

    def make_pools(self, policy, real: list[Buffer], shares: list[float], tick=None) -> dict:
        """The rows the three InfoNCE problems contrast (docs/design.md §3). Each energy's positives
        differ from its negatives in its own factor only; the coordinates it is not about are
        inpainted by the model. Each pool is split 80/10/10 into training, validation (early stopping)
        and held-out rows (the reported losses and the guard)."""
        n, ds, da = self.args.pool_size, self.ds, self.da
        unguided = self.sample(n, tick=tick)
        with_pi = unguided.clone()  # s from model samples, a+ ~ pi(.|s); (r, s') inpainted below
        s = unguided[:, :ds] * self.x_std[:ds] + self.x_mean[:ds]
        with_pi[:, ds:ds + da] = (policy.sample(s) - self.x_mean[ds:ds + da]) / self.x_std[ds:ds + da]
        K = self.args.energy_negatives if self.args.transition_negatives == "same-sa" else 1
        real_x = self.to_x(mixed_sample(real, shares, n // K))  # all real data obeys the true dynamics T
        jobs = {"state_positive": (self.to_x(self.positive_buffer.sample(n)), ds),  # s+ ~ d^pi; (a, r, s') inpainted
                "policy_positive": (with_pi, ds + da),
                "transition_negative": (real_x.repeat_interleave(K, 0), ds + da)}  # the model's (r, s') given real (s, a)
        if self.args.state_negatives == "inpainted":  # the model's (a, r, s') at its own s: the positives' inpainting
            jobs["state_negative"] = (unguided, ds)
        pools = dict(zip(jobs, self.inpaint(list(jobs.values()), tick)), unguided=unguided, real=real_x)
        if K > 1:  # same-sa: row i holds the K negatives of real row i
            pools["transition_negative"] = pools["transition_negative"].reshape(len(real_x), K, -1)
        return {k: (v[: int(0.8 * len(v))], v[int(0.8 * len(v)):int(0.9 * len(v))], v[int(0.9 * len(v)):])
                for k, v in pools.items()}

    @property
    def pairs(self) -> tuple:
        """(positive pool, negative pool) per energy, in ENERGY_NAMES order. The policy negatives are
        the unguided samples themselves: inpainting them from their own (s, a) as well did no better
        on ground truth or on the quick run (design §3.5)."""
        state = "state_negative" if self.args.state_negatives == "inpainted" else "unguided"
        return (("state_positive", state), ("policy_positive", "unguided"), ("real", "transition_negative"))

    def energy_losses(self, pools: dict, split: int, batch: int, levels=None):
        """InfoNCE of the three energies on one batch each: one sigma per group, uniform over the
        queried levels (or `levels`); negatives are other rows of the negative pool (matching the
        conditioning in distribution), or a pool of (rows, K, D) holds each positive's own K (same-sa).
        Returns (losses, top-1, offsets), each (3,)."""
        levels = self.train_sigmas if levels is None else levels
        K, pos, neg = self.args.energy_negatives, [], []
        for p, q in self.pairs:
            pp, qq = pools[p][split], pools[q][split]
            i = torch.randint(len(pp), (batch,), device=self.device)
            pos.append(pp[i])
            neg.append(qq[i] if qq.dim() == 3 else qq[torch.randint(len(qq), (batch, K), device=self.device)])
        sigma = levels[torch.randint(len(levels), (len(pos), batch, 1), device=self.device)]
        return info_nce(self.energies, torch.stack(pos), torch.stack(neg), sigma)

    def train_energies(self, pools: dict, tick=None) -> dict:
        """InfoNCE steps with early stopping: every tenth of the steps (at least 25 apart) each
        energy's loss on the same validation groups is compared with its best so far, and at the end
        each energy goes back to its best weights. Warm-started from cycle to cycle on a few
        thousand rows, the energies otherwise overfit: their held-out loss rose above chance while
        the training loss fell (docs/design.md §3.4)."""
        steps, total = self.args.energy_steps, torch.zeros(len(ENERGY_NAMES), device=self.device)
        params = list(self.energies.parameters())  # each (n_energies, ...): member k is slice k
        best = [p.detach().clone() for p in params]
        best_loss = self.validation_loss(pools)
        best_step = torch.zeros(len(ENERGY_NAMES), device=self.device)
        every = max(steps // 10, 25)  # a validation cost ~5 training steps in the smoke run
        for step in range(1, steps + 1):
            with self.autocast():
                losses, _, offsets = self.energy_losses(pools, 0, self.args.energy_batch_size)
            self.energy_opt.zero_grad(set_to_none=True)
            (losses + OFFSET_WEIGHT * offsets).sum().backward()  # one backward for all three energies
            self.energy_opt.step()
            total += losses.detach()
            if step % every == 0 or step == steps:
                loss = self.validation_loss(pools)
                better = loss < best_loss  # per energy, on the device: no host sync
                best_loss, best_step = torch.where(better, loss, best_loss), torch.where(better, float(step), best_step)
                for b, p in zip(best, params):
                    b.copy_(torch.where(better.view(-1, *[1] * (p.dim() - 1)), p.detach(), b))
            if tick is not None:
                tick(1)
        with torch.no_grad():
            for b, p in zip(best, params):
                p.copy_(b)
        m = {f"energy/{k}_train_loss": total[i] / max(steps, 1) for i, k in enumerate(ENERGY_NAMES)}
        m.update({f"energy/{k}_best_step": best_step[i] for i, k in enumerate(ENERGY_NAMES)})
        with torch.no_grad(), self.autocast():  # held-out rows, over all levels and at the low-noise end alone
            for suffix, levels in (("", None), ("_low_sigma", self.low_sigmas)):
                loss, top1, _ = self.energy_losses(pools, 2, 2048, levels)
                for i, k in enumerate(ENERGY_NAMES):
                    m[f"energy/{k}_heldout_loss{suffix}"], m[f"energy/{k}_heldout_top1{suffix}"] = loss[i], top1[i]
        m["energy/chance_top1"] = 1.0 / (1 + self.args.energy_negatives)
        return m

    @torch.no_grad()
    def validation_loss(self, pools: dict):
        """Each energy's InfoNCE loss on the validation rows, the same groups, sigmas and noise at every
        call of a cycle (a fixed seed), so that successive weights are compared on equal terms."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), self.autocast():
            torch.manual_seed(self.cycles)
            return self.energy_losses(pools, 1, 2048)[0].float()

    # --- the cycle (docs/design.md §5) ---
    def cycle(self, policy, offline: Buffer, online: Buffer, timer, diagnose) -> dict:
        a = self.args
        real, shares = [offline, online], [1.0 - a.online_share, a.online_share]
        steps = a.diffusion_pretrain_steps if a.diffusion_restart else a.diffusion_finetune_steps
        with timer("diffusion", steps, f"cycle {self.cycles + 1}: diffusion fine-tune") as bar:
            if a.diffusion_restart:
                self.new_model(len(self.x_mean))
            m = self.train_diffusion(real, shares, steps, bar.update)
        with timer("pools", self.pool_work(), f"cycle {self.cycles + 1}: energy pools") as bar:
            pools = self.make_pools(policy, real, shares, bar.update)
        with timer("energy", a.energy_steps, f"cycle {self.cycles + 1}: energy training") as bar:
            m.update(self.train_energies(pools, bar.update))
        m.update(self.guard_energies(m))
        inpainted = a.state_source == "positive"
        work = self.sampler_work(a.num_generated, inpainted)
        with timer("generation", work, f"cycle {self.cycles + 1}: guided generation") as bar:
            fired_before = self.clip_fired.clone()
            x = self.generate(a.num_generated, guided=True, tick=bar.update)
            finite = torch.isfinite(x).all(1)
            self.generated_buffer.replace(**self.from_x(x[finite]))
            m["gen/nonfinite_dropped"] = 1.0 - finite.float().mean()
            m["gen/guidance_clip_rate"] = (self.clip_fired - fired_before) / self.guide_rows(a.num_generated, inpainted)
        m.update(self.guard_samples(m))
        with timer("diagnostics"):
            m.update(self.diagnostics(policy, offline, diagnose))
        m.update(self.check_pull(m))
        self.cycles += 1
        return m

    # --- guards: nothing a cycle got wrong reaches the learner unnoticed (docs/design.md §7) ---
    def guard_energies(self, m: dict) -> dict:
        """An energy whose held-out InfoNCE loss at low noise is not below chance, ln(1 + K), tells its
        pools apart no better than a coin (or has diverged): it does not guide this cycle's samples."""
        chance, out, off = math.log(1 + self.args.energy_negatives), {}, []
        for i, k in enumerate(ENERGY_NAMES):
            loss = float(m[f"energy/{k}_heldout_loss_low_sigma"])  # one host read per energy and cycle
            trusted = math.isfinite(loss) and loss < chance
            self.active[i] = float(trusted)
            out[f"edis/{k}_guides"] = float(trusted and self.weights[i] != 0)
            if not trusted and self.weights[i] != 0:
                off.append(f"{k} ({loss:.2f})")
        if off:
            common.warn(f"EDIS cycle {self.cycles + 1}: held-out loss at sigma <= 0.1 not below chance "
                        f"ln {1 + self.args.energy_negatives} = {chance:.2f} for the {', '.join(off)} energy; "
                        "it does not guide this cycle's samples")
        return out

    def guard_samples(self, m: dict) -> dict:
        """Guided samples whose guidance hit the safety clip more than rarely (an energy extrapolating
        off the data) or came out non-finite do not feed the learner: for this cycle the generated
        share is the offline data, as with --no-edis."""
        clip, dropped = float(m["gen/guidance_clip_rate"]), float(m["gen/nonfinite_dropped"])
        if clip <= self.MAX_CLIP_RATE and dropped <= self.MAX_CLIP_RATE:
            return {"edis/fallback": 0.0}
        self.generated_buffer.replace(**{k: v[:0] for k, v in self.generated_buffer.all().items()})
        common.warn(f"EDIS cycle {self.cycles + 1}: guidance clipped on {clip:.1%} of sampler calls, {dropped:.1%} "
                    f"of samples non-finite (limit {self.MAX_CLIP_RATE:.0%}); this cycle's samples are not used "
                    "and the offline data fills the generated share until the next cycle")
        return {"edis/fallback": 1.0}

    MAX_CLIP_RATE = 0.01  # a correct energy's guidance almost never reaches the clip (design §3.6)

    def check_pull(self, m: dict) -> dict:
        """Did the guidance do what it is for? Guided samples should be likelier under pi than the
        unguided ones from the same noise (policy energy) and nearer the positive buffer's states
        (state energy). If not, a warning: the learner trains on them all the same. (On
        halfcheetah-medium-replay, where EDIS lost to its base learner, guided log pi stayed below
        unguided in every cycle; docs/study.md.)"""
        out, weak = {}, []
        checks = (("policy", "policy_logprob", "log pi", 1.0), ("state", "state_mmd", "state MMD^2", -1.0))
        for k, metric, label, sign in checks:
            g, u = float(m[f"gen/guided_{metric}"]), float(m[f"gen/unguided_{metric}"])
            guides = float(m.get(f"edis/{k}_guides", 1.0)) > 0
            out[f"edis/{k}_pulls"] = float(sign * (g - u) > 0)
            if guides and not out[f"edis/{k}_pulls"]:
                weak.append(f"{label} {g:.3g} guided vs {u:.3g} unguided")
        if weak:
            common.warn(f"EDIS cycle {self.cycles + 1}: the guidance did not pull the samples towards the policy's "
                        f"data ({'; '.join(weak)}); the learner trains on them all the same "
                        f"(--generated-ratio {self.args.generated_ratio})")
        return out

    @torch.no_grad()
    def diagnostics(self, policy, offline: Buffer, diagnose) -> dict:
        """Guided vs unguided samples, from the same initial noise, on what each energy is for:
        policy log-likelihood (policy energy), MMD to the positive buffer's states (state energy);
        `diagnose(samples, states, cycle)` adds the env-specific checks (dynamics error, picture).
        "inpainted" is the model's own (r, s') at the positive buffer's real (s, a): its dynamics
        error is the model's where the policy goes, the reference for the guided samples' error.
        Without a simulator, gen/{set}_self_tail: the share of rows whose (r, s' - s, terminal) lie
        farther from the model's own inpainting at their (s, a) than 99% of real positive rows do
        (the threshold from one half of those rows; the other half, "positive", reads about 0.01)."""
        n = self.args.diag_samples
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self._diagnostics(policy, offline, diagnose, n)

    def _diagnostics(self, policy, offline: Buffer, diagnose, n: int) -> dict:
        """diagnostics' body, on a random stream of its own: the checks never change the run."""
        xs = {}
        for name in ("unguided", "guided"):  # from the same noise
            torch.manual_seed(self.cycles)
            xs[name] = self.generate(n, guided=name == "guided")
        positive = self.positive_buffer.sample(min(n, 2000))["obs"]
        m, samples = {}, {}
        for name, x in xs.items():
            x = x[torch.isfinite(x).all(1)]
            m[f"gen/{name}_actions_out_of_box"] = (self.clip_actions(x) != x).any(1).float().mean()  # as the model made them
            b = self.from_x(x)
            samples[name] = b
            # read 0.001 inside the box: a tanh policy's density vanishes on its edge, where clipped actions sit
            a = b["actions"].clamp(-0.999, 0.999) if self.action_box else b["actions"]
            m[f"gen/{name}_policy_logprob"] = policy.log_prob(b["obs"], a).mean()
            m[f"gen/{name}_state_mmd"] = rbf_mmd(b["obs"][:2000], positive)
        states = {"offline": offline.sample(2000)["obs"], "positive buffer": positive,
                  **{k: b["obs"] for k, b in samples.items()}}
        sets = {"guided": self.clip_actions(xs["guided"]), "unguided": self.clip_actions(xs["unguided"]),
                "positive": self.to_x(self.positive_buffer.sample(n))}  # the rows as the learner gets them
        sets = {name: x[torch.isfinite(x).all(1)] for name, x in sets.items()}
        far, again = self.self_disagreement(torch.cat(list(sets.values())))  # one batched sampler call
        far = dict(zip(sets, far.split([len(x) for x in sets.values()])))
        half = len(far["positive"]) // 2
        threshold, far["positive"] = torch.quantile(far["positive"][:half], 0.99), far["positive"][half:]
        m.update({f"gen/{name}_self_tail": (d > threshold).float().mean() for name, d in far.items()})
        samples["inpainted"] = self.from_x(again[-len(sets["positive"]):])
        samples["positive"] = self.positive_buffer.sample(n)  # real rows: the floor of every check
        m.update(diagnose(samples, states, self.cycles))
        return m

    def self_disagreement(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of x (normalized transitions): the mean squared distance between its (r, s' - s,
        terminal) and the model's second opinion, an inpainting of them at the row's own (s, a); and
        that inpainting. A check without a simulator: real rows set its scale."""
        k = self.ds + self.da
        again = self.inpaint([(x, k)])[0]
        return ((x[:, k:] - again[:, k:]) ** 2).mean(1), again

    MODULES = ("model", "ema", "opt", "energies", "energy_opt", "positive_buffer", "generated_buffer")

    def state_dict(self):
        return {**{k: getattr(self, k).state_dict() for k in self.MODULES}, "clip_fired": self.clip_fired,
                "active": self.active, "cycles": self.cycles}

    def load_state_dict(self, s):
        for k in self.MODULES:
            getattr(self, k).load_state_dict(s[k])
        self.clip_fired, self.active, self.cycles = s["clip_fired"].to(self.device), s["active"].to(self.device), s["cycles"]
# ==============================================================================================
# EDIS end
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: Cal-QL (Nakamoto et al. 2023): CQL whose pushed-down Q values are lower-bounded by
# the Monte-Carlo return of the data they come from
# ----------------------------------------------------------------------------------------------
def orthogonal_init(net: nn.Sequential, last_gain: float) -> nn.Sequential:
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for i, m in enumerate(linears):
        nn.init.orthogonal_(m.weight, gain=last_gain if i == len(linears) - 1 else math.sqrt(2))
        nn.init.zeros_(m.bias)
    return net


class TanhGaussianActor(nn.Module):
    """a = tanh(u), u ~ N(mu(s), sigma(s)); evaluation takes tanh(mu)."""

    def __init__(self, ds: int, da: int, hidden: int):
        super().__init__()
        self.net = orthogonal_init(mlp(ds, 2 * da, hidden), last_gain=1e-2)

    def _normal(self, s):
        mu, log_std = self.net(s).chunk(2, -1)
        # validate_args=False: the argument checks read values back from the device at every update
        return torch.distributions.Normal(mu, log_std.clamp(-20, 2).exp(), validate_args=False)

    @staticmethod
    def _log_prob(normal, u):  # log density of a = tanh(u): change of variables, stable form
        return normal.log_prob(u).sum(-1) - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)

    def rsample(self, s):
        normal = self._normal(s)
        u = normal.rsample()
        return torch.tanh(u), self._log_prob(normal, u)

    @torch.no_grad()
    def sample(self, s):
        return self.rsample(s)[0]

    def log_prob(self, s, a):
        return self._log_prob(self._normal(s), torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6)))

    def mode(self, s):
        return torch.tanh(self._normal(s).mean)


class TwinQ(nn.Module):
    def __init__(self, ds: int, da: int, hidden: int, layers: int):
        super().__init__()
        self.q1, self.q2 = (orthogonal_init(mlp(ds + da, 1, hidden, layers), last_gain=1.0) for _ in range(2))

    def forward(self, s, a):
        sa = torch.cat([s, a], -1)
        return self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)


def mc_returns(rewards: np.ndarray, ends: np.ndarray, gamma: float, sparse_fail: float | None = None) -> np.ndarray:
    """Discounted return-to-go within each episode (ends[i]: the episode ends after row i; a
    truncated episode counts what it saw). With sparse_fail (sparse-reward tasks: the reward of a
    step away from the goal) an episode that never got anything else is taken to fail forever, as
    in Cal-QL: sparse_fail / (1 - gamma) at every step."""
    out, g = np.zeros(len(rewards), np.float32), 0.0
    for i in range(len(rewards) - 1, -1, -1):
        g = rewards[i] + gamma * (0.0 if ends[i] else g)
        out[i] = g
    if sparse_fail is not None:
        episode = np.concatenate([[0], np.cumsum(ends[:-1])])
        failed = np.bincount(episode, weights=(rewards != sparse_fail).astype(float)) == 0
        out[failed[episode]] = sparse_fail / (1 - gamma)
    return out


def calibrate(q, mc_return):
    """Cal-QL's one change to CQL: the Q values pushed down are never pushed below the reference
    value (the data's MC return). Rows without a return (generated samples) carry -inf."""
    return torch.maximum(q, mc_return[:, None])


class CalQL:
    def __init__(self, ds: int, da: int, args, device):
        self.args, self.da = args, da
        self.actor = TanhGaussianActor(ds, da, args.hidden).to(device)
        self.q = TwinQ(ds, da, args.hidden, args.q_hidden_layers).to(device)
        self.q_target = TwinQ(ds, da, args.hidden, args.q_hidden_layers).to(device)
        self.q_target.load_state_dict(self.q.state_dict())
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)        # entropy temperature
        # CQL Lagrange multiplier: log alpha' starts at 1 (alpha' = e), as in Cal-QL and CORL
        self.log_alpha_prime = torch.ones((), device=device, requires_grad=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr)
        self.q_opt = torch.optim.Adam(self.q.parameters(), lr=args.critic_lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.actor_lr)
        self.alpha_prime_opt = torch.optim.Adam([self.log_alpha_prime], lr=args.critic_lr)
        self.opts = (self.actor_opt, self.alpha_opt, self.q_opt) + ((self.alpha_prime_opt,) if args.cql_lagrange else ())
        self.loss_fn = torch.compile(self.losses) if args.compile else self.losses
        self.target_entropy = -float(da)
        self.cql_alpha = args.cql_alpha  # switched to cql_alpha_online when the online phase starts

    def cql_gaps(self, s, s2, q_data: tuple, mc_return):
        """CQL gap per twin: logsumexp over sampled actions (uniform, pi(.|s), pi(.|s'), importance
        weighted) minus Q of the data's action; the policy terms are calibrated (Cal-QL)."""
        a, n = self.args, self.args.cql_n_actions
        s_rep, s2_rep = s.repeat_interleave(n, 0), s2.repeat_interleave(n, 0)
        with torch.no_grad():
            a_cur, logp_cur = self.actor.rsample(s_rep)
            a_next, logp_next = self.actor.rsample(s2_rep)
        a_rand = torch.rand_like(a_cur) * 2 - 1
        q_all = self.q(s_rep.repeat(3, 1), torch.cat([a_rand, a_cur, a_next]))  # one forward for all three sets
        gaps = []
        for k in range(2):
            qr, qc, qn = (q.reshape(-1, n) for q in q_all[k].chunk(3))
            if a.calibrate:
                qc, qn = calibrate(qc, mc_return), calibrate(qn, mc_return)
            cat = torch.cat([qr + self.da * math.log(2),  # - log density of uniform(-1, 1)^da
                             qn - logp_next.reshape(-1, n), qc - logp_cur.reshape(-1, n)], 1)
            diff = torch.logsumexp(cat / a.cql_temp, 1) * a.cql_temp - q_data[k]
            gaps.append(diff.clamp(min=a.cql_clip_diff_min).mean())
        return gaps

    def losses(self, b: dict):
        """Every loss at the parameters of the start of the update, as in Cal-QL and CORL (the
        critic's next-state and CQL actions come from the actor before its step): the actor, alpha,
        alpha' (None without --cql-lagrange) and critic losses, and the logged values."""
        a = self.args
        s, act, r, s2, done, mc = b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], b["mc_return"]
        # policy and entropy temperature; the actor's loss sees Q with its parameters held fixed
        new_a, logp = self.actor.rsample(s)
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        alpha = self.log_alpha.exp().detach()
        q_fixed = {k: v.detach() for k, v in self.q.named_parameters()}
        actor_loss = (alpha * logp - torch.min(*torch.func.functional_call(self.q, q_fixed, (s, new_a)))).mean()

        # Bellman target (no entropy bonus in the backup); max over sampled next actions if asked
        with torch.no_grad():
            n = a.cql_n_actions if a.cql_max_target_backup else 1
            a2, _ = self.actor.rsample(s2.repeat_interleave(n, 0))
            next_q = torch.min(*self.q_target(s2.repeat_interleave(n, 0), a2)).reshape(-1, n).max(1).values
            target = r + a.gamma * (1 - done) * next_q
        q_data = self.q(s, act)
        td_loss = F.mse_loss(q_data[0], target) + F.mse_loss(q_data[1], target)
        gaps = self.cql_gaps(s, s2, q_data, mc)
        alpha_prime_loss = None
        if a.cql_lagrange:  # alpha' grows while the gap exceeds its target, shrinks below it
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            cql_loss = sum(alpha_prime.detach() * self.cql_alpha * (g - a.cql_target_action_gap) for g in gaps)
            alpha_prime_loss = -0.5 * sum(alpha_prime * self.cql_alpha * (g.detach() - a.cql_target_action_gap) for g in gaps)
        else:
            alpha_prime = torch.ones((), device=s.device)
            cql_loss = self.cql_alpha * sum(gaps)
        logged = {"losses/q_td": td_loss.detach(), "losses/cql": cql_loss.detach(), "losses/actor": actor_loss.detach(),
                  "values/q_data": q_data[0].detach().mean(), "values/alpha": alpha, "values/alpha_prime": alpha_prime.detach(),
                  "values/cql_gap": (gaps[0] + gaps[1]).detach() / 2, "values/entropy": -logp.detach().mean()}
        return actor_loss, alpha_loss, alpha_prime_loss, td_loss + cql_loss, logged

    def update(self, b: dict) -> dict:
        """One step of every parameter, each from its loss at the starting parameters. Each loss
        reaches only its own parameters (actor; alpha; alpha'; Q), so one backward of their sum
        gives each exactly its own loss's gradient."""
        actor_loss, alpha_loss, alpha_prime_loss, q_loss, logged = self.loss_fn(b)
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        (actor_loss + alpha_loss + q_loss + (0.0 if alpha_prime_loss is None else alpha_prime_loss)).backward()
        for opt in self.opts:
            opt.step()
        with torch.no_grad():  # soft target update, one fused call
            torch._foreach_lerp_(list(self.q_target.parameters()), list(self.q.parameters()), self.args.tau)
        return logged

    def state_dict(self):
        return {**{k: getattr(self, k).state_dict() for k in
                   ("actor", "q", "q_target", "actor_opt", "q_opt", "alpha_opt", "alpha_prime_opt")},
                "log_alpha": self.log_alpha.detach(), "log_alpha_prime": self.log_alpha_prime.detach()}

    def load_state_dict(self, s):
        for k in ("actor", "q", "q_target", "actor_opt", "q_opt", "alpha_opt", "alpha_prime_opt"):
            getattr(self, k).load_state_dict(s[k])
        with torch.no_grad():
            self.log_alpha.copy_(s["log_alpha"])
            self.log_alpha_prime.copy_(s["log_alpha_prime"])


# ----------------------------------------------------------------------------------------------
# Configuration: every flag, and the paper's presets per dataset (docs/design.md §8)
# ----------------------------------------------------------------------------------------------
@dataclass
class Args(EDISArgs, common.RunArgs):
    exp_name: str = "edis_calql"
    """experiment name used in the run directory"""
    # --- Cal-QL ---
    hidden: int = 256
    """width of the actor (2 layers) and Q networks"""
    q_hidden_layers: int = 2
    """hidden layers of each Q network"""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor and the entropy temperature"""
    critic_lr: float = 3e-4
    """Adam learning rate of the Q networks and the Lagrange multiplier"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """soft target update rate"""
    reward_scale: float | None = None
    """rewards become scale * r + bias (default per family: mazes 1, -1; locomotion 1000 / return range; else 1, 0)"""
    reward_bias: float | None = None
    """see --reward-scale"""
    cql_alpha: float = 10.0
    """weight of the CQL regularizer in the offline phase"""
    cql_alpha_online: float = 10.0
    """weight of the CQL regularizer in the online phase"""
    cql_lagrange: bool = False
    """tune the CQL weight's multiplier alpha' so the CQL gap meets --cql-target-action-gap"""
    cql_target_action_gap: float = 0.8
    """target CQL gap for the Lagrange multiplier"""
    cql_n_actions: int = 10
    """sampled actions per state in the CQL logsumexp (and the max-target backup)"""
    cql_max_target_backup: bool = False
    """Bellman target takes the max over cql_n_actions sampled next actions"""
    cql_clip_diff_min: float = -math.inf
    """clip the per-sample CQL difference below at this value (antmaze: -200)"""
    cql_temp: float = 1.0
    """temperature of the CQL logsumexp"""
    calibrate: bool = True
    """Cal-QL's calibration (lower-bound pushed-down Q by the MC return); --no-calibrate gives CQL"""


# generated_ratio, cql_alpha offline, cql_alpha online, Q hidden layers, Lagrange (EDIS / Cal-QL configs).
# Adroit: the configs mark relocate alone as "no Lagrange", so pen and door use it.
PRESETS = {
    "antmaze-umaze": (0.5, 5, 5, 5, True), "antmaze-umaze-diverse": (0.5, 5, 5, 5, True),
    "antmaze-medium-play": (0.3, 5, 5, 5, True), "antmaze-medium-diverse": (0.3, 5, 5, 5, True),
    "antmaze-large-play": (0.5, 5, 5, 5, True), "antmaze-large-diverse": (0.5, 5, 5, 5, True),
    "pen-human": (0.3, 5, 5, 3, True), "door-human": (0.5, 1, 1, 3, True), "relocate-human": (0.2, 1, 2.5, 3, False),
    "halfcheetah-random": (0.2, 10, 10, 2, False), "halfcheetah-medium": (0.2, 10, 10, 2, False),
    "halfcheetah-medium-replay": (0.2, 10, 10, 2, False), "halfcheetah-medium-expert": (0.5, 10, 10, 2, False),
    "hopper-random": (0.2, 10, 1, 2, False), "hopper-medium": (0.2, 10, 0.1, 2, False),
    "hopper-medium-replay": (0.5, 10, 10, 2, False), "hopper-medium-expert": (0.5, 10, 10, 2, False),
    "walker2d-random": (0.1, 10, 0, 2, False), "walker2d-medium": (0.2, 10, 0, 2, False),
    "walker2d-medium-replay": (0.2, 10, 10, 2, False), "walker2d-medium-expert": (0.2, 10, 10, 2, False),
}


def preset_defaults(env: str, dataset: str | None, preset: str) -> dict:
    d = {"env": env, **(common.quick_defaults(env) if preset == "quick" else {})}
    src = common.resolve_source(env, dataset or d.get("dataset"))
    if src.name in PRESETS:
        ratio, alpha, alpha_online, layers, lagrange = PRESETS[src.name]
        d.update(generated_ratio=ratio, cql_alpha=alpha, cql_alpha_online=alpha_online, q_hidden_layers=layers,
                 cql_lagrange=lagrange)
    if src.family in common.MAZE_FAMILIES:  # sparse reward: r - 1, max-target backup, clipped CQL difference
        d.update(cql_max_target_backup=True, cql_clip_diff_min=-200.0, normalize_states=False)
        d.setdefault("eval_episodes", 100)
    if src.family == "adroit":  # raw states; max-target backup and clipped CQL difference (EDIS, CORL configs)
        d.update(cql_max_target_backup=True, cql_clip_diff_min=-200.0, normalize_states=False)
    return d


def validate(args: Args):
    common.validate_args(args)
    if args.cql_n_actions < 1 or args.q_hidden_layers < 1:
        raise UserError("--cql-n-actions and --q-hidden-layers must be >= 1")


# ----------------------------------------------------------------------------------------------
# Main loop (docs/design.md §5): offline phase, then online phase with EDIS cycles
# ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = common.parse_args(Args, preset_defaults, __doc__, argv)
    validate(args)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    task = common.load_task(args.env, args.dataset)
    data, ds, da = task.data, task.data.observations.shape[1], task.data.actions.shape[1]
    obs_norm = common.Normalizer.fit(data.observations) if args.normalize_states else common.Normalizer.identity(ds)
    r_scale, r_bias = common.reward_scale_bias(task.source.family, data)
    r_scale = r_scale if args.reward_scale is None else args.reward_scale
    r_bias = r_bias if args.reward_bias is None else args.reward_bias
    sparse_fail = r_bias if task.source.family in common.MAZE_FAMILIES else None  # reward of a step away from the goal
    mc = mc_returns(data.rewards * r_scale + r_bias, data.episode_ends, args.gamma, sparse_fail)
    offline = common.offline_buffer(data, obs_norm, r_scale, r_bias, device, mc_return=mc)
    online = Buffer(max(args.online_steps, 1), common.transition_dims(ds, da, mc_return=0), device)
    with common.own_rng(args.seed + 1, device):  # EDIS's randomness leaves the learner's stream alone
        edis = EDIS(args, offline, ds, da, bool(data.terminals.any()), device,
                    common.env_reward_fn(task, obs_norm, r_scale, r_bias)) if args.edis else None
    learner = CalQL(ds, da, args, device)
    env = common.make_env(task.env_fn, obs_norm, args.seed)
    precision = f"diffusion model and energies {'bf16 autocast' if edis.bf16 else 'fp32'}, learner fp32" if edis else "fp32 (no EDIS)"
    run = common.Run(args, task, obs_norm, (r_scale, r_bias), {"learner": learner, "online": online, **({"edis": edis} if edis else {})},
                     header={"device": device, "precision": precision})
    counters, timer = run.counters, run.timer

    def policy(obs):  # deterministic, for evaluation
        with torch.no_grad():
            return learner.actor.mode(torch.as_tensor(obs, device=device)).cpu().numpy()

    def no_return(batch: dict) -> dict:  # generated samples have no MC return: never calibrated
        return {**batch, "mc_return": torch.full_like(batch["rewards"], -math.inf)}

    with run:
        # ---- offline phase: Cal-QL on the dataset, then the diffusion model on the dataset ----
        while counters["offline_step"] < args.offline_steps:
            with timer("learner"):
                run.log_train(learner.update(offline.sample(args.batch_size)))
            run.tick("offline")
            if counters["offline_step"] % args.offline_eval_every == 0 or counters["offline_step"] == args.offline_steps:
                run.evaluate_and_save(policy, "offline")
            run.check_stop()
        if edis is not None and not counters["diffusion_pretrained"]:
            with timer("diffusion", args.diffusion_pretrain_steps, "diffusion pretraining") as bar, \
                    common.own_rng(args.seed + 2, device):
                run.logger.log(run.step, edis.train_diffusion([offline], [1.0], args.diffusion_pretrain_steps, bar.update))
            counters["diffusion_pretrained"] = True
            run.save()

        # ---- online phase: act, store, UTD updates on (1-rho) online + rho generated, EDIS cycles ----
        learner.cql_alpha = args.cql_alpha_online
        obs, _ = env.reset(seed=args.seed + counters["online_step"])
        ep_ret, ep_rows, ep_rewards = 0.0, [], []
        n_gen = int(round(args.batch_size * args.generated_ratio))
        while counters["online_step"] < args.online_steps:
            with timer("env"):
                with torch.no_grad():
                    act = learner.actor.sample(torch.as_tensor(obs, device=device)[None])[0].cpu().numpy()
                nxt, r, term, trunc, info = env.step(act)
                row = common.device_row(device, obs=obs, actions=act, rewards=r * r_scale + r_bias, next_obs=nxt,
                                        terminals=float(term))  # a time-limit truncation is not a terminal
                ep_rows.append(online.add(**row, mc_return=[-math.inf]))  # calibrated once the episode ends
                if edis is not None:
                    edis.positive_buffer.add(**row)
                ep_rewards.append(r * r_scale + r_bias)
                ep_ret, obs = ep_ret + r, nxt
                if term or trunc:
                    ends = np.zeros(len(ep_rewards), bool)
                    ends[-1] = True
                    online.data["mc_return"][torch.cat(ep_rows)] = torch.as_tensor(
                        mc_returns(np.array(ep_rewards, np.float32), ends, args.gamma, sparse_fail), device=device)
                    run.logger.log(run.step, {"charts/episode_return": ep_ret, "charts/episode_length": len(ep_rewards),
                                              "charts/episode_success": float(info.get("success", 0.0))})
                    (obs, _), ep_ret, ep_rows, ep_rewards = env.reset(), 0.0, [], []
            run.tick("online")
            step = counters["online_step"]
            # the rho share: generated samples once EDIS has made them; before that, and with
            # --no-edis, the offline data itself (the baseline)
            use_gen = edis is not None and edis.generated_buffer.size > 0
            with timer("learner"):
                for _ in range(args.utd):
                    mixed = no_return(edis.generated_buffer.sample(n_gen)) if use_gen else offline.sample(n_gen)
                    run.log_train(learner.update(common.cat_batches(online.sample(args.batch_size - n_gen), mixed)))
            # a cycle at the last step would make samples nothing trains on
            if edis is not None and args.edis_start <= step < args.online_steps and (step - args.edis_start) % args.edis_every == 0:
                m = edis.cycle(learner.actor, offline, online, timer, run.diagnose)
                run.logger.log(run.step, {**m, "edis/cycle": edis.cycles})
            if step % args.eval_every == 0 or step == args.online_steps:
                run.evaluate_and_save(policy, "online")
            run.check_stop()
    run.finish(generated=edis.cycles * args.num_generated if edis else 0)


if __name__ == "__main__":
    common.run_main(main)
