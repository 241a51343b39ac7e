"""What the report reads: small SQL helpers over a results directory's atlas, and its scope.

Everything the report shows comes from the atlas views (``rlvr_ray.io.catalog``), so a report
can be made from any results directory, including one copied from a cluster. The scope fixes
which groups the report covers (all, or ``--group``), which of them get the per-layer detail
figures, and which layer those show (``--layer``, default: the middle layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

#: roles of the per-layer figures (maps, step profiles, spectra), in display order; a fused
#: qkv projection takes the place of q/k/v when a family has one
DETAIL_ROLES = ("q", "k", "v", "qkv", "o", "down")
#: display order of roles everywhere else
ROLE_ORDER = (
    "q",
    "k",
    "v",
    "qkv",
    "o",
    "gate",
    "up",
    "gate_up",
    "down",
    "router",
    "embed",
    "lm_head",
    "norm",
    "bias",
    "other",
)
#: groups drawn in the per-layer figures when --group is not given (the rest: say so)
MAX_DETAIL_GROUPS = 4

NO_GEOMETRY = "no geometry in this scan: scanned with --no-geometry or geometry not computed"


class ReportError(ValueError):
    """The report cannot be made (no results, unknown group or layer); the message says why."""


def rows(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    """Run ``sql`` and return its rows as dicts."""
    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def role_key(role: str | None) -> int:
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)


def run_class(algorithm: str | None) -> str:
    """'SFT' for supervised fine-tuning runs, 'RL' for every other algorithm (or none)."""
    return "SFT" if (algorithm or "").lower() == "sft" else "RL"


@dataclass
class Scope:
    """Which groups the report covers and which layer the detail figures show per group."""

    groups: list[str]
    layers: dict[str, int] = field(default_factory=dict)  # detail group -> layer shown
    omitted: list[str] = field(default_factory=list)  # groups left out of the detail figures
    families: dict[str, str] = field(default_factory=dict)  # group -> family

    @property
    def detail_groups(self) -> list[str]:
        return list(self.layers)


def scope(
    con: duckdb.DuckDBPyConnection, group: str | None = None, layer: int | None = None
) -> Scope:
    """The report's scope; ReportError when the results are empty or --group/--layer miss."""
    found = rows(
        con,
        """SELECT group_name, any_value(family) AS family, max(layer) AS max_layer,
                         count(DISTINCT run) AS n_runs FROM tensors GROUP BY group_name
                         ORDER BY group_name""",
    )
    if not found:
        raise ReportError("no scanned tensors in these results (run `rlvr-ray scan` first)")
    if group is not None:
        found = [g for g in found if g["group_name"] == group]
        if not found:
            names = ", ".join(
                g["group_name"]
                for g in rows(con, "SELECT DISTINCT group_name FROM tensors ORDER BY 1")
            )
            raise ReportError(f"--group {group!r}: no such group in these results (have: {names})")
    sc = Scope(
        [g["group_name"] for g in found], families={g["group_name"]: g["family"] for g in found}
    )
    # the groups with the most runs are the most informative maps
    detail = sorted(found, key=lambda g: (-g["n_runs"], g["group_name"]))
    for g in detail[:MAX_DETAIL_GROUPS]:
        if g["max_layer"] is None:
            continue  # no layered tensors at all (a single matrix file, say)
        if layer is None:
            sc.layers[g["group_name"]] = int(g["max_layer"]) // 2
        elif 0 <= layer <= g["max_layer"]:
            sc.layers[g["group_name"]] = layer
    if layer is not None and not sc.layers:
        raise ReportError(f"--layer {layer}: no group has that layer (layers start at 0)")
    sc.omitted = [g["group_name"] for g in detail if g["group_name"] not in sc.layers]
    return sc


def detail_tensors(
    con: duckdb.DuckDBPyConnection, group: str, layer: int
) -> list[tuple[str, str, int | None]]:
    """(role, tensor, expert) of the chosen layer's detail matrices in ``group``, in display order.

    MoE experts are never drawn over each other: a role that has a matrix outside the experts
    (attention, a shared expert) shows only those; a role held by experts alone shows its
    lowest-numbered expert (``detail_label`` names it)."""
    found = rows(
        con,
        """SELECT DISTINCT role, tensor, expert FROM tensors WHERE group_name = ?
                         AND layer = ? AND list_contains(?, role) AND cols > 1""",
        [group, layer, list(DETAIL_ROLES)],
    )
    keep = []
    for role in {r["role"] for r in found}:
        of_role = [r for r in found if r["role"] == role]
        chosen = [r for r in of_role if r["expert"] is None]
        if not chosen:
            first = min(r["expert"] for r in of_role)
            chosen = [r for r in of_role if r["expert"] == first]
        keep += chosen
    out = [(r["role"], r["tensor"], r["expert"]) for r in keep]
    return sorted(out, key=lambda d: (role_key(d[0]), d[1], -1 if d[2] is None else d[2]))


def detail_key(tensor: str, expert: int | None) -> str:
    """One string per (tensor, expert): the report's queries match it against ``DETAIL_KEY``."""
    return f"{tensor}#{'' if expert is None else expert}"


#: SQL for detail_key of a row with ``tensor`` and ``expert`` columns
DETAIL_KEY = "tensor || '#' || coalesce(CAST(expert AS VARCHAR), '')"


def detail_label(role: str, expert: int | None) -> str:
    return role if expert is None else f"{role} (expert {expert})"


def experts_shown(detail) -> str:
    """The caption's sentence naming the expert drawn for each role that exists only as experts
    (``detail``: (role, tensor, expert) triples); empty when no expert is drawn."""
    experts = [detail_label(r, e) for r, _, e in detail if e is not None]
    return f" MoE: {', '.join(experts)} shown, the other experts are not." if experts else ""
