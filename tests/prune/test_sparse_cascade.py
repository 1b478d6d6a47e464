"""iterative(sparse=...): rounds retrained on the sparsified model equal masked rounds."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import sparseode as so
from sparseode.models import CNF, MLPVectorField
from sparseode.nn import fused_field
from sparseode.nn.convert import sparsify
from sparseode.prune.sparse_retrain import AUTO_MAX_DENSITY, SparseRetrain, auto_sparse, copy_back, layer_plan
from sparseode.train import fit

HAS_OP = fused_field.op_available()[0]
needs_op = pytest.mark.skipif(not HAS_OP, reason="sparseode._C with the fused field op is not built here")
SCHEDULE = [0.97, 0.4, 0.25, 0.15]


def cnf(seed=0, time=None, dtype=torch.float64):
    """A deterministic CNF: exact trace, fixed-step rk4 (the same work whatever the weights)."""
    torch.manual_seed(seed)
    field = MLPVectorField(2, (16, 16), time=time, activation="tanh")
    return CNF(field, trace="exact", method="rk4", options={"step_size": 0.25}).to(dtype)


def data(n=96, dtype=torch.float64):
    return so.data.toy("gaussians", n=n, seed=3).to(dtype)


def retrain(epochs=2, dtype=torch.float64, **kw):
    return functools.partial(fit, data=data(dtype=dtype), epochs=epochs, lr=1e-2, batch_size=32, progress=False, **kw)


def effective(state):
    """name -> what the model computes with (weight_orig * mask for a pruned weight)."""
    out = {}
    for k, v in state.items():
        if k.endswith("_mask"):
            continue
        if k.endswith("_orig"):
            out[k[:-5]] = v * state[k[:-5] + "_mask"]
        else:
            out[k] = v
    return out


def masks(state):
    return {k: v for k, v in state.items() if k.endswith("_mask")}


def assert_same_rounds(h_a, h_b, rtol=1e-7, atol=1e-9):
    assert len(h_a.checkpoints) == len(h_b.checkpoints)
    for sa, sb in zip(h_a.checkpoints, h_b.checkpoints):
        ma, mb = masks(sa), masks(sb)
        assert ma.keys() == mb.keys() and ma  # masks never lost
        for k in ma:
            assert torch.equal(ma[k], mb[k]), k
        ea, eb = effective(sa), effective(sb)
        assert ea.keys() == eb.keys()
        for k in ea:
            torch.testing.assert_close(ea[k], eb[k], rtol=rtol, atol=atol, msg=k)


@needs_op
@pytest.mark.parametrize("time", [None, "concat"])
def test_sparse_rounds_equal_masked_rounds(time):
    runs = {}
    for mode in (False, True, "auto"):
        model = cnf(time=time)
        runs[mode] = so.prune.iterative(model, retrain(), schedule=SCHEDULE, sparse=mode, progress=False)
        runs[mode].model = model
    assert [r.sparse for r in runs[False].rounds] == [False] * 4
    assert [r.sparse for r in runs[True].rounds] == [True] * 4
    # "auto": a round is sparse when some layer is at density <= AUTO_MAX_DENSITY (the others stay masked)
    expect = [any(float(m.float().mean()) <= AUTO_MAX_DENSITY for m in masks(sd).values())
              for sd in runs[False].checkpoints]
    assert [r.sparse for r in runs["auto"].rounds] == expect and expect[1:] == [True] * 3
    assert_same_rounds(runs[False], runs[True])
    assert_same_rounds(runs[False], runs["auto"])
    # the model handed back is the masked one, and it changed from round to round
    assert isinstance(runs[True].model.field, MLPVectorField) and so.prune.sparsity(runs[True].model).total > 0.8
    e0, e3 = effective(runs[True].checkpoints[0]), effective(runs[True].checkpoints[3])
    assert any(not torch.equal(e0[k], e3[k]) for k in e0)
    assert [r.steps for r in runs[True].rounds] == [6] * 4


@needs_op
def test_sparse_round_trains_the_sparse_model_and_keeps_pruned_orig_values():
    model = cnf()
    so.prune.apply(model, "magnitude", 0.7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def fit_fn(m, callbacks=()):
        seen.append(type(m.field).__name__)
        return retrain(epochs=1)(m, callbacks=callbacks)

    wrapper = SparseRetrain(fit_fn, "auto")
    wrapper(model)
    assert seen == ["SparseMLPField"] and wrapper.last_sparse
    after = model.state_dict()
    for k, v in after.items():
        if k.endswith("_orig"):
            mask = after[k[:-5] + "_mask"].bool()
            assert torch.equal(v[~mask], before[k][~mask])  # pruned entries untouched
            assert not torch.equal(v[mask], before[k][mask])  # kept entries trained
        elif k.endswith("_mask"):
            assert torch.equal(v, before[k])


@needs_op
def test_callbacks_see_the_masked_model_up_to_date():
    model = cnf()
    so.prune.apply(model, "magnitude", 0.8)
    looks = []

    def cb(state):
        m = state.model
        assert m is model and isinstance(m.field, MLPVectorField)
        looks.append((state.step, m.field.layers[1].weight_orig.detach().clone()))
        return state.step == 3

    SparseRetrain(retrain(epochs=2), True)(model, callbacks=[cb])
    assert [s for s, _ in looks] == [1, 2, 3]
    assert not torch.equal(looks[0][1], looks[1][1])  # synchronised every step it is read
    assert torch.equal(looks[-1][1], model.field.layers[1].weight_orig.detach())


@needs_op
def test_rewind_and_icp_in_sparse_rounds_match_masked():
    probe = [(data(32),)]
    runs = {}
    for mode in (False, True):
        model = cnf()
        stop = so.prune.ICP(probe=probe, check_every=2, patience=1, min_steps=2)
        runs[mode] = so.prune.iterative(model, retrain(), schedule=SCHEDULE, sparse=mode, rewind=2, stop=stop,
                                        progress=False)
    assert [r.stop_reason for r in runs[True].rounds] == [r.stop_reason for r in runs[False].rounds]
    assert [r.steps for r in runs[True].rounds] == [r.steps for r in runs[False].rounds]
    assert_same_rounds(runs[False], runs[True])


@needs_op
def test_resume_mid_cascade_in_sparse_mode(tmp_path):
    class Killed(Exception):
        pass

    calls = []

    def dying(m, callbacks=()):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return retrain()(m, callbacks=callbacks)

    ref = so.prune.iterative(cnf(), retrain(), schedule=SCHEDULE, sparse=True, progress=False)
    with pytest.raises(Killed):
        so.prune.iterative(cnf(), dying, schedule=SCHEDULE, sparse=True, checkpoint_dir=tmp_path, progress=False)
    model = cnf(seed=5)  # other weights: all must come from the checkpoint
    hist = so.prune.iterative(model, retrain(), schedule=SCHEDULE, sparse=True, checkpoint_dir=tmp_path,
                              resume=True, progress=False)
    assert [r.round for r in hist.rounds] == [0, 1, 2, 3] and len(hist.checkpoints) == 2
    assert [r.sparse for r in hist.rounds] == [True] * 4
    for sa, sb in zip(ref.checkpoints[2:], hist.checkpoints):
        for k in sa:
            torch.testing.assert_close(sa[k] * sa.get(k[:-5] + "_mask", 1) if k.endswith("_orig") else sa[k],
                                       sb[k] * sb.get(k[:-5] + "_mask", 1) if k.endswith("_orig") else sb[k],
                                       rtol=1e-7, atol=1e-9)


def test_auto_and_bad_values():
    ok, why = auto_sparse(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert not ok and "MLPVectorField" in why
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    hist = so.prune.iterative(mlp, lambda m, callbacks=(): None, schedule=[0.3], progress=False)
    assert hist.rounds[0].sparse is False  # "auto" trains a model without a field masked
    for bad in ("yes", 1, None, "Auto"):
        with pytest.raises(ValueError, match=r"sparse must be True, False or 'auto'"):
            so.prune.iterative(cnf(), lambda m, callbacks=(): None, schedule=[0.5], sparse=bad, progress=False)


@needs_op
def test_layer_plan_and_copy_back_checks():
    model = cnf()
    so.prune.apply(model, "magnitude", 0.7, scope="layer")
    so.prune.apply(model, "magnitude", 0.7)  # nothing more: per-layer densities 0.3
    plan = layer_plan(model, 0.5)
    assert plan and set(plan.values()) == {"csr"}
    assert set(layer_plan(model, 0.2).values()) == {"dense"}
    sm = sparsify(model, format="csr", formats=plan)
    other = cnf()
    so.prune.apply(other, "magnitude", 0.5)
    with pytest.raises(RuntimeError, match="changed the mask"):
        copy_back(sm, other)
    with pytest.raises(RuntimeError, match="do not match"):
        copy_back(sm, cnf())


@needs_op
def test_sparse_true_float32_and_history_json(tmp_path):
    model = cnf(dtype=torch.float32)
    hist = so.prune.iterative(model, retrain(epochs=1, dtype=torch.float32), schedule=[0.5, 0.2], sparse=True,
                              checkpoint_dir=tmp_path, progress=False)
    assert all(r.sparse for r in hist.rounds) and "sparse" in hist.table()
    saved = so.prune.PruneHistory.from_dicts(hist.to_dicts())
    assert [r.sparse for r in saved.rounds] == [True, True]
    assert all(math.isclose(r.lr_start, 1e-2) for r in saved.rounds)


def test_sparse_true_on_a_plain_mlp_equals_masked():
    """Without a field there is no fused op: sparse=True still trains SparseLinear layers (per-layer ops)."""
    from prune_helpers import mlp, mse

    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 3, generator=g, dtype=torch.float64)
    y = torch.tanh(X[:, :2])
    fit_fn = functools.partial(fit, data=(X, y), loss_fn=mse, epochs=2, lr=1e-2, batch_size=16, progress=False)
    runs = {}
    for mode in (False, True):
        torch.manual_seed(0)
        runs[mode] = so.prune.iterative(mlp((3, 16, 16, 2)), fit_fn, schedule=[0.5, 0.2], sparse=mode,
                                        progress=False)
    assert [r.sparse for r in runs[True].rounds] == [True, True]
    assert_same_rounds(runs[False], runs[True])


@needs_op
def test_sparse_round_optimiser_holds_only_the_kept_weights_and_starts_fresh():
    """The policy of the module doc: a fresh AdamW per round whose moments cover exactly the kept
    entries (plus biases), and no optimiser state carried from one round to the next."""
    model = cnf()
    so.prune.apply(model, "magnitude", 0.8)
    kept = sum(int(m.sum()) for m in so.prune.masks(model).values())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    seen = []

    def cb(state):
        opt = state.optimizer
        numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
        steps = {int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"] if p in opt.state}
        seen.append((opt, numel, steps))  # holding opt keeps it alive: no reused object

    wrapper = SparseRetrain(retrain(epochs=1), True)
    wrapper(model, callbacks=[cb])
    wrapper(model, callbacks=[cb])
    assert {n for _, n, _ in seen} == {kept + biases}
    first, second = seen[0], seen[len(seen) // 2]
    assert first[0] is not second[0] and first[2] == second[2] == {1}  # a new optimiser, its step count from 1


@needs_op
def test_auto_trains_masked_under_a_rewinding_wrapper():
    """so.prune.rewinding(fit, model) rewinds the model it is handed by name: "auto" must not hand it
    the sparse copy (it falls back to masked rounds); iterative(rewind=) stays sparse."""
    model = cnf()
    hist = so.prune.iterative(model, so.prune.rewinding(retrain(epochs=1), model, "init"), schedule=[0.5, 0.2],
                              progress=False)
    assert [r.sparse for r in hist.rounds] == [False, False]
    h2 = so.prune.iterative(cnf(), retrain(epochs=1), schedule=[0.5, 0.2], rewind="init", progress=False)
    assert [r.sparse for r in h2.rounds] == [True, True]
    assert_same_rounds(hist, h2)
