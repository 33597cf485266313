"""Tests of the Cal-QL learner of edis_calql.py against values computed independently.

Expected numbers come from direct loops over hand-built data (Monte-Carlo returns, the
importance-sampled CQL logsumexp), closed forms (tanh-Gaussian log density, Adam's first step,
the mean of the max of n tanh-normal draws by quadrature) and the preset table of docs/design.md §8."""
import copy
import math
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import one_thread  # noqa: E402

import common  # noqa: E402
import edis_calql  # noqa: E402
from edis_calql import Args, CalQL, TanhGaussianActor, calibrate, mc_returns  # noqa: E402

CPU = torch.device("cpu")


def return_to_go(rewards, gamma) -> np.ndarray:
    """G_t = sum_{k >= t} gamma^(k - t) r_k of ONE episode, by the direct double sum (float64)."""
    r = np.asarray(rewards, np.float64)
    return np.array([sum(gamma ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))])


def random_batch(n, ds, da, seed=0, mc=-math.inf) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(n, ds, generator=g), "actions": torch.rand(n, da, generator=g) * 2 - 1,
            "rewards": torch.randn(n, generator=g), "next_obs": torch.randn(n, ds, generator=g),
            "terminals": (torch.rand(n, generator=g) < 0.2).float(), "mc_return": torch.full((n,), float(mc))}


# ---------------------------------------------------------------------------------------------
# Monte-Carlo returns
# ---------------------------------------------------------------------------------------------
def test_mc_returns_two_dense_episodes_no_leak():
    """Catches no reset of the running return at an episode end (the first episode would carry the
    second's return), a missing or doubled discount, and an off-by-one of the end flag."""
    gamma = 0.9
    ep1, ep2 = [1.0, 2.0, 3.0], [0.5, -1.0, 4.0, 2.0]
    rewards = np.array(ep1 + ep2, np.float32)
    ends = np.array([0, 0, 1, 0, 0, 0, 1], bool)
    got = mc_returns(rewards, ends, gamma)
    expected = np.concatenate([return_to_go(ep1, gamma), return_to_go(ep2, gamma)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[2] == pytest.approx(3.0)  # the last step of episode 1 sees its own reward only


def test_mc_returns_truncated_episode_is_the_partial_sum():
    """An episode cut by the data's end (no end flag at all) or a time limit (end flag, not a
    terminal) counts the rewards it saw: the partial discounted sum, nothing bootstrapped."""
    gamma = 0.95
    rewards = np.array([2.0, -1.0, 0.5, 3.0, 1.0], np.float32)
    expected = return_to_go(rewards, gamma)
    np.testing.assert_allclose(mc_returns(rewards, np.zeros(5, bool), gamma), expected, rtol=1e-6)
    np.testing.assert_allclose(mc_returns(rewards, np.array([0, 0, 0, 0, 1], bool), gamma), expected, rtol=1e-6)
    # a dense episode followed by one truncated at the data's end
    ends = np.array([0, 1, 0, 0, 0], bool)
    np.testing.assert_allclose(mc_returns(rewards, ends, gamma),
                               np.concatenate([return_to_go(rewards[:2], gamma), return_to_go(rewards[2:], gamma)]),
                               rtol=1e-6)


def test_mc_returns_sparse_failed_episodes_fail_forever():
    """Sparse rewards (antmaze after r - 1: -1 per step, 0 at the goal). Episode A never reaches the
    goal: -1/(1 - gamma) at every step (Cal-QL's convention, not the partial sum). Episode B reaches
    it: its ordinary return-to-go. Episode C fails and is cut by the data's end: -1/(1 - gamma).
    Catches the failure test made on the whole array instead of per episode, and a convention that
    is applied to successful episodes too (or to none)."""
    gamma = 0.99
    a, b, c = [-1.0] * 4, [-1.0, -1.0, -1.0, 0.0], [-1.0] * 3
    rewards = np.array(a + b + c, np.float32)
    ends = np.zeros(len(rewards), bool)
    ends[[3, 7]] = True
    got = mc_returns(rewards, ends, gamma, sparse_fail=-1.0)
    fail = -1.0 / (1 - gamma)
    expected = np.concatenate([[fail] * 4, return_to_go(b, gamma), [fail] * 3])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[4] > -3.0 and got[0] == pytest.approx(-100.0, rel=1e-5)
    # without the sparse convention, the failed episodes get their partial sums
    dense = mc_returns(rewards, ends, gamma)
    np.testing.assert_allclose(dense, np.concatenate([return_to_go(x, gamma) for x in (a, b, c)]), rtol=1e-6)


def test_calibrate_lifts_only_q_below_the_mc_return():
    """max(Q, mc) per row: Q below the row's MC return becomes it, Q above stays; rows whose return
    is -inf (generated samples) are never changed. Catches a min instead of a max, and a return
    broadcast along the wrong axis (row i's return applied to column i)."""
    q = torch.tensor([[0.0, 5.0, -3.0], [1.0, 2.0, 3.0], [-10.0, 10.0, 0.0], [4.0, -4.0, 7.0]])
    mc = torch.tensor([1.0, -math.inf, 2.5, 100.0])
    got = calibrate(q, mc)
    expected = q.clone()
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            expected[i, j] = max(q[i, j].item(), mc[i].item())
    assert torch.equal(got, expected)
    assert torch.equal(got[1], q[1])


# ---------------------------------------------------------------------------------------------
# The CQL gap: importance-sampled logsumexp, calibrated
# ---------------------------------------------------------------------------------------------
DS, DA, N_ACT = 2, 2, 4
W1, V1, C1 = np.array([0.7, -0.4]), np.array([0.9, 0.3]), 0.2
W2, V2, C2 = np.array([-0.2, 0.5]), np.array([-0.6, 1.1]), -0.1


def q_np(k, s, a):
    w, v, c = (W1, V1, C1) if k == 0 else (W2, V2, C2)
    return float(s @ w + a @ v + c + 0.5 * (k + 1) * np.sum(a ** 2))


class KnownQ(nn.Module):
    """Twin Q with closed-form values: q_k(s, a) = s.w_k + a.v_k + c_k + (k+1)/2 |a|^2."""

    def forward(self, s, a):
        out = []
        for k, (w, v, c) in enumerate(((W1, V1, C1), (W2, V2, C2))):
            w, v = torch.as_tensor(w, dtype=s.dtype), torch.as_tensor(v, dtype=s.dtype)
            out.append(s @ w + a @ v + c + 0.5 * (k + 1) * (a ** 2).sum(-1))
        return tuple(out)


def actor_np(s, j):
    """The known 'policy' sample j at state s, and the log-density the learner is told it has."""
    a = np.tanh(np.array([0.5 * s[0] - 0.3 * s[1] + 0.2 * j, -0.4 * s[0] + 0.1 * s[1] - 0.15 * j]))
    return a, 0.7 * (s[0] + s[1]) - 0.4 * j + 0.1


class KnownActor:
    """rsample(s) gives actor_np(s_i, i mod n) for row i: the learner repeats each state n times
    (repeat_interleave), so row i is sample j = i mod n of its state. Depends on the states passed,
    not on the call order, so evaluating pi(.|s') samples at s' instead of s would change the result."""

    def rsample(self, s):
        j = (torch.arange(len(s)) % N_ACT).to(s.dtype)
        a = torch.tanh(torch.stack([0.5 * s[:, 0] - 0.3 * s[:, 1] + 0.2 * j, -0.4 * s[:, 0] + 0.1 * s[:, 1] - 0.15 * j], -1))
        return a, 0.7 * (s[:, 0] + s[:, 1]) - 0.4 * j + 0.1


def expected_gaps(s, s2, q_data, mc, u, calib, temp, clip):
    """CQL gap by a direct loop (float64): per state, T logsumexp(x / T) over n uniform actions
    (Q + da log 2, the importance weight of the uniform density 2^-da), n pi(.|s') actions
    (Q(s, a') - log pi(a'|s')) and n pi(.|s) actions (Q(s, a) - log pi(a|s)), policy Q values
    lifted to the MC return when calibrating, minus Q of the data's action, clipped below, averaged."""
    gaps, n_changed = [], 0
    for k in range(2):
        diffs = []
        for b in range(len(s)):
            terms = [q_np(k, s[b], 2 * u[b * N_ACT + j] - 1) + DA * math.log(2) for j in range(N_ACT)]
            for state in (s2[b], s[b]):
                for j in range(N_ACT):
                    a, logp = actor_np(state, j)
                    q = q_np(k, s[b], a)
                    if calib and mc[b] > q:
                        q, n_changed = mc[b], n_changed + 1
                    terms.append(q - logp)
            x = np.array(terms) / temp
            lse = temp * (x.max() + math.log(np.sum(np.exp(x - x.max()))))
            diffs.append(max(lse - q_data[k][b], clip))
        gaps.append(float(np.mean(diffs)))
    return gaps, n_changed


@pytest.mark.parametrize("calib,temp,clip", [(True, 1.0, -math.inf), (False, 1.0, -math.inf), (True, 0.5, -math.inf),
                                             (True, 1.0, -5.0)], ids=["calibrated", "uncalibrated", "temp0.5", "clipped"])
def test_cql_gap_matches_direct_loop(calib, temp, clip, monkeypatch):
    """With the Q networks, the policy and the uniform draws replaced by known functions, the gap
    equals the importance-sampled logsumexp computed by a loop. Catches a wrong sign or missing
    log-density correction, a missing da log 2 for the uniform actions, pi(.|s') actions evaluated
    at s' instead of s, calibration of the uniform term (or of none), the temperature applied
    only inside the logsumexp, and a clip on the mean instead of per sample."""
    rng = np.random.default_rng(3)
    B = 4
    s, s2 = rng.normal(size=(B, DS)), rng.normal(size=(B, DS))
    u = rng.uniform(size=(B * N_ACT, DA))
    q_data = [np.array([0.0, 50.0, -3.0, 1.0]), np.array([0.5, 1.0, 40.0, -2.0])]
    mc = np.array([-math.inf, 30.0, 0.0, -1.0])  # none / above every Q / between the Q values / low

    args = Args(hidden=8, cql_n_actions=N_ACT, calibrate=calib, cql_temp=temp, cql_clip_diff_min=clip)
    learner = CalQL(DS, DA, args, CPU)
    learner.q, learner.actor = KnownQ(), KnownActor()

    def fixed_uniform(t):
        assert t.shape == (B * N_ACT, DA)
        return torch.as_tensor(u, dtype=t.dtype)

    monkeypatch.setattr(torch, "rand_like", fixed_uniform)
    f64 = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        got = learner.cql_gaps(f64(s), f64(s2), tuple(f64(q) for q in q_data), f64(mc))
    expected, n_changed = expected_gaps(s, s2, q_data, mc, u, calib, temp, clip)
    np.testing.assert_allclose([g.item() for g in got], expected, rtol=1e-9, atol=1e-9)
    if calib:  # the case is informative: calibration moves some policy terms, not all
        assert 0 < n_changed < 2 * B * 2 * N_ACT
    if clip > -math.inf:  # and the clip bites for some rows, not all
        unclipped, _ = expected_gaps(s, s2, q_data, mc, u, calib, temp, -math.inf)
        assert expected[0] > unclipped[0] and expected[1] > unclipped[1]


def test_calibration_raises_the_gap_only_with_a_return():
    """Real networks, same random draws (reseeded): an MC return far above every Q lifts the policy
    terms and with them the gap; a return of -inf (generated samples) gives exactly the CQL gap of
    --no-calibrate. Catches calibration ignoring the return, or lifting rows that have none."""
    with one_thread():
        b = random_batch(16, 3, 2)
        gaps = {}
        for calib in (True, False):
            torch.manual_seed(0)  # the same networks for both
            learner = CalQL(3, 2, Args(hidden=16, calibrate=calib), CPU)
            with torch.no_grad():
                q_data = learner.q(b["obs"], b["actions"])
                for mc in (1e3, -math.inf):
                    torch.manual_seed(1)  # the same sampled actions for every call
                    g = learner.cql_gaps(b["obs"], b["next_obs"], q_data, torch.full((16,), mc))
                    gaps[calib, mc] = [x.item() for x in g]
    for k in range(2):
        assert gaps[True, 1e3][k] - gaps[True, -math.inf][k] > 500  # Q values are O(1): lifted to ~1000
        assert gaps[True, -math.inf][k] == gaps[False, -math.inf][k]
        assert gaps[False, 1e3][k] == gaps[False, -math.inf][k]  # --no-calibrate ignores the return


# ---------------------------------------------------------------------------------------------
# Lagrange multiplier alpha'
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lagrange,target", [(True, -1000.0), (True, 1000.0), (False, -1000.0)],
                         ids=["gap_above_target", "gap_below_target", "no_lagrange"])
def test_lagrange_multiplier_moves_toward_the_target_gap(lagrange, target):
    """alpha' grows while the CQL gap exceeds its target and shrinks below it. Adam's first step
    moves log alpha' by exactly its learning rate (critic_lr, as in CQL) against the gradient's sign.
    The reported CQL loss is alpha' cql_alpha sum_k (gap_k - target) with alpha' = exp(log alpha')
    before the step. Catches a flipped sign, the multiplier's loss not depending on it, the target
    ignored, and (without --cql-lagrange) a multiplier that moves anyway."""
    torch.manual_seed(0)
    args = Args(hidden=16, cql_lagrange=lagrange, cql_target_action_gap=target, cql_alpha=5.0, critic_lr=1e-3)
    with one_thread():
        learner = CalQL(3, 2, args, CPU)
        b = random_batch(32, 3, 2)
        trace = [learner.log_alpha_prime.item()]
        for _ in range(4):
            m = learner.update(b)
            if lagrange:
                assert m["values/alpha_prime"].item() == pytest.approx(math.exp(trace[-1]), rel=1e-6)
                expected_cql = math.exp(trace[-1]) * 5.0 * (2 * m["values/cql_gap"].item() - 2 * target)
            else:
                assert m["values/alpha_prime"].item() == 1.0
                expected_cql = 5.0 * 2 * m["values/cql_gap"].item()
            assert m["losses/cql"].item() == pytest.approx(expected_cql, rel=1e-5)
            trace.append(learner.log_alpha_prime.item())
    steps = np.diff(trace)
    if not lagrange:
        assert trace == [1.0] * 5
    elif target < 0:  # gap (O(1)) >> -1000
        assert steps[0] == pytest.approx(1e-3, rel=1e-3) and np.all(steps > 0)
    else:
        assert steps[0] == pytest.approx(-1e-3, rel=1e-3) and np.all(steps < 0)


def test_lagrange_multiplier_starts_at_e():
    """log alpha' starts at 1.0 (alpha' = e), as in Cal-QL and CORL, and the first update's CQL
    weight is e cql_alpha. Catches the start at log alpha' = 0 (alpha' = 1: a CQL weight 2.7x weaker)."""
    torch.manual_seed(0)
    with one_thread():
        learner = CalQL(3, 2, Args(hidden=16, cql_lagrange=True, cql_alpha=5.0), CPU)
        assert learner.log_alpha_prime.item() == 1.0
        m = learner.update(random_batch(32, 3, 2))
    assert m["values/alpha_prime"].item() == pytest.approx(math.e, rel=1e-6)
    assert m["losses/cql"].item() == pytest.approx(math.e * 5.0 * (2 * m["values/cql_gap"].item() - 2 * 0.8), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Tanh-Gaussian actor
# ---------------------------------------------------------------------------------------------
def set_constant_head(actor: TanhGaussianActor, mu, log_std):
    """Make the actor state-independent: last layer weights 0, bias (mu, log_std)."""
    last = [m for m in actor.net if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(list(mu) + list(log_std), dtype=last.bias.dtype))


def tanh_gaussian_logpdf(a, mu, sigma):
    """log density of a = tanh(u), u ~ N(mu, sigma^2) per dim, summed: change of variables by hand."""
    u = np.arctanh(a)
    return np.sum(-0.5 * ((u - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * math.log(2 * math.pi) - np.log(1 - a ** 2), -1)


def test_actor_log_prob_closed_form_mode_and_log_std_clamp():
    """log_prob against the change-of-variables formula in numpy; mode = tanh(mu); log_std above 2
    is clamped to 2 (sigma = e^2, not e^3). Catches a Jacobian with the wrong sign or form, a
    missing sum over action dims, a mode that is mu (no tanh), a missing clamp."""
    torch.manual_seed(0)
    actor = TanhGaussianActor(3, 2, 16).double()
    mu, log_std = [0.3, -0.5], [-0.5, 3.0]
    set_constant_head(actor, mu, log_std)
    s = torch.randn(50, 3, dtype=torch.float64)
    a = torch.rand(50, 2, dtype=torch.float64) * 1.9 - 0.95
    sigma = np.exp(np.clip(log_std, -20, 2))
    with torch.no_grad():
        np.testing.assert_allclose(actor.log_prob(s, a).numpy(), tanh_gaussian_logpdf(a.numpy(), np.array(mu), sigma),
                                   rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(actor.mode(s).numpy(), np.tile(np.tanh(mu), (50, 1)), rtol=1e-12)


def test_actor_rsample_logp_equals_log_prob_of_its_action():
    """The logp rsample returns is the density of the action it returns (a general actor with random
    weights, away from saturation), in float64 tightly and float32 to 1e-3."""
    torch.manual_seed(1)
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-3)):
        actor = TanhGaussianActor(4, 3, 32).to(dtype)
        with torch.no_grad():
            for p in actor.parameters():  # larger weights than the 1e-2 init of the head: varied mu, sigma
                p.add_(0.3 * torch.randn_like(p))
            s = torch.randn(200, 4, dtype=dtype)
            a, logp = actor.rsample(s)
            keep = (a.abs() < 0.99).all(-1)
            assert keep.sum() > 50
            np.testing.assert_allclose(actor.log_prob(s[keep], a[keep]).numpy(), logp[keep].numpy(), rtol=tol, atol=tol)


def test_actor_density_integrates_to_one():
    """da = 1: the density exp(log_prob) over (-1, 1) integrates to 1 (trapezoid on a fine grid),
    and its mean equals E[tanh(u)] computed in u-space. Catches any error of the tanh Jacobian."""
    actor = TanhGaussianActor(2, 1, 8).double()
    mu, log_std = 0.4, -0.3
    set_constant_head(actor, [mu], [log_std])
    a = np.linspace(-1 + 1e-7, 1 - 1e-7, 400_001)
    s = torch.zeros(len(a), 2, dtype=torch.float64)
    with torch.no_grad():
        p = actor.log_prob(s, torch.as_tensor(a[:, None])).exp().numpy()
    assert np.trapezoid(p, a) == pytest.approx(1.0, abs=1e-5)
    u = np.linspace(mu - 12, mu + 12, 200_001)
    phi = np.exp(-0.5 * ((u - mu) / math.exp(log_std)) ** 2) / (math.exp(log_std) * math.sqrt(2 * math.pi))
    assert np.trapezoid(p * a, a) == pytest.approx(np.trapezoid(phi * np.tanh(u), u), abs=1e-5)


def test_actor_logp_is_finite_when_tanh_saturates():
    """mu = 12, sigma = e^-5: tanh(u) rounds to 1 in float32, so log(1 - a^2) would be -inf (or,
    with an epsilon, off by ~9 nats). The stable form gives log N(u) + 2u - 2 log 2 + O(e^-24) with
    u = 12 + sigma z: between its maximum (z = 0, up to the 2 sigma z term) and z = +-4."""
    torch.manual_seed(2)
    actor = TanhGaussianActor(2, 1, 8)
    set_constant_head(actor, [12.0], [-5.0])
    with torch.no_grad():
        a, logp = actor.rsample(torch.zeros(1000, 2))
    assert torch.all(a == 1.0)  # saturated in float32
    peak = 5.0 - 0.5 * math.log(2 * math.pi) + 2 * 12.0 - 2 * math.log(2)
    sig = math.exp(-5.0)
    assert torch.isfinite(logp).all()
    assert logp.max().item() <= peak + 2 * sig * 4 + 1e-3
    assert logp.min().item() >= peak - 0.5 * 16 - 2 * sig * 4 - 1e-3
    assert logp.mean().item() == pytest.approx(peak - 0.5, abs=0.1)  # E[z^2 / 2] = 1/2


# ---------------------------------------------------------------------------------------------
# Bellman target: min over the twins, max over sampled next actions
# ---------------------------------------------------------------------------------------------
class ActionQ(nn.Module):
    """Target twin Q: q1 = a_0, q2 = a_0 + 0.5, whatever the state (min over twins = a_0)."""

    def forward(self, s, a):
        return a[:, 0], a[:, 0] + 0.5


class RecordingF:
    """torch.nn.functional with mse_loss recording its target."""

    def __init__(self):
        self.targets = []

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def mse_loss(self, input, target, *args, **kwargs):
        self.targets.append(target.detach().clone())
        return torch.nn.functional.mse_loss(input, target, *args, **kwargs)


def mean_tanh_of_max(n, mu, sigma=1.0):
    """E[tanh(max of n iid N(mu, sigma^2))] and its variance by quadrature: the max has density
    n phi(x) Phi(x)^(n-1)."""
    x = np.linspace(mu - 12 * sigma, mu + 12 * sigma, 200_001)
    z = (x - mu) / sigma
    phi = np.exp(-0.5 * z ** 2) / (sigma * math.sqrt(2 * math.pi))
    Phi = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    dens = n * phi * Phi ** (n - 1)
    m = np.trapezoid(dens * np.tanh(x), x)
    return m, np.trapezoid(dens * np.tanh(x) ** 2, x) - m ** 2


@pytest.mark.parametrize("max_backup", [True, False], ids=["max_backup", "single_sample"])
def test_bellman_target_min_twin_max_over_sampled_next_actions(max_backup, monkeypatch):
    """Policy pi(.|s) = tanh N(s_0, 1) (actor frozen: actor_lr = 0), target Q = min(a_0, a_0 + 0.5)
    = a_0. States have s_0 = -1, next states s'_0 = +1. The target is r + gamma (1 - done) next_q;
    next_q per row is the max over cql_n_actions draws at s' with --cql-max-target-backup, one
    draw otherwise: its mean over rows must match E[tanh(max of n N(1, 1))] (n = 10 or 1) by
    quadrature. Catches no max (or a max over too few draws), next actions drawn at s instead of s',
    max over the twins instead of min (next_q would exceed 1), and bootstrapping through terminals."""
    B, n, gamma = 4000, 10, 0.9
    torch.manual_seed(0)
    args = Args(hidden=8, cql_max_target_backup=max_backup, cql_n_actions=n, gamma=gamma, actor_lr=0.0)
    rec = RecordingF()
    with one_thread():
        learner = CalQL(2, 1, args, CPU)
        head = nn.Linear(2, 2)
        with torch.no_grad():
            head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # mu = s_0, log_std = 0
            head.bias.zero_()
        learner.actor.net = nn.Sequential(head)
        learner.q_target.forward = ActionQ().forward  # its parameters stay (the soft update needs them)
        b = random_batch(B, 2, 1, seed=5)
        b["obs"][:, 0], b["next_obs"][:, 0] = -1.0, 1.0
        monkeypatch.setattr(edis_calql, "F", rec)
        learner.update(b)
    assert len(rec.targets) == 2 and torch.equal(rec.targets[0], rec.targets[1])
    target, r, done = rec.targets[0], b["rewards"], b["terminals"].bool()
    assert torch.equal(target[done], r[done])
    next_q = ((target[~done] - r[~done]) / gamma).double().numpy()
    assert next_q.max() <= 1.0 + 1e-5 and next_q.min() >= -1.0 - 1e-5
    mean, var = mean_tanh_of_max(n if max_backup else 1, mu=1.0)
    assert next_q.mean() == pytest.approx(mean, abs=5 * math.sqrt(var / len(next_q)))
    other, _ = mean_tanh_of_max(1 if max_backup else n, mu=1.0)
    assert abs(other - mean) > 20 * math.sqrt(var / len(next_q))  # the two cases are told apart


@pytest.mark.parametrize("lagrange", [True, False], ids=["lagrange", "fixed_alpha"])
def test_every_loss_uses_the_actor_before_its_step(lagrange, monkeypatch):
    """Cal-QL and CORL compute every loss at the parameters of the update's start: the actor's own
    sample, the critic's next-state actions and both sets of CQL policy actions all come from the
    actor as it was before its step. An actor learning rate of 100 makes its step drastic (Adam's
    first step moves each weight by ~100), so the two orders differ grossly. Checked two ways: the
    actor's weights at each of its 4 sampling calls, and the Bellman target the critic used
    (recorded from mse_loss) against the one replayed, same seed, with a copy of the learner taken
    before the update. Catches the actor (or the temperature) stepped before the critic's samples."""
    torch.manual_seed(0)
    n, gamma = 4, 0.9
    args = Args(hidden=16, actor_lr=100.0, cql_n_actions=n, cql_max_target_backup=True, gamma=gamma,
                cql_lagrange=lagrange)
    rec, seen = RecordingF(), []
    flat = lambda m: nn.utils.parameters_to_vector(m.parameters()).detach().clone()  # noqa: E731
    with one_thread():
        learner = CalQL(3, 2, args, CPU)
        before = copy.deepcopy(learner)
        b = random_batch(64, 3, 2, seed=4)

        def recording_rsample(s):
            seen.append(flat(learner.actor))
            return TanhGaussianActor.rsample(learner.actor, s)

        learner.actor.rsample = recording_rsample
        monkeypatch.setattr(edis_calql, "F", rec)
        torch.manual_seed(7)
        learner.update(b)

        def replayed_target(lrn):  # the update's random draws, in its order: actor loss, then target
            torch.manual_seed(7)
            with torch.no_grad():
                TanhGaussianActor.rsample(lrn.actor, b["obs"])
                s2 = b["next_obs"].repeat_interleave(n, 0)
                a2, _ = TanhGaussianActor.rsample(lrn.actor, s2)
                next_q = torch.min(*before.q_target(s2, a2)).reshape(-1, n).max(1).values
            return b["rewards"] + gamma * (1 - b["terminals"]) * next_q

        expected, after_step = replayed_target(before), replayed_target(learner)
    start = flat(before.actor)
    assert (flat(learner.actor) - start).abs().max() > 10  # the actor did change drastically
    assert len(seen) == 4 and all(torch.equal(w, start) for w in seen)
    assert len(rec.targets) == 2
    torch.testing.assert_close(rec.targets[0], expected, rtol=0, atol=1e-6)
    assert (after_step - expected).abs().max() > 0.1  # the post-step actor would give another target


# ---------------------------------------------------------------------------------------------
# Presets (docs/design.md §8 table, typed in from it)
# ---------------------------------------------------------------------------------------------
# dataset -> (Cal-QL generated_ratio, cql_alpha offline, cql_alpha online, Q hidden layers)
SPEC_TABLE = {
    "antmaze-umaze-v2": (0.5, 5, 5, 5), "antmaze-umaze-diverse-v2": (0.5, 5, 5, 5),
    "antmaze-medium-play-v2": (0.3, 5, 5, 5), "antmaze-medium-diverse-v2": (0.3, 5, 5, 5),
    "antmaze-large-play-v2": (0.5, 5, 5, 5), "antmaze-large-diverse-v2": (0.5, 5, 5, 5),
    "pen-human-v1": (0.3, 5, 5, 3), "door-human-v1": (0.5, 1, 1, 3), "relocate-human-v1": (0.2, 1, 2.5, 3),
    "halfcheetah-random-v2": (0.2, 10, 10, 2), "halfcheetah-medium-v2": (0.2, 10, 10, 2),
    "halfcheetah-medium-replay-v2": (0.2, 10, 10, 2), "halfcheetah-medium-expert-v2": (0.5, 10, 10, 2),
    "hopper-random-v2": (0.2, 10, 1, 2), "hopper-medium-v2": (0.2, 10, 0.1, 2),
    "hopper-medium-replay-v2": (0.5, 10, 10, 2), "hopper-medium-expert-v2": (0.5, 10, 10, 2),
    "walker2d-random-v2": (0.1, 10, 0, 2), "walker2d-medium-v2": (0.2, 10, 0, 2),
    "walker2d-medium-replay-v2": (0.2, 10, 10, 2), "walker2d-medium-expert-v2": (0.2, 10, 10, 2),
}


def parsed(*argv) -> Args:
    return common.parse_args(Args, edis_calql.preset_defaults, "", list(argv))


@pytest.mark.parametrize("env", list(SPEC_TABLE))
def test_preset_matches_spec_table(env):
    ratio, alpha, alpha_online, layers = SPEC_TABLE[env]
    d = edis_calql.preset_defaults(env, None, "paper")
    assert (d["generated_ratio"], d["cql_alpha"], d["cql_alpha_online"], d["q_hidden_layers"]) == \
        (ratio, alpha, alpha_online, layers)


@pytest.mark.parametrize("env", ["pen-human-v1", "door-human-v1", "relocate-human-v1", "pen-cloned-v1"])
def test_adroit_presets_use_max_target_backup_and_clip(env):
    """The public EDIS Cal-QL configs for pen, door and relocate (and CORL's Adroit configs) set the
    max-target backup and clip the CQL difference below at -200; states stay raw. Checked on the
    parsed configuration (what main runs with). Catches Adroit left at the locomotion defaults
    (single-sample backup, no clip)."""
    c = parsed("--env", env)
    assert (c.cql_max_target_backup, c.cql_clip_diff_min, c.normalize_states) == (True, -200.0, False)


def test_preset_family_settings():
    """docs/design.md §8: antmaze uses Lagrange with target gap 0.8, max-target backup, the CQL difference
    clipped at -200, raw states, 100 evaluation episodes; relocate has no Lagrange; adroit raw states; locomotion normalized
    states. Checked on the parsed configuration (what main runs with), plus a flag overriding a preset."""
    ant = parsed("--env", "antmaze-large-diverse-v2")
    assert (ant.cql_lagrange, ant.cql_target_action_gap, ant.cql_max_target_backup, ant.cql_clip_diff_min,
            ant.normalize_states, ant.generated_ratio, ant.q_hidden_layers, ant.cql_alpha, ant.eval_episodes) == \
        (True, 0.8, True, -200.0, False, 0.5, 5, 5, 100)
    rel = parsed("--env", "relocate-human-v1")
    assert (rel.cql_lagrange, rel.cql_alpha, rel.cql_alpha_online, rel.normalize_states) == (False, 1, 2.5, False)
    hop = parsed("--env", "hopper-medium-v2")
    assert (hop.generated_ratio, hop.cql_alpha, hop.cql_alpha_online, hop.q_hidden_layers, hop.normalize_states,
            hop.cql_max_target_backup, hop.cql_clip_diff_min) == (0.2, 10, 0.1, 2, True, False, -math.inf)
    over = parsed("--env", "antmaze-large-diverse-v2", "--cql-alpha", "3", "--q-hidden-layers", "2")
    assert (over.cql_alpha, over.q_hidden_layers, over.cql_lagrange, over.cql_clip_diff_min) == (3, 2, True, -200.0)
    # q_hidden_layers is the number of hidden layers of each Q network
    q = edis_calql.TwinQ(3, 2, 8, 5)
    assert sum(isinstance(m, nn.Linear) for m in q.q1) == 6


# ---------------------------------------------------------------------------------------------
# main(): MC returns of the offline data and of finished online episodes
# ---------------------------------------------------------------------------------------------
def test_main_writes_mc_returns_of_finished_episodes(tmp_path, monkeypatch):
    """A short --no-edis run on random Hopper data. Offline: the buffer's mc_return is the return-
    to-go of the transformed rewards within each dataset episode. Online (from the checkpoint):
    each finished episode's rows hold the return-to-go of their stored rewards; rows of the
    episode still running at the end hold -inf. Episodes are delimited by the observation chain
    (next_obs of a row != obs of the next row), independently of the terminal flags. Catches
    returns of raw instead of transformed rewards, returns never written (all -inf), written to
    the wrong rows, or across episode boundaries."""
    captured = {}  # (conftest gives each test an empty Minari directory and no network)
    offline_buffer = common.offline_buffer

    def capture(data, obs_norm, r_scale, r_bias, device, **extra):
        captured.update(data=data, r_scale=r_scale, r_bias=r_bias, mc=extra["mc_return"])
        return offline_buffer(data, obs_norm, r_scale, r_bias, device, **extra)

    monkeypatch.setattr(common, "offline_buffer", capture)
    run_dir = tmp_path / "run"
    gamma, online_steps = 0.97, 150
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with one_thread():
            edis_calql.main(["--env", "Hopper-v4", "--dataset", "random:300", "--device", "cpu", "--no-edis",
                             "--offline-steps", "5", "--online-steps", str(online_steps), "--hidden", "16",
                             "--batch-size", "16", "--cql-n-actions", "2", "--gamma", str(gamma),
                             "--eval-every", str(online_steps), "--eval-episodes", "1", "--run-dir", str(run_dir)])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)

    # offline
    data = captured["data"]
    assert captured["r_scale"] != 1.0  # locomotion: rewards are rescaled, so raw-reward returns would differ
    r = data.rewards.astype(np.float64) * captured["r_scale"] + captured["r_bias"]
    ends = np.flatnonzero(data.episode_ends)
    assert len(ends) >= 2 and ends[-1] == len(r) - 1
    starts = np.concatenate([[0], ends[:-1] + 1])
    expected = np.concatenate([return_to_go(r[a:e + 1], gamma) for a, e in zip(starts, ends)])
    np.testing.assert_allclose(captured["mc"], expected, rtol=1e-4, atol=1e-4)

    # online
    buf = torch.load(run_dir / "checkpoint.pt", weights_only=False)["online"]["data"]
    obs, nxt, rew = buf["obs"].numpy(), buf["next_obs"].numpy(), buf["rewards"].numpy().astype(np.float64)
    mc, term = buf["mc_return"].numpy(), buf["terminals"].numpy()
    assert len(rew) == online_steps
    boundary = np.flatnonzero(np.any(nxt[:-1] != obs[1:], axis=1))  # episode ends after these rows
    assert set(np.flatnonzero(term[:-1] == 1)) <= set(boundary)
    assert len(boundary) >= 2, "too few finished episodes to test"
    starts = np.concatenate([[0], boundary + 1])
    for a, e in zip(starts, boundary):
        np.testing.assert_allclose(mc[a:e + 1], return_to_go(rew[a:e + 1], gamma), rtol=1e-4, atol=1e-4)
    tail = slice(boundary[-1] + 1, None)
    if term[-1] == 1:  # the run ended exactly on a terminal: that episode finished too
        np.testing.assert_allclose(mc[tail], return_to_go(rew[tail], gamma), rtol=1e-4, atol=1e-4)
    else:
        assert len(mc[tail]) > 0 and np.all(mc[tail] == -np.inf)
