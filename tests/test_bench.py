"""bench.py: the FLOP count behind every TFLOP/s figure (against torch's own counter), and a smoke
test of `bench.py all --quick` whose tables must hold numbers that can be checked independently."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import data
import model
import utils
from conftest import inproc

BENCH = Path(__file__).resolve().parents[1] / "bench.py"


@pytest.mark.parametrize("name,H,W", [("tiny", 112, 112), ("tiny", 70, 126),
                                      ("vits14_reg", 56, 84)])
def test_vit_flops_match_torch_flop_counter(name, H, W):
    """torch.utils.flop_counter counts every matmul of a real forward (the math SDPA path makes
    attention two bmm's it can see): the analytic count must be exactly that, registers and
    non-square grids included."""
    vit = model.build(name).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        vit.forward_features(torch.rand(1, 3, H, W))
    assert model.vit_flops(vit, H, W) == counter.get_total_flops()


def test_bad_flag_is_one_line():
    run = inproc("bench.py", "backbone", "--size", "100")
    assert run.returncode == 2 and "--size" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_bench_quick_produces_the_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("DBT_DINO_CACHE", str(tmp_path / "dbt-cache"))
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(BENCH), "all", "--quick", "--device", "cpu",
                          "--cache", str(tmp_path / "cache"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["bench"] for r in rows} == {"backbone", "precision", "embed", "pretrain", "losses",
                                          "read", "sample_path", "clahe", "detect",
                                          "embed_loader"}
    paths = [(r["recipe"], r["impl"], r["encoding"].split()[0], r["clahe"], r["mip_margin"])
             for r in rows if r["bench"] == "sample_path"]
    margin = data.MultiCrop.MIP_MARGIN
    assert paths == [("dbt-dino", "pyramid", "Explicit", False, margin),
                     ("dbt-dino", "direct", "Explicit", False, None),
                     ("dbt-dino", "pyramid", "JPEG", False, margin),
                     ("dbt-dino", "pyramid", "Explicit", False, 1.0),
                     ("dbt-dino", "pyramid", "JPEG", False, 1.0),
                     ("mammodino", "pyramid", "Explicit", False, margin),
                     ("mammodino", "pyramid", "Explicit", True, margin)]
    clahe = [r for r in rows if r["bench"] == "clahe"]
    assert len(clahe) == 1 and clahe[0]["shape"] == [512, 384] and clahe[0]["ms"] > 0
    assert clahe[0]["read_and_clahe_ms"] > 0
    loader = [r for r in rows if r["bench"] == "embed_loader"]
    assert [r["impl"] for r in loader] == ["mapped", "decoded"]
    assert all(r["volumes"] == 1 and r["slices_per_s_per_core"] > r["with_consumer_copy"] > 0
               for r in loader)
    losses = [r for r in rows if r["bench"] == "losses"]
    assert [r["impl"] for r in losses] == ["eager"]
    assert losses[0]["ms"] > 0 and losses[0]["loss_diff"] == 0
    detect = [r for r in rows if r["bench"] == "detect"]
    assert len(detect) == 1 and detect[0]["slices"] == 8 and detect[0]["slices_per_s"] > 0
    for header in ("slices_per_s", "vs_timm", "cos_patch_min", "data_wait_share", "images_per_s",
                   "mem_ratio", "samples_per_s_per_core", "slices_per_s_per_core"):
        assert header in run.stdout  # each table printed its figure
    backbone = {r["impl"]: r for r in rows if r["bench"] == "backbone"}
    assert backbone["timm"]["vs_timm"] == 1.0 and backbone["ours"]["max_abs_diff"] == 0.0
    # same weights, fp32
    assert backbone["ours"]["vs_timm"] > 0 and backbone["dinov2"]["max_abs_diff"] < 1e-4
    precision = {r["precision"]: r for r in rows if r["bench"] == "precision"}
    assert precision["fp32"]["cos_cls_min"] > 0.99999 and precision["fp32"]["acc_change"] == 0
    for prec in ("autocast", "bf16-weights"):  # bf16 moves tokens by ~1e-5 in cosine: visibly
        assert 0.99 < precision[prec]["cos_patch_min"] < 0.99999
        assert 0.99 < precision[prec]["cos_cls_min"] < 0.99999
    assert precision["fp32"]["images"] == 4 * 8  # 4 views of each of the 8 phantom patients
    embed = [r for r in rows if r["bench"] == "embed"]
    assert {r["impl"] for r in embed} == {"loader-only", "ours"}
    assert all(r["slices"] == 2 * 8 for r in embed)  # 2 reads of one 8-slice volume, none skipped
    assert all(0 <= r.get("data_wait_share", 0) <= 1 and r["slices_per_s"] > 0 for r in embed)


def test_goals_take_the_best_row_of_ours_and_say_what_is_missing():
    """Issue 14's goals table: the best of our rows (never timm's), the row that gave it, met or
    not, and None where the run has no such row (a batch that did not fit)."""
    rows = [dict(bench="backbone", arch="vitb14", size=518, impl="ours", precision="autocast",
                 slices_per_s=1050.0, vs_timm=1.07),
            dict(bench="backbone", arch="vitb14", size=518, impl="ours+compile",
                 precision="bf16-weights", slices_per_s=1510.0, vs_timm=1.25),
            dict(bench="backbone", arch="vitb14", size=518, impl="timm", precision="bf16-weights",
                 slices_per_s=1600.0, vs_timm=1.0),  # faster, but not ours
            dict(bench="backbone", arch="vits14", size=518, impl="ours", precision="autocast",
                 slices_per_s=3000.0),
            dict(bench="pretrain", preset="dbt-dino", grad_checkpoint=False, batch=32,
                 images_per_s=92.2),
            dict(bench="pretrain", preset="dbt-dino", grad_checkpoint=True, batch=128,
                 note="out of memory"),
            dict(bench="pretrain", preset="dbt-dino", grad_checkpoint=True, batch=96,
                 images_per_s=100.0)]
    got = {r["goal"]: r for r in bench.goals(rows)}
    assert list(got) == list(bench.GOALS)
    embed, plain, ckpt, ratio = got.values()
    want = (1510.0, "ours+compile bf16-weights", True)
    assert (embed["measured"], embed["by"], embed["met"]) == want
    assert (plain["measured"], plain["by"], plain["met"]) == (92.2, "batch 32", False)
    assert (ckpt["measured"], ckpt["by"], ckpt["met"]) == (100.0, "batch 96", True)  # exactly: met
    assert all(r["measured"] is None and r["met"] is None for r in bench.goals([]))
    assert (ratio["measured"], ratio["met"]) == (1.25, True) and ratio["target"] == 1.2


def test_one_thread_restores_the_callers_count_even_after_an_error():
    """Per-core figures run on one thread; the caller's count comes back, whatever it was."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with utils.one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), utils.one_thread():
            raise KeyError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
