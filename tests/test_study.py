"""study.py: the grid, and resuming (finished runs skipped, checkpointed ones resumed, others afresh),
with a stand-in script in place of the training scripts."""
import sys

import pytest
import study

FAKE = """import sys, time
args = sys.argv[1:]
time.sleep(0.2)
print("got", " ".join(args))
sys.exit(1) if "--fail" in args else print("final: env=x seed=0 edis=True return=1.00 success=0.50 normalized_score=n/a")
"""


def test_grid_has_both_arms_every_seed_and_the_ablation():
    runs = study.grid(["maze_iql", "hopper_iql", "ablation"], seeds=[0, 1, 2, 3, 4], ablation_seeds=[0, 1, 2])
    names = [n for n, _, _ in runs]
    assert len(names) == len(set(names)) == 2 * 2 * 5 + 4 * 3
    for name, script, flags in runs:
        group, arm, seed = name.split("/")
        assert flags[flags.index("--seed") + 1] == seed.removeprefix("seed")
        assert ("--no-edis" in flags) == (arm == "no-edis")
        if group == "ablation":
            assert flags[:len(study.GROUPS["maze_iql"][1])] == study.GROUPS["maze_iql"][1]
            off = ["state", "policy", "transition"] if arm == "unguided" else [arm.removesuffix("0")]
            for k in ["state", "policy", "transition"]:
                assert (f"--{k}-guidance" in flags) == (k in off)
                assert k not in off or flags[flags.index(f"--{k}-guidance") + 1] == "0"
        else:  # both arms of a group differ only in --no-edis
            assert script == study.GROUPS[group][0] and flags[:len(study.GROUPS[group][1])] == study.GROUPS[group][1]


def test_study_runs_skips_finished_resumes_checkpointed(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    monkeypatch.setattr(study, "GROUPS", {"g": (str(fake), ["--env", "E", "--dataset", "random:100"]),
                                          "bad": (str(fake), ["--env", "E", "--dataset", "random:100", "--fail"])})
    monkeypatch.setattr(study, "collect_data", lambda runs: None)
    root = tmp_path / "study"
    study.main(["--root", str(root), "--only", "g,bad", "--seeds", "0,1", "--jobs", "2"])
    out = capsys.readouterr().out
    assert "8 runs" in out and out.count("FAILED (exit 1)") == 4 and out.count("success=0.50") == 4
    assert study.final_line(root / "g/edis/seed1").startswith("final:")
    assert "--seed 1 --run-dir" in (root / "g/edis/seed1/stdout.log").read_text()

    (root / "bad/edis/seed0/checkpoint.pt").write_bytes(b"")  # stopped with a checkpoint: --resume
    stale = root / "bad/no-edis/seed0/stale.txt"
    stale.write_text("")  # started, never checkpointed: removed and started afresh
    cmds = {name: study.command(root / name, s, f) for name, s, f in study.grid(["g", "bad"], [0, 1], [])}
    assert [n for n, c in cmds.items() if c is None] == ["g/edis/seed0", "g/no-edis/seed0", "g/edis/seed1",
                                                          "g/no-edis/seed1"]
    assert cmds["bad/edis/seed0"] == [sys.executable, str(fake), "--resume", str(root / "bad/edis/seed0")]
    assert "--run-dir" in cmds["bad/no-edis/seed0"]
    study.main(["--root", str(root), "--only", "g,bad", "--seeds", "0,1", "--jobs", "2"])
    out = capsys.readouterr().out
    assert "4 finished already, 4 to run (1 resumed)" in out
    assert not stale.exists()
    assert "--resume" in (root / "bad/edis/seed0/stdout.log").read_text()


def test_a_run_another_call_finished_meanwhile_is_kept(tmp_path, monkeypatch, capsys):
    """Catches the local pool restarting, and so wiping, a run that another study.py call finished
    after this call had read the grid: two calls over one root once lost a finished run's metrics
    this way (the pool deleted the run's folder and started it afresh)."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    root = tmp_path / "study"
    first, second = root / "g/edis/seed0", root / "g/edis/seed1"
    todo = [("g/edis/seed0", first, str(fake), ["--env", "E", "--dataset", "random:100", "--seed", "0"]),
            ("g/edis/seed1", second, str(fake), ["--env", "E", "--dataset", "random:100", "--seed", "1"])]
    second.mkdir(parents=True)  # what the other call leaves once it has finished seed 1
    (second / "stdout.log").write_text("final: env=E seed=1 edis=True return=1.00 success=0.25 normalized_score=n/a\n")
    (second / "metrics.jsonl").write_text('{"step": 1, "eval/success": 0.25}\n')
    study.run_local(todo, root, jobs=1)
    out = capsys.readouterr().out
    assert "g/edis/seed1: finished meanwhile" in out and study.final_line(first).startswith("final:")
    assert (second / "metrics.jsonl").read_text() == '{"step": 1, "eval/success": 0.25}\n'


PREEMPTIBLE = """import pathlib, signal, sys, time
args = sys.argv[1:]
if "--resume" in args:
    print("final: env=x seed=0 edis=True return=2.00 success=1.00 normalized_score=n/a (resumed)")
    sys.exit(0)
run_dir = pathlib.Path(args[args.index("--run-dir") + 1])
def save_and_stop(*_):  # as the scripts do on SIGTERM: save a checkpoint, exit
    (run_dir / "checkpoint.pt").write_bytes(b"")
    sys.exit(130)
signal.signal(signal.SIGTERM, save_and_stop)
print("started", flush=True)
time.sleep(120)
"""


def test_tiny_grid_through_submitits_local_executor(tmp_path, monkeypatch, capsys):
    """The cluster path (--executor slurm) run by submitit's local executor: every run of the grid
    finishes as a job, and a preempted job is requeued and continues from its checkpoint with
    --resume (catches a requeue that starts afresh, or none)."""
    pytest.importorskip("submitit")
    fake, slow = tmp_path / "fake.py", tmp_path / "slow.py"
    fake.write_text(FAKE)
    slow.write_text(PREEMPTIBLE)
    monkeypatch.setattr(study, "GROUPS", {"g": (str(fake), ["--env", "E"])})
    root = tmp_path / "study"
    jobs = study.main(["--root", str(root), "--only", "g", "--seeds", "0,1", "--executor", "submitit-local",
                       "--cpus", "1", "--time", "5", "--wait"])
    out = capsys.readouterr().out
    assert len(jobs) == 4 and out.count("success=0.50") == 4
    assert all(study.final_line(root / f"g/{arm}/seed{s}") for arm in ("edis", "no-edis") for s in (0, 1))

    # a job that runs out of time (Slurm's warning signal, sent here by submitit's local controller
    # 5 s into a 1-minute limit) is requeued and continues from its checkpoint
    import cloudpickle
    import submitit
    cloudpickle.register_pickle_by_value(study)
    ex = submitit.LocalExecutor(folder=tmp_path / "requeue")
    ex.update_parameters(timeout_min=1, signal_delay_s=55)
    run_dir = root / "p/edis/seed0"
    job = ex.submit(study.RunJob(str(run_dir), str(slow), ["--env", "E", "--seed", "0"]))
    assert "(resumed)" in job.result()
    log = (run_dir / "stdout.log").read_text()
    assert "started" in log and "--resume" in log and (run_dir / "checkpoint.pt").exists()
