"""Figures of the report: radar, bar, box, projection and scalability plots (matplotlib, Agg).

Every function takes tidy frames (already read from the catalog by :mod:`scdm.classify.report`)
and a :class:`Palette`, draws one figure and saves it as PNG and SVG. Figures are built with
:class:`matplotlib.figure.Figure` directly, never through ``pyplot``: nothing changes the user's
backend or global state, and figures are freed as soon as they are saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from scdm.store.warning_scopes import ignoring

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.projections.polar import PolarAxes
    from matplotlib.typing import RcKeyType

logger = logging.getLogger(__name__)

__all__ = ["CATEGORY_LABELS", "METRIC_LABELS", "Palette", "Series", "wrap_label"]

METRIC_LABELS = {"f1": "F1", "auroc": "AUROC", "ap": "AP", "accuracy": "Accuracy", "precision": "Precision",
                 "recall": "Recall", "f1_macro": "macro F1", "f1_weighted": "weighted F1", "mcc": "MCC",
                 "ami": "AMI", "ari": "ARI"}
"""Display names of the metrics."""
CATEGORY_LABELS = {"all": "all cells", "tissue": "Tissue", "cancer_type": "Cancer type", "drug_type": "Drug type",
                   "regimen": "Regimen"}
"""Display names of the category types."""
RESPONSE_COLORS = {"sensitive": "#d6604d", "resistant": "#4393c3", "unlabelled": "#bdbdbd"}
"""Response colours of the projections (one fixed pair in every figure)."""

_SAVE_RC: dict[RcKeyType, Any] = {"svg.hashsalt": "scdm-report", "svg.fonttype": "path", "font.size": 9, "axes.titlesize": 10,
            "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8}
_HATCHES = ["", "//", "..", "xx", "\\\\", "++"]
_LINESTYLES: list[Any] = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
"""One line style per hatch (matplotlib dash tuples after the four named styles)."""


def wrap_label(text: str, width: int = 16, max_lines: int = 2) -> str:
    """Wrap a category name onto at most ``max_lines`` lines of ``width`` characters (``…`` if cut)."""
    lines = textwrap.wrap(str(text), width=width, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(width - 1, 1)].rstrip() + "…"
    return "\n".join(lines)


def fit_width(text: str, width_in: float, fontsize: float) -> str:
    """``text`` wrapped at spaces (a word too long for a line broken inside) onto lines at most ``width_in``
    inches wide at ``fontsize`` points, measured with the font a title is drawn in.

    A figure is saved at its own size (no tight bounding box), so a title wider than the figure is cut off
    at its edges: the title of a head with several parameters (``mlp {"dropout": 0.1, ...}``) lost both ends.
    """
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    measure, font = TextToPath(), FontProperties(size=fontsize)
    limit = max(width_in, 0.5) * 72.0  # points

    def fits(line: str) -> bool:
        return bool(measure.get_text_width_height_descent(line, font, ismath=False)[0] <= limit)

    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if fits(candidate):
                line = candidate
                continue
            if line:
                lines.append(line)
            line = word
            while not fits(line) and len(line) > 1:  # one word wider than the figure: break it
                cut = next(n for n in range(len(line) - 1, 0, -1) if fits(line[:n]) or n == 1)
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return "\n".join(lines)


def _suptitle(fig: Figure, title: str, fontsize: float = 11) -> None:
    """The figure's title, wrapped to stay inside it (the layout makes room for every line)."""
    fig.suptitle(fit_width(title, fig.get_figwidth() - 0.3, fontsize), fontsize=fontsize)


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def figure_stem(text: str) -> str:
    """The file stem of the figure named ``text``: unique to ``text`` and the same in every report.

    :func:`safe_name` alone maps several texts to one name (``A/B`` and ``A-B``; ``Mlp`` and ``mlp`` on a
    case-insensitive file system), and the later figure overwrote the earlier. The stem is lower case;
    where that or :func:`safe_name` changes the text, the start of a hash of the whole text follows.
    """
    stem = safe_name(text).lower()
    if stem != text:
        stem = f"{stem}-{hashlib.sha256(str(text).encode()).hexdigest()[:8]}"
    return stem


# --------------------------------------------------------------------------------------------
# colours
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line/bar series of the figures: the results of one embedding space under one label set
    and one split protocol (or, in the embedding figures, the space itself)."""

    key: tuple[str, ...]
    """Identity of the series: (model, variant, space_id) for a space, plus label set and split
    protocol for a series of results."""
    label: str
    """Legend label, unique in the report."""
    color: str
    """The colour of its group (model, datasets): one colour per model and dataset collection."""
    hatch: str = ""
    """Bar hatch: distinguishes series of one colour group (LoRA variants, other spaces, splits)."""
    linestyle: Any = "-"
    """Line style of the radar lines (same role as ``hatch``)."""
    group: tuple[str, str] = ("", "")
    """(model, datasets): the colour group."""


@dataclass
class Palette:
    """One colour per (model, datasets) group, and one :class:`Series` style per series.

    Two spaces of one model fitted on different datasets (``pca`` on A375, ``pca`` on another
    collection) are two groups and get two colours. Colours are assigned to the sorted groups, so a
    group has the same colour in every figure of the report (and in every report of the same
    store). Series of one group (a LoRA variant, another space on the same datasets, another split
    or label set) share its colour and differ by hatch and line style.
    """

    groups: Sequence[tuple[str, str]]
    series: dict[tuple[str, ...], Series] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from matplotlib.colors import to_hex

        names = sorted(set(self.groups))
        base = _listed_colors("tab10") if len(names) <= 10 else _listed_colors("tab20")
        extra = [*_listed_colors("tab20b"), *_listed_colors("tab20c")]
        colors = [*base, *extra]
        self.colors = {name: to_hex(colors[i % len(colors)]) for i, name in enumerate(names)}

    def color(self, group: tuple[str, str]) -> str:
        """Colour of ``group`` (grey for a group unknown to the palette)."""
        return self.colors.get(group, "#7f7f7f")

    def add(self, key: tuple[str, ...], label: str, *, group: tuple[str, str], tuned: bool = False) -> Series:
        """Register a series; later series of the same group get the next hatch / line style.

        ``tuned`` (a LoRA variant) is always hatched/dashed, even without a frozen sibling.
        """
        if key in self.series:
            return self.series[key]
        rank = sum(1 for s in self.series.values() if s.group == group)
        if tuned and rank == 0:
            rank = 1
        series = Series(key, label, self.color(group), _HATCHES[rank % len(_HATCHES)],
                        _LINESTYLES[rank % len(_LINESTYLES)], group)
        self.series[key] = series
        return series


def category_colors(values: Sequence[str]) -> dict[str, str]:
    """Stable colours for category values (sorted; tab20 then tab20b/tab20c)."""
    from matplotlib.colors import to_hex

    names = sorted({str(v) for v in values})
    first = _listed_colors("tab10") if len(names) <= 10 else _listed_colors("tab20")
    colors = [*first, *_listed_colors("tab20b"), *_listed_colors("tab20c")]
    return {name: to_hex(colors[i % len(colors)]) for i, name in enumerate(names)}


def _listed_colors(name: str) -> Sequence[Any]:
    """The colours of the qualitative colormap ``name`` (a :class:`~matplotlib.colors.ListedColormap`)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    # colormaps[...] is typed as the base Colormap; the tab* maps are ListedColormaps (colors: a sequence).
    return cast(Sequence[Any], cast(ListedColormap, colormaps[name]).colors)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure that is not registered with pyplot."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def save(fig: Figure, out_dir: Path, stem: str, *, formats: Sequence[str], dpi: int) -> list[Path]:
    """Save ``fig`` as ``out_dir/stem.<fmt>`` for every format; returns the paths written."""
    import matplotlib

    paths = []
    with matplotlib.rc_context({"svg.hashsalt": _SAVE_RC["svg.hashsalt"]}):
        for fmt in formats:
            path = out_dir / f"{stem}.{fmt}"
            metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {}
            fig.savefig(path, format=fmt, dpi=dpi, metadata=metadata)
            paths.append(path)
            if fig.get_layout_engine() is not None and len(formats) > 1:
                # the layout is done: the other formats reuse it instead of solving it again
                with contextlib.suppress(RuntimeError):  # an engine that cannot be switched off keeps working
                    fig.set_layout_engine("none")
    return paths


def style() -> Any:
    """Context manager with the report's font sizes."""
    import matplotlib

    return matplotlib.rc_context(_SAVE_RC)


# --------------------------------------------------------------------------------------------
# radar (scDrugMap Fig. 2, 3, 6)
# --------------------------------------------------------------------------------------------
def radar_figure(board: pd.DataFrame, series: list[Series], *, metrics: Sequence[str], category_types: Sequence[str],
                 title: str, over: str = "folds") -> tuple[Figure, list[str]]:
    """Radar panels (rows: metrics, columns: category types) of mean metric per category.

    ``board`` has columns ``series`` (the series label), ``category_type``, ``category``, ``metric``,
    ``mean`` and ``sd``: means over ``over`` (``held-out studies`` in cross-data), as each panel says.
    A category type with fewer than 3 categories cannot make a radar and is drawn as a bar chart
    instead; their names are returned (for the caption).
    """
    n_cats = [board[board["category_type"] == ct]["category"].nunique() for ct in category_types]
    # Radars with many (long) axis labels get wider columns.
    ratios = [1.0 if n <= 12 else 1.35 if n <= 20 else 1.7 for n in n_cats]
    side = 3.6
    fig = new_figure(side * sum(ratios) + 0.4, side * len(metrics) + 0.9)
    grid = fig.add_gridspec(len(metrics), len(category_types), width_ratios=ratios)
    fallbacks: list[str] = []
    for i, metric in enumerate(metrics):
        for j, ct in enumerate(category_types):
            frame = board[(board["category_type"] == ct) & (board["metric"] == metric)]
            cats = sorted(board.loc[board["category_type"] == ct, "category"].unique(), key=str)
            panel = f"mean {METRIC_LABELS.get(metric, metric)} over {over} by {CATEGORY_LABELS.get(ct, ct).lower()}"
            if len(cats) >= 3:
                ax = fig.add_subplot(grid[i, j], projection="polar")
                _radar_panel(cast("PolarAxes", ax), frame, series, cats)
            else:
                ax = fig.add_subplot(grid[i, j])
                _bar_panel(ax, frame, series, cats, metric, over)
                if i == 0:
                    fallbacks.append(f"{CATEGORY_LABELS.get(ct, ct).lower()} ({len(cats)} "
                                     f"categor{'y' if len(cats) == 1 else 'ies'})")
                panel += f" (bars: {len(cats)} categor{'y' if len(cats) == 1 else 'ies'})"
            ax.set_title(panel, pad=16 if len(cats) >= 3 else 6, fontsize=10)
    # radar lines differ by line style, bars by hatch: a figure with both shows both in its legend
    kind = "line" if not fallbacks else "bar" if len(fallbacks) == len(category_types) else "both"
    _series_legend(fig, series, kind=kind)
    _suptitle(fig, title)
    return fig, fallbacks


def _radar_panel(ax: PolarAxes, frame: pd.DataFrame, series: list[Series], cats: list[str]) -> None:
    n = len(cats)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    closed = np.append(angles, angles[0])
    for s in series:
        values = frame[frame["series"] == s.label].set_index("category")["mean"].reindex(cats).to_numpy(float)
        if np.isnan(values).all():
            continue
        ring = np.append(values, values[0])
        ax.plot(closed, ring, color=s.color, linestyle=s.linestyle, linewidth=1.4, marker="o", markersize=2.5)
        if not np.isnan(values).any():  # a fill through a missing category would draw it as 0
            ax.fill(closed, ring, color=s.color, alpha=0.05)
    if (frame["mean"] < 0).any():  # MCC, ARI, AMI: a radius from 0 would fold a negative mean onto the centre
        ax.set_ylim(-1, 1)
        ax.set_yticks([-0.5, 0.0, 0.5, 1.0])
        ax.set_yticklabels(["-0.5", "0", "0.5", "1"], fontsize=6, color="#555555")
    else:
        ax.set_ylim(0, 1)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0])
        ax.set_yticklabels(["0.25", "0.5", "0.75", "1"], fontsize=6, color="#555555")
    ax.set_rlabel_position(180 / n)  # between the first two axes, away from the category labels
    ax.set_xticks(angles)
    if n <= 12:
        size, labels = 7.0, [wrap_label(c, 16) for c in cats]
    elif n <= 20:
        size, labels = 6.0, [wrap_label(c, 20) for c in cats]
    else:
        size, labels = 5.5, [wrap_label(c, 26, 1) for c in cats]
    ax.set_xticklabels(labels, fontsize=size)
    # Labels on the left half align right and vice versa, so long names grow away from the circle.
    for label, angle in zip(ax.get_xticklabels(), angles):
        cos = np.cos(angle)
        label.set_horizontalalignment("center" if abs(cos) < 0.2 else "left" if cos > 0 else "right")
    ax.tick_params(axis="x", pad=1)
    ax.grid(linewidth=0.5, alpha=0.6)


def _bar_panel(ax: Axes, frame: pd.DataFrame, series: list[Series], cats: list[str], metric: str, over: str) -> None:
    present = [s for s in series if (frame["series"] == s.label).any()]
    width = min(0.8 / max(len(present), 1), 0.3)
    x = np.arange(len(cats))
    for k, s in enumerate(present):
        sub = frame[frame["series"] == s.label].set_index("category").reindex(cats)
        ax.bar(x + width * (k - (len(present) - 1) / 2), sub["mean"].to_numpy(float), width,
               yerr=sub["sd"].to_numpy(float), color=s.color, hatch=s.hatch,
               edgecolor="white" if not s.hatch else "#333333", linewidth=0.4, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels([wrap_label(c, 14) for c in cats], fontsize=8)
    ax.set_xlim(-0.6, len(cats) - 0.4)
    ax.set_ylim(_bottom(frame), _top(frame))
    ax.set_ylabel(_mean_sd_label(metric, over))
    ax.grid(axis="y", linewidth=0.5, alpha=0.5)
    ax.set_axisbelow(True)


def _mean_sd_label(metric: str, over: str) -> str:
    """The axis of a bar of means with sd error bars: what is averaged, over what."""
    return f"{METRIC_LABELS.get(metric, metric)}: mean ± sd\nover {over}"


def over_what(scenario: str) -> str:
    """What a mean of a scenario's result is over: its folds, or in cross-data its held-out studies."""
    return "held-out studies" if scenario == "cross" else "folds"


def _bottom(frame: pd.DataFrame) -> float:
    """Lower y limit: 0, or room for a mean below 0 (MCC, ARI and AMI go negative; a bar under the axis is not drawn)."""
    reach = (frame["mean"] - frame["sd"].fillna(0)).min() if not frame.empty else 0.0
    if not np.isfinite(reach) or reach >= 0:
        return 0.0
    return float(max(reach - 0.03, -1.05))


def _top(frame: pd.DataFrame) -> float:
    """Upper y limit of a [0, 1] metric axis that leaves room for the error bars."""
    reach = (frame["mean"] + frame["sd"].fillna(0)).max() if not frame.empty else 1.0
    return float(np.clip(np.nan_to_num(reach, nan=1.0) + 0.03, 1.05, 1.3))


def _short_number(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _log_axis(ax: Axes, values: np.ndarray, unit: str) -> None:
    """Log x axis spanning whole decades around ``values``, labelled bars, no crowded minor labels."""
    from matplotlib.ticker import LogLocator, NullFormatter

    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size == 0:
        return
    lo = 10 ** np.floor(np.log10(finite.min()))
    hi = 10 ** np.ceil(np.log10(finite.max()))
    if hi <= lo * 10:
        hi = lo * 100
    ax.set_xscale("log")
    ax.set_xlim(lo, hi * 1.5)
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_minor_formatter(NullFormatter())
    for patch in ax.patches:
        bar = cast("Rectangle", patch)  # the axes holds only the bars of barh
        width = bar.get_width()
        if np.isfinite(width) and width > 0:
            ax.annotate(_short_number(width, unit), (width, bar.get_y() + bar.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)


def _series_legend(fig: Figure, series: list[Series], *, kind: str) -> None:
    """A legend of ``series``: ``line`` (radar lines), ``bar`` (hatched bars) or ``both`` (a bar and a line per entry)."""
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lines = [Line2D([], [], color=s.color, linestyle=s.linestyle, marker="o", markersize=4) for s in series]
    bars = [Patch(facecolor=s.color, hatch=s.hatch, edgecolor="#333333" if s.hatch else s.color) for s in series]
    handles: list[Any] = lines if kind == "line" else bars if kind == "bar" else list(zip(bars, lines))
    if handles:
        # as many columns as fit the figure's width (about 0.065 in per character at 8 pt, plus the handle)
        width = fig.get_figwidth()
        per_entry = 0.065 * max(len(s.label) for s in series) + 0.6
        ncol = max(1, min(len(handles), 4, int(width // per_entry)))
        fig.legend(handles=handles, labels=[s.label for s in series], loc="outside lower center", ncol=ncol,
                   frameon=False, handler_map={tuple: HandlerTuple(ndivide=None, pad=0.3)})


# --------------------------------------------------------------------------------------------
# bars with error bars (overall performance)
# --------------------------------------------------------------------------------------------
def bars_figure(board: pd.DataFrame, series: list[Series], *, scenarios: Sequence[str], metrics: Sequence[str],
                heads: Sequence[str], title: str) -> Figure:
    """Mean +- sd over folds of category ``all``: rows scenarios, columns metrics, groups heads.

    ``board`` columns: ``series``, ``scenario``, ``head`` (display label), ``metric``, ``mean``, ``sd``.
    """
    n_rows, n_cols = len(scenarios), len(metrics)
    width_in = max(3.2, 0.22 * len(series) * len(heads) + 1.2)
    fig = new_figure(min(width_in * n_cols, 16), 2.8 * n_rows + 0.9)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, scenario in enumerate(scenarios):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            frame = board[(board["scenario"] == scenario) & (board["metric"] == metric)]
            present = [s for s in series if (frame["series"] == s.label).any()]
            bar_w = min(0.8 / max(len(present), 1), 0.35)
            x = np.arange(len(heads))
            for k, s in enumerate(present):
                sub = frame[frame["series"] == s.label].set_index("head").reindex(heads)
                ax.bar(x + bar_w * (k - (len(present) - 1) / 2), sub["mean"].to_numpy(float), bar_w, yerr=sub["sd"].to_numpy(float),
                       color=s.color, hatch=s.hatch, edgecolor="#333333" if s.hatch else "white", linewidth=0.4,
                       capsize=2, error_kw={"elinewidth": 0.8})
            ax.set_xticks(x)
            ax.set_xticklabels([wrap_label(h, 14) for h in heads])
            ax.set_xlim(-0.6, len(heads) - 0.4)
            ax.set_ylim(_bottom(frame), _top(frame))
            ax.set_ylabel(_mean_sd_label(metric, over_what(scenario)))
            ax.set_title(f"{scenario}: {METRIC_LABELS.get(metric, metric)}")
            ax.grid(axis="y", linewidth=0.5, alpha=0.5)
            ax.set_axisbelow(True)
    _series_legend(fig, series, kind="bar")
    _suptitle(fig, title)
    return fig


# --------------------------------------------------------------------------------------------
# per-fold distribution across cancer types
# --------------------------------------------------------------------------------------------
def folds_figure(folds: pd.DataFrame, series: list[Series], *, heads: Sequence[str], metric: str, title: str,
                 seed: int = 0, unit: str = "fold") -> Figure:
    """Box plots of per-fold ``metric`` across categories (x), one box per series, rows = heads.

    ``folds`` columns: ``series``, ``head`` (display label), ``category``, ``fold``, ``value``. ``unit``
    names what one value is scored on in the axis label (cross-data: a ``held-out study``).
    """
    cats = sorted(folds["category"].unique(), key=str)
    present = [s for s in series if (folds["series"] == s.label).any()]
    width_in = min(max(6.0, 0.28 * len(cats) * max(len(present), 1) + 1.5), 18.0)
    fig = new_figure(width_in, 2.9 * len(heads) + 1.2)
    axes = fig.subplots(len(heads), 1, squeeze=False)
    rng = np.random.default_rng(seed)
    box_w = min(0.8 / max(len(present), 1), 0.35)
    for i, head in enumerate(heads):
        ax = axes[i][0]
        sub_head = folds[folds["head"] == head]
        for k, s in enumerate(present):
            sub = sub_head[sub_head["series"] == s.label]
            pos, data = [], []
            for c, cat in enumerate(cats):
                values = sub.loc[sub["category"] == cat, "value"].dropna().to_numpy(float)
                if values.size:
                    pos.append(c + box_w * (k - (len(present) - 1) / 2))
                    data.append(values)
            if not data:
                continue
            parts = ax.boxplot(data, positions=pos, widths=box_w * 0.85, patch_artist=True, showfliers=False,
                               medianprops={"color": "#222222", "linewidth": 1.0}, whiskerprops={"linewidth": 0.8},
                               capprops={"linewidth": 0.8})
            for patch in parts["boxes"]:
                patch.set_facecolor(s.color)
                patch.set_alpha(0.55)
                patch.set_hatch(s.hatch)
                patch.set_edgecolor("#333333")
                patch.set_linewidth(0.6)
            for p, values in zip(pos, data):
                jitter = rng.uniform(-box_w * 0.25, box_w * 0.25, values.size)
                ax.scatter(p + jitter, values, s=7, color=s.color, edgecolor="#222222", linewidth=0.3, zorder=3)
        ax.set_xticks(np.arange(len(cats)))
        rotate = len(cats) > 4 or max((len(str(c)) for c in cats), default=0) > 14
        ax.set_xticklabels([wrap_label(c, 18) for c in cats], rotation=35 if rotate else 0,
                           ha="right" if rotate else "center", rotation_mode="anchor")
        ax.set_xlim(-0.6, len(cats) - 0.4)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} per {unit}")
        # the axes is the figure's width less its y axis labels (about 1 in)
        ax.set_title(fit_width(f"head: {head}", fig.get_figwidth() - 1.0, 10), fontsize=10)
        ax.grid(axis="y", linewidth=0.5, alpha=0.5)
        ax.set_axisbelow(True)
    _series_legend(fig, present, kind="bar")
    _suptitle(fig, title)
    return fig


# --------------------------------------------------------------------------------------------
# 2-D projections of embeddings (scDrugMap Fig. 4)
# --------------------------------------------------------------------------------------------
def projection_figure(coords: np.ndarray, cells: pd.DataFrame, *, panels: Sequence[tuple[str, str]],
                      colors: dict[str, dict[str, str]], title: str, axis_name: str) -> Figure:
    """Scatter of ``coords`` (n, 2), one panel per (column of ``cells``, panel title).

    ``colors[column]`` maps each value of the column to its colour; missing values are drawn
    grey as "unlabelled"/"unknown". Points are rasterised so that the SVG stays small.
    """
    n = len(coords)
    size = float(np.clip(2400.0 / max(n, 1), 1.0, 12.0))
    max_legend = max(len(colors[c]) for c, _ in panels)
    fig = new_figure(4.2 * len(panels), 4.3 + 0.17 * min(max_legend, 30) / 2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rng = np.random.default_rng(0)
    order = rng.permutation(n)  # draw in random order so no group hides another
    for ax, (column, panel_title) in zip(axes, panels):
        values = cells[column].astype(object).where(cells[column].notna(), None).to_numpy()
        labels = np.array(["unknown" if v is None else str(v) for v in values], dtype=object)
        mapping = {**colors[column], "unknown": RESPONSE_COLORS["unlabelled"]}
        point_colors = np.array([mapping.get(v, "#7f7f7f") for v in labels], dtype=object)
        ax.scatter(coords[order, 0], coords[order, 1], c=list(point_colors[order]), s=size, linewidths=0,
                   rasterized=True)
        ax.set_title(panel_title)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{axis_name} 1")
        ax.set_ylabel(f"{axis_name} 2")
        _category_legend(ax, labels, mapping)
    _suptitle(fig, title)
    return fig


def _category_legend(ax: Axes, labels: np.ndarray, mapping: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    counts = pd.Series(labels).value_counts()
    names = sorted(counts.index, key=lambda v: (v == "unknown", str(v)))
    handles = [Line2D([], [], linestyle="", marker="o", markersize=5, color=mapping.get(v, "#7f7f7f"),
                      label=f"{wrap_label(v, 24, 1)} ({counts[v]})") for v in names]
    ncol = 1 if len(handles) <= 4 else 2
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=ncol, frameon=False,
              fontsize=7 if len(handles) > 8 else 8, handletextpad=0.2, columnspacing=0.8)


# --------------------------------------------------------------------------------------------
# 2-D coordinates for the projection figures (also run by the report's worker process)
# --------------------------------------------------------------------------------------------
UMAP_MAX_DIM = 50
"""Embeddings wider than this are reduced to this many principal components before UMAP (as scanpy does)."""


def project(X: np.ndarray, *, method: str, seed: int) -> tuple[np.ndarray, str, str]:
    """2-D coordinates of the rows of ``X``, the axis name and a caption fragment saying how."""
    from sklearn.decomposition import PCA

    n, dim = X.shape
    if n < 3 or dim < 2:
        coords = np.zeros((n, 2), np.float32)
        coords[:, : min(dim, 2)] = X[:, : min(dim, 2)]
        return coords, "dim", "the raw embedding coordinates (too few cells or dimensions to project)"
    if method == "umap" and n >= 30:
        import umap

        reduced, pre = X, ""
        if dim > UMAP_MAX_DIM:
            reduced = PCA(UMAP_MAX_DIM, svd_solver="randomized", random_state=seed).fit_transform(X)
            pre = f"; the {dim} dims were first reduced to {UMAP_MAX_DIM} principal components"
        n_neighbors = min(15, n - 1)
        # The neighbour graph is exact (scikit-learn): on the few thousand cells drawn here it takes well
        # under a second, where umap-learn's own approximate search (pynndescent) spends ~45 s compiling.
        from sklearn.neighbors import NearestNeighbors

        knn_dists, knn_indices = NearestNeighbors(n_neighbors=n_neighbors).fit(reduced).kneighbors(reduced)
        with ignoring():  # umap warns that random_state disables parallelism
            model = umap.UMAP(n_neighbors=n_neighbors, min_dist=0.3, random_state=seed, n_epochs=200,
                              precomputed_knn=(knn_indices, knn_dists))
            coords = model.fit_transform(reduced)
        return (np.asarray(coords, np.float32), "UMAP",
                f"UMAP (umap-learn, n_neighbors={n_neighbors}, min_dist=0.3, seed {seed}{pre})")
    pca = PCA(2, random_state=seed).fit(X)
    ratio = pca.explained_variance_ratio_
    why = " (UMAP needs at least 30 cells)" if method == "umap" else ""
    return (pca.transform(X).astype(np.float32), "PC",
            f"PCA, first two components ({ratio[0]:.0%} and {ratio[1]:.0%} of the variance){why}")


def project_folder(folder: str, method: str, seed: int, indices: list[int]) -> None:
    """Project ``<i>.npy`` of ``folder`` for every index, in order: the report's worker process.

    Writes ``<i>.coords.npy`` and ``<i>.json`` (axis name, how); see ``scdm.classify.report._Projections``.
    """
    for i in indices:
        coords, axis_name, how = project(np.load(Path(folder) / f"{i}.npy", allow_pickle=False), method=method, seed=seed)
        np.save(Path(folder) / f"{i}.coords.npy", coords, allow_pickle=False)
        (Path(folder) / f"{i}.json").write_text(json.dumps([axis_name, how]))


# --------------------------------------------------------------------------------------------
# computational scalability (scDrugMap Fig. 7)
# --------------------------------------------------------------------------------------------
def scalability_figure(embed: pd.DataFrame, fit: pd.DataFrame, embed_series: list[Series], fit_series: list[Series], *,
                       title: str) -> Figure:
    """Embedding throughput (cells/s) per embedding space, and mean head fit time per task per head.

    ``embed`` columns: ``series`` (labels of ``embed_series``), ``cells_per_s``; ``fit`` columns:
    ``series`` (labels of ``fit_series``), ``head``, ``fit_s``, one row per series and head.
    """
    has_embed = not embed.dropna(subset=["cells_per_s"]).empty
    has_fit = not fit.dropna(subset=["fit_s"]).empty
    n_panels = int(has_embed) + int(has_fit)
    embed_rows = [s for s in embed_series if (embed["series"] == s.label).any()]
    fit_rows = [s for s in fit_series if (fit["series"] == s.label).any()]
    fig = new_figure(4.6 * max(n_panels, 1), 0.32 * max(len(embed_rows), len(fit_rows)) + 1.8)
    axes = list(fig.subplots(1, max(n_panels, 1), squeeze=False)[0])
    if has_embed:
        ax = axes.pop(0)
        rows = embed_rows
        values = [float(embed.loc[embed["series"] == s.label, "cells_per_s"].iloc[0]) for s in rows]
        y = np.arange(len(rows))
        ax.barh(y, values, color=[s.color for s in rows], hatch=None, edgecolor="#333333", linewidth=0.4)
        for patch, s in zip(ax.patches, rows):
            patch.set_hatch(s.hatch)
        ax.set_yticks(y)
        ax.set_yticklabels([wrap_label(s.label, 28, 2) for s in rows])
        ax.invert_yaxis()
        _log_axis(ax, np.asarray(values, float), "")
        ax.set_xlabel("embedding throughput (cells/s, log scale)")
        ax.set_title("embed")
        ax.grid(axis="x", linewidth=0.5, alpha=0.5, which="both")
        ax.set_axisbelow(True)
    if has_fit:
        ax = axes.pop(0)
        heads = sorted(fit["head"].unique())
        rows = fit_rows
        y = np.arange(len(heads))
        bar_h = 0.8 / max(len(rows), 1)
        for k, s in enumerate(rows):
            sub = fit[fit["series"] == s.label].set_index("head").reindex(heads)
            ax.barh(y - 0.4 + bar_h * (k + 0.5), sub["fit_s"].to_numpy(float), bar_h, color=s.color, hatch=s.hatch,
                    edgecolor="#333333", linewidth=0.4)
        ax.set_yticks(y)
        ax.set_yticklabels(heads)
        ax.invert_yaxis()
        _log_axis(ax, fit["fit_s"].to_numpy(float), "s")
        ax.set_xlabel("mean head fit time per task (s, log scale)")
        ax.set_title("classify")
        ax.grid(axis="x", linewidth=0.5, alpha=0.5, which="both")
        ax.set_axisbelow(True)
        _series_legend(fig, rows, kind="bar")
    _suptitle(fig, title)
    return fig
