"""The pytest-benchmark suite of sparseode, and the ratio tables it prints.

    OMP_NUM_THREADS=2 pytest bench/ --benchmark-only --benchmark-json bench/results/pytest-bench-<machine>.json
    pytest bench/ --benchmark-only -k compile            # one family (kernels, e2e, compile)
    SPARSEODE_BENCH_QUICK=1 pytest bench/ --benchmark-disable   # tiny shapes, checks only (tests/)

Every test times one variant of one case. The variants of a case share one benchmark group and
name themselves in ``extra_info["variant"]``; each has been checked against the dense masked model
before it is timed. At the end of the session this plugin prints, from that same run, one table
per family: the median of every variant and its ratio to the group's ``dense`` variant (dense
median / variant median, > 1: faster than dense); ``--benchmark-json`` files carry the same
numbers under ``"ratios"``.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

BASELINE = "dense"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the cases import suite.py and the scripts


def pytest_configure(config):
    # the torch.sparse baseline uses beta CSR support knowingly; torch.compile's internals warn on jit
    config.addinivalue_line("filterwarnings", "ignore:Sparse CSR tensor support is in beta")
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated")


def _medians(benchmarks) -> dict[str, dict[str, float]]:
    """{group: {variant: median seconds}} of the benchmarks that ran, in run order."""
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in benchmarks:
        if bench.has_error or not bench.stats:
            continue
        variant = bench.extra_info.get("variant", bench.name)
        groups[bench.group or bench.name][variant] = bench.stats.median
    return groups


def ratios(benchmarks) -> dict[str, dict[str, dict[str, float]]]:
    """{group: {variant: {"median_ms", "vs_dense"}}}; ``vs_dense`` is absent where the group has
    no ``dense`` variant (e.g. under ``-k``)."""
    out = {}
    for group, medians in _medians(benchmarks).items():
        base = medians.get(BASELINE)
        out[group] = {v: {"median_ms": m * 1e3, **({"vs_dense": base / m} if base else {})}
                      for v, m in medians.items()}
    return out


def _tables(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Markdown tables, one per set of variants (groups with the same variants share a table)."""
    families: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for group, variants in table.items():
        families[tuple(variants)].append(group)
    lines = []
    for variants, groups in families.items():
        others = [v for v in variants if v != BASELINE]
        lines += ["", "| case | " + " | ".join(f"{v} ms" for v in variants) + " | "
                  + " | ".join(f"{v} vs dense" for v in others) + " |",
                  "|---" * (1 + len(variants) + len(others)) + "|"]
        for group in groups:
            row = table[group]
            cells = [f"{row[v]['median_ms']:.3f}" for v in variants]
            cells += [f"{row[v]['vs_dense']:.2f}x" if "vs_dense" in row[v] else "-" for v in others]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["ratios"] = ratios(benchmarks)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    table = ratios(session.benchmarks)
    if not table:
        return
    terminalreporter.section("sparseode: variant vs dense (dense median / variant median, this run)")
    for line in _tables(table):
        terminalreporter.write_line(line)
