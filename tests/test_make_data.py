"""tools/make_data.py: a tiny SAC run writes D4RL-layout medium / medium-replay files that both scripts
load and run on; a second call with the same settings reuses them; bad input is one error line."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

from test_cli import SEEDS, child_env, describe, with_flags  # noqa: E402  the scripts' tiny-run flags

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_data.py"
TINY = ["--env", "Hopper-v4", "--max-steps", "400", "--eval-every", "200", "--eval-episodes", "1",
        "--learning-starts", "100", "--medium-size", "300"]
KEYS = {"observations": np.float32, "actions": np.float32, "rewards": np.float32,
        "next_observations": np.float32, "terminals": np.bool_, "timeouts": np.bool_}


def tool(args, d):
    env = child_env(d) | ({"TMPDIR": str(d["tmp"])} if "tmp" in d else {})
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    base = tmp_path_factory.mktemp("make_data")
    d = {"minari": base / "minari", "d4rl": base / "d4rl", "out": base / "out", "tmp": base / "tmp"}
    d["minari"].mkdir(), d["d4rl"].mkdir(), d["tmp"].mkdir()
    first = tool([*TINY, "--out", str(d["out"])], d)
    assert first.returncode == 0, describe(first)
    return d, first


def test_writes_d4rl_layout_files(made):
    d, first = made
    lengths = {"hopper-medium-replay": 400, "hopper-medium": 300}
    for name, n in lengths.items():
        path = d["out"] / f"{name}.hdf5"
        assert str(path) in first.stdout
        with h5py.File(path, "r") as f:
            assert set(f) == set(KEYS)
            arr = {k: f[k][()] for k in KEYS}
            attrs = dict(f.attrs)
        for k, dtype in KEYS.items():
            assert arr[k].dtype == dtype and len(arr[k]) == n, k
        assert arr["observations"].shape == arr["next_observations"].shape == (n, 11) and arr["actions"].shape == (n, 3)
        assert np.all(np.abs(arr["actions"]) <= 1)
        term, tout = arr["terminals"], arr["timeouts"]
        ends = term | tout
        assert not np.any(term & tout) and ends[-1] and term.any()  # untrained hoppers fall
        # within an episode the next observation is the next row's observation; at an end it is not
        cont = np.all(arr["next_observations"][:-1] == arr["observations"][1:], axis=1)
        assert np.array_equal(cont, ~ends[:-1])
        for k in ("env", "seed", "sac_steps", "policy_normalized_score", "version", "config"):
            assert k in attrs, k
        assert attrs["env"] == "Hopper-v4" and attrs["seed"] == 0 and attrs["sac_steps"] == 400
    with h5py.File(d["out"] / "hopper-medium.hdf5", "r") as f:
        assert "mean_return" in f.attrs and "normalized_score" in f.attrs
    assert first.stdout.count("steps/s") == 2  # one line per evaluation (steps 200, 400)


def test_leaves_no_folder_in_tmp(made):
    """SB3's default logger makes an empty SB3-<date> folder in the temp dir on every learn()."""
    d, _ = made
    assert not list(d["tmp"].glob("SB3-*")), sorted(p.name for p in d["tmp"].iterdir())


def test_second_call_reuses_the_files(made):
    d, _ = made
    before = {p: p.stat().st_mtime_ns for p in d["out"].iterdir()}
    again = tool([*TINY, "--out", str(d["out"])], d)
    assert again.returncode == 0, describe(again)
    assert "skipped" in again.stdout and "steps/s" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in d["out"].iterdir()} == before  # no .tmp left, nothing rewritten


def test_a_seed_makes_the_same_files(made, tmp_path, offline_dirs):
    d, _ = made
    again = tool([*TINY, "--out", str(tmp_path / "again")], offline_dirs)
    assert again.returncode == 0, describe(again)
    for name in ("hopper-medium-replay", "hopper-medium"):
        with h5py.File(d["out"] / f"{name}.hdf5", "r") as a, h5py.File(tmp_path / "again" / f"{name}.hdf5", "r") as b:
            for k in KEYS:
                assert np.array_equal(a[k][()], b[k][()]), (name, k)
            assert a.attrs["policy_return"] == b.attrs["policy_return"]


@pytest.mark.parametrize("script", ["edis_iql.py", "edis_calql.py"])
def test_scripts_run_on_the_files(made, script):
    d, _ = made
    d = {**d, "runs": d["out"].parent / "runs"}
    data = d["out"] / ("hopper-medium-replay.hdf5" if script == "edis_iql.py" else "hopper-medium.hdf5")
    args = with_flags(SEEDS, dataset=data, run_dir=d["runs"] / script[:-3])
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=child_env(d), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, describe(p)
    assert "final:" in p.stdout


@pytest.mark.parametrize("args, says", [(["--env", "Ant-v4"], "unknown --env 'Ant-v4'"),
                                        (["--max-steps", "0"], "--max-steps must be at least 1"),
                                        (["no-sb3"], "tools/make_data.py needs stable-baselines3: pip install -r "
                                                     "tools/requirements.txt")])
def test_bad_input_is_one_error_line(args, says, tmp_path, offline_dirs):
    if args == ["no-sb3"]:  # stable-baselines3 not installed: the tool says how to install it
        run = f"import sys, runpy; sys.modules['stable_baselines3'] = None; sys.argv = ['make_data.py', " \
              f"'--out', {str(tmp_path / 'out')!r}]; runpy.run_path({str(TOOL)!r}, run_name='__main__')"
        p = subprocess.run([sys.executable, "-c", run], cwd=ROOT, env=child_env(offline_dirs), capture_output=True,
                           text=True, timeout=120)
    else:
        p = tool([*args, "--out", str(tmp_path / "out")], offline_dirs)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {says}"), p.stderr
    assert not (tmp_path / "out").exists()
