"""The self-contained HTML report: sections rendered with their figures as base64 PNGs.

    rlvr-ray report --out results/            # -> results/report.html
    rlvr-ray report --out results/ --format png --layer 13 --group qwen2-lab

``write_report`` reads only the results directory's atlas (DuckDB views), so it works on any
results directory, local or on object storage. No external resources: the file can be mailed.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import re
from pathlib import Path

from rlvr_ray.io import catalog
from rlvr_ray.io.results import ResultsDir, atomic_write, open_results
from rlvr_ray.report import figures, geometry, precision, steps
from rlvr_ray.report.data import Scope, rows, scope
from rlvr_ray.report.figures import Section, Table

SECTIONS = (
    figures.sparsity,
    precision.precision,
    figures.maps,
    steps.steps,
    figures.consistency,
    geometry.overlaps,
    geometry.spectral,
    figures.cross_family,
)

CSS = """
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
 margin:0;background:#f6f8fa}
main{max-width:1120px;margin:0 auto;padding:24px 32px 64px;background:#fff;
 box-shadow:0 0 0 1px #d0d7de}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:36px 0 4px;padding-top:12px;
 border-top:1px solid #d0d7de}
.lead{color:#57606a;margin:0 0 12px}.meta{color:#57606a;font-size:13px}
nav ol{columns:2;font-size:13px;padding-left:20px}a{color:#0969da;text-decoration:none}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0 4px}
th,td{padding:3px 10px;border-bottom:1px solid #eaeef2;text-align:left;white-space:nowrap}
th{background:#f6f8fa;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:hover{background:#f6f8fa}
.tcap,figcaption{color:#57606a;font-size:12.5px;margin:2px 0 16px}
figure{margin:12px 0 20px}figure img{max-width:100%;height:auto;display:block}
.note{background:#fff8c5;border:1px solid #d4a72c66;border-radius:6px;padding:8px 12px;
 margin:10px 0;font-size:13px}
details summary{cursor:pointer;color:#57606a;font-size:13px;margin-top:8px}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;font-size:13px}
dl.kv dt{color:#57606a}dl.kv dd{margin:0}
"""

# Marks the page once every image has decoded, so a headless browser can check the render.
CHECK_JS = """window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images',im.length);
document.body.setAttribute('data-images-decoded',ok);});"""


def _table(t: Table) -> str:
    num = t.numeric or [False] * len(t.columns)
    head = "".join(
        f"<th{' class=n' if n else ''}>{html.escape(c)}</th>"
        for c, n in zip(t.columns, num, strict=True)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=n' if n else ''}>{html.escape(v)}</td>"
            for v, n in zip(r, num, strict=True)
        )
        + "</tr>"
        for r in t.rows
    )
    cap = f'<p class="tcap">{html.escape(t.caption)}</p>' if t.caption else ""
    return f'<table id="{t.id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{cap}'


def _section(i: int, s: Section) -> str:
    parts = [
        f'<section id="{s.key}"><h2>{i}. {html.escape(s.title)}</h2>',
        f'<p class="lead">{html.escape(s.caption)}</p>',
    ]
    for note in s.notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    for img in s.images:
        b64 = base64.b64encode(img.png).decode("ascii")
        cap = f"<figcaption>{html.escape(img.caption)}</figcaption>" if img.caption else ""
        parts.append(
            f'<figure><img alt="{html.escape(img.name)}" '
            f'src="data:image/png;base64,{b64}">{cap}</figure>'
        )
    for t in s.tables:
        if t.id.startswith("paper-"):  # context, not results: folded away
            parts.append(
                f"<details><summary>Reference: the paper's figures</summary>{_table(t)}</details>"
            )
        else:
            parts.append(_table(t))
    return "\n".join(parts) + "</section>"


def _header(con, out: str, sc: Scope) -> str:
    info = rows(
        con,
        """SELECT count(DISTINCT group_name) AS groups, count(DISTINCT family) AS
                        families, count(DISTINCT group_name || '/' || run) AS runs,
                        count(*) AS tensors, count(nss) AS geometry FROM tensors
                        WHERE list_contains(?, group_name)""",
        [sc.groups],
    )[0]
    fams = ", ".join(sorted({f for f in sc.families.values() if f}))
    layers = ", ".join(f"{g}: {n}" for g, n in sc.layers.items()) or "none"
    kv = [
        ("Results", out),
        ("Groups", f"{info['groups']} ({', '.join(sc.groups)})"),
        ("Families", fams or "unknown"),
        ("Runs", str(info["runs"])),
        ("Tensor rows", f"{info['tensors']:,}"),
        ("Geometry", f"{info['geometry']:,} tensor rows" if info["geometry"] else "not computed"),
        ("Detail layer", layers),
    ]
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in kv)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<h1>rlvr-ray report</h1><p class="meta">Generated {when}. Every number below '
        f"comes from the atlas of the results directory (<code>rlvr-ray sql</code> shows "
        f'the same views).</p><dl class="kv">{dl}</dl>'
    )


def render(
    out: str | Path, *, layer: int | None = None, group: str | None = None
) -> tuple[str, list[Section]]:
    """-> (the report's HTML, its sections); ReportError when there is nothing to report."""
    results = open_results(out)
    con = catalog.connect(results)
    try:
        sc = scope(con, group, layer)
        sections = [fn(con, sc) for fn in SECTIONS]
        head = _header(con, results.uri, sc)
    finally:
        con.close()
    toc = "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a></li>' for s in sections)
    body = "\n".join(_section(i + 1, s) for i, s in enumerate(sections))
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>rlvr-ray report</title><style>{CSS}</style></head><body><main>{head}"
        f"<nav><ol>{toc}</ol></nav>{body}</main><script>{CHECK_JS}</script></body></html>"
    )
    return page, sections


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)


def write_report(
    out: str | Path,
    *,
    layer: int | None = None,
    group: str | None = None,
    fmt: str = "html",
    report: str | Path | None = None,
) -> list[str]:
    """Write the report (default OUT/report.html) and, with fmt='png', each figure as
    OUT/report/NN-name.png (next to the report); -> the paths written, report first."""
    results = open_results(out)
    page, sections = render(results, layer=layer, group=group)
    if report is None and not results.local:
        # object storage: write into the results directory through its filesystem
        return _write_remote(results, page, sections, fmt)
    path = Path(report) if report is not None else Path(results.path("report.html"))
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(path, page.encode("utf-8"))
    written = [str(path)]
    if fmt == "png":
        pdir = path.parent / path.stem
        pdir.mkdir(exist_ok=True)
        for name, data in _pngs(sections):
            _atomic(pdir / name, data)
            written.append(str(pdir / name))
    return written


def _pngs(sections: list[Section]) -> list[tuple[str, bytes]]:
    out = []
    for i, s in enumerate(sections):
        for img in s.images:
            out.append((f"{i + 1:02d}-{_slug(img.name)}.png", img.png))
    return out


def _atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _write_remote(results: ResultsDir, page: str, sections: list[Section], fmt: str) -> list[str]:
    files = [("report.html", page.encode("utf-8"))]
    if fmt == "png":
        files += [(f"report/{n}", d) for n, d in _pngs(sections)]
    written = []
    for rel, data in files:
        results.write_bytes(rel, data)
        written.append(results.path(rel))
    return written
