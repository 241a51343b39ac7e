"""The progress line: tensors, GB, GB/s and ETA; off a terminal, a line every 10 s."""

import io
from types import SimpleNamespace

from rlvr_ray.cli import scan_line
from rlvr_ray.engine.progress import Progress, size_text


def test_log_mode_prints_counts_rate_and_eta():
    out = io.StringIO()
    p = Progress(10, 2_000_000_000, mode="log", every=0, stream=out)
    p.update(5, 1_000_000_000)
    line = out.getvalue().strip()
    # no ETA before a second report: the time up to the first is start-up, not throughput
    assert line.startswith("tensors 5/10  1.00/2.00 GB  ") and line.endswith("GB/s  ETA ?")
    p.first = (p.first[0] - 10.0, p.first[1])  # the first report came 10 s ago
    p.update(2, 500_000_000)  # 0.5 GB in those 10 s: 0.5 GB left at 0.05 GB/s
    assert out.getvalue().splitlines()[-1].endswith("ETA 0m10s")


def test_small_scans_count_in_the_unit_that_reads():
    out = io.StringIO()
    p = Progress(4, 3_500_000, mode="log", every=0, stream=out)
    p.update(1, 1_250_000)
    assert out.getvalue().startswith("tensors 1/4  1.25/3.50 MB  ")
    assert [size_text(n) for n in (512, 2_048, 12_500_000, 3.02e9)] == [
        "512 B",
        "2.05 kB",
        "12.50 MB",
        "3.02 GB",
    ]


def test_a_scan_with_everything_done_says_so():
    res = SimpleNamespace(n_units=3, n_units_resumed=3, n_tensors=27, out="results/")
    assert scan_line(res) == (
        "nothing new to scan: all 3 units (27 tensors) were already done (--force redoes them) "
        "-> results/"
    )
    res = SimpleNamespace(
        n_units=3,
        n_units_resumed=1,
        n_tensors=27,
        out="r",
        n_bytes=4_200_000,
        unit_seconds=2.0,
        seconds=9.04,
        executor="local",
    )
    assert scan_line(res) == (
        "scanned 27 tensors in 3 units (1 already done), 4.20 MB read in 2.0 s of units "
        "in-process (2.10 MB/s), 9.0 s in all -> r"
    )
    res.executor = "ray"
    assert "2.0 s of units on Ray (2.10 MB/s)" in scan_line(res)


def test_off_a_terminal_a_line_every_10_s_and_a_short_scan_says_nothing():
    out = io.StringIO()  # isatty() is False
    p = Progress(3, 300, stream=out)
    assert (p.mode, p.every) == ("log", 10.0)
    p.update(1, 100)
    p.update(2, 200)  # the end, within 10 s of the start: no line at all
    p.close()
    assert out.getvalue() == ""
    p = Progress(3, 300, stream=out)
    p.update(1, 100)
    assert out.getvalue() == ""
    p.last -= 10.0  # 10 s on
    p.update(1, 100)
    p.update(1, 100)  # the end: its line follows the one printed
    p.close()
    lines = out.getvalue().splitlines()
    assert [x.split("  ")[0] for x in lines] == ["tensors 2/3", "tensors 3/3"]
    # asked for (--progress log): the last line of a short scan too
    out = io.StringIO()
    p = Progress(3, 300, mode="log", stream=out)
    p.update(1, 100)
    p.update(2, 200)
    assert [x.split("  ")[0] for x in out.getvalue().splitlines()] == ["tensors 3/3"]
