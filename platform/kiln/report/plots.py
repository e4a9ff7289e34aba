"""kiln-report's pictures: one PNG per quantity, one curve per run, on shared axes.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): nothing needs a display, and
the process's global matplotlib state (a notebook's backend) is left alone."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import (EngFormatter, FormatStrFormatter, FuncFormatter, LogFormatter, MaxNLocator,
                               NullLocator)

from kiln.report.series import Run, is_number

SIZE, DPI = (9, 5), 120  # 1080 x 600 pixels
WIDE = (12.5, 5)  # many series: the legend goes beside the axes, which keep their width
STEP = "step (optimizer steps)"
# Keys with a picture of their own (or none: step, tokens are axes; eval_split is text).
KNOWN = {"step", "tokens", "loss", "eval_loss", "eval_split", "lr", "grad_norm", "tokens_per_s", "mfu"}
MAX_OTHER = 12
TRAIN, EVAL = {"lw": 1.2}, {"lw": 1.2, "ls": "--", "marker": "o", "ms": 3}  # eval: few points, marked
EVENT = {"lw": 1.0, "ls": ":", "alpha": 0.8}


def spread(values: list[float]) -> float:
    """max/min of positive values; 0 if any is not positive (no log scale possible)."""
    if not values or min(values) <= 0:
        return 0.0
    return max(values) / min(values)


def new_axes(title: str, ylabel: str, series: int):
    fig = Figure(figsize=WIDE if series > 6 else SIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.set(title=title, xlabel=STEP, ylabel=ylabel)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def log_y(ax, values: list[float]) -> None:
    """Log scale with plain numbers (2.5, not 2.5x10^0). Within a decade or so (a loss curve),
    evenly spaced round values: the decade's own ticks (1, 2, 3 ...) would leave the end unlabelled."""
    ax.set_yscale("log")
    if spread(values) < 20:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=10))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def legend(ax, runs: int, handles=None) -> None:
    handles = handles or ax.get_legend_handles_labels()[0]
    if runs > 6:  # many trials: beside the axes (new_axes made the figure wider), not over the curves
        ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    elif len(handles) > 1:
        ax.legend(handles=handles, fontsize="small")


def save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig).print_png(path)
    return path


def tokens_axis(ax, runs: list[Run]) -> None:
    """A top axis in tokens seen, when every run trains the same tokens per step."""
    rates = {r["tokens"] / r["step"] for run in runs for r in run.records if is_number(r.get("tokens")) and r["step"]}
    if len(rates) == 1 and (rate := rates.pop()) > 0:
        top = ax.secondary_xaxis("top", functions=(lambda s: s * rate, lambda t: t / rate))
        top.xaxis.set_major_formatter(EngFormatter())
        top.set_xlabel("tokens seen")


def loss_plot(runs, labels, colors, title, out: Path) -> Path | None:
    fig, ax = new_axes(f"{title}: loss", "cross-entropy loss (nats/token)", len(runs))
    splits = {r["eval_split"] for run in runs for r in run.records if "eval_loss" in r and r.get("eval_split")}
    eval_label = f"eval (on {'/'.join(sorted(splits))} shards)" if splits else "eval (val shards)"
    single, values = len(runs) == 1, []
    for run, label, color in zip(runs, labels, colors):
        for key, style, name in (("loss", TRAIN, "train" if single else label),
                                 ("eval_loss", EVAL, eval_label if single else None)):
            x, y = run.series(key)
            values += y
            if x:
                ax.plot(x, y, color=color, label=name, **style)
    if not values:
        return None
    if spread(values) >= 2:  # most of a run is spent well below its first losses
        log_y(ax, values)
    tokens_axis(ax, runs)
    events = mark_events(ax, runs, colors)
    handles = ax.get_legend_handles_labels()[0]
    if events:
        handles.append(Line2D([], [], color=colors[0] if single else "black", label=events, **EVENT))
    if len(runs) > 1:  # colours name the runs; line styles the split
        handles += [Line2D([], [], color="black", label="train", **TRAIN),
                    Line2D([], [], color="black", label=eval_label, **EVAL)]
    legend(ax, len(runs), handles)
    return save(fig, out / "loss.png")


def mark_events(ax, runs, colors) -> str | None:
    """A dotted vertical line at each event's step (a loss spike rolled back: the curve after it
    is the replay); returns the legend's label for them, None without events."""
    kinds = set()
    for run, color in zip(runs, colors):
        for e in run.events:
            ax.axvline(e["step"], color=color, **EVENT)
            kinds.add(e["event"].replace("_", " "))
    return f"event ({', '.join(sorted(kinds))}; kiln-report lists them)" if kinds else None


# file, key, y label, when to use a log scale (from each series' values), y from zero, scale
CURVES = [
    ("lr.png", "lr", "learning rate", lambda ys: spread([max(y) for y in ys]) >= 10, False, 1),
    ("throughput.png", "tokens_per_s", "throughput (tokens/s, all ranks)", lambda ys: False, True, 1),
    ("mfu.png", "mfu", "MFU (% of peak FLOP/s)", lambda ys: False, True, 100),
    ("grad_norm.png", "grad_norm", "gradient norm (global L2, before clipping)",
     lambda ys: spread([v for y in ys for v in y]) >= 10, False, 1),
]


def curve_plot(runs, labels, colors, title, out: Path, file, key, ylabel, log, zero, scale) -> Path | None:
    fig, ax = new_axes(f"{title}: {ylabel.split(' (')[0]}", ylabel, len(runs))
    ys = []
    for run, label, color in zip(runs, labels, colors):
        x, y = run.series(key)
        if x:
            ax.plot(x, [v * scale for v in y], color=color, label=label, lw=1.2)
            ys.append(y)
    if not ys:
        return None
    if log(ys):  # e.g. a sweep over learning rates an order of magnitude apart
        log_y(ax, [v * scale for y in ys for v in y])
    elif zero:  # from 0, so a small dip does not look like a collapse; headroom above the curve
        ax.set_ylim(0, 1.08 * scale * max(max(y) for y in ys))
    if key == "tokens_per_s":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    legend(ax, len(runs))
    return save(fig, out / file)


def other_keys(runs: list[Run]) -> list[str]:
    """Numeric keys without a picture of their own (data/*, time/*, memory ...), first seen first."""
    keys: dict[str, None] = {}
    for run in runs:
        for r in run.records:
            keys.update({k: None for k, v in r.items() if k not in KNOWN and is_number(v)})
    return list(keys)


def other_plot(runs, labels, colors, title, out: Path, keys: list[str]) -> Path:
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3 * rows + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for run, label, color in zip(runs, labels, colors):
            x, y = run.series(key)
            ax.plot(x, y, color=color, label=label, lw=1.2)
        ax.set(title=key, xlabel=STEP)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: other logged metrics (as logged, units per key)")
    if len(runs) > 1:
        fig.legend(handles=axes[0].get_legend_handles_labels()[0], fontsize="small", loc="outside lower center",
                   ncols=min(4, len(runs)))
    return save(fig, out / "other.png")


def draw(runs: list[Run], labels: list[str], title: str, out: Path) -> tuple[list[Path], list[str]]:
    """Every picture the runs' metrics allow, into `out`; (their paths, other keys not drawn)."""
    out.mkdir(parents=True, exist_ok=True)
    palette = "tab10" if len(runs) <= 10 else "tab20"
    colors = [colormaps[palette](i % 20) for i in range(len(runs))]
    paths = [loss_plot(runs, labels, colors, title, out)]
    paths += [curve_plot(runs, labels, colors, title, out, *spec) for spec in CURVES]
    keys = other_keys(runs)
    if keys:
        paths.append(other_plot(runs, labels, colors, title, out, keys[:MAX_OTHER]))
    return [p for p in paths if p], keys[MAX_OTHER:]
