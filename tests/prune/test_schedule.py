"""iterative / one_shot / default_schedule with a stub fit and with a real (tiny) training."""
from __future__ import annotations

import functools

import pytest
import torch

import sparseode as so
from prune_helpers import batches, loop_fit, mlp, mse


def test_default_schedule():
    keep = so.prune.default_schedule()
    assert len(keep) == 29
    geo = [0.8 * (0.25 ** (k / 19)) for k in range(20)]
    for a, b in zip(keep[:20], geo):
        assert a == pytest.approx(b, rel=1e-10)
    ratios = [keep[k + 1] / keep[k] for k in range(19)]
    assert max(ratios) - min(ratios) < 1e-9  # geometric
    assert keep[19] == pytest.approx(0.2) and keep[20:] == pytest.approx([0.18 - 0.02 * k for k in range(9)])
    k90 = so.prune.default_schedule(0.9)
    assert len(k90) == 25 and k90[-1] == pytest.approx(0.1)
    k85 = so.prune.default_schedule(0.85)
    assert k85[-1] == pytest.approx(0.15) and k85[-2] == pytest.approx(0.16)
    with pytest.raises(ValueError, match="target"):
        so.prune.default_schedule(1.0)


class StubFit:
    """Counts calls and records the model's sparsity at every call; trains nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, callbacks=()):
        self.calls.append((so.prune.sparsity(model).total, list(callbacks)))

        class R:
            steps, epochs_run, best_val = 10, 2, 0.5
        return R()


def test_iterative_with_stub_fit(tmp_path):
    model = mlp((3, 16, 16, 2))
    fit, final = StubFit(), StubFit()
    sched = [0.8, 0.5, 0.3, 0.1]
    hist = so.prune.iterative(model, fit, target=0.9, schedule=sched, method="magnitude",
                              final_fit=final, checkpoint_dir=tmp_path, progress=False)
    n = so.prune.sparsity(model).numel
    assert len(hist) == 4 and len(fit.calls) == 3 and len(final.calls) == 1
    for r, kr in zip(hist.rounds, sched):
        assert r.target_sparsity == pytest.approx(1 - kr)
        assert r.sparsity == round((1 - kr) * n) / n  # exact
        assert r.steps == 10 and r.epochs == 2 and r.stop_reason == "budget" and r.time_s >= 0
        assert r.val_metric == 0.5
    assert [r.final for r in hist.rounds] == [False, False, False, True]
    assert [c[0] for c in fit.calls + final.calls] == [r.sparsity for r in hist.rounds]
    assert hist.total_epochs == 8 and hist.total_steps == 40
    # checkpoints: masks nested round over round, each loadable, also on disk
    prev = None
    for k, sd in enumerate(hist.checkpoints):
        m = mlp((3, 16, 16, 2))
        so.prune.load_pruned(m, sd)
        assert so.prune.sparsity(m).total == hist[k].sparsity
        if prev is not None:
            assert all((sd[key] <= prev[key]).all() for key in sd if key.endswith("_mask"))
        prev = sd
        disk = torch.load(tmp_path / f"round_{k:02d}.pt")
        assert all(torch.equal(disk[key], sd[key]) for key in sd)
    assert "total epochs" in hist.table()


def test_iterative_rounds_and_default_schedule():
    model = mlp((3, 16, 16, 2))
    fit = StubFit()
    hist = so.prune.iterative(model, fit, target=0.9, rounds=3, progress=False)
    assert [r.target_sparsity for r in hist.rounds] == pytest.approx([1 - 0.1 ** (k / 3) for k in (1, 2, 3)])
    model = mlp((3, 16, 16, 2))
    hist = so.prune.iterative(model, StubFit(), target=0.98, progress=False)
    assert len(hist) == 29 and hist[-1].target_sparsity == pytest.approx(0.98)


def test_iterative_bad_input():
    model = mlp()
    for kw, arg in (({"target": 1.0}, "target"), ({"method": "obd"}, "method"),
                    ({"granularity": "row"}, "granularity"), ({"schedule": [0.5, 0.8]}, "schedule"),
                    ({"schedule": [0.0]}, "schedule"), ({"rounds": 0}, "rounds")):
        with pytest.raises(ValueError, match=arg):
            so.prune.iterative(model, StubFit(), progress=False, **kw)
    with pytest.raises(TypeError, match="stop"):
        so.prune.iterative(model, StubFit(), stop=object(), progress=False)


def test_one_shot():
    model = mlp((3, 16, 16, 2))
    hist = so.prune.one_shot(model, None, 0.7, method="random", progress=False)
    assert len(hist) == 1 and so.prune.sparsity(model).total == pytest.approx(0.7, abs=1 / 300)


def test_iterative_with_data_measure_and_icp_saves_steps():
    """Real retraining of a tiny regression MLP: ICP ends intermediate rounds early, the final
    round runs its full budget, and the final loss is as good as without ICP."""
    data = batches(8, bs=16)
    val = batches(4, bs=64, seed=7)
    probe = batches(2, bs=32, seed=5)

    def evaluate(m):
        with torch.no_grad():
            return float(sum(mse(m, b) for b in val) / len(val))

    torch.manual_seed(0)
    dense = mlp((3, 32, 32, 2))
    loop_fit(dense, data, epochs=60, lr=1e-2)
    fit = functools.partial(loop_fit, data=data, epochs=15, lr=3e-3)
    sched = [0.8, 0.6, 0.4, 0.3]

    runs = {}
    for use_icp in (False, True):
        model = mlp((3, 32, 32, 2))
        model.load_state_dict(dense.state_dict())
        stop = so.prune.ICP("discrepancy", probe=probe, loss_fn=mse, tol_info=0.3, tol_grad=0.5, patience=2,
                            check_every=4, min_steps=8) if use_icp else None
        runs[use_icp] = so.prune.iterative(model, fit, schedule=sched, method="snip", loss_fn=mse,
                                           data=data, n_batches=2, stop=stop, evaluate=evaluate,
                                           progress=False)
    base, icp = runs[False], runs[True]
    assert all(r.stop_reason == "budget" and r.steps == 120 for r in base.rounds)
    assert icp[-1].stop_reason == "budget" and icp[-1].steps == 120 and icp[-1].final
    early = [r for r in icp.rounds[:-1] if r.stop_reason == "consistent"]
    assert early and all(r.steps < 120 for r in early)
    assert all(r.checks for r in early)
    assert icp.total_steps < base.total_steps
    assert icp[-1].epochs == pytest.approx(15) and icp.total_epochs < base.total_epochs
    assert icp[-1].sparsity == base[-1].sparsity
    assert icp[-1].val_metric < 1.2 * base[-1].val_metric + 1e-3


class _ShiftFit:
    """Stub fit: records m ⊙ θ (and the biases) at its start, then takes ``n`` fake optimiser steps
    (each adds 0.1 to every parameter and calls the callbacks)."""

    def __init__(self, n=4):
        self.n, self.starts = n, []

    def __call__(self, model, callbacks=()):
        self.starts.append({
            "w0": (model[0].weight_orig * model[0].weight_mask).detach().clone(),
            "w2": (model[2].weight_orig * model[2].weight_mask).detach().clone(),
            "mask0": model[0].weight_mask.detach().clone(),
            "mask2": model[2].weight_mask.detach().clone(),
            "b0": model[0].bias.detach().clone(),
        })
        for _ in range(self.n):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1)
            for cb in callbacks:
                cb(type("S", (), {"model": model, "epoch": 0})())

        class R:
            steps, epochs_run = self.n, 1
        return R()


@pytest.mark.parametrize("rewind", ["init", 2])
def test_iterative_rewind(rewind):
    torch.manual_seed(0)
    model = mlp((3, 8, 2))
    w0, w2, b0 = (model[0].weight.detach().clone(), model[2].weight.detach().clone(),
                  model[0].bias.detach().clone())
    fit, final = _ShiftFit(), _ShiftFit()
    so.prune.iterative(model, fit, target=0.75, rounds=4, final_fit=final, rewind=rewind, progress=False)
    starts = fit.starts + final.starts
    assert len(starts) == 4
    # round 0 starts from the (pruned) initial weights either way
    torch.testing.assert_close(starts[0]["w0"], w0 * starts[0]["mask0"], rtol=0, atol=0)
    # rewind point: θ_init ("init") or θ after 2 optimiser steps of round 0's retraining (+0.2)
    shift = 0.0 if rewind == "init" else 0.2
    for s in starts[1:]:
        assert s["mask0"].sum() < starts[0]["mask0"].sum() or s["mask2"].sum() < starts[0]["mask2"].sum()
        torch.testing.assert_close(s["w0"], (w0 + shift) * s["mask0"], rtol=0, atol=1e-12)
        torch.testing.assert_close(s["w2"], (w2 + shift) * s["mask2"], rtol=0, atol=1e-12)
        torch.testing.assert_close(s["b0"], b0 + shift, rtol=0, atol=1e-12)
    # without rewinding every round continues from the last one (+0.4 per round)
    torch.manual_seed(0)
    model = mlp((3, 8, 2))
    plain = _ShiftFit()
    so.prune.iterative(model, plain, target=0.75, rounds=4, progress=False)
    torch.testing.assert_close(plain.starts[3]["b0"], b0 + 1.2, rtol=0, atol=1e-12)


def test_iterative_rewind_bad_input():
    model = mlp()
    for bad in ("start", -1, True, 1.5):
        with pytest.raises(ValueError, match="rewind"):
            so.prune.iterative(model, StubFit(), target=0.5, rounds=2, rewind=bad, progress=False)


class _Killed(Exception):
    pass


class _ShiftFitThatDies(_ShiftFit):
    """_ShiftFit that raises in its ``die_at``-th call (a killed job)."""

    def __init__(self, die_at=None):
        super().__init__(n=3)
        self.die_at, self.calls = die_at, 0

    def __call__(self, model, callbacks=()):
        self.calls += 1
        if self.calls == self.die_at:
            raise _Killed
        return super().__call__(model, callbacks)


@pytest.mark.parametrize("rewind", [None, "init", 1])
def test_iterative_resumes_a_killed_run_from_its_last_round(tmp_path, rewind):
    def run(fit, resume=False, ckpt=tmp_path / "ckpt"):
        torch.manual_seed(0)
        model = mlp((3, 8, 8, 2))
        hist = so.prune.iterative(model, fit, target=0.8, rounds=4, checkpoint_dir=ckpt, resume=resume,
                                  rewind=rewind, progress=False)
        return model, hist

    whole, whole_hist = run(_ShiftFitThatDies(), ckpt=tmp_path / "whole")
    with pytest.raises(_Killed):
        run(_ShiftFitThatDies(die_at=3))  # dies in round 2, rounds 0 and 1 are on disk
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("round_*.pt")) == ["round_00.pt", "round_01.pt"]
    fit = _ShiftFitThatDies()
    resumed, hist = run(fit, resume=True)
    assert fit.calls == 2  # only rounds 2 and 3 ran again
    assert [r.round for r in hist.rounds] == [0, 1, 2, 3] and len(hist.checkpoints) == 2
    assert [r.sparsity for r in hist.rounds] == [r.sparsity for r in whole_hist.rounds]
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-12, msg=k)
    # a finished run resumes to nothing new; another run's folder is refused
    fit = _ShiftFitThatDies()
    _, again = run(fit, resume=True)
    assert fit.calls == 0 and len(again) == 4
    with pytest.raises(ValueError, match="target"):
        so.prune.iterative(mlp((3, 8, 8, 2)), StubFit(), target=0.5, rounds=4, checkpoint_dir=tmp_path / "ckpt",
                           resume=True, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        so.prune.iterative(mlp(), StubFit(), target=0.5, resume=True, progress=False)


def test_iterative_says_when_the_model_is_already_at_the_target():
    model = mlp((3, 16, 16, 2))
    so.prune.apply(model, so.prune.importance(model), 0.9)
    fit = StubFit()
    with pytest.warns(UserWarning, match=r"already at sparsity 0.89\d\d, at or past target=0.9"):
        hist = so.prune.iterative(model, fit, target=0.9, progress=False)
    assert len(hist) == 1 and hist[0].final and len(fit.calls) == 1  # the final retraining only
    # half-way there: the rounds that would prune nothing are skipped, with a warning
    model = mlp((3, 16, 16, 2))
    so.prune.apply(model, so.prune.importance(model), 0.5)
    with pytest.warns(UserWarning, match=r"already at sparsity 0.5000: 3 of 5 scheduled rounds"):
        hist = so.prune.iterative(model, StubFit(), target=0.9, schedule=[0.8, 0.6, 0.5, 0.3, 0.1],
                                  progress=False)
    assert [r.target_sparsity for r in hist.rounds] == pytest.approx([0.7, 0.9])


def test_history_without_validation_shows_a_dash_not_nan():
    class NoVal:
        steps, epochs_run = 5, 1

    hist = so.prune.iterative(mlp((3, 16, 16, 2)), lambda m, callbacks=(): NoVal(), target=0.5, rounds=2,
                              progress=False)
    table = hist.table()
    assert "nan" not in table.lower() and "no validation metric" in table
    assert all(d["val_metric"] is None for d in hist.to_dicts())
    assert so.prune.PruneHistory.from_dicts(hist.to_dicts()).to_dicts() == hist.to_dicts()
