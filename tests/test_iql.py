"""Tests of the IQL learner of edis_iql.py against values computed by hand.

Every expected number here is derived analytically (or by an independent numpy solver) from the
data the test builds: expectiles by bisection, Q/V by the Bellman equation of a deterministic
chain, the AWR policy mean as the advantage-weighted mean of the data's actions."""
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import one_thread  # noqa: E402

import edis_iql  # noqa: E402
from edis_iql import IQL, Args, expectile_loss  # noqa: E402


def expectile_bisection(x: np.ndarray, tau: float, w: np.ndarray | None = None) -> float:
    """Root of tau E[(x - c)+] = (1 - tau) E[(c - x)+] (decreasing in c), by bisection in float64."""
    w = np.ones_like(x) / len(x) if w is None else w / w.sum()

    def g(c):
        return tau * np.sum(w * np.maximum(x - c, 0)) - (1 - tau) * np.sum(w * np.maximum(c - x, 0))

    lo, hi = float(x.min()), float(x.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def as_batch(obs, actions, rewards, next_obs, terminals) -> dict:
    f = lambda x: torch.as_tensor(np.asarray(x, np.float32))  # noqa: E731
    return {"obs": f(obs).reshape(len(rewards), -1), "actions": f(actions).reshape(len(rewards), -1),
            "rewards": f(rewards), "next_obs": f(next_obs).reshape(len(rewards), -1), "terminals": f(terminals)}


# ---------------------------------------------------------------------------------------------
# Expectile regression
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_expectile_loss_minimiser_is_the_expectile(tau):
    """Catches swapped asymmetric weights (which give the (1 - tau)-expectile) and a quantile-style
    (absolute instead of squared) loss: the loss's minimiser over a constant must be the
    tau-expectile of the sample, solved independently by bisection; at tau = 0.5, the mean."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.exponential(1.0, 300), rng.normal(-1.0, 0.3, 100)])  # skewed
    expected = expectile_bisection(x, tau)
    if tau == 0.5:
        assert expected == pytest.approx(x.mean(), abs=1e-9)

    xt = torch.as_tensor(x, dtype=torch.float64)
    c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([c], lr=0.05)
    for i in range(1500):
        if i == 1000:
            opt.param_groups[0]["lr"] = 0.002
        loss = expectile_loss(xt - c, tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert c.item() == pytest.approx(expected, abs=2e-3)
    # and it is a minimum: moving c either way increases the loss
    with torch.no_grad():
        at = expectile_loss(xt - expected, tau)
        assert expectile_loss(xt - expected - 0.05, tau) > at and expectile_loss(xt - expected + 0.05, tau) > at
    # the expectiles of a skewed sample are ordered and distinct from the mean beyond tau = 0.5
    if tau > 0.5:
        assert expected > x.mean() + 0.05


# ---------------------------------------------------------------------------------------------
# Q and V fit known values
# ---------------------------------------------------------------------------------------------
def test_iql_fits_discounted_values_of_a_chain():
    """Deterministic chain 0 -> 1 -> 2 -> 3 -> end on a 1-d continuous state, one action per state,
    known rewards. The last transition is terminal and its next_obs is state 0 (high value), so a
    learner that bootstraps through terminals gets Q(3) = r3 + gamma V(0) instead of r3.
    With one action per state, V(s) = Q(s) for any expectile. Catches wrong discounting, ignored
    terminals, V regressed on the wrong target, Q bootstrapped on the wrong state."""
    gamma = 0.9
    rewards = np.array([1.0, 0.0, 2.0, 1.0])
    q_true = np.zeros(4)
    for i in reversed(range(4)):
        q_true[i] = rewards[i] + (gamma * q_true[i + 1] if i < 3 else 0.0)
    states = np.array([-1.5, -0.5, 0.5, 1.5])
    actions = np.array([0.3, -0.2, 0.6, -0.5])  # one per state
    nxt = np.array([states[1], states[2], states[3], states[0]])
    batch = as_batch(states, actions, rewards, nxt, [0.0, 0.0, 0.0, 1.0])
    batch = {k: v.repeat(8, *([1] * (v.dim() - 1))) for k, v in batch.items()}  # 32 rows

    torch.manual_seed(0)
    args = Args(hidden=64, lr=1e-3, gamma=gamma, tau=0.05, expectile=0.7, beta=3.0)
    n = 800  # converges to ~1e-4 within ~500 updates
    with one_thread():
        learner = IQL(1, 1, args, torch.device("cpu"), n)
        for _ in range(n):
            learner.update(batch)
        with torch.no_grad():
            q1, q2 = learner.q(batch["obs"][:4], batch["actions"][:4])
            v = learner.v(batch["obs"][:4]).squeeze(-1)
    np.testing.assert_allclose(q1.numpy(), q_true, atol=0.03)
    np.testing.assert_allclose(q2.numpy(), q_true, atol=0.03)
    np.testing.assert_allclose(v.numpy(), q_true, atol=0.03)


def awr_mean(actions, rewards, expectile, beta):
    """Fixed point of IQL on a 1-step MDP (every transition terminal): Q(s, a) = r, V(s) = the
    expectile of r over the data's actions (all equally frequent), and the Gaussian actor's mean =
    sum_i w_i a_i / sum_i w_i with w_i = min(exp(beta (r_i - V)), 100)."""
    r = np.asarray(rewards, np.float64)
    v = expectile_bisection(r, expectile)
    w = np.minimum(np.exp(beta * (r - v)), 100.0)
    return v, float(np.sum(w * actions) / np.sum(w))


@pytest.mark.parametrize("expectile,beta", [(0.7, 1.0), (0.5, 30.0)], ids=["beta1", "beta30_clipped"])
def test_iql_one_step_mdp_expectile_value_and_awr_actor(expectile, beta):
    """Two states (s = -1, +1) of a 1-step MDP, three actions each with known rewards (mirrored
    between the states). Checks Q = r per (s, a), V = expectile of r (0.7: not the mean, so a V
    regressed with swapped weights or on v - q fails) and the actor mean = the advantage-weighted
    mean of the actions (beta = 1: the higher-reward action pulls the mean its way by a known amount;
    beta = 30: weights clip at 100, so the two positive-advantage actions weigh equally, unclipped
    they would not). Catches a flipped advantage sign, a missing/misplaced clip, beta ignored."""
    acts = np.array([-0.6, 0.0, 0.6])
    r_a = np.array([0.0, 0.9, 1.0])  # state -1; state +1 gets the mirror image (r of -a)
    obs = np.repeat([-1.0, 1.0], 3)
    actions = np.tile(acts, 2)
    rewards = np.concatenate([r_a, r_a[::-1]])
    batch = as_batch(obs, actions, rewards, obs, np.ones(6))
    batch = {k: v.repeat(6, *([1] * (v.dim() - 1))) for k, v in batch.items()}  # 36 rows, balanced

    v_true, mean_lo = awr_mean(acts, r_a, expectile, beta)
    _, mean_hi = awr_mean(acts, r_a[::-1], expectile, beta)
    assert mean_hi == pytest.approx(-mean_lo)
    if beta == 30.0:  # the clip matters for this case: without it the mean would be near 0.6
        w = np.exp(beta * (r_a - v_true))
        assert abs(float(np.sum(w * acts) / np.sum(w)) - mean_lo) > 0.2

    torch.manual_seed(1)
    args = Args(hidden=64, lr=1e-3, gamma=0.99, tau=0.05, expectile=expectile, beta=beta)
    n = 700  # converges to ~1e-4 within ~500 updates
    with one_thread():
        learner = IQL(1, 1, args, torch.device("cpu"), n)
        s = torch.tensor([[-1.0], [1.0]])
        mode0 = learner.actor.mode(s).detach().squeeze(-1).numpy()
        for _ in range(n):
            learner.update(batch)
        with torch.no_grad():
            q = torch.min(*learner.q(batch["obs"][:6], batch["actions"][:6]))
            v = learner.v(s).squeeze(-1)
            mode = learner.actor.mode(s).squeeze(-1).numpy()
    np.testing.assert_allclose(q.numpy(), rewards, atol=0.02)
    np.testing.assert_allclose(v.numpy(), [v_true, v_true], atol=0.02)
    np.testing.assert_allclose(mode, [mean_lo, mean_hi], atol=0.02)
    # the actor moved from its initial mean toward the higher-advantage action in each state
    assert mode[0] - mode0[0] > 0.1 and mode[1] - mode0[1] < -0.1


# ---------------------------------------------------------------------------------------------
# Actor learning-rate schedule
# ---------------------------------------------------------------------------------------------
def lr_trace(learner, n) -> list[float]:
    batch = as_batch(np.zeros(4), np.zeros(4), np.zeros(4), np.zeros(4), np.ones(4))
    out = []
    for _ in range(n):
        learner.update(batch)
        out.append(learner.actor_opt.param_groups[0]["lr"])
    return out


def assert_single_decay(lrs, lr0):
    """Monotone non-increasing, positive until the last update, at the minimum (0) after it."""
    lrs = np.asarray(lrs)
    assert np.all(np.diff(lrs) <= 1e-15), f"LR increases at update {int(np.argmax(np.diff(lrs) > 1e-15)) + 1}"
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12), "LR does not reach its minimum at the last update"
    assert np.all(lrs[:-1] > 1e-12), "LR reaches its minimum before the last update"
    assert lrs[0] < lr0 and lrs[0] > 0.9 * lr0


def test_actor_lr_schedule_spans_all_updates():
    """IQL given total_updates: the actor LR decays once over exactly that many updates."""
    args = Args(hidden=8, lr=1e-3)
    with one_thread():
        learner = IQL(1, 1, args, torch.device("cpu"), 60)
        assert_single_decay(lr_trace(learner, 60), 1e-3)


def test_main_actor_lr_does_not_restart_online(tmp_path, monkeypatch):
    """main() with offline_steps + online_steps * utd updates: the LR seen by every update, across the
    offline -> online boundary, never rises, and reaches its minimum exactly at the last update.
    Catches a schedule sized to the offline phase only (it would hit 0 and restart), a new
    schedule/learner online, and a total that forgets --utd."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline, online, utd = 30, 20, 2
    seen = []
    update = IQL.update

    def recording_update(self, b):
        out = update(self, b)
        seen.append(self.actor_opt.param_groups[0]["lr"])
        return out

    monkeypatch.setattr(IQL, "update", recording_update)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with one_thread():
            edis_iql.main(["--env", "Hopper-v4", "--dataset", "random:300", "--device", "cpu", "--no-edis",
                           "--offline-steps", str(offline), "--online-steps", str(online), "--utd", str(utd),
                           "--hidden", "16", "--batch-size", "8", "--eval-every", str(online),
                           "--eval-episodes", "1", "--lr", "1e-3", "--run-dir", str(tmp_path / "run")])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert len(seen) == offline + online * utd
    assert_single_decay(seen, 1e-3)
