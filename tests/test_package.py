"""Package foundation: backends() and `sparseode info`, the fallback when the compiled extension or
triton is missing, and lean imports."""
import subprocess
import sys
import textwrap

import pytest

import sparseode as so
from sparseode import cli


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_backends_lists_every_backend_with_a_reason_when_missing():
    status = so.backends()
    assert set(status) == {"cpu", "cuda", "triton", "torch"}
    assert status["torch"].available
    for name, st in status.items():
        assert st.available == (st.reason == ""), name


def test_cpu_backend_is_built_here():
    # CI builds the extension; a missing one would silently fall back to torch everywhere.
    assert so.backends()["cpu"].available, so.backends()["cpu"].reason


def test_info_command_prints_each_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name, st in so.backends().items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert ("yes" if st.available else "no") in line
        assert st.reason in line


def test_every_subcommand_has_help():
    parser = cli.build_parser()
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0


def test_works_without_compiled_extension_and_triton():
    proc = _run(
        """
        import sys, warnings
        sys.modules["sparseode._C"] = None   # as if the extension was never built
        sys.modules["triton"] = None         # as if triton was not installed
        import torch, sparseode as so
        from torch.nn.utils import prune
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status = so.backends()
        st = so.backends()
        assert not st["cpu"].available and "not built" in st["cpu"].reason, st["cpu"]
        assert not st["triton"].available and "not installed" in st["triton"].reason, st["triton"]
        assert st["torch"].available
        assert sum("falling back" in str(w.message) for w in caught) == 1
        torch.manual_seed(0)
        lin = torch.nn.Linear(12, 7)
        prune.random_unstructured(lin, "weight", amount=0.7)
        x = torch.randn(5, 12, requires_grad=True)
        dense = lin(x)
        sl = so.nn.SparseLinear.from_dense(lin, format="csr")
        y = sl(x)
        torch.testing.assert_close(y, dense)
        y.sum().backward()
        assert x.grad is not None
        try:
            so.nn.SparseLinear.from_dense(lin, format="csr", backend="cpu")(x)
        except RuntimeError as err:
            assert "not available" in str(err) and "not built" in str(err)
        else:
            raise AssertionError("backend='cpu' must fail without the extension")
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_import_is_lean():
    proc = _run(
        """
        import sys, torch
        import sparseode as so
        import sparseode.nn, sparseode.ops, sparseode.models, sparseode.prune, sparseode.data
        so.backends
        assert "triton" not in sys.modules, "importing sparseode imported triton"
        assert "matplotlib" not in sys.modules, "importing sparseode imported matplotlib"
        assert not torch.cuda.is_initialized()
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
