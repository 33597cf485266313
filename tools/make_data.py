"""Make D4RL-style "medium" and "medium-replay" locomotion datasets with an online SAC agent.

    pip install -r tools/requirements.txt       # the tools' packages (stable-baselines3 for this one)
    python tools/make_data.py                        # Hopper-v4 and HalfCheetah-v4, seed 0
    python tools/make_data.py --env Walker2d-v4 --seed 1 --out /data/edis-seed1
    python edis_iql.py --env Hopper-v4 --dataset ~/.d4rl/datasets/edis/hopper-medium.hdf5

As D4RL did: train SAC (256x256, lr 3e-4, batch 256, one gradient step per env step) until the
deterministic policy's D4RL normalized score reaches --target (evaluated every --eval-every steps) or
--max-steps; then write, in D4RL's flat HDF5 layout,
  <name>-medium-replay.hdf5  every transition SAC collected, in order, from step 1 to the stop;
  <name>-medium.hdf5         --medium-size transitions of the stopped policy with sampled (stochastic)
                             actions, episodes of at most 1000 steps (the last one cut, marked timeout).
terminals = true termination; timeouts = time-limit truncation, and the last row of a file (the data
ends there mid-episode). Files are written atomically and
reused when both exist with the same settings. One torch thread; the same seed gives the same files
on the same machine.

Measured cost: `python tools/make_data.py` (seed 0, both envs as two processes side by side on a
2-core machine that also ran tests and then two study runs) took 51 min: SAC 36 min for each env
(40-72 env-steps/s, 110k steps each), then the two 1M-transition medium files 14-15 min each. At
110k steps hopper's deterministic policy scored 68.0 (34.7 at 105k: the 5k-step evaluation grid
overshot the target of 45) and halfcheetah's 40.3. The medium files' sampled actions score lower:
hopper 58.3 over 1,652 episodes, halfcheetah 37.9 over 1,000 (D4RL's hopper-medium: about 44).
D4RL's medium files hold 1M transitions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

VERSION = "make_data 1"
TARGETS = {"hopper": 45.0, "halfcheetah": 40.0, "walker2d": 40.0}  # "medium": D4RL normalized score
KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", nargs="+", default=["Hopper-v4", "HalfCheetah-v4"],
                   help="gymnasium locomotion env id(s): Hopper-v4, HalfCheetah-v4, Walker2d-v4 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of SAC, the envs and the sampled actions (default: 0)")
    p.add_argument("--target", type=float, default=None,
                   help=f"stop once the deterministic policy's D4RL normalized score reaches this\n(default per env: {TARGETS})")
    p.add_argument("--max-steps", type=int, default=500_000, help="SAC env-step budget; stop there if the target is not reached (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=5_000, help="evaluate the policy every this many env steps (default: %(default)s)")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation (default: %(default)s)")
    p.add_argument("--learning-starts", type=int, default=5_000, help="uniform random steps before SAC updates begin (default: %(default)s)")
    p.add_argument("--medium-size", type=int, default=1_000_000, help="transitions in <name>-medium.hdf5 (default: %(default)s)")
    p.add_argument("--out", type=Path, default=common.D4RL_CACHE / "edis",
                   help="output folder (default: $D4RL_DATASET_DIR/edis, i.e. ~/.d4rl/datasets/edis)")
    a = p.parse_args(argv)
    for k in ("max_steps", "eval_every", "eval_episodes", "medium_size"):
        if getattr(a, k) < 1:
            raise common.UserError(f"--{k.replace('_', '-')} must be at least 1")
    if a.learning_starts < 0:
        raise common.UserError("--learning-starts must not be negative")
    return a


def env_name(env_id: str) -> str:
    name = next((k for k in common.LOCOMOTION_ENVS if env_id.lower().startswith(k)), None)
    if name is None or env_id not in gym.registry:
        raise common.UserError(f"unknown --env '{env_id}'; accepted: {', '.join(common.LOCOMOTION_ENVS.values())}")
    return name


class Recorder(gym.Wrapper):
    """Keeps every step (obs, action, reward, next obs, terminal, timeout) in order, up to `capacity`."""

    def __init__(self, env, capacity: int):
        super().__init__(env)
        ds, da, self.n, self.obs = env.observation_space.shape[0], env.action_space.shape[0], 0, None
        self.data = {"observations": np.zeros((capacity, ds), np.float32), "actions": np.zeros((capacity, da), np.float32),
                     "rewards": np.zeros(capacity, np.float32), "next_observations": np.zeros((capacity, ds), np.float32),
                     "terminals": np.zeros(capacity, bool), "timeouts": np.zeros(capacity, bool)}

    def reset(self, **kwargs):
        self.obs, info = self.env.reset(**kwargs)
        return self.obs, info

    def step(self, action):
        nxt, r, term, trunc, info = self.env.step(action)
        if self.n < len(self.data["rewards"]):
            for k, v in zip(KEYS, (self.obs, action, r, nxt, term, trunc and not term)):
                self.data[k][self.n] = v
            self.n += 1
        self.obs = nxt
        return nxt, r, term, trunc, info

    def result(self) -> dict:
        d = {k: v[:self.n] for k, v in self.data.items()}
        d["timeouts"][-1] |= not d["terminals"][-1]  # the data ends here: an episode end
        return d


def score(ret, name):
    lo, hi = common.LOCOMOTION_REF[name]
    return 100.0 * (ret - lo) / (hi - lo)


def evaluate(model, env, episodes: int, seed: int) -> float:
    rets = []
    for i in range(episodes):
        obs, _ = env.reset(seed=1_000_000 + 1000 * seed + i)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(model.predict(obs, deterministic=True)[0])
            ret, done = ret + r, term or trunc
        rets.append(ret)
    return float(np.mean(rets))


def episode_returns(d: dict) -> np.ndarray:
    return common.episode_returns(common.Transitions(**d))


def write(path: Path, data: dict, attrs: dict):
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for k in KEYS:
            f.create_dataset(k, data=data[k])
        f.attrs.update(attrs)
    os.replace(tmp, path)


def cached(paths, config: str) -> bool:
    for p in paths:
        try:
            with h5py.File(p, "r") as f:
                if f.attrs.get("config") != config:
                    return False
        except OSError:  # absent or unreadable
            return False
    return True


def make(env_id: str, a: argparse.Namespace):
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.logger import Logger

    name = env_name(env_id)
    target = TARGETS[name] if a.target is None else a.target
    config = json.dumps({"env": env_id, "seed": a.seed, "target": target, "max_steps": a.max_steps,
                         "eval_every": a.eval_every, "eval_episodes": a.eval_episodes,
                         "learning_starts": a.learning_starts, "medium_size": a.medium_size, "version": VERSION})
    a.out.mkdir(parents=True, exist_ok=True)
    paths = [a.out / f"{name}-medium-replay.hdf5", a.out / f"{name}-medium.hdf5"]
    if cached(paths, config):
        print(f"{name}: up to date, skipped: {paths[0]} {paths[1]}")
        return paths
    torch.set_num_threads(1)
    env, eval_env = Recorder(gym.make(env_id), a.max_steps), gym.make(env_id)
    model = SAC("MlpPolicy", env, learning_rate=3e-4, buffer_size=a.max_steps, learning_starts=a.learning_starts,
                batch_size=256, policy_kwargs={"net_arch": [256, 256]}, seed=a.seed, device="cpu", verbose=0)
    model.set_logger(Logger(None, []))  # SB3's default logger makes an empty /tmp/SB3-<date> folder per run
    log = {"score": float("nan"), "ret": float("nan")}

    class Evaluate(BaseCallback):
        def _on_training_start(self):
            self.t, self.last = time.time(), 0

        def _on_step(self) -> bool:
            n = self.num_timesteps
            if n % a.eval_every and n < a.max_steps:
                return True
            rate = (n - self.last) / (time.time() - self.t)
            log["ret"] = evaluate(model, eval_env, a.eval_episodes, a.seed)
            log["score"] = score(log["ret"], name)
            print(f"{name}: step {n:>7}  {rate:6.0f} steps/s  return {log['ret']:8.1f}  score {log['score']:5.1f}"
                  f" (target {target:g})", flush=True)
            self.t, self.last = time.time(), n
            return log["score"] < target

    model.learn(total_timesteps=a.max_steps, callback=Evaluate())
    steps = model.num_timesteps
    if log["score"] < target:
        print(f"{name}: warning: --max-steps {a.max_steps} reached at score {log['score']:.1f} < target {target:g}")
    base = {"env": env_id, "seed": a.seed, "sac_steps": steps, "gradient_steps": model._n_updates,
            "policy_return": log["ret"], "policy_normalized_score": log["score"], "target": target,
            "reached_target": log["score"] >= target, "config": config, "version": VERSION}
    replay = env.result()
    write(paths[0], replay, {**base, "episodes": len(episode_returns(replay))})

    rec, ep = Recorder(gym.make(env_id), a.medium_size), 0  # sampled actions, as D4RL's medium data
    while rec.n < a.medium_size:
        obs, _ = rec.reset(seed=2_000_000 + a.seed if ep == 0 else None)
        done, ep = False, ep + 1
        while not done and rec.n < a.medium_size:
            obs, _, term, trunc, _ = rec.step(model.predict(obs, deterministic=False)[0])
            done = term or trunc
    medium = rec.result()
    rets = episode_returns(medium)
    full = rets[:-1] if len(rets) > 1 and not done else rets  # the cut last episode is not a full one
    write(paths[1], medium, {**base, "episodes": len(rets), "mean_return": float(full.mean()),
                             "normalized_score": float(score(full.mean(), name))})
    print(f"{name}: {steps} SAC steps, policy score {log['score']:.1f}; medium data score "
          f"{score(full.mean(), name):.1f} over {len(full)} episodes")
    for p in paths:
        print(f"wrote {p}")
    return paths


def main(argv=None):
    a = parse(argv)
    for e in a.env:
        env_name(e)  # every name checked before hours of training
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        raise common.UserError("tools/make_data.py needs stable-baselines3: pip install -r tools/requirements.txt") from None
    for e in a.env:
        make(e, a)


if __name__ == "__main__":
    common.run_main(main)
