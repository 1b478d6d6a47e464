"""The timed tasks of a case and the checks that run before any timing.

Tasks (``TASKS``), each on states ``x`` (B, d) float32:

* ``forward``: one evaluation ``f(t, x)`` of every field of the case, no grad;
* ``log_prob``: the CNF's ``log_prob(x)``, exact trace, no grad;
* ``sample``: the CNF's ``sample(B, z=z)`` from fixed latents ``z`` (B, d), no grad;
* ``train``: one training step: ``-log_prob(x).mean()``, its backward, an Adam step.

:func:`check` runs a task once on a form and compares its values (for ``train``: the loss and the
gradient of every parameter, sparse ones at their stored positions) with the reference form's
(the masked dense model), raising :class:`CheckFailed` on a mismatch. That call is also the
form's warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from sparseode.fieldbench.cases import Case

TASKS = ("forward", "log_prob", "sample", "train")
#: Relative tolerances (max abs difference / max abs reference) of each compared quantity, float32.
TOLERANCE = {"forward": 1e-5, "log_prob": 1e-4, "sample": 1e-4, "loss": 1e-4, "grad": 1e-3}
LEARNING_RATE = 1e-6  # tiny: the timed steps barely move the weights


class CheckFailed(AssertionError):
    """A form's values or gradients differ from the masked dense model's."""


@dataclass
class Inputs:
    """What every form of a case runs on: states x (B, d), latents z (B, d), one time t."""

    x: Tensor
    z: Tensor
    t: Tensor

    @classmethod
    def draw(cls, batch: int, dim: int, seed: int = 0) -> "Inputs":
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen), torch.tensor(0.5))


class Runner:
    """One form of a case ready to run every task: its fields, CNF and optimizer."""

    def __init__(self, case: Case, form: str, inputs: Inputs, steps: int) -> None:
        self.case = case
        self.form = form
        self.fields = case.fields(form)
        self.cnf = case.cnf(form, steps)
        self.inputs = inputs
        self.optimizer = torch.optim.Adam(self.cnf.parameters(), lr=LEARNING_RATE)
        self._built = {name: value.clone() for name, value in self.cnf.state_dict().items()}

    def restore(self) -> None:
        """Back to the weights as built, with a fresh optimizer: training steps move the dense
        forms' pruned weights off zero (their gradient there is not zero), which later tasks'
        checks must not see."""
        self.cnf.load_state_dict(self._built)
        self.optimizer = torch.optim.Adam(self.cnf.parameters(), lr=LEARNING_RATE)

    def forward(self) -> Tensor:
        with torch.no_grad():
            return torch.cat([field(self.inputs.t, self.inputs.x) for field in self.fields], dim=-1)

    def log_prob(self) -> Tensor:
        with torch.no_grad():
            return self.cnf.log_prob(self.inputs.x)

    def sample(self) -> Tensor:
        with torch.no_grad():
            return self.cnf.sample(self.inputs.z.shape[0], z=self.inputs.z)

    def loss_and_backward(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = -self.cnf.log_prob(self.inputs.x).mean()
        loss.backward()
        return loss.detach()

    def train(self) -> Tensor:
        loss = self.loss_and_backward()
        self.optimizer.step()
        return loss

    def task(self, name: str) -> Callable[[], Tensor]:
        if name not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {name!r}")
        return getattr(self, name)

    def named_grads(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Each parameter's gradient under the name of its masked dense counterpart, with the mask
        of the positions it holds (None: all). A sparse layer's ``sparse.values`` gradient becomes
        that layer's ``weight`` gradient as a dense (out, in) tensor, zero where pruned."""
        grads = {}
        for name, module in self.cnf.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                if name.endswith(".sparse") and pname == "values":
                    mask = module.kept_mask()
                    dense = torch.zeros(module.shape, dtype=grad.dtype)
                    dense[mask] = grad  # CSR stores row-major, the order boolean indexing reads
                    grads[name[: -len(".sparse")] + ".weight"] = (dense, mask)
                else:
                    grads[f"{name}.{pname}" if name else pname] = (grad, None)
        return grads


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (inf on a shape mismatch or a non-finite value)."""
    if got.shape != want.shape:
        return float("inf")
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    return err if err == err else float("inf")


def _compare(what: str, got: Tensor, want: Tensor, tol: float) -> float:
    err = relative_error(got, want)
    if not err <= tol:
        raise CheckFailed(f"{what}: differs from the masked dense model (relative error {err:.2e} > {tol:g})")
    return err


def reference_result(task: str, reference: Runner) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """The reference form's result of ``task`` (its warm-up call too): the task's output, or for
    ``train`` the loss and every parameter's gradient (then the Adam step is taken)."""
    if task != "train":
        return reference.task(task)()
    loss = reference.loss_and_backward()
    grads = {name: grad for name, (grad, _) in reference.named_grads().items()}
    reference.optimizer.step()
    return loss, grads


def check(task: str, runner: Runner, want: Tensor | tuple[Tensor, dict[str, Tensor]]) -> float:
    """Run ``task`` once on ``runner`` and compare with the reference's result ``want``
    (:func:`reference_result`); returns the worst relative error, raises :class:`CheckFailed`.
    Sparse gradients are compared at the stored positions; for ``train`` the Adam step is taken
    after the comparison."""
    what = f"{task} of the {runner.form} form"
    if task != "train":
        return _compare(what, runner.task(task)(), want, TOLERANCE[task])
    ref_loss, ref_grads = want
    worst = _compare(f"{what}: loss", runner.loss_and_backward(), ref_loss, TOLERANCE["loss"])
    grads = runner.named_grads()
    if grads.keys() != ref_grads.keys():
        raise CheckFailed(f"{what}: parameters {sorted(grads.keys() ^ ref_grads.keys())} have no counterpart")
    for name, (grad, mask) in grads.items():
        ref = ref_grads[name]
        got, ref = (grad, ref) if mask is None else (grad[mask], ref[mask])
        worst = max(worst, _compare(f"{what}: gradient of {name}", got, ref, TOLERANCE["grad"]))
    runner.optimizer.step()
    return worst
