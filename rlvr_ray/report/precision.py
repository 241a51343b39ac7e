"""The report's precision-gate section: how far, in bf16 steps (ULPs), the changed weights moved.

Each tensor row carries ``ulp_hist``, the count of its changed weights per ULP-step bin
(``rlvr_ray.io.schema.ULP_BIN_EDGES``). Summed over a run's compared tensors, and over an
algorithm's final checkpoints, it shows whether an update is mostly single-ULP moves (bf16
precision gating a small update: the RL signature) or large moves (SFT).
"""

from __future__ import annotations

import numpy as np

from rlvr_ray.io.schema import COMPARED_SQL, ULP_BIN_EDGES
from rlvr_ray.report.data import Scope, rows
from rlvr_ray.report.figures import SFT_COLOR, Image, Section, Table, algo_colors, pct, subplots
from rlvr_ray.report.figures import png as to_png

#: tensors counted, as in the run_sparsity view
COUNTED = f"{COMPARED_SQL} AND ulp_hist IS NOT NULL"


def bin_labels() -> list[str]:
    """'1', '2', ..., '5-8', ..., '>=65' for the bins of ULP_BIN_EDGES."""
    edges = ULP_BIN_EDGES
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        out.append(str(lo) if hi - 1 == lo else f"{lo}-{hi - 1}")
    return out + [f">={edges[-1]}"]


def run_hists(con, groups: list[str]) -> list[dict]:
    """Per run: group_name, run, algorithm, final (its series' last step), hist (summed counts)."""
    cells = rows(
        con,
        f"""SELECT group_name, run, algorithm, i, sum(c) AS n FROM (
                          SELECT group_name, run, algorithm, unnest(ulp_hist) AS c,
                                 generate_subscripts(ulp_hist, 1) AS i FROM tensors
                          WHERE {COUNTED} AND list_contains(?, group_name))
                          GROUP BY ALL ORDER BY group_name, run""",
        [groups],
    )
    final = {
        (r["group_name"], r["run"]) for r in rows(con, "SELECT group_name, run FROM final_runs")
    }
    found: dict[tuple[str, str], dict] = {}
    for c in cells:
        key = (c["group_name"], c["run"])
        r = found.setdefault(
            key,
            {
                "group_name": key[0],
                "run": key[1],
                "algorithm": c["algorithm"],
                "final": key in final,
                "hist": np.zeros(len(ULP_BIN_EDGES), dtype=np.int64),
            },
        )
        r["hist"][c["i"] - 1] += int(c["n"])
    return list(found.values())


def precision(con, sc: Scope) -> Section:
    """ULP-step histogram of changed weights per algorithm (final checkpoints), and per run."""
    sec = Section(
        "precision",
        "Precision gate: how far changed weights moved",
        "Changed weights by the number of bf16 steps (ULPs) they moved: an update made "
        "mostly of one-ULP moves sits at the edge of bf16 precision, where a smaller "
        "step would have been rounded away.",
    )
    runs = run_hists(con, sc.groups)
    runs = [r for r in runs if r["hist"].sum() > 0]
    if not runs:
        sec.notes.append("no changed weights with a ULP histogram in this scan")
        return sec
    labels = bin_labels()
    by_algo: dict[str, np.ndarray] = {}
    n_runs: dict[str, int] = {}
    for r in runs:
        if r["final"]:
            a = (r["algorithm"] or "unlabelled").lower()
            by_algo[a] = by_algo.get(a, 0) + r["hist"]
            n_runs[a] = n_runs.get(a, 0) + 1
    algos = sorted(by_algo, key=lambda a: (a == "sft", a))
    if algos:
        sec.images.append(_figure(by_algo, algos, n_runs, labels))
    else:
        sec.notes.append("no final checkpoint changed any weight: only earlier steps did")
    sec.tables.append(
        Table(
            "precision-table",
            ["Group", "Run", "Algorithm", "Changed", *labels],
            [
                [
                    r["group_name"],
                    r["run"],
                    r["algorithm"] or "",
                    f"{int(r['hist'].sum()):,}",
                    *[pct(c / r["hist"].sum(), 1) for c in r["hist"]],
                ]
                for r in runs
            ],
            [False] * 3 + [True] * (1 + len(labels)),
            "Share of each run's changed weights per ULP-step bin (bins from ULP_BIN_EDGES; every "
            "compared tensor, every saved step).",
        )
    )
    return sec


def _figure(
    by_algo: dict[str, np.ndarray], algos: list[str], n_runs: dict[str, int], labels: list[str]
) -> Image:
    colors = algo_colors(algos)
    shares = {a: by_algo[a] / by_algo[a].sum() for a in algos}
    fig, axs = subplots(1, 1, 8, 3.2)
    ax = axs[0, 0]
    x = np.arange(len(labels))
    w = 0.8 / len(algos)
    for k, a in enumerate(algos):
        ax.bar(
            x - 0.4 + (k + 0.5) * w,
            100 * shares[a],
            w,
            color=SFT_COLOR if a == "sft" else colors[a],
            label=f"{a} ({n_runs[a]} runs)",
        )
    ax.set_xticks(x, labels)
    ax.set_xlabel("ULP steps moved (bf16)")
    ax.set_ylabel("share of changed weights (%)")
    ax.grid(axis="x", visible=False)
    ax.legend(
        loc="center left", bbox_to_anchor=(1.01, 0.5), title="algorithm (final)", title_fontsize=8
    )
    small = int(np.searchsorted(ULP_BIN_EDGES, 5))  # bins below 5 ULPs
    reading = "; ".join(
        f"{a}: {100 * shares[a][0]:.0f}% moved one ULP, {100 * shares[a][:small].sum():.0f}% "
        "at most 4"
        for a in algos
    )
    cap = f"Final checkpoints, summed over each algorithm's runs. {reading}."
    return Image("precision", to_png(fig), cap, {"hist": {a: by_algo[a].tolist() for a in algos}})
