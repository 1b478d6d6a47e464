"""torch.library.opcheck of every op (every format and primitive) over the shapes of
sparseode/testing.py, on each backend that runs on CPU tensors here: the C++ kernels, the
reference, and the Triton kernels through the interpreter.

The schema, autograd-registration and fake-kernel checks run on every shape; the AOT-autograd
check with dynamic shapes (a trace and compile of forward and backward, seconds per op) runs on
one shape per format and backend, and the interpreter (each program run in Python) on three shapes
only, to keep CI short."""
import pytest
import torch

from sparseode.ops import SparseWeight, use_backend
from sparseode.ops.library import SCHEMAS, kernel_registered
from sparseode.testing import FORMATS, SHAPES, backend_skip_reason, make_case, opcheck_cases

TRITON_SHAPES = (SHAPES[0], SHAPES[3], SHAPES[8])
AOT_SHAPE = SHAPES[8]  # 3-D input (flattened to 42 rows), partly kept 4x4 blocks
FAST_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _cases(shape, fmt):
    x, w, mask, b = make_case(shape)
    x = x.reshape(-1, shape.inp).clone().requires_grad_()
    sw = SparseWeight.from_dense(w, mask, format=fmt, block=shape.block if fmt == "bsr" else (16, 16))
    values = sw.values.detach().clone().requires_grad_()
    g = torch.randn(x.shape[0], shape.out, requires_grad=True)
    return opcheck_cases(fmt, x, values, sw.pattern, b.requires_grad_(), g)


@pytest.mark.parametrize("backend", ("cpu", "torch", "triton", "triton-twins"))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id)
def test_opcheck(shape, fmt, backend):
    """``triton``: the ops with the Triton backend selected on the CPU; ``triton-twins``: the
    ``torch.library.triton_op`` twins themselves (``sparseode::triton_*``, what a layer pinned to
    Triton calls)."""
    why = backend_skip_reason(backend.removesuffix("-twins"))
    if why:
        pytest.skip(why)
    if backend.startswith("triton") and shape not in TRITON_SHAPES:
        pytest.skip("the interpreter runs on three of the shapes (TRITON_SHAPES) to keep CI short")
    checks = None if shape == AOT_SHAPE else FAST_CHECKS  # None: every check, AOT included
    if backend == "triton-twins":
        from sparseode.ops.triton import family

        for op, args in _cases(shape, fmt):
            twin = family()[op.name().split("::")[1]]
            # the same schema (triton_op infers int arguments as SymInt)
            assert str(twin._schema).replace("SymInt", "int") == str(op._schema).replace("sparseode::", "sparseode::triton_")
            torch.library.opcheck(twin, args, test_utils=checks or torch.library._OPCHECK_DEFAULT_UTILS)
        return
    with use_backend(backend, "cpu"):
        for op, args in _cases(shape, fmt):
            torch.library.opcheck(op, args, test_utils=checks or torch.library._OPCHECK_DEFAULT_UTILS)


def test_every_op_is_checked_and_registered():
    """The ops opcheck covers are all the ops; each has a fallback kernel, and the compiled CPU
    kernels cover csr and bsr where the extension is built."""
    x, w, mask, b = make_case(SHAPES[1])
    covered = {op.name().split("::")[1] for fmt in FORMATS
               for op, _ in opcheck_cases(fmt, x, torch.zeros(1), (), None, torch.zeros(1))}
    assert covered == set(SCHEMAS)
    for name in SCHEMAS:
        assert kernel_registered(name, "CompositeExplicitAutograd"), name
    if backend_skip_reason("cpu") is None:
        compiled = {name for name in SCHEMAS if kernel_registered(name, "CPU")}
        assert compiled == {name for name in SCHEMAS if not name.startswith("masked")}
