"""Shared plumbing for edis_iql.py and edis_calql.py: datasets, environments, evaluation, buffers,
logging, checkpoints. The algorithm lives in the two scripts; nothing here is EDIS-specific."""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Literal
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", module=r"minari\..*")
warnings.filterwarnings("ignore", module=r"gymnasium\..*")


class UserError(Exception):
    """Bad input: printed as one line `error: ...` and exit code 2, never as a traceback."""


def warn(msg: str):
    """A line in the run's output that says something went wrong and what was done about it (above the
    progress bars, which tqdm redraws)."""
    from tqdm import tqdm
    tqdm.write(f"warning: {msg}", file=sys.stdout)


def run_main(main, *args):
    try:
        main(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Dataset names (docs/design.md §6)
# ---------------------------------------------------------------------------------------------
ANTMAZE_ENVS = {  # D4RL maze -> gymnasium-robotics env of the Minari D4RL/antmaze datasets
    "umaze": "AntMaze_UMaze-v4", "umaze-diverse": "AntMaze_UMaze-v4",
    "medium-play": "AntMaze_Medium-v4", "medium-diverse": "AntMaze_Medium_Diverse_GR-v4",
    "large-play": "AntMaze_Large-v4", "large-diverse": "AntMaze_Large_Diverse_GR-v4",
}
LOCOMOTION_ENVS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}
LOCOMOTION_REF = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0),
                  "walker2d": (1.629008, 4592.3)}  # D4RL's random / expert reference returns
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{}.hdf5"
D4RL_CACHE = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()
ACCEPTED = ("accepted --env names: antmaze-{umaze,umaze-diverse,medium-play,medium-diverse,large-play,"
            "large-diverse}-v2, {pen,door,hammer,relocate}-{human,cloned,expert}-v1, "
            "{hopper,halfcheetah,walker2d}-{random,medium,medium-replay,medium-expert,expert}-v2, "
            "or any gymnasium env id together with --dataset (a Minari id, a .hdf5 path, random:N or explore:N)")
MAZE_FAMILIES = ("antmaze", "pointmaze")  # goal-reaching mazes: sparse reward, x, y lead the flat observation


@dataclass
class Source:
    """What `--env/--dataset` resolved to."""
    name: str            # dataset key used for presets, e.g. "hopper-medium", "antmaze-large-diverse"
    family: str          # antmaze | pointmaze | adroit | locomotion | other
    kind: str            # minari | hdf5 | random | explore
    location: str        # Minari id, HDF5 path/URL, or gymnasium env id (random, explore)
    env_id: str | None   # gymnasium env for hdf5/random sources
    n_random: int = 0
    ref: tuple[float, float] | None = None


def family_of(env_id: str) -> str:
    e = env_id.lower()
    if "antmaze" in e:
        return "antmaze"
    if "pointmaze" in e:
        return "pointmaze"
    if "adroit" in e or re.match(r"(pen|door|hammer|relocate)-", e):
        return "adroit"
    if any(e.startswith(k) for k in LOCOMOTION_ENVS):
        return "locomotion"
    return "other"


def resolve_source(env: str, dataset: str | None) -> Source:
    """Map `--env` (a D4RL name or a gymnasium id) and optional `--dataset` to a data source."""
    if m := re.fullmatch(r"antmaze-(umaze|umaze-diverse|medium-play|medium-diverse|large-play|large-diverse)-v\d", env):
        src = Source(f"antmaze-{m[1]}", "antmaze", "minari", f"D4RL/antmaze/{m[1]}-v1", None)
    elif m := re.fullmatch(r"(pen|door|hammer|relocate)-(human|cloned|expert)-v\d", env):
        src = Source(f"{m[1]}-{m[2]}", "adroit", "minari", f"D4RL/{m[1]}/{m[2]}-v2", None)
    elif m := re.fullmatch(r"(hopper|halfcheetah|walker2d)-(random|medium|medium-replay|medium-expert|expert)-v2", env):
        src = Source(f"{m[1]}-{m[2]}", "locomotion", "hdf5", f"{m[1]}_{m[2].replace('-', '_')}-v2",
                     LOCOMOTION_ENVS[m[1]], ref=LOCOMOTION_REF[m[1]])
    elif dataset is None:
        if env in gym.registry:
            raise UserError(f"--env {env} is a gymnasium env without data: add --dataset (random:N, a Minari id "
                            f"or a .hdf5 path), or run the no-download default with --preset quick")
        raise UserError(f"unknown --env '{env}'; {ACCEPTED}")
    else:
        if env not in gym.registry:
            _register_robotics()
        if env not in gym.registry:
            raise UserError(f"unknown gymnasium env '{env}'; {ACCEPTED}")
        fam = family_of(env)
        ref = next((v for k, v in LOCOMOTION_REF.items() if env.lower().startswith(k)), None)
        src = Source(env, fam, "", "", env, ref=ref)
    if dataset is None:
        return src
    if m := re.fullmatch(r"(random|explore):(\d+)", dataset):
        src.kind, src.n_random, src.location = m[1], int(m[2]), src.env_id or dataset
        if src.env_id is None:
            raise UserError(f"--dataset {m[1]}:N needs a gymnasium env id in --env, e.g. --env Hopper-v4")
        if src.n_random < 100:
            raise UserError(f"--dataset {dataset}: N must be at least 100 transitions")
    elif dataset.endswith((".hdf5", ".h5")):
        src.kind, src.location = "hdf5", dataset
    elif "/" in dataset:
        src.kind, src.location = "minari", dataset
    else:
        raise UserError(f"--dataset '{dataset}' is neither a Minari id (ns/name-vN), a .hdf5 path, random:N nor explore:N")
    if src.kind != "minari" and src.env_id is None:
        raise UserError(f"--dataset {dataset} needs a gymnasium env id in --env, e.g. --env Hopper-v4")
    return src


# ---------------------------------------------------------------------------------------------
# Loading: every source becomes flat transition arrays + the env it belongs to
# ---------------------------------------------------------------------------------------------
@dataclass
class Transitions:
    observations: np.ndarray       # (N, ds) float32
    actions: np.ndarray            # (N, da)
    rewards: np.ndarray            # (N,)
    next_observations: np.ndarray  # (N, ds)
    terminals: np.ndarray          # (N,) true environment termination (bootstrapping stops)
    timeouts: np.ndarray           # (N,) episode ends here without termination (time limit, data end)

    @property
    def episode_ends(self) -> np.ndarray:
        return self.terminals | self.timeouts

    def __len__(self):
        return len(self.rewards)


def flatten_obs(obs) -> np.ndarray:
    """Dict observations -> one vector: achieved_goal ++ observation (D4RL's 29-d antmaze layout),
    then desired_goal and any other keys in sorted order. Works on single obs and on stacked arrays."""
    if not isinstance(obs, dict):
        return np.asarray(obs, dtype=np.float32)
    order = [k for k in ("achieved_goal", "observation", "desired_goal") if k in obs]
    order += sorted(k for k in obs if k not in order)
    return np.concatenate([np.asarray(obs[k], dtype=np.float32) for k in order], axis=-1)


def _register_robotics():
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):  # its import prints an Adroit-v1 notice to stderr
        import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)


def _hub_reachable(host: str, port: int = 443) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" and host.endswith("huggingface.co"):
        return False
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def _minari_transitions(ds) -> Transitions:
    obs, nxt, act, rew, term, tout = [], [], [], [], [], []
    for ep in ds.iterate_episodes():
        o = flatten_obs(ep.observations)
        T = len(ep.rewards)
        obs.append(o[:T]); nxt.append(o[1:T + 1]); act.append(np.asarray(ep.actions, np.float32))
        rew.append(np.asarray(ep.rewards, np.float32)); term.append(np.asarray(ep.terminations, bool))
        end = np.zeros(T, bool); end[-1] = not ep.terminations[-1]  # truncation is not a terminal
        tout.append(end)
    cat = np.concatenate
    return Transitions(cat(obs), cat(act), cat(rew), cat(nxt), cat(term), cat(tout))


def _load_minari(dataset_id: str):
    import minari
    if dataset_id not in minari.list_local_datasets():
        where = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
        if not _hub_reachable("huggingface.co"):
            raise UserError(f"Minari dataset {dataset_id} is not in {where} and the hub is unreachable; "
                            f"fetch it on a networked machine with `minari download {dataset_id}`")
        try:
            minari.download_dataset(dataset_id)
        except Exception as e:  # noqa: BLE001 - the hub's errors are many; one line is what helps
            raise UserError(f"could not download Minari dataset {dataset_id}: {e}") from None
    return minari.load_dataset(dataset_id)


def _read_hdf5(path: Path) -> Transitions:
    import h5py
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise UserError(f"{path} lacks key(s) {', '.join(missing)}; a D4RL-layout HDF5 needs "
                                f"flat datasets {', '.join(keys)}")
            arr = {k: f[k][()] for k in keys}
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e})") from None
    lengths = {k: len(v) for k, v in arr.items()}
    if len(set(lengths.values())) != 1:
        raise UserError(f"{path}: datasets have different lengths {lengths}; all must have one row per transition")
    obs, nxt = arr["observations"].astype(np.float32), arr["next_observations"].astype(np.float32)
    term, tout = arr["terminals"].astype(bool).reshape(-1), arr["timeouts"].astype(bool).reshape(-1)
    # A row whose successor does not start where it ended is an episode end the file did not flag.
    gap = np.zeros(len(obs), bool)
    gap[:-1] = np.any(np.abs(nxt[:-1] - obs[1:]) > 1e-6, axis=1)
    gap[-1] = True
    tout = tout | (gap & ~term)
    return Transitions(obs, arr["actions"].astype(np.float32).reshape(len(obs), -1),
                       arr["rewards"].astype(np.float32).reshape(-1), nxt, term, tout)


def _fetch_d4rl(name: str) -> Path:
    path = D4RL_CACHE / f"{name}.hdf5"
    if path.exists():
        return path
    url = D4RL_URL.format(name)
    if not _hub_reachable("rail.eecs.berkeley.edu", 80):
        raise UserError(f"D4RL dataset {name} is not in {D4RL_CACHE} and {url} is unreachable; fetch it "
                        f"on a networked machine with `mkdir -p {D4RL_CACHE} && curl -L -o {path} {url}`")
    import urllib.request
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    print(f"downloading {url} -> {path}")
    urllib.request.urlretrieve(url, tmp)
    os.replace(tmp, path)
    return path


EXPLORE_KEEP, EXPLORE_NOISE = 0.95, 0.3  # explore:N momentum random walk (in units of the half action range)


def collect_random(env_id: str, n: int, seed: int = 0, explore: bool = False) -> str:
    """Write `n` transitions of `env_id` as a local Minari dataset (once). Actions are uniform random,
    or with `explore` a momentum random walk u <- clip(0.95 u + 0.3 noise, -1, 1) mapped to the action
    box: persistent directions carry a point mass along maze corridors, where uniform actions jitter
    it in place (PointMaze Medium, 600 steps: 5 cells visited per episode uniform, 9 momentum)."""
    import minari
    from minari.data_collector import EpisodeBuffer
    kind = "explore" if explore else "random"
    ds_id = f"edis/{re.sub(r'[^a-z0-9]+', '_', env_id.lower())}/{kind}-{n}-v0"
    if ds_id in minari.list_local_datasets():
        return ds_id
    env = drop_maze_xml(gym.make(env_id))
    env.action_space.seed(seed)
    rng, lo, hi = np.random.default_rng(seed), env.action_space.low, env.action_space.high
    episodes, total, ep = [], 0, 0
    while total < n:
        o, _ = env.reset(seed=seed + ep)
        obs, act, rew, term, trunc = [o], [], [], [], []
        u = np.zeros(env.action_space.shape)
        while True:
            if explore:
                u = np.clip(EXPLORE_KEEP * u + EXPLORE_NOISE * rng.standard_normal(u.shape), -1, 1)
                a = (lo + (u + 1) * (hi - lo) / 2).astype(env.action_space.dtype)
            else:
                a = env.action_space.sample()
            o, r, te, tr, _ = env.step(a)
            total += 1
            tr = tr or total >= n
            obs.append(o); act.append(a); rew.append(r); term.append(te); trunc.append(tr)
            if te or tr:
                break
        stack = ({k: np.stack([x[k] for x in obs]) for k in obs[0]} if isinstance(obs[0], dict) else np.stack(obs))
        episodes.append(EpisodeBuffer(id=ep, observations=stack, actions=np.stack(act), rewards=rew,
                                      terminations=term, truncations=trunc))
        ep += 1
    algo = "momentum random-walk actions" if explore else "uniform random actions"
    env.close()
    try:
        minari.create_dataset_from_buffers(ds_id, episodes, env=env, algorithm_name=algo,
                                           author="edis", author_email="-", code_permalink="-",
                                           description=f"{n} transitions of {env_id}, {algo}")
    except ValueError:  # a run started beside this one wrote the same (deterministic) data first
        if ds_id not in minari.list_local_datasets():
            raise
    return ds_id


@dataclass
class Task:
    source: Source
    data: Transitions
    env_fn: callable          # () -> gymnasium env with flat observations (the online env)
    eval_env_fn: callable     # () -> evaluation env
    ref: tuple[float, float] | None


def load_task(env: str, dataset: str | None = None) -> Task:
    """Everything `--env/--dataset` names: transitions, env constructors and the score reference."""
    src = resolve_source(env, dataset)
    if src.family in ("antmaze", "adroit") or src.kind == "minari":
        _register_robotics()
    if src.kind in ("random", "explore"):
        src.location = collect_random(src.env_id, src.n_random, explore=src.kind == "explore")
        src.kind = "minari"
    if src.kind == "minari":
        ds = _load_minari(src.location)
        data = _minari_transitions(ds)
        meta = ds.storage.metadata
        if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
            src.ref = (float(meta["ref_min_score"]), float(meta["ref_max_score"]))
        if src.env_id is not None and ds.spec.env_spec is not None and src.env_id != ds.spec.env_spec.id:
            env_fn = eval_fn = (lambda: gym.make(src.env_id))
        else:
            env_fn, eval_fn = ds.recover_environment, (lambda: ds.recover_environment(eval_env=True))
    else:
        path = Path(src.location) if src.location.endswith((".hdf5", ".h5")) else _fetch_d4rl(src.location)
        if not path.exists():
            raise UserError(f"--dataset {path} does not exist")
        data = _read_hdf5(path)
        env_fn = eval_fn = (lambda: gym.make(src.env_id))
    if src.family in MAZE_FAMILIES:
        env_fn, eval_fn = _tidy(env_fn), _tidy(eval_fn)
    env = env_fn()
    check_transitions(data, env, src)
    low, high = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)
    env.close()
    if not (np.allclose(low, -1) and np.allclose(high, 1)):  # learners act in [-1, 1]: map data and envs there
        data.actions = np.clip(2 * (data.actions - low) / (high - low) - 1, -1, 1).astype(np.float32)
        env_fn, eval_fn = _rescaled(env_fn), _rescaled(eval_fn)
    return Task(src, data, env_fn, eval_fn, src.ref)


def drop_maze_xml(env: gym.Env) -> gym.Env:
    """gymnasium-robotics <= 1.4.2 writes each maze env's MuJoCo XML to $TMPDIR/ant_maze<time>.xml and
    never deletes it: a file per env made, thousands per run (fixed upstream in Gymnasium-Robotics
    PR 308, not released yet). MuJoCo has read it once the env exists. The v3 mazes share one
    ant_maze.xml between envs, which other envs may still be about to read: left alone."""
    path = Path(getattr(env.unwrapped, "tmp_xml_file_path", None) or ".")
    if path.parent == Path(tempfile.gettempdir()) and re.fullmatch(r"ant_maze\d[\d.]*\.xml", path.name):
        path.unlink(missing_ok=True)
    return env


def _tidy(env_fn):
    return lambda: drop_maze_xml(env_fn())


def _rescaled(env_fn):
    return lambda: gym.wrappers.RescaleAction(env_fn(), -1.0, 1.0)


def check_transitions(data: Transitions, env: gym.Env, src: Source):
    bad = ~np.isfinite(np.concatenate([data.observations, data.actions, data.rewards[:, None],
                                       data.next_observations], axis=1)).all(axis=1)
    if bad.any():
        raise UserError(f"dataset {src.location} has {int(bad.sum())} of {len(bad)} rows with NaN/inf; clean it first")
    ds_dim = flatten_obs(env.observation_space.sample()).shape[-1]
    if data.observations.shape[1] != ds_dim:
        raise UserError(f"dataset {src.location} has {data.observations.shape[1]}-d observations but env "
                        f"{env.spec.id} has {ds_dim}-d; pass the env the dataset was collected in")
    if data.actions.shape[1] != env.action_space.shape[0]:
        raise UserError(f"dataset {src.location} has {data.actions.shape[1]}-d actions but env "
                        f"{env.spec.id} has {env.action_space.shape[0]}-d; pass the env the dataset was collected in")


# ---------------------------------------------------------------------------------------------
# Transforms applied identically offline and online
# ---------------------------------------------------------------------------------------------
@dataclass
class Normalizer:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, floor: float = 1e-3):
        return cls(x.mean(0).astype(np.float32), np.maximum(x.std(0), floor).astype(np.float32))

    @classmethod
    def identity(cls, dim: int):
        return cls(np.zeros(dim, np.float32), np.ones(dim, np.float32))

    def __call__(self, x):
        return (x - self.mean) / self.std

    def inverse(self, x):
        return x * self.std + self.mean


def episode_returns(data: Transitions) -> np.ndarray:
    ends = np.flatnonzero(data.episode_ends)
    csum = np.concatenate([[0.0], np.cumsum(data.rewards, dtype=np.float64)])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return csum[ends + 1] - csum[starts]


def reward_scale_bias(family: str, data: Transitions) -> tuple[float, float]:
    """The family's default reward transform r -> scale*r + bias: mazes r-1; locomotion
    1000/(return range of the dataset's episodes); otherwise unchanged. PointMaze has AntMaze's
    reward (the same gymnasium-robotics maze: 1 within 0.45 m of the goal, the task continues), so
    it gets the same r-1: -1 per step away from the goal, 0 at it. With no terminal a constant
    shift leaves the optimal policy alone; it makes a freshly initialised Q (about 0) optimistic and
    Cal-QL's Monte-Carlo bound of a failed episode -1/(1-gamma), as on AntMaze."""
    if family in MAZE_FAMILIES:
        return 1.0, -1.0
    if family == "locomotion":
        ret = episode_returns(data)
        return float(1000.0 / max(ret.max() - ret.min(), 1e-6)), 0.0
    return 1.0, 0.0


class FlatNormalizedObs(gym.ObservationWrapper):
    """Flatten dict observations and apply the learner's state normalizer."""

    def __init__(self, env, normalizer: Normalizer):
        super().__init__(env)
        self.normalizer = normalizer
        d = len(normalizer.mean)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (d,), np.float32)

    def observation(self, obs):
        return self.normalizer(flatten_obs(obs)).astype(np.float32)


def make_env(env_fn, normalizer: Normalizer, seed: int) -> gym.Env:
    env = FlatNormalizedObs(env_fn(), normalizer)
    env.action_space.seed(seed)
    return env


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def own_rng(seed: int, device: torch.device):
    """Run a block on a torch random stream of its own, seeded with `seed`, and leave the main stream
    where it was. The scripts build EDIS and pretrain its diffusion model in one, so the runs of a
    seed with and without EDIS share the learner's initialisation, the offline phase and the online
    phase up to the first EDIS cycle: the comparison is paired."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":  # TF32 matmuls: the learners' and energies' fp32 work on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


# ---------------------------------------------------------------------------------------------
# Evaluation: one batched policy call per step; episodes in the main process or in worker processes
# ---------------------------------------------------------------------------------------------
class Evaluator:
    """Episode i always starts from seed+i, so successive evaluations compare policies on the same
    start states, with or without worker processes (the same numbers for a policy whose action for
    a row does not depend on the other rows of its batch):
      workers = 1: all episodes in lockstep in this process;
      workers = W > 1: W processes (gymnasium's AsyncVectorEnv), each taking the next episode when
      its own ends. The policy sees only the live episodes' rows in both cases."""

    def __init__(self, env_fn, normalizer: Normalizer, episodes: int, seed: int, ref, workers: int = 1):
        from functools import partial
        self.n, self.seed, self.ref = episodes, seed, ref
        self.workers = max(1, min(workers, episodes))
        if self.workers == 1:
            self.envs = [make_env(env_fn, normalizer, seed) for _ in range(episodes)]
        else:  # forkserver: no fork of a process that holds threads and a CUDA context
            self.vec = gym.vector.AsyncVectorEnv([partial(_worker_env, env_fn, normalizer, seed)] * self.workers,
                                                 autoreset_mode=gym.vector.AutoresetMode.DISABLED, context="forkserver")

    def __call__(self, policy) -> dict:
        """policy: (n, ds) float32 array -> (n, da) actions."""
        ret, success = (self._serial if self.workers == 1 else self._parallel)(policy)
        out = {"eval/return": float(ret.mean()), "eval/return_std": float(ret.std()),
               "eval/success": float(success.mean())}
        if self.ref is not None:
            out["eval/normalized_score"] = normalized_score(out["eval/return"], self.ref)
        return out

    def _serial(self, policy):
        n = self.n
        obs = np.stack([e.reset(seed=self.seed + i)[0] for i, e in enumerate(self.envs)])
        ret, success, alive = np.zeros(n), np.zeros(n), np.ones(n, bool)
        while alive.any():
            idx = np.flatnonzero(alive)
            act = policy(obs[idx])
            for j, i in enumerate(idx):
                o, r, term, trunc, info = self.envs[i].step(act[j])
                obs[i], ret[i] = o, ret[i] + r
                success[i] = max(success[i], float(info.get("success", 0.0)))
                alive[i] = not (term or trunc)
        return ret, success

    def _parallel(self, policy):
        w, vec = self.workers, self.vec
        ep = np.arange(w)                            # the episode each worker runs; >= n: idle
        obs, _ = vec.reset(seed=[self.seed + i for i in range(w)])
        act = np.zeros(vec.action_space.shape, vec.action_space.dtype)
        ret, success = np.zeros(self.n + w), np.zeros(self.n + w)  # idle workers' steps land past n
        while (live := ep < self.n).any():
            act[live], act[~live] = policy(obs[live]), 0.0  # idle workers step with a zero action, unread
            obs, r, term, trunc, info = vec.step(act)
            ret[ep] += r
            if "success" in info:
                success[ep] = np.maximum(success[ep], np.where(info["_success"], info["success"], 0.0))
            done = live & (term | trunc)
            if done.any():
                ep[done] = ep.max() + 1 + np.arange(done.sum())
                fresh = done & (ep < self.n)
                if fresh.any():
                    o, _ = vec.reset(seed=[int(self.seed + e) if f else None for e, f in zip(ep, fresh)],
                                     options={"reset_mask": fresh})
                    obs[fresh] = o[fresh]
        return ret[:self.n], success[:self.n]

    def close(self):
        if self.workers == 1:
            for e in self.envs:
                e.close()
            return
        try:
            self.vec.close()
        except (BrokenPipeError, EOFError, ConnectionError):  # a worker already gone
            self.vec.close(terminate=True)


def _worker_env(env_fn, normalizer: Normalizer, seed: int) -> gym.Env:
    """An evaluation worker's env. Ctrl-C reaches the whole process group; the run stops on it at a
    checkpoint, and its workers must outlive that to be closed in order. (SIGTERM still ends a
    worker: Run treats a worker lost after a stop signal as the stop itself.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _register_robotics()  # a fresh process: gymnasium-robotics' envs are not registered yet
    return make_env(env_fn, normalizer, seed)


def eval_workers(flag: int) -> int:
    """--eval-workers 0: one worker per core this process may use (a Slurm job's share, not the
    node's), beyond the main process's own."""
    cores = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))
    return flag if flag > 0 else max(1, cores - 1)


def normalized_score(ret: float, ref: tuple[float, float]) -> float:
    return 100.0 * (ret - ref[0]) / (ref[1] - ref[0])


# ---------------------------------------------------------------------------------------------
# Diagnostics: what the learner consumes, against the simulator; a picture of the states
# ---------------------------------------------------------------------------------------------
def simulated_steps(env_fn, obs: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The simulator's (s', r, terminated) from raw (s, a) rows. MuJoCo locomotion: the observation is
    qpos[1:] ++ qvel, and the x position affects neither the dynamics nor the reward (a difference of
    x), so it is set to 0. PointMaze: the flat observation is (x, y) ++ (x, y, vx, vy) ++ goal; the
    ball is a MuJoCo env of its own inside the maze env, the goal stays, and the maze env's own
    reward and termination functions score the new (x, y)."""
    env = env_fn().unwrapped
    ball = getattr(env, "point_env", None)
    nxt, rew, term = [], [], []
    for s, a in zip(obs, np.clip(actions, -1, 1)):
        if ball is None:
            nq = env.model.nq
            env.set_state(np.concatenate([[0.0], s[: nq - 1]]), s[nq - 1:])
            s2, r, te = env.step(a)[:3]
        else:
            ball.set_state(s[2:4], s[4:6])
            q = ball.step(a)[0]  # x, y, vx, vy
            s2 = np.concatenate([q[:2], q, s[6:]])
            r, te = env.compute_reward(q[:2], s[6:], {}), env.compute_terminated(q[:2], s[6:], {})
        nxt.append(s2), rew.append(float(r)), term.append(float(te))
    env.close()
    return np.array(nxt), np.array(rew), np.array(term)


def env_reward_fn(task: Task, obs_norm: Normalizer, r_scale: float, r_bias: float):
    """The task's own reward as a function of learner-space next states, where the env defines one
    (goal mazes: compute_reward of the achieved goal, which leads the flat observation, and the
    desired goal, which ends it; 2-d each), in the learner's reward units. None elsewhere."""
    if task.source.family not in MAZE_FAMILIES:
        return None
    env = task.env_fn().unwrapped

    def reward(next_obs: torch.Tensor) -> torch.Tensor:  # one host round trip per call: once per EDIS cycle
        s2 = obs_norm.inverse(next_obs.detach().float().cpu().numpy())
        r = env.compute_reward(s2[:, :2], s2[:, -2:], {})
        return torch.as_tensor(r * r_scale + r_bias, dtype=torch.float32, device=next_obs.device)
    return reward


class TransitionCheck:
    """What the learner consumes, checked row by row (docs/design.md §7). For locomotion and PointMaze
    the simulator replays each (s, a): the error of s' (mean, and the tail share beyond anything real
    transitions do), of r and of the terminal flag. For mazes, whether the move from s to s' is
    possible at all: its straight path must stay out of wall cells and, where the simulator bounds
    the speed (PointMaze), be no longer than the longest step the ball can make. Real transitions
    score 0 on all of it, up to float error and to the rows where Hopper's or Walker2d's observation
    clips a velocity at +-10 (the simulator then restarts from the clipped value)."""

    SIMULATED_ROWS = 500  # replayed in the simulator per set; the maze move check takes every row

    def __init__(self, task: Task, obs_norm: Normalizer, r_scale: float, r_bias: float):
        self.env_fn, self.obs_norm, self.r_scale, self.r_bias = task.env_fn, obs_norm, r_scale, r_bias
        self.simulated = task.source.family in ("locomotion", "pointmaze")
        self.terminals = bool(task.data.terminals.any())
        # Tail threshold per coordinate (normalized units): the largest change any offline transition
        # makes in one step; a generated s' off by more than that is not a small error. Coordinates no
        # real step changes (a maze's goal) get a floor of 0.05 (a twentieth of their spread).
        d = task.data
        self.tail = np.maximum(np.abs(obs_norm(d.next_observations) - obs_norm(d.observations)).max(0), 0.05)
        self.maze = None
        if task.source.family in MAZE_FAMILIES:
            env = task.env_fn().unwrapped
            m = env.maze
            self.maze = (np.array(m.maze_map) == 1, m.maze_size_scaling, m.x_map_center, m.y_map_center,
                         self._max_step(env) if hasattr(env, "point_env") else None)
            env.close()

    @staticmethod
    def _max_step(env) -> float:
        """The longest (x, y) move of one PointMaze step: the velocity is clipped to +-5 per axis
        before each step; start at that speed in an open cell and push with the full action."""
        ball, walls = env.point_env, np.array(env.maze.maze_map) == 1
        center = env.maze.cell_rowcol_to_xy(np.argwhere(~walls)[0])
        longest = 0.0
        for sign in ([1, 1], [1, -1], [-1, 1], [-1, -1]):
            ball.set_state(center.astype(float), 5.0 * np.array(sign, float))
            longest = max(longest, float(np.linalg.norm(ball.step(np.array(sign, float))[0][:2] - center)))
        return longest

    def impossible_moves(self, xy: np.ndarray, xy2: np.ndarray) -> np.ndarray:
        """(n,) bool: the segment xy -> xy2 (raw maze coordinates) enters a wall cell or leaves the map,
        or is longer than one step allows."""
        walls, scale, xc, yc, max_step = self.maze
        pts = xy + np.linspace(0.0, 1.0, 17)[:, None, None] * (xy2 - xy)  # (17, n, 2)
        i = np.floor((yc - pts[..., 1]) / scale).astype(int)
        j = np.floor((pts[..., 0] + xc) / scale).astype(int)
        inside = (i >= 0) & (i < walls.shape[0]) & (j >= 0) & (j < walls.shape[1])
        bad = (~inside | walls[i.clip(0, walls.shape[0] - 1), j.clip(0, walls.shape[1] - 1)]).any(0)
        if max_step is not None:
            bad |= np.linalg.norm(xy2 - xy, axis=1) > 1.01 * max_step
        return bad

    def rows(self, batch: dict, n_simulated: int | None = None) -> dict[str, np.ndarray]:
        """Per row of batch (learner-space tensors: obs, actions, rewards, next_obs, terminals): the
        first `n_simulated` rows (default SIMULATED_ROWS; a simulator step costs ~0.5 ms in Python)
        replayed in the simulator, every row through the maze move check."""
        b = {k: v.detach().float().cpu().numpy().reshape(len(v), -1) for k, v in batch.items()}
        obs, nxt = self.obs_norm.inverse(b["obs"]), self.obs_norm.inverse(b["next_obs"])
        out = {}
        if self.simulated:
            k = self.SIMULATED_ROWS if n_simulated is None else n_simulated
            true_next, r, term = simulated_steps(self.env_fn, obs[:k], b["actions"][:k])
            err = self.obs_norm(true_next) - b["next_obs"][:k]
            out["dynamics_mse"] = np.mean(err**2, 1)
            out["dynamics_tail"] = (np.abs(err) > self.tail).any(1)
            out["reward_mse"] = (r * self.r_scale + self.r_bias - b["rewards"][:k, 0]) ** 2
            if self.terminals:
                out["terminal_error"] = term != b["terminals"][:k, 0]
        if self.maze is not None:
            out["wall_crossing"] = self.impossible_moves(obs[:, :2], nxt[:, :2])
        return out

    def __call__(self, batch: dict) -> dict[str, float]:
        """The means of `rows`: the share of tail rows, wrong terminals and impossible moves."""
        return {k: float(np.mean(v)) for k, v in self.rows(batch).items()}


def state_scatter(path: Path, groups: dict, normalizer: Normalizer, maze: bool, title: str):
    """2-D picture of state sets (learner-space tensors): maze x, y, or the first two principal
    components of the first group (the offline data)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = {k: v.detach().float().cpu().numpy() for k, v in groups.items()}
    if maze:  # achieved_goal (x, y) leads the flattened observation
        proj, labels = (lambda x: normalizer.inverse(x)[:, :2]), ("x", "y")
    else:
        ref = next(iter(pts.values()))
        mu = ref.mean(0)
        basis = np.linalg.svd(ref - mu, full_matrices=False)[2][:2].T
        proj, labels = (lambda x: (x - mu) @ basis), ("PC 1", "PC 2")
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for (name, x), color in zip(pts.items(), ["0.7", "tab:blue", "tab:orange", "tab:green", "tab:red"]):
        xy = proj(x[np.isfinite(x).all(1)])
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.5, color=color, label=f"{name} ({len(xy)})")
    ax.set(xlabel=labels[0], ylabel=labels[1], title=title)
    ax.legend(markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Replay buffers: preallocated device tensors, ring-indexed, sampled on the device
# ---------------------------------------------------------------------------------------------
class Buffer:
    def __init__(self, capacity: int, dims: dict[str, int], device):
        """dims: field -> width; 0 marks a scalar field (stored as (capacity,), e.g. rewards)."""
        self.capacity, self.device = capacity, torch.device(device)
        self.data = {k: torch.zeros((capacity, d) if d else (capacity,), device=self.device) for k, d in dims.items()}
        self.ptr = self.size = 0  # host integers: no device sync to know how much is stored

    def add(self, **batch) -> torch.Tensor:
        """Append a batch (tensors or arrays, first dim n); returns the row indices written."""
        n = len(next(iter(batch.values())))
        if n > self.capacity:  # only the newest `capacity` rows survive a ring anyway
            batch, n = {k: v[n - self.capacity:] for k, v in batch.items()}, self.capacity
        idx = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        for k, v in batch.items():
            self.data[k][idx] = torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(self.data[k][idx].shape)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        return idx

    def replace(self, **batch):
        self.ptr = self.size = 0
        self.add(**batch)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (n,), device=self.device)
        return {k: v[idx] for k, v in self.data.items()}

    def all(self) -> dict[str, torch.Tensor]:
        return {k: v[: self.size] for k, v in self.data.items()}

    def state_dict(self):  # clone: a slice would save the whole preallocated storage
        return {"data": {k: v.clone() for k, v in self.all().items()}, "ptr": self.ptr, "size": self.size}

    def load_state_dict(self, s):
        for k, v in s["data"].items():
            self.data[k][: len(v)] = v.to(self.device)
        self.ptr, self.size = s["ptr"], s["size"]


def transition_dims(ds: int, da: int, **extra: int) -> dict:
    return {"obs": ds, "actions": da, "rewards": 0, "next_obs": ds, "terminals": 0, **extra}  # 0: scalar


def offline_buffer(data: Transitions, obs_norm: Normalizer, r_scale: float, r_bias: float, device, **extra) -> Buffer:
    """The dataset as a device buffer in the learner's space (normalized states, transformed rewards)."""
    ds, da = data.observations.shape[1], data.actions.shape[1]
    buf = Buffer(len(data), transition_dims(ds, da, **{k: 0 for k in extra}), device)
    buf.add(obs=obs_norm(data.observations), actions=data.actions, rewards=data.rewards * r_scale + r_bias,
            next_obs=obs_norm(data.next_observations), terminals=data.terminals, **extra)
    return buf


def device_row(device, **fields) -> dict:
    """One env step as (1, ...) float tensors on the device, converted once for every buffer it enters."""
    return {k: torch.as_tensor(np.asarray(v, np.float32), device=device).reshape(1, -1) for k, v in fields.items()}


def cat_batches(*batches: dict) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------------------------
# Logging: tensorboard + metrics.jsonl (+ wandb behind --track), at the caller's rate
# ---------------------------------------------------------------------------------------------
class Logger:
    def __init__(self, run_dir: Path, config: dict, track: bool = False, project: str = "edis", resume: bool = False):
        from torch.utils.tensorboard import SummaryWriter
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.writer = SummaryWriter(str(self.run_dir))
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a" if resume else "w")
        self.wandb = None
        if track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs wandb: `pip install wandb` (or drop --track)") from None
            self.wandb = wandb.init(project=project, name=self.run_dir.name, config=config, dir=str(self.run_dir),
                                    resume="allow", id=self.run_dir.name)

    def log(self, step: int, metrics: dict):
        metrics = {k: float(v) for k, v in metrics.items()}  # one host sync per log call, not per step
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def image(self, tag: str, png_path: Path, step: int):
        import matplotlib.image
        img = matplotlib.image.imread(png_path)[..., :3]
        self.writer.add_image(tag, img, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: wandb.Image(str(png_path))}, step=step)

    def close(self):
        self.writer.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


class Timer:
    """Accumulates wall-clock seconds per named phase (`with timer("env"): ...`). A long phase gives
    its amount of work and a label (`with timer("pools", total, "cycle 2: energy pools") as bar:`,
    then `bar.update(n)` as work completes); with `progress` on, it is shown as a second bar."""

    def __init__(self, progress: bool = False):
        self.total: dict[str, float] = {}
        self.progress = progress

    def __call__(self, name: str, work: int | None = None, label: str | None = None):
        timer = self

        class _Span:
            bar = None

            def __enter__(self):
                if timer.progress and work:
                    from tqdm import tqdm
                    self.bar = tqdm(total=work, desc=label or name, position=1, leave=False, mininterval=2.0,
                                    dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
                self.t = time.perf_counter()
                return self

            def update(self, n: int = 1):
                if self.bar is not None:
                    self.bar.update(n)

            def __exit__(self, *exc):
                timer.total[name] = timer.total.get(name, 0.0) + time.perf_counter() - self.t
                if self.bar is not None:
                    self.bar.close()
        return _Span()


# ---------------------------------------------------------------------------------------------
# The run: directory, logger, evaluation, checkpoint/resume, Ctrl-C, timing report, final line
# ---------------------------------------------------------------------------------------------
class Run:
    """Plumbing around a script's training loops. `state` holds what a checkpoint must restore
    (objects with state_dict); counters, timings and RNG states are added here."""

    def __init__(self, args, task: Task, obs_norm: Normalizer, reward_transform: tuple[float, float], state: dict,
                 header: dict | None = None):
        from tqdm import tqdm
        self.args, self.task, self.obs_norm, self.reward_transform = args, task, obs_norm, reward_transform
        self.check: TransitionCheck | None = None  # built at the first EDIS cycle
        self.dir = Path(args.resume or args.run_dir or f"runs/{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}")
        self.ckpt = self.dir / "checkpoint.pt"
        self.counters = {"offline_step": 0, "online_step": 0, "updates": 0, "diffusion_pretrained": False}
        self.timer = Timer(progress=True)
        self.last_eval: dict = {}
        self.state = {**state, "counters": self.counters, "timer": self.timer.total, "last_eval": self.last_eval}
        if args.resume:
            # on the CPU: RNG states must stay CPU tensors; each load_state_dict copies to its own device
            saved = load_checkpoint(self.ckpt, self.state)
            for k in ("counters", "timer", "last_eval"):
                self.state[k].update(saved[k])
            set_rng_state(saved["rng"])
        self.logger = Logger(self.dir, config_dict(args), args.track, resume=bool(args.resume))
        print(f"env: {args.env}   data: {task.source.location or args.dataset} ({len(task.data):,} transitions)\n"
              + "".join(f"{k}: {v}   " for k, v in (header or {}).items()).rstrip() + "\n"
              + (f"resuming {self.dir} at {self.counters}" if args.resume else
                 f"run dir: {self.dir}   (config.json has every flag; tensorboard --logdir {self.dir.parent})"), flush=True)
        self.evaluator = Evaluator(task.eval_env_fn, obs_norm, args.eval_episodes, args.seed + 10_000, task.ref,
                                   workers=eval_workers(args.eval_workers))
        self.bar = tqdm(total=args.offline_steps + args.online_steps, initial=self.step, dynamic_ncols=True, mininterval=1.0)
        self.stop_requested = False
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)

    def _request_stop(self, signum, _frame):
        self.stop_requested = True
        if signum == signal.SIGINT:  # a second Ctrl-C kills at once; a repeated SIGTERM (a cluster's
            signal.signal(signum, signal.SIG_DFL)  # own, after a scheduler's) must not lose the save
        self.bar.write("stopping after this step (again to kill now)")

    @property
    def step(self) -> int:
        return self.counters["offline_step"] + self.counters["online_step"]

    def tick(self, phase: str):
        """One offline update or online env step is complete: a safe point to stop at."""
        self.counters[f"{phase}_step"] += 1
        self.bar.update(1)

    def check_stop(self):
        if self.stop_requested:
            raise KeyboardInterrupt

    def log_train(self, metrics: dict):
        """Called once per learner update; writes to disk every log_every updates only."""
        self.counters["updates"] += 1
        if self.counters["updates"] % self.args.log_every == 0:
            self.logger.log(self.step, metrics)

    def evaluate_and_save(self, policy, phase: str):
        with self.timer("eval"):
            m = self.evaluator(policy)
        self.logger.log(self.step, {**m, "charts/phase_online": float(phase == "online")})
        self.bar.set_postfix_str(f"{phase} score {m.get('eval/normalized_score', m['eval/return']):.1f}")
        self.last_eval.clear()
        self.last_eval.update(m)
        self.save()

    def save(self):
        save_checkpoint(self.ckpt, {**self.state, "rng": rng_state()})

    def diagnose(self, samples: dict, states: dict, cycle: int) -> dict:
        """Env-specific EDIS diagnostics: each set of rows checked as the learner would consume it
        (TransitionCheck: `gen/{set}_{metric}`), and a picture of the state sets, saved in the run
        directory and logged."""
        if self.check is None:
            self.check = TransitionCheck(self.task, self.obs_norm, *self.reward_transform)
        m = {f"gen/{name}_{k}": v for name, b in samples.items() for k, v in self.check(b).items()}
        png = self.dir / f"edis_cycle{cycle}.png"
        state_scatter(png, states, self.obs_norm, maze=self.task.source.family in MAZE_FAMILIES, title=f"EDIS cycle {cycle}")
        self.logger.image("gen/states", png, self.step)
        return m

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # a stop signal, or one that also ended the evaluation workers (a cluster signals every process)
        if exc_type is KeyboardInterrupt or (self.stop_requested and exc_type and issubclass(exc_type, (EOFError, OSError))):
            self.save()
            self.bar.close()
            self.logger.close()
            self.evaluator.close()
            print(f"interrupted at {self.counters}; checkpoint saved. Continue with: "
                  f"python {Path(sys.argv[0]).name} --resume {self.dir}")
            sys.exit(130)

    def finish(self, generated: int = 0):
        """Timing breakdown and the final score line."""
        self.bar.close()
        t = self.timer.total
        timing = {f"time/{k}_s": v for k, v in t.items()}
        timing["time/learner_updates_per_s"] = self.counters["updates"] / max(t.get("learner", 0.0), 1e-9)
        if generated:
            timing["time/generated_samples_per_s"] = generated / max(t.get("generation", 0.0), 1e-9)
        self.logger.log(self.step, timing)
        print("timing: " + ", ".join(f"{k[5:]}={v:.1f}" for k, v in timing.items()))
        e = self.last_eval
        score = e.get("eval/normalized_score")
        print(f"final: env={self.args.env} seed={self.args.seed} edis={self.args.edis} "
              f"return={e.get('eval/return', float('nan')):.2f} success={e.get('eval/success', float('nan')):.2f} "
              + (f"normalized_score={score:.1f}" if score is not None else "normalized_score=n/a (no reference scores)"))
        self.logger.close()
        self.evaluator.close()


# ---------------------------------------------------------------------------------------------
# Checkpoints: one atomic file holding modules, optimizers, buffers, RNG states and counters
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def state_of(obj):
    """state_dict() of anything that has one, recursively through dicts; plain values as they are."""
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    if isinstance(obj, dict):
        return {k: state_of(v) for k, v in obj.items()}
    return obj


def save_checkpoint(path: Path, objects: dict):
    """Write atomically: a kill mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: state_of(v) for k, v in objects.items()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, objects: dict, map_location="cpu") -> dict:
    """Load into `objects` (those with load_state_dict) in place; returns the plain entries."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; the run stopped before its first checkpoint, start it again")
    state = torch.load(path, map_location=map_location, weights_only=False)
    load_into(objects, state)
    return state


def load_into(objects: dict, state: dict):
    for k, v in objects.items():
        if hasattr(v, "load_state_dict"):
            v.load_state_dict(state[k])
        elif isinstance(v, dict):
            load_into(v, state[k])


# ---------------------------------------------------------------------------------------------
# Command line: the shared flags, presets as defaults, checks shared by both scripts
# ---------------------------------------------------------------------------------------------
@dataclass
class RunArgs:
    """Flags both scripts share outside the EDIS section."""
    # --- run ---
    env: str = "Hopper-v4"
    """D4RL-style name (antmaze-large-diverse-v2, hopper-medium-v2, pen-human-v1, ...) or a gymnasium id with --dataset"""
    dataset: str | None = None
    """override the data: a Minari id (ns/name-vN), a D4RL-layout .hdf5 path, random:N or explore:N (momentum random walk; both work offline)"""
    preset: Literal["paper", "quick"] = "paper"
    """paper: the paper's sizes for --env's dataset; quick: a CPU-sized run (minutes) on random data, or on a scripted explorer's data for a maze --env"""
    seed: int = 0
    """seed of numpy, torch, the envs and the sampler"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to train; auto picks cuda when available"""
    exp_name: str = "edis"
    """experiment name used in the run directory"""
    run_dir: str | None = None
    """output directory (default runs/{env}__{exp_name}__{seed}__{time})"""
    resume: str | None = None
    """continue the stopped run in this directory from its last checkpoint (its config is reused)"""
    track: bool = False
    """also log to Weights & Biases (needs `pip install wandb`)"""
    # --- schedule ---
    offline_steps: int = 1_000_000
    """learner updates on the offline data"""
    online_steps: int = 200_000
    """environment steps of online fine-tuning"""
    utd: int = 1
    """learner updates per environment step"""
    batch_size: int = 256
    """learner batch size"""
    eval_every: int = 5_000
    """online env steps between evaluations (and checkpoints)"""
    offline_eval_every: int = 50_000
    """offline updates between evaluations (and checkpoints)"""
    eval_episodes: int = 10
    """episodes per evaluation (deterministic policy)"""
    eval_workers: int = 0
    """processes stepping the evaluation episodes: 1 = all in the main process; 0 = one per CPU core beyond the first (1 on a 2-core machine), at most --eval-episodes"""
    log_every: int = 1_000
    """learner updates between training-metric logs"""
    normalize_states: bool = True
    """standardize observations with the offline data's mean and std"""
    compile: bool = False
    """torch.compile the learner's losses (forward and backward): fewer kernel launches on a GPU; 7-14 s of compiling at the start, 1.05x (IQL) to 1.16x (Cal-QL) on a CPU"""


# --preset quick: the whole pipeline (offline, pretraining, 3 EDIS cycles, evaluation) on Hopper
# random data, small enough for a 2-core CPU in minutes; needs no download. 1,500 fine-tune steps
# per cycle on batches 80% online: with 500 steps at 50% the model had not learned the region the
# policy visits, and guided samples there had 2.4x the unguided dynamics error in cycle 1 (1.1x
# with these; design §3.9).
QUICK = dict(dataset="random:20000", offline_steps=5_000, online_steps=6_000, edis_start=1_500, edis_every=1_500,
             diffusion_width=256, diffusion_depth=3, diffusion_pretrain_steps=3_000, diffusion_finetune_steps=1_500, online_share=0.8,
             sample_steps=32, num_generated=10_000, gen_batch_size=10_000, pool_size=5_000, energy_steps=1_000,
             eval_every=2_000, offline_eval_every=5_000, eval_episodes=5, log_every=500, diag_samples=1_000)


def quick_defaults(env: str) -> dict:
    """--preset quick for --env: QUICK; on a goal maze (--preset quick --env PointMaze_UMaze-v3) the
    momentum random walk's data, since uniform random actions barely leave the start cell, and 20
    evaluation episodes, since success is a rate."""
    if family_of(env) in MAZE_FAMILIES:
        return {**QUICK, "dataset": "explore:20000", "eval_episodes": 20}
    return QUICK


def parse_args(args_cls, preset_defaults, description: str, argv=None):
    """Two passes: --env/--dataset/--preset/--resume pick the defaults (the paper preset of the env,
    or a resumed run's config), then every flag overrides them, so `--env X --help` shows X's values."""
    import argparse
    from dataclasses import replace

    import tyro
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    for f in ("--env", "--dataset", "--preset", "--resume"):
        pre.add_argument(f)
    known, _ = pre.parse_known_args(argv)
    if known.resume:
        cfg = Path(known.resume) / "config.json"
        if not cfg.exists():
            raise UserError(f"--resume {known.resume}: no config.json there; pass the run directory of a started run")
        saved = json.loads(cfg.read_text())
        defaults = args_cls(**{k: v for k, v in saved.items() if k in args_cls.__dataclass_fields__})
    else:
        try:
            defaults = replace(args_cls(), **preset_defaults(known.env or args_cls.env, known.dataset, known.preset or "paper"))
        except UserError:  # no preset for an unresolvable --env; load_task reports it after parsing (--help still works)
            defaults = args_cls()
    return tyro.cli(args_cls, default=defaults, args=argv, description=description)


def validate_args(args):
    """Checks on the flags both scripts share; each message names the flag and the valid range."""
    checks = [
        (args.offline_steps >= 0 and args.online_steps >= 0, "--offline-steps and --online-steps must be >= 0"),
        (0.0 <= args.generated_ratio <= 1.0, f"--generated-ratio must be in [0, 1], got {args.generated_ratio}"),
        (0.0 <= args.online_share <= 1.0, f"--online-share must be in [0, 1], got {args.online_share}"),
        (args.utd >= 1 and args.batch_size >= 1, "--utd and --batch-size must be >= 1"),
        (args.edis_every >= 1 and args.edis_start >= 1, "--edis-every and --edis-start must be >= 1"),
        (args.eval_every >= 1 and args.offline_eval_every >= 1, "--eval-every and --offline-eval-every must be >= 1"),
        (args.eval_episodes >= 1 and args.log_every >= 1, "--eval-episodes and --log-every must be >= 1"),
        (args.eval_workers >= 0, f"--eval-workers must be >= 0 (0 = one per core), got {args.eval_workers}"),
        (args.sample_steps >= 2, "--sample-steps must be >= 2"),
        (math.isfinite(args.sigma_max) and args.sigma_max > 0.1,
         f"--sigma-max must be finite and above 0.1 (the data are standardized; EDM's value is 80), got {args.sigma_max}"),
        (min(args.num_generated, args.pool_size, args.gen_batch_size, args.positive_buffer_size, args.diag_samples) >= 10,
         "--num-generated, --pool-size, --gen-batch-size, --positive-buffer-size and --diag-samples must be >= 10"),
        (min(args.diffusion_width, args.diffusion_depth, args.energy_negatives, args.energy_batch_size) >= 1,
         "--diffusion-width, --diffusion-depth, --energy-negatives and --energy-batch-size must be >= 1"),
        (min(args.diffusion_pretrain_steps, args.diffusion_finetune_steps, args.energy_steps) >= 0,
         "--diffusion-pretrain-steps, --diffusion-finetune-steps and --energy-steps must be >= 0"),
        (args.transition_negatives != "same-sa" or args.pool_size >= 10 * args.energy_negatives,
         f"--transition-negatives same-sa needs --pool-size >= 10 x --energy-negatives ({10 * args.energy_negatives}): "
         f"the pool holds --energy-negatives inpaintings per real row"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def config_dict(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(args)}
