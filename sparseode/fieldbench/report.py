"""The field benchmark's outputs: a progress line per row, JSON and CSV files named after the
machine and thread count, and the markdown table of ratios that README pastes."""
from __future__ import annotations

import csv
import json
import platform
import re
from pathlib import Path
import torch

from sparseode.benchmark import FIELDS
from sparseode.fieldbench.tasks import TASKS

CSV_COLUMNS = ("field", "density", "batch", "task", "nfe", "flop_ratio", "A_ms", "B_ms", "sparse_ms",
               "sparse_vs_A", "sparse_vs_B", "B_vs_A", "max_rel_error", "B_max_rel_error", "wall_s")


def field_label(name: str) -> str:
    """``toy64`` -> ``2 -> 64x3``; the POWER field names its time mode and flows."""
    spec = FIELDS[name]
    widths = set(spec.hidden)
    hidden = f"{spec.hidden[0]}x{len(spec.hidden)}" if len(widths) == 1 else "-".join(map(str, spec.hidden))
    label = f"{spec.dim} -> {hidden}"
    if spec.time:
        label += f" {spec.time}"
    if spec.flows > 1:
        label += f", {spec.flows} flows"
    return label


def machine_name() -> str:
    """A file-name slug of the CPU model (``amd-epyc-7b13``), else of ``platform.machine()``."""
    model = ""
    try:
        model = next((line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    model = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core|@.*", " ", (model or platform.machine()).lower())
    return re.sub(r"[^a-z0-9]+", "-", model).strip("-")[:40] or "unknown"


def output_stem(grid_name: str, threads: int) -> str:
    return f"field-{grid_name}-cpu-{machine_name()}-{threads}threads"


def metadata(grid_name: str, options: dict, settings: dict, estimate_s: float, took_s: float,
             left_out: list) -> dict:
    """What the JSON records about the run: grid, machine, threads, torch, arguments, times."""
    from sparseode.ops.extension import cpu_capability

    return dict(grid=grid_name, machine=machine_name(), processor=platform.processor(),
                cpu_kernel_variant=cpu_capability(), threads=torch.get_num_threads(), torch=torch.__version__, options=options, settings=settings,
                estimate_s=estimate_s, took_s=took_s, left_out=[list(c) for c in left_out])


def write(rows: list[dict], meta: dict, out_dir: str | Path, stem: str) -> list[Path]:
    """``<out_dir>/<stem>.json`` (meta + rows), ``.csv`` (one line per row) and ``.md`` (the
    markdown table); returns the three paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, md_path = (out / f"{stem}.{ext}" for ext in ("json", "csv", "md"))
    json_path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows) + "\n")
    return [json_path, csv_path, md_path]


def progress_line(row: dict) -> str:
    return (f"{field_label(row['field']):<32} d={row['density']:<5g} b={row['batch']:<6} {row['task']:<9} "
            f"A {row['A_ms']:10.2f} ms  B {row['B_ms']:10.2f} ms  sparse {row['sparse_ms']:10.2f} ms  "
            f"{row['sparse_vs_A']:6.2f}x vs A  {row['sparse_vs_B']:6.2f}x vs B  FLOPs {row['flop_ratio']:5.1f}x  "
            f"({row['wall_s']:.1f} s)")


def _ratio_cell(row: dict | None) -> str:
    return "-" if row is None else f"{row['sparse_vs_A']:.2f}x / {row['sparse_vs_B']:.2f}x"


def markdown_table(rows: list[dict]) -> str:
    """One line per (field, density, batch): the FLOP ratio, then per task the sparse form's
    speedup over A and over B (A's time / sparse time, B's time / sparse time; > 1: faster)."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_key.setdefault((row["field"], row["density"], row["batch"]), {})[row["task"]] = row
    names = {"forward": "forward vs dense / B", "log_prob": "log_prob vs A / B", "sample": "sample vs A / B",
             "train": "train step vs A / B"}
    lines = ["| field | density | batch | FLOP ratio | " + " | ".join(names[t] for t in tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for (name, density, batch), cells in by_key.items():
        flops = next(iter(cells.values()))["flop_ratio"]
        lines.append(f"| {field_label(name)} | {density:g} | {batch} | {flops:.1f}x | "
                     + " | ".join(_ratio_cell(cells.get(t)) for t in tasks) + " |")
    return "\n".join(lines)


def table_from_json(*paths: str | Path) -> str:
    """The markdown table of the rows of JSON files this benchmark wrote, in the order given."""
    return markdown_table([row for path in paths for row in json.loads(Path(path).read_text())["rows"]])
