"""The report's sections on where the weights moved: sparsity, maps, steps, consistency, families.

Each section function takes an atlas connection and the report's scope and returns a
``Section``: a title, a one-sentence explanation, tables, PNG images (matplotlib, Agg backend),
and notes saying why a figure could not be drawn (one run, no steps, ...) instead of failing.
The geometry sections live in ``rlvr_ray.report.geometry``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # no display, ever: reports are made on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rlvr_ray.report.data import Scope, detail_tensors, role_key, rows  # noqa: E402

RL_COLOR, SFT_COLOR, BASE_COLOR = "#3b6ea8", "#d1495b", "#9aa0a6"
STYLE = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
         "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 10, "figure.dpi": 110,
         "legend.frameon": False, "legend.fontsize": 8}  # fmt: skip
MAX_MAP_RUNS = 6  # mask maps per group; the consensus map summarises every run
MAX_SERIES = 3

# Reference figures from the paper (DESIGN.md): bf16 sparsity, base -> tuned.
PAPER_SPARSITY = [
    ("Qwen2.5-Math-1.5B", "DeepSeek-R1-Distill-Qwen-1.5B", "SFT", "2.8%"),
    ("DS-R1-Distill-Qwen-1.5B", "DeepScaleR-1.5B-Preview", "GRPO", "53.8%"),
    ("DS-R1-Distill-Qwen-1.5B", "DeepCoder-1.5B-Preview", "GRPO", "45.5%"),
    ("DS-R1-Distill-Qwen-1.5B", "Archer-Code-1.5B", "GRPO", "52.5%"),
    ("DS-R1-Distill-Qwen-1.5B", "ProRL", "GRPO", "38.4%"),
    ("DS-R1-Distill-Qwen-1.5B", "ProRL-v2", "Reinforce++", "36.3%"),
    ("Qwen3-8B-Base", "Klear-Reasoner-8B-SFT", "SFT", "0.6%"),
    ("Klear-Reasoner-8B-SFT", "Klear-Reasoner-8B", "GRPO", "69.5%"),
    ("Qwen3-14B-Base", "UniReason (SFT)", "SFT", "18.8%"),
    ("Qwen3-14B-Base", "UniReason (RL)", "RL", "68.3%"),
    ("Qwen3-4B", "Polaris-4B-Preview", "DAPO", "79.3%"),
    ("Qwen3-30B-A3B", "UloRL", "GRPO", "91.7%"),
]


@dataclass
class Table:
    id: str
    columns: list[str]
    rows: list[list[str]]  # already formatted for display
    numeric: list[bool] = field(default_factory=list)  # right-aligned columns
    caption: str = ""


@dataclass
class Image:
    name: str  # file name stem, unique within the report
    png: bytes
    caption: str = ""


@dataclass
class Section:
    key: str
    title: str
    caption: str  # one sentence: what the reader sees and why it matters
    tables: list[Table] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why a figure could not be drawn


def png(fig) -> bytes:
    """Render and close ``fig`` (closing matters: a report makes dozens of figures)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def subplots(nrows: int, ncols: int, w: float, h: float, **kw):
    with plt.rc_context(STYLE):
        return plt.subplots(nrows, ncols, figsize=(w, h), squeeze=False, **kw)


def pct(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}%"


def num(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def algo_colors(algos: list[str]) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    rl = [a for a in algos if a != "sft"]
    out = {a: matplotlib.colors.to_hex(palette[i % 10]) for i, a in enumerate(rl)}
    return out | {"sft": SFT_COLOR}


def _algo(a: str | None) -> str:
    return (a or "unlabelled").lower()


# -- sparsity -----------------------------------------------------------------------------------
def sparsity(con, sc: Scope) -> Section:
    """Table 1 of the paper for this scan, a bar chart by algorithm, and the paper's figures."""
    sec = Section("sparsity", "Sparsity per run",
                  "Share of bf16 weights left bitwise unchanged by each run (higher = sparser "
                  "update); RL runs typically leave far more weights untouched than SFT.")  # fmt: skip
    runs = rows(con, """SELECT group_name, family, run, algorithm, step, n_tensors, numel,
                        n_changed, sparsity, ulp1_share FROM run_sparsity
                        WHERE list_contains(?, group_name)""", [sc.groups])  # fmt: skip
    runs.sort(key=lambda r: (_algo(r["algorithm"]) == "sft", _algo(r["algorithm"]),
                             r["group_name"], r["step"] or -1, r["run"]))  # fmt: skip
    sec.tables.append(Table("sparsity-table",
        ["Group", "Family", "Run", "Algorithm", "Step", "Sparsity", "Update density",
         "1-ULP share", "Weights compared"],
        [[r["group_name"], r["family"] or "", r["run"], r["algorithm"] or "",
          "" if r["step"] is None else str(r["step"]), pct(r["sparsity"]),
          num(1 - r["sparsity"]), pct(r["ulp1_share"], 1), f"{r['numel']:,}"] for r in runs],
        [False] * 4 + [True] * 5,
        "Sparsity = 1 - changed / compared over all scanned tensors of the run; 1-ULP share = "
        "changed weights that moved by exactly one bf16 step."))  # fmt: skip
    if runs:
        sec.images.append(Image("sparsity", _sparsity_bars(runs, len(sc.groups) > 1)))
    sec.tables.append(Table("paper-sparsity", ["Base", "Tuned", "Algorithm", "Sparsity"],
        [list(r) for r in PAPER_SPARSITY], [False, False, False, True],
        "For reference: bf16 sparsity of published checkpoints reported by the paper "
        "(arXiv 2511.08567)."))  # fmt: skip
    return sec


def _sparsity_bars(runs: list[dict], show_group: bool) -> bytes:
    colors = algo_colors(sorted({_algo(r["algorithm"]) for r in runs}))
    labels = [f"{r['group_name']} / {r['run']}" if show_group else r["run"] for r in runs]
    y = np.arange(len(runs))
    fig, axs = subplots(1, 1, 7.5, 0.8 + 0.32 * len(runs))
    ax = axs[0, 0]
    vals = [100 * r["sparsity"] for r in runs]
    seen = set()
    for yi, v, r in zip(y, vals, runs, strict=True):
        a = _algo(r["algorithm"])
        ax.barh(yi, v, color=colors[a], label=None if a in seen else a, height=0.7)
        ax.text(v + 0.8, yi, f"{v:.1f}%", va="center", fontsize=8)
        seen.add(a)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.set_xlabel("sparsity: weights bitwise unchanged (%)")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="algorithm", title_fontsize=8)
    return png(fig)


# -- maps ---------------------------------------------------------------------------------------
def maps(con, sc: Scope) -> Section:
    """Pooled update-mask maps per run and the consensus map of one layer per group."""
    sec = Section("maps", "Update-mask and consensus maps",
                  "Pooled share of changed weights in one layer's attention and MLP down "
                  "projections: bright rows and columns are the stripes that RL updates "
                  "concentrate in, and the consensus row shows they recur across runs.")  # fmt: skip
    for g, layer in sc.layers.items():
        img = _group_maps(con, g, layer)
        if img is None:
            sec.notes.append(f"{g}: no pooled maps stored for layer {layer}")
        else:
            sec.images.append(img)
    if sc.omitted:
        sec.notes.append("not drawn for " + ", ".join(sc.omitted) + " (pass --group to see one)")
    return sec


def _group_maps(con, g: str, layer: int) -> Image | None:
    tensors = detail_tensors(con, g, layer)
    found = rows(con, """SELECT m.run, m.tensor, m.kind, m.map_rows, m.map_cols, m.values,
                         t.algorithm, t.step FROM maps m LEFT JOIN (SELECT DISTINCT group_name,
                         run, algorithm, step FROM tensors) t USING (group_name, run)
                         WHERE m.group_name = ? AND list_contains(?, m.tensor)""",
                 [g, [t for _, t in tensors]])  # fmt: skip
    if not found:
        return None
    # the runs of the consensus (final RL checkpoints) first, then SFT, then earlier steps
    members = {r for (r,) in con.execute(
        "SELECT DISTINCT unnest(runs) FROM consistency WHERE group_name = ?", [g]).fetchall()}  # fmt: skip

    def rank(r: dict) -> int:
        return 0 if r["run"] in members else 1 if _algo(r["algorithm"]) == "sft" else 2

    runs = sorted({(rank(r), -(r["step"] or 0), r["run"]) for r in found if r["kind"] == "mask"})
    shown = [r for *_, r in runs][:MAX_MAP_RUNS]
    lines = shown + (["*"] if any(r["kind"] == "consensus" for r in found) else [])
    means: dict[tuple[int, int], float] = {}
    by = {(r["run"], r["tensor"]): r for r in found}
    # one mosaic image in one axes: a grid of dozens of axes takes seconds to lay out
    cell, gap = 64, 10
    canvas = np.ones(((cell + gap) * len(lines), (cell + gap) * len(tensors), 4))
    for i, run in enumerate(lines):
        cmap = plt.get_cmap("magma" if run == "*" else "viridis")
        for j, (_, t) in enumerate(tensors):
            r = by.get((run, t))
            if r is not None:
                m = np.asarray(r["values"], dtype=np.float64).reshape(r["map_rows"], r["map_cols"])
                y0, x0 = i * (cell + gap), j * (cell + gap)
                canvas[y0 : y0 + cell, x0 : x0 + cell] = cmap(_fit(m / max(m.max(), 1e-12), cell))
                means[(i, j)] = m.mean()
    fig, axs = subplots(1, 1, 1.45 * len(tensors) + 1.2, 1.45 * len(lines) + 0.5)
    ax = axs[0, 0]
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for j, (role, _) in enumerate(tensors):
        ax.text((j + 0.5) * (cell + gap) - gap / 2, -4, role, ha="center", va="bottom", fontsize=10)
    for i, run in enumerate(lines):
        y = (i + 0.5) * (cell + gap) - gap / 2
        ax.text(-6, y, "consensus" if run == "*" else run, ha="right", va="center", fontsize=8)
        for j in range(len(tensors)):
            x = (j + 0.5) * (cell + gap) - gap / 2
            label = f"mean {means[(i, j)]:.3f}" if (i, j) in means else "not stored"
            ax.text(x, (i + 1) * (cell + gap) - gap + 1, label, ha="center", va="top", fontsize=6.5)
    more = f" ({len(runs) - len(shown)} more runs not shown)" if len(runs) > len(shown) else ""
    fig.suptitle(f"{g}, layer {layer}{more}", fontsize=10)
    cap = (
        f"{g}, layer {layer}: rows are runs (last: consensus = share of runs that changed a "
        "weight); each panel is scaled to its own maximum, its mean is printed below it."
    )
    return Image(f"maps-{g}", png(fig), cap)


def _fit(m: np.ndarray, n: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D map to n x n (maps of one layer differ in shape)."""
    ri = np.arange(n) * m.shape[0] // n
    ci = np.arange(n) * m.shape[1] // n
    return m[np.ix_(ri, ci)]


# -- steps --------------------------------------------------------------------------------------
def steps(con, sc: Scope) -> Section:
    """Row and column update ratios of one layer over the steps of each series."""
    sec = Section("steps", "Row and column update ratios over training steps",
                  "How the per-row and per-column shares of changed weights evolve across the "
                  "saved steps of one training run: stripes that appear early and persist show "
                  "the update pattern is fixed from the start.")  # fmt: skip
    series = rows(con, """SELECT group_name, series, count(DISTINCT step) AS n FROM tensors
                          WHERE series IS NOT NULL AND step IS NOT NULL
                          AND list_contains(?, group_name) GROUP BY ALL HAVING n >= 2
                          ORDER BY n DESC, group_name, series""", [sc.groups])  # fmt: skip
    if not series:
        sec.notes.append("no training series with several steps in this scan (label runs with "
                         "series and step to follow a run over training)")  # fmt: skip
        return sec
    for s in series[:MAX_SERIES]:
        g = s["group_name"]
        layer = sc.layers.get(g)
        if layer is None:
            layer = rows(con, "SELECT max(layer) // 2 AS l FROM tensors WHERE group_name = ?", [g])[0]["l"]  # fmt: skip
        img = _series_profiles(con, g, s["series"], layer)
        if img is None:
            sec.notes.append(f"{g} / {s['series']}: no row/column profiles stored for layer {layer}")  # fmt: skip
        else:
            sec.images.append(img)
    if len(series) > MAX_SERIES:
        sec.notes.append(f"{len(series) - MAX_SERIES} more series not drawn (pass --group to choose)")  # fmt: skip
    return sec


def _series_profiles(con, g: str, series: str, layer: int) -> Image | None:
    tensors = detail_tensors(con, g, layer)
    found = rows(con, """SELECT t.step, p.tensor, p.axis, p.idx, p.ratio FROM profiles p
                         JOIN (SELECT DISTINCT group_name, run, step FROM tensors
                               WHERE group_name = ? AND series = ? AND step IS NOT NULL) t
                         USING (group_name, run) WHERE list_contains(?, p.tensor)""",
                 [g, series, [t for _, t in tensors]])  # fmt: skip
    if not found:
        return None
    all_steps = sorted({r["step"] for r in found})
    si = {s: i for i, s in enumerate(all_steps)}
    grids: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for r in found:
        grids.setdefault((r["tensor"], r["axis"]), {})[(si[r["step"]], r["idx"])] = r["ratio"]
    vmax = max((r["ratio"] or 0) for r in found) or 1e-12
    # each tensor's profile is resampled to one width and the tensors are set side by side:
    # one image per axis draws in a fraction of the time of a grid of axes
    width, gap = 128, 8
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    fig, axs = subplots(2, 1, 1.45 * len(tensors) + 2, 0.5 * len(all_steps) + 2.6)
    for ax, axis in zip(axs[:, 0], ("row", "col"), strict=True):
        strip = np.full((len(all_steps), (width + gap) * len(tensors) - gap), np.nan)
        for j, (_, t) in enumerate(tensors):
            cells = grids.get((t, axis), {})
            m = np.full((len(all_steps), 1 + max((k[1] for k in cells), default=0)), np.nan)
            for (a, b), v in cells.items():
                m[a, b] = v
            strip[:, j * (width + gap) : j * (width + gap) + width] = _resample(m, width)
        im = ax.imshow(strip, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=vmax)
        ax.grid(False)
        ax.set_xticks([(j + 0.5) * (width + gap) - gap / 2 for j in range(len(tensors))],
                      [role for role, _ in tensors])  # fmt: skip
        ax.set_yticks(range(len(all_steps)), [str(s) for s in all_steps])
        ax.set_ylabel("step")
        name = "row" if axis == "row" else "column"
        ax.set_title(f"{name} update ratios ({name} index left to right in each projection)")
        ax.tick_params(length=0)
    fig.subplots_adjust(hspace=0.55)
    fig.colorbar(im, ax=axs.ravel().tolist(), shrink=0.9, label="share of weights changed")
    fig.suptitle(f"{g} / {series}, layer {layer}", fontsize=10, y=1.02)
    cap = f"{g} / series {series}, layer {layer}: one colour scale for the whole figure."
    return Image(f"steps-{g}-{series}", png(fig), cap)


def _resample(m: np.ndarray, width: int) -> np.ndarray:
    """[steps, n] -> [steps, width]: block means when n > width, else nearest neighbour."""
    n = m.shape[1]
    if n <= width:
        return m[:, np.arange(width) * n // width]
    edges = np.arange(width + 1) * n // width
    with warnings.catch_warnings():  # a block with no stored ratio stays blank (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.stack([np.nanmean(m[:, a:b], axis=1) for a, b in zip(edges[:-1], edges[1:], strict=True)], axis=1)  # fmt: skip


# -- consistency --------------------------------------------------------------------------------
def consistency(con, sc: Scope) -> Section:
    """Mean pairwise Jaccard of the runs' masks vs its independent-Bernoulli baseline, by role."""
    sec = Section("consistency", "Cross-run Jaccard vs random baseline",
                  "Mean pairwise Jaccard overlap of the runs' update masks against what "
                  "independent masks of the same densities would give: observed well above "
                  "baseline means different runs update the same weights.")  # fmt: skip
    found = rows(con, """SELECT group_name, family, role, mean_jaccard, jaccard_baseline, lift, n
                         FROM consistency_by_role WHERE list_contains(?, group_name)""",
                 [sc.groups])  # fmt: skip
    if not found:
        sec.notes.append("no cross-run consistency: it needs at least two runs in a group "
                         "(with consistency on)")  # fmt: skip
        return sec
    found.sort(key=lambda r: (r["group_name"], role_key(r["role"])))
    sec.tables.append(Table("consistency-table",
        ["Group", "Family", "Role", "Jaccard", "Baseline", "Lift", "Tensors"],
        [[r["group_name"], r["family"] or "", r["role"], num(r["mean_jaccard"], 3),
          num(r["jaccard_baseline"], 3), num(r["lift"], 2), str(r["n"])] for r in found],
        [False] * 3 + [True] * 4,
        "Averages over the group's tensors of each role; lift = observed / baseline. The "
        "paper reports, for five RL runs of DS-R1-Distill-Qwen-1.5B at layer 13, e.g. "
        "q .580 vs .430 and down .585 vs .453."))  # fmt: skip
    groups = sorted({r["group_name"] for r in found})
    n_runs = {r["group_name"]: r["n"] for r in rows(con, "SELECT group_name, max(n_runs) AS n "
              "FROM consistency GROUP BY ALL")}  # fmt: skip
    fig, axs = subplots(len(groups), 1, 7.5, 2.3 * len(groups))
    for ax, g in zip(axs[:, 0], groups, strict=True):
        rs = [r for r in found if r["group_name"] == g]
        x = np.arange(len(rs))
        ax.bar(x - 0.2, [r["mean_jaccard"] for r in rs], 0.4, color=RL_COLOR, label="observed")
        ax.bar(x + 0.2, [r["jaccard_baseline"] for r in rs], 0.4, color=BASE_COLOR,
               label="random baseline")  # fmt: skip
        ax.set_xticks(x, [r["role"] for r in rs])
        ax.set_ylabel("mean Jaccard")
        ax.set_title(f"{g} ({n_runs[g]} runs)")
        ax.grid(axis="x", visible=False)
        ax.set_ylim(0, 1.15 * max(max(r["mean_jaccard"], r["jaccard_baseline"] or 0) for r in rs))
    axs[0, 0].legend(loc="lower left", bbox_to_anchor=(0, 1.12), ncols=2)
    fig.tight_layout()
    sec.images.append(Image("consistency", png(fig)))
    return sec


# -- cross-family -------------------------------------------------------------------------------
def cross_family(con, sc: Scope) -> Section:
    """Update density by relative depth and role, one line per family (RL runs only)."""
    sec = Section("cross-family", "Update density by relative depth across families",
                  "Share of weights changed by RL runs at each relative depth (0 = first layer, "
                  "1 = last), per role and family: similar curves mean the families concentrate "
                  "their updates alike.")  # fmt: skip
    # one line per family, or per family and base where a family has several bases
    found = rows(
        con,
        """WITH c AS (SELECT * FROM cross_family WHERE tower = 'text' AND NOT pooled
             AND family IN (SELECT DISTINCT family FROM tensors WHERE list_contains(?, group_name))),
           n AS (SELECT family, count(DISTINCT base_fingerprint) AS bases FROM c GROUP BY family)
           SELECT role, depth_bin, update_density,
                  CASE WHEN bases > 1 THEN family || ' (' || regexp_extract(base_ref, '[^/]+$')
                       || ')' ELSE family END AS family
           FROM c JOIN n USING (family)""",
        [sc.groups],
    )
    # the view spans groups; restrict to the families of the groups in scope
    roles = sorted({r["role"] for r in found if r["role"] not in ("norm", "bias", "other")},
                   key=role_key)  # fmt: skip
    if not roles:
        sec.notes.append("no RL runs with layered tensors in this scan (SFT runs are excluded)")
        return sec
    fams = sorted({r["family"] for r in found})
    ncols = min(4, len(roles))
    nrows = -(-len(roles) // ncols)
    fig, axs = subplots(nrows, ncols, 2.3 * ncols + 0.5, 2.0 * nrows + 0.6, sharey=True)
    for k, ax in enumerate(axs.ravel()):
        if k >= len(roles):
            ax.set_visible(False)
            continue
        for f in fams:
            pts = sorted((r["depth_bin"], r["update_density"]) for r in found
                         if r["role"] == roles[k] and r["family"] == f)  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f)
        ax.set_title(roles[k])
        ax.set_xlim(-0.05, 1.05)
        if k % ncols == 0:
            ax.set_ylabel("update density")
        if k >= len(roles) - ncols:
            ax.set_xlabel("relative depth")
    fig.subplots_adjust(hspace=0.45, wspace=0.12)  # tight_layout costs seconds here
    handles, labels = axs[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, title="family", loc="center left", bbox_to_anchor=(0.91, 0.5))
    sec.images.append(Image("cross-family", png(fig)))
    if len(fams) == 1:
        sec.notes.append(f"only one family ({fams[0]}) in this scan: nothing to compare it with")
    return sec
