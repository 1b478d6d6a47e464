"""Fuzz of corrupted sparse patterns and checkpoints, run as a script in a subprocess by
test_validate.py (so that a crash in a kernel shows as a failed test, not a dead test run).

Each case corrupts one pattern tensor of a valid weight (one entry changed, a dtype, a length, a
swap of two entries) and then either builds a SparseWeight from it or loads it as a checkpoint.
Every case must end in a Python exception, or, when the corruption happens to leave a valid
pattern, in a weight whose kernels agree with the reference. Prints one JSON line of counts.
"""
from __future__ import annotations

import json
import random
import sys

import torch

from sparseode.nn import SparseLinear
from sparseode.ops import PatternError, SparseWeight, reference


def _weights() -> list[SparseWeight]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for fmt, shape, block in (("csr", (9, 7), (1, 1)), ("bsr", (8, 12), (4, 3)), ("masked", (5, 6), (1, 1)),
                              ("csr", (6, 10), (1, 1)), ("bsr", (6, 6), (2, 2))):
        w = torch.randn(*shape, generator=gen)
        mask = torch.rand(*shape, generator=gen) < 0.4
        mask[0] = False  # an empty row
        out.append(SparseWeight.from_dense(w, mask, format=fmt, block=block))
    return out


def _corrupt(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    t = t.clone()
    kind = rng.choice(("entry", "entry", "entry", "dtype", "shorter", "longer", "swap", "negative"))
    if kind == "dtype":
        return t.to(rng.choice((torch.int32, torch.float32, torch.uint8)))
    if kind == "shorter":
        return t[:-1] if t.numel() else t.flatten()[:0]
    if kind == "longer":
        return torch.cat([t, t[:1]]) if t.numel() else torch.zeros(1, dtype=t.dtype)
    if t.numel() == 0:
        return t.reshape(-1)[:0].reshape(1, *t.shape[1:]) if t.dim() > 1 else torch.zeros(1, dtype=t.dtype)
    flat = t.view(-1)
    i = rng.randrange(flat.numel())
    if t.dtype == torch.bool:
        flat[i] = ~flat[i]
    elif kind == "swap" and flat.numel() > 1:
        j = rng.randrange(flat.numel())
        flat[i], flat[j] = flat[j].clone(), flat[i].clone()
    elif kind == "negative":
        flat[i] = -1 - flat[i]
    else:
        flat[i] = flat[i] + rng.choice((-2, -1, 1, 2, 1000))
    return t


def _agrees_with_reference(sw: SparseWeight) -> bool:
    """A pattern that passed validation: the compiled kernels give the reference answer."""
    layer = SparseLinear(sw, None, backend="cpu")
    x = torch.randn(3, sw.shape[1])
    with torch.no_grad():
        return torch.allclose(layer(x), reference.spmm(x, sw.values, sw.pattern), atol=1e-5)


def main(n_cases: int) -> int:
    rng = random.Random(0)
    counts = {"construct_rejected": 0, "construct_valid_and_correct": 0, "load_rejected": 0,
              "load_valid_and_correct": 0}
    weights = _weights()
    for case in range(n_cases):
        sw = weights[case % len(weights)]
        names = [n for n in sw.state_dict() if n != "values"]
        name = rng.choice(names)
        fields = {n: getattr(sw, n) for n in names}
        fields[name] = _corrupt(fields[name], rng)
        try:
            built = SparseWeight(sw.format, sw.shape, sw.values.detach(), fields)
        except PatternError:
            counts["construct_rejected"] += 1
        else:
            assert _agrees_with_reference(built), f"case {case}: {name} accepted but wrong"
            counts["construct_valid_and_correct"] += 1
        state = {k: v.clone() for k, v in sw.state_dict().items()}
        state[name] = fields[name]
        target = SparseWeight.from_dense(sw.to_dense().detach(), sw.kept_mask(), format=sw.format, block=sw.block)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        try:
            target.load_state_dict(state)
        except RuntimeError as err:
            assert "malformed" in str(err) or "size mismatch" in str(err), str(err)
            after = target.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before), f"case {case}: a rejected load changed the weight"
            counts["load_rejected"] += 1
        else:
            assert _agrees_with_reference(target), f"case {case}: checkpoint with {name} accepted but wrong"
            counts["load_valid_and_correct"] += 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
