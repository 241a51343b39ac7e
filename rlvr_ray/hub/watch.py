"""The Hub watch: scan newly published RL fine-tunes of the bases you follow, once or forever.

One round, per base: list its full fine-tunes newest first; skip every (repo, commit) the
``watch`` table already decided (scanned or skipped: a commit is never scanned twice; failures are
retried up to ``max_attempts`` rounds); check each new one without downloading weights (RL
evidence in tags or name, safetensors present, tensor names / shapes / dtypes equal to the base's
from HTTP range reads of the headers); scan the survivors together as runs of the group
``ORG__BASE`` with the real engine, which reads each actor's tensors by HTTP range requests
(nothing is downloaded whole unless ``download``: then the survivors and the base are downloaded,
safetensors + json only, and deleted after the scan unless ``keep``); record every decision in
``tables/watch/``.

Failures are isolated: the scan reports which run failed and why (not error text to match), a
candidate that cannot be opened fails alone with its one-line reason, a unit failure that
cannot be pinned on one candidate is resolved by scanning each candidate of the round alone,
and a base that cannot be opened is an error of the base's round: its candidates are not
charged an attempt and come back next round.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from rlvr_ray.engine import failures
from rlvr_ray.hub import client, discover
from rlvr_ray.io import catalog
from rlvr_ray.io.checkpoint import CheckpointError
from rlvr_ray.io.results import ResultsDir, open_results
from rlvr_ray.io.schema import WATCH

Log = Callable[[str], None]


@dataclass(frozen=True)
class WatchConfig:
    """One watch: which bases, where the results go, and how hard to try."""

    bases: tuple[str, ...]
    out: str
    limit: int = 50  # newest fine-tunes looked at per base and round
    dry_run: bool = False  # list what would be scanned; download, scan and record nothing
    download: bool = False  # download whole snapshots and scan those (default: range reads)
    keep: bool = False  # keep the downloads after the scan (with ``download``)
    include_non_rl: bool = False  # also scan fine-tunes with no RL evidence (e.g. SFT)
    retries: int = 3  # tries per Hub call (transient errors only)
    retry_wait: float = 2.0  # first backoff, seconds (doubles each retry)
    max_attempts: int = 3  # rounds a failing (repo, commit) is retried before giving up
    address: str | None = None  # Ray cluster (default: $RAY_ADDRESS or embedded Ray)
    num_cpus: int | None = None
    workers: int | None = None
    geometry: bool = True
    progress: str | None = "quiet"


@dataclass
class Candidate:
    repo: str
    sha: str
    created: datetime | None
    tags: tuple[str, ...]
    base: str
    attempt: int
    evidence: str | None = None
    algorithm: str | None = None
    status: str = "pending"
    reason: str | None = None
    scan_id: str | None = None

    @property
    def run(self) -> str:
        return discover.run_name(self.repo)


@dataclass
class RoundReport:
    would_scan: list[Candidate] = field(default_factory=list)  # dry run
    decided: list[Candidate] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # bases that could not be watched

    @property
    def exit_code(self) -> int:
        """0: all good; 3: a base or a candidate failed (see the watch table)."""
        return 3 if self.errors or any(c.status == "failed" for c in self.decided) else 0


def memory(out: str | ResultsDir) -> dict[tuple[str, str], tuple[str, int]]:
    """(repo, sha) -> (latest status, attempts so far) from the watch table's parts."""
    results = open_results(out)
    parts = results.parts("watch") if results.exists("tables", "watch") else []
    if not parts:
        return {}
    t = results.dataset("watch", parts).to_table(
        columns=["repo", "sha", "status", "attempt", "scanned_at"]
    )
    seen: dict[tuple[str, str], tuple[str, int, datetime]] = {}
    for r in sorted(t.to_pylist(), key=lambda r: (r["scanned_at"], r["attempt"] or 0)):
        seen[(r["repo"], r["sha"])] = (r["status"], r["attempt"] or 1, r["scanned_at"])
    return {k: (s, a) for k, (s, a, _) in seen.items()}


def _record(out: str, cands: list[Candidate], base: str) -> None:
    now = datetime.now(timezone.utc)
    group = base_group(base)
    rows = [
        {
            "repo": c.repo,
            "sha": c.sha,
            "base": c.base,
            "created": c.created,
            "tags": list(c.tags),
            "rl_evidence": c.evidence,
            "status": c.status,
            "reason": client.scrub(c.reason) if c.reason else None,
            "attempt": c.attempt,
            "group_name": group,
            "run": c.run,
            "scan_id": c.scan_id,
            "scanned_at": now,
        }
        for c in cands
    ]
    part = f"{now:%Y%m%dT%H%M%S%f}-{group}-{uuid.uuid4().hex[:8]}"
    ResultsDir(out).write_table("watch", part, pa.Table.from_pylist(rows, schema=WATCH))


def base_group(base: str) -> str:
    return discover.run_name(base)


class _Round:
    """One base's round; holds the base's state and header specs once fetched."""

    def __init__(self, cfg: WatchConfig, base: str, log: Log):
        self.cfg, self.base, self.log = cfg, base, log
        self._base_specs: dict | None = None

    def call(self, fn, what: str):
        return client.with_retries(fn, what, self.cfg.retries, self.cfg.retry_wait, self.log)

    def new_candidates(self, seen) -> list[Candidate]:
        listed = self.call(
            lambda: discover.list_finetunes(self.base, self.cfg.limit),
            f"{self.base}: list fine-tunes",
        )
        out = []
        for m in listed:
            if m.sha is None:  # a mirror that ignores expand=sha
                sha = self.call(lambda m=m: client.repo_state(m.repo).sha, f"{m.repo}: model info")
                m = discover.Listed(m.repo, sha, m.created, m.tags)
            status, attempts = seen.get((m.repo, m.sha), (None, 0))
            if status in ("scanned", "skipped") or attempts >= self.cfg.max_attempts:
                continue
            out.append(Candidate(m.repo, m.sha, m.created, m.tags, self.base, attempts + 1))
        return out

    def base_specs(self, base_sha: str) -> dict:
        if self._base_specs is None:
            self._base_specs = self.call(
                lambda: client.tensor_specs(self.base, base_sha), f"{self.base}: base headers"
            )
        return self._base_specs

    def check(self, c: Candidate, base_sha: str) -> None:
        """Decide without downloading weights: sets c.status to skipped / failed, or leaves it
        pending (worth scanning)."""
        try:
            state = self.call(lambda: client.repo_state(c.repo, c.sha), f"{c.repo}: model info")
            c.tags = tuple(dict.fromkeys(c.tags + state.tags))
            c.evidence, c.algorithm = discover.rl_evidence(c.repo, c.tags, state.card_data)
            if c.evidence is None and not self.cfg.include_non_rl:
                c.status, c.reason = "skipped", "no RL evidence (tags, card or name)"
                return
            client.refuse_pickle_only(f"hf://{c.repo}@{c.sha}", list(state.files))
            specs = self.call(lambda: client.tensor_specs(c.repo, c.sha), f"{c.repo}: headers")
            why = client.compare_specs(self.base_specs(base_sha), specs)
            if why:
                c.status, c.reason = "skipped", f"not comparable with {self.base}: {why}"
        except CheckpointError as e:
            c.status, c.reason = "skipped", client.scrub(str(e))
        except Exception as e:  # the Hub kept failing: record, go on with the others
            c.status, c.reason = "failed", client.describe(e)

    def fetch(self, c: Candidate) -> bool:
        if not self.cfg.download:
            return True  # the scan reads what it needs by range
        try:
            self.call(lambda: client.download(c.repo, c.sha), f"{c.repo}: download")
            return True
        except Exception as e:
            c.status, c.reason = "failed", f"download: {client.describe(e)}"
            return False


class BaseFailed(Exception):
    """The base itself could not be scanned; its candidates are left for the next round."""


def _scan(cfg: WatchConfig, base: str, base_sha: str, cands: list[Candidate], log: Log) -> None:
    """Scan ``cands`` against the base and decide each: scanned, or failed with its own reason
    (see the module docstring); raises BaseFailed when the base is what failed."""
    from rlvr_ray.engine.config import sweep_from_dict
    from rlvr_ray.engine.driver import run_scan

    group = base_group(base)
    opt = "?download" if cfg.download else ""
    runs = [
        {
            "name": c.run,
            "checkpoint": f"hf://{c.repo}@{c.sha}{opt}",
            **({"algorithm": c.algorithm} if c.algorithm else {}),
        }
        for c in cands
    ]
    data = {
        "groups": [{"name": group, "base": f"hf://{base}@{base_sha}{opt}", "runs": runs}],
        "params": {"geometry": cfg.geometry},
    }
    res = run_scan(
        sweep_from_dict(data, Path.cwd(), "(watch)"),
        cfg.out,
        address=cfg.address,
        workers=cfg.workers,
        num_cpus=cfg.num_cpus,
        progress=cfg.progress,
    )
    if res.interrupted:  # Ctrl-C: the watch stops (what was written is kept)
        raise KeyboardInterrupt
    failed = [f for f in res.failures if f.group == group]
    by_run = {f.run: f.message for f in failed if f.kind == failures.BAD_RUN}
    of_group = [f for f in failed if f.kind in failures.GROUP_KINDS]
    if of_group and len(by_run) < len(cands):  # not every candidate failed alone: the base did
        raise BaseFailed(client.scrub(of_group[0].message))
    units = [f for f in failed if f.kind in failures.UNIT_KINDS]
    full = any(f.kind == failures.DISK_FULL for f in failed) or res.disk_full
    scan_id = res.scan_ids[0] if res.scan_ids else None
    left = [c for c in cands if c.run not in by_run]
    for c in cands:
        if c.run in by_run:
            c.status, c.reason = "failed", client.scrub(by_run[c.run])
        elif full or res.interrupted or scan_id is None:
            c.status = "failed"
            c.reason = "results directory full" if full else "scan stopped early"
        elif not units:
            c.status, c.scan_id = "scanned", scan_id
        elif len(left) == 1:  # alone in its scan: the failed unit is its own
            c.status, c.reason = "failed", client.scrub(f"unit failed: {units[0].message}")
    if units and len(left) > 1:  # which candidate broke the unit? each alone says
        log(f"watch: {base}: {len(units)} unit(s) failed; scanning {len(left)} candidates alone")
        for c in left:
            _scan(cfg, base, base_sha, [c], log)
    log(
        f"watch: {base}: scanned {sum(c.status == 'scanned' for c in cands)} of {len(cands)} "
        f"in {res.seconds:.1f} s"
    )


def watch_base(cfg: WatchConfig, base: str, seen, report: RoundReport, log: Log) -> None:
    """One round for one base (see the module docstring)."""
    rnd = _Round(cfg, base, log)
    try:
        base_state = rnd.call(lambda: client.repo_state(base), f"{base}: model info")
        client.refuse_pickle_only(f"hf://{base}", list(base_state.files))
        cands = rnd.new_candidates(seen)
    except Exception as e:
        report.errors.append(f"base {base}: {client.describe(e)}")
        log(f"watch: base {base} not watched this round: {client.describe(e)}")
        return
    log(f"watch: {base}@{base_state.sha[:7]}: {len(cands)} new fine-tunes to check")
    for c in cands:
        rnd.check(c, base_state.sha)
    todo = [c for c in cands if c.status == "pending"]
    if cfg.dry_run:
        for c in todo:
            log(f"watch: would scan {c.repo}@{c.sha[:7]} ({c.evidence or 'no RL evidence'})")
        for c in cands:
            if c.status != "pending":
                log(f"watch: would not scan {c.repo}@{c.sha[:7]}: {c.status}: {c.reason}")
        report.would_scan += todo
        return
    try:
        todo = [c for c in todo if rnd.fetch(c)]
        if todo and cfg.download:
            rnd.call(lambda: client.download(base, base_state.sha), f"{base}: download")
        if todo:
            _scan(cfg, base, base_state.sha, todo, log)
    except BaseFailed as e:  # not the candidates' fault: they are not charged an attempt
        report.errors.append(f"base {base}@{base_state.sha[:7]}: {e}")
        log(f"watch: base {base} not scanned this round: {e}")
    except Exception as e:  # the base could not be fetched or the scan broke
        for c in todo:
            c.status, c.reason = "failed", f"base/scan: {client.describe(e)}"
    finally:
        if cfg.download and not cfg.keep:
            for c in cands:
                client.remove_download(c.repo)
            client.remove_download(base)
    cands = [c for c in cands if c.status != "pending"]  # left for the next round
    for c in cands:
        log(f"watch: {c.repo}@{c.sha[:7]}: {c.status}" + (f": {c.reason}" if c.reason else ""))
    if cands:
        _record(cfg.out, cands, base)
    report.decided += cands


def watch_once(cfg: WatchConfig, log: Log = print) -> RoundReport:
    """One round over every base; the atlas is updated when something was recorded."""
    report = RoundReport()
    results = open_results(cfg.out)
    if not cfg.dry_run:
        results.ensure()
    seen = memory(results)
    for base in cfg.bases:
        watch_base(cfg, base, seen, report, log)
    if report.decided:
        catalog.update(results)
    return report


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'30m', '6h', '1d', '1h30m', '90' (seconds) -> seconds; ValueError names the input."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        secs = float(t)
    elif re.fullmatch(r"(\d+(\.\d+)?[smhd])+", t):
        secs = sum(float(n) * _UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([smhd])", t))
    else:
        raise ValueError(f"duration {text!r}: expected e.g. 30m, 6h, 1d or 1h30m")
    if secs <= 0:
        raise ValueError(f"duration {text!r}: must be positive")
    return secs


def watch_forever(
    cfg: WatchConfig,
    every: float,
    log: Log = print,
    rounds: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run a round every ``every`` seconds (``rounds``: stop after that many; None: forever).
    A round that breaks is logged and the next one still runs. -> the last round's exit code."""
    code, n = 0, 0
    while rounds is None or n < rounds:
        t0 = time.monotonic()
        try:
            code = watch_once(cfg, log).exit_code
        except Exception as e:
            log(f"watch: round failed: {client.describe(e)}")
            code = 1
        n += 1
        if rounds is not None and n >= rounds:
            break
        wait = max(every - (time.monotonic() - t0), 0.0)
        log(f"watch: next round in {wait / 3600:.2f} h")
        sleep(wait)
    return code
