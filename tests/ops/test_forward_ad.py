"""Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) through the per-layer ops: the ops
have no forward formula, so a tangent is refused with an error naming the argument, in C++
(csrc/autograd_ops.cpp) and, without sparseode._C, in Python (sparseode/ops/tangents.py) with the
same message. Before, the Python path let torch.func.jvp read zero tangents."""
import json
import subprocess
import sys

import pytest
import torch

from sparseode.testing import backend_skip_reason

# Every op of every format: the message of a jvp on each tensor argument, and the value of a call
# inside a dual level whose inputs carry no tangent (must be the plain call's).
_REFUSALS = r"""
import json, sys, warnings
if sys.argv[1] == "python":
    sys.modules["sparseode._C"] = None  # as if never built
warnings.simplefilter("ignore")
import torch
import torch.autograd.forward_ad as fwAD
from sparseode.ops import SparseWeight, library

gen = torch.Generator().manual_seed(0)
rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
out = {"messages": {}, "plain_in_dual_level": {}}
for fmt in ("masked", "csr", "bsr"):
    sw = SparseWeight.from_dense(rand(8, 6), torch.rand(8, 6, generator=gen) < 0.5, format=fmt, block=(2, 3))
    pattern, v = tuple(sw.pattern), sw.values.detach()
    cases = {
        "spmm": ([rand(5, 6), v, rand(8)], lambda a: (a[0], a[1], *pattern, a[2], "tanh")),
        "spmm_fm": ([rand(6, 5), v, rand(8)], lambda a: (a[0], a[1], *pattern, a[2], "softplus", 3)),
        "spmm_t": ([rand(5, 8), v], lambda a: (a[0], a[1], *pattern)),
        "sddmm": ([rand(5, 8), rand(5, 6)], lambda a: (a[0], a[1], *pattern)),
    }
    for prim, (inputs, args) in cases.items():
        op = library.op(fmt, prim)
        for i in range(len(inputs)):
            def f(t, i=i):
                return op(*args([t if j == i else x for j, x in enumerate(inputs)]))
            try:
                torch.func.jvp(f, (inputs[i],), (torch.ones_like(inputs[i]),))
                message = None
            except RuntimeError as err:
                message = str(err).splitlines()[0]
            with fwAD.dual_level():
                try:
                    op(*args([fwAD.make_dual(x, torch.ones_like(x)) if j == i else x for j, x in enumerate(inputs)]))
                    dual_message = None
                except RuntimeError as err:
                    dual_message = str(err).splitlines()[0]
            out["messages"][f"{fmt}_{prim}:{i}"] = [message, dual_message]
        with fwAD.dual_level():
            in_level = op(*args(inputs))
        out["plain_in_dual_level"][f"{fmt}_{prim}"] = float((in_level - op(*args(inputs))).abs().max())
print(json.dumps(out))
"""
ARGS = {"spmm": ("x", "values", "bias"), "spmm_fm": ("xT", "values", "bias"), "spmm_t": ("g", "values"),
        "sddmm": ("a", "c")}


def _refusals(path: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _REFUSALS, path], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _expected(fmt: str, prim: str, arg: str) -> str:
    return (f"sparseode::{fmt}_{prim}: argument {arg} carries a forward-mode tangent, and sparseode's ops "
            "have no forward-mode AD formula (feature-major spmm_fm takes tangent directions as extra columns)")


def test_without_the_extension_a_tangent_is_refused_naming_the_argument():
    out = _refusals("python")
    assert len(out["messages"]) == 3 * sum(map(len, ARGS.values()))
    for key, (jvp_message, dual_message) in out["messages"].items():
        op_name, i = key.split(":")
        fmt, prim = op_name.split("_", 1)
        want = _expected(fmt, prim, ARGS[prim][int(i)])
        assert jvp_message == want, key
        assert dual_message == want, key
    assert all(err == 0.0 for err in out["plain_in_dual_level"].values()), out["plain_in_dual_level"]


def test_cpp_and_python_refuse_a_tangent_with_the_same_message():
    if backend_skip_reason("cpu"):
        pytest.skip(backend_skip_reason("cpu"))
    assert _refusals("cpp")["messages"] == _refusals("python")["messages"]

