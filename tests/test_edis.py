"""Tests of the EDIS mechanism (the "EDIS begin" ... "EDIS end" section, docs/design.md §2, §3, §7).

Every expectation is computed analytically from the problem the test builds (Gaussians and Gaussian
mixtures, whose exact denoisers and noised density ratios have closed forms), never copied from a
run. Each test is parametrized over the two scripts that carry the same EDIS section.
"""
import contextlib
import copy
import functools
import importlib
import math
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from conftest import HostSyncs, one_thread  # noqa: E402

# One thread: these networks are small, and on a busy 2-core machine two OpenMP threads per process
# made the training tests 5-10x slower (spinning on contended cores) than one thread.
torch.set_num_threads(1)

EDIS_MODULES = ["edis_iql", "edis_calql"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=EDIS_MODULES)
def edis_mod(request):
    return importlib.import_module(request.param)


# The tests that train networks run on one script only: the EDIS section is the same text in both
# (test_scripts_share_edis), and running them twice would add minutes to CI and test nothing more.
ONE_SCRIPT = pytest.mark.parametrize("edis_mod", ["edis_iql"], indirect=True)


# ---------------------------------------------------------------------------------------------
# Ground truth: exact denoisers D(x; sigma) = E[x0 | x0 + sigma n = x]
# ---------------------------------------------------------------------------------------------
class GMM:
    """Isotropic Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) with its exact denoiser."""

    def __init__(self, mus, stds, weights):
        self.mu = torch.tensor(mus, dtype=torch.float64)
        self.var = torch.tensor(stds, dtype=torch.float64) ** 2
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.w = self.w / self.w.sum()
        self.dim = self.mu.shape[1]

    def sample(self, n, gen=None):
        k = torch.multinomial(self.w, n, replacement=True, generator=gen)
        x = self.mu[k] + self.var[k].sqrt()[:, None] * torch.randn(n, self.dim, dtype=torch.float64, generator=gen)
        return x.float(), k

    def denoise(self, x, sigma):  # x (B, d), sigma (B, 1)
        x64, s2 = x.double(), sigma.double() ** 2
        tot = self.var[None] + s2  # (B, K)
        diff = x64[:, None, :] - self.mu[None]  # (B, K, d)
        logp = self.w.log() - 0.5 * (diff**2).sum(-1) / tot - 0.5 * self.dim * torch.log(tot)
        r = torch.softmax(logp, 1)
        means = self.mu[None] + (self.var[None] / tot)[..., None] * diff
        return (r[..., None] * means).sum(1).to(x.dtype)

    def nearest(self, x):
        return torch.cdist(x.double(), self.mu).argmin(1)


def gaussian_denoiser(cov):
    """Exact denoiser of N(0, cov): D(x; sigma) = cov (cov + sigma^2 I)^-1 x."""
    lam, U = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))

    def denoise(x, sigma):  # broadcasting, not matmul: tiny CPU matmuls are slow in some torch builds
        z = (x.double()[:, :, None] * U[None]).sum(1)  # x @ U
        z = z * (lam / (lam + sigma.double() ** 2))
        return (z[:, None, :] * U[None]).sum(2).to(x.dtype)  # z @ U.T
    return denoise


def spec_sigmas(n):
    """docs/design.md §2: sigma_i = (80^(1/7) + i/(n-1) (0.002^(1/7) - 80^(1/7)))^7, then sigma_n = 0."""
    return [(80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(n)] + [0.0]


def spec_sigma_hat(s, n):
    return s * (1 + (min(80 / n, math.sqrt(2) - 1) if 0.05 <= s <= 50 else 0.0))


def sample_with(edis_mod, denoise, n, dim, steps, guide=None, known=None, resample=1):
    sigmas = edis_mod.karras_sigmas(steps)
    x = torch.randn(n, dim) * sigmas[0]
    return edis_mod.heun_sample(denoise, x, sigmas, guide=guide, known=known, resample=resample)


def circle_mixture(n_modes=8, radius=2.0, std=0.3):
    ang = 2 * math.pi * torch.arange(n_modes) / n_modes
    mus = torch.stack([radius * ang.cos(), radius * ang.sin()], 1).tolist()
    return GMM(mus, [std] * n_modes, [1.0] * n_modes)


def guide_of(edis_mod, energies, weights, dim):
    """EDIS.guide itself, bound to a stand-in holding only what it reads."""
    holder = types.SimpleNamespace(energies=energies, weights=torch.tensor(weights), active=torch.ones(len(weights)),
                                   autocast=contextlib.nullcontext,
                                   clip=10.0 * math.sqrt(dim), clip_fired=torch.zeros(()))
    return (lambda x, s: edis_mod.EDIS.guide(holder, x, s)), holder


def train_energy(edis_mod, energies, pos_pool, neg_pool, steps, sample_steps, batch=256, negatives=10, lr=1e-3):
    """InfoNCE of a one-member Energies the way EDIS.energy_losses does it: one sigma per group,
    uniform over the sampler's queried levels; positive and K negatives drawn from their pools. The
    last quarter of the steps runs at lr / 10, so that the test reads a converged ratio rather than
    Adam's last fluctuation."""
    opt = torch.optim.Adam(energies.parameters(), lr=lr)
    levels = torch.tensor(edis_mod.queried_sigmas(sample_steps))
    for step in range(steps):
        if step == (3 * steps) // 4:
            for g in opt.param_groups:
                g["lr"] = lr / 10
        sigma = levels[torch.randint(len(levels), (1, batch, 1))]
        i = torch.randint(len(pos_pool), (batch,))
        j = torch.randint(len(neg_pool), (batch, negatives))
        loss, _, offset = edis_mod.info_nce(energies, pos_pool[i][None], neg_pool[j][None], sigma)
        opt.zero_grad(set_to_none=True)
        (loss + edis_mod.OFFSET_WEIGHT * offset).sum().backward()
        opt.step()
    return energies


# ---------------------------------------------------------------------------------------------
# 1. Sampler math with exact denoisers
# ---------------------------------------------------------------------------------------------
def test_sampler_reproduces_gaussian_mixture(edis_mod):
    """heun_sample driven by the exact denoiser of a 3-mode mixture with unequal weights and spreads
    reproduces the weights, means and spreads (the sampler's math, no network involved)."""
    torch.manual_seed(0)
    gmm = GMM([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], [0.4, 0.6, 0.3], [0.5, 0.3, 0.2])
    x = sample_with(edis_mod, gmm.denoise, 4000, 2, steps=32)
    assert torch.isfinite(x).all()
    k = gmm.nearest(x)
    for j in range(3):
        sel = x[k == j].double()
        assert abs(len(sel) / len(x) - gmm.w[j].item()) < 0.04, f"mode {j} weight {len(sel) / len(x):.3f}"
        assert torch.allclose(sel.mean(0), gmm.mu[j], atol=0.1), f"mode {j} mean {sel.mean(0)}"
        std, true = sel.std(0), gmm.var[j].sqrt().item()
        assert ((std - true).abs() < 0.15 * true).all(), f"mode {j} std {std} vs {true}"


def test_guidance_exact_for_gaussian_tilt(edis_mod):
    """p = N(0, I), q = N(m, v I). With the exact noised log-ratio f = log q_sigma - log p_sigma as the
    guide, d - sigma grad f is exactly q's probability-flow slope, so the guided sampler run on p's
    denoiser must follow the same paths as the plain sampler run on q's exact denoiser (same noise),
    and reproduce q's moments (docs/design.md §3)."""
    m, v = torch.tensor([1.0, 0.0]), 0.5

    def grad_log_ratio(x, s):  # grad_x [log N(x; m, (v+s^2) I) - log N(x; 0, (1+s^2) I)]
        return -(x - m) / (v + s**2) + x / (1 + s**2)

    def denoise_p(x, sigma):
        return x / (1 + sigma**2)

    def denoise_q(x, sigma):
        return m + v / (v + sigma**2) * (x - m)

    torch.manual_seed(1)
    guided = sample_with(edis_mod, denoise_p, 2000, 2, steps=32, guide=grad_log_ratio)
    torch.manual_seed(1)
    exact_q = sample_with(edis_mod, denoise_q, 2000, 2, steps=32)
    torch.manual_seed(1)
    unguided = sample_with(edis_mod, denoise_p, 2000, 2, steps=32)
    assert torch.allclose(guided, exact_q, atol=1e-3), (guided - exact_q).abs().max()
    assert not torch.allclose(unguided, exact_q, atol=0.1)  # the guide is what makes the difference

    torch.manual_seed(2)  # moments, with enough steps for the churned sampler's discretization error to be small
    x = sample_with(edis_mod, denoise_p, 8000, 2, steps=128, guide=grad_log_ratio)
    assert torch.allclose(x.mean(0), m, atol=0.05), x.mean(0)
    assert torch.allclose(x.var(0), torch.full((2,), v), atol=0.05), x.var(0)


def test_inpainting_recovers_gaussian_conditional(edis_mod):
    """Joint N(0, [[1, rho], [rho, 1]]), x1 = c known: x2 | x1 ~ N(rho c, 1 - rho^2). Replacement is an
    approximation that resampling corrects: more resampling must approach the analytic conditional,
    and with enough of it the moments must match."""
    rho, c, n = 0.8, 1.0, 4000
    denoise = gaussian_denoiser([[1.0, rho], [rho, 1.0]])
    mask = torch.tensor([True, False])
    values = torch.zeros(n, 2)
    values[:, 0] = c
    err = {}
    for steps, resample in ((32, 1), (32, 2), (128, 10)):
        torch.manual_seed(2)
        x = sample_with(edis_mod, denoise, n, 2, steps=steps, known=(mask, values), resample=resample)
        assert torch.equal(x[:, 0], values[:, 0]), "known coordinate must end exactly at its value"
        err[steps, resample] = (abs(x[:, 1].mean() - rho * c), abs(x[:, 1].std() - math.sqrt(1 - rho**2)))
    assert err[32, 2][0] < err[32, 1][0] and err[32, 2][1] < err[32, 1][1], err  # resampling helps
    assert err[128, 10][0] < 0.05 and err[128, 10][1] < 0.06 * math.sqrt(1 - rho**2), err


def test_inpainting_noises_known_coordinates_at_each_level(edis_mod):
    """docs/design.md §2: churn stays on down to sigma_min when inpainting, and at every denoiser call that
    starts a step (sigma_hat_i) the known coordinates equal their value plus noise of exactly that
    level (replacement with fresh noise at sigma_{i+1}, then the churn up to sigma_hat)."""
    n_steps, n, c = 12, 4000, 0.7
    denoise = gaussian_denoiser([[1.0, 0.5], [0.5, 1.0]])
    sig = spec_sigmas(n_steps)
    hats = [s * (1 + min(80 / n_steps, math.sqrt(2) - 1)) for s in sig[:-1]]  # churn at every level
    calls = []

    def recording(x, sigma):
        calls.append((sigma[0, 0].item(), ((x[:, 0] - c) / sigma[:, 0]).std().item()))
        return denoise(x, sigma)
    mask = torch.tensor([True, False])
    values = torch.full((n, 2), c)
    torch.manual_seed(7)
    sample_with(edis_mod, recording, n, 2, steps=n_steps, known=(mask, values), resample=2)
    assert sorted({round(s, 9) for s, _ in calls}) == pytest.approx(sorted(set(hats) | set(sig[1:-1])), rel=1e-6)
    at_hat = [z for s, z in calls if min(abs(s / h - 1) for h in hats) < 1e-6]
    assert len(at_hat) == 2 * n_steps  # two passes (resample=2) per step
    assert all(abs(z - 1) < 0.1 for z in at_hat), at_hat


def test_inpainting_bimodal_conditional(edis_mod):
    """p = 0.1 N((1, 2), 0.3^2 I) + 0.1 N((1, -2), 0.3^2 I) + 0.8 N((-1, 0), 0.3^2 I); given x1 = 1,
    x2 is +-2 with equal weights, while the unconditional model pulls x2 towards the heavy mode's 0.
    Inpainted x2 must land in the two modes, not between them (docs/design.md §2), and resampling each step
    twice must cut the share landing between them."""
    gmm = GMM([[1.0, 2.0], [1.0, -2.0], [-1.0, 0.0]], [0.3] * 3, [0.1, 0.1, 0.8])
    n = 4000
    mask = torch.tensor([True, False])
    values = torch.ones(n, 2)
    between = {}
    for resample in (1, 2):
        torch.manual_seed(3)
        x = sample_with(edis_mod, gmm.denoise, n, 2, steps=32, known=(mask, values), resample=resample)
        assert torch.equal(x[:, 0], values[:, 0])
        x2 = x[:, 1]
        between[resample] = (x2.abs() < 2 - 3 * 0.3).float().mean()
    assert between[2] < 0.06, f"{between[2]:.3f} of inpainted values between the modes"
    assert between[2] < 0.5 * between[1], between
    up = x2 > 2 - 3 * 0.3
    down = x2 < -(2 - 3 * 0.3)
    assert abs(up.float().mean() - down.float().mean()) < 0.05
    assert abs(x2[up].median() - 2) < 0.1 and abs(x2[down].median() + 2) < 0.1


@ONE_SCRIPT
def test_progress_and_clip_rate_count_every_sampler_pass(edis_mod):
    """EDIS.sampler_work is what the sampler ticks (inpainting does every step twice) and
    EDIS.guide_rows is how many rows guide() sees: the units of the progress bars and the
    denominator of gen/guidance_clip_rate."""
    torch.manual_seed(22)
    edis, offline = tiny_edis(edis_mod, sample_steps=8)
    x = edis.to_x(offline.sample(30))
    plain_guide, seen = edis.guide, []
    edis.guide = lambda x, s: (seen.append(len(x)), plain_guide(x, s))[1]
    for inpainted in (False, True):
        ticks, seen[:] = [], []
        if inpainted:
            edis.inpaint([(x, 2)], ticks.append, guided=True)
        else:
            edis.sample(30, guided=True, tick=ticks.append)
        assert sum(ticks) == edis.sampler_work(30, inpainted) == 30 * 8 * (1 + inpainted), (inpainted, sum(ticks))
        assert sum(seen) == edis.guide_rows(30, inpainted), (inpainted, sum(seen))


# ---------------------------------------------------------------------------------------------
# 2. Training: the denoiser and the energies learn what they should
# ---------------------------------------------------------------------------------------------
@ONE_SCRIPT
def test_diffusion_training_learns_mixture(edis_mod):
    """Denoiser + diffusion_loss (AdamW, EMA as EDIS samples with) on a 3-mode mixture with unequal
    weights: the sampled mode weights and the spread around the modes match the data's."""
    torch.manual_seed(4)
    r = 1.5
    mus = [[r * math.cos(a), r * math.sin(a)] for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    gmm = GMM(mus, [0.1] * 3, [0.5, 0.3, 0.2])
    data, _ = gmm.sample(50_000)
    model = edis_mod.Denoiser(2, 128, 2)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.995))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(1200):
        loss = edis_mod.diffusion_loss(model, data[torch.randint(len(data), (256,))])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
    x = sample_with(edis_mod, ema.module, 3000, 2, steps=32)
    k = gmm.nearest(x)
    near = (x - gmm.mu[k].float()).norm(dim=1) < 4 * 0.1
    assert near.float().mean() > 0.95, f"only {near.float().mean():.3f} of samples near a mode"
    for j in range(3):
        assert abs((k == j).float().mean() - gmm.w[j]) < 0.05, f"mode {j} weight {(k == j).float().mean():.3f}"


@ONE_SCRIPT
def test_energy_learns_log_density_ratio(edis_mod):
    """info_nce on positives N(m, v I) vs negatives N(0, I), one sigma per group over the sampler's
    levels: at each level f(., sigma) must match the analytic log ratio of the noised densities
    log N(x; m, (v + sigma^2) I) - log N(x; 0, (1 + sigma^2) I) up to a constant."""
    torch.manual_seed(5)
    m, v = torch.tensor([1.0, 0.0]), 0.5
    pos = m + math.sqrt(v) * torch.randn(20_000, 2)
    neg = torch.randn(20_000, 2)
    energies = edis_mod.Energies(2, 1, hidden=128)
    train_energy(edis_mod, energies, pos, neg, steps=1000, sample_steps=16, batch=128)
    levels = edis_mod.queried_sigmas(16)
    for target in (0.03, 1.0, 3.0):  # near-clean, and noised: the noised ratio differs from the clean one
        s = min(levels, key=lambda l: abs(math.log(l / target)))
        # evaluation points where the two noised densities have their mass
        x = torch.cat([m + math.sqrt(v + s**2) * torch.randn(1000, 2), math.sqrt(1 + s**2) * torch.randn(1000, 2)])
        true = (-((x - m) ** 2).sum(1) / (2 * (v + s**2)) - math.log(v + s**2)
                + (x**2).sum(1) / (2 * (1 + s**2)) + math.log(1 + s**2))
        with torch.no_grad():
            f = energies(x[None], torch.full((1, len(x), 1), s))[0]
        f, true = f - f.mean(), true - true.mean()
        slope = (f * true).sum() / (true**2).sum()
        r2 = 1 - ((f - true) ** 2).sum() / (true**2).sum()
        assert 0.8 < slope < 1.25 and r2 > 0.85, f"sigma {s:.3f}: slope {slope:.3f}, r2 {r2:.3f}"


@ONE_SCRIPT
def test_guidance_moves_samples_to_target_modes(edis_mod):
    """docs/design.md §3's check: p = 8 modes on a circle (exact denoiser), positives from 2 of them, the energy
    trained by info_nce on the sampler's levels, guidance through EDIS.guide with weight 1: the guided
    samples fall in the 2 target modes with the true spread; unguided ones in all 8."""
    torch.manual_seed(6)
    gmm = circle_mixture(8, radius=2.0, std=0.3)
    p_samples, k = gmm.sample(20_000)
    pos = p_samples[k < 2]
    energies = edis_mod.Energies(2, 1, hidden=128)
    train_energy(edis_mod, energies, pos, p_samples, steps=1000, sample_steps=32, batch=128)
    guide, holder = guide_of(edis_mod, energies, [1.0], 2)
    x = sample_with(edis_mod, gmm.denoise, 2000, 2, steps=32, guide=guide)
    y = sample_with(edis_mod, gmm.denoise, 2000, 2, steps=32)
    kx, ky = gmm.nearest(x), gmm.nearest(y)
    guided_in, unguided_in = (kx < 2).float().mean(), (ky < 2).float().mean()
    assert guided_in > 0.9, f"guided: {guided_in:.3f} in the target modes"
    assert abs(unguided_in - 0.25) < 0.04, f"unguided: {unguided_in:.3f} in the target modes"
    for j in range(2):
        spread = (x[kx == j] - gmm.mu[j].float()).std(0)
        assert ((spread - 0.3).abs() < 0.15 * 0.3).all(), f"mode {j} spread {spread} (true 0.3)"
    assert holder.clip_fired.item() == 0, "the clip is a safety net; a correct energy stays below it"


# ---------------------------------------------------------------------------------------------
# 3. The EDIS class on a toy control problem: s in R^2, a in R
# ---------------------------------------------------------------------------------------------
A_TRUE, B_TRUE, WRONG_SHIFT, NOISE = 0.8, 0.5, 1.0, 0.05
PI_GAIN, PI_STD = 0.5, 0.3  # current policy pi(a|s) = N(0.5 s_1, 0.3^2); the data has a = s_1 + N(0, 0.5^2)
DS, DA = 2, 1
TOY_STEPS, TOY_ENERGY_WIDTH = 32, 64  # at 16 steps the churned sampler's own error (~+30% variance) blurs the checks
TOY_DIMS = common.transition_dims(DS, DA)


def true_next(s, a):
    return A_TRUE * s + B_TRUE * torch.cat([a, torch.zeros_like(a)], 1)


def toy_rows(n, dynamics=True, wrong_frac=0.0, s2_mean=0.0, s2_std=1.0):
    """s_1 ~ N(0, 1), s_2 ~ N(s2_mean, s2_std^2), a = s_1 + N(0, 0.5^2). With `dynamics`:
    r = s_1 - a + noise and s' = A s + B a e_1 + noise, a share `wrong_frac` of rows following a
    wrong dynamics (s'_1 shifted). Without: r and s' are noise independent of (s, a)."""
    s = torch.randn(n, DS) * torch.tensor([1.0, s2_std]) + torch.tensor([0.0, s2_mean])
    a = s[:, :1] + 0.5 * torch.randn(n, 1)
    if dynamics:
        r = (s[:, :1] - a)[:, 0] + NOISE * torch.randn(n)
        s2 = true_next(s, a) + NOISE * torch.randn(n, DS)
        s2[:, 0] += WRONG_SHIFT * (torch.rand(n) < wrong_frac).float()
    else:
        r, s2 = 0.5 * torch.randn(n), torch.randn(n, DS)
    return {"obs": s, "actions": a, "rewards": r, "next_obs": s2, "terminals": torch.zeros(n)}


def toy_buffer(rows):
    buf = common.Buffer(len(rows["obs"]), TOY_DIMS, CPU)
    buf.add(**rows)
    return buf


class LinearGaussianPolicy:
    """pi(a|s) = N(PI_GAIN s_1, PI_STD^2), with the learner actor's interface (sample, log_prob)."""

    def sample(self, s):
        return PI_GAIN * s[:, :1] + PI_STD * torch.randn(len(s), 1)

    def log_prob(self, s, a):
        return torch.distributions.Normal(PI_GAIN * s[:, :1], PI_STD).log_prob(a.reshape(len(s), 1)).sum(-1)


def toy_args(edis_mod, weights, **kw):
    return edis_mod.EDISArgs(**{**dict(
        diffusion_width=128, diffusion_depth=2, diffusion_finetune_steps=0, sample_steps=TOY_STEPS,
        pool_size=4000, energy_steps=1000, energy_batch_size=64, num_generated=2000, gen_batch_size=4000,
        positive_buffer_size=2000, diag_samples=2000,
        state_guidance=weights[0], policy_guidance=weights[1], transition_guidance=weights[2]), **kw})


def make_toy_edis(edis_mod, weights, offline, **kw):
    """EDIS as the scripts build it, with narrower energy networks (speed); the class picks its slices."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(edis_mod, "Energies", functools.partial(edis_mod.Energies, hidden=TOY_ENERGY_WIDTH))
        # the toys' actions are unbounded Gaussians (a real task's live in [-1, 1]): no box to clip them to
        return edis_mod.EDIS(toy_args(edis_mod, weights, **kw), offline, DS, DA, False, CPU, action_box=False)


def pretrain_toy(edis_mod, make_rows, seed):
    """The toy's diffusion model, trained on make_rows() drawn from `seed` as well: a test's data must
    not depend on which tests ran before it (the rows were drawn from whatever state the global RNG
    was left in)."""
    torch.manual_seed(seed)
    offline = toy_buffer(make_rows())
    edis = make_toy_edis(edis_mod, (0.0, 0.0, 0.0), offline)
    metrics = edis.train_diffusion([offline], [1.0], 1000)
    assert torch.isfinite(metrics["diffusion/loss"])
    return offline, {k: copy.deepcopy(getattr(edis, k).state_dict()) for k in ("model", "ema", "opt")}


def toy_edis_from(edis_mod, toy_model, weights, **kw):
    """A toy EDIS holding the pretrained toy model's diffusion weights and optimizer."""
    offline_model_data, state = toy_model
    edis = make_toy_edis(edis_mod, weights, offline_model_data, **kw)
    for k, v in state.items():
        getattr(edis, k).load_state_dict(v)
    return edis


def run_toy_cycle(edis_mod, toy_model, weights, positive_rows, real_rows, seed, **kw):
    """One EDIS.cycle with the given guidance weights, from the pretrained toy model (no fine-tuning).
    Returns the cycle's metrics, the generated buffer and as many unguided samples (learner space)."""
    edis = toy_edis_from(edis_mod, toy_model, weights, **kw)
    torch.manual_seed(seed)
    edis.positive_buffer.add(**positive_rows)
    real_offline, online = toy_buffer(real_rows(4000)), toy_buffer(real_rows(1000))
    timer = common.Timer()
    m = edis.cycle(LinearGaussianPolicy(), real_offline, online, timer, lambda *_: {})  # no env-specific checks
    assert edis.cycles == 1 and set(timer.total) >= {"diffusion", "energy", "generation", "diagnostics"}
    assert float(m["gen/nonfinite_dropped"]) == 0.0 and edis.generated_buffer.size == edis.args.num_generated
    gen = {k: v.reshape(edis.generated_buffer.size, -1) for k, v in edis.generated_buffer.all().items()}
    unguided = {k: v.reshape(len(v), -1) for k, v in edis.from_x(edis.sample(edis.args.num_generated)).items()}
    return m, gen, unguided


@pytest.fixture(scope="module")
def policy_state_cycle(edis_mod):
    """State and policy guidance on, transition off. The data's r and s' do not depend on (s, a), and
    the positive buffer (recent online data ~ d^pi) differs from the data in s_2 only (N(1, 0.5^2)
    instead of N(0, 1)): the two ratios read independent groups of coordinates ({s_2} and
    {s_1, a}), so their separately noised ratios add up to the exact noised ratio and the guided
    distribution has a closed form: s_1 ~ N(0, 1), s_2 ~ N(1, 0.5^2), a | s ~ pi."""
    model = pretrain_toy(edis_mod, lambda: toy_rows(5000, dynamics=False), seed=10)
    torch.manual_seed(11)
    positive = toy_rows(2000, dynamics=False, s2_mean=1.0, s2_std=0.5)
    return run_toy_cycle(edis_mod, model, (1.0, 1.0, 0.0), positive,
                         lambda n: toy_rows(n, dynamics=False), seed=12)


def policy_resid(b):
    return ((b["actions"][:, 0] - PI_GAIN * b["obs"][:, 0]) ** 2).mean()


@ONE_SCRIPT
def test_policy_energy_pulls_actions_toward_policy(edis_mod, policy_state_cycle):
    """Guided actions follow pi(a|s) = N(0.5 s_1, 0.3^2): E(a - 0.5 s_1)^2 -> 0.09 (the data's
    a = s_1 + N(0, 0.5^2) gives 0.25 E[s_1^2] + 0.25 unguided), and log pi of the samples rises."""
    m, gen, unguided = policy_state_cycle
    target = PI_STD**2
    unguided_expected = 0.25 * (unguided["obs"][:, 0] ** 2).mean() + 0.25
    assert abs(policy_resid(unguided) - unguided_expected) < 0.2 * unguided_expected  # the model learned the data
    assert abs(policy_resid(gen) - target) < 0.4 * target, (policy_resid(gen), policy_resid(unguided))
    assert abs(gen["obs"][:, 0].std() - 1.0) < 0.15, gen["obs"][:, 0].std()  # s_1's marginal is kept
    assert m["gen/guided_policy_logprob"] > m["gen/unguided_policy_logprob"] + 1.0, m
    assert m["energy/policy_heldout_top1"] > m["energy/chance_top1"]


@ONE_SCRIPT
def test_state_guidance_reduces_mmd(edis_mod, policy_state_cycle):
    """Guided states follow the positive buffer's distribution (s_2 ~ N(1, 0.5^2), s_1 unchanged),
    and the cycle's MMD diagnostic says so."""
    m, gen, unguided = policy_state_cycle
    s, su = gen["obs"], unguided["obs"]
    assert (su.mean(0).abs() < 0.15).all() and ((su.std(0) - 1.0).abs() < 0.15).all()  # unguided: the data's
    assert abs(s[:, 1].mean() - 1.0) < 0.15 and abs(s[:, 1].std() - 0.5) < 0.1, (s.mean(0), s.std(0))
    assert abs(s[:, 0].mean()) < 0.15, s.mean(0)
    assert m["gen/guided_state_mmd"] < 0.5 * m["gen/unguided_state_mmd"], m
    assert m["energy/state_heldout_top1"] > m["energy/chance_top1"]


@ONE_SCRIPT
def transition_toy_cycle(edis_mod, **kw):
    """The model learned data whose next states follow the true dynamics s' = A s + B a e_1 in half
    the rows and a wrong one in the other half: it stands for a wrong p_theta(s'|s, a). Real data
    (offline and online at the cycle) obeys the true dynamics, and its states are shifted
    (s_2 ~ N(0.7, 1)) from the model's. One cycle with transition guidance alone."""
    model = pretrain_toy(edis_mod, lambda: toy_rows(5000, wrong_frac=0.5), seed=13)
    real = functools.partial(toy_rows, s2_mean=0.7)
    return run_toy_cycle(edis_mod, model, (0.0, 0.0, 1.0), toy_rows(2000), real, seed=14, **kw)


def dynamics_err(b):
    return b["next_obs"] - true_next(b["obs"], b["actions"])


def true_mode(e):  # share of rows nearer the true than the wrong dynamics
    return (e[:, 0].abs() < WRONG_SHIFT / 2).float().mean()


def test_transition_energy_pulls_next_state_toward_dynamics(edis_mod):
    """Transition guidance alone must bring the generated s' to the true dynamics. The transition
    energy contrasts real rows with the model's inpainting at real (s, a) of other rows, so it learns
    T / p_theta(s'|s, a) only, and (s, a) keep the model's distribution (not the real rows' shift)."""
    m, gen, unguided = transition_toy_cycle(edis_mod)
    e_gen, e_un = dynamics_err(gen), dynamics_err(unguided)
    assert abs(true_mode(e_un) - 0.5) < 0.1  # the model reproduces the mixture
    assert true_mode(e_gen) > 0.9, true_mode(e_gen)
    mse_gen, mse_un = (e_gen**2).sum(1).mean(), (e_un**2).sum(1).mean()
    assert mse_gen < 0.2 * mse_un, (mse_gen, mse_un)
    s, da = gen["obs"], gen["actions"][:, 0] - gen["obs"][:, 0]
    assert (s.mean(0).abs() < 0.2).all() and ((s.std(0) - 1.0).abs() < 0.25).all(), (s.mean(0), s.std(0))
    assert abs(da.std() - 0.5) < 0.2, da.std()
    assert m["energy/transition_heldout_top1"] > m["energy/chance_top1"]


def test_same_sa_negatives_leave_states_and_actions_free():
    """--transition-negatives same-sa (the reference code's choice): every negative of a group is
    inpainted at the positive's own (s, a). InfoNCE sees an energy only up to a constant per group,
    so the energy's dependence on (s, a) alone is left free, and its gradient moves s and a. On the
    toy above (seeds 13/23/33) the guided a - s_1 spread was 0.83-0.91 against 0.66-0.67 with the
    default negatives (data: 0.5), s_2's 1.19-1.30 against 1.01-1.05 (model: 1.0), and fewer samples
    reached the true dynamics (0.86-0.94 against 0.95-0.99), at the same sampling cost (design §3.4).
    It still pulls toward the dynamics; it bends (s, a) on the way."""
    mod = importlib.import_module("edis_iql")  # the EDIS section is the same text in both scripts
    m, gen, unguided = transition_toy_cycle(mod, transition_negatives="same-sa")
    assert true_mode(dynamics_err(gen)) > 0.75 > true_mode(dynamics_err(unguided)) + 0.15
    da = gen["actions"][:, 0] - gen["obs"][:, 0]
    assert da.std() > 0.75, da.std()  # the default keeps it at 0.66-0.67 (its test allows up to 0.7)
    assert m["energy/transition_heldout_top1"] > m["energy/chance_top1"]


def slope_on_s1(b):  # least-squares slope of a on s_1 (the data's is 1)
    s1, a = b["obs"][:, 0], b["actions"][:, 0]
    return (((s1 - s1.mean()) * (a - a.mean())).mean() / s1.var()).item()


def test_state_energy_leaves_actions_alone_where_inpainting_is_biased():
    """The state energy is about s only: d^pi(s) / p_theta(s) (design §3.5). Here the positive buffer
    holds the data itself (d^pi = the data's state law), so it must not change how a depends on s.
    At 8 sampler steps the model's inpainting is biased (a given s comes out with a slope of about 0.4
    on s_1, the joint sampler's about 0.9; the data's is 1). With plain model samples as the state
    negatives (`--state-negatives unguided`, the version before), the energy learns "looks inpainted"
    and its guidance bends the actions toward the inpainting: guided minus unguided slope -0.11 to
    -0.22 over eight seeds (10-80, mean -0.17). With the inpainted negatives (the default) both sides
    carry the bias: +0.07 to -0.09 (mean -0.05). Here (seed 50): -0.03, and -0.19 with the old
    negatives, which fail this test."""
    mod = importlib.import_module("edis_iql")  # the EDIS section is the same text in both scripts
    rows = functools.partial(toy_rows, dynamics=False)
    model = pretrain_toy(mod, lambda: rows(5000), seed=50)
    torch.manual_seed(51)
    positive = rows(2000)
    kw = dict(sample_steps=8, state_negatives="inpainted")
    _, gen, unguided = run_toy_cycle(mod, model, (1.0, 0.0, 0.0), positive, rows, seed=52, **kw)
    assert slope_on_s1(unguided) > 0.85, slope_on_s1(unguided)  # the joint sampler keeps a | s
    assert slope_on_s1(gen) - slope_on_s1(unguided) > -0.12, (slope_on_s1(gen), slope_on_s1(unguided))
    # the toy bites: the inpainting the energy's positives come from is far off a | s
    e = toy_edis_from(mod, model, (0.0, 0.0, 0.0), **kw)
    (inpainted,) = e.inpaint([(e.to_x(rows(4000)), DS)])
    assert slope_on_s1({k: v.reshape(len(v), -1) for k, v in e.from_x(inpainted).items()}) < 0.6


TIED_GAIN, TIED_NOISE, TARGET_MODES = 0.3, 0.05, 2


def tied_next(s, a):
    return s + TIED_GAIN * torch.cat([a, torch.zeros_like(a)], 1)


def tied_rows(n, target_only=False, on_policy=False):
    """A toy where s' is tied to s, as in every MuJoCo task: s from the 8-mode circle mixture
    (target_only: its first TARGET_MODES modes), a ~ N(0, 1) (the data) or pi(a|s) (on_policy),
    s' = s + 0.3 a e_1 + N(0, 0.05^2), r = s_1 - a + N(0, 0.05^2)."""
    gmm = circle_mixture(8, radius=2.0, std=0.3)
    s, k = gmm.sample(8 * n if target_only else n)
    s = s[k < TARGET_MODES][:n] if target_only else s
    a = LinearGaussianPolicy().sample(s) if on_policy else torch.randn(n, 1)
    s2 = tied_next(s, a) + TIED_NOISE * torch.randn(n, DS)
    r = (s[:, :1] - a)[:, 0] + TIED_NOISE * torch.randn(n)
    return {"obs": s, "actions": a, "rewards": r, "next_obs": s2, "terminals": torch.zeros(n)}


def run_tied_cycle(edis_mod, weights=(1.0, 1.0, 1.0), seed=40, **kw):
    """One EDIS cycle on the tied toy from a diffusion model trained on its data. The positive
    buffer holds on-policy transitions from 2 of the 8 modes, so the target q = d^pi pi T has a
    closed form: s in the 2 target modes, a ~ N(0.5 s_1, 0.3^2), s' on the true dynamics."""
    torch.manual_seed(seed)
    offline = toy_buffer(tied_rows(8000))
    model = make_toy_edis(edis_mod, (0.0, 0.0, 0.0), offline, **kw)
    model.train_diffusion([offline], [1.0], 1500)
    state = {k: copy.deepcopy(getattr(model, k).state_dict()) for k in ("model", "ema", "opt")}
    return run_toy_cycle(edis_mod, (offline, state), weights, tied_rows(2000, True, True), tied_rows, seed + 1, **kw)


@pytest.fixture(scope="module")
def tied_cycles():
    """All three learned energies (w = 1), with the model generating s' itself (the paper's layout)
    and the step s' - s (the default). The EDIS section is the same text in both scripts
    (test_scripts_share_edis), so this costly check runs on one of them."""
    mod = importlib.import_module("edis_iql")
    return {ns: run_tied_cycle(mod, next_state=ns) for ns in ("absolute", "step")}


def tied_dyn_mse(b):
    return ((b["next_obs"] - tied_next(b["obs"], b["actions"])) ** 2).sum(1).mean().item()


def test_full_transition_guidance_reaches_target_when_next_state_is_tied_to_state(tied_cycles):
    """Energies that read only their own slice moved about half of the samples and bent the
    dynamics on such data (docs/design.md §3): here the guided samples must land in the target
    modes, with actions on pi and next states on the true dynamics (error no higher than unguided)."""
    m, gen, unguided = tied_cycles["absolute"]
    gmm = circle_mixture(8, radius=2.0, std=0.3)
    share = {k: (gmm.nearest(b["obs"]) < TARGET_MODES).float().mean().item() for k, b in (("guided", gen), ("unguided", unguided))}
    assert abs(share["unguided"] - 0.25) < 0.05, share  # the model learned the data's 8 modes
    # 0.885 / 0.927 at seeds 40 / 50 with the state negatives inpainted (0.934 / 0.947 with unguided
    # samples as the state negatives, which pull actions off pi where the inpainting is biased: design §3.5)
    assert share["guided"] > 0.85, share

    # a - mean of pi(.|s): N(0, 0.3^2) on target. The spread bound is 0.15: with the pinned, early-stopped
    # energies the guided spread was 0.32-0.43 over seeds 40-60 (0.31-0.38 before), the slice energies' 0.56
    resid = gen["actions"][:, 0] - PI_GAIN * gen["obs"][:, 0]
    assert abs(resid.mean()) < 0.1 and abs(resid.std() - PI_STD) < 0.15, (resid.mean(), resid.std())
    assert tied_dyn_mse(gen) < 1.25 * tied_dyn_mse(unguided), (tied_dyn_mse(gen), tied_dyn_mse(unguided))
    spread = gen["obs"][gmm.nearest(gen["obs"]) == 0] - gmm.mu[0].float()
    assert ((spread.std(0) - 0.3).abs() < 0.1).all(), spread.std(0)  # the modes keep their shape
    for k in ("state", "policy"):  # the model's dynamics are right here, so E_T has nothing to tell apart
        assert m[f"energy/{k}_heldout_top1_low_sigma"] > 2 * m["energy/chance_top1"], (k, m)


def test_generating_the_step_makes_next_states_more_accurate(tied_cycles):
    """The default layout generates s' - s: the guided next states must be closer to the true dynamics
    than when the model generates s' itself (measured 0.0055-0.0057 against 0.0089-0.0091 over three
    seeds), while guidance still moves states and actions most of the way (design §1 has the price:
    a weaker pull, share 0.83-0.94 in the target modes and an action offset up to -0.17)."""
    _, gen, unguided = tied_cycles["step"]
    gmm = circle_mixture(8, radius=2.0, std=0.3)
    assert tied_dyn_mse(gen) < 0.8 * tied_dyn_mse(tied_cycles["absolute"][1])
    assert tied_dyn_mse(gen) < 1.25 * tied_dyn_mse(unguided)
    assert (gmm.nearest(gen["obs"]) < TARGET_MODES).float().mean() > 0.75
    resid = gen["actions"][:, 0] - PI_GAIN * gen["obs"][:, 0]
    assert abs(resid.mean()) < 0.25 and abs(resid.std() - PI_STD) < 0.15, (resid.mean(), resid.std())


# ---------------------------------------------------------------------------------------------
# 4. Structure: schedule, queried levels, no host synchronisation, pools, guide clip, layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 16, 128])
def test_schedule_is_python_floats_matching_spec(edis_mod, n):
    sig = edis_mod.karras_sigmas(n)
    assert len(sig) == n + 1 and all(type(s) is float for s in sig), "the sampler loop must not read tensors"
    assert sig[-1] == 0.0 and sig[0] == pytest.approx(80.0) and sig[-2] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(sig, sig[1:]))
    assert sig == pytest.approx(spec_sigmas(n), rel=1e-9)


@ONE_SCRIPT  # the EDIS section is the same text in both scripts (test_scripts_share_edis.py)
def test_a_lower_sigma_max_keeps_a_rare_far_mode(edis_mod):
    """--sigma-max: the schedule starts there (and the energies train up to it), and with the
    standardized data's scale in mind a start at 10 instead of 80, at the 32-step schedule's density
    (22 steps), still finds a rare mode 7 std from the bulk with its 2% of the mass (exact denoiser).
    Started at 1 (13 steps) the sampler loses it: the toy bites."""
    gmm = GMM([[0.0, 0.0], [7.0, 0.0]], [0.5, 0.5], [0.98, 0.02])
    share = {}
    with one_thread():
        for smax, n in ((80.0, 32), (10.0, 22), (1.0, 13)):
            torch.manual_seed(2)
            sig = edis_mod.karras_sigmas(n, smax)
            assert sig[0] == pytest.approx(smax) and sig[-2] == pytest.approx(edis_mod.SIGMA_MIN)
            y = edis_mod.heun_sample(gmm.denoise, torch.randn(40000, 2) * sig[0], sig)
            share[smax] = (gmm.nearest(y) == 1).double().mean().item()
    assert abs(share[80.0] - 0.02) < 0.005 and abs(share[10.0] - 0.02) < 0.005, share  # measured 0.019, 0.018 (SE 0.0007)
    assert share[1.0] < 0.005, share  # measured 0.0005
    edis, _ = tiny_edis(edis_mod, sigma_max=10.0)
    assert edis.sigmas[0] == pytest.approx(10.0)
    assert 10.0 <= edis.train_sigmas.max().item() <= 10.0 * math.sqrt(2) + 1e-4


@pytest.mark.parametrize("n", [8, 32])
def test_queried_sigmas_are_exactly_what_the_sampler_asks(edis_mod, n):
    """The energies are trained on queried_sigmas(n): it must hold every sigma_i and sigma_hat_i of the
    schedule of docs/design.md §2, and nothing else than the levels the guided sampler really evaluates."""
    levels = edis_mod.queried_sigmas(n)
    expected = {s for s in spec_sigmas(n)[:-1]} | {spec_sigma_hat(s, n) for s in spec_sigmas(n)[:-1]}
    assert sorted(levels) == pytest.approx(sorted(expected), rel=1e-9)
    seen = []

    def guide(x, s):
        assert type(s) is float
        seen.append(s)
        return torch.zeros_like(x)

    def denoise(x, sigma):
        assert sigma.shape in ((len(x), 1), (1, 1)) and (sigma == sigma.flatten()[0]).all()  # one sigma per call
        return torch.zeros_like(x)

    sample_with(edis_mod, denoise, 5, 3, steps=n, guide=guide)
    assert sorted(set(seen)) == pytest.approx(sorted(levels), rel=1e-6)


def tiny_edis(edis_mod, ds=2, da=1, terminals=False, n=300, **kw):
    args = dict(diffusion_width=32, diffusion_depth=1, sample_steps=4, pool_size=200, energy_steps=2,
                energy_batch_size=8, num_generated=100, gen_batch_size=64, positive_buffer_size=100,
                diag_samples=50, diffusion_finetune_steps=2)
    args.update(kw)
    dims = {"obs": ds, "actions": da, "rewards": 0, "next_obs": ds, "terminals": 0}
    offline = common.Buffer(n, dims, CPU)
    offline.add(obs=torch.randn(n, ds), actions=torch.rand(n, da) * 2 - 1, rewards=torch.randn(n),
                next_obs=torch.randn(n, ds), terminals=(torch.rand(n) < 0.3).float() if terminals else torch.zeros(n))
    return edis_mod.EDIS(edis_mod.EDISArgs(**args), offline, ds, da, terminals, CPU), offline


def test_sampler_has_no_host_sync(edis_mod):
    """Unguided, guided (EDIS.guide, with its clip counter) and inpainting sampling never turn a
    tensor into a Python value (on a GPU each such conversion is a device sync)."""
    torch.manual_seed(20)
    edis, offline = tiny_edis(edis_mod)
    batch = offline.sample(40)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host synchronisation inside the sampler")
    conversions = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
    with pytest.MonkeyPatch.context() as mp:
        for name in conversions:
            mp.setattr(torch.Tensor, name, forbidden)
        x = edis.to_x(batch)
        outs = [edis.sample(100), edis.sample(100, guided=True), *edis.inpaint([(x, 2), (x, 3)])]
        with pytest.raises(AssertionError, match="host synchronisation"):  # the guard itself works
            bool(torch.ones(()) > 0)
    assert [tuple(o.shape) for o in outs] == [(100, 6), (100, 6), (40, 6), (40, 6)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_no_host_sync_in_hot_paths(edis_mod):
    """No host-device sync, counted at the op level (HostSyncs, which says what it sees): the learner's
    update (IQL; Cal-QL with and without the Lagrange weight and the max-target backup), a diffusion
    training step with its EMA, the energies' training with its early stopping, guided sampling and
    inpainting. The counter itself must see .item(), bool(t) and boolean-mask indexing."""
    import edis_calql
    import edis_iql
    torch.manual_seed(21)
    edis, offline = tiny_edis(edis_mod)
    edis.positive_buffer.add(**offline.sample(100))
    batch = {**offline.sample(32), "mc_return": torch.zeros(32)}
    iql = edis_iql.IQL(2, 1, edis_iql.Args(), CPU, 10**6)
    calqls = [edis_calql.CalQL(2, 1, edis_calql.Args(**kw), CPU) for kw in
              ({}, dict(cql_lagrange=True, cql_max_target_backup=True, cql_clip_diff_min=-200.0))]
    pools = edis.make_pools(iql.actor, [offline], [1.0])
    units = {"IQL update": lambda: iql.update(batch),
             **{f"Cal-QL update {i}": functools.partial(c.update, batch) for i, c in enumerate(calqls)},
             "diffusion steps": lambda: edis.train_diffusion([offline], [1.0], 2),
             "energy training": lambda: edis.train_energies(pools),
             "guided sampling": lambda: edis.sample(20, guided=True),
             "inpainting": lambda: edis.inpaint([(edis.to_x(offline.sample(20)), 2)])}
    for name, unit in units.items():
        unit()  # first call outside: lazy state (optimizer moments) is created here
        with HostSyncs() as s:
            unit()
        assert s.seen == [], f"{name}: {s.seen}"
    x = torch.ones(3)
    with HostSyncs() as s:
        x.sum().item(), bool(x.sum() > 0), x[x > 0]
        x[x > 0] = 2.0
        x.repeat_interleave(torch.tensor([1, 2, 0]))
    assert len(s.seen) == 5, s.seen


def test_guide_is_weighted_gradient_clipped_per_sample(edis_mod):
    """EDIS.guide = sum_k w_k grad_x f_k (one backward); sigma * guide is clipped per sample at the
    clip level with its direction kept, and the clipped rows are counted."""
    W = torch.tensor([[1.0, 0.0, 2.0], [0.0, -3.0, 0.0], [0.5, 0.0, 0.0]])

    def energies(x, sig):  # x (3, N, D), one slice per energy: f_k(x) = x . W[:, k], plus |x|^2 for k = 2
        return (x * W.T[:, None, :]).sum(-1) + (x**2).sum(-1) * torch.tensor([0.0, 0.0, 1.0])[:, None]
    weights = torch.tensor([0.5, 2.0, 1.0])
    guide, holder = guide_of(edis_mod, energies, weights.tolist(), 3)
    holder.clip = 10.0
    x = torch.tensor([[0.1, 0.2, 0.3], [10.0, 0.0, 0.0]])
    exact = (W * weights).sum(1) + 2 * x  # analytic weighted gradient, per row
    for sigma in (1.0, 0.5):
        before = holder.clip_fired.item()
        g = guide(x, sigma)
        over = sigma * exact.norm(dim=1) > holder.clip
        assert over.tolist() == [False, True]
        assert torch.allclose(g[0], exact[0], atol=1e-5)  # below the clip: untouched
        assert torch.allclose(sigma * g[1].norm(), torch.tensor(holder.clip), atol=1e-4)  # clipped to the level
        assert torch.allclose(g[1] / g[1].norm(), exact[1] / exact[1].norm(), atol=1e-5)  # same direction
        assert holder.clip_fired.item() - before == 1
    assert torch.allclose(guide(x, 0.01), exact, atol=1e-5)  # small sigma: nothing clipped


@pytest.mark.parametrize("next_state", ["step", "absolute"])
def test_transition_vector_layout_roundtrip(edis_mod, next_state):
    """to_x / from_x: [s, a, r, s' - s (or s'), (terminal)] standardized with the offline statistics;
    from_x inverts to_x and thresholds the terminal at 0.5."""
    torch.manual_seed(21)
    edis, offline = tiny_edis(edis_mod, ds=3, da=2, terminals=True, next_state=next_state)
    batch = offline.sample(50)
    x = edis.to_x(batch)
    assert x.shape == (50, 3 + 2 + 1 + 3 + 1)
    data = offline.all()
    s2 = data["next_obs"] - data["obs"] if next_state == "step" else data["next_obs"]
    raw = torch.cat([data["obs"], data["actions"], data["rewards"][:, None], s2, data["terminals"][:, None]], 1)
    assert torch.allclose(edis.to_x(data), (raw - raw.mean(0)) / raw.std(0), atol=1e-5)  # order and statistics
    back = edis.from_x(x)
    for k in ("obs", "actions", "next_obs"):
        assert torch.allclose(back[k], batch[k], atol=1e-5), k
    assert torch.allclose(back["rewards"], batch["rewards"], atol=1e-5) and back["rewards"].shape == (50,)
    assert torch.equal(back["terminals"], batch["terminals"])
    x2 = x.clone()  # raw terminal just below / just above 0.5
    x2[:, -1] = (torch.tensor([0.49, 0.51]).repeat(25) - raw[:, -1].mean()) / raw[:, -1].std()
    assert edis.from_x(x2)["terminals"].tolist() == [0.0, 1.0] * 25


def test_pools_match_the_conditioning(edis_mod):
    """docs/design.md §3 table: each energy's positives differ from its negatives in its own factor.
    State positives keep the positive buffer's s exactly; policy positives keep the unguided samples'
    s with a ~ pi(.|s); transition negatives keep real (s, a) rows; every inpainted coordinate is
    the model's (not a copy of its row's known values); real rows mix offline and online by share."""
    torch.manual_seed(22)
    edis, offline = tiny_edis(edis_mod, ds=2, da=1)
    online = common.Buffer(100, common.transition_dims(2, 1), CPU)
    online.add(**{k: v + 100.0 if k == "obs" else v for k, v in offline.sample(100).items()})  # online rows: s_1 ~ 100
    positive = offline.sample(100)
    edis.positive_buffer.add(**positive)
    pools = edis.make_pools(LinearGaussianPolicy(), [offline, online], [0.75, 0.25])
    cat = {k: torch.cat(v) for k, v in pools.items()}
    ds, da = 2, 1
    assert set(cat) == {"state_positive", "state_negative", "policy_positive", "transition_negative", "unguided", "real"}
    assert all(len(v) == 200 for v in cat.values())
    assert [p for p, _ in edis.pairs] == ["state_positive", "policy_positive", "real"]
    assert [q for _, q in edis.pairs] == ["state_negative", "unguided", "transition_negative"]

    def nearest(x, ref):
        return torch.cdist(x, ref, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    pos_s = edis.to_x(positive)[:, :ds]
    assert (nearest(cat["state_positive"][:, :ds], pos_s) < 1e-5).all(), "state positives keep s+ exactly"
    assert nearest(cat["state_positive"][:, ds:], edis.to_x(positive)[:, ds:]).max() > 1e-3, "(a, r, s') inpainted"
    assert (nearest(cat["policy_positive"][:, :ds], cat["unguided"][:, :ds]) < 1e-5).all(), "s from model samples"
    # state negatives: the unguided samples' own s, (a, r, s') inpainted as the state positives' are
    assert (cat["state_negative"][:, :ds] - cat["unguided"][:, :ds]).abs().max() < 1e-5
    assert (cat["state_negative"][:, ds:] - cat["unguided"][:, ds:]).abs().max() > 1e-3
    s = cat["policy_positive"][:, :ds] * edis.x_std[:ds] + edis.x_mean[:ds]
    a = cat["policy_positive"][:, ds] * edis.x_std[ds] + edis.x_mean[ds]
    resid = (a - PI_GAIN * s[:, 0]) / PI_STD  # a+ ~ pi(.|s) of the same row: standard normal residual
    assert abs(resid.mean()) < 0.3 and abs(resid.std() - 1) < 0.2
    assert (cat["policy_positive"][:, ds + da:] - cat["unguided"][:, ds + da:]).abs().max() > 1e-3, "(r, s') inpainted"
    real_all = torch.cat([edis.to_x(offline.all()), edis.to_x(online.all())])
    assert (nearest(cat["real"], real_all) < 1e-4).all()
    assert (nearest(cat["transition_negative"][:, : ds + da], real_all[:, : ds + da]) < 1e-4).all(), "real (s, a) kept"
    assert nearest(cat["transition_negative"][:, ds + da:], real_all[:, ds + da:]).max() > 1e-3
    from_online = (cat["real"][:, 0] * edis.x_std[0] + edis.x_mean[0] > 50).float().mean()
    assert from_online == 0.25, from_online


def test_same_sa_negatives_complete_their_own_positive(edis_mod):
    """--transition-negatives same-sa: the pool holds K inpaintings per real row, each keeping that
    row's (s, a) and completing (r, s') differently, at the default's sampling cost; energy_losses
    pairs every positive with its own K."""
    torch.manual_seed(23)
    K = 5
    edis, offline = tiny_edis(edis_mod, energy_negatives=K, transition_negatives="same-sa")
    edis.positive_buffer.add(**offline.sample(100))
    pools = edis.make_pools(LinearGaussianPolicy(), [offline], [1.0])
    real, neg = (torch.cat(pools[k]) for k in ("real", "transition_negative"))
    ds, da = 2, 1
    D = len(edis.x_mean)
    assert real.shape == (200 // K, D) and neg.shape == (200 // K, K, D)
    assert [len(v) for v in pools["real"]] == [len(v) for v in pools["transition_negative"]]  # splits stay paired
    assert (neg[:, :, : ds + da] - real[:, None, : ds + da]).abs().max() < 1e-5, "each negative keeps its row's (s, a)"
    assert neg[:, :, ds + da:].std(1).min() > 1e-3, "the K completions differ"
    # the transition group of a positive holds exactly its own negatives
    seen = {}
    real_fn = edis_mod.info_nce
    try:
        edis_mod.info_nce = lambda energies, pos, neg_, sigma: seen.update(pos=pos, neg=neg_) or (torch.zeros(3),) * 3
        edis.energy_losses(pools, 0, 16)
    finally:
        edis_mod.info_nce = real_fn
    pos_t, neg_t = seen["pos"][2], seen["neg"][2]
    assert neg_t.shape == (16, K, D)
    assert (neg_t[:, :, : ds + da] - pos_t[:, None, : ds + da]).abs().max() < 1e-5
    with pytest.raises(common.UserError, match="same-sa needs --pool-size"):
        common.validate_args(edis_mod.Args(pool_size=10 * K - 1, energy_negatives=K, transition_negatives="same-sa"))
    common.validate_args(edis_mod.Args(pool_size=10 * K, energy_negatives=K, transition_negatives="same-sa"))


def test_info_nce_is_softmax_cross_entropy_with_one_sigma_per_group(edis_mod):
    """info_nce noises the positive and its K negatives with the group's sigma, evaluates every
    energy on its own rows at that sigma, and returns -log softmax of the positive (and top-1
    accuracy) per energy."""
    torch.manual_seed(23)
    n, B, K, D = 3, 64, 5, 3
    pos, neg = torch.randn(n, B, D), torch.randn(n, B, K, D)
    sigma = torch.exp(torch.randn(n, B, 1))
    seen = {}

    def recorder(x, sig):  # energy k: f_k(u) = -(k + 1) |u|^2, recording what info_nce feeds it
        seen.update(x=x.detach(), sig=sig)
        return -(x**2).sum(-1) * torch.arange(1.0, n + 1)[:, None]
    loss, acc, offset = edis_mod.info_nce(recorder, pos, neg, sigma)
    assert loss.shape == acc.shape == offset.shape == (n,)
    u = torch.cat([pos[:, :, None], neg], 2)  # (n, B, 1 + K, D)
    x, sig = seen["x"].reshape(n, B, K + 1, D), seen["sig"].reshape(n, B, K + 1)
    assert torch.equal(sig, sigma.expand(n, B, K + 1))  # the group's sigma for all its members
    z = (x - u) / sigma[..., None]  # the noise, standardized by the group's sigma
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    logits = -(x**2).sum(-1) * torch.arange(1.0, n + 1)[:, None, None]
    expected = -torch.log_softmax(logits, -1)[..., 0].mean(1)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(acc, (logits.argmax(-1) == 0).float().mean(1))
    assert torch.allclose(offset, logits[..., 1:].mean(-1).pow(2).mean(1), rtol=1e-5)  # the groups' negatives


def test_energies_members_are_independent_and_read_the_whole_transition(edis_mod):
    """The batched ensemble is n independent networks: member k's output depends only on slice k
    of the input and on its own weights, and its gradient reaches every coordinate of x."""
    torch.manual_seed(31)
    e = edis_mod.Energies(5, 3, hidden=16)
    x = torch.randn(3, 7, 5, requires_grad=True)
    sigma = torch.full((1, 1, 1), 0.5)
    f = e(x, sigma)
    assert f.shape == (3, 7)
    (g,) = torch.autograd.grad(f[1].sum(), x)
    assert g[0].abs().max() == 0 and g[2].abs().max() == 0, "member 1 must read only its own rows"
    assert (g[1].abs().sum(0) > 0).all(), "member 1 reads every coordinate"
    with torch.no_grad():
        e.weights[0][2].add_(1.0)  # change member 2's first layer only
    f2 = e(x, sigma)
    assert torch.equal(f2[:2], f[:2]) and not torch.allclose(f2[2], f[2])


def test_rbf_mmd(edis_mod):
    torch.manual_seed(24)
    x, y = torch.randn(600, 2), torch.randn(600, 2)
    assert edis_mod.rbf_mmd(x, x).abs() < 1e-6
    same = edis_mod.rbf_mmd(x, y)
    shifted = [edis_mod.rbf_mmd(x, y + torch.tensor([d, 0.0])) for d in (0.5, 1.0, 2.0)]
    assert abs(same) < 0.01 and shifted[0] > 5 * abs(same)
    assert shifted[0] < shifted[1] < shifted[2]  # grows with the shift
    # the median-distance bandwidth makes it scale-free
    assert torch.allclose(edis_mod.rbf_mmd(3 * x, 3 * y + 3.0), edis_mod.rbf_mmd(x, y + 1.0), atol=1e-5)
    assert torch.allclose(edis_mod.rbf_mmd(x, y + 1.0), edis_mod.rbf_mmd(y + 1.0, x), atol=1e-6)  # symmetric


def test_mixed_sample_takes_shares_not_sizes(edis_mod):
    a = common.Buffer(300, {"obs": 1}, CPU)
    b = common.Buffer(100, {"obs": 1}, CPU)
    a.add(obs=torch.zeros(300))
    b.add(obs=torch.ones(100))
    out = edis_mod.mixed_sample([a, b], [0.5, 0.5], 1000)["obs"]
    assert len(out) == 1000 and out.sum().item() == 500  # half from the small buffer b
    assert edis_mod.mixed_sample([a, b], [0.9, 0.1], 999)["obs"].sum().item() == 100


def test_cycle_runs_with_one_dimensional_states(edis_mod):
    torch.manual_seed(25)
    edis, offline = tiny_edis(edis_mod, ds=1, da=1)
    edis.positive_buffer.add(**offline.sample(100))
    m = edis.cycle(LinearGaussianPolicy(), offline, offline, common.Timer(), lambda *_: {})
    assert torch.isfinite(torch.as_tensor(float(m["gen/guided_state_mmd"])))


@ONE_SCRIPT
def test_energy_level_stays_pinned_when_pools_cannot_be_told_apart(edis_mod):
    """InfoNCE cannot see a constant added to a group's logits, and Adam turns the rounding noise
    along that direction into full steps. Here every pool has the same law (nothing to learn): after
    1,500 steps in bf16 the energies' mean logit must stay near 0. Without the pin one energy's mean
    logit ends at 0.64 here (0.08 at most with it), and it drifted to -174 over a maze run's cycles,
    where bf16 rounding then swamped the ratio and the loss went above chance (docs/design.md §3.4)."""
    torch.manual_seed(32)
    edis, _ = tiny_edis(edis_mod, ds=3, da=1, precision="bf16", energy_steps=1500, energy_batch_size=64)
    D = len(edis.x_mean)
    pools = {k: tuple(torch.randn(n, D) for n in (3000, 400, 400))
             for k in ("state_positive", "state_negative", "policy_positive", "transition_negative", "unguided", "real")}
    with one_thread():
        edis.train_energies(pools)
        with torch.no_grad():
            f = edis.energies(torch.randn(2000, D).expand(3, 2000, D), torch.full((1, 1, 1), 0.01))
    assert f.mean(1).abs().max() < 0.25, f.mean(1)


def test_a_cycle_whose_guidance_did_not_pull_says_so(edis_mod, capsys):
    """Guided samples no likelier under pi than unguided ones (halfcheetah-medium-replay's cycles),
    or no nearer the positive buffer's states, get a warning line and a 0 in edis/{policy,state}_pulls;
    an energy the guard switched off is not blamed; a cycle that pulled says nothing."""
    edis, _ = tiny_edis(edis_mod, precision="fp32")
    t = torch.tensor

    def m(g_logp, u_logp, g_mmd, u_mmd, **extra):
        return {"gen/guided_policy_logprob": t(g_logp), "gen/unguided_policy_logprob": t(u_logp),
                "gen/guided_state_mmd": t(g_mmd), "gen/unguided_state_mmd": t(u_mmd), **extra}
    assert edis.check_pull(m(-2.3, -4.2, 0.002, 0.009)) == {"edis/policy_pulls": 1.0, "edis/state_pulls": 1.0}
    assert capsys.readouterr().out == ""
    assert edis.check_pull(m(-6.96, -6.30, 0.002, 0.005)) == {"edis/policy_pulls": 0.0, "edis/state_pulls": 1.0}
    said = capsys.readouterr().out
    assert said.startswith("warning: EDIS cycle 1") and "log pi -6.96 guided vs -6.3 unguided" in said and "MMD" not in said
    out = edis.check_pull(m(-6.96, -6.30, 0.009, 0.005, **{"edis/policy_guides": 0.0}))
    assert out == {"edis/policy_pulls": 0.0, "edis/state_pulls": 0.0}
    said = capsys.readouterr().out
    assert "state MMD^2 0.009 guided vs 0.005 unguided" in said and "log pi" not in said


@ONE_SCRIPT
def test_the_learner_gets_actions_inside_the_box(edis_mod):
    """A barely trained model's actions spill beyond [-1, 1], where no policy acts and the simulator
    would clip them: the generated buffer the learner samples holds them clipped to the box, and
    gen/{set}_actions_out_of_box counts the spill."""
    torch.manual_seed(26)
    edis, offline = tiny_edis(edis_mod)
    edis.positive_buffer.add(**offline.sample(100))
    m = edis.cycle(LinearGaussianPolicy(), offline, offline, common.Timer(), lambda *_: {})
    actions = edis.generated_buffer.all()["actions"]
    assert m["gen/unguided_actions_out_of_box"] > 0.1 and m["gen/guided_actions_out_of_box"] > 0.1, m
    assert actions.abs().max() <= 1 and (actions.abs() == 1).float().mean() > 0.1
    x = torch.randn(500, len(edis.x_mean)) * 3  # the diagnostics' self-check reads the rows as the learner gets them
    assert torch.allclose(edis.from_x(edis.clip_actions(x))["actions"], edis.from_x(x)["actions"], atol=1e-5)


def test_pull_check_reads_a_tanh_policy_at_clipped_actions():
    """The policy pull check on Cal-QL's tanh policy, whose density vanishes on the box's edge. The
    "guided" rows are pi's own actions blurred by 0.1 (in about 44% of rows one spills beyond 1 and
    comes back clipped to it), the "unguided" rows actions pi rarely takes. Read at the edge, the guided
    rows scored far below the unguided ones and the check said "no pull" (halfcheetah-medium-replay,
    14 of 15 cycles); read 0.001 inside the box, they score above them, as pi's own actions must."""
    edis_calql = importlib.import_module("edis_calql")
    torch.manual_seed(27)
    ds, da, n = 2, 3, 2000
    edis, _ = tiny_edis(edis_calql, ds=ds, da=da, diag_samples=n, precision="fp32")
    edis.x_mean, edis.x_std = torch.zeros(2 * ds + da + 1), torch.ones(2 * ds + da + 1)  # learner rows = model space
    pi = edis_calql.TanhGaussianActor(ds, da, 16)
    with torch.no_grad():  # pi(a|s) = tanh(N(1.5, 0.3^2)) in every coordinate, whatever s
        pi.net[-1].weight.zero_()
        pi.net[-1].bias.copy_(torch.tensor([1.5] * da + [math.log(0.3)] * da))

    def rows(n, guided):
        u = torch.randn(n, da) * 0.3 + (1.5 if guided else 0.3)
        a = torch.tanh(u) + (0.1 * torch.randn(n, da) if guided else 0.0)
        return torch.cat([torch.randn(n, ds), a, torch.randn(n, 1 + ds)], 1)
    edis.generate = rows
    edis.positive_buffer.add(**edis.from_x(rows(500, True)))
    m = edis.diagnostics(pi, edis.positive_buffer, lambda *_: {})
    assert 0.3 < m["gen/guided_actions_out_of_box"] < 0.6 and m["gen/unguided_actions_out_of_box"] == 0, m
    assert m["gen/guided_policy_logprob"] > m["gen/unguided_policy_logprob"] + 3, m
    assert edis.check_pull(m)["edis/policy_pulls"] == 1.0


def test_guard_turns_off_energies_that_fail_their_heldout_check(edis_mod, capsys):
    """An energy whose held-out loss at low sigma is not below chance (or not finite) stops guiding
    for the cycle, and the run says so; the guidance is then the other energies' alone."""
    torch.manual_seed(30)
    edis, _ = tiny_edis(edis_mod, precision="fp32")
    chance = math.log(1 + edis.args.energy_negatives)
    losses = {"state": 2.0, "policy": chance + 0.5, "transition": float("nan")}
    out = edis.guard_energies({f"energy/{k}_heldout_loss_low_sigma": torch.tensor(v) for k, v in losses.items()})
    assert out == {"edis/state_guides": 1.0, "edis/policy_guides": 0.0, "edis/transition_guides": 0.0}
    said = capsys.readouterr().out
    assert said.startswith("warning: EDIS cycle 1") and "policy (2.90)" in said and "transition (nan)" in said
    x = torch.randn(20, len(edis.x_mean))
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        f = edis.energies(xg.expand(3, *x.shape), torch.full((1, 1, 1), 0.05))
        (state_only,) = torch.autograd.grad(f[0].sum(), xg)
    assert torch.allclose(edis.guide(x, 0.05), state_only, atol=1e-5)
    edis.guard_energies({f"energy/{k}_heldout_loss_low_sigma": torch.tensor(2.0) for k in losses})  # next cycle
    assert edis.active.tolist() == [1.0, 1.0, 1.0] and capsys.readouterr().out == ""


def test_guard_falls_back_to_offline_data_when_guidance_leaves_the_data(edis_mod, capsys):
    """Samples whose guidance hit the safety clip on more than 1% of sampler calls (or came out
    non-finite) are not kept: the generated buffer is emptied, so the learner's generated share is
    the offline data until the next cycle; the run says so."""
    torch.manual_seed(31)
    edis, offline = tiny_edis(edis_mod)
    edis.generated_buffer.replace(**offline.sample(80))
    assert edis.guard_samples({"gen/guidance_clip_rate": torch.tensor(0.004), "gen/nonfinite_dropped": torch.tensor(0.0)}) == {"edis/fallback": 0.0}
    assert edis.generated_buffer.size == 80 and capsys.readouterr().out == ""
    for clip, dropped in ((0.09, 0.0), (0.0, 0.2)):
        edis.generated_buffer.replace(**offline.sample(80))
        out = edis.guard_samples({"gen/guidance_clip_rate": torch.tensor(clip), "gen/nonfinite_dropped": torch.tensor(dropped)})
        assert out == {"edis/fallback": 1.0} and edis.generated_buffer.size == 0
        assert "offline data fills the generated share" in capsys.readouterr().out


def test_positive_state_source_keeps_the_buffers_states_and_drops_the_state_energy(edis_mod):
    """--state-source positive: every generated row's s is a positive-buffer state exactly (the rest is
    the model's), and the state energy does not guide (its weight is 0)."""
    torch.manual_seed(33)
    edis, offline = tiny_edis(edis_mod, state_source="positive")
    edis.positive_buffer.add(**offline.sample(60))
    x = edis.generate(80, guided=True)
    s_real = edis.to_x(edis.positive_buffer.all())[:, :2]
    nearest = torch.cdist(x[:, :2], s_real, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert (nearest < 1e-5).all()
    assert (x[:, 2:] - edis.to_x(edis.positive_buffer.all())[:, 2:].mean(0)).abs().max() > 1e-3  # the rest generated
    assert edis.weights.tolist() == [0.0, 1.0, 1.0]


def test_state_dict_roundtrip_restores_sampling(edis_mod):
    """A checkpointed EDIS (model, EMA, energies, buffers, counters) samples exactly as the original."""
    torch.manual_seed(26)
    edis, offline = tiny_edis(edis_mod)
    edis.train_diffusion([offline], [1.0], 3)
    edis.positive_buffer.add(**offline.sample(30))
    edis.generated_buffer.add(**offline.sample(20))
    edis.cycles = 3
    state = copy.deepcopy(edis.state_dict())
    torch.manual_seed(27)
    other, _ = tiny_edis(edis_mod)
    other.load_state_dict(state)
    assert other.cycles == 3 and other.positive_buffer.size == 30 and other.generated_buffer.size == 20
    for k, v in edis.positive_buffer.all().items():
        assert torch.equal(other.positive_buffer.all()[k], v)
    torch.manual_seed(28)
    x = edis.sample(50, guided=True)
    torch.manual_seed(28)
    assert torch.equal(other.sample(50, guided=True), x)



@ONE_SCRIPT
def test_self_tail_tells_teleported_transitions_from_real_ones(edis_mod):
    """gen/{set}_self_tail on ground truth: a Gaussian whose (r, s' - s) follow (s, a) closely, its
    exact denoiser as the model. Rows drawn from it score like the real positive rows (about 1%
    beyond their 99th percentile), the same rows with another row's (r, s' - s) (teleports) nearly
    all beyond it; and the check leaves the run's random stream where it was."""
    torch.manual_seed(41)
    edis, _ = tiny_edis(edis_mod, diag_samples=2000, sample_steps=16, precision="fp32")
    L = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],   # s1, s2, a
                      [0, 0, 0.95, 0.1, 0, 0], [0.7, 0, 0.7, 0, 0.1, 0], [0, 0.99, 0, 0, 0, 0.1]])  # r, s' - s
    edis.ema = gaussian_denoiser(L @ L.T)
    # learner rows = the model's space, but for the actions: a third of it, so that they lie in the box
    edis.x_mean, edis.x_std = torch.zeros(6), torch.tensor([1, 1, 1 / 3, 1, 1, 1])

    def draw(n, teleport=False):
        x = torch.randn(n, 6) @ L.T
        if teleport:
            x[:, 3:] = x[torch.randperm(n), 3:]
        return x
    x = draw(2000)
    edis.positive_buffer.add(obs=x[:, :2], actions=x[:, 2:3] / 3, rewards=x[:, 3], next_obs=x[:, :2] + x[:, 4:])
    edis.generate = lambda n, guided: draw(n, teleport=guided)  # "guided": teleports; "unguided": real draws
    policy = types.SimpleNamespace(log_prob=lambda s, a: torch.zeros(len(s)))
    state = torch.get_rng_state()
    m = edis.diagnostics(policy, edis.positive_buffer, lambda *_: {})
    assert torch.equal(torch.get_rng_state(), state)
    assert m["gen/positive_self_tail"] < 0.04 and m["gen/unguided_self_tail"] < 0.04, m  # measured 0.006-0.022
    assert m["gen/guided_self_tail"] > 0.7, m  # measured 0.85 (the inpainting's own bias widens the real rows' spread)

# ---------------------------------------------------------------------------------------------
# 5. Diagnostics that live in common.py (used by the EDIS cycle's `diagnose`): not parametrized
# ---------------------------------------------------------------------------------------------
def learner_rows(task, norm, r_scale, r_bias) -> dict:
    """The task's offline transitions as the learner stores them (normalized states, scaled rewards)."""
    d = task.data
    return {"obs": torch.as_tensor(norm(d.observations)), "actions": torch.as_tensor(d.actions),
            "rewards": torch.as_tensor(d.rewards * r_scale + r_bias), "next_obs": torch.as_tensor(norm(d.next_observations)),
            "terminals": torch.as_tensor(d.terminals, dtype=torch.float32)}


@pytest.mark.parametrize("env_id", ["Hopper-v4", "PointMaze_UMaze-v3"])
def test_transition_check_scores_real_rows_zero_and_catches_corrupted_ones(env_id):
    """What the learner consumes, against the simulator: real transitions replay exactly (s', r and
    the terminal flag; Hopper falls over in random data, so terminals are checked there); shuffled
    next states land in the tail, wrong rewards and flipped terminals are counted, and on the maze
    the shuffled moves are impossible (too long, or through walls)."""
    maze = env_id.startswith("PointMaze")
    task = common.load_task(env_id, "explore:400" if maze else "random:400")
    norm = common.Normalizer.fit(task.data.observations)
    r_scale, r_bias = common.reward_scale_bias(task.source.family, task.data)
    check = common.TransitionCheck(task, norm, r_scale, r_bias)
    rows = learner_rows(task, norm, r_scale, r_bias)
    real = check(rows)
    assert real["dynamics_mse"] < 1e-6 and real["dynamics_tail"] == 0.0 and real["reward_mse"] < 1e-8, real
    assert ("terminal_error" in real) == (not maze) and real.get("terminal_error", 0.0) == 0.0
    assert ("wall_crossing" in real) == maze and real.get("wall_crossing", 0.0) == 0.0

    perm = torch.randperm(len(task.data), generator=torch.Generator().manual_seed(0))
    shuffled = check({**rows, "next_obs": rows["next_obs"][perm]})
    assert shuffled["dynamics_tail"] > 0.5 and shuffled["dynamics_mse"] > 0.1, shuffled
    if maze:
        assert shuffled["wall_crossing"] > 0.5, shuffled
    assert check({**rows, "rewards": rows["rewards"] + 0.5})["reward_mse"] == pytest.approx(0.25, abs=1e-4)
    if not maze:
        assert task.data.terminals.any()
        assert check({**rows, "terminals": 1.0 - rows["terminals"]})["terminal_error"] == 1.0


def test_maze_moves_through_walls_or_too_far_are_impossible():
    """The PointMaze ball moves at most ~0.074 per step (speed clipped to 5 per axis, dt 0.01): no real
    step is longer, and a short step that enters a wall cell, or a longer step in the open, is caught."""
    task = common.load_task("PointMaze_UMaze-v3", "explore:400")
    check = common.TransitionCheck(task, common.Normalizer.identity(8), 1.0, -1.0)
    walls, scale, xc, yc, max_step = check.maze
    assert 0.07 < max_step < 0.08, max_step
    d = task.data
    assert np.linalg.norm(d.next_observations[:, :2] - d.observations[:, :2], axis=1).max() <= max_step
    env = task.env_fn().unwrapped
    rowcol = np.argwhere(~walls)
    # an open cell with a wall below it (row + 1), and one with an open cell below it
    to_wall = next(rc for rc in rowcol if walls[rc[0] + 1, rc[1]])
    to_open = next(rc for rc in rowcol if not walls[rc[0] + 1, rc[1]])
    down = np.array([0.0, -1.0])  # row + 1 is lower y
    starts = [env.maze.cell_rowcol_to_xy(rc) + 0.48 * scale * down for rc in (to_wall, to_open)]
    xy = np.array(starts + [env.maze.cell_rowcol_to_xy(to_open)] * 2)
    xy2 = xy + np.array([0.05 * down, 0.05 * down, [0.05, 0.0], [0.2, 0.0]])
    env.close()
    assert check.impossible_moves(xy, xy2).tolist() == [True, False, False, True]


@pytest.mark.parametrize("maze", [False, True])
def test_state_scatter_writes_png(tmp_path, maze):
    torch.manual_seed(29)
    norm = common.Normalizer(np.array([1.0, -2.0, 0.0, 0.0], np.float32), np.array([2.0, 3.0, 1.0, 1.0], np.float32))
    groups = {"offline": torch.randn(300, 4), "positive buffer": torch.randn(50, 4) + 1,
              "unguided": torch.randn(100, 4), "guided": torch.cat([torch.randn(99, 4), torch.full((1, 4), float("nan"))])}
    path = tmp_path / "states.png"
    common.state_scatter(path, groups, norm, maze=maze, title="test")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
