"""The report's geometry sections: principal-weight overlaps, spectral shift and principal angles.

These read the SVD-based columns of ``tensors`` and the ``spectra`` table. A scan made with
``--no-geometry`` (or before geometry existed) has them all NULL; the sections then say so
instead of drawing empty axes. Overlaps and principal angles are drawn for matrices whose
geometry_status is 'ok' only; when some are not (k not well below the rank, no singular-value
gap at k), a warning above the figures says how many and why.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from rlvr_ray.report.data import (
    NO_GEOMETRY,
    Scope,
    detail_label,
    detail_tensors,
    rows,
    run_class,
)
from rlvr_ray.report.figures import (
    BASE_COLOR,
    RL_COLOR,
    SFT_COLOR,
    Image,
    Section,
    Table,
    png,
    subplots,
)

CLASS_COLOR = {"RL": RL_COLOR, "SFT": SFT_COLOR}
OVERLAPS = [  # (column, its random baseline, panel title)
    ("overlap_princ", "princ_density", "principal weights"),
    ("overlap_low", "low_density", "low-magnitude weights"),
    ("overlap_princ_not_low", "princ_not_low_density", "principal, not low-magnitude"),
]


def _why_no_geometry(con, sc: Scope) -> str:
    """NO_GEOMETRY, plus the recorded geometry statuses when the scan left any."""
    st = rows(
        con,
        """SELECT geometry_status AS s, count(*) AS n FROM tensors
                      WHERE list_contains(?, group_name) AND geometry_status IS NOT NULL
                      GROUP BY ALL ORDER BY n DESC LIMIT 3""",
        [sc.groups],
    )
    extra = ", ".join(f"{r['s']}: {r['n']}" for r in st)
    return NO_GEOMETRY + (f" (geometry status of tensors: {extra})" if extra else "")


FLAGGED = {"k_not_below_rank": "k > short side / 4", "small_gap": "singular-value gap at k < 0.001"}


def _flagged_note(con, sc: Scope) -> str | None:
    """A warning when decomposed matrices in scope have a geometry_status other than 'ok'."""
    st = rows(
        con,
        """SELECT geometry_status AS s, count(DISTINCT group_name || '/' || tensor) AS n
                      FROM tensors WHERE list_contains(?, group_name)
                      AND geometry_status IN ('ok', 'k_not_below_rank', 'small_gap')
                      GROUP BY ALL ORDER BY n DESC, s""",
        [sc.groups],
    )
    bad = [r for r in st if r["s"] != "ok"]
    if not bad:
        return None
    why = ", ".join(f"{r['n']} {r['s']} ({FLAGGED[r['s']]})" for r in bad)
    return (
        f"Warning: the geometry of {sum(r['n'] for r in bad)} of {sum(r['n'] for r in st)} "
        f"decomposed matrices is no finding ({why}); their overlaps and principal angles "
        "are left out below, their NSS (which needs no k) is kept."
    )


def _lines(found: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(group, RL|SFT) -> rows, for one line per group and class."""
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in found:
        out[(r["group_name"], run_class(r["algorithm"]))].append(r)
    return dict(sorted(out.items()))


def _styles(keys) -> dict:
    dashes = ["-", "--", ":", "-."]
    groups = sorted({g for g, _ in keys})
    return {(g, c): (CLASS_COLOR[c], dashes[groups.index(g) % 4]) for g, c in keys}


def overlaps(con, sc: Scope) -> Section:
    """Overlap of the update mask with M_princ, M_low and M_princ & not M_low, per layer."""
    sec = Section(
        "overlaps",
        "Overlap with principal and low-magnitude weights",
        "Share of changed weights that fall among the principal weights, the "
        "low-magnitude weights and the principal-but-not-low weights, against the "
        "random baseline (that mask's density): RL landing below baseline on "
        "principal weights is the 'off the principals' signature.",
    )
    cols = ", ".join(
        f"sum({o} * n_changed) / sum(n_changed) AS {o}, "
        f"sum({b} * n_changed) / sum(n_changed) AS {b}"
        for o, b, _ in OVERLAPS
    )
    found = rows(
        con,
        f"""SELECT group_name, CASE WHEN lower(algorithm) = 'sft' THEN 'sft' END
                          AS algorithm, layer, {cols} FROM tensors
                          WHERE list_contains(?, group_name) AND layer IS NOT NULL
                          AND geometry_status = 'ok' AND n_changed > 0
                          GROUP BY ALL ORDER BY layer""",
        [sc.groups],
    )
    flagged = _flagged_note(con, sc)
    if flagged:
        sec.notes.append(flagged)
    if not found:
        if not flagged:
            sec.notes.append(_why_no_geometry(con, sc))
        return sec
    lines = _lines(found)
    style = _styles(lines)
    fig, axs = subplots(1, 3, 11, 3.2, sharey=True)
    for ax, (o, b, title) in zip(axs[0], OVERLAPS, strict=True):
        for key, rs in lines.items():
            color, ls = style[key]
            x = [r["layer"] for r in rs]
            ax.plot(x, [r[o] for r in rs], ls, color=color, marker="o", ms=3, label=" ".join(key))
            ax.plot(x, [r[b] for r in rs], ls, color=color, alpha=0.35, lw=1)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axs[0, 0].set_ylabel("overlap with update mask")
    fig.tight_layout()
    handles, labels = axs[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        title="bold: observed\nfaint: baseline",
        title_fontsize=7,
    )
    sec.images.append(Image("overlaps", png(fig), _overlap_reading(lines)))
    return sec


def _overlap_reading(lines: dict[tuple[str, str], list[dict]]) -> str:
    """Observed vs baseline overlap with the principal weights, per group and class, averaged
    over the layers drawn."""
    parts = []
    for (g, cls), rs in lines.items():
        obs = np.mean([r["overlap_princ"] for r in rs])
        base = np.mean([r["princ_density"] for r in rs])
        shown = f"{obs:.3f} vs baseline {base:.3f}"
        word = "below" if obs < base else "above"
        if f"{obs:.3f}" == f"{base:.3f}":  # apart by less than the digits shown
            word = "level"
        parts.append(f"{g} {cls}: {shown} ({word})")
    return "Overlap with the principal weights, mean over layers: " + "; ".join(parts) + "."


def spectral(con, sc: Scope) -> Section:
    """NSS and the largest principal angle per layer, RL vs SFT, with a median summary."""
    sec = Section(
        "spectral",
        "Spectral shift and principal angles per layer",
        "Normalized spectral shift (NSS) and largest principal angle between the base's "
        "and the run's top singular subspaces: RL keeps both tiny (the paper reports "
        "NSS about 1e-5 to 6e-5) while SFT rotates and drifts them (NSS about 1e-1).",
    )
    found = rows(
        con,
        """SELECT group_name, CASE WHEN lower(algorithm) = 'sft' THEN 'sft' END
                         AS algorithm, layer, avg(nss) AS nss,
                         max(greatest(max_angle_left, max_angle_right)) FILTER
                           (WHERE geometry_status = 'ok') AS angle
                         FROM tensors WHERE list_contains(?, group_name) AND layer IS NOT NULL
                         AND nss IS NOT NULL GROUP BY ALL ORDER BY layer""",
        [sc.groups],
    )
    flagged = _flagged_note(con, sc)
    if flagged:
        sec.notes.append(flagged)
    if not found:
        sec.notes.append(_why_no_geometry(con, sc))
        return sec
    summary = rows(
        con,
        """SELECT CASE WHEN lower(algorithm) = 'sft' THEN 'SFT' ELSE 'RL' END
                           AS cls, count(*) AS n, median(nss) AS nss, max(nss) AS nss_max,
                           median(greatest(max_angle_left, max_angle_right)) FILTER
                             (WHERE geometry_status = 'ok') AS angle
                           FROM tensors WHERE list_contains(?, group_name) AND nss IS NOT NULL
                           GROUP BY ALL ORDER BY cls""",
        [sc.groups],
    )
    sec.tables.append(
        Table(
            "spectral-table",
            ["Runs", "Matrices", "Median NSS", "Max NSS", "Median max angle (rad)"],
            [
                [
                    r["cls"],
                    str(r["n"]),
                    f"{r['nss']:.3g}",
                    f"{r['nss_max']:.3g}",
                    "" if r["angle"] is None else f"{r['angle']:.3g}",
                ]
                for r in summary
            ],
            [False] + [True] * 4,
            "Over every decomposed matrix of the runs in the report.",
        )
    )
    lines = _lines(found)
    style = _styles(lines)
    fig, axs = subplots(1, 2, 10, 3.2)
    for ax, col, label in (
        (axs[0, 0], "nss", "NSS (mean over the layer)"),
        (axs[0, 1], "angle", "max principal angle (rad)"),
    ):
        for key, rs in lines.items():
            color, ls = style[key]
            y = [np.nan if not r[col] else r[col] for r in rs]  # log axes: zero -> gap
            ax.plot(
                [r["layer"] for r in rs], y, ls, color=color, marker="o", ms=3, label=" ".join(key)
            )
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
    fig.tight_layout()
    handles, labels = axs[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5))
    med = {r["cls"]: r["nss"] for r in summary}
    cap = "Median NSS over decomposed matrices: " + ", ".join(
        f"{c} {v:.3g}" for c, v in med.items()
    )
    if "RL" in med and "SFT" in med and med["RL"] > 0:
        cap += f" (SFT {med['SFT'] / med['RL']:.3g}x RL)"
    sec.images.append(Image("spectral", png(fig), cap + "."))
    for g, layer in sc.layers.items():
        img = _layer_spectrum(con, g, layer)
        if img is not None:
            sec.images.append(img)
    return sec


def _layer_spectrum(con, g: str, layer: int) -> Image | None:
    """Top-k singular values and principal angles of one matrix of the chosen layer."""
    sql = """SELECT s.run, t.algorithm, s.i, s.sigma_base, s.sigma_run, s.angle_left,
             s.angle_right FROM spectra s LEFT JOIN (SELECT DISTINCT group_name, run, algorithm
             FROM tensors) t USING (group_name, run) WHERE s.group_name = ? AND s.tensor = ?
             AND s.expert IS NOT DISTINCT FROM ?
             AND EXISTS (SELECT 1 FROM tensors o WHERE o.group_name = s.group_name
               AND o.run = s.run AND o.tensor = s.tensor AND o.geometry_status = 'ok'
               AND o.expert IS NOT DISTINCT FROM s.expert)
             ORDER BY s.run, s.i"""
    # the first detail matrix (q, then k, ...) that has a stored spectrum
    found, role, tensor, expert = [], "", "", None
    for role, tensor, expert in detail_tensors(con, g, layer):  # noqa: B007 (used after the loop)
        found = rows(con, sql, [g, tensor, expert])
        if found:
            break
    if not found:
        return None
    by: dict[str, list[dict]] = defaultdict(list)
    for r in found:
        by[r["run"]].append(r)
    fig, axs = subplots(1, 3, 12, 3.2)
    base = by[next(iter(by))]
    axs[0, 0].plot([r["i"] for r in base], [r["sigma_base"] for r in base], color=BASE_COLOR)
    axs[0, 0].set(yscale="log", xlabel="i", ylabel="singular value", title="base spectrum")
    n_class: dict[str, int] = defaultdict(int)
    for rs in by.values():
        cls = run_class(rs[0]["algorithm"])
        n_class[cls] += 1
        color = CLASS_COLOR[cls]
        i = np.array([r["i"] for r in rs])
        sb = np.array([r["sigma_base"] or np.nan for r in rs], dtype=float)
        sr = np.array([r["sigma_run"] or np.nan for r in rs], dtype=float)
        shift = np.abs(sr - sb) / sb
        axs[0, 1].plot(i, np.where(shift > 0, shift, np.nan), color=color, alpha=0.8, marker=".")
        for col, ls in (("angle_left", "-"), ("angle_right", ":")):
            a = np.array([r[col] or np.nan for r in rs], dtype=float)
            axs[0, 2].plot(i, a, ls, color=color, alpha=0.8, marker=".")
    axs[0, 1].set(
        yscale="log",
        xlabel="i",
        ylabel=r"$|\sigma_{run} - \sigma_{base}|\ /\ \sigma_{base}$",
        title="relative singular value shift",
    )
    axs[0, 2].set(
        yscale="log",
        xlabel="i",
        ylabel="angle (rad)",
        title="principal angles (solid: left, dotted: right)",
    )
    # one legend entry per class (not per run), outside the axes
    handles = [
        Line2D([], [], color=CLASS_COLOR[c], label=f"{c} ({n} runs)")
        for c, n in sorted(n_class.items())
    ]
    fig.suptitle(f"{g}: {tensor}" + ("" if expert is None else f" (expert {expert})"), fontsize=10)
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5))
    shift_by = defaultdict(list)
    for rs in by.values():
        shift_by[run_class(rs[0]["algorithm"])] += [
            abs(r["sigma_run"] - r["sigma_base"]) / r["sigma_base"]
            for r in rs
            if r["sigma_base"] and r["sigma_run"] is not None
        ]
    reading = ", ".join(f"{c} {np.median(v):.3g}" for c, v in sorted(shift_by.items()) if v)
    cap = (
        f"{g}, layer {layer}, {detail_label(role, expert)} projection: blue = RL runs, red = SFT "
        "runs; zero shifts and angles are left out of the log axes. Median relative singular "
        f"value shift: {reading}."
    )
    return Image(f"spectrum-{g}", png(fig), cap)
