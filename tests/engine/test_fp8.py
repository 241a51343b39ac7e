"""FP8 checkpoints (DeepSeek-V3/R1 layout: F8_E4M3 weights with per-128x128-block F32
``weight_scale_inv``; F8_E5M2 alike) compared in their own format, against numpy hand counts on
the uint8 patterns and numpy float64 on the dequantized values; and the identical-run warning,
which counts only the tensors that were compared."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rlvr_ray.engine.config import Params
from rlvr_ray.engine.driver import _identical_runs
from rlvr_ray.io import catalog
from rlvr_ray.io.schema import ULP_BIN_EDGES

from .test_worker import np_gini, read_mode, scan  # noqa: F401  (read_mode: both read paths)

#: FP8 format -> (torch dtype, exponent bits, mantissa bits, exponent bias, smallest NaN/Inf
#: magnitude)
FORMATS = {
    "F8_E4M3": (torch.float8_e4m3fn, 4, 3, 7, 0x7F),
    "F8_E5M2": (torch.float8_e5m2, 5, 2, 15, 0x7C),
}
CONFIG = {
    "model_type": "deepseek_v3",
    "num_hidden_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}
P = "model.layers.0."
#: weight -> (format, shape): whole blocks, ragged edge blocks, a per-expert weight, E5M2
WEIGHTS = {
    P + "mlp.experts.0.gate_proj.weight": ("F8_E4M3", (256, 384)),
    P + "mlp.experts.1.down_proj.weight": ("F8_E4M3", (200, 300)),
    P + "mlp.shared_experts.up_proj.weight": ("F8_E5M2", (130, 256)),
}


def decode(patterns: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 FP8 patterns -> float64 values, by the format's definition (no torch)."""
    _, ebits, mbits, bias, _ = FORMATS[fmt]
    p = patterns.astype(np.int64)
    sign = np.where(p & 0x80, -1.0, 1.0)
    exp = (p >> mbits) & ((1 << ebits) - 1)
    man = (p & ((1 << mbits) - 1)) / (1 << mbits)
    normal = np.ldexp(1.0 + man, exp - bias)
    subnormal = np.ldexp(man, 1 - bias)
    return sign * np.where(exp > 0, normal, subnormal)


def key(patterns: np.ndarray) -> np.ndarray:
    """Order-preserving integer of an FP8 pattern: +-magnitude (counts representable values)."""
    p = patterns.astype(np.int64)
    return np.where(p & 0x80, -(p & 0x7F), p & 0x7F)


def from_key(k: np.ndarray) -> np.ndarray:
    return np.where(k < 0, 0x80 | -k, k).astype(np.uint8)


def expand(scale: np.ndarray, shape) -> np.ndarray:
    """A per-128x128-block scale [ceil(r/128), ceil(c/128)] -> one per element [r, c]."""
    return np.kron(scale, np.ones((128, 128)))[: shape[0], : shape[1]]


def planted(rng, p0: np.ndarray, fmt: str, share: float) -> np.ndarray:
    """A copy of patterns ``p0`` with ``share`` of them moved by 1-40 FP8 steps (either way,
    across zero too, never onto NaN) and every +0 turned to -0 (which is no change)."""
    top = FORMATS[fmt][4] - 1
    k = key(p0)
    moved = rng.random(p0.shape) < share
    step = rng.choice([1, 1, 1, 2, 3, 5, 9, 40], size=p0.shape) * rng.choice([-1, 1], size=p0.shape)
    k1 = np.where(moved, np.clip(k + step, -top, top), k)
    p1 = from_key(k1)
    return np.where(p0 == 0, 0x80, p1).astype(np.uint8)


def write(path, tensors: dict, config=CONFIG):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def fp8_family(tmp_path_factory):
    """A base and two runs of a DeepSeek-V3-style FP8 layer, written with torch float8 tensors;
    run ``rl`` moves weights by planted FP8 steps and doubles one scale block of the first
    weight; run ``same`` is a bitwise copy of the base."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("fp8")
    base, runs = {}, {"rl": {}, "same": {}}
    for name, (fmt, shape) in WEIGHTS.items():
        top = FORMATS[fmt][4] - 1
        k0 = rng.integers(-top, top + 1, size=shape)
        k0[rng.random(shape) < 0.05] = 0  # zeros, whose sign flips are no change
        p0 = from_key(k0)
        s0 = rng.uniform(1e-4, 1e-2, size=(-(-shape[0] // 128), -(-shape[1] // 128)))
        s0 = s0.astype(np.float32)
        p1, s1 = planted(rng, p0, fmt, 0.3), s0.copy()
        if name.endswith("gate_proj.weight"):
            s1[1, 2] *= 2  # a requantized block: values change where patterns may not
        base[name], runs["rl"][name], runs["same"][name] = p0, p1, p0
        base[name + "_scale_inv"], runs["rl"][name + "_scale_inv"] = s0, s1
        runs["same"][name + "_scale_inv"] = s0
    norm = rng.standard_normal(256).astype(np.float32)
    paths = {}
    for run, arrays in [("base", base), *runs.items()]:
        tensors = {}
        for name, a in arrays.items():
            t = torch.from_numpy(np.ascontiguousarray(a))
            fmt = WEIGHTS.get(name, (None,))[0]
            tensors[name] = t.view(FORMATS[fmt][0]) if fmt else t
        tensors[P + "input_layernorm.weight"] = torch.from_numpy(norm).to(torch.bfloat16)
        paths[run] = write(root / run, tensors)
    return paths, base, runs


def test_fp8_compared_in_its_own_format(fp8_family, tmp_path):
    paths, base, runs = fp8_family
    con, _, plan = scan(tmp_path, paths["base"], {"rl": paths["rl"], "same": paths["same"]})
    rows = con.execute(
        "SELECT run, tensor, role, status, dtype_base, dtype_run, rounded_to_bf16, numel, "
        "n_changed, ulp_hist, ulp1_share, ulp_max, rel_frob, max_abs_update, stripe_row, "
        "stripe_col, expert, message FROM tensors"
    ).fetchall()
    assert len(rows) == 2 * (2 * len(WEIGHTS) + 1)  # every tensor of both runs has a row
    assert all(r[3] == "ok" for r in rows), [r for r in rows if r[3] != "ok"]
    edges = [*ULP_BIN_EDGES, 1 << 30]
    seen = 0
    for (
        run,
        tensor,
        role,
        _,
        dt0,
        dt1,
        rounded,
        numel,
        n_changed,
        hist,
        ulp1,
        ulp_max,
        rel,
        max_abs,
        s_row,
        s_col,
        expert,
        message,
    ) in rows:
        if tensor not in WEIGHTS:
            want = "norm" if tensor.endswith("layernorm.weight") else "scale"
            assert role == want and dt0 == dt1 == ("BF16" if want == "norm" else "F32")
            continue
        seen += 1
        fmt, shape = WEIGHTS[tensor]
        p0, p1 = base[tensor], runs[run][tensor]
        assert (dt0, dt1, rounded, numel, message) == (fmt, fmt, False, p0.size, None)
        assert role == tensor.split(".")[-2].removesuffix("_proj")
        assert expert == (int(tensor.split(".")[5]) if ".experts." in tensor else None)
        mask = (p0 != p1) & (((p0 | p1) & 0x7F) != 0)
        steps = np.abs(key(p1) - key(p0))[mask]
        assert n_changed == int(mask.sum()) and (n_changed > 0) == (run == "rl")
        assert hist == [int(((steps >= a) & (steps < b)).sum()) for a, b in zip(edges, edges[1:])]
        if run == "same":
            assert ulp1 is None and ulp_max == 0 and rel == 0 and max_abs == 0
            continue
        assert ulp1 == pytest.approx((steps == 1).mean(), rel=1e-12)
        assert ulp_max == steps.max()
        assert s_row == pytest.approx(np_gini(mask.mean(1)), rel=1e-9)
        assert s_col == pytest.approx(np_gini(mask.mean(0)), rel=1e-9)
        s0 = base[tensor + "_scale_inv"].astype(np.float64)
        s1 = runs[run][tensor + "_scale_inv"].astype(np.float64)
        w0 = decode(p0, fmt) * expand(s0, shape)
        w1 = decode(p1, fmt) * expand(s1, shape)
        d = w1 - w0
        assert rel == pytest.approx(np.sqrt((d**2).sum() / (w0**2).sum()), rel=1e-12)
        assert max_abs == np.abs(d).max()
    assert seen == 2 * len(WEIGHTS)
    # the doubled scale block changed that one scale (its own role, not the weight's rows)
    ((n,),) = con.execute(
        f"SELECT n_changed FROM tensors WHERE run = 'rl' AND tensor = "
        f"'{P}mlp.experts.0.gate_proj.weight_scale_inv'"
    ).fetchall()
    assert n == 1
    # profiles of the FP8 masks, as numpy has them
    name = P + "mlp.experts.1.down_proj.weight"
    p0, p1 = base[name], runs["rl"][name]
    mask = (p0 != p1) & (((p0 | p1) & 0x7F) != 0)
    got = con.execute(
        f"SELECT ratio FROM profiles WHERE run = 'rl' AND tensor = '{name}' AND axis = 'row' "
        "ORDER BY idx"
    ).fetchall()
    np.testing.assert_allclose([r[0] for r in got], mask.mean(1).astype(np.float32))
    # the run that changed no pattern and no scale is the one called identical, and only it
    catalog.refresh(str(tmp_path / "out"))
    n_rows = 2 * len(WEIGHTS) + 1
    assert _identical_runs(str(tmp_path / "out"), [plan.scan_id]) == [
        f"group g: run same is bitwise identical to its base in all {n_rows} compared tensors"
    ]


def test_fp8_blocks_taken_from_the_shapes_are_128_where_128_tiles(fp8_family, tmp_path):
    """A checkpoint whose config.json gives no weight_block_size: the blocks are the usual 128
    where 128 tiles the scales' shape ([2, 3] scales of a [200, 300] weight: 100 x 100 tiles
    it too, and gave other values), and the values equal numpy's with 128 x 128 blocks. The
    scale tensors get no geometry: they are the weights' bookkeeping, not layers."""
    paths, base, runs = fp8_family
    config = {k: v for k, v in CONFIG.items() if k != "quantization_config"}
    copies = {}
    for run in ("base", "rl"):
        copies[run] = tmp_path / run
        copies[run].mkdir()
        (copies[run] / "config.json").write_text(json.dumps(config))
        (copies[run] / "model.safetensors").symlink_to(paths[run] / "model.safetensors")
    con, _, _ = scan(tmp_path, copies["base"], {"rl": copies["rl"]}, Params(geometry=True))
    rows = {
        t: (rel, max_abs, geo)
        for t, rel, max_abs, geo in con.execute(
            "SELECT tensor, rel_frob, max_abs_update, geometry_status FROM tensors"
        ).fetchall()
    }
    for tensor, (fmt, shape) in WEIGHTS.items():
        p0, p1 = base[tensor], runs["rl"][tensor]
        w0 = decode(p0, fmt) * expand(base[tensor + "_scale_inv"].astype(np.float64), shape)
        w1 = decode(p1, fmt) * expand(runs["rl"][tensor + "_scale_inv"].astype(np.float64), shape)
        d = w1 - w0
        rel, max_abs, geo = rows[tensor]
        assert rel == pytest.approx(np.sqrt((d**2).sum() / (w0**2).sum()), rel=1e-12), tensor
        assert (max_abs, geo) == (np.abs(d).max(), "skipped_fp8")
        assert rows[tensor + "_scale_inv"][2] == "skipped_scale"
    assert WEIGHTS[P + "mlp.experts.1.down_proj.weight"][1] == (200, 300)


def test_fp8_block_size_from_the_shapes():
    from rlvr_ray.engine.fp8 import block_size

    # 128 where it tiles; else a power of two that does; else the smallest size that does
    assert [block_size(n, k) for n, k in [(200, 2), (300, 3), (320, 3), (7168, 56)]] == [128] * 4
    assert [block_size(n, k) for n, k in [(40, 3), (20, 2), (24, 2)]] == [16, 16, 16]
    assert block_size(30, 4) == 8 and block_size(100, 9) == 12  # 12 alone tiles it
    for n, k in [(40, 3), (100, 7), (100, 9), (300, 3), (7168, 56), (5, 5)]:
        assert -(-n // block_size(n, k)) == k


def test_fp8_value_statistics_without_scales_and_with_mismatched_dtypes(tmp_path):
    """No scale tensor: the FP8 values are the weights. A run storing the weight in bf16 is a
    dtype mismatch, not a comparison of unrelated bit patterns."""
    rng = np.random.default_rng(3)
    name = P + "mlp.experts.2.up_proj.weight"
    k0 = rng.integers(-0x7E, 0x7F, size=(64, 96))
    p0 = from_key(k0)
    p1 = planted(rng, p0, "F8_E4M3", 0.5)
    as_fp8 = lambda p: torch.from_numpy(p).view(torch.float8_e4m3fn)  # noqa: E731
    cfg = {"model_type": "deepseek_v3"}
    base = write(tmp_path / "base", {name: as_fp8(p0)}, cfg)
    rl = write(tmp_path / "rl", {name: as_fp8(p1)}, cfg)
    bf16 = write(tmp_path / "bf16", {name: as_fp8(p1).to(torch.bfloat16)}, cfg)
    con, _, _ = scan(tmp_path, base, {"rl": rl, "bf16": bf16}, Params(geometry=True))
    rows = dict(
        (r[0], r[1:])
        for r in con.execute(
            "SELECT run, status, rel_frob, max_abs_update, geometry_status, message FROM tensors"
        ).fetchall()
    )
    d = decode(p1, "F8_E4M3") - decode(p0, "F8_E4M3")
    w0 = decode(p0, "F8_E4M3")
    status, rel, max_abs, geo, _ = rows["rl"]
    assert (status, geo) == ("ok", "skipped_fp8")
    assert rel == pytest.approx(np.sqrt((d**2).sum() / (w0**2).sum()), rel=1e-12)
    assert max_abs == np.abs(d).max()
    assert rows["bf16"][0] == "dtype_mismatch"
    assert rows["bf16"][4] == f"checkpoint {bf16}, tensor {name}: dtype BF16 vs base F8_E4M3"


def test_fp8_nan_is_an_error_for_that_tensor(tmp_path):
    name, other = P + "mlp.experts.0.up_proj.weight", P + "mlp.experts.0.down_proj.weight"
    rng = np.random.default_rng(5)
    p0 = from_key(rng.integers(-0x7E, 0x7F, size=(32, 48)))
    p1 = p0.copy()
    p1[3, 4] = 0xFF  # an E4M3 NaN
    as_fp8 = lambda p: torch.from_numpy(p).view(torch.float8_e4m3fn)  # noqa: E731
    base = write(tmp_path / "base", {name: as_fp8(p0), other: as_fp8(p0.copy())})
    run = write(tmp_path / "run", {name: as_fp8(p1), other: as_fp8(p0.copy())})
    con, _, _ = scan(tmp_path, base, {"rl": run})
    got = dict(con.execute("SELECT tensor, status FROM tensors").fetchall())
    assert got == {name: "nonfinite", other: "ok"}
    ((msg,),) = con.execute(f"SELECT message FROM tensors WHERE tensor = '{name}'").fetchall()
    assert msg == f"checkpoint {run}, tensor {name}: 1 NaN/Inf values"


def test_identical_warning_counts_only_compared_tensors(tmp_path):
    """Tensors that were not compared (here: integer dtypes) prove nothing: the warning says
    how many were compared, and a run with none compared is said to be so."""
    ints = {
        f"{P}mlp.experts.{i}.gate_proj.weight": torch.arange(12, dtype=torch.int8).reshape(3, 4)
        for i in range(2)
    }
    f32 = {P + "input_layernorm.weight": torch.linspace(-1, 1, 8)}
    base = write(tmp_path / "base", ints | f32)
    same = write(tmp_path / "same", ints | f32)
    only_ints = write(tmp_path / "only_ints", ints)
    base2 = write(tmp_path / "base2", ints)
    con, _, plan = scan(tmp_path, base, {"same": same})
    con, _, plan2 = scan(tmp_path, base2, {"only_ints": only_ints})
    out = str(tmp_path / "out")
    catalog.refresh(out)
    assert _identical_runs(out, [plan.scan_id, plan2.scan_id]) == [
        "group g: run only_ints: no tensor compared (0 of 2 tensors)",
        "group g: run same is bitwise identical to its base in all 1 compared tensors "
        "(2 of 3 not compared)",
    ]
