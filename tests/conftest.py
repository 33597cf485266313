"""Test isolation and small data builders shared by the tests.

Every test runs with its own empty Minari and D4RL directories and with the network cut, so no test
reads ~/.minari or ~/.d4rl, and none can download anything (on a networked CI machine either)."""
import os
from contextlib import contextmanager
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # study, summarize, benchmark, make_data
# Set before huggingface_hub is imported anywhere: it reads the variable once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import common  # noqa: E402


def _network_disabled(*args, **kwargs):
    raise OSError("network access is disabled in the tests")


@pytest.fixture(autouse=True)
def offline_dirs(tmp_path, monkeypatch):
    """Fresh, empty Minari and D4RL dataset directories for each test, and no network."""
    minari_dir, d4rl_dir = tmp_path / "minari", tmp_path / "d4rl"
    minari_dir.mkdir()
    d4rl_dir.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_dir))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(d4rl_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(common, "D4RL_CACHE", d4rl_dir)  # common reads the variable at import
    monkeypatch.setattr(socket, "create_connection", _network_disabled)
    return {"minari": minari_dir, "d4rl": d4rl_dir}


def write_hdf5(path, **arrays):
    """Write flat datasets `arrays` (name -> array) to a new HDF5 file, the D4RL layout."""
    import h5py
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=np.asarray(v))
    return path


def d4rl_arrays(lengths, terminated, obs_dim=11, act_dim=3):
    """D4RL-layout arrays for episodes of the given lengths with distinct, known values.

    Episode e, step t has observation 100*e + t + 0.01*dim, reward 10*e + t and action in [-1, 1].
    `terminated[e]` says whether episode e ends in a termination (else in a timeout)."""
    obs, nxt, act, rew, term, tout = [], [], [], [], [], []
    for e, (T, te) in enumerate(zip(lengths, terminated)):
        o = 100.0 * e + np.arange(T + 1)[:, None] + 0.01 * np.arange(obs_dim)[None, :]
        obs.append(o[:-1]); nxt.append(o[1:])
        act.append(np.tanh(np.arange(T * act_dim).reshape(T, act_dim) * 0.1 + e))
        rew.append(10.0 * e + np.arange(T))
        end = np.zeros(T, bool)
        end[-1] = True
        term.append(end & te); tout.append(end & (not te))
    cat = np.concatenate
    return {"observations": cat(obs).astype(np.float32), "actions": cat(act).astype(np.float32),
            "rewards": cat(rew).astype(np.float32), "terminals": cat(term), "timeouts": cat(tout),
            "next_observations": cat(nxt).astype(np.float32)}


@pytest.fixture(name="write_hdf5")
def write_hdf5_fixture():
    return write_hdf5


@pytest.fixture(name="d4rl_arrays")
def d4rl_arrays_fixture():
    return d4rl_arrays


def make_minari_dataset(dataset_id, episodes, env_id, **kwargs):
    """Create a local Minari dataset from `episodes`: dicts with observations (T+1, ...), actions (T, ...),
    rewards, terminations and truncations (T each). `kwargs` go to create_dataset_from_buffers."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer
    buffers = [EpisodeBuffer(id=i, observations=ep["observations"], actions=ep["actions"],
                             rewards=list(ep["rewards"]), terminations=list(ep["terminations"]),
                             truncations=list(ep["truncations"])) for i, ep in enumerate(episodes)]
    env = gym.make(env_id)
    kwargs = {"algorithm_name": "test", "author": "test", "author_email": "-", "code_permalink": "-",
              "description": "made by the tests", **kwargs}
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env, **kwargs)
    env.close()
    return dataset_id


@pytest.fixture(name="make_minari_dataset")
def make_minari_dataset_fixture():
    return make_minari_dataset


@contextmanager
def one_thread():
    """Tiny networks run faster on one thread (and do not fight the other tests for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class HostSyncs:
    """Counts, on the CPU, the ops that on a GPU make the host wait for the device: a tensor turned
    into a Python value (`.item()`, `bool(t)`, `float(t)`: aten._local_scalar_dense) and ops whose
    output size depends on the data (nonzero, masked_select, unique, repeat_interleave with tensor
    repeats, boolean-mask indexing and assignment). Not seen: `.tolist()` and `.cpu()` / `.numpy()`
    (on the CPU they dispatch nothing; test_sampler_has_no_host_sync patches them instead). The
    optimizers' step counters are host-side in non-capturable mode and are not counted.
    Use: `with HostSyncs() as s: ...`, then `s.seen`: (op, [file:line of the repo's frames])."""

    def __enter__(self):
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode
        aten = torch.ops.aten
        syncing = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                   aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                   aten.repeat_interleave.Tensor}
        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                masked = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                    i is not None and i.dtype == torch.bool for i in args[1])
                if func in syncing or masked:
                    stack = traceback.extract_stack()
                    if not any("/torch/optim/" in f.filename for f in stack):
                        seen.append((str(func), [f"{Path(f.filename).name}:{f.lineno}" for f in stack
                                                 if str(ROOT) in f.filename and "/tests/" not in f.filename]))
                return func(*args, **(kwargs or {}))
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
