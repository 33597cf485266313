"""Tests of common.py: data sources, transforms, evaluation, buffers, checkpoints, error reporting.

All data is made by the tests (no download can happen: see conftest.py), and expected values are
computed from what the tests wrote, from the environment itself, or by hand."""
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import common
from common import Normalizer, Transitions, UserError

HOPPER_REF = (-20.272305, 3234.3)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def minari_episode(e, T, terminated, truncated, obs_dim=11, act_dim=3):
    """Episode e of T steps: observation 100*e + t + 0.01*dim, reward 10*e + t."""
    obs = 100.0 * e + np.arange(T + 1)[:, None] + 0.01 * np.arange(obs_dim)[None, :]
    term, trunc = np.zeros(T, bool), np.zeros(T, bool)
    term[-1], trunc[-1] = terminated, truncated
    return {"observations": obs.astype(np.float32),
            "actions": np.tanh(np.arange(T * act_dim).reshape(T, act_dim) * 0.1 + e).astype(np.float32),
            "rewards": (10.0 * e + np.arange(T)).astype(np.float32),
            "terminations": term, "truncations": trunc}


def assert_no_bridging(data: Transitions):
    """Inside an episode each transition starts where the previous one ended."""
    inside = ~data.episode_ends[:-1]
    np.testing.assert_array_equal(data.next_observations[:-1][inside], data.observations[1:][inside])
    assert data.episode_ends[-1], "the last transition must close its episode"


def transitions(rewards, terminals, timeouts, obs_dim=2):
    n = len(rewards)
    obs = np.zeros((n, obs_dim), np.float32)
    return Transitions(obs, np.zeros((n, 1), np.float32), np.asarray(rewards, np.float32), obs.copy(),
                       np.asarray(terminals, bool), np.asarray(timeouts, bool))


# ---------------------------------------------------------------------------------------------
# Minari sources
# ---------------------------------------------------------------------------------------------
def test_minari_round_trip(make_minari_dataset):
    """Catches off-by-one obs/next_obs, transitions bridging episodes, truncation taken as a terminal,
    and the Minari reference scores being ignored."""
    episodes = [minari_episode(0, 4, terminated=True, truncated=False),
                minari_episode(1, 3, terminated=False, truncated=True),
                minari_episode(2, 5, terminated=True, truncated=True),  # both: it is a termination
                minari_episode(3, 2, terminated=True, truncated=False)]
    make_minari_dataset("test/hopper/known-v0", episodes, "Hopper-v4", ref_min_score=-5.0, ref_max_score=95.0)

    task = common.load_task("Hopper-v4", "test/hopper/known-v0")
    d = task.data

    cat = np.concatenate
    np.testing.assert_array_equal(d.observations, cat([ep["observations"][:-1] for ep in episodes]))
    np.testing.assert_array_equal(d.next_observations, cat([ep["observations"][1:] for ep in episodes]))
    np.testing.assert_array_equal(d.actions, cat([ep["actions"] for ep in episodes]))
    np.testing.assert_array_equal(d.rewards, cat([ep["rewards"] for ep in episodes]))
    ends = np.cumsum([len(ep["rewards"]) for ep in episodes]) - 1
    expected_term, expected_tout = np.zeros(len(d), bool), np.zeros(len(d), bool)
    expected_term[ends[[0, 2, 3]]] = True
    expected_tout[ends[1]] = True
    np.testing.assert_array_equal(d.terminals, expected_term)
    np.testing.assert_array_equal(d.timeouts, expected_tout)
    assert_no_bridging(d)
    assert task.ref == (-5.0, 95.0)
    assert task.source.kind == "minari" and task.source.family == "locomotion"
    assert task.env_fn().spec.id == "Hopper-v4"


def test_dict_observation_dataset_is_flattened_like_the_env():
    """Catches a dict flattening order other than achieved_goal ++ observation ++ desired_goal, and a
    dataset layout that differs from what the online env (FlatNormalizedObs) produces."""
    task = common.load_task("AntMaze_UMaze-v4", "random:300")
    d = task.data
    assert len(d) == 300 and d.observations.shape == (300, 31) and d.actions.shape == (300, 8)
    assert_no_bridging(d)

    env = task.env_fn()
    raw, _ = env.reset(seed=0)  # random:N starts its first episode from seed 0
    assert set(raw) == {"achieved_goal", "observation", "desired_goal"}
    expected = np.concatenate([raw["achieved_goal"], raw["observation"], raw["desired_goal"]])
    np.testing.assert_allclose(common.flatten_obs(raw), expected)
    np.testing.assert_allclose(d.observations[0], expected, atol=1e-6)
    # Stacked dict observations flatten row by row the same way.
    stacked = {k: np.stack([v, v + 1]) for k, v in raw.items()}
    np.testing.assert_allclose(common.flatten_obs(stacked)[1], common.flatten_obs({k: v + 1 for k, v in raw.items()}))

    norm = Normalizer.fit(d.observations)
    wrapped = common.make_env(task.env_fn, norm, seed=0)
    assert wrapped.observation_space.shape == (d.observations.shape[1],)
    obs, _ = wrapped.reset(seed=0)
    assert obs.shape == (31,) and obs.dtype == np.float32
    np.testing.assert_allclose(obs, norm(d.observations[0]), rtol=1e-5, atol=1e-4)


def test_random_dataset_matches_env_dynamics():
    """Catches random:N collecting the wrong count, misaligned obs/action/next_obs/reward, wrong
    terminal flags, or episodes not closed by a flag."""
    task = common.load_task("Hopper-v4", "random:150")
    d = task.data
    assert len(d) == 150
    assert task.ref == HOPPER_REF
    assert_no_bridging(d)
    assert d.timeouts[-1] != d.terminals[-1]  # the cut at N closes the last episode, one way only
    assert not (d.terminals & d.timeouts).any()

    # Replay every transition from its own state: Hopper's observation is qpos[1:] ++ qvel (x is
    # irrelevant to the dynamics), so one env step must reproduce next_obs, reward and termination.
    env = gym.make("Hopper-v4").unwrapped
    env.reset(seed=0)
    checked = 0
    for i in range(len(d)):
        o = d.observations[i].astype(np.float64)
        if np.abs(o[5:]).max() >= 10:  # velocities are clipped to +-10 in the observation
            continue
        env.set_state(np.r_[0.0, o[:5]], o[5:])
        nxt, r, term, _, _ = env.step(d.actions[i])
        np.testing.assert_allclose(nxt, d.next_observations[i], atol=1e-4)
        assert r == pytest.approx(d.rewards[i], abs=1e-4)
        assert term == d.terminals[i]
        checked += 1
    assert checked > 100
    assert d.terminals.sum() >= 1  # random Hopper falls over: the flag path is exercised


def test_random_dataset_is_cached(monkeypatch):
    """Catches random:N collecting again on every run (it must be written once and reused)."""
    first = common.load_task("Hopper-v4", "random:120")
    with monkeypatch.context() as m:
        def no_collection(*a, **k):
            raise AssertionError("collected again")
        import minari
        m.setattr(gym, "make", no_collection)
        m.setattr(minari, "create_dataset_from_buffers", no_collection)
        assert common.collect_random("Hopper-v4", 120) == first.source.location
    second = common.load_task("Hopper-v4", "random:120")
    assert second.source.location == first.source.location
    for f in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        np.testing.assert_array_equal(getattr(second.data, f), getattr(first.data, f))


def test_pointmaze_explore_data_is_a_maze_task_and_moves_farther_than_random():
    """Catches PointMaze not being a maze family (picture, r-1, presets), x, y not leading its flat
    observation, and explore:N not being the momentum walk (persistent actions, a faster point)."""
    assert common.family_of("PointMaze_Medium_Diverse_GR-v3") in common.MAZE_FAMILIES
    assert common.reward_scale_bias("pointmaze", None) == (1.0, -1.0)
    speed, lag1 = {}, {}
    for kind in ("random", "explore"):
        task = common.load_task("PointMaze_UMaze-v3", f"{kind}:1500")
        d = task.data
        assert task.source.family == "pointmaze" and task.source.location == f"edis/pointmaze_umaze_v3/{kind}-1500-v0"
        assert len(d) == 1500 and d.observations.shape == (1500, 8) and task.ref is None
        assert_no_bridging(d)
        raw, _ = task.env_fn().reset(seed=0)
        np.testing.assert_allclose(d.observations[0], common.flatten_obs(raw), atol=1e-6)
        # achieved_goal (x, y) leads, and it is the point's position: observation = (x, y, vx, vy)
        np.testing.assert_allclose(d.observations[:, :2], d.observations[:, 2:4], atol=1e-6)
        assert d.actions.min() >= -1 and d.actions.max() <= 1
        speed[kind] = np.linalg.norm(d.observations[:, 4:6], axis=1).mean()
        lag1[kind] = np.corrcoef(d.actions[:-1, 0], d.actions[1:, 0])[0, 1]
    assert lag1["random"] < 0.2 and lag1["explore"] > 0.8
    assert speed["explore"] > 1.5 * speed["random"]  # measured 2.4 vs 1.05


# ---------------------------------------------------------------------------------------------
# D4RL-layout HDF5 sources
# ---------------------------------------------------------------------------------------------
def test_hdf5_round_trip(tmp_path, write_hdf5, d4rl_arrays):
    """Catches arrays altered on load and flags that do not match the file."""
    arrays = d4rl_arrays([4, 3, 5], [True, False, True])
    path = write_hdf5(tmp_path / "data.hdf5", **arrays)
    task = common.load_task("Hopper-v4", str(path))
    for k, v in arrays.items():
        np.testing.assert_array_equal(getattr(task.data, k), v, err_msg=k)
    assert task.source.kind == "hdf5" and task.ref == HOPPER_REF
    assert_no_bridging(task.data)


def test_hdf5_unflagged_episode_boundary_becomes_timeout(tmp_path, write_hdf5, d4rl_arrays):
    """Catches a transition that bridges two episodes because the file forgot the timeout flag
    (and the final row left open): episode returns and n-step targets would run across episodes."""
    arrays = d4rl_arrays([4, 3, 5], [False, True, False])
    arrays["timeouts"][:] = False  # no timeout flags at all; terminal of episode 1 kept
    path = write_hdf5(tmp_path / "data.hdf5", **arrays)
    d = common.load_task("Hopper-v4", str(path)).data
    expected_tout = np.zeros(12, bool)
    expected_tout[[3, 11]] = True  # end of episode 0 and the last row; row 6 is a terminal
    np.testing.assert_array_equal(d.timeouts, expected_tout)
    np.testing.assert_array_equal(d.terminals, arrays["terminals"])
    np.testing.assert_allclose(common.episode_returns(d), [0 + 1 + 2 + 3, 10 + 11 + 12, 20 + 21 + 22 + 23 + 24])


def test_d4rl_locomotion_name_uses_cache_without_network(offline_dirs, write_hdf5, d4rl_arrays):
    """Catches a wrong cache file name for D4RL names, a download attempt despite the cached file,
    and a wrong reference score / env."""
    arrays = d4rl_arrays([6, 4], [True, False])
    write_hdf5(offline_dirs["d4rl"] / "hopper_medium-v2.hdf5", **arrays)
    task = common.load_task("hopper-medium-v2")
    np.testing.assert_array_equal(task.data.observations, arrays["observations"])
    assert task.ref == (-20.272305, 3234.3)
    assert task.source.name == "hopper-medium" and task.source.family == "locomotion"
    assert task.env_fn().spec.id == "Hopper-v4"


# ---------------------------------------------------------------------------------------------
# Transforms and scores
# ---------------------------------------------------------------------------------------------
def test_normalizer_round_trip_and_std_floor():
    """Catches a wrong mean/std, a broken inverse, and division by ~0 on constant features."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 5.0, size=(500, 4)).astype(np.float32)
    x[:, 3] = 7.0  # constant feature
    norm = Normalizer.fit(x)
    np.testing.assert_allclose(norm.mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.std[:3], x[:, :3].std(0), rtol=1e-5)
    assert norm.std[3] == pytest.approx(1e-3)
    z = norm(x)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, :3].mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, :3].std(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(z[:, 3], 0.0, atol=1e-3)
    np.testing.assert_allclose(norm.inverse(z), x, rtol=1e-5, atol=1e-4)
    ident = Normalizer.identity(4)
    np.testing.assert_array_equal(ident(x), x)


def test_episode_returns_split_on_terminals_and_timeouts():
    """Catches returns summed across an episode end of either kind."""
    d = transitions([1, 2, 3, 4, 5, 6, -1, -2],
                    terminals=[0, 0, 1, 0, 0, 0, 0, 0],
                    timeouts=[0, 0, 0, 0, 1, 1, 0, 1])
    np.testing.assert_allclose(common.episode_returns(d), [1 + 2 + 3, 4 + 5, 6, -1 - 2])


def test_reward_scale_bias():
    """Catches IQL's reward transform being wrong per family: antmaze r-1, locomotion
    1000/(max return - min return) over dataset episodes, identity otherwise."""
    rewards = [2.0, 3.0, 5.0,  10.0, 20.0,  -4.0, 1.0, 0.5]
    ends = [0, 0, 1, 0, 1, 0, 0, 1]
    d = transitions(rewards, terminals=ends, timeouts=np.zeros(8))
    returns = [2 + 3 + 5, 10 + 20, -4 + 1 + 0.5]
    scale, bias = common.reward_scale_bias("locomotion", d)
    assert scale == pytest.approx(1000.0 / (max(returns) - min(returns)))
    assert bias == 0.0
    assert common.reward_scale_bias("antmaze", d) == (1.0, -1.0)
    assert common.reward_scale_bias("adroit", d) == (1.0, 0.0)


def test_normalized_score():
    """Catches a wrong normalized-score formula (100 * (R - min) / (max - min))."""
    assert common.normalized_score(50.0, (0.0, 200.0)) == pytest.approx(25.0)
    assert common.normalized_score(-20.272305, HOPPER_REF) == pytest.approx(0.0)
    assert common.normalized_score(3234.3, HOPPER_REF) == pytest.approx(100.0)
    assert common.normalized_score(10.0, (10.0, 20.0)) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
class Countdown(gym.Env):
    """Observation = the reset seed; reward 1 per step; terminates after 2 + seed % 4 steps;
    info["success"] = 1 only on the first step, and only if the action is positive (an episode
    counts as a success if it succeeded at any step, not just the last one)."""
    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.s, self.t = seed, 0
        return np.array([seed], np.float32), {}

    def step(self, action):
        self.t += 1
        done = self.t >= 2 + self.s % 4
        return np.array([self.s], np.float32), 1.0, done, False, {"success": float(action[0] > 0 and self.t == 1)}


COUNTDOWN = "EdisTest/Countdown-v0"


def countdown():
    """The env, registered first where needed (evaluation workers start as fresh processes)."""
    if COUNTDOWN not in gym.registry:
        gym.register(COUNTDOWN, entry_point=Countdown, max_episode_steps=4)  # k=5 episodes are truncated
    return gym.make(COUNTDOWN)


def test_evaluator_returns_success_and_lockstep():
    """Catches wrong returns/success averaging, a truncation not ending an episode, observations not
    normalized for the policy, policy calls not batched over the live episodes, and start states
    that change between evaluations."""
    seeds = np.arange(10, 15)
    lengths = np.minimum(2 + seeds % 4, 4)       # TimeLimit of 4 truncates the k=5 episode
    succeeded = seeds % 2 == 0                    # the policy below acts positively on even seeds
    norm = Normalizer(np.array([3.0], np.float32), np.array([2.0], np.float32))
    calls = []

    def policy(x):
        s = x[:, 0] * 2.0 + 3.0                   # undo the normalization to read the seed back
        np.testing.assert_allclose(s, np.round(s), atol=1e-5)
        calls.append(np.round(s).astype(int).tolist())
        return np.where(np.round(s) % 2 == 0, 1.0, -1.0)[:, None].astype(np.float32)

    ev = common.Evaluator(countdown, norm, episodes=5, seed=10, ref=(0.0, 5.0))
    out = ev(policy)
    assert out["eval/return"] == pytest.approx(lengths.mean())
    assert out["eval/return_std"] == pytest.approx(lengths.std())
    assert out["eval/success"] == pytest.approx(succeeded.mean())
    assert out["eval/normalized_score"] == pytest.approx(100.0 * lengths.mean() / 5.0)
    expected_calls = [seeds[lengths >= t].tolist() for t in range(1, lengths.max() + 1)]
    assert calls == expected_calls

    calls.clear()
    assert ev(policy) == out
    assert calls == expected_calls


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_evaluation_equals_serial(workers):
    """Worker processes (AsyncVectorEnv) must give the serial evaluator's numbers: catches a worker
    reset with the wrong episode's seed, rewards or success added for an idle or finished worker, an
    episode run twice or skipped, and policy calls on rows that are not live episodes."""
    norm = Normalizer(np.array([3.0], np.float32), np.array([2.0], np.float32))
    seen = []

    def policy(x):
        s = np.round(x[:, 0] * 2.0 + 3.0)
        seen.extend(s.astype(int).tolist())
        return np.where(s % 2 == 0, 1.0, -1.0)[:, None].astype(np.float32)

    make = lambda w: common.Evaluator(countdown, norm, episodes=7, seed=10, ref=(0.0, 5.0), workers=w)
    serial, par = make(1), make(workers)
    want = serial(policy)
    seen.clear()
    assert par(policy) == want and par(policy) == want
    lengths = np.minimum(2 + np.arange(10, 17) % 4, 4)
    assert sorted(seen) == sorted(2 * [s for s, k in zip(range(10, 17), lengths) for _ in range(k)])
    if workers == 2:  # Ctrl-C reaches the whole process group: the workers must outlive it
        for proc in par.vec.processes:
            os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert all(proc.is_alive() for proc in par.vec.processes) and par(policy) == want
    serial.close(), par.close()


def test_a_repeated_sigterm_still_stops_at_a_checkpoint():
    """A cluster sends SIGTERM after its scheduler did: the second must not kill the run before it
    saves (a second Ctrl-C still does, on purpose)."""
    run = types.SimpleNamespace(stop_requested=False, bar=types.SimpleNamespace(write=lambda msg: None))
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *a: None)
            common.Run._request_stop(run, sig, None)
            assert run.stop_requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def test_parallel_evaluation_same_returns_on_hopper():
    """The same 6 Hopper episodes in the main process and in 4 workers give identical returns (a
    row-wise policy, so the batch a row is in cannot change its action)."""
    norm = Normalizer(np.zeros(11, np.float32), np.ones(11, np.float32))
    policy = lambda x: np.tanh(0.7 * x[:, :3] - 0.3 * x[:, 3:6]).astype(np.float32)
    out = []
    for w in (1, 4):
        ev = common.Evaluator(lambda: gym.make("Hopper-v4"), norm, episodes=6, seed=3, ref=None, workers=w)
        out.append(ev(policy))
        ev.close()
    assert out[0] == out[1] and out[0]["eval/return_std"] > 0


# ---------------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------------
def test_buffer_wraps_as_a_ring():
    """Catches writes past capacity, a wrong write pointer after wrapping and a wrong size."""
    cap = 5
    buf = common.Buffer(cap, {"obs": 2, "rew": 0}, "cpu")
    idx = buf.add(obs=np.array([[i, -i] for i in range(3)]), rew=np.arange(3))
    assert idx.tolist() == [0, 1, 2] and buf.size == 3
    idx = buf.add(obs=torch.tensor([[i, -i] for i in range(3, 7)]), rew=torch.arange(3, 7))
    assert idx.tolist() == [3, 4, 0, 1]
    expected = np.zeros(cap)
    for i in range(7):
        expected[i % cap] = i
    assert buf.size == cap and buf.ptr == 7 % cap
    assert buf.data["rew"].shape == (cap,)
    np.testing.assert_array_equal(buf.all()["rew"].numpy(), expected)
    np.testing.assert_array_equal(buf.all()["obs"].numpy(), np.stack([expected, -expected], 1))


def test_buffer_samples_only_filled_rows():
    """Catches sampling the zero-initialized unfilled part of the buffer, and fields of one sample
    coming from different rows."""
    torch.manual_seed(0)
    buf = common.Buffer(100, {"obs": 3, "rew": 0}, "cpu")
    buf.add(obs=np.arange(1, 4)[:, None] * np.ones(3), rew=np.arange(1, 4))
    batch = buf.sample(2000)
    assert batch["obs"].shape == (2000, 3) and batch["rew"].shape == (2000,)
    assert set(batch["rew"].tolist()) == {1.0, 2.0, 3.0}
    np.testing.assert_array_equal(batch["obs"][:, 0].numpy(), batch["rew"].numpy())
    buf.replace(obs=np.full((2, 3), 9.0), rew=np.full(2, 9.0))
    assert buf.size == 2 and set(buf.sample(200)["rew"].tolist()) == {9.0}


def test_buffer_state_dict_round_trip():
    """Catches a buffer restored with other contents, pointer or size (a resumed run would
    overwrite the wrong rows or sample garbage)."""
    buf = common.Buffer(6, {"obs": 2, "rew": 0}, "cpu")
    for i in range(3):
        buf.add(obs=np.full((3, 2), i), rew=np.full(3, i))
    restored = common.Buffer(6, {"obs": 2, "rew": 0}, "cpu")
    restored.load_state_dict(buf.state_dict())
    assert (restored.ptr, restored.size) == (buf.ptr, buf.size)
    for k in buf.data:
        torch.testing.assert_close(restored.all()[k], buf.all()[k])
    assert restored.add(obs=np.ones((1, 2)), rew=np.ones(1)).tolist() == buf.add(obs=np.ones((1, 2)), rew=np.ones(1)).tolist()


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    return net, opt


def test_checkpoint_round_trip(tmp_path):
    """Catches modules, optimizer state, buffers, nested dicts or plain counters lost or altered by
    save_checkpoint/load_checkpoint."""
    net, opt = _model_and_optimizer(0)
    critic = torch.nn.Linear(2, 1)
    net(torch.randn(8, 3)).pow(2).sum().backward()
    opt.step()
    buf = common.Buffer(10, {"obs": 3}, "cpu")
    buf.add(obs=torch.randn(4, 3))
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"net": net, "opt": opt, "buffer": buf, "nets": {"critic": critic}, "step": 7})

    net2, opt2 = _model_and_optimizer(1)
    critic2 = torch.nn.Linear(2, 1)
    buf2 = common.Buffer(10, {"obs": 3}, "cpu")
    state = common.load_checkpoint(path, {"net": net2, "opt": opt2, "buffer": buf2, "nets": {"critic": critic2}})
    assert state["step"] == 7
    for a, b in zip(list(net.state_dict().values()) + list(critic.state_dict().values()),
                    list(net2.state_dict().values()) + list(critic2.state_dict().values())):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for p in s1["state"]:
        for k in s1["state"][p]:
            torch.testing.assert_close(s1["state"][p][k], s2["state"][p][k], rtol=0, atol=0)
    assert (buf2.ptr, buf2.size) == (buf.ptr, buf.size)
    torch.testing.assert_close(buf2.all()["obs"], buf.all()["obs"], rtol=0, atol=0)


def _draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_checkpoint_rng_continuation(tmp_path):
    """Catches a resumed run whose python/numpy/torch random streams do not continue from the save."""
    common.seed_everything(123)
    _draws()
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"rng": common.rng_state()})
    expected = _draws()
    common.seed_everything(999)
    _draws()
    state = common.load_checkpoint(path, {})
    common.set_rng_state(state["rng"])
    assert _draws() == expected


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """Catches a checkpoint written in place: a crash mid-write must leave the previous one intact."""
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"step": 1, "w": torch.arange(5.0)})
    written = []

    def crashing_save(obj, f, *args, **kwargs):
        written.append(Path(f))
        Path(f).write_bytes(b"half a checkpoint")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="mid-write"):
        common.save_checkpoint(path, {"step": 2, "w": torch.zeros(5)})
    monkeypatch.undo()
    assert written and written[0] != path
    state = common.load_checkpoint(path, {})
    assert state["step"] == 1
    torch.testing.assert_close(state["w"], torch.arange(5.0))
    common.save_checkpoint(path, {"step": 3})  # a later save still replaces it
    assert common.load_checkpoint(path, {})["step"] == 3


def test_missing_checkpoint_is_a_user_error(tmp_path):
    """Catches a raw FileNotFoundError traceback when resuming a run that never checkpointed."""
    with pytest.raises(UserError, match="no checkpoint"):
        common.load_checkpoint(tmp_path / "nope.pt", {})


# ---------------------------------------------------------------------------------------------
# Bad input: one UserError naming the problem and the fix
# ---------------------------------------------------------------------------------------------
def test_unknown_env_names():
    """Catches an unknown --env name leaking a gymnasium/regex traceback instead of listing the
    accepted names."""
    with pytest.raises(UserError, match="unknown --env 'hopper-medium-v9'.*accepted --env names"):
        common.load_task("hopper-medium-v9")
    with pytest.raises(UserError, match="unknown gymnasium env 'NoSuchEnv-v0'.*accepted --env names"):
        common.load_task("NoSuchEnv-v0", "random:200")


@pytest.mark.parametrize("hf_offline", [True, False], ids=["HF_HUB_OFFLINE", "no-route"])
def test_missing_minari_dataset_fails_fast(monkeypatch, offline_dirs, hf_offline):
    """Catches a missing Minari dataset that retries the hub for a long time or fails with a
    traceback instead of saying where it looked and how to fetch it."""
    if not hf_offline:
        monkeypatch.delenv("HF_HUB_OFFLINE")  # the network is still cut by conftest
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        common.load_task("antmaze-umaze-v2")
    assert time.perf_counter() - t0 < 5.0
    msg = str(e.value)
    assert "D4RL/antmaze/umaze-v1" in msg and str(offline_dirs["minari"]) in msg
    assert "minari download D4RL/antmaze/umaze-v1" in msg


def test_missing_d4rl_file_names_curl_command(offline_dirs):
    """Catches a missing D4RL locomotion file that fails without saying which file, where it was
    looked for, and how to fetch it."""
    with pytest.raises(UserError) as e:
        common.load_task("walker2d-medium-replay-v2")
    msg = str(e.value)
    assert "walker2d_medium_replay-v2" in msg and str(offline_dirs["d4rl"]) in msg
    assert "curl" in msg and common.D4RL_URL.format("walker2d_medium_replay-v2") in msg
    assert not any(offline_dirs["d4rl"].iterdir()), "no partial download may be left behind"


def test_missing_hdf5_path(tmp_path):
    """Catches a nonexistent --dataset path surfacing as an h5py OSError traceback."""
    with pytest.raises(UserError, match="does not exist"):
        common.load_task("Hopper-v4", str(tmp_path / "nope.hdf5"))


def test_hdf5_not_an_hdf5_file(tmp_path):
    """Catches a corrupt file surfacing as an h5py traceback."""
    path = tmp_path / "junk.hdf5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        common.load_task("Hopper-v4", str(path))


def test_hdf5_missing_key(tmp_path, write_hdf5, d4rl_arrays):
    """Catches a file without `timeouts` giving a KeyError instead of naming the key."""
    arrays = d4rl_arrays([4], [True])
    del arrays["timeouts"]
    path = write_hdf5(tmp_path / "data.hdf5", **arrays)
    with pytest.raises(UserError, match="lacks key.*timeouts.*needs") as e:
        common.load_task("Hopper-v4", str(path))
    assert "next_observations" not in str(e.value).split("needs")[0]  # only the missing key is named


def test_hdf5_inconsistent_lengths(tmp_path, write_hdf5, d4rl_arrays):
    """Catches arrays of different lengths being silently truncated or broadcast."""
    arrays = d4rl_arrays([4, 3], [True, False])
    arrays["rewards"] = arrays["rewards"][:-1]
    path = write_hdf5(tmp_path / "data.hdf5", **arrays)
    with pytest.raises(UserError, match="different lengths.*'rewards': 6.*one row per transition"):
        common.load_task("Hopper-v4", str(path))


def test_observation_dim_mismatch(tmp_path, write_hdf5, d4rl_arrays):
    """Catches a dataset from another env (5-d obs) being accepted for Hopper-v4 (11-d)."""
    path = write_hdf5(tmp_path / "data.hdf5", **d4rl_arrays([4], [True], obs_dim=5))
    with pytest.raises(UserError, match="5-d observations but env Hopper-v4 has 11-d; pass the env"):
        common.load_task("Hopper-v4", str(path))


def test_action_dim_mismatch(tmp_path, write_hdf5, d4rl_arrays):
    """Catches a dataset with 6-d actions being accepted for Hopper-v4 (3-d actions)."""
    path = write_hdf5(tmp_path / "data.hdf5", **d4rl_arrays([4], [True], act_dim=6))
    with pytest.raises(UserError, match="6-d actions but env Hopper-v4 has 3-d; pass the env"):
        common.load_task("Hopper-v4", str(path))


def test_nan_rows_are_reported(tmp_path, write_hdf5, d4rl_arrays):
    """Catches NaN/inf data being accepted (it would poison training) or miscounted."""
    arrays = d4rl_arrays([5, 5], [True, True])
    arrays["observations"][1, 0] = np.nan
    arrays["observations"][1, 4] = np.nan        # same row: counts once
    arrays["rewards"][4] = np.inf
    arrays["actions"][7, 2] = np.nan
    arrays["next_observations"][9, 3] = np.nan
    path = write_hdf5(tmp_path / "data.hdf5", **arrays)
    with pytest.raises(UserError, match=r"has 4 of 10 rows with NaN/inf"):
        common.load_task("Hopper-v4", str(path))


def test_bad_dataset_arguments():
    """Catches random:N with a tiny N or an unrecognised --dataset string being accepted."""
    with pytest.raises(UserError, match="at least 100"):
        common.load_task("Hopper-v4", "random:5")
    with pytest.raises(UserError, match="neither a Minari id"):
        common.load_task("Hopper-v4", "mydata")


# ---------------------------------------------------------------------------------------------
# run_main
# ---------------------------------------------------------------------------------------------
def test_run_main_turns_user_error_into_one_line(capsys):
    """Catches a UserError printed as a traceback or with another exit code than 2."""
    def main(x):
        raise UserError(f"bad value {x}; pass a good one")

    with pytest.raises(SystemExit) as e:
        common.run_main(main, 3)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: bad value 3; pass a good one\n"

    def buggy():
        raise ValueError("a real bug")
    with pytest.raises(ValueError):  # a bug is not a user error: it keeps its traceback
        common.run_main(buggy)


def test_run_main_in_a_process(tmp_path):
    """Catches the real entry path (imports included) printing a traceback, warnings or anything else
    besides the one `error:` line for a user error."""
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path), "D4RL_DATASET_DIR": str(tmp_path),
           "HF_HUB_OFFLINE": "1"}
    code = "import common; common.run_main(common.load_task, 'hopper-medium-v9')"
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(common.__file__).parent, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: unknown --env 'hopper-medium-v9'"), p.stderr


def test_action_bounds_other_than_unit_are_rescaled_for_data_and_env(tmp_path):
    """Pendulum's actions lie in [-2, 2]; the learners act in [-1, 1]. Data actions must be mapped
    by the same affine map the env wrapper inverts, so a dataset action replayed through the
    wrapped env reproduces the recorded transition."""
    task = common.load_task("Pendulum-v1", "random:200")
    a = task.data.actions
    assert a.min() >= -1 and a.max() <= 1 and a.min() < -0.5 and a.max() > 0.5
    env = task.env_fn()
    assert np.allclose(env.action_space.low, -1) and np.allclose(env.action_space.high, 1)
    raw = gym.make("Pendulum-v1").unwrapped
    raw.reset(seed=0)
    wrapped = env.unwrapped
    env.reset(seed=0)
    s = task.data.observations[0]
    theta = np.arctan2(s[1], s[0])
    for e in (raw, wrapped):
        e.state = np.array([theta, s[2]])
    r_raw = raw.step(a[:1] * 2.0)[1]
    wrapped.state = np.array([theta, s[2]])
    r_wrapped = env.step(a[:1])[1]
    assert r_raw == pytest.approx(r_wrapped, abs=1e-5)
    assert r_raw == pytest.approx(task.data.rewards[0], abs=1e-4)


def test_maze_envs_leave_no_xml_in_the_temp_dir(tmp_path, monkeypatch):
    """Catches gymnasium-robotics' maze XML (written to the temp dir at every env made, never
    deleted: thousands of files per run) left behind by the envs a run makes: data collection,
    the online and evaluation envs, and the simulator the diagnostics replay."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    task = common.load_task("PointMaze_UMaze-v3", "explore:300")
    for make in (task.env_fn, task.eval_env_fn):
        make().close()
    assert not list(tmp.iterdir()), sorted(p.name for p in tmp.iterdir())
