"""Outputs of a benchmark run: ``results.json``, PNG plots and one self-contained ``report.html``.

Plots per testbed:

- ``<testbed>_frontier.png``: PSNR against wall-clock speedup (left) and against the FLOP
  speedup ``1 / FLOP fraction`` (right), one line per method family;
- ``<testbed>_decisions.png``: what each step did (full / block / token / skip) for every X-Slim
  setting and the other methods that report per-step decisions;
- ``<testbed>_indicator.png``: the step indicators over one full run (block 0's modulated-input
  change, the stack residual change) and each X-Slim online run's accumulated probe.
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
KIND_COLORS = ["#f7f7f7", "#4c9be8", "#f0a030", "#222222"]  # skip, token, block, full


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
    """PSNR vs. wall-clock speedup and vs. FLOP speedup, one line per family."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    families: dict[str, list[tuple[float, float, float, str]]] = {}
    for name, e in tb["methods"].items():
        y = _num(e.get("psnr"))
        if y is None:
            continue
        families.setdefault(e["family"], []).append(
            (e["speedup"], e.get("flops_speedup") or float("nan"), y, name)
        )
    for ax, idx, xlabel in (
        (axes[0], 0, "wall-clock speedup (median of paired ratios)"),
        (axes[1], 1, "1 / FLOP fraction"),
    ):
        for fam, pts in sorted(families.items()):
            pts = sorted(pts, key=lambda p: p[idx])
            style = "-o" if fam.startswith("xslim") else "--s"
            ax.plot([p[idx] for p in pts], [p[2] for p in pts], style, label=fam, ms=5, lw=1.3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR vs. full computation (dB, per image, mean)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("step")
    ax.set_xticks(range(0, width, max(1, width // 25)))
    from matplotlib.patches import Patch

    ax.legend(
        handles=[Patch(color=KIND_COLORS[v], label=k) for k, v in KIND_CODES.items()],
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
    ax.set_xlabel("step")
    ax.set_ylabel("relative change from the previous step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(images: torch.Tensor, n: int = 20, cols: int = 10, scale: int = 3) -> bytes:
    """PNG bytes of the first ``n`` images (``(N, C, H, W)`` in ``[0, 1]``) tiled in ``cols`` columns."""
    from PIL import Image

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
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def write_html(results: dict[str, Any], images: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> Path:
    """Write ``report.html`` (plots and image grids embedded as base64 PNG)."""
    from benchmarks.run import SUMMARY_HEADER, sensitivity_line, summary_rows

    meta = results["meta"]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>X-Slim benchmark</title><style>"
        "body{font-family:sans-serif;margin:24px;max-width:1500px} table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right} td:first-child,th:first-child{text-align:left}"
        ".grid td{text-align:left;vertical-align:middle} img{image-rendering:pixelated} .note{color:#555;font-size:12px}"
        "</style></head><body>",
        "<h1>X-Slim benchmark</h1>",
        f"<p><code>{esc(meta['command'])}</code><br>{meta['steps']} steps, {meta['samples']} samples, "
        f"timing batch {meta['timing_samples']} x {meta['repeats']} interleaved repeats (medians), seed {meta['seed']}. "
        f"Machine: {esc(str(meta['machine']))}. Total {meta.get('seconds', 0):.0f} s.</p>",
        "<p class=note>PSNR: per image on [0,1] pixels against the full computation of the same seed, averaged over "
        "images. FLOPs: torch FLOP counter over one timing batch, as a fraction of the full computation; "
        "X-Slim FLOPs: X-Slim's own accounting. acc / FD: classifier accuracy on the requested class and Frechet "
        "distance in the classifier's 64-d features vs. real test digits. bk %step: X-Slim's bookkeeping per step "
        "as a percentage of a full step's time.</p>",
    ]
    for name, tb in results["testbeds"].items():
        parts.append(f"<h2>{esc(name)}</h2><p>{esc(str(tb['testbed']))}</p>")
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in SUMMARY_HEADER) + "</tr>")
        for row in summary_rows(tb):
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
        parts.append("</table>")
        fl = tb["floors"]
        parts.append(f"<p><b>{esc(sensitivity_line(tb, meta['steps']))}</b></p>")
        parts.append(
            f"<p>Real-vs-real floor ({int(fl['n'])} real training digits vs. real test digits): accuracy "
            f"{fl['accuracy_real_n']:.3f}, FD {fl['frechet_distance_real_n']:.2f}; whole train split vs. test split: "
            f"FD {fl['frechet_distance_train_vs_test']:.2f}, classifier test accuracy {fl['accuracy_real_test']:.3f}. "
            f"Plain pipeline restored bit-identically after all methods: {tb['restored_bit_identical']}. "
            f"Full step: {1000 * tb['full_step_seconds']:.1f} ms.</p>"
        )
        if tb["refused"]:
            parts.append("<h3>Methods that could not run</h3><ul>")
            for m, r in tb["refused"].items():
                parts.append(f"<li><b>{esc(m)}</b>: {esc(r['reason'])}</li>")
            parts.append("</ul>")
        notes = [(m, e["note"]) for m, e in tb["methods"].items() if e.get("note")]
        if notes:
            parts.append("<h3>Configuration notes</h3><ul>")
            for m, n in notes:
                parts.append(f"<li><b>{esc(m)}</b>: {esc(n)}</li>")
            parts.append("</ul>")
        for suffix, caption in (
            ("frontier", "Speed vs. PSNR"),
            ("decisions", "Per-step decisions (first batch)"),
            ("indicator", "Step indicators over a full run"),
        ):
            p = out_dir / f"{name}_{suffix}.png"
            if p.exists():
                parts.append(f"<h3>{caption}</h3><img src='{_b64(p.read_bytes())}' style='max-width:100%'>")
        parts.append("<h3>Samples (same seeds, side by side)</h3><table class=grid>")
        for m, imgs in images.get(name, {}).items():
            e = tb["methods"][m]
            psnr = e.get("psnr")
            label = f"{m}<br><span class=note>{e['speedup']:.2f}x, PSNR {psnr if isinstance(psnr, str) else format(psnr, '.1f')}</span>"
            parts.append(f"<tr><td>{label}</td><td><img src='{_b64(image_grid(imgs))}'></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    path.write_text("\n".join(parts))
    return path


def write_outputs(results: dict[str, Any], images: dict[str, dict[str, torch.Tensor]], out_dir: Path) -> None:
    """Write ``results.json``, the plots and ``report.html`` into ``out_dir``."""
    from benchmarks.run import dump_json

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = results["meta"]["steps"]
    for name, tb in results["testbeds"].items():
        plot_frontier(tb, out_dir / f"{name}_frontier.png", f"{name}: speed vs. PSNR at {steps} steps")
        plot_decisions(tb, out_dir / f"{name}_decisions.png", f"{name}: per-step decisions ({steps} steps)")
        plot_indicator(tb, out_dir / f"{name}_indicator.png", f"{name}: step indicators over a full run")
    dump_json(results, out_dir / "results.json")
    write_html(results, images, out_dir)
