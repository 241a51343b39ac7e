"""The report's training-steps section: sparsity against step per series, and row and column
update ratios of one layer over the saved steps.

A series is a run labelled with ``series`` and ``step`` at several steps; each step is one run
of the ``run_sparsity`` view. Scans without series get a note saying how to label them.
"""

from __future__ import annotations

import warnings

import matplotlib.pyplot as plt
import numpy as np

from rlvr_ray.report.data import (
    DETAIL_KEY,
    Scope,
    detail_key,
    detail_label,
    detail_tensors,
    experts_shown,
    rows,
)
from rlvr_ray.report.figures import Image, Section, subplots
from rlvr_ray.report.figures import png as to_png

MAX_SERIES = 3  # series whose row/column profiles are drawn


def steps(con, sc: Scope) -> Section:
    """Sparsity per step of every series, and the row/column profiles of the longest ones."""
    sec = Section(
        "steps",
        "Sparsity and update ratios over training steps",
        "How the share of unchanged weights, and the per-row and per-column shares of "
        "changed weights, evolve across the saved steps of one training run: stripes "
        "that appear early and persist show the update pattern is fixed from the "
        "start.",
    )
    series = rows(
        con,
        """SELECT group_name, series, count(DISTINCT step) AS n FROM run_sparsity
                          WHERE series IS NOT NULL AND step IS NOT NULL
                          AND list_contains(?, group_name) GROUP BY ALL HAVING n >= 2
                          ORDER BY n DESC, group_name, series""",
        [sc.groups],
    )
    if not series:
        sec.notes.append(
            "no training series with several steps in this scan (label runs with "
            "series and step to follow a run over training)"
        )
        return sec
    sec.images.append(_sparsity_by_step(con, series))
    for s in series[:MAX_SERIES]:
        g = s["group_name"]
        layer = sc.layers.get(g)
        if layer is None:
            layer = rows(con, "SELECT max(layer) // 2 AS l FROM tensors WHERE group_name = ?", [g])[
                0
            ]["l"]
        img = _series_profiles(con, g, s["series"], layer)
        if img is None:
            sec.notes.append(
                f"{g} / {s['series']}: no row/column profiles stored for layer {layer}"
            )
        else:
            sec.images.append(img)
    if len(series) > MAX_SERIES:
        sec.notes.append(
            f"{len(series) - MAX_SERIES} more series not drawn (pass --group to choose)"
        )
    return sec


def _sparsity_by_step(con, series: list[dict]) -> Image:
    """One line per (group, series): run_sparsity's sparsity at each of its steps."""
    pts = rows(
        con,
        """SELECT group_name, series, step, sparsity FROM run_sparsity
                       WHERE list_contains(?, group_name || '/' || series) AND step IS NOT NULL
                       ORDER BY group_name, series, step""",
        [[f"{s['group_name']}/{s['series']}" for s in series]],
    )
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in pts:
        lines.setdefault(f"{r['group_name']} / {r['series']}", []).append(
            (r["step"], r["sparsity"])
        )
    fig, axs = subplots(1, 1, 7.5, 3.2)
    ax = axs[0, 0]
    for name, xy in lines.items():
        ax.plot([x for x, _ in xy], [100 * y for _, y in xy], marker="o", ms=4, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("sparsity: weights unchanged (%)")
    ax.legend(
        loc="center left", bbox_to_anchor=(1.01, 0.5), title="group / series", title_fontsize=8
    )
    reading = "; ".join(
        f"{name}: {100 * xy[0][1]:.1f}% unchanged at step {xy[0][0]}, "
        f"{100 * xy[-1][1]:.1f}% at step {xy[-1][0]}"
        for name, xy in lines.items()
    )
    cap = (
        f"Sparsity of each saved step (every scanned tensor of the checkpoint). {reading}: "
        "updates accumulate, so later steps leave fewer weights untouched."
    )
    if any(xy[-1][1] > xy[0][1] for xy in lines.values()):
        cap = f"Sparsity of each saved step (every scanned tensor of the checkpoint). {reading}."
    return Image("sparsity-by-step", to_png(fig), cap, {"points": lines})


def _series_profiles(con, g: str, series: str, layer: int) -> Image | None:
    detail = detail_tensors(con, g, layer)
    keys = [detail_key(t, e) for _, t, e in detail]
    found = rows(
        con,
        f"""SELECT t.step, {DETAIL_KEY} AS key, p.axis, p.idx, p.ratio
                          FROM profiles p JOIN (SELECT DISTINCT group_name, run, step FROM tensors
                          WHERE group_name = ? AND series = ? AND step IS NOT NULL) t
                          USING (group_name, run) WHERE list_contains(?, {DETAIL_KEY})""",
        [g, series, keys],
    )
    if not found:
        return None
    all_steps = sorted({r["step"] for r in found})
    si = {s: i for i, s in enumerate(all_steps)}
    grids: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for r in found:
        grids.setdefault((r["key"], r["axis"]), {})[(si[r["step"]], r["idx"])] = r["ratio"]
    vmax = max((r["ratio"] or 0) for r in found) or 1e-12
    # each tensor's profile is resampled to one width and the tensors are set side by side:
    # one image per axis draws in a fraction of the time of a grid of axes
    width, gap = 128, 8
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    fig, axs = subplots(2, 1, 1.45 * len(keys) + 2, 0.5 * len(all_steps) + 2.6)
    for ax, axis in zip(axs[:, 0], ("row", "col"), strict=True):
        strip = np.full((len(all_steps), (width + gap) * len(keys) - gap), np.nan)
        for j, k in enumerate(keys):
            cells = grids.get((k, axis), {})
            m = np.full((len(all_steps), 1 + max((c[1] for c in cells), default=0)), np.nan)
            for (a, b), v in cells.items():
                m[a, b] = v
            strip[:, j * (width + gap) : j * (width + gap) + width] = _resample(m, width)
        im = ax.imshow(strip, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=vmax)
        ax.grid(False)
        ax.set_xticks(
            [(j + 0.5) * (width + gap) - gap / 2 for j in range(len(keys))],
            [detail_label(role, e) for role, _, e in detail],
        )
        ax.set_yticks(range(len(all_steps)), [str(s) for s in all_steps])
        ax.set_ylabel("step")
        name = "row" if axis == "row" else "column"
        ax.set_title(f"{name} update ratios ({name} index left to right in each projection)")
        ax.tick_params(length=0)
    fig.subplots_adjust(hspace=0.55)
    fig.colorbar(im, ax=axs.ravel().tolist(), shrink=0.9, label="share of weights changed")
    fig.suptitle(f"{g} / {series}, layer {layer}", fontsize=10, y=1.02)
    first, last = all_steps[0], all_steps[-1]
    mean_at = {
        s: np.mean([r["ratio"] for r in found if r["step"] == s and r["axis"] == "row"])
        for s in (first, last)
    }
    which = experts_shown(detail)
    cap = (
        f"{g} / series {series}, layer {layer}: one colour scale for the whole figure, 0 to "
        f"{vmax:.3g}; the mean row update ratio goes from {mean_at[first]:.3f} at step {first} "
        f"to {mean_at[last]:.3f} at step {last}.{which}"
    )
    return Image(f"steps-{g}-{series}", to_png(fig), cap, {"vmax": vmax})


def _resample(m: np.ndarray, width: int) -> np.ndarray:
    """[steps, n] -> [steps, width]: block means when n > width, else nearest neighbour."""
    n = m.shape[1]
    if n <= width:
        return m[:, np.arange(width) * n // width]
    edges = np.arange(width + 1) * n // width
    with warnings.catch_warnings():  # a block with no stored ratio stays blank (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.stack(
            [np.nanmean(m[:, a:b], axis=1) for a, b in zip(edges[:-1], edges[1:], strict=True)],
            axis=1,
        )
