"""The op layer itself: the extension and the Python fallback declare the same ops and schemas,
the package works without the extension, and the backend setting switches kernels explicitly
(the backward of a call runs on the backend its forward ran on)."""
import json
import subprocess
import sys

import pytest
import torch

from sparseode.nn import SparseLinear
from sparseode.ops import active_backend, library, reference, set_backend, set_gpu_backend, spmm, use_backend
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


def test_backward_runs_on_the_backend_that_ran_the_forward(monkeypatch):
    """A forward under use_backend("torch") while the C++ kernels are the default: its backward,
    run after the block, calls the reference kernels too (spmm_t, then sddmm)."""
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    calls = []
    kernels = TORCH.kernels()

    def counted(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    monkeypatch.setattr(TORCH, "kernels", lambda: {n: counted(n, f) for n, f in kernels.items()})
    x, w, mask, b = make_case(SHAPES[3])
    sw = SparseLinear.from_dense(torch.nn.Linear(w.shape[1], w.shape[0]), mask, format="csr").sparse
    x.requires_grad_()
    with use_backend("torch", "cpu"):
        y = spmm(x, sw.values, sw.pattern)
    assert active_backend("cpu") == "cpu"
    y.sum().backward()
    assert calls == ["csr_spmm", "csr_spmm_t", "csr_sddmm"]
    calls.clear()
    spmm(x, sw.values, sw.pattern).sum().backward()
    assert calls == []  # the default C++ kernels


def test_reference_is_the_fallback_kernel_of_the_masked_ops_on_cpu():
    x, w, mask, b = make_case(SHAPES[3])
    layer = SparseLinear.from_dense(torch.nn.Linear(w.shape[1], w.shape[0]), mask, format="masked")
    assert not library.kernel_registered("masked_spmm", "CPU")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference.spmm(x, layer.sparse.values, layer.sparse.pattern, layer.bias))
