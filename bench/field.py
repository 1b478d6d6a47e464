"""Issue 16's field benchmark (sparseode.fieldbench): toy 2 -> 64x3, 2 -> 256x3, 2 -> 1024x3 and the
POWER-sized 6 -> 60x3 concatsquash field at densities 0.5-0.02 and batch 1000/10000; field forward,
log_prob (exact trace), sample and one training step; the sparse fused field against dense torch /
FFJORD-style A and against B (the same dense weights through the fused op); every row checks
values (training: loss and every gradient) against the masked dense model before it is timed.

    OMP_NUM_THREADS=2 python bench/field.py                  # --grid issue: the README table, ~8 min
    OMP_NUM_THREADS=2 python bench/field.py --grid full      # plus 2 -> 1024x3 CNF tasks at batch 10000
    python bench/field.py --quick                            # toy and POWER, 2 densities, batch 1000
    python bench/field.py --archs wide256 --densities 0.1 0.02 --batches 1000 --tasks forward train
    python bench/field.py --dry-run                          # the cells and the time estimate only
    python bench/field.py --table bench/results/<a>.json [<b>.json]   # README's table from earlier runs

The same as ``sparseode bench field [options]``. Writes bench/results/field-<grid>-cpu-<machine>-
<threads>threads.{json,csv,md} and prints the markdown table of ratios that README pastes.
"""
from __future__ import annotations

import sys

from sparseode.fieldbench import main

if __name__ == "__main__":
    sys.exit(main())
