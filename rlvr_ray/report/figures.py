"""The report's sections on where the weights moved: sparsity, maps, steps, consistency, families.

Each section function takes an atlas connection and the report's scope and returns a
``Section``: a title, a one-sentence explanation, tables, PNG images (matplotlib, Agg backend),
and notes saying why a figure could not be drawn (one run, no steps, ...) instead of failing.
The geometry sections live in ``rlvr_ray.report.geometry``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # no display, ever: reports are made on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rlvr_ray.report.data import (  # noqa: E402
    DETAIL_KEY,
    Scope,
    detail_key,
    detail_label,
    detail_tensors,
    experts_shown,
    role_key,
    rows,
    run_class,
)

RL_COLOR, SFT_COLOR, BASE_COLOR = "#3b6ea8", "#d1495b", "#9aa0a6"
STYLE = {
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.titlesize": 10,
    "figure.dpi": 110,
    "legend.frameon": False,
    "legend.fontsize": 8,
}
MAX_MAP_RUNS = 6  # mask maps per group; the consensus map summarises every run

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
    meta: dict = field(default_factory=dict)  # the numbers drawn (colour scale, points), for checks


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
    sec = Section(
        "sparsity",
        "Sparsity per run",
        "Share of weights left bitwise unchanged by each run, as stored (bf16, or an FP8 "
        "format; higher = sparser update); RL runs typically leave far more weights untouched "
        "than SFT.",
    )
    runs = rows(
        con,
        """SELECT group_name, family, run, algorithm, step, n_tensors, numel,
                        n_changed, sparsity, ulp1_share FROM run_sparsity
                        WHERE list_contains(?, group_name)""",
        [sc.groups],
    )
    runs.sort(
        key=lambda r: (
            _algo(r["algorithm"]) == "sft",
            _algo(r["algorithm"]),
            r["group_name"],
            r["step"] or -1,
            r["run"],
        )
    )
    sec.tables.append(
        Table(
            "sparsity-table",
            [
                "Group",
                "Family",
                "Run",
                "Algorithm",
                "Step",
                "Sparsity",
                "Update density",
                "1-ULP share",
                "Weights compared",
            ],
            [
                [
                    r["group_name"],
                    r["family"] or "",
                    r["run"],
                    r["algorithm"] or "",
                    "" if r["step"] is None else str(r["step"]),
                    pct(r["sparsity"]),
                    num(1 - r["sparsity"]),
                    pct(r["ulp1_share"], 1),
                    f"{r['numel']:,}",
                ]
                for r in runs
            ],
            [False] * 4 + [True] * 5,
            "Sparsity = 1 - changed / compared over all scanned tensors of the run; 1-ULP share = "
            "changed weights that moved by exactly one step of their format (bf16, FP8).",
        )
    )
    algos = rows(
        con,
        """SELECT s.algorithm, count(*) AS n_runs, avg(s.sparsity) AS sparsity,
                         min(s.sparsity) AS lo, max(s.sparsity) AS hi,
                         avg(s.ulp1_share) AS ulp1_share, avg(g.overlap_princ) AS overlap_princ,
                         avg(g.overlap_low) AS overlap_low, median(g.median_nss) AS nss
                         FROM run_sparsity s SEMI JOIN final_runs USING (group_name, run)
                         LEFT JOIN run_geometry g USING (group_name, run)
                         WHERE list_contains(?, s.group_name) GROUP BY s.algorithm""",
        [sc.groups],
    )
    algos.sort(key=lambda r: (_algo(r["algorithm"]) == "sft", _algo(r["algorithm"])))
    if runs:
        sec.images.append(
            Image("sparsity", _sparsity_bars(runs, len(sc.groups) > 1), _sparsity_reading(algos))
        )
    sec.tables.append(
        Table(
            "algorithm-table",
            [
                "Algorithm",
                "Runs",
                "Mean sparsity",
                "Range",
                "1-ULP share",
                "Overlap principal",
                "Overlap low-magnitude",
                "Median NSS",
            ],
            [
                [
                    r["algorithm"] or "",
                    str(r["n_runs"]),
                    pct(r["sparsity"], 1),
                    f"{pct(r['lo'], 1)} - {pct(r['hi'], 1)}",
                    pct(r["ulp1_share"], 1),
                    num(r["overlap_princ"], 3),
                    num(r["overlap_low"], 3),
                    "" if r["nss"] is None else f"{r['nss']:.3g}",
                ]
                for r in algos
            ],
            [False] + [True] * 7,
            "Per algorithm, over final checkpoints only (the latest step of each series; the "
            "algorithm_summary view): intermediate steps would weigh in every average.",
        )
    )
    sec.tables.append(
        Table(
            "paper-sparsity",
            ["Base", "Tuned", "Algorithm", "Sparsity"],
            [list(r) for r in PAPER_SPARSITY],
            [False, False, False, True],
            "For reference: bf16 sparsity of published checkpoints reported by the paper "
            "(arXiv 2511.08567).",
        )
    )
    return sec


def _sparsity_reading(algos: list[dict]) -> str:
    """'grpo runs leave 68.0-72.0% of weights unchanged (2 final checkpoints); sft 6.0% (1).'"""
    parts = []
    for r in algos:
        lo, hi = 100 * r["lo"], 100 * r["hi"]
        span = f"{lo:.1f}%" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f}%"
        parts.append(f"{_algo(r['algorithm'])} {span} ({r['n_runs']})")
    return (
        "Final checkpoints leave this share of weights bitwise unchanged, by algorithm "
        "(number of runs): " + "; ".join(parts) + "."
    )


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
    sec = Section(
        "maps",
        "Update-mask and consensus maps",
        "Pooled share of changed weights in one layer's attention and MLP down "
        "projections: bright rows and columns are the stripes that RL updates "
        "concentrate in, and the consensus row shows they recur across runs.",
    )
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
    detail = detail_tensors(con, g, layer)
    keys = [detail_key(t, e) for _, t, e in detail]
    found = rows(
        con,
        f"""SELECT m.run, {DETAIL_KEY} AS key, m.kind, m.map_rows, m.map_cols,
                          m.values, t.algorithm, t.step FROM maps m LEFT JOIN (SELECT DISTINCT
                          group_name, run, algorithm, step FROM tensors) t USING (group_name, run)
                          WHERE m.group_name = ? AND list_contains(?, {DETAIL_KEY})""",
        [g, keys],
    )
    if not found:
        return None
    shape = {
        detail_key(r["tensor"], r["expert"]): (r["rows"], r["cols"])
        for r in rows(
            con,
            "SELECT DISTINCT tensor, expert, rows, cols FROM tensors WHERE group_name = ? "
            "AND layer = ?",
            [g, layer],
        )
    }
    # the runs of the consensus (final RL checkpoints) first, then SFT, then earlier steps
    members = {
        r
        for (r,) in con.execute(
            "SELECT DISTINCT unnest(runs) FROM consistency WHERE group_name = ?", [g]
        ).fetchall()
    }

    def rank(r: dict) -> int:
        return 0 if r["run"] in members else 1 if _algo(r["algorithm"]) == "sft" else 2

    runs = sorted({(rank(r), -(r["step"] or 0), r["run"]) for r in found if r["kind"] == "mask"})
    shown = [r for *_, r in runs][:MAX_MAP_RUNS]
    lines = shown + (["*"] if any(r["kind"] == "consensus" for r in found) else [])
    by = {(r["run"], r["key"]): r for r in found}
    grids = {
        k: np.asarray(r["values"], dtype=np.float64).reshape(r["map_rows"], r["map_cols"])
        for k, r in by.items()
        if k[0] in lines
    }
    # one colour scale for every panel (RL, SFT and the consensus alike: all are shares of
    # weights changed), so panels compare; never 0 so an all-unchanged layer still draws
    vmax = max((float(m.max()) for m in grids.values()), default=0.0) or 1e-12
    cmap, norm = plt.get_cmap("viridis"), matplotlib.colors.Normalize(0, vmax)
    # true aspect: the longer side of each matrix spans `cell` pixels
    cell, gap, pad = 96, 12, 14
    sizes = []
    for k in keys:
        nr, nc = shape.get(k, (1, 1))
        sizes.append(
            (max(2, round(cell * nr / max(nr, nc))), max(2, round(cell * nc / max(nr, nc))))
        )
    heights = [max(h for h, _ in sizes)] * len(lines)
    x0 = np.concatenate([[0], np.cumsum([w + gap for _, w in sizes])])
    y0 = np.concatenate([[0], np.cumsum([h + pad for h in heights])])
    canvas = np.ones((int(y0[-1]), int(x0[-1]), 4))
    means: dict[tuple[int, int], float] = {}
    for i, run in enumerate(lines):
        for j, k in enumerate(keys):
            m = grids.get((run, k))
            if m is not None:
                h, w = sizes[j]
                canvas[y0[i] : y0[i] + h, x0[j] : x0[j] + w] = cmap(norm(_fit(m, h, w)))
                means[(i, j)] = float(m.mean())
    fig, axs = subplots(1, 1, x0[-1] / 60 + 2.4, y0[-1] / 60 + 0.6)
    ax = axs[0, 0]
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for j, (role, _, expert) in enumerate(detail):
        ax.text(
            x0[j] + sizes[j][1] / 2,
            -4,
            detail_label(role, expert),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    for i, run in enumerate(lines):
        ax.text(
            -6,
            y0[i] + heights[i] / 2,
            "consensus" if run == "*" else run,
            ha="right",
            va="center",
            fontsize=8,
        )
        for j in range(len(keys)):
            label = f"mean {means[(i, j)]:.3f}" if (i, j) in means else "not stored"
            ax.text(
                x0[j] + sizes[j][1] / 2,
                y0[i] + sizes[j][0] + 1,
                label,
                ha="center",
                va="top",
                fontsize=6.5,
            )
    fig.colorbar(
        matplotlib.cm.ScalarMappable(norm, cmap),
        ax=ax,
        shrink=0.8,
        pad=0.02,
        label="share of weights changed (pooled)",
    )
    more = f" ({len(runs) - len(shown)} more runs not shown)" if len(runs) > len(shown) else ""
    ax.set_title(f"{g}, layer {layer}{more}", fontsize=10, pad=24)
    which = experts_shown(detail)
    cap = (
        f"{g}, layer {layer}: rows are runs (last: consensus = mean over the consistency runs); "
        f"one colour scale for every panel, 0 to {vmax:.3g} (the largest pooled share), "
        f"matrices drawn at their true aspect. {_map_reading(lines, means, by, keys)}{which}"
    )
    return Image(
        f"maps-{g}", png(fig), cap, {"vmax": vmax, "sizes": dict(zip(keys, sizes, strict=True))}
    )


def _map_reading(lines: list[str], means: dict, by: dict, keys: list[str]) -> str:
    """'RL runs change 12.0% of this layer's weights on average, SFT 90.1%' from the panels."""
    per: dict[str, list[float]] = {}
    for (i, _), v in means.items():
        run = lines[i]
        if run != "*":
            algo = next(r["algorithm"] for (rn, _), r in by.items() if rn == run)
            per.setdefault(run_class(algo), []).append(v)
    parts = [f"{c} runs {100 * np.mean(v):.1f}%" for c, v in sorted(per.items())]
    return ("Mean pooled share changed: " + ", ".join(parts) + ".") if parts else ""


def _fit(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D map to h x w (the matrix's drawn size)."""
    ri = np.arange(h) * m.shape[0] // h
    ci = np.arange(w) * m.shape[1] // w
    return m[np.ix_(ri, ci)]


# -- consistency --------------------------------------------------------------------------------
def consistency(con, sc: Scope) -> Section:
    """Mean pairwise Jaccard of the runs' masks vs its independent-Bernoulli baseline, by role."""
    sec = Section(
        "consistency",
        "Cross-run Jaccard vs random baseline",
        "Mean pairwise Jaccard overlap of the runs' update masks against what "
        "independent masks of the same densities would give: observed well above "
        "baseline means different runs update the same weights.",
    )
    found = rows(
        con,
        """SELECT group_name, family, role, mean_jaccard, jaccard_baseline, lift, n
                         FROM consistency_by_role WHERE list_contains(?, group_name)""",
        [sc.groups],
    )
    if not found:
        sec.notes.append(
            "no cross-run consistency: it needs at least two runs in a group (with consistency on)"
        )
        return sec
    found.sort(key=lambda r: (r["group_name"], role_key(r["role"])))
    sec.tables.append(
        Table(
            "consistency-table",
            ["Group", "Family", "Role", "Jaccard", "Baseline", "Lift", "Tensors"],
            [
                [
                    r["group_name"],
                    r["family"] or "",
                    r["role"],
                    num(r["mean_jaccard"], 3),
                    num(r["jaccard_baseline"], 3),
                    num(r["lift"], 2),
                    str(r["n"]),
                ]
                for r in found
            ],
            [False] * 3 + [True] * 4,
            "Averages over the group's tensors of each role; lift = observed / baseline. The "
            "paper reports, for five RL runs of DS-R1-Distill-Qwen-1.5B at layer 13, e.g. "
            "q .580 vs .430 and down .585 vs .453.",
        )
    )
    groups = sorted({r["group_name"] for r in found})
    n_runs = {
        r["group_name"]: r["n"]
        for r in rows(con, "SELECT group_name, max(n_runs) AS n FROM consistency GROUP BY ALL")
    }
    fig, axs = subplots(len(groups), 1, 7.5, 2.3 * len(groups), sharey=True)
    top = 1.15 * max(max(r["mean_jaccard"], r["jaccard_baseline"] or 0) for r in found)
    for ax, g in zip(axs[:, 0], groups, strict=True):
        rs = [r for r in found if r["group_name"] == g]
        x = np.arange(len(rs))
        ax.bar(x - 0.2, [r["mean_jaccard"] for r in rs], 0.4, color=RL_COLOR, label="observed")
        ax.bar(
            x + 0.2,
            [r["jaccard_baseline"] for r in rs],
            0.4,
            color=BASE_COLOR,
            label="random baseline",
        )
        ax.set_xticks(x, [r["role"] for r in rs])
        ax.set_ylabel("mean Jaccard")
        ax.set_title(f"{g} ({n_runs[g]} runs)")
        ax.grid(axis="x", visible=False)
        ax.set_ylim(0, top)
    fig.tight_layout()
    handles, labels = axs[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5))
    above = [r for r in found if r["lift"] is not None and r["lift"] > 1]
    lifts = [r["lift"] for r in found if r["lift"] is not None]
    cap = (
        f"One y range for every panel (0 to {top:.3g}). Observed Jaccard is above the "
        f"random baseline for {len(above)} of {len(found)} (group, role) cells"
    )
    cap += f"; lift {min(lifts):.2f}x to {max(lifts):.2f}x." if lifts else "."
    sec.images.append(Image("consistency", png(fig), cap, {"ylim": top}))
    return sec


# -- cross-family -------------------------------------------------------------------------------
def cross_family(con, sc: Scope) -> Section:
    """Update density by relative depth and role, one line per family (RL runs only)."""
    sec = Section(
        "cross-family",
        "Update density by relative depth across families",
        "Share of weights changed by RL runs at each relative depth (0 = first layer, "
        "1 = last), per role and family: similar curves mean the families concentrate "
        "their updates alike.",
    )
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
    roles = sorted(
        {r["role"] for r in found if r["role"] not in ("norm", "bias", "scale", "other")},
        key=role_key,
    )
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
            pts = sorted(
                (r["depth_bin"], r["update_density"])
                for r in found
                if r["role"] == roles[k] and r["family"] == f
            )
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
    rl = [r for r in found if r["role"] in roles and r["update_density"] is not None]
    lo = min(rl, key=lambda r: r["update_density"])
    hi = max(rl, key=lambda r: r["update_density"])
    cap = (
        f"RL update density ranges from {100 * lo['update_density']:.1f}% ({lo['family']}, "
        f"{lo['role']}, depth {lo['depth_bin']:.2f}) to {100 * hi['update_density']:.1f}% "
        f"({hi['family']}, {hi['role']}, depth {hi['depth_bin']:.2f})."
    )
    sec.images.append(Image("cross-family", png(fig), cap))
    if len(fams) == 1:
        sec.notes.append(f"only one family ({fams[0]}) in this scan: nothing to compare it with")
    return sec
