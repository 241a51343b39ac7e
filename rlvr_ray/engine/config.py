"""The sweep: one validated, frozen description of what to scan and with which parameters.

A sweep file (YAML) has ``groups:``; a group is one base checkpoint and its runs. Relative
checkpoint paths are resolved against the sweep file's directory. Errors name the field.

    groups:
      - name: qwen2-lab
        base: qwen2/base
        runs:
          - {name: grpo-s1, checkpoint: qwen2/runs/grpo-s1/step-0060, algorithm: grpo, step: 60}
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlvr_ray.stats.rank_rule import RANK_FRAC, rank_for

#: algorithms of the supervised class: their runs stay out of a group's cross-run consistency
#: unless they ask in (consistency compares runs of one class: RL runs with RL runs)
SFT_ALGORITHMS = ("sft",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]*$")
#: what names a step-pair group: ``<group>/steps/<series>/<from>-<to>``. A sweep's own group
#: names cannot hold "/", so these never collide with them (`is_step_pair`)
STEP_PAIRS = "/steps/"


class SweepError(ValueError):
    """A malformed sweep; the message names the file and the field."""


def _check_name(v: str, what: str) -> str:
    if not _NAME.match(v):
        raise ValueError(f"{what} name {v!r} must match {_NAME.pattern}")
    return v


def _no_duplicates(names: list[str], what: str) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate {what}: {dup}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Run(_Frozen):
    """One fine-tuned checkpoint of a group's base."""

    name: str = Field(description="unique within the group: letters, digits, . _ @ + = -")
    checkpoint: str = Field(description="HF directory, .safetensors file or hf://org/name@rev")
    algorithm: str | None = Field(None, description="grpo, dapo, reinforce++, ppo, dpo, sft, ...")
    step: int | None = Field(None, ge=0, description="training step of this checkpoint")
    dataset: str | None = None
    seed: int | None = None
    series: str | None = Field(None, description="groups the steps of one training run")
    master: str | None = Field(
        None,
        description="the run's fp32 master weights (HF directory or .safetensors, F32) beside "
        "this bf16 checkpoint: the scan adds its precision_gate rows",
    )
    consistency: bool = Field(
        None,
        description="include in the group's cross-run consistency (default: yes for RL runs and "
        "runs without an algorithm, no for SFT runs: consistency compares runs of one class; "
        "no for a series' steps before its last: they are one run's path, not other runs)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v == "base":  # the checkpoints table's row of the group's base has this name
            raise ValueError("run name 'base' is reserved for the group's base checkpoint")
        return _check_name(v, "run")

    @field_validator("algorithm")
    @classmethod
    def _algo(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    @model_validator(mode="after")
    def _consistency_by_class(self) -> Run:
        if self.consistency is None:  # frozen: set once, here, from the algorithm's class
            object.__setattr__(self, "consistency", self.algorithm not in SFT_ALGORITHMS)
        return self


class Group(_Frozen):
    """A base checkpoint and its runs; the unit of cross-run consistency."""

    name: str
    base: str
    runs: tuple[Run, ...] = Field(min_length=1)
    step_pairs: bool | tuple[str, ...] = Field(
        False,
        description="also compare consecutive saved steps of each series (true), or of the "
        "series named: step t as the base of step t' (the next saved step), in a group of its "
        "own named <group>/steps/<series>/<t>-<t'> (`step_pair_groups`)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "group")

    @model_validator(mode="after")
    def _unique_runs(self) -> Group:
        _no_duplicates([r.name for r in self.runs], f"run names in group {self.name!r}")
        self.series_steps()  # step_pairs: every series asked for has distinct steps
        return self

    @model_validator(mode="after")
    def _earlier_steps_out_of_consistency(self) -> Group:
        """A series' steps before its last stay out of the group's consistency unless they ask
        in: nested masks of one training run would read as agreement between runs."""
        last: dict[str, int] = {}
        for r in self.runs:
            if r.series is not None and r.step is not None:
                last[r.series] = max(last.get(r.series, r.step), r.step)
        runs = tuple(
            r.model_copy(update={"consistency": False})
            if r.series in last
            and r.step is not None
            and r.step < last[r.series]
            and "consistency" not in r.model_fields_set
            else r
            for r in self.runs
        )
        if runs != self.runs:
            object.__setattr__(self, "runs", runs)  # frozen: set once, here
        return self

    def series_steps(self) -> dict[str, list[Run]]:
        """The runs of each series that ``step_pairs`` asks for, by step (ValueError naming
        the series when a run of it has no step or two runs share one)."""
        if not self.step_pairs:
            return {}
        by_series: dict[str, list[Run]] = {}
        for r in self.runs:
            if r.series is not None:
                by_series.setdefault(r.series, []).append(r)
        if self.step_pairs is True:
            wanted = [s for s, runs in by_series.items() if len(runs) > 1]
        else:
            wanted = list(self.step_pairs)
            unknown = [s for s in wanted if len(by_series.get(s, [])) < 2]
            if unknown:
                raise ValueError(
                    f"step_pairs: series {unknown} need at least two runs with that series "
                    f"label in group {self.name!r}"
                )
        out = {}
        for s in wanted:
            _check_name(s, "step_pairs: series")
            runs = by_series[s]
            no_step = [r.name for r in runs if r.step is None]
            if no_step:
                raise ValueError(f"step_pairs: series {s!r} run {no_step[0]!r} has no step")
            _no_duplicates([str(r.step) for r in runs], f"steps in series {s!r}")
            out[s] = sorted(runs, key=lambda r: r.step)
        return out


def is_step_pair(group_name: str) -> bool:
    """Whether ``group_name`` names a step-pair group (`step_pair_groups`)."""
    return STEP_PAIRS in group_name


def step_pair_groups(group: Group) -> tuple[Group, ...]:
    """The step-pair groups of ``group``: for consecutive saved steps t < t' of a series it
    asks for, a group ``<group>/steps/<series>/<t>-<t'>`` whose base is the step-t checkpoint
    and whose one run is the step-t' run (its name and labels; out of consistency). Its tensor
    rows are the k-step sparsity (k = t' - t) between the two checkpoints."""
    pairs = []
    for series, runs in group.series_steps().items():
        for prev, run in zip(runs, runs[1:]):
            # model_copy skips validation: the name holds "/", which no sweep's group may
            name = f"{group.name}{STEP_PAIRS}{series}/{prev.step}-{run.step}"
            # its master moved from the series' start, not from step t: no precision gate
            only = run.model_copy(update={"consistency": False, "master": None})
            update = {"name": name, "base": prev.checkpoint, "runs": (only,), "step_pairs": False}
            pairs.append(group.model_copy(update=update))
    return tuple(pairs)


class Params(_Frozen):
    """Statistics parameters; part of the scan id, so changing one makes a new scan."""

    geometry: bool = Field(True, description="principal overlaps, NSS and principal angles")
    rank_k: int | None = Field(None, ge=1, description="absolute k of M_princ; overrides rank_frac")
    rank_frac: float = Field(
        RANK_FRAC,
        gt=0,
        le=1,
        description="default k of M_princ as a share of a matrix's short side p: "
        f"floor(rank_frac * p + 0.5), at least 1 ({RANK_FRAC}: k = 64 at p = 1536, as in the paper)",
    )
    alpha: float = Field(0.5, gt=0, lt=1, description="share of entries in M_princ / M_low")
    spectral_k: int | None = Field(
        None, ge=1, description="absolute spectral k; overrides spectral_frac"
    )
    spectral_frac: float = Field(
        RANK_FRAC, gt=0, le=1, description="default spectral k as a share of p, like rank_frac"
    )
    max_svd_numel: int = Field(
        64 * 1024 * 1024, ge=1, description="tensors larger than this skip SVD (embeddings)"
    )
    svd_embeddings: bool = Field(False, description="decompose embed/lm_head too")
    map_size: int = Field(64, ge=1, le=512, description="pooled mask/consensus map side")
    full_spectrum: bool = Field(
        False, description="spectra keeps every singular value of base and run, not the top k"
    )

    def ks(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(rank_k, spectral_k) used for a matrix of ``shape`` (`rlvr_ray.stats.principal.rank_for`)."""
        rank_k = rank_for(shape, self.rank_k, self.rank_frac)
        return rank_k, rank_for(shape, self.spectral_k, self.spectral_frac)


class Sweep(_Frozen):
    groups: tuple[Group, ...] = Field(min_length=1)
    params: Params = Params()

    @model_validator(mode="after")
    def _unique_groups(self) -> Sweep:
        _no_duplicates([g.name for g in self.groups], "group names")
        return self

    def scan_groups(self) -> tuple[Group, ...]:
        """Every group to scan: the sweep's own, each followed by its step-pair groups."""
        return tuple(x for g in self.groups for x in (g, *step_pair_groups(g)))


def _resolve(ref: str, root: Path) -> str:
    if "://" in ref or Path(ref).expanduser().is_absolute():
        return ref
    return str((root / ref).resolve())


def _format(e: ValidationError, source: str) -> str:
    # a tuple whose items failed also reports itself too short (its valid items are counted):
    # only the items' own errors say what is wrong
    locs = [err["loc"] for err in e.errors()]
    errs = [
        err
        for err in e.errors()
        if err["type"] != "too_short"
        or not any(len(o) > len(err["loc"]) and o[: len(err["loc"])] == err["loc"] for o in locs)
    ]
    parts = []
    for err in errs[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    more = f" (+{len(errs) - 3} more)" if len(errs) > 3 else ""
    return f"sweep {source}: " + "; ".join(parts) + more


def quick_run(spec: str, path, master=None) -> dict:
    """A run of the quick form (``--run NAME[:ALGORITHM]=PATH``, the API's ``runs``) as the
    sweep's dict: ``spec`` is ``NAME`` or ``NAME:ALGORITHM``; ``master``: its fp32 master."""
    name, _, algorithm = str(spec).partition(":")
    run = {"name": name, "checkpoint": str(path), **({"algorithm": algorithm} if algorithm else {})}
    return run | ({"master": str(master)} if master is not None else {})


def sweep_from_dict(data: object, root: Path, source: str = "<dict>") -> Sweep:
    """Validate a parsed sweep; relative checkpoint paths are taken from ``root``."""
    if not isinstance(data, dict):
        raise SweepError(
            f"sweep {source}: expected a mapping with 'groups:', got {type(data).__name__}"
        )
    try:
        sweep = Sweep.model_validate(data)
    except ValidationError as e:
        raise SweepError(_format(e, source)) from None
    groups = tuple(
        g.model_copy(
            update={
                "base": _resolve(g.base, root),
                "runs": tuple(
                    r.model_copy(
                        update={
                            "checkpoint": _resolve(r.checkpoint, root),
                            "master": r.master and _resolve(r.master, root),
                        }
                    )
                    for r in g.runs
                ),
            }
        )
        for g in sweep.groups
    )
    return sweep.model_copy(update={"groups": groups})


def downloaded(sweep: Sweep) -> Sweep:
    """``sweep`` with every ``hf://`` checkpoint downloaded whole into the cache and scanned
    from there (``hf://...?download``) instead of read by HTTP range requests."""
    from rlvr_ray.io.sources import with_download

    groups = tuple(
        g.model_copy(
            update={
                "base": with_download(g.base),
                "runs": tuple(
                    r.model_copy(update={"checkpoint": with_download(r.checkpoint)}) for r in g.runs
                ),
            }
        )
        for g in sweep.groups
    )
    return sweep.model_copy(update={"groups": groups})


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep YAML file."""
    import yaml  # only a sweep file needs it: not the command line's quick form

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"sweep {path}: file not found") from None
    except yaml.YAMLError as e:
        raise SweepError(f"sweep {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return sweep_from_dict(data, path.parent.resolve(), str(path))
