"""Small matplotlib helpers shared by the experiments (PNG files, Agg backend, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# One colour and line style per model, the same in every figure (metaplastic twins dashed).
STYLES: Dict[str, Tuple[str, str]] = {
    "mamba2": ("tab:blue", "-"),
    "meta_mamba2": ("tab:blue", "--"),
    "gated_deltanet": ("tab:green", "-"),
    "meta_gated_deltanet": ("tab:green", "--"),
    "longhorn": ("tab:purple", "-"),
    "mesanet": ("tab:red", "-"),
    "palimpsa": ("tab:orange", "--"),
}

# A curve: ``(x, y)``, or ``(x, y, yerr)`` drawn with error bars.
Curve = Tuple[Sequence[float], ...]


def style(label: str) -> Tuple[Optional[str], str]:
    """Colour and line style of a curve: the model's; ``NAME@shape`` (``@width``) dotted, a ``b ≡ 0`` control
    ``not_NAME`` dash-dotted in its model's colour; a suffix after a space (``"palimpsa (zero filler)"``)
    is ignored."""
    name, _, accounting = label.split(" ")[0].partition("@")
    control = name.startswith("not_") and name[4:] in STYLES
    color, line = STYLES.get(name[4:] if control else name, (None, "-"))
    if control:
        return color, "-."
    return color, (":" if accounting in ("shape", "width") else line)


def curve_panels(path: Union[str, Path], panels: Mapping[str, Mapping[str, Curve]], *, xlabel: str,
                 ylabel: str, title: str, hline: Optional[float] = None, logx: bool = False,
                 extra: Optional[Tuple[str, str, Mapping[str, Curve], Optional[float]]] = None,
                 differences: Optional[Tuple[str, Sequence[str], Mapping[str, Tuple[Sequence[float], ...]]]] = None
                 ) -> Path:
    """Write a PNG with one panel per key of ``panels``; each panel maps a label to ``(x, y[, yerr])``.

    ``extra = (title, xlabel, curves, hline)``: one more panel, log-scaled y, no y limits (loss curves).
    ``differences = (title, tick labels, {label: (x, mean, half-width, decided)})``: a last panel of paired
    differences with error bars around 0 at integer positions ``x`` naming the ticks; a filled marker where
    ``decided`` is true, an open one elsewhere."""
    path = Path(path)
    n = max(len(panels), 1) + (extra is not None) + (differences is not None)
    fig, axes = plt.subplots(1, n, figsize=(max(5.2 * n, 7.5), 4.2), squeeze=False)  # room for the title
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for label, curve in curves.items():
            color, line = style(label)
            if len(curve) == 3:
                ax.errorbar(list(curve[0]), list(curve[1]), yerr=list(curve[2]), fmt=line, marker="o",
                            markersize=3, capsize=3, color=color, label=label)
            else:
                ax.plot(list(curve[0]), list(curve[1]), line, marker="o", markersize=3, color=color, label=label)
        if hline is not None:
            ax.axhline(hline, color="grey", linewidth=0.8, linestyle=":")
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if extra is not None:
        ax = axes[0][max(len(panels), 1)]
        panel, xlabel_extra, curves, line_at = extra
        for label, curve in curves.items():
            color, line = style(label)
            ax.plot(list(curve[0]), list(curve[1]), line, color=color, label=label)
        if line_at is not None:
            ax.axhline(line_at, color="grey", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel(xlabel_extra)
        ax.grid(alpha=0.3)
    axes[0][n - 1 - (differences is not None)].legend(fontsize=8, loc="best")
    if differences is not None:
        ax = axes[0][-1]
        panel, ticks, rows = differences
        width = 0.6 / max(len(rows), 1)
        for i, (label, (x, mean, half, decided)) in enumerate(rows.items()):
            color = f"C{i % 10}"
            xs = [v - 0.3 + (i + 0.5) * width for v in x]
            ax.errorbar(xs, list(mean), yerr=list(half), fmt="none", ecolor=color, capsize=2)
            for xv, yv, dv in zip(xs, mean, decided):
                ax.plot([xv], [yv], "o", color=color, markerfacecolor=color if dv else "white")
            ax.plot([], [], "o", color=color, label=label)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(list(ticks), rotation=45, ha="right", fontsize=7)
        ax.set_title(panel)
        ax.set_ylabel("accuracy difference a − b")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    from ..safe_io import atomic_file
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def save_run(result: dict, out: Union[str, Path], stem: str, plot, table) -> None:
    """Write ``OUT/<stem>.json`` and ``OUT/<stem>.png`` (via ``plot(result, path)``) and print ``table(result)``."""
    import json

    from ..safe_io import atomic_write
    out = Path(out)
    atomic_write(out / f"{stem}.json", json.dumps(result, indent=1))
    plot(result, out / f"{stem}.png")
    print(table(result))
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'} ({result['config']['seconds']} s)")
