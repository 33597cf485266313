"""End-to-end tests of the command line of edis_iql.py and edis_calql.py (same flags, same contract).

The scripts run as subprocesses (cwd = repo root) on a random:3000 Hopper dataset collected once per
session into a temporary Minari directory; every run writes into a temporary --run-dir. The longer
runs (smoke, --no-edis, stop/resume, seeds) of the selected tests all start, two at a time (the
machine has two cores; each child runs on one thread), when the first test of this file starts; the
quick tests run meanwhile and each long test then waits for its own run.
"""
import importlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

SCRIPTS = ["edis_iql.py", "edis_calql.py"]
script_param = pytest.mark.parametrize("script", SCRIPTS, ids=[s[:-3] for s in SCRIPTS])

# docs/design.md §8: generated_ratio per dataset (IQL / Cal-QL); the default without a preset is 0.5.
PRESET_RATIO = {"edis_iql.py": {"hopper-medium-v2": 0.2, "hopper-random-v2": 0.8},
                "edis_calql.py": {"hopper-medium-v2": 0.2, "hopper-random-v2": 0.2}}
DEFAULT_RATIO = 0.5

OFFLINE, ONLINE, EDIS_START, EDIS_EVERY, EVAL_EVERY = 200, 600, 200, 300, 300  # cycles at online 200, 500
# The smoke command, plus --pool-size 2000 and --batch-size 32: one Cal-QL update at batch 256 costs
# ~0.13 s on one CPU core (CQL over 10 sampled actions), which alone would break the time budget.
SMOKE = ["--env", "Hopper-v4", "--dataset", "random:3000", "--device", "cpu",
         "--offline-steps", str(OFFLINE), "--online-steps", str(ONLINE),
         "--edis-start", str(EDIS_START), "--edis-every", str(EDIS_EVERY),
         "--diffusion-width", "64", "--diffusion-depth", "2", "--diffusion-pretrain-steps", "100",
         "--diffusion-finetune-steps", "50", "--sample-steps", "8", "--num-generated", "1000",
         "--energy-steps", "50", "--eval-every", str(EVAL_EVERY), "--eval-episodes", "2",
         "--pool-size", "2000", "--batch-size", "32"]


def flag(args: list[str], name: str) -> str:
    """Value of `name` in an argument list (the last occurrence wins, as in argparse)."""
    return args[len(args) - 1 - args[::-1].index(name) + 1]


def with_flags(args: list[str], **new) -> list[str]:
    """args with --k v replaced (k given with underscores)."""
    out = list(args)
    for k, v in new.items():
        name = "--" + k.replace("_", "-")
        if name in out:
            out[out.index(name) + 1] = str(v)
        else:
            out += [name, str(v)]
    return out


# Resume: the smoke run, stopped after its first online evaluation (online step 300, after the first
# EDIS cycle at 200), then resumed to the end (second cycle at 500, last evaluation at 600).
RESUME = list(SMOKE)
# Seeds: EDIS on (one cycle at online step 50, whose samples then feed the learner), all tiny.
SEEDS = with_flags(SMOKE, offline_steps=60, online_steps=100, edis_start=50, edis_every=1000, eval_every=50,
                   offline_eval_every=30, diffusion_width=32, diffusion_depth=1, diffusion_pretrain_steps=20,
                   diffusion_finetune_steps=10, sample_steps=4, num_generated=200, gen_batch_size=200,
                   pool_size=200, diag_samples=200, energy_steps=10, positive_buffer_size=100, batch_size=16)

FLAGS = ("--env --dataset --seed --device --offline-steps --online-steps --utd --generated-ratio --edis "
         "--no-edis --edis-start --edis-every --num-generated --sample-steps --diffusion-width --diffusion-depth "
         "--diffusion-pretrain-steps --diffusion-finetune-steps --diffusion-restart --energy-steps "
         "--state-guidance --policy-guidance --transition-guidance --positive-buffer-size --eval-every "
         "--eval-episodes --run-dir --resume --track").split()


# ---------------------------------------------------------------------------------------------
# Running the scripts
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dirs(tmp_path_factory):
    """A session-wide Minari directory with random:3000 Hopper data collected once (the same call the
    scripts make, so they find it), and a root for run directories."""
    base = tmp_path_factory.mktemp("cli")
    d = {"minari": base / "minari", "d4rl": base / "d4rl", "runs": base / "runs"}
    for p in d.values():
        p.mkdir()
    subprocess.run([sys.executable, "-c", "import common; common.collect_random('Hopper-v4', 3000)"],
                   cwd=ROOT, env=child_env(d), check=True, capture_output=True, timeout=300)
    return d


def child_env(d) -> dict:
    env = dict(os.environ)
    env.update(MINARI_DATASETS_PATH=str(d["minari"]), D4RL_DATASET_DIR=str(d["d4rl"]), HF_HUB_OFFLINE="1",
               MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="100")
    env.pop("WANDB_API_KEY", None)
    return env


def run(script, args, d, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], check=False, cwd=ROOT, env=child_env(d), capture_output=True,
                          text=True, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def evals(recs):
    return [r for r in recs if "eval/return" in r]


def cycles(recs):
    return [r for r in recs if "edis/cycle" in r]


def describe(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout (tail) ---\n{p.stdout[-3000:]}\n--- stderr (tail) ---\n{p.stderr[-3000:]}"


def resume_job(script, d) -> dict:
    """Start a run, stop it with SIGINT once it has logged an online evaluation, then resume it.
    The first process writes to files, not pipes: nobody reads a pipe while we wait, and a full one
    (tqdm writes to stderr) would block the child."""
    run_dir = d["runs"] / script[:-3] / "resume"
    logs = d["runs"] / script[:-3] / "resume_first"
    logs.mkdir(parents=True)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        p = subprocess.Popen([sys.executable, script, *RESUME, "--run-dir", str(run_dir)], cwd=ROOT,
                             env=child_env(d), stdout=out, stderr=err)
        deadline, online_seen = time.time() + 500, False
        while time.time() < deadline and p.poll() is None and not online_seen:
            try:
                online_seen = any(r.get("charts/phase_online") == 1.0 for r in records(run_dir))
            except json.JSONDecodeError:  # a line being written
                pass
            time.sleep(0.2)
        if online_seen and p.poll() is None:
            p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    first = subprocess.CompletedProcess(p.args, p.returncode, (logs / "stdout").read_text(),
                                        (logs / "stderr").read_text())
    before = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""
    second = run(script, ["--resume", str(run_dir)], d) if first.returncode == 130 else None
    return {"run_dir": run_dir, "online_seen": online_seen, "first": first, "before": before, "second": second}


JOBS = {  # test function -> the background runs it needs: name -> args, or a callable(script, dirs)
    "test_resume_after_sigint": {"resume": resume_job},
    "test_smoke_contract": {"smoke": SMOKE},
    "test_no_edis_runs_the_baseline": {"noedis": SMOKE + ["--no-edis"]},
    "test_seed_reproduces_the_run": {"seed0": SEEDS + ["--seed", "0"], "seed0_again": SEEDS + ["--seed", "0"],
                                     "seed1": SEEDS + ["--seed", "1"]},
    "test_edis_and_no_edis_runs_of_a_seed_are_paired": {"seed0_noedis": SEEDS + ["--seed", "0", "--no-edis"]},
}


class Runner:
    """Runs, two at a time, the background runs that the selected tests need; longest first."""

    def __init__(self, d, items):
        self.d, self.pool, self.futures = d, ThreadPoolExecutor(max_workers=2), {}
        wanted = {(it.callspec.params["script"], it.originalname) for it in items
                  if it.originalname in JOBS and hasattr(it, "callspec") and "script" in it.callspec.params}
        for test, jobs in JOBS.items():
            for script in reversed(SCRIPTS):  # Cal-QL's runs are the slower ones
                if (script, test) in wanted:
                    for name, job in jobs.items():
                        self.futures[(script, name)] = self._start(script, name, job)

    def _start(self, script, name, job):
        if callable(job):
            return self.pool.submit(job, script, self.d)
        run_dir = self.d["runs"] / script[:-3] / name
        return self.pool.submit(lambda: (run(script, [*job, "--run-dir", str(run_dir)], self.d), run_dir))

    def get(self, script, name):
        if (script, name) not in self.futures:  # a test selected in an unusual way: run it now
            test = next(t for t, jobs in JOBS.items() if name in jobs)
            self.futures[(script, name)] = self._start(script, name, JOBS[test][name])
        return self.futures[(script, name)].result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def runner(dirs, request):
    r = Runner(dirs, request.session.items)
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _background_runs(runner):
    """Start the long runs with the first test of this file, so the quick tests overlap them."""


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def assert_monotone_steps(recs):
    steps = [r["step"] for r in recs]
    back = [(a, b) for a, b in itertools.pairwise(steps) if b < a]
    assert not back, f"metrics.jsonl steps go backwards: {back[:5]}"


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, no traceback, non-zero exit
# ---------------------------------------------------------------------------------------------
BAD = {
    "negative_offline_steps": (["--env", "Hopper-v4", "--dataset", "random:3000", "--offline-steps", "-5"],
                               ["--offline-steps"]),
    "generated_ratio_above_1": (["--env", "Hopper-v4", "--dataset", "random:3000", "--generated-ratio", "1.5"],
                                ["--generated-ratio", "1.5"]),
    "online_share_above_1": (["--env", "Hopper-v4", "--dataset", "random:3000", "--online-share", "1.5"],
                             ["--online-share", "1.5"]),
    "sigma_max_infinite": (["--env", "Hopper-v4", "--dataset", "random:3000", "--sigma-max", "inf"],
                           ["--sigma-max", "inf"]),
    "unknown_env": (["--env", "foo"], ["foo"]),
    "absent_antmaze_dataset": (["--env", "antmaze-large-diverse-v2"], ["minari download", "D4RL/antmaze/large-diverse"]),
    "resume_without_config": (None, ["--resume", "config.json"]),
}


@script_param
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(script, case, dirs, tmp_path):
    """Each kind of bad input: non-zero exit, exactly one stderr line `error: ...` naming the problem,
    no traceback, no run directory left behind; a dataset absent offline is reported with the command
    that fetches it (the hub probe's message; a download attempted without the probe fails with
    another one). No time bound: on a loaded 2-core machine a bare start of the script takes ~15 s."""
    args, words = BAD[case]
    run_dir = tmp_path / "run"
    if args is None:
        (tmp_path / "empty").mkdir()
        args = ["--resume", str(tmp_path / "empty")]
    else:
        args = args + ["--device", "cpu", "--run-dir", str(run_dir)]
    p = run(script, args, dirs, timeout=120)
    assert p.returncode != 0, describe(p)
    assert "Traceback" not in p.stderr, describe(p)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(p)
    for w in words:
        assert w in lines[0], f"{w!r} not named in: {lines[0]}"
    assert not run_dir.exists(), "a run directory was created for a run that could not start"


# ---------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------
def help_default(text: str, name: str) -> str:
    """The '(default: ...)' of flag `name` in tyro's boxed, wrapped help."""
    flat = " ".join(ln.strip(" │╭╮╰╯─") for ln in text.splitlines())
    flat = re.sub(r"\s+", " ", flat)
    m = re.search(re.escape(name) + r"(?![\w-]).*?\(default: ([^)]*)\)", flat)
    assert m, f"no default shown for {name}"
    return m[1].strip()


@script_param
def test_help_lists_every_flag_and_preset_defaults(script, dirs, capsys, monkeypatch):
    """--help exits 0 and lists every documented flag; `--env D --help` shows D's preset generated
    ratio (docs/design.md §8), not the plain default (in-process, to spare a process start per dataset)."""
    p = run(script, ["--help"], dirs, timeout=120)
    assert p.returncode == 0, describe(p)
    missing = [f for f in FLAGS if not re.search(re.escape(f) + r"(?![\w-])", p.stdout)]
    assert not missing, f"--help does not list {missing}"
    assert float(help_default(p.stdout, "--generated-ratio")) == DEFAULT_RATIO
    mod = importlib.import_module(script[:-3])
    monkeypatch.setenv("COLUMNS", "100")
    for env, ratio in PRESET_RATIO[script].items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            mod.main(["--env", env, "--help"])
        assert done.value.code == 0, env
        assert float(help_default(capsys.readouterr().out, "--generated-ratio")) == ratio, env


@script_param
def test_quick_preset_takes_explorer_data_on_a_maze(script):
    """--preset quick is random data on Hopper; on a PointMaze it is the momentum random walk's data
    (uniform random actions barely leave the start cell) with 20 evaluation episodes, and IQL's
    expectile 0.9 (the study's maze setting). A flag still overrides each."""
    mod = importlib.import_module(script[:-3])

    def parsed(*argv):
        return common.parse_args(mod.Args, mod.preset_defaults, "", ["--preset", "quick", *argv])
    hop, maze = parsed(), parsed("--env", "PointMaze_UMaze-v3")
    assert (hop.env, hop.dataset, hop.eval_episodes, hop.offline_steps) == ("Hopper-v4", "random:20000", 5, 5_000)
    assert (maze.dataset, maze.eval_episodes, maze.offline_steps) == ("explore:20000", 20, 5_000)
    if script == "edis_iql.py":
        assert (hop.expectile, maze.expectile) == (0.7, 0.9)
    over = parsed("--env", "PointMaze_UMaze-v3", "--dataset", "random:500", "--eval-episodes", "3")
    assert (over.dataset, over.eval_episodes) == ("random:500", 3)


# ---------------------------------------------------------------------------------------------
# Stop requests on evaluation steps (in-process, deterministic)
# ---------------------------------------------------------------------------------------------
STOP_CASES = [  # global step during which the stop request arrives (offline 20 steps, online 10)
    pytest.param(10, id="offline_eval_step"),
    pytest.param(20, id="last_offline_step"),
    pytest.param(25, id="online_eval_step"),
    pytest.param(30, id="last_step"),  # nothing left to run after --resume: the final line must still hold
]


@script_param
@pytest.mark.parametrize("stop_at", STOP_CASES)
def test_stop_on_an_evaluation_step_keeps_the_evaluation(script, stop_at, dirs, tmp_path, monkeypatch, capsys):
    """A stop request (what SIGINT triggers) that arrives during a step on which an evaluation is
    scheduled: after --resume every scheduled evaluation is logged exactly once, and the resumed run's
    final line states the last evaluation's score. The request is made deterministically, in-process,
    by calling the SIGINT handler that main() installed when the step counter reaches `stop_at`
    (offline 20 updates with evaluations every 10; online 10 env steps with evaluations every 5)."""
    mod = importlib.import_module(script[:-3])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(dirs["minari"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fired = []
    tick = common.Run.tick

    def tick_then_stop(self, phase):
        tick(self, phase)
        if self.step == stop_at and not fired:
            fired.append(self.step)
            handler = signal.getsignal(signal.SIGINT)
            assert callable(handler), "main() installed no SIGINT handler"
            handler(signal.SIGINT, None)

    monkeypatch.setattr(common.Run, "tick", tick_then_stop)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    run_dir = tmp_path / "run"
    argv = ["--env", "Hopper-v4", "--dataset", "random:3000", "--device", "cpu", "--no-edis", "--offline-steps", "20",
            "--online-steps", "10", "--offline-eval-every", "10", "--eval-every", "5", "--eval-episodes", "1",
            "--batch-size", "32", "--run-dir", str(run_dir)]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as stopped:
            mod.main(argv)
        assert stopped.value.code == 130 and fired == [stop_at]
        capsys.readouterr()
        mod.main(["--resume", str(run_dir)])
    finally:
        torch.set_num_threads(torch_threads)
        for s, h in handlers.items():
            signal.signal(s, h)
    ev = evals(records(run_dir))
    assert [r["step"] for r in ev] == [10, 20, 25, 30]
    final = last_line(capsys.readouterr().out)
    assert final.startswith("final:"), final
    m = re.search(r"normalized_score=(-?[0-9.]+)", final)
    assert m and float(m[1]) == pytest.approx(ev[-1]["eval/normalized_score"], abs=0.051), final


# ---------------------------------------------------------------------------------------------
# The smoke contract
# ---------------------------------------------------------------------------------------------
def cfg_energy_steps(run_dir) -> int:
    return json.loads((run_dir / "config.json").read_text())["energy_steps"]


@script_param
def test_smoke_contract(script, runner):
    """The whole pipeline on a tiny config: evaluations at the steps the flags say, two EDIS cycles
    with their diagnostics and pictures, config, checkpoint, a timing line and a final line whose
    score is the last evaluation's."""
    p, run_dir = runner.get(script, "smoke")
    assert p.returncode == 0, describe(p)
    recs = records(run_dir)
    assert_monotone_steps(recs)

    # evaluations: end of the offline phase, then every --eval-every online steps and at the end
    ev = evals(recs)
    expected_steps = [OFFLINE] + [OFFLINE + s for s in range(EVAL_EVERY, ONLINE + 1, EVAL_EVERY)]
    assert [r["step"] for r in ev] == expected_steps
    assert [r["charts/phase_online"] for r in ev] == [0.0] + [1.0] * (len(ev) - 1)
    for r in ev:
        assert math.isfinite(r["eval/return"]) and math.isfinite(r["eval/normalized_score"])
        # Hopper's D4RL reference scores (docs/design.md §6)
        assert r["eval/normalized_score"] == pytest.approx(100 * (r["eval/return"] + 20.272305) / (3234.3 + 20.272305))

    # EDIS cycles: at online steps edis_start, edis_start + edis_every, ...
    cy = cycles(recs)
    cycle_steps = list(range(EDIS_START, ONLINE, EDIS_EVERY))  # none at the last step: nothing would train on it
    assert len(cycle_steps) >= 2
    assert [r["step"] for r in cy] == [OFFLINE + s for s in cycle_steps]
    assert [r["edis/cycle"] for r in cy] == list(range(1, len(cycle_steps) + 1))
    for r in cy:
        for name in ("unguided", "guided"):
            for m in ("policy_logprob", "state_mmd", "actions_out_of_box"):
                key = f"gen/{name}_{m}"
                assert key in r and math.isfinite(r[key]), key
            assert r[f"gen/{name}_state_mmd"] >= -1e-6 and 0 <= r[f"gen/{name}_actions_out_of_box"] <= 1
        # what the learner consumes, against the simulator (Hopper random data has terminals)
        for name in ("unguided", "guided", "inpainted", "positive"):
            for m in ("dynamics_mse", "reward_mse"):
                assert math.isfinite(r[f"gen/{name}_{m}"]) and r[f"gen/{name}_{m}"] >= 0, (name, m)
            for m in ("dynamics_tail", "terminal_error"):
                assert 0.0 <= r[f"gen/{name}_{m}"] <= 1.0, (name, m)
            assert f"gen/{name}_wall_crossing" not in r  # mazes only
        # real rows replay exactly, except where Hopper's observation clips a velocity at +-10
        assert r["gen/positive_dynamics_tail"] <= 0.05 and r["gen/positive_terminal_error"] <= 0.05
        for name in ("unguided", "guided", "positive"):  # the check without a simulator
            assert 0.0 <= r[f"gen/{name}_self_tail"] <= 1.0, name
        assert 0.0 <= r["gen/nonfinite_dropped"] <= 1.0
        assert r["edis/fallback"] in (0.0, 1.0)
        for k in ("state", "policy", "transition"):
            assert r[f"edis/{k}_guides"] in (0.0, 1.0) and 0 <= r[f"energy/{k}_best_step"] <= cfg_energy_steps(run_dir)
        for k in ("state", "policy", "transition"):
            for suffix in ("", "_low_sigma"):
                assert 0.0 <= r[f"energy/{k}_heldout_top1{suffix}"] <= 1.0
                assert math.isfinite(r[f"energy/{k}_heldout_loss{suffix}"])
    pngs = sorted(run_dir.glob("*.png"))
    assert len(pngs) == len(cycle_steps), pngs
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["offline_steps"] == OFFLINE and cfg["online_steps"] == ONLINE and cfg["edis"] is True
    assert cfg["env"] == "Hopper-v4" and cfg["dataset"] == "random:3000"

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["counters"]["offline_step"] == OFFLINE and ckpt["counters"]["online_step"] == ONLINE

    assert any(ln.startswith("timing:") for ln in p.stdout.splitlines()), describe(p)
    final = last_line(p.stdout)
    assert final.startswith("final:"), describe(p)
    m = re.search(r"normalized_score=(-?[0-9.]+)", final)
    assert m, final
    assert float(m[1]) == pytest.approx(ev[-1]["eval/normalized_score"], abs=0.051)


@script_param
def test_no_edis_runs_the_baseline(script, runner):
    """--no-edis: same loop and evaluations, but no diffusion, energies, cycles or pictures."""
    p, run_dir = runner.get(script, "noedis")
    assert p.returncode == 0, describe(p)
    recs = records(run_dir)
    ev = evals(recs)
    assert [r["step"] for r in ev] == [OFFLINE] + [OFFLINE + s for s in range(EVAL_EVERY, ONLINE + 1, EVAL_EVERY)]
    assert not cycles(recs)
    edis_keys = {k for r in recs for k in r if k.split("/")[0] in ("gen", "energy", "diffusion", "edis")}
    assert not edis_keys, edis_keys
    assert not list(run_dir.glob("*.png"))
    assert json.loads((run_dir / "config.json").read_text())["edis"] is False
    assert last_line(p.stdout).startswith("final:"), describe(p)


# ---------------------------------------------------------------------------------------------
# Stop and resume
# ---------------------------------------------------------------------------------------------
@script_param
def test_resume_after_sigint(script, runner):
    """SIGINT after the first online evaluation: exit 130 with the --resume command; --resume then
    finishes the run: every evaluation and EDIS cycle logged exactly once at its own step, earlier
    records kept, steps never restarting, buffers and counters complete in the final checkpoint."""
    job = runner.get(script, "resume")
    first, second, run_dir = job["first"], job["second"], job["run_dir"]
    assert job["online_seen"], "no online evaluation was logged before the run ended\n" + describe(first)
    assert first.returncode == 130, describe(first)
    hint = [ln for ln in first.stdout.splitlines() if "--resume" in ln]
    assert hint and str(run_dir) in hint[-1], describe(first)
    assert "Traceback" not in first.stderr, describe(first)
    assert second is not None and second.returncode == 0, describe(second)
    assert last_line(second.stdout).startswith("final:"), describe(second)

    offline, online = int(flag(RESUME, "--offline-steps")), int(flag(RESUME, "--online-steps"))
    every, start, edis_every = (int(flag(RESUME, f)) for f in ("--eval-every", "--edis-start", "--edis-every"))
    text = (run_dir / "metrics.jsonl").read_text()
    assert job["before"] and text.startswith(job["before"]), "records before the stop were not kept as they were"
    assert len(text) > len(job["before"])
    recs = records(run_dir)
    stopped_at = max(json.loads(ln)["step"] for ln in job["before"].splitlines() if ln.strip())
    assert OFFLINE < stopped_at < offline + online, "the stop did not land in the online phase"
    assert_monotone_steps(recs)

    ev = evals(recs)
    assert [r["step"] for r in ev] == [offline] + [offline + s for s in range(every, online + 1, every)]
    assert ev[-1]["step"] == offline + online
    cycle_steps = list(range(start, online, edis_every))
    cy = cycles(recs)
    assert [r["step"] for r in cy] == [offline + s for s in cycle_steps]
    assert [r["edis/cycle"] for r in cy] == list(range(1, len(cycle_steps) + 1))
    assert any(r["step"] <= stopped_at for r in cy) and any(r["step"] > stopped_at for r in cy)
    # online steps are taken once: the logged episodes cannot hold more steps than the run took
    assert sum(r["charts/episode_length"] for r in recs if "charts/episode_length" in r) <= online

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    c = ckpt["counters"]
    assert c["offline_step"] == offline and c["online_step"] == online
    assert c["updates"] == offline + online * 1  # utd 1
    assert ckpt["online"]["size"] == online, "online buffer not restored on resume"
    cfg = json.loads((run_dir / "config.json").read_text())
    assert ckpt["edis"]["positive_buffer"]["size"] == min(online, cfg["positive_buffer_size"]), \
        "positive buffer not restored on resume"
    assert ckpt["edis"]["cycles"] == len(cycle_steps)
    assert cfg["online_steps"] == online and cfg["edis_every"] == edis_every, "resume did not reuse the config"


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------
def comparable(recs):
    """Every record but wall-clock timings."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in recs
            if not any(k.startswith("time/") for k in r)]


@script_param
def test_seed_reproduces_the_run(script, runner):
    """Same seed: identical records (evaluations, EDIS cycle diagnostics, episodes); another seed:
    different evaluations. Catches an unseeded RNG anywhere (torch, numpy, env, sampler, buffers)."""
    (a, dir_a), (b, dir_b), (c, dir_c) = (runner.get(script, n) for n in ("seed0", "seed0_again", "seed1"))
    for p in (a, b, c):
        assert p.returncode == 0, describe(p)
    ra, rb, rc = records(dir_a), records(dir_b), records(dir_c)
    offline, online, every, off_every = (int(flag(SEEDS, f)) for f in
                                         ("--offline-steps", "--online-steps", "--eval-every", "--offline-eval-every"))
    expected = sorted(set(range(off_every, offline + 1, off_every)) | {offline})
    expected += [offline + s for s in range(every, online + 1, every)]
    assert [r["step"] for r in evals(ra)] == expected
    assert len(cycles(ra)) == 1, "the seed test is meant to cover one EDIS cycle"
    assert comparable(ra) == comparable(rb)
    assert [r["eval/return"] for r in evals(ra)] != [r["eval/return"] for r in evals(rc)]


@script_param
def test_edis_and_no_edis_runs_of_a_seed_are_paired(script, runner):
    """Catches EDIS drawing from the learner's random stream (its networks' initialisation, diffusion
    pretraining): the runs of one seed with and without EDIS must share the offline phase and the
    online phase up to the first EDIS cycle, so that the difference between them is EDIS's."""
    (a, dir_a), (b, dir_b) = runner.get(script, "seed0"), runner.get(script, "seed0_noedis")
    for p in (a, b):
        assert p.returncode == 0, describe(p)
    until = int(flag(SEEDS, "--offline-steps")) + int(flag(SEEDS, "--edis-start"))

    def shared(recs):  # evaluations and episodes up to the first cycle (its own step included)
        return [r for r in comparable(recs) if r["step"] <= until and ("eval/return" in r or "charts/episode_return" in r)]
    ra, rb = records(dir_a), records(dir_b)
    assert len(evals(shared(ra))) == 3  # offline steps 30 and 60, online step 50
    assert shared(ra) == shared(rb)
    assert evals(ra)[-1]["eval/return"] != evals(rb)[-1]["eval/return"]  # generated data changes the rest


# ---------------------------------------------------------------------------------------------
# tools/pool_lever.py on a finished run
# ---------------------------------------------------------------------------------------------
def test_pool_lever_variants_start_from_the_same_energies(runner, dirs):
    """The pool-lever tool (docs/speed.md) retrains the energies from a run's checkpoint once per
    variant and seed. Each must start from the same weights and optimizer moments: the same variant
    and seed twice gives the same row (Adam's in-place moment updates once leaked into the saved
    start, and later rows drifted)."""
    p, run_dir = runner.get("edis_iql.py", "smoke")
    assert p.returncode == 0, describe(p)
    out = subprocess.run([sys.executable, "tools/pool_lever.py", str(run_dir), "--seeds", "0,0",
                          "--variants", "half,one-pass,unguided-state-negatives"], cwd=ROOT,
                         env=child_env(dirs), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert [r["variant"] for r in rows] == (["pool 1000, 2 passes"] * 2 + ["pool 2000, 1 pass"] * 2
                                            + ["pool 2000, unguided state negatives"] * 2)
    for first, again in zip(rows[::2], rows[1::2]):
        assert first == again
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k not in ("variant", "seed"))


def test_fidelity_tool_sees_a_better_trained_model(runner, dirs):
    """tools/fidelity.py pretrains a fresh denoiser on the run's data and checks its samples at each
    budget: one row per budget, every check for both sets, a fresh model of the asked width (not the
    run's trained one), and a model trained 10x longer must make next states closer to the simulator's
    (at 20 steps the model is near its initialization)."""
    p, run_dir = runner.get("edis_iql.py", "smoke")
    assert p.returncode == 0, describe(p)
    out = subprocess.run([sys.executable, "tools/fidelity.py", str(run_dir), "--steps", "20,200", "--rows", "300",
                          "--width", "48"],
                         cwd=ROOT, env=child_env(dirs), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert [r["steps"] for r in rows] == [20, 200]
    assert all(r["width"] == 48 and r["depth"] == int(flag(SMOKE, "--diffusion-depth")) for r in rows), rows
    for r in rows:
        for name in ("unguided", "inpainted"):
            for k in ("dynamics_mse", "dynamics_tail", "reward_mse", "terminal_error"):
                assert math.isfinite(r[f"{name}_{k}"]), (name, k, r)
    assert rows[1]["inpainted_dynamics_mse"] < rows[0]["inpainted_dynamics_mse"], rows
    assert rows[1]["unguided_dynamics_mse"] < rows[0]["unguided_dynamics_mse"], rows


def test_fidelity_self_check_tells_teleports_from_real_transitions(runner, dirs):
    """tools/fidelity.py --self-check scores each transition by how far its (r, s') lies from the run's
    own model's second inpainting at its (s, a). Ground truth: real offline rows against the same rows
    with another row's next state; the score must rank nearly every teleport above the real rows,
    and the guided and unguided rows get every simulator check with the drop columns."""
    p, run_dir = runner.get("edis_iql.py", "smoke")
    assert p.returncode == 0, describe(p)
    out = subprocess.run([sys.executable, "tools/fidelity.py", str(run_dir), "--self-check", "--rows", "200",
                          "--drop", "10"], cwd=ROOT, env=child_env(dirs), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["set"]: r for r in (json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{"))}
    assert list(rows) == ["real vs teleported", "guided", "unguided"], rows
    control = rows["real vs teleported"]
    assert control["auroc_teleported"] > 0.95, control  # measured 0.99+ on study runs
    assert control["teleported_disagreement"] > 5 * control["real_disagreement"], control  # study runs: 180-10^6x
    for name in ("guided", "unguided"):
        for k in ("dynamics_mse", "dynamics_tail", "reward_mse", "spearman_dynamics_mse", "drop10_dynamics_mse"):
            assert k in rows[name], (name, k, rows[name])
    bad = subprocess.run([sys.executable, "tools/fidelity.py", str(run_dir), "--self-check", "--steps", "20"],
                         cwd=ROOT, env=child_env(dirs), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "do not apply" in bad.stderr.strip().splitlines()[-1], bad.stderr
    bad = subprocess.run([sys.executable, "tools/fidelity.py", str(run_dir), "--self-check", "--drop", "0.5"],
                         cwd=ROOT, env=child_env(dirs), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--drop 0.5" in bad.stderr.strip().splitlines()[-1], bad.stderr


def test_fidelity_schedules_see_a_sampler_with_too_few_steps(runner, dirs):
    """tools/fidelity.py --schedules samples the run's own model under each SIGMA_MAX:STEPS: one row
    per schedule, and two Heun steps from sigma 80 (the second slope, at sigma 0.002, is about 0, so
    half the starting noise survives) must land much farther from the data than sixteen (measured:
    MMD^2 0.42 against 0.025)."""
    p, run_dir = runner.get("edis_iql.py", "smoke")
    assert p.returncode == 0, describe(p)
    out = subprocess.run([sys.executable, "tools/fidelity.py", str(run_dir), "--schedules", "80:2,80:16,10:12",
                          "--rows", "200", "--seeds", "2"], cwd=ROOT, env=child_env(dirs), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert [(r["sigma_max"], r["steps"], r["seeds"]) for r in rows] == [(80.0, 2, 2), (80.0, 16, 2), (10.0, 12, 2)]
    assert rows[0]["unguided_mmd"] > 3 * rows[1]["unguided_mmd"], rows
    assert all(math.isfinite(r["inpainted_dynamics_mse"]) and math.isfinite(r["inpainted_s_dynamics_mse"]) for r in rows), rows
    bad = subprocess.run([sys.executable, "tools/fidelity.py", str(run_dir), "--schedules", "80:16:1"],
                         cwd=ROOT, env=child_env(dirs), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "SIGMA_MAX:STEPS" in bad.stderr.strip().splitlines()[-1], bad.stderr
