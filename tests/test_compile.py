"""--compile: the compiled learner update gives the eager one's parameters (to float rounding)."""
import pytest
import torch

import common

CPU = torch.device("cpu")


@pytest.mark.parametrize("learner", ["iql", "calql"])
def test_compiled_update_equals_eager(learner, monkeypatch):
    """Five updates from the same start, eager and compiled. Catches a compiled graph that drops or
    reorders a term, or that keeps stale parameters between calls. Cal-QL samples actions in its
    losses: inductor's own RNG is switched off so both draw the same numbers."""
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor, "fallback_random", True)
    mod = pytest.importorskip(f"edis_{learner}")
    ds, da, n = 5, 2, 200
    torch.manual_seed(0)
    buf = common.Buffer(n, common.transition_dims(ds, da), CPU)
    buf.add(obs=torch.randn(n, ds), actions=torch.rand(n, da) * 2 - 1, rewards=torch.randn(n),
            next_obs=torch.randn(n, ds), terminals=(torch.rand(n) < 0.2).float())
    batches = [{**buf.sample(32), "mc_return": torch.randn(32)} for _ in range(5)]
    learners = []
    for compiled in (False, True):
        torch.manual_seed(1)
        args = mod.Args(compile=compiled, hidden=32)
        learners.append(mod.IQL(ds, da, args, CPU, 100) if learner == "iql" else mod.CalQL(ds, da, args, CPU))
        torch.manual_seed(2)
        logs = [learners[-1].update(b) for b in batches]
    eager, comp = learners
    assert comp.loss_fn is not comp.losses and eager.loss_fn == eager.losses
    for (name, p), q in zip(eager.q.named_parameters(), comp.q.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"Q {name}")
    for (name, p), q in zip(eager.actor.named_parameters(), comp.actor.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"actor {name}")
    assert all(torch.isfinite(v).all() for v in logs[-1].values())
