"""The main job's machinery on tiny sizes: every Pointformer case checks
dynkernels against its reference before timing, and the report carries peak
memory and the per-stage breakdown. (Timings live in benchmarks/.)"""

from __future__ import annotations

import torch

from dynkernels.bench import pointformer_cases as pc
from dynkernels.bench import pointops_neighbors_cases as pnc
from dynkernels.bench.base import Case
from dynkernels.bench.runner import format_markdown, format_table, peak_bytes, run_cases


def test_pointformer_case_setups_check_and_run():
    impls = pnc.knn_setup(1, 600, 20, 4, "cpu")
    assert [i.name for i in impls][:2] == ["dynkernels", "reference"]
    assert all(i.agrees is not False for i in impls)
    for setup in (
        lambda: pc.attention_setup(16, 2, 9, 8, "cpu", backward=True),
        lambda: pnc.interpolate_setup(1, 4, 30, 50, "cpu"),
        lambda: pc.refinement_setup(1, 12, 8, "cpu"),
    ):
        for impl in setup():
            assert impl.fn() is not None


def test_backbone_check_refuses_a_wrong_path():
    config = dict(
        pc.CONFIGS["sunrgbd"],
        npoint=(64, 32, 16, 8),
        nsample=(8, 8, 8, 8),
        d_model=(16, 16, 32, 32),
        out_channels=(16, 32, 32, 32),
        fp_channels=((16, 16), (16, 16)),
    )
    kernel, ref = pc.backbone_pair(config, "cpu")
    points = pc.scene_points(1, 500, "cpu")
    pc.check_backbones(kernel, ref, points)  # equal paths pass
    with torch.no_grad():
        ref.feature_conv.weight.add_(1.0)
    try:
        pc.check_backbones(kernel, ref, points)
    except AssertionError:
        pass
    else:
        raise AssertionError("a backbone whose outputs differ must not be timed")
    stages = pc.stage_times(kernel.eval(), points)
    assert {"sampling", "grouping", "local_attention", "global_attention", "feature_propagation"} <= set(stages)


def test_peak_bytes_sees_temporaries():
    def make():
        a = torch.empty(1 << 20)  # 4 MiB, freed before the 8 MiB one
        del a
        return torch.empty(2 << 20)

    assert 8 << 20 <= peak_bytes(make, "cpu") < 12 << 20


def test_report_shows_peak_and_stages():
    case = Case(
        "pointformer",
        "three_interpolate",
        "tiny",
        lambda: pnc.interpolate_setup(1, 4, 30, 50, "cpu"),
        {},
        ("dynkernels", "reference"),
    )
    rows = run_cases([case], "cpu")
    rows[0]["peak_mb"], rows[0]["stages_s"] = 1.5, {"sampling": 0.002, "grouping": 0.001}
    table, markdown = format_table(rows), format_markdown(rows)
    assert "stages (ms): sampling 2, grouping 1" in table and "Per-stage forward time" in markdown
    assert rows[1]["dynkernels_speedup"] > 0


def test_floor_column_and_size_tiers():
    from dynkernels.bench.base import SIZE_TIERS
    from dynkernels.bench.cases import FAMILIES, cases_for
    from dynkernels.bench.runner import floor_seconds, machine_rates

    rates = {"copy_bytes_per_s": 10e9, "gemm_flops_per_s": 100e9}
    bound_by_bytes = Case("f", "op", "s", lambda: [], floor_bytes=2e9, floor_flops=1e9)
    bound_by_flops = Case("f", "op", "s", lambda: [], floor_bytes=1e6, floor_flops=5e11)
    assert floor_seconds(bound_by_bytes, rates) == 0.2 and floor_seconds(bound_by_flops, rates) == 5.0
    assert floor_seconds(Case("f", "op", "s", lambda: []), rates) is None  # no model, no floor
    measured = machine_rates("cpu")
    assert measured["copy_bytes_per_s"] > 1e8 and measured["gemm_flops_per_s"] > 1e8
    case = Case(
        "pointops",
        "three_interpolate",
        "tiny",
        lambda: pnc.interpolate_setup(1, 4, 30, 50, "cpu"),
        {},
        ("dynkernels", "reference"),
        floor_bytes=1e3,
    )
    rows = run_cases([case], "cpu", measured)
    assert 0 < rows[0]["of_floor"] and "of floor" in format_table(rows)
    # every family has cases in every tier; the default leaves out the 10 GB ImageNet N=256 ISDA case
    for size in SIZE_TIERS:
        names = {c.family for c in cases_for(None, None, size, "cpu")}
        assert names == set(FAMILIES), size
    assert not any("N=256" in c.size for c in cases_for(["isda"], None, "default", "cpu"))
    assert any("N=256" in c.size for c in cases_for(["isda"], None, "full", "cpu"))
