"""Planning: open a group's checkpoints (headers only), name the scan, cut it into work units.

A unit is a contiguous run of tensors of ONE group, processed across ALL the group's checkpoints
by one actor, so cross-run statistics see every run and the base tensor is read once. The cut
depends only on the headers and ``unit_bytes``, so the same scan always has the same units and
a retried or resumed unit rewrites exactly its own parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, fields

from rlvr_ray.engine.config import Group, Params, is_step_pair
from rlvr_ray.io.checkpoint import Checkpoint
from rlvr_ray.io.families import family_for
from rlvr_ray.io.schema import schema_hash

MIN_UNITS = 16  # small models still spread over several actors


@dataclass(frozen=True)
class RunSpec:
    name: str
    ref: str
    fingerprint: str
    algorithm: str | None = None
    step: int | None = None
    dataset: str | None = None
    seed: int | None = None
    series: str | None = None
    consistency: bool = True
    master: str | None = None  # the run's fp32 master checkpoint (the precision gate)

    @classmethod
    def of(cls, run, ck) -> RunSpec:
        """The spec of the sweep's ``run`` (an ``engine.config.Run``), opened as ``ck``."""
        labels = (run.algorithm, run.step, run.dataset, run.seed, run.series)
        return cls(run.name, ck.ref, ck.fingerprint, *labels, run.consistency, run.master)

    def labels(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "step": self.step,
            "dataset": self.dataset,
            "seed": self.seed,
            "series": self.series or self.name,
        }


@dataclass(frozen=True)
class TensorSpec:
    name: str
    role: str
    layer: int | None
    depth: float | None
    nbytes: int  # summed over the base and every run that has it
    shape: tuple[int, ...] = ()  # the base's (else the first run's that has it)
    #: the expert of a per-expert tensor (from its name), or of the one expert's matrix of a
    #: fused [experts, rows, cols] tensor that this spec compares (``fused``; shape: [rows,
    #: cols]); else None
    expert: int | None = None
    fused: bool = False
    tower: str = "text"
    #: the base's tensor compared as this one, when not ``name``: a tied embedding standing in
    #: for an output head the base does not store
    base_tensor: str | None = None
    #: per run, the run's tensor compared as this one (likewise); empty: ``name`` in every run
    run_tensors: tuple[str, ...] = ()

    @property
    def piece(self) -> int | None:
        """The expert whose slice of a fused expert tensor is compared (None: the tensor)."""
        return self.expert if self.fused else None

    def run_tensor(self, i: int) -> str:
        """The tensor read from run i (a checkpoint without it reads as missing)."""
        return self.run_tensors[i] if self.run_tensors else self.name


@dataclass(frozen=True)
class Unit:
    scan_id: str
    index: int
    group: str
    family: str
    base_ref: str
    base_fingerprint: str
    runs: tuple[RunSpec, ...]
    tensors: tuple[TensorSpec, ...]
    params: Params

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class GroupPlan:
    scan_id: str
    group: Group
    family: str
    base: Checkpoint
    runs: tuple[RunSpec, ...]
    units: tuple[Unit, ...]
    params: Params | None = None  # as the units use them (a step pair's: geometry off)

    @property
    def n_tensors(self) -> int:
        return sum(len(u.tensors) for u in self.units)


def natural_key(name: str) -> list:
    """Sort key: digit runs compare as numbers (layers.2 before layers.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_hash() -> str:
    """A hash of the plan's fields (runs, tensors, units) and its cut's unit count floor:
    what a scan's units are."""
    parts = [f"{f.name}:{f.type}" for cls in (RunSpec, TensorSpec, Unit) for f in fields(cls)]
    return hashlib.sha256(f"{MIN_UNITS};{';'.join(parts)}".encode()).hexdigest()[:16]


def scan_id_for(
    group: str, base_fp: str, runs: tuple[RunSpec, ...], params: Params, unit_bytes: int
) -> str:
    """The scan's id: the same for the same inputs, tables and plan (a resumed scan finds its
    parts); another once any of them changes."""
    key = {
        "schema": schema_hash(),
        "plan": plan_hash(),
        "group": group,
        "base": base_fp,
        "unit_bytes": unit_bytes,
        "runs": [
            [r.name, r.fingerprint, r.labels(), r.consistency, *([r.master] if r.master else [])]
            for r in runs
        ],
        "params": params.model_dump(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cut(tensors: list[TensorSpec], unit_bytes: int) -> list[list[TensorSpec]]:
    """Contiguous, byte-balanced pieces: max(total / unit_bytes, MIN_UNITS) of them (or one
    per tensor, if fewer).

    A piece closes once it holds its share of the bytes still to place (a tensor too big
    for one share is a piece of its own, and the rest is shared out anew): a huge embedding
    no longer leaves a trail of one-tensor pieces behind it."""
    total = sum(t.nbytes for t in tensors)
    target = min(len(tensors), max(math.ceil(total / max(unit_bytes, 1)), MIN_UNITS))
    if target <= 1:
        return [tensors] if tensors else []
    pieces: list[list[TensorSpec]] = [[]]
    left, size = total, 0
    for i, t in enumerate(tensors):
        more = target - len(pieces)  # pieces still to open
        if pieces[-1] and more and (size >= left / (more + 1) or len(tensors) - i == more):
            left -= size
            pieces.append([])
            size = 0
        pieces[-1].append(t)
        size += t.nbytes
    return pieces


def plan_group(
    group: Group,
    base: Checkpoint,
    runs: list[tuple[RunSpec, Checkpoint]],
    params: Params,
    unit_bytes: int,
) -> GroupPlan:
    """Units for one group whose checkpoints opened (runs that failed to open are left out).
    A step-pair group (`rlvr_ray.engine.config.step_pair_groups`) is scanned without geometry:
    its rows are the k-step sparsity, and the geometry of a step against its base is the main
    group's."""
    if is_step_pair(group.name):
        params = params.model_copy(update={"geometry": False})
    fam = family_for(base.config)
    names = set(base.entries)
    for _, ck in runs:
        names.update(ck.entries)
    specs = []
    cks = [base, *(c for _, c in runs)]
    for name in sorted(names, key=natural_key):
        info = fam.classify(name)
        # the tensor each checkpoint holds for ``name``: itself, or a tied embedding for a head
        srcs = [fam.stand_in(name, ck.entries, ck.config) or name for ck in cks]
        held = [ck.entries[n] for ck, n in zip(cks, srcs, strict=True) if n in ck.entries]
        nbytes, shape = sum(e.nbytes for e in held), held[0].shape
        where = {
            "tower": info.tower,
            "base_tensor": srcs[0] if srcs[0] != name else None,
            "run_tensors": tuple(srcs[1:]) if any(n != name for n in srcs[1:]) else (),
        }
        if fam.fused_experts(name) and len(shape) >= 2 and shape[0] > 0:
            # one matrix (or vector, for [experts, n] biases) per expert, each its own spec
            one, piece = nbytes // shape[0], tuple(shape[1:])
            specs += [
                TensorSpec(
                    name,
                    info.role,
                    info.layer,
                    info.depth,
                    one,
                    piece,
                    expert=e,
                    fused=True,
                    **where,
                )
                for e in range(shape[0])
            ]
            continue
        info_args = (name, info.role, info.layer, info.depth, nbytes, shape)
        specs.append(TensorSpec(*info_args, expert=info.expert, **where))
    run_specs = tuple(r for r, _ in runs)
    sid = scan_id_for(group.name, base.fingerprint, run_specs, params, unit_bytes)
    units = tuple(
        Unit(sid, i, group.name, fam.name, base.ref, base.fingerprint, run_specs, tuple(p), params)
        for i, p in enumerate(cut(specs, unit_bytes))
    )
    return GroupPlan(sid, group, fam.name, base, run_specs, units, params)
