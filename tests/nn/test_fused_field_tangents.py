"""The fused field op refuses forward-mode tangents (it has backward formulas only): torch.func.jvp
through a sparsified field read zero tangents before, a silent wrong answer."""
import pytest
import torch
from torch.autograd import forward_ad

import sparseode as so
from sparseode.models import MLPVectorField
from sparseode.nn import sparsify
from sparseode.nn.fused_field import fused_field, op_available

pytestmark = pytest.mark.skipif(not op_available()[0], reason="needs sparseode._C's fused field op")


@pytest.fixture
def field():
    torch.manual_seed(0)
    f = MLPVectorField(2, (16, 16), time="concat")
    so.prune.apply(f, so.prune.importance(f, method="magnitude"), 0.8)
    return sparsify(f, format="csr")  # "auto" times the formats and may keep a layer dense under load


# fused_field calls the op itself: field(t, z) may run per layer (another backend selected), where
# the per-layer ops' own tangent rules apply
def test_jvp_in_the_state_is_refused_naming_the_argument(field):
    z, v = torch.randn(5, 2), torch.randn(5, 2)
    with pytest.raises(RuntimeError, match=r"sparseode::mlp_field: argument z carries a forward-mode tangent"):
        torch.func.jvp(lambda z: fused_field(field, torch.tensor(0.3), z)[0], (z,), (v,))


def test_a_tangent_on_a_weight_list_entry_is_refused(field):
    values = next(p for n, p in field.named_parameters() if n.endswith("sparse.values"))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(values.detach(), torch.ones_like(values))
        with torch.nn.utils.stateless._reparametrize_module(field, {n: dual for n, p in field.named_parameters()
                                                                      if p is values}):
            with pytest.raises(RuntimeError, match="argument weights carries a forward-mode tangent"):
                fused_field(field, torch.tensor(0.3), torch.randn(4, 2))


def test_no_tangent_inside_a_dual_level_gives_the_plain_result(field):
    z = torch.randn(6, 2)
    expected = fused_field(field, torch.tensor(0.3), z)[0]
    with forward_ad.dual_level():
        got = fused_field(field, torch.tensor(0.3), z)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.isfinite(got).all() and got.abs().sum() > 0
