"""EDIS against its base learner (--no-edis), same code, same data, same seeds: the CPU-scale study
here, and the paper's grid on a Slurm cluster.

One command runs a grid, N runs at a time, each on one torch thread:

    python tools/study.py                                  # the CPU study, 2 runs at a time, under ~/edis_study
    python tools/study.py --only maze_iql,ablation --jobs 1
    python tools/study.py --dry-run                        # print the commands, run nothing
    python tools/summarize.py ~/edis_study --plot ~/edis_study/curves.png   # (also printed at the end)

    # the paper's grid (every dataset with a paper preset x IQL, Cal-QL x EDIS, --no-edis x 5 seeds,
    # paper sizes) as Slurm job arrays through submitit; preempted or timed-out jobs requeue and resume
    python tools/study.py --only paper --executor slurm --partition gpu --gpus 1 --time 240 --root /scratch/edis

Every run writes to ROOT/GROUP/ARM/seedS (the script's --run-dir), with its stdout and stderr in
stdout.log there. The command is resumable: a run whose stdout.log holds the `final:` line is
skipped, one with a checkpoint continues with `--resume`, any other starts afresh. Ctrl-C stops the
running runs at a checkpoint; the next call continues them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# The grid. Each group is a task: a script and its flags; both arms of a group get exactly these.
# ------------------------------------------------------------------------------------------------
EDIS_CPU = [  # EDIS at CPU size (the quick preset's sizes): 256x3 denoiser, 32 sampler steps
    "--diffusion-width", "256", "--diffusion-depth", "3", "--diffusion-pretrain-steps", "3000",
    "--diffusion-finetune-steps", "1500", "--sample-steps", "32", "--num-generated", "10000",
    "--gen-batch-size", "10000", "--pool-size", "5000", "--energy-steps", "1000", "--diag-samples", "1000",
]
MAZE = ["--env", "PointMaze_UMaze-v3", "--dataset", "explore:20000", "--eval-episodes", "50"]
HOPPER = ["--env", "Hopper-v4", "--dataset", "random:20000", "--eval-episodes", "10"]
# EDIS cycles at online steps 3000 and 6000; the learner trains on each cycle's samples for 3000 and
# 2000 steps (a cycle at the very last step would make samples nobody trains on).
SCHEDULE = ["--offline-steps", "5000", "--online-steps", "8000", "--eval-every", "1000",
            "--offline-eval-every", "2500", "--edis-start", "3000", "--edis-every", "3000", "--log-every", "1000"]

# Cal-QL's update costs 5-13x IQL's on one core (measured 15.7 updates/s at batch 256 with 4 CQL
# actions, 6.4 with the default 10; IQL 72-88): a smaller run, batch 128, cycles at online 1000 and 3500.
CALQL = ["--offline-steps", "2000", "--online-steps", "5000", "--eval-every", "1000", "--offline-eval-every", "1000",
         "--edis-start", "1000", "--edis-every", "2500", "--log-every", "500", "--cql-n-actions", "4", "--batch-size", "128"]

# The layouts study (issue "EDIS must not hurt the learner"): four EDIS cycles, at online steps 2000,
# 5000, 8000 and 11000 of 12000, on each of gymnasium-robotics' PointMaze layouts, explorer data sized
# per layout.
SCHEDULE4 = ["--offline-steps", "5000", "--online-steps", "12000", "--eval-every", "1000",
             "--offline-eval-every", "2500", "--edis-start", "2000", "--edis-every", "3000", "--log-every", "1000"]
LAYOUTS = {"umaze": ("PointMaze_UMaze-v3", "explore:20000"), "medium": ("PointMaze_Medium-v3", "explore:50000"),
           "large": ("PointMaze_Large-v3", "explore:100000")}

# The locomotion study (issue "the paper's regime"): D4RL-style medium-replay / medium data made here by
# tools/make_data.py (SAC), the paper's presets for the dataset (--env hopper-medium-replay-v2 picks
# them), three EDIS cycles at online steps 2000, 5000 and 8000 of 10000 (5% of the paper's 200k).
DATA_DIR = Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser() / "edis"
LOCO = {"hopper_mr": "hopper-medium-replay", "hopper_m": "hopper-medium", "halfcheetah_mr": "halfcheetah-medium-replay"}
SCHEDULE_LOCO = ["--offline-steps", "10000", "--online-steps", "10000", "--eval-every", "1000", "--eval-episodes", "10",
                 "--offline-eval-every", "5000", "--edis-start", "2000", "--edis-every", "3000", "--log-every", "1000"]

GROUPS = {  # name: (script, flags)
    "maze_iql": ("edis_iql.py", MAZE + SCHEDULE + EDIS_CPU + ["--expectile", "0.9"]),
    "maze_calql": ("edis_calql.py", MAZE + CALQL + EDIS_CPU),
    "hopper_iql": ("edis_iql.py", HOPPER + SCHEDULE + EDIS_CPU),
    **{f"{k}_iql4": ("edis_iql.py", ["--env", env, "--dataset", data, "--eval-episodes", "50"] + SCHEDULE4 + EDIS_CPU
                     + ["--expectile", "0.9"]) for k, (env, data) in LAYOUTS.items()},
    **{f"{k}_iql": ("edis_iql.py", ["--env", f"{name}-v2", "--dataset", str(DATA_DIR / f"{name}.hdf5")] + SCHEDULE_LOCO
                    + EDIS_CPU) for k, name in LOCO.items()},
    # Cal-QL on the same data and schedule, at the maze study's CPU size (batch 128, 4 CQL actions)
    **{f"{k}_calql": ("edis_calql.py", ["--env", f"{name}-v2", "--dataset", str(DATA_DIR / f"{name}.hdf5")]
                      + SCHEDULE_LOCO + EDIS_CPU + ["--cql-n-actions", "4", "--batch-size", "128"]) for k, name in LOCO.items()},
}


def paper_groups() -> dict:
    """The paper's grid: every dataset the scripts hold a paper preset for, each script at its
    defaults (--preset paper: the paper's sizes, data downloaded on first use)."""
    sys.path.insert(0, str(REPO))
    import edis_calql
    import edis_iql
    out = {}
    for script, mod in (("edis_iql.py", edis_iql), ("edis_calql.py", edis_calql)):
        for name in mod.PRESETS:
            env = f"{name}-v1" if name.startswith(("pen", "door", "hammer", "relocate")) else f"{name}-v2"
            out[f"paper_{script[5:-3]}_{env}"] = (script, ["--env", env])
    return out

# unguided: all three guidance weights 0 (EDIS trains and samples as usual, without guidance)
UNGUIDED = [arg for k in ("state", "policy", "transition") for arg in (f"--{k}-guidance", "0")]
ARMS = {"edis": [], "no-edis": ["--no-edis"], "unguided": UNGUIDED,
        "edis-positive-states": ["--state-source", "positive"],
        # the state energy's negatives inpainted at the model's own states (design §3.5), and the old way
        "edis-inpainted-state-negatives": ["--state-negatives", "inpainted"],
        "edis-unguided-state-negatives": ["--state-negatives", "unguided"],
        # the generated share of each batch at the paper's AntMaze value (0.1-0.2) instead of 0.5;
        # the baseline at the same share (it replays offline data there)
        "edis-ratio0.2": ["--generated-ratio", "0.2"], "no-edis-ratio0.2": ["--no-edis", "--generated-ratio", "0.2"],
        # reuse: the CPU schedule draws 10,000 samples per 3,000 updates, so each generated sample serves
        # about 3x as many batches as at the paper's 100,000 per 10,000; 30,000 matches the paper's rate
        "edis-gen30k": ["--num-generated", "30000"],
        # the model: 30,000 pretraining steps instead of the CPU study's 3,000 (the paper: 100,000); on
        # halfcheetah-medium-replay the unguided samples' next-state error fell 0.40 -> 0.074 (normalized
        # MSE, tools/fidelity.py)
        "edis-pretrain30k": ["--diffusion-pretrain-steps", "30000"]}
DEFAULT_ARMS = "edis,no-edis"
# The ablation: maze_iql with one energy's guidance off at a time (its full-EDIS and no-EDIS arms
# are the maze_iql group's).
ABLATION_OF = "maze_iql"
ABLATION_ARMS = {f"{k}0": [f"--{k}-guidance", "0"] for k in ("state", "policy", "transition")}
# All three weights 0: EDIS still trains and samples, but unguided. It separates "fresh samples from
# the diffusion model" from "samples moved toward d^pi by the energies".
ABLATION_ARMS["unguided"] = UNGUIDED

THREADS = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
REPO = Path(__file__).resolve().parents[1]  # the scripts' folder: runs start there


def grid(only: list[str], seeds: list[int], ablation_seeds: list[int],
         arms: list[str] = DEFAULT_ARMS.split(",")) -> list[tuple[str, str, list[str]]]:
    """(name, script, flags) of every run, seed-major so that a partial study has whole seeds."""
    runs = []
    groups = {**GROUPS, **(paper_groups() if any(g.startswith("paper") for g in only) else {})}
    if "paper" in only:
        only = [g for g in only if g != "paper"] + [g for g in groups if g.startswith("paper_")]
    for seed in sorted(set(seeds) | set(ablation_seeds)):
        for group, (script, flags) in groups.items():
            if group in only and seed in seeds:
                runs += [(f"{group}/{arm}/seed{seed}", script, flags + ARMS[arm] + ["--seed", str(seed)])
                         for arm in arms]
        if "ablation" in only and seed in ablation_seeds:
            script, flags = GROUPS[ABLATION_OF]
            runs += [(f"ablation/{arm}/seed{seed}", script, flags + extra + ["--seed", str(seed)])
                     for arm, extra in ABLATION_ARMS.items()]
    return runs


def final_line(run_dir: Path) -> str | None:
    log = run_dir / "stdout.log"
    if not log.exists():
        return None
    return next((line for line in reversed(log.read_text(errors="replace").splitlines()) if line.startswith("final:")), None)


def command(run_dir: Path, script: str, flags: list[str]) -> list[str] | None:
    """What to run for this run directory: None when it is finished, --resume when it has a checkpoint."""
    if final_line(run_dir):
        return None
    if (run_dir / "checkpoint.pt").exists():
        return [sys.executable, script, "--resume", str(run_dir)]
    return [sys.executable, script, *flags, "--run-dir", str(run_dir)]


def collect_data(runs):
    """Write each random:N / explore:N dataset once, before runs race to create it in parallel."""
    sys.path.insert(0, str(REPO))
    import common
    made = {(f[f.index("--env") + 1], f[f.index("--dataset") + 1]) for _, _, f in runs if "--dataset" in f}
    for env, dataset in sorted(made):
        if dataset.startswith(("random:", "explore:")):
            common.load_task(env, dataset)


def start(run_dir: Path, cmd: list[str]) -> subprocess.Popen:
    """Start one run, its output appended to run_dir/stdout.log (a run started but never
    checkpointed starts afresh)."""
    if "--resume" not in cmd and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **THREADS, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    with open(run_dir / "stdout.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        # SIGUSR2 is submitit's warning on Slurm, which may signal every process of the job: the run
        # and its evaluation workers ignore it, and RunJob.checkpoint stops the run with SIGTERM
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))


def stop(*_):
    raise KeyboardInterrupt


def run_local(todo, root: Path, jobs: int):
    """Today's executor: a pool of `jobs` processes on this machine. Each run's command is decided when
    it starts, not when the grid was read: another call may have finished or checkpointed it since
    (two calls running the same run at the same moment still collide; give them different groups
    or seeds)."""
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    finished = 0
    signal.signal(signal.SIGTERM, stop)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                name, run_dir, script, flags = todo.pop(0)
                cmd = command(run_dir, script, flags)
                if cmd is None:
                    print(f"{name}: finished meanwhile by another call, skipped", flush=True)
                    continue
                cmd = cmd if "--resume" in cmd else cmd + ["--eval-workers", "1"]  # a run of the pool holds one core
                running[name] = (start(run_dir, cmd), time.time())
            time.sleep(0.5)
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                finished += 1
                line = final_line(root / name) if proc.returncode == 0 else None
                status = line[len("final: "):] if line else f"FAILED (exit {proc.returncode}), see {root / name / 'stdout.log'}"
                print(f"[{finished}/{finished + len(running) + len(todo)}] {name} {time.time() - t0:.0f}s: {status}", flush=True)
    except KeyboardInterrupt:
        print(f"stopping {len(running)} run(s) at a checkpoint; run the same command again to continue", flush=True)
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)
        for proc, _ in running.values():
            proc.wait()
        sys.exit(130)


SIGNAL_DELAY_S = 180  # Slurm warns a job this long before its time limit


class RunJob:
    """One run as a submitit job. On preemption or timeout, submitit calls checkpoint(): the run is
    asked to stop (it saves a checkpoint, as on Ctrl-C) and the job is requeued; the requeued job
    finds the checkpoint and continues with --resume."""

    def __init__(self, run_dir: str, script: str, flags: list[str]):
        self.run_dir, self.script, self.flags = Path(run_dir), script, flags
        self.proc: subprocess.Popen | None = None

    def __call__(self) -> str:
        cmd = command(self.run_dir, self.script, self.flags)
        if cmd is not None:
            self.proc = start(self.run_dir, cmd)
            while self.proc.poll() is None:  # not wait(): it would hold the lock checkpoint() needs
                time.sleep(1.0)
            if self.proc.returncode != 0:
                raise RuntimeError(f"{self.run_dir}: exit {self.proc.returncode}, see {self.run_dir / 'stdout.log'}")
        return final_line(self.run_dir)

    def checkpoint(self):
        import submitit
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:  # within submitit's warning time (SIGNAL_DELAY_S); a run that cannot stop in time
                self.proc.wait(timeout=SIGNAL_DELAY_S - 30)  # (mid-cycle) resumes from its last checkpoint
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return submitit.helpers.DelayedSubmission(self)  # pickled without the process (__getstate__)

    def __getstate__(self):
        return {**self.__dict__, "proc": None}


def run_submitit(todo, root: Path, a) -> list:
    """The grid as one job array through submitit: Slurm (`--executor slurm`) or, to try it on one
    machine, submitit's local executor (`--executor submitit-local`). Waits for the jobs with --wait."""
    try:
        import cloudpickle
        import submitit
    except ImportError:
        sys.exit("error: --executor slurm needs submitit: pip install -r tools/requirements.txt")
    if __name__ != "__main__":  # imported (tests): ship this module's code with the jobs
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = submitit.AutoExecutor(folder=root / "submitit" / "%j", cluster="local" if a.executor == "submitit-local" else "slurm")
    params = {"timeout_min": a.time, "name": "edis", "cpus_per_task": a.cpus}
    if a.executor == "slurm":
        params |= {"gpus_per_node": a.gpus, "slurm_max_num_timeout": 20, "slurm_signal_delay_s": SIGNAL_DELAY_S,
                   **({"slurm_array_parallelism": a.jobs} if a.jobs else {}),
                   **({"slurm_partition": a.partition} if a.partition else {})}
    ex.update_parameters(**params)
    with ex.batch():
        jobs = [ex.submit(RunJob(str(run_dir), script, flags)) for _, run_dir, script, flags in todo]
    print(f"submitted {len(jobs)} job(s): {jobs[0].job_id if jobs else '-'}... logs under {root / 'submitit'}", flush=True)
    if a.wait:
        for (name, *_), job in zip(todo, jobs):
            try:
                print(f"{name}: {job.result()[len('final: '):]}", flush=True)
            except Exception as e:  # noqa: BLE001 -- report every run
                print(f"{name}: FAILED ({str(e).strip().splitlines()[-1]})", flush=True)
    return jobs
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("~/edis_study").expanduser(), help="where the runs go")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (local: default 2, each on one thread; slurm: the array's parallelism, default no limit)")
    p.add_argument("--only", default="maze_iql,maze_calql,hopper_iql,ablation", help="comma-separated groups to run, of "
                   + ", ".join([*GROUPS, "ablation"]) + ", and paper (the paper's grid: every paper_<learner>_<dataset> group)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated arms of each group, of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the EDIS / no-EDIS groups")
    p.add_argument("--ablation-seeds", default="0,1,2,3,4", help="seeds of the ablation arms")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    p.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                   help="local: a process pool here; slurm: one submitit job array (needs tools/requirements.txt); "
                        "submitit-local: the slurm path run by submitit on this machine, to try it")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.add_argument("--gpus", type=int, default=1, help="slurm: GPUs per job")
    p.add_argument("--cpus", type=int, default=8, help="slurm / submitit-local: CPU cores per job (evaluation workers use them)")
    p.add_argument("--time", type=int, default=240, help="slurm / submitit-local: minutes per job before it is requeued (it resumes)")
    p.add_argument("--wait", action="store_true", help="slurm / submitit-local: wait for the jobs and print each final line")
    args = p.parse_args(argv)
    only = args.only.split(",")
    known = {*GROUPS, "ablation", "paper", *(paper_groups() if any(g.startswith("paper_") for g in only) else {})}
    if set(only) - known:
        p.error(f"unknown group(s) {', '.join(sorted(set(only) - known))}; choose from {', '.join([*GROUPS, 'ablation', 'paper'])}"
                " or a paper_<learner>_<dataset> group (see --only paper --dry-run)")
    arms = args.arms.split(",")
    if set(arms) - set(ARMS):
        p.error(f"unknown arm(s) {', '.join(sorted(set(arms) - set(ARMS)))}; choose from {', '.join(ARMS)}")
    runs = grid(only, [int(s) for s in args.seeds.split(",") if s], [int(s) for s in args.ablation_seeds.split(",") if s], arms)
    root = args.root.expanduser().resolve()
    todo = [(name, root / name, script, flags) for name, script, flags in runs if command(root / name, script, flags)]
    if args.jobs is None and args.executor == "local":
        args.jobs = 2
    print(f"{len(runs)} runs under {root}: {len(runs) - len(todo)} finished already, {len(todo)} to run "
          f"({sum((d / 'checkpoint.pt').exists() for _, d, *_ in todo)} resumed), {args.jobs or 'all'} at a time")
    if args.dry_run:
        for _, run_dir, script, flags in todo:
            print(" ".join(Path(c).name if c == sys.executable else c for c in command(run_dir, script, flags)))
        return
    collect_data(runs)
    if args.executor != "local":
        return run_submitit(todo, root, args)
    run_local(todo, root, args.jobs)
    print(f"all done. Table and curves: python tools/summarize.py {root} --plot {root / 'curves.png'}")


if __name__ == "__main__":
    main()
