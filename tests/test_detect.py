"""detect.py: anchors, box coding, losses, orientation and scaling, the official submission, an end-to-end run."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder

import data
import detect
import metrics
import model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    # seed 2: four benign lesions, two of them in right-breast (rcc) volumes, which the official reader rotates
    return data.write_archive(tmp_path_factory.mktemp("det") / "arch", patients=6, seed=2, shape=(12, 128, 96))


def test_anchors_at_518_match_the_spec():
    grids = detect.grid_sizes(518)
    assert grids == (74, 37, 18, 9)
    anchors = detect.make_anchors(518, grids).double()
    assert anchors.shape == (9 * (74**2 + 37**2 + 18**2 + 9**2), 4) == (65250, 4)
    start = 0
    for g, base in zip(grids, (16, 32, 64, 128)):  # independent: spec downstream.md §4, written out in numpy
        stride = 518 / g  # 7.0, 14.0, 28.78, 57.56
        i, j, k = np.meshgrid(np.arange(g), np.arange(g), np.arange(9), indexing="ij")  # row, column, anchor
        ratio, scale = np.array([0.5, 1, 2])[k // 3], np.array([1, 1.26, 1.587])[k % 3]
        w = np.sqrt((base * scale) ** 2 / ratio)
        h = w * ratio
        cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
        got = anchors[start:start + 9 * g * g].numpy()
        np.testing.assert_allclose((got[:, :2] + got[:, 2:]) / 2, np.stack([cx, cy], -1).reshape(-1, 2), atol=1e-3)
        np.testing.assert_allclose(got[:, 2:] - got[:, :2], np.stack([w, h], -1).reshape(-1, 2),
                                   rtol=2e-3)  # the spec rounds 2^(1/3) to 1.26
        start += 9 * g * g
    # the neck's real map sizes agree with grid_sizes (P5 floor, P6 ceil)
    det = detect.Detector(model.build("tiny"), 32, 0.0).eval()
    with torch.no_grad():
        feats = det.neck(det.backbone.get_intermediate_layers(torch.rand(1, 3, 518, 518), 1, reshape=True)[0])
    assert tuple(f.shape[-1] for f in feats) == grids


def test_box_coding_round_trip_and_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 400
    anchors = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 100], 1)
    xy = torch.rand(200, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 2 + torch.rand(200, 2, generator=g) * 150], 1)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    deltas = detect.encode(anchors, boxes)
    torch.testing.assert_close(deltas, coder.encode_single(boxes, anchors))
    torch.testing.assert_close(detect.decode(anchors, deltas), boxes, rtol=1e-5, atol=1e-3)
    wild = torch.randn(200, 4, generator=g) * 6  # beyond log(1000/16): both clamp
    torch.testing.assert_close(detect.decode(anchors, wild), coder.decode_single(wild, anchors))


def test_focal_at_gamma0_alpha_minus1_is_bce():
    logits, y = torch.randn(500), (torch.rand(500) > 0.8).float()
    torch.testing.assert_close(detect.focal_terms(logits, y, alpha=-1, gamma=0),
                               F.binary_cross_entropy_with_logits(logits, y, reduction="none"))
    smooth = y * 0.9 + 0.05  # smoothing 0.1 moves targets towards 1/2
    torch.testing.assert_close(detect.focal_terms(logits, y, alpha=-1, gamma=0, smoothing=0.1),
                               F.binary_cross_entropy_with_logits(logits, smooth, reduction="none"))


def test_loss_is_finite_without_boxes_and_matching_flags():
    args = detect.get_args([])
    torch.manual_seed(0)
    det = detect.Detector(model.build("tiny"), 32, 0.1)
    anchors = detect.make_anchors(112, detect.grid_sizes(112))
    logits, deltas = det(torch.rand(2, 3, 112, 112))
    targets = [torch.zeros(0, 4), torch.tensor([[30.0, 40.0, 52.0, 60.0]])]
    losses = detect.detection_loss(logits, deltas, anchors, targets, args)
    assert set(losses) == {"cls", "box", "loss"} and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in det.parameters() if p.grad is not None)
    none = detect.detection_loss(logits[:1], deltas[:1], anchors, targets[:1], args)
    assert none["box"] == 0 and none["cls"] > 0  # 2000 sampled negatives, no regression
    # a 40 x 2 sliver overlaps no anchor by IoU > 0.5: only the low-quality flag gives it positives (torchvision)
    tiny_box = torch.tensor([[50.0, 50.0, 90.0, 52.0]])
    assert (detect.match(anchors, tiny_box, 0.5, 0.4) >= 0).sum() == 0
    assert (detect.match(anchors, tiny_box, 0.5, 0.4, low_quality=True) >= 0).sum() >= 1


@pytest.mark.parametrize("view", ["lcc", "rcc"])
def test_mapped_back_boxes_land_on_the_lesion_in_the_official_orientation(tmp_path, view):
    S, H, W = 3, 84, 70
    stored = np.zeros((S, H, W), np.uint16)
    stored[:, :, :30] = 300  # bright chest wall on the stored LEFT: the official reader rotates an R view 180 deg
    stored[1, 10:20, 40:52] = 1000  # the lesion, on slice 1, stored rows 10-19, columns 40-51
    path = tmp_path / f"{view}.dcm"
    data.write_bto(path, stored, laterality=view[0].upper(), view="CC")
    x, y, w, h = (40, 10, 12, 10) if view == "lcc" else (W - 52, H - 20, 12, 10)  # BCS-DBT box, official frame
    vol = dict(path=str(path), view=view, rows=H, cols=W, n_slices=S)
    size = 56
    img = detect.read_resized(vol, [1], size)[0, 0]  # (size, size)
    peak = (img > 0.9 * img.max()).nonzero().float().mean(0)  # lesion centre in model pixels (row, col)
    centre = detect.to_original(vol, torch.tensor([[peak[1], peak[0]] * 2]) + 0.5, size)[0, :2]
    assert x <= centre[0] <= x + w and y <= centre[1] <= y + h
    box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
    torch.testing.assert_close(detect.to_original(vol, detect.to_model(vol, box, size), size), box)


def test_submission_from_ground_truth_scores_one(archive):
    volumes, skipped = detect.load_volumes(archive)
    assert skipped == 0 and any(v["view"] == "rcc" and v["boxes"] for v in volumes)
    rows = []
    for v in volumes:  # per-slice "detections" on the GT boxes, on slices z-1..z+2 peaking at z, grouped in 3-D
        sl, bx, sc = [], [], []
        for b in v["boxes"]:
            for z in range(max(0, b[4] - 1), min(v["n_slices"], b[4] + 3)):
                sl.append(z)
                bx.append(b[:4])
                sc.append(0.9 - 0.1 * abs(z - b[4]))
        dets = dict(slices=torch.tensor(sl, dtype=torch.long), boxes=torch.tensor(bx).reshape(-1, 4),
                    scores=torch.tensor(sc))
        cands = detect.aggregate(dets, v, 0.5, 0.6)
        assert len(cands) == len(v["boxes"])
        for r, c in zip(detect.submission_rows(v, cands), cands):
            assert r["Z"] == c["z0"] and r["Z"] + r["Depth"] / 2 == (c["z0"] + c["z1"]) / 2  # Z first, Depth span
        rows += detect.submission_rows(v, cands)
    result = metrics.dbtex_evaluate(archive / "labels.csv", archive / "boxes.csv", rows)
    assert result["mean_sensitivity_positive"] == 1.0 and result["sensitivity_at_2_fps_all"] == 1.0
    shifted = [dict(r, X=r["X"] + 150) for r in rows]  # 150 px off: beyond the 100 px radius of these boxes
    assert metrics.dbtex_evaluate(archive / "labels.csv", archive / "boxes.csv", shifted)[
        "mean_sensitivity_positive"] == 0.0


def test_end_to_end_run_and_bad_input(archive, tmp_path):
    broken = tmp_path / "broken"  # the archive's CSVs plus a labels/file-paths row whose file is missing
    broken.mkdir()
    for name in ("file-paths", "labels", "boxes"):
        text = (archive / f"{name}.csv").read_text()
        if name != "boxes":
            first = text.splitlines()[1].split(",")
            first[1] = "1.2.3.missing"
            first[3:] = ["Breast-Cancer-Screening-DBT/missing/1-1.dcm"] * len(first[3:])
            text += ",".join(first) + "\n"
        (broken / f"{name}.csv").write_text(text)
    (broken / "Breast-Cancer-Screening-DBT").symlink_to(archive / "Breast-Cancer-Screening-DBT")
    out = tmp_path / "run"
    flags = ["--data", str(broken), "--out", str(out), "--steps", "2", "--eval-every", "2", "--batch-size", "2",
             "--image-size", "112", "--channels", "32", "--n-boot", "20", "--baseline-draws", "2", "--device", "cpu",
             "--backbone", ""]
    result = detect.main(detect.get_args(flags))
    assert json.loads((out / "metrics.json").read_text())["volumes"] == result["volumes"]
    assert json.loads((out / "args.json").read_text())["skipped_volumes"] == 1
    with open(out / "predictions.csv") as f:
        assert next(csv.reader(f)) == "PatientID,StudyUID,View,X,Width,Y,Height,Z,Depth,Score".split(",")
    official = {"sensitivity_at_2_fps_all", "mean_sensitivity_positive",
                *(f"sensitivity_at_{k}_fps_positive" for k in (1, 2, 3, 4))}
    assert (out / "froc.png").exists() and (out / "curves.png").exists() and set(result["official"]) == official
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(math.isfinite(float(r["loss"])) for r in map(json.loads, (
        out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train")
    with pytest.raises(ValueError, match="already holds a run"):
        detect.main(detect.get_args(flags))
    run = subprocess.run([sys.executable, str(ROOT / "detect.py"), "--data", str(tmp_path / "nowhere"), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and run.stderr.strip().count("\n") == 0 and "nowhere" in run.stderr

def test_bad_flags_are_one_line_naming_the_flag(capsys):
    for flags, name in ((["--bg-iou", "0.7"], "--bg-iou"), (["--channels", "48"], "--channels"),
                        (["--image-size", "100"], "--image-size"), (["--steps", "0"], "--steps")):
        with pytest.raises(SystemExit) as e:
            detect.get_args(flags)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and name in err and "\n" not in err


def test_grouping_slices_size_filter_and_cap():
    vol = dict(rows=518, cols=518, n_slices=24)  # 518 px: DBT-DINO's size limits apply unscaled

    def dets(*boxes):  # (slice, x0, y0, w, h, score)
        return dict(slices=torch.tensor([b[0] for b in boxes]), scores=torch.tensor([b[5] for b in boxes]),
                    boxes=torch.tensor([[b[1], b[2], b[1] + b[3], b[2] + b[4]] for b in boxes], dtype=torch.float32))
    one_slice = dets((5, 10, 10, 40, 40, 0.9))
    assert detect.aggregate(one_slice, vol, 0.5, 0.6) == [] and len(detect.aggregate(one_slice, vol, 0.5, 0.6,
                                                                                      min_slices=1)) == 1
    wide = dets((5, 10, 10, 200, 100, 0.9), (6, 10, 10, 200, 100, 0.8))  # w 200 <= 206, h 100 <= 182: kept
    tall = dets((5, 10, 10, 100, 190, 0.9), (6, 10, 10, 100, 190, 0.8))  # h 190 > 182: dropped
    assert len(detect.aggregate(wide, vol, 0.5, 0.6)) == 1 and detect.aggregate(tall, vol, 0.5, 0.6) == []
    far = dets((5, 10, 10, 40, 40, 0.9), (12, 10, 10, 40, 40, 0.8))  # 7 slices apart > 24 / 4: two groups
    assert len(detect.aggregate(far, vol, 0.5, 0.6, min_slices=1)) == 2
    many = dets(*[(z, 60 * i, 10, 40, 40, 0.9 - 0.01 * i) for i in range(8) for z in (3, 4)])
    c = detect.aggregate(many, vol, 0.5, 0.6, max_keep=3)
    assert [round(x["score"], 2) for x in c] == [0.9, 0.89, 0.88] and detect.aggregate(many, vol, 0.95, 0.6) == []
    assert c == detect.aggregate(many, vol, 0.5, 0.6, max_keep=8)[:3]  # validate() relies on this prefix
    assert len(detect.aggregate(dets((5, 10, 10, 40, 40, 0.75)), vol, 0.75, 0.6, min_slices=1)) == 1  # score >= s
    # a 40 x 40 box inside the best one (intersection over the smaller 1) joins it; a box overlapping it by
    # 30 x 100 (intersection over the smaller 0.3 < 0.6) starts its own group
    nested = dets((5, 10, 10, 100, 100, 0.9), (6, 30, 30, 40, 40, 0.8), (7, 80, 10, 100, 100, 0.7))
    c = detect.aggregate(nested, vol, 0.5, 0.6, min_slices=1)
    assert [(x["box"], x["z0"], x["z1"], x["median"], round(x["score"], 6)) for x in c] == [
        ([10, 10, 110, 110], 5, 6, 5, 0.85), ([80, 10, 180, 110], 7, 7, 7, 0.7)]


def test_resume_auto_continues_exactly(archive, tmp_path, monkeypatch):
    def flags(out):
        return detect.get_args(["--data", str(archive), "--out", str(out), "--steps", "4", "--eval-every", "2",
                                "--log-every", "1", "--batch-size", "2", "--image-size", "112", "--channels", "32",
                                "--n-boot", "10", "--baseline-draws", "1", "--device", "cpu", "--resume", "auto"])
    whole = detect.main(flags(tmp_path / "whole"))
    save = model.save_checkpoint

    def crash_after_first_save(path, state):
        save(path, state)
        raise KeyboardInterrupt  # preempted right after the step-2 checkpoint

    monkeypatch.setattr(model, "save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        detect.main(flags(tmp_path / "cut"))
    monkeypatch.setattr(model, "save_checkpoint", save)
    resumed = detect.main(flags(tmp_path / "cut"))
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "train"] for run in ("whole", "cut")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert resumed["official"] == whole["official"]


def test_backbone_is_the_newest_run_or_random_on_request(saved_run):
    """No --backbone takes the newest runs/*/backbone.pth; --backbone random an untrained ViT (seeded) even then."""
    vit, line = detect.load_backbone(detect.get_args([]))
    assert "runs/b/backbone.pth" in line and torch.equal(vit.pos_embed, saved_run.pos_embed)
    vit, line = detect.load_backbone(detect.get_args(["--backbone", "random", "--seed", "3"]))
    torch.manual_seed(3)
    assert "RANDOM" in line and "--backbone random" in line
    assert torch.equal(vit.pos_embed, model.build("tiny").pos_embed)


def test_compile_flag_compiles_the_frozen_backbone_with_the_same_features(torch_compile):
    """detect.py --compile: the backbone's blocks run compiled (model.compile_blocks, tested in test_model) and its
    features equal the eager backbone's (same seed, same weights) to 1e-5 at the detector's input size."""
    eager, _ = detect.load_backbone(detect.get_args(["--backbone", "random"]))
    comp, _ = detect.load_backbone(detect.get_args(["--backbone", "random", "--compile"]))
    assert eager.blocks[0].forward.__func__ is model.Block.forward
    assert comp.blocks[0].forward.__func__ is not model.Block.forward
    x = torch.rand(2, 3, 112, 84, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = eager.eval().forward_features(x), comp.eval().forward_features(x)
    assert (a["x_norm_patchtokens"] - b["x_norm_patchtokens"]).abs().max() < 1e-5
