"""The progress line: tensors, GB, GB/s and ETA; quiet off a terminal."""

import io

from rlvr_ray.engine.progress import Progress


def test_log_mode_prints_counts_rate_and_eta():
    out = io.StringIO()
    p = Progress(10, 2_000_000_000, mode="log", every=0, stream=out)
    p.update(5, 1_000_000_000)
    line = out.getvalue().strip()
    assert line.startswith("tensors 5/10  1.00/2.00 GB  ") and "GB/s  ETA " in line


def test_quiet_when_not_a_terminal():
    out = io.StringIO()  # isatty() is False
    p = Progress(3, 300, stream=out)
    p.update(3, 300)
    p.close()
    assert p.mode == "quiet" and out.getvalue() == ""
