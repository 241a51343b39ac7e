"""The report's precision-gate section: how far, in bf16 steps (ULPs), the changed weights moved,
and, for runs scanned with their fp32 masters, how many master moves bf16 rounding erased.

Each tensor row carries ``ulp_hist``, the count of its changed weights per ULP-step bin
(``rlvr_ray.io.schema.ULP_BIN_EDGES``). Summed over a run's compared tensors, and over an
algorithm's final checkpoints, it shows whether an update is mostly single-ULP moves (bf16
precision gating a small update: the RL signature) or large moves (SFT). The view
``run_precision_gate`` gives, per run with a master, the share of the coordinates its master
moved that its bf16 checkpoint leaves at the base value, and those moves by size in half ULPs
(``GATE_BIN_EDGES``); RL and SFT final checkpoints are pooled and compared.
"""

from __future__ import annotations

import numpy as np

from rlvr_ray.io.schema import COMPARED_SQL, GATE_BIN_EDGES, ULP_BIN_EDGES
from rlvr_ray.report.data import Scope, rows, run_class
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
            "Share of each run's changed weights per ULP-step bin (the columns: how many "
            "representable values a weight moved; every compared tensor, every saved step).",
        )
    )
    masters(con, sc, sec)
    return sec


NO_MASTERS = (
    "no run was scanned with its fp32 master: give a run's master (sweep `master:`, "
    "`--master NAME=PATH`) to measure which master moves bf16 rounding erased"
)


def gate_labels() -> list[str]:
    """'<0.125', '0.125-0.25', ..., '>=8' for the bins of GATE_BIN_EDGES (in half ULPs)."""
    e = GATE_BIN_EDGES
    return [f"<{e[1]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(e[1:-1], e[2:])] + [f">={e[-1]:g}"]


def masters(con, sc: Scope, sec: Section) -> None:
    """Add the master-measured gate to ``sec``: per run a table, RL vs SFT (final checkpoints,
    pooled) a figure whose caption states the erased shares."""
    names = {
        n for (n,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    found = []
    if "run_precision_gate" in names:  # an atlas built before the gate existed has no view
        found = rows(
            con,
            """SELECT g.*, f.run IS NOT NULL AS final FROM run_precision_gate g
               LEFT JOIN final_runs f USING (group_name, run)
               WHERE list_contains(?, g.group_name) AND g.n_moved > 0
               ORDER BY g.group_name, g.run""",
            [sc.groups],
        )
    if not found:
        sec.notes.append(NO_MASTERS)
        return
    labels = gate_labels()
    pooled: dict[str, np.ndarray] = {}  # class -> [n_moved, n_erased, *hist]
    n_runs: dict[str, int] = {}
    for r in found:
        if r["final"]:
            cls = run_class(r["algorithm"])
            counts = np.array([r["n_moved"], r["n_erased"], *r["gate_hist"]], dtype=np.int64)
            pooled[cls] = pooled.get(cls, 0) + counts
            n_runs[cls] = n_runs.get(cls, 0) + 1
    if pooled:
        sec.images.append(_gate_figure(pooled, n_runs, labels))
    sec.tables.append(
        Table(
            "gate-table",
            ["Group", "Run", "Algorithm", "Master moves", "Erased", *labels],
            [
                [
                    r["group_name"],
                    r["run"],
                    r["algorithm"] or "",
                    f"{int(r['n_moved']):,}",
                    pct(r["erased_share"], 1),
                    *[pct(c / r["n_moved"], 1) for c in r["gate_hist"]],
                ]
                for r in found
            ],
            [False] * 3 + [True] * (2 + len(labels)),
            "Per run scanned with its fp32 master: the coordinates the master moved from the base, "
            "the share of them its bf16 checkpoint leaves at the base value (erased), and the "
            "moves by size in half bf16 ULPs of the base value (below 1: invisible in bf16).",
        )
    )


def _gate_figure(pooled: dict[str, np.ndarray], n_runs: dict[str, int], labels: list[str]):
    classes = sorted(pooled, key=lambda c: c == "SFT")
    erased = {c: pooled[c][1] / pooled[c][0] for c in classes}
    fig, axs = subplots(1, 1, 8, 3.2)
    ax = axs[0, 0]
    x = np.arange(len(labels))
    w = 0.8 / len(classes)
    for k, c in enumerate(classes):
        share = pooled[c][2:] / pooled[c][0]
        color = SFT_COLOR if c == "SFT" else algo_colors(["grpo"])["grpo"]
        label = f"{c} ({n_runs[c]} runs): {100 * erased[c]:.1f}% erased"
        ax.bar(x - 0.4 + (k + 0.5) * w, 100 * share, w, color=color, label=label)
    ax.axvline(int(np.searchsorted(GATE_BIN_EDGES, 1.0)) - 0.5, color="0.3", lw=1, ls="--")
    ax.set_xticks(x, labels)
    ax.set_xlabel("|master move| in half bf16 ULPs of the base value (left of the line: erased)")
    ax.set_ylabel("share of master moves (%)")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="final checkpoints")
    reading = "; ".join(
        f"{c}: {100 * erased[c]:.1f}% of {int(pooled[c][0]):,} master moves erased by bf16 "
        f"rounding ({n_runs[c]} runs)"
        for c in classes
    )
    cap = f"fp32 master moves by size, final checkpoints pooled per class. {reading}."
    meta = {"erased": erased, "hist": {c: pooled[c][2:].tolist() for c in classes}}
    return Image("precision-masters", to_png(fig), cap, meta)


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
