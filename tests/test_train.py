import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

import sparseode.data as D
from sparseode.models import CNF, MLPVectorField, ODEClassifier
from sparseode.train import FitResult, FitState, bits_per_dim, default_loss, evaluate, fit


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnf(seed=0, trace="exact"):
    torch.manual_seed(seed)
    return CNF(MLPVectorField(2, (8,)), trace=trace, rtol=1e-3, atol=1e-3)


def tiny_clf(seed=0):
    torch.manual_seed(seed)
    return ODEClassifier(2, (8,), 2, augment=1, rtol=1e-3, atol=1e-3)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_fit_flow_lowers_nll_and_records_history():
    x = D.toy("moons", 512, seed=0)
    cnf = tiny_cnf()
    before = evaluate(cnf, x)["nll"]
    res = fit(cnf, x, epochs=3, lr=1e-2, batch_size=128, progress=False)
    assert isinstance(res, FitResult)
    assert res.epochs_run == 3 and res.steps == 12 and not res.stopped_early
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    for h in res.history:
        assert h["nfe"] > 0 and h["time"] > 0 and math.isfinite(h["loss"]) and h["val"] is None
    assert res.best_val is None and res.best_state is not None
    assert evaluate(cnf, x)["nll"] < before - 0.1


def test_default_losses_are_nll_and_cross_entropy():
    cnf, clf = tiny_cnf(), tiny_clf()
    x = torch.randn(16, 2)
    y = torch.randint(0, 2, (16,))
    torch.testing.assert_close(default_loss(cnf)(cnf, (x,)), -cnf.log_prob(x).mean())
    torch.testing.assert_close(default_loss(clf)(clf, (x, y)), F.cross_entropy(clf(x), y))
    with pytest.raises(ValueError, match="labelled"):
        default_loss(clf)(clf, (x,))


def test_same_seed_same_run_different_seed_different_run():
    x = D.toy("gaussians", 256, seed=0)
    a, b, c = tiny_cnf(trace="hutchinson"), tiny_cnf(trace="hutchinson"), tiny_cnf(trace="hutchinson")
    ra = fit(a, x, epochs=2, batch_size=64, seed=3, progress=False)
    rb = fit(b, x, epochs=2, batch_size=64, seed=3, progress=False)
    fit(c, x, epochs=2, batch_size=64, seed=4, progress=False)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]


def test_fit_restores_global_rng_state():
    x = D.toy("gaussians", 128, seed=0)
    model = tiny_cnf(trace="hutchinson")
    torch.manual_seed(5)
    fit(model, x, epochs=1, batch_size=64, progress=False)
    after_fit = torch.rand(4)
    torch.manual_seed(5)
    untouched = torch.rand(4)
    assert torch.equal(after_fit, untouched)


def test_callbacks_see_every_step_and_can_stop():
    x = D.toy("moons", 512, seed=0)
    seen = []

    def cb(state: FitState):
        assert isinstance(state.optimizer, torch.optim.AdamW) and state.model is model
        seen.append((state.epoch, state.step, state.loss))
        return state.step == 5

    model = tiny_cnf()
    res = fit(model, x, epochs=10, batch_size=128, callbacks=[cb, lambda s: None], progress=False)
    assert [s for _, s, _ in seen] == [1, 2, 3, 4, 5]
    assert [e for e, _, _ in seen] == [0, 0, 0, 0, 1]
    assert res.stopped_early and res.steps == 5 and res.epochs_run == 2
    assert len(res.history) == 2 and res.history[-1]["steps"] == 5


def test_callback_keeps_pruning_masks_applied():
    # a model pruned the torch.nn.utils.prune way trains through the reparametrisation, and a
    # callback that re-zeroes weight_orig keeps pruned weights at exactly zero
    model = tiny_clf()
    layer = model.field.layers[0]
    prune.l1_unstructured(layer, "weight", amount=0.5)
    mask = layer.weight_mask.clone()
    orig_before = layer.weight_orig.detach().clone()

    def keep_masks(state):
        with torch.no_grad():
            layer.weight_orig.mul_(layer.weight_mask)

    X, y = D.classification("moons", 256, seed=0)
    fit(model, (X, y), epochs=2, batch_size=64, callbacks=[keep_masks], progress=False, weight_decay=0.1)
    assert torch.all(layer.weight[mask == 0] == 0) and torch.all(layer.weight_orig[mask == 0] == 0)
    assert not torch.equal(layer.weight_orig[mask == 1], orig_before[mask == 1])


def test_milestones_lower_the_learning_rate():
    x = D.toy("moons", 128, seed=0)
    res = fit(tiny_cnf(), x, epochs=4, lr=1e-2, milestones=(1, 3), gamma=0.5, batch_size=128, progress=False)
    assert [h["lr"] for h in res.history] == pytest.approx([1e-2, 5e-3, 5e-3, 2.5e-3])


def test_validation_best_state_and_checkpoint(tmp_path):
    x, xv = D.toy("gaussians", 512, seed=0), D.toy("gaussians", 256, seed=1)
    model = tiny_cnf()
    path = tmp_path / "ckpt" / "best.pt"
    res = fit(model, x, epochs=4, lr=2e-2, batch_size=128, val_data=xv, checkpoint=path, progress=False)
    vals = [h["val"] for h in res.history]
    assert all(v is not None for v in vals)
    assert res.best_val == min(vals) and res.best_epoch == vals.index(min(vals))
    assert res.history[0]["val_nll"] == vals[0] and "val_bpd" in res.history[0]
    # the best state is back in the model, and it is what the checkpoint holds
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.best_state[k])
    saved = torch.load(path)
    assert res.checkpoint == str(path) and saved["epoch"] == res.best_epoch
    for k, v in saved["state_dict"].items():
        assert torch.equal(v, res.best_state[k])
    assert evaluate(model, xv)["nll"] == pytest.approx(res.best_val, rel=1e-5)


def test_max_steps_and_data_forms():
    X, y = D.classification("moons", 300, seed=0)
    res = fit(tiny_clf(), (X, y), epochs=50, batch_size=32, max_steps=7, progress=False)
    assert res.steps == 7 and not res.stopped_early and res.epochs_run == 1
    batches = [(X[i:i + 100], y[i:i + 100]) for i in range(0, 300, 100)]
    res = fit(tiny_clf(), batches, epochs=2, progress=False)
    assert res.steps == 6
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=150)
    res = fit(tiny_clf(), loader, epochs=1, val_data=loader, progress=False)
    assert res.steps == 2 and 0 <= res.history[0]["val_accuracy"] <= 1
    # an iterable of plain tensors works for flows
    res = fit(tiny_cnf(), [X[:100], X[100:200]], epochs=1, progress=False)
    assert res.steps == 2


def test_bad_inputs_are_named():
    x = D.toy("moons", 64)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="data contains NaN"):
        fit(tiny_cnf(), bad, epochs=1, progress=False)
    with pytest.raises(ValueError, match="val_data contains NaN"):
        fit(tiny_cnf(), x, val_data=bad, epochs=1, progress=False)
    with pytest.raises(ValueError, match="data contains NaN"):
        fit(tiny_cnf(), [bad], epochs=1, progress=False)
    with pytest.raises(ValueError, match="same first dimension"):
        fit(tiny_clf(), (x, torch.zeros(10, dtype=torch.long)), epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit(tiny_cnf(), x, epochs=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(tiny_cnf(), x, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fit(tiny_cnf(), iter([x]), progress=False)
    with pytest.raises(TypeError, match="data must be"):
        fit(tiny_cnf(), 3.0, progress=False)


def test_progress_bar_shows_epoch_loss_and_nfe(capsys):
    fit(tiny_cnf(), D.toy("moons", 128), epochs=1, batch_size=64, progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "nfe=" in err and "epoch=" in err


def test_evaluate_flow_nll_and_bits_per_dim():
    cnf = tiny_cnf()
    x = D.toy("moons", 300, seed=2)
    ev = evaluate(cnf, x, batch_size=128)
    with torch.no_grad():
        nll = float(-cnf.log_prob(x).mean())
    assert ev["nll"] == pytest.approx(nll, rel=1e-3)  # batching changes adaptive steps slightly
    assert ev["bpd"] == pytest.approx(ev["nll"] / (2 * math.log(2)))
    ev64 = evaluate(cnf, x, dims=64, scale=D.DIGITS_SCALE)
    assert ev64["bpd"] == pytest.approx((ev64["nll"] + 64 * math.log(17)) / (64 * math.log(2)))
    assert bits_per_dim(2 * math.log(2), 2) == pytest.approx(1.0)


def test_evaluate_classifier_accuracy():
    clf = tiny_clf()
    X, y = D.classification("moons", 200, seed=1)
    ev = evaluate(clf, (X, y), batch_size=64)
    with torch.no_grad():
        logits = clf(X)
    assert ev["accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    assert ev["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-4)
    assert clf.training  # mode restored


def test_quality_small_budget_cnf_beats_a_gaussian_on_gaussians():
    x, test = D.toy("gaussians", 2000, seed=1), D.toy("gaussians", 2000, seed=3)
    torch.manual_seed(0)
    cnf = CNF(MLPVectorField(2, (32, 32)), rtol=1e-3, atol=1e-3)
    fit(cnf, x, epochs=6, lr=1e-2, batch_size=256, progress=False)
    nll = evaluate(cnf, test)["nll"]
    gauss = torch.distributions.MultivariateNormal(x.double().mean(0), torch.cov(x.double().T))
    gauss_nll = float(-gauss.log_prob(test.double()).mean())
    floor = D.true_entropy("gaussians")
    assert nll < gauss_nll - 1.0  # the best single Gaussian is at ~2.83 nats
    assert nll - floor < 0.5
    with torch.no_grad():
        samples = cnf.sample(2000, generator=torch.Generator().manual_seed(0))
    assert D.mode_coverage(samples, "gaussians")["modes_captured"] == 6


def test_quality_small_budget_classifier_on_concentric():
    X, y = D.classification("concentric", 1000, seed=1)
    Xt, yt = D.classification("concentric", 2000, seed=3)
    torch.manual_seed(0)
    clf = ODEClassifier(2, (16, 16), 2, augment=1, time="concat")
    fit(clf, (X, y), epochs=15, lr=1e-2, batch_size=128, progress=False)
    assert evaluate(clf, (Xt, yt))["accuracy"] > 0.95


def test_best_epoch_is_restored_when_training_gets_worse():
    x, xv = D.toy("gaussians", 512, seed=0), D.toy("gaussians", 256, seed=1)
    model = tiny_cnf()
    last = {}

    def remember(state):
        last.update({k: v.detach().clone() for k, v in state.model.state_dict().items()})

    # a 100x learning-rate jump after two epochs wrecks the fit, so the best epoch is an early one
    res = fit(model, x, epochs=4, lr=1e-2, milestones=(2,), gamma=100.0, batch_size=128, val_data=xv,
              callbacks=[remember], progress=False)
    assert res.best_epoch < 3 and res.history[-1]["val"] > res.best_val
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.best_state[k])
    assert any(not torch.equal(model.state_dict()[k], last[k]) for k in last)


def test_structure_change_during_fit_restarts_best_tracking():
    X, y = D.classification("moons", 256, seed=0)
    model = tiny_clf()

    def prune_at(step, stop):
        def cb(state):
            if state.step == step:
                prune.random_unstructured(state.model.field.layers[0], "weight", amount=0.5)
                return stop
        return cb

    # pruned after the last validation by a callback that stops the run: the pruned state stays
    res = fit(model, (X, y), epochs=3, batch_size=64, val_data=(X, y), callbacks=[prune_at(6, True)],
              progress=False)
    assert hasattr(model.field.layers[0], "weight_mask") and res.steps == 6 and res.best_epoch == 0
    # pruned before later validations: best tracking restarts and the best pruned state is restored
    model = tiny_clf()
    res = fit(model, (X, y), epochs=3, batch_size=64, val_data=(X, y), callbacks=[prune_at(2, False)],
              progress=False)
    assert "ode.field.layers.0.weight_mask" in res.best_state
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.best_state[k])


def test_a_stopping_callback_keeps_its_state_over_restore_best():
    # an ICP-like rule stops in the middle of the third epoch: fit must return the weights the rule
    # accepted, not roll back to the best validated epoch (an earlier state of the same round)
    x, xv = D.toy("gaussians", 512, seed=0), D.toy("gaussians", 256, seed=1)
    model = tiny_cnf()
    at_stop = {}

    def stop_at_10(state):
        if state.step == 10:
            at_stop.update({k: v.detach().clone() for k, v in state.model.state_dict().items()})
            return True

    res = fit(model, x, epochs=4, lr=1e-2, milestones=(1,), gamma=100.0, batch_size=128, val_data=xv,
              callbacks=[stop_at_10], progress=False)
    assert res.stopped_early and res.steps == 10 and res.best_epoch == 0
    assert any(not torch.equal(res.best_state[k], v) for k, v in at_stop.items())
    for k, v in model.state_dict().items():
        assert torch.equal(v, at_stop[k])
    # the same run without the stop rule: the budget ends it and the best epoch is restored
    model = tiny_cnf()
    res = fit(model, x, epochs=4, lr=1e-2, milestones=(1,), gamma=100.0, batch_size=128, val_data=xv,
              progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.best_state[k])
