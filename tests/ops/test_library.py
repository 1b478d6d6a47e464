"""The op layer itself: the extension and the Python fallback declare the same ops and schemas,
the package works without the extension, and the backend setting switches kernels explicitly
(a backward runs on the backend selected when it runs), and a layer pinned to a backend calls it
without switching that setting."""
import json
import subprocess
import sys

import pytest
import torch

from sparseode.nn import SparseLinear
from sparseode.ops import active_backend, library, reference, select, set_backend, set_gpu_backend, spmm, use_backend
from sparseode.ops.backend import TORCH
from sparseode.testing import SHAPES, backend_skip_reason, make_case


def test_extension_declares_the_schemas_the_python_layer_expects():
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    import sparseode._C  # noqa: F401 - the ops.cpp declarations

    for name, schema in library.SCHEMAS.items():
        assert str(getattr(torch.ops.sparseode, name).default._schema) == f"sparseode::{schema}"


_WITHOUT_EXTENSION = r"""
import json, sys, warnings
sys.modules["sparseode._C"] = None  # as if never built
warnings.simplefilter("ignore")
import torch
from sparseode.nn import SparseLinear
from sparseode.ops import library, select
from sparseode.testing import SHAPES, make_case, opcheck_cases
schemas = {name: str(getattr(torch.ops.sparseode, name).default._schema) for name in library.SCHEMAS}
errors = {}
for fmt in ("masked", "csr", "bsr"):
    x, w, mask, b = make_case(SHAPES[3])
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w); lin.bias.copy_(b)
    layer = SparseLinear.from_dense(lin, mask, format=fmt, block=SHAPES[3].block)
    x.requires_grad_()
    y = layer(x)
    y.sum().backward()
    want = torch.nn.functional.linear(x, w * mask, b)
    errors[fmt] = float((y - want).abs().max())
    values = layer.sparse.values.detach().clone().requires_grad_()
    g = torch.randn(x.shape[0], w.shape[0], requires_grad=True)
    for op, args in opcheck_cases(fmt, x, values, layer.sparse.pattern, layer.bias, g):
        torch.library.opcheck(op, args)
print(json.dumps({"schemas": schemas, "errors": errors, "active": select.active("cpu")}))
"""


def test_without_the_extension_the_same_ops_run_the_reference():
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["schemas"] == {name: f"sparseode::{schema}" for name, schema in library.SCHEMAS.items()}
    assert out["active"] == "torch"
    assert all(err < 1e-5 for err in out["errors"].values()), out["errors"]


def test_set_backend_and_use_backend_switch_and_restore():
    default = active_backend("cpu")
    with use_backend("torch", "cpu"):
        assert active_backend("cpu") == "torch"
        with use_backend(default, "cpu"):
            assert active_backend("cpu") == default
        assert active_backend("cpu") == "torch"
    assert active_backend("cpu") == default
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend("mkl")
    with pytest.raises(ValueError, match="device_type must be one of"):
        set_backend("torch", "tpu")
    if backend_skip_reason("cuda", "cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available here"):
            set_gpu_backend("cuda")
    assert active_backend("cpu") == default


def _counted_reference(monkeypatch) -> list[str]:
    """The names of the reference kernels that run from now on, in order (the ``torch`` backend's
    kernels, counted where select registers them)."""
    calls = []
    kernels = TORCH.kernels()

    def counted(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    monkeypatch.setattr(TORCH, "kernels", lambda: {n: counted(n, f) for n, f in kernels.items()})
    return calls


def test_backward_runs_on_the_backend_selected_when_it_runs(monkeypatch):
    """The autograd formulas call the ops, so a backward runs on whatever is selected when it runs:
    inside use_backend("torch") every kernel is the reference, after the block the C++ ones."""
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    calls = _counted_reference(monkeypatch)
    x, w, mask, b = make_case(SHAPES[3])
    sw = SparseLinear.from_dense(torch.nn.Linear(w.shape[1], w.shape[0]), mask, format="csr").sparse
    x.requires_grad_()
    with use_backend("torch", "cpu"):
        spmm(x, sw.values, sw.pattern).sum().backward()
        assert calls == ["csr_spmm", "csr_spmm_t", "csr_sddmm"]
        y = spmm(x, sw.values, sw.pattern)
    assert active_backend("cpu") == "cpu"
    y.sum().backward()
    assert calls == ["csr_spmm", "csr_spmm_t", "csr_sddmm", "csr_spmm"]


def _pinned_pair(fmt: str, backend: str):
    x, w, mask, b = make_case(SHAPES[3])
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    make = lambda be: SparseLinear.from_dense(lin, mask, format=fmt, backend=be, block=SHAPES[3].block,
                                              activation="tanh")
    return x, make(backend), make("torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt", ["masked", "csr", "bsr"])
def test_a_layer_pinned_to_another_backend_calls_it_without_switching_the_setting(monkeypatch, fmt, backend):
    """Pinned to "torch" (the reference) or "triton" (its twin ops) while the C++ kernels are
    selected: forward and backward run there, and nothing is registered per call."""
    if backend_skip_reason(backend):
        pytest.skip(backend_skip_reason(backend))
    x, layer, ref = _pinned_pair(fmt, backend)
    monkeypatch.setattr(select, "set_backend", lambda *a: pytest.fail("a pinned layer switched the setting"))
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xs)
    if backend == "triton":
        assert f"triton_{fmt}_spmm" in y.grad_fn.name()
    y.pow(2).sum().backward()
    ref(xr).pow(2).sum().backward()
    torch.testing.assert_close(y, ref(x), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(layer.sparse.values.grad, ref.sparse.values.grad, rtol=2e-5, atol=2e-5)


def test_a_layer_pinned_to_the_compiled_kernels_while_another_backend_is_selected(monkeypatch):
    """The one case that switches: pinned to "cpu" under use_backend("torch"), its forward runs the
    C++ kernel and the setting comes back."""
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    calls = _counted_reference(monkeypatch)
    x, layer, ref = _pinned_pair("csr", "cpu")
    with use_backend("torch", "cpu"), torch.no_grad():
        y = layer(x)
        assert active_backend("cpu") == "torch"
    assert calls == []
    torch.testing.assert_close(y, ref(x), rtol=2e-5, atol=2e-5)


def test_reference_is_the_fallback_kernel_of_the_masked_ops_on_cpu():
    x, w, mask, b = make_case(SHAPES[3])
    layer = SparseLinear.from_dense(torch.nn.Linear(w.shape[1], w.shape[0]), mask, format="masked")
    assert not library.kernel_registered("masked_spmm", "CPU")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference.spmm(x, layer.sparse.values, layer.sparse.pattern, layer.bias))
