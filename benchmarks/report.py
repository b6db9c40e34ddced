"""Outputs of a benchmark run: ``results.json``, PNG plots and one self-contained ``report.html``.

Plots per testbed:

- ``<testbed>_frontier.png``: PSNR against wall-clock speedup (left) and against the FLOP
  speedup ``1 / FLOP fraction`` (right), one line per method family;
- ``<testbed>_decisions.png``: what each step did (full / block / token / skip) for every X-Slim
  setting and the other methods that report per-step decisions;
- ``<testbed>_indicator.png``: the step indicators over one full run (block 0's modulated-input
  change, the stack residual change) and each X-Slim online run's accumulated probe.

``report.html`` is meant to be read by a person: the run's metadata as short tables (testbed,
sampler, steps, samples, machine, load, code version), the realism ruler of each testbed
(:mod:`benchmarks.ruler`: published real-model PSNR beside the testbed's), the results table,
the plots, and the sample grids with each method's name, speedup, FLOPs and PSNR drawn on its
grid. ``report.md`` holds the same tables as markdown. ``python -m benchmarks.screenshot``
renders the HTML to a PNG in headless Chromium to check how it reads.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

KIND_CODES = {"full": 3, "block": 2, "token": 1, "skip": 0}
KIND_COLORS = [
    "#d9d9d9",
    "#4c9be8",
    "#f0a030",
    "#222222",
]  # skip, token, block, full (skip grey: visible on white)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def plot_frontier(tb: dict[str, Any], path: Path, title: str) -> None:
    """PSNR vs. wall-clock speedup and vs. FLOP speedup, one line per family.

    The legend sits to the right of both panels (with 20 families it would hide the points),
    and the left panel also shows the published real-model points of the realism ruler (grey
    numbers, named in the legend), so that the testbed's curves are seen against what the real model scores.
    """
    from benchmarks.ruler import FIGURES, analog_model

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.4))
    families: dict[str, list[tuple[float, float, float, str]]] = {}
    for name, e in tb["methods"].items():
        y = _num(e.get("psnr"))
        if y is None:
            continue
        families.setdefault(e["family"], []).append(
            (e["speedup"], e.get("flops_speedup") or float("nan"), y, name)
        )
    # tab20 gives each of up to 20 families its own colour (the default cycle repeats after 10);
    # its strong shades (even indices) first, the pale ones only past 10 families
    cmap = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    colours = {fam: cmap(order[i % 20]) for i, fam in enumerate(sorted(families))}
    for ax, idx, xlabel in (
        (axes[0], 0, "wall-clock speedup (x, median of paired timing ratios)"),
        (axes[1], 1, "FLOP speedup (x, 1 / transformer FLOP fraction)"),
    ):
        for fam, pts in sorted(families.items()):
            pts = sorted(pts, key=lambda p: p[idx])
            style = "-o" if fam.startswith("xslim") else "--s"
            ax.plot(
                [p[idx] for p in pts], [p[2] for p in pts], style, label=fam, ms=5, lw=1.3, color=colours[fam]
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR vs. full computation (dB)")
        ax.grid(alpha=0.3)
    model = analog_model(tb)
    pub = sorted((f for f in FIGURES if f.model == model), key=lambda f: f.speedup)
    # each published point drawn as its number (a legend entry says which setting it is): text
    # labels beside the points collide where published points sit close together
    for i, f in enumerate(pub, 1):
        axes[0].plot(
            [f.speedup],
            [f.psnr],
            marker=f"${i}$",
            ms=8 if i < 10 else 11,
            color="0.3",
            ls="none",
            label=f"{i}: {f.setting} ({f.speedup:.2f}x, {f.psnr:.1f} dB)",
        )
    axes[0].set_title(f"along wall clock (grey numbers: {model}, published)", fontsize=10)
    axes[1].set_title("along FLOPs", fontsize=10)
    # a heading entry above the numbered points: the numbers are the real model's, not the testbed's
    axes[0].plot([], [], ls="none", label=f"published {model} (X-Slim paper):")
    handles, labels = axes[0].get_legend_handles_labels()
    k = labels.index(f"published {model} (X-Slim paper):")
    first = len(families)
    handles.insert(first, handles.pop(k))
    labels.insert(first, labels.pop(k))
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.74, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.74, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_decisions(tb: dict[str, Any], path: Path, title: str) -> bool:
    """Raster of per-step kinds of the first batch, one row per method that reports them."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    rows, labels = [], []
    for name, e in tb["methods"].items():
        stats = e.get("run_stats") or [{}]
        kinds = stats[0].get("kinds")
        if kinds:
            rows.append([KIND_CODES.get(k, 3) for k in kinds])
            labels.append(name)
    if not rows:
        return False
    width = max(len(r) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    fig, ax = plt.subplots(figsize=(min(18, 3 + width * 0.18), 1 + 0.28 * len(rows)))
    ax.imshow(
        grid, aspect="auto", cmap=ListedColormap(KIND_COLORS), vmin=-0.5, vmax=3.5, interpolation="nearest"
    )
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("sampling step")
    ax.set_xticks(range(0, width, max(1, width // 25)))
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(facecolor=KIND_COLORS[v], edgecolor="0.4", label=k) for k, v in KIND_CODES.items()],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=7,
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_indicator(tb: dict[str, Any], path: Path, title: str) -> None:
    """The per-step indicators of one full run (the U-shape of the spec, if the model has it)."""
    plt = _plt()
    prof = tb.get("step_profile") or []
    fig, ax = plt.subplots(figsize=(9, 4))
    for key, label in (
        ("probe_change", "block 0 modulated input, rel. L1 change (X-Slim/TeaCache probe)"),
        ("residual_change", "stack residual, rel. L1 change (X-Slim offline profile)"),
    ):
        xs = [p["step"] for p in prof if _num(p.get(key)) is not None]
        ys = [p[key] for p in prof if _num(p.get(key)) is not None]
        if xs:
            ax.plot(xs, ys, "-o", ms=3, label=label)
    ax.set_xlabel("sampling step")
    ax.set_ylabel("relative L1 change from the previous step (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        # below the axes: the curve is U-shaped on some models, so no corner inside is free
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def image_grid(
    images: torch.Tensor, n: int = 20, cols: int = 10, scale: int = 3, label: str | None = None
) -> bytes:
    """PNG bytes of the first ``n`` images (``(N, C, H, W)`` in ``[0, 1]``) tiled in ``cols`` columns.

    With ``label``, the text is drawn in a white band above the grid, so that a grid saved or
    copied out of the report still says which method drew it and at what speed and quality.
    """
    from PIL import Image, ImageDraw

    imgs = images[:n].detach().float().clamp(0, 1).cpu()
    if imgs.ndim == 5:  # video (B, C, T, H, W): first frame
        imgs = imgs[:, :, 0]
    b, c, h, w = imgs.shape
    cols = min(cols, b)
    rows = (b + cols - 1) // cols
    canvas = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i in range(b):
        r, q = divmod(i, cols)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = imgs[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    im = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    if label:
        font = _font(13)
        band = 20
        # as wide as the label: a grid of a few samples is narrower than its text
        width = max(im.width, int(font.getlength(label)) + 8)
        out = Image.new("RGB", (width, im.height + band), "white")
        out.paste(im.convert("RGB"), (0, band))
        ImageDraw.Draw(out).text((3, 2), label, fill="black", font=font)
        im = out
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _font(size: int) -> Any:
    """DejaVu Sans (shipped with matplotlib, so present wherever the plots are drawn)."""
    from matplotlib import font_manager
    from PIL import ImageFont

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:  # a matplotlib without its fonts: PIL's own bitmap font still reads
        return ImageFont.load_default()


def grid_label(name: str, e: dict[str, Any]) -> str:
    """``name: 2.92x wall clock, FLOPs 0.321, PSNR 31.1 dB`` for one method's results entry."""
    if e.get("family") == "reference":
        return f"{name}: the reference (full computation)"
    psnr = e.get("psnr")
    p = "inf" if psnr in ("inf", float("inf")) else (f"{psnr:.1f}" if _num(psnr) is not None else "-")
    ff = _num(e.get("flops_fraction"))
    sp = _num(e.get("speedup"))
    parts = [f"{sp:.2f}x wall clock" if sp is not None else "speedup -"]
    if ff is not None:
        parts.append(f"FLOPs {ff:.3f}")
    parts.append(f"PSNR {p} dB")
    return f"{name}: " + ", ".join(parts)


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def code_version(root: Path | None = None) -> str:
    """``git describe --always --dirty`` of the repository holding ``benchmarks/`` ("unknown"
    outside git): the code version a report states, so that numbers can be traced to a commit."""
    import subprocess

    root = root or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_text(machine: Any) -> str:
    """One readable line for ``meta["machine"]`` (a dict written by :mod:`benchmarks.run`)."""
    if not isinstance(machine, dict):
        return str(machine) if machine else "not recorded"
    cores = machine.get("cpu_count")
    threads = machine.get("torch_threads")
    bits = [
        f"{machine.get('processor', '?')}, {cores} cores" if cores else str(machine.get("processor", "?")),
        f"torch {machine['torch']}" + (f" ({threads} thread{'s' if threads != 1 else ''})" if threads else "")
        if machine.get("torch")
        else "",
        f"Python {machine['python']}" if machine.get("python") else "",
        str(machine.get("platform", "")),
    ]
    return "; ".join(b for b in bits if b)


def load_text(tb: dict[str, Any]) -> str:
    """The load average while timing, e.g. ``1.02 -> 1.24 (1 min) on 2 cores``, with a warning
    when it reached :data:`benchmarks.run.QUIET_LOAD_PER_CORE` per core (wall-clock ratios are then
    noisy)."""
    from benchmarks.run import QUIET_LOAD_PER_CORE, timing_was_noisy

    load = tb.get("timing_load_average") or {}
    before, after, cores = load.get("before"), load.get("after"), load.get("cpu_count")
    if not before or not after:
        return "not recorded"
    text = f"{before[0]:.2f} -> {after[0]:.2f} (1-minute average, before -> after timing)"
    if cores:
        text += f" on {cores} cores"
        if timing_was_noisy(tb):
            text += f": busy machine (>= {QUIET_LOAD_PER_CORE * cores:g}), wall-clock speedups are noisy"
    return text


def _reference(tb: dict[str, Any]) -> dict[str, Any]:
    return next((e for e in tb["methods"].values() if e.get("family") == "reference"), {})


def run_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows describing the whole run; fields missing from ``meta`` are skipped
    (a ``results.json`` merged from several runs keeps their metadata under ``runs``)."""
    rows: list[tuple[str, str]] = []
    if meta.get("code_version"):
        rows.append(("code version (git)", str(meta["code_version"])))
    if meta.get("command"):
        rows.append(("command", str(meta["command"])))
    if meta.get("started"):
        took = f", {meta['seconds']:.0f} s in all" if _num(meta.get("seconds")) is not None else ""
        rows.append(("started", f"{meta['started']}{took}"))
    if "machine" in meta:
        rows.append(("machine", machine_text(meta["machine"])))
    if meta.get("steps"):
        rows.append(("reference steps", str(meta["steps"])))
    if meta.get("samples"):
        rows.append(("samples per method", f"{meta['samples']} (seed {meta.get('seed', 0)} + batch index)"))
    if meta.get("timing_samples"):
        rows.append(
            (
                "timing",
                f"batch of {meta['timing_samples']}, {meta.get('repeats', '?')} repeats, each method next to "
                "a run of the full computation; speedup = median of the pairs' ratios",
            )
        )
    runs = meta.get("runs")
    if isinstance(runs, dict):
        for name, r in runs.items():
            rows.append((f"run {name}", f"{r.get('command', '')} ({machine_text(r.get('machine'))})"))
    return rows


def testbed_rows(tb: dict[str, Any], meta: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows describing one testbed's part of the run."""
    desc = tb.get("testbed")
    d = desc if isinstance(desc, dict) else {"name": str(desc)}
    ref = _reference(tb)
    rows = [("model / testbed", f"{d.get('name', '?')}: {d.get('model', 'model not described')}")]
    if d.get("sampler"):
        rows.append(("sampler", str(d["sampler"])))
    if d.get("guidance_scale") is not None:
        rows.append(("guidance scale", f"{d['guidance_scale']:g}"))
    if d.get("data"):
        rows.append(("data", str(d["data"])))
    if d.get("checkpoint"):
        rows.append(("checkpoint", str(d["checkpoint"])))
    steps = ref.get("steps", meta.get("steps"))
    rows.append(("steps (reference)", str(steps) if steps else "not recorded"))
    rows.append(("samples per method", str(meta.get("samples", "not recorded"))))
    rows.append(("load average while timing", load_text(tb)))
    if _num(tb.get("full_step_seconds")) is not None:
        rows.append(("one full step (timing batch)", f"{1000 * tb['full_step_seconds']:.1f} ms"))
    if "restored_bit_identical" in tb:
        rows.append(
            ("plain pipeline restored bit-identically", "yes" if tb["restored_bit_identical"] else "NO")
        )
    return rows


def _kv_table(rows: list[tuple[str, str]], cls: str) -> str:
    esc = html.escape
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table class='{cls}'>{body}</table>"


def _ruler_html(tb: dict[str, Any]) -> str:
    from benchmarks.ruler import (
        RULER_HEADER,
        SOURCE,
        analog_model,
        is_realistic,
        median_gap,
        table_rows,
        unmatched,
        verdict,
    )

    esc = html.escape
    known = median_gap(tb)[0] is not None
    cls = "verdict bad" if known and not is_realistic(tb) else "verdict"
    steps = _reference(tb).get("steps")
    parts = [
        f"<h3>Realism ruler: published {esc(analog_model(tb))} figures beside this testbed</h3>",
        f"<p class='{cls}'>{esc(verdict(tb))}</p>",
        "<table class='ruler'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in RULER_HEADER) + "</tr>",
    ]
    for row in table_rows(tb, matched_only=True):
        parts.append("<tr class='ruler-row'>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    missing = unmatched(tb)
    if missing:
        parts.append(f"<p class='note'>Published, not run in this run: {esc(missing)}.</p>")
    note = f"Source: {SOURCE}. Gap = testbed PSNR minus published PSNR, both against a 50-step reference."
    if steps and steps != 50:
        note += f" This run's reference has {steps} steps: indicative only."
    parts.append(f"<p class='note'>{esc(note)}</p>")
    return "\n".join(parts)


CSS = (
    "body{font-family:'DejaVu Sans',sans-serif;margin:24px;max-width:1500px;color:#222;line-height:1.35}"
    "h2{border-bottom:2px solid #ccc;padding-bottom:3px;margin-top:36px}"
    "table{border-collapse:collapse;font-size:13px;margin:6px 0}"
    "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}"
    "table.meta th{text-align:left;background:#f3f3f3;font-weight:600;white-space:nowrap}"
    "table.meta td{text-align:left;max-width:1100px}"
    "table.ruler td:nth-child(4),table.ruler th:nth-child(4){text-align:left}"
    "table.results tr:nth-child(even),table.ruler tr:nth-child(even){background:#fafafa}"
    ".grid td{text-align:left;vertical-align:middle} .grid td.label{min-width:260px}"
    "img.samples{image-rendering:pixelated;display:block}"
    ".note{color:#555;font-size:12px} ul{font-size:13px}"
    ".verdict{font-weight:bold;padding:6px 10px;background:#eef6ee;border-left:5px solid #3a3;display:inline-block}"
    ".verdict.bad{background:#fff2e6;border-left-color:#e67e00}"
    "img.plot{max-width:100%;border:1px solid #eee}"
)


def write_html(results: dict[str, Any], images: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> Path:
    """Write ``report.html`` (plots and image grids embedded as base64 PNG)."""
    from benchmarks.run import SUMMARY_HEADER, sensitivity_line, summary_rows

    meta = results["meta"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>X-Slim benchmark report</title>"
        f"<style>{CSS}</style></head><body>",
        "<h1>X-Slim benchmark report</h1>",
        _kv_table(run_rows(meta), "meta run-meta"),
        "<p class=note>PSNR: per image on [0,1] pixels against the full computation of the same seed, averaged "
        "over images (dB). FLOPs: torch FLOP counter over one timing batch, as a fraction of the full "
        "computation; X-Slim FLOPs: X-Slim's own accounting. acc / FD: classifier accuracy on the requested "
        "class and Frechet distance in the classifier's 64-d features vs. real test digits. bk %step: "
        "X-Slim's bookkeeping per step as a percentage of a full step's time. The testbeds are small "
        "models trained here: read every margin next to the realism ruler of its testbed.</p>",
    ]
    for name, tb in results["testbeds"].items():
        steps = _reference(tb).get("steps", meta.get("steps"))
        parts.append(f"<h2 id='{esc(name)}'>{esc(name)}</h2>")
        parts.append(_kv_table(testbed_rows(tb, meta), "meta testbed-meta"))
        parts.append(_ruler_html(tb))
        parts.append("<h3>Results</h3>")
        parts.append(
            "<table class='results'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in SUMMARY_HEADER) + "</tr>"
        )
        for row in summary_rows(tb):
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        parts.append(f"<p><b>{esc(sensitivity_line(tb, steps))}</b></p>")
        fl = tb.get("floors")
        if fl:
            parts.append(
                f"<p class=note>Real-vs-real floor ({int(fl['n'])} real training digits vs. real test digits): "
                f"accuracy {fl['accuracy_real_n']:.3f}, FD {fl['frechet_distance_real_n']:.2f}; whole train split "
                f"vs. test split: FD {fl['frechet_distance_train_vs_test']:.2f}, classifier test accuracy "
                f"{fl['accuracy_real_test']:.3f}.</p>"
            )
        if tb.get("refused"):
            parts.append("<h3>Methods that could not run</h3><ul>")
            for m, r in tb["refused"].items():
                parts.append(
                    f"<li><b>{esc(m)}</b>: {esc(str(r.get('reason', 'no reason recorded')) if isinstance(r, dict) else str(r))}</li>"
                )
            parts.append("</ul>")
        notes = [(m, e["note"]) for m, e in tb["methods"].items() if e.get("note")]
        if notes:
            parts.append("<h3>Configuration notes</h3><ul>")
            for m, n in notes:
                parts.append(f"<li><b>{esc(m)}</b>: {esc(str(n))}</li>")
            parts.append("</ul>")
        for suffix, caption in (
            ("frontier", "Speed vs. PSNR (upper right is better)"),
            ("decisions", "Per-step decisions (first batch)"),
            ("indicator", "Step indicators over a full run"),
        ):
            p = out_dir / f"{name}_{suffix}.png"
            if p.exists():
                parts.append(
                    f"<h3>{caption}</h3><img class='plot' alt='{esc(name)} {suffix}' src='{_b64(p.read_bytes())}'>"
                )
        grids = images.get(name, {})
        if grids:
            parts.append(
                "<h3>Samples (same seeds, side by side; first 20, columns are the classes 0-9)</h3>"
                "<table class='grid'>"
            )
            for m, imgs in grids.items():
                e = tb["methods"][m]
                label = grid_label(m, e)
                name_part, _, numbers = label.partition(": ")
                parts.append(
                    f"<tr class='sample-row' data-method='{esc(m)}'><td class='label'><b>{esc(name_part)}</b><br>"
                    f"<span class=note>{esc(numbers)}</span></td>"
                    f"<td><img class='samples' alt='{esc(label)}' src='{_b64(image_grid(imgs, label=label))}'></td></tr>"
                )
            parts.append("</table>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts))
    return path


def write_markdown(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``report.md``: the run's metadata, and per testbed its metadata, the realism ruler
    and the results table (the text a person pastes into an issue or a doc)."""
    from benchmarks import ruler
    from benchmarks.run import SUMMARY_HEADER, summary_rows

    meta = results["meta"]

    def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
        clean = [[c.replace("|", "/") for c in r] for r in rows]
        return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + [
            "| " + " | ".join(r) + " |" for r in clean
        ]

    lines = ["# X-Slim benchmark report", ""]
    lines += md_table(["field", "value"], [[k, v] for k, v in run_rows(meta)])
    for name, tb in results["testbeds"].items():
        lines += ["", f"## {name}", ""]
        lines += md_table(["field", "value"], [[k, v] for k, v in testbed_rows(tb, meta)])
        lines += ["", ruler.markdown(name, tb), ""]
        lines += md_table(SUMMARY_HEADER, summary_rows(tb))
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_outputs(results: dict[str, Any], images: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
    """Write ``results.json``, the plots, ``report.html`` and ``report.md`` into ``out_dir``."""
    from benchmarks.run import dump_json

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, tb in results["testbeds"].items():
        steps = _reference(tb).get("steps", results["meta"].get("steps"))
        plot_frontier(tb, out_dir / f"{name}_frontier.png", f"{name}: speed vs. PSNR at {steps} steps")
        plot_decisions(tb, out_dir / f"{name}_decisions.png", f"{name}: per-step decisions ({steps} steps)")
        plot_indicator(tb, out_dir / f"{name}_indicator.png", f"{name}: step indicators over a full run")
    dump_json(results, out_dir / "results.json")
    write_html(results, images, out_dir)
    write_markdown(results, out_dir)
