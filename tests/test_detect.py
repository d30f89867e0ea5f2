"""detect.py and retinanet.py: anchors, box coding, losses, orientation and scaling, the official
submission, an end-to-end run; and cohorts.py's BCS-DBT reading and splits."""
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

import cohorts
import detect
import dicom
import metrics
import model
import phantoms
import preprocess
import retinanet
import utils

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    # seed 2: four benign lesions, two of them in right-breast (rcc) volumes, which the official
    # reader rotates
    root = tmp_path_factory.mktemp("det") / "arch"
    return phantoms.write_archive(root, patients=6, seed=2, shape=(12, 128, 96))


def test_anchors_at_518_match_the_spec():
    grids = retinanet.grid_sizes(518)
    assert grids == (74, 37, 18, 9)
    anchors = retinanet.make_anchors(518, grids).double()
    assert anchors.shape == (9 * (74**2 + 37**2 + 18**2 + 9**2), 4) == (65250, 4)
    start = 0
    # independent: DBT-DINO §6.2.3's anchors, centred as its released code, written out in numpy
    for g, base in zip(grids, (16, 32, 64, 128)):
        stride = 518 / g  # 7.0, 14.0, 28.78, 57.56
        # row, column, anchor
        i, j, k = np.meshgrid(np.arange(g), np.arange(g), np.arange(9), indexing="ij")
        ratio, scale = np.array([0.5, 1, 2])[k // 3], np.array([1, 1.26, 1.587])[k % 3]
        w = np.sqrt((base * scale) ** 2 / ratio)
        h = w * ratio
        cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
        got = anchors[start:start + 9 * g * g].numpy()
        np.testing.assert_allclose((got[:, :2] + got[:, 2:]) / 2,
                                   np.stack([cx, cy], -1).reshape(-1, 2), atol=1e-3)
        np.testing.assert_allclose(got[:, 2:] - got[:, :2], np.stack([w, h], -1).reshape(-1, 2),
                                   rtol=2e-3)  # the paper rounds 2^(1/3) to 1.26
        start += 9 * g * g
    # the neck's real map sizes agree with grid_sizes (P5 floor, P6 ceil)
    det = retinanet.Detector(model.build("tiny"), 32, 0.0).eval()
    with torch.no_grad():
        x = torch.rand(1, 3, 518, 518)
        feats = det.neck(det.backbone.get_intermediate_layers(x, 1, reshape=True)[0])
    assert tuple(f.shape[-1] for f in feats) == grids


def test_box_coding_round_trip_and_torchvision():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 400
    anchors = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 100], 1)
    xy = torch.rand(200, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 2 + torch.rand(200, 2, generator=g) * 150], 1)
    coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    deltas = retinanet.encode(anchors, boxes)
    torch.testing.assert_close(deltas, coder.encode_single(boxes, anchors))
    torch.testing.assert_close(retinanet.decode(anchors, deltas), boxes, rtol=1e-5, atol=1e-3)
    wild = torch.randn(200, 4, generator=g) * 6  # beyond log(1000/16): both clamp
    torch.testing.assert_close(retinanet.decode(anchors, wild), coder.decode_single(wild, anchors))


def test_focal_at_gamma0_alpha_minus1_is_bce():
    logits, y = torch.randn(500), (torch.rand(500) > 0.8).float()
    torch.testing.assert_close(retinanet.focal_terms(logits, y, alpha=-1, gamma=0),
                               F.binary_cross_entropy_with_logits(logits, y, reduction="none"))
    smooth = y * 0.9 + 0.05  # smoothing 0.1 moves targets towards 1/2
    torch.testing.assert_close(retinanet.focal_terms(logits, y, alpha=-1, gamma=0, smoothing=0.1),
                               F.binary_cross_entropy_with_logits(logits, smooth, reduction="none"))


def test_loss_is_finite_without_boxes_and_matching_flags():
    args = detect.get_args([])
    torch.manual_seed(0)
    det = retinanet.Detector(model.build("tiny"), 32, 0.1)
    anchors = retinanet.make_anchors(112, retinanet.grid_sizes(112))
    logits, deltas = det(torch.rand(2, 3, 112, 112))
    targets = [torch.zeros(0, 4), torch.tensor([[30.0, 40.0, 52.0, 60.0]])]
    losses = retinanet.detection_loss(logits, deltas, anchors, targets, args)
    assert set(losses) == {"cls", "box", "loss"} and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in det.parameters() if p.grad is not None)
    none = retinanet.detection_loss(logits[:1], deltas[:1], anchors, targets[:1], args)
    assert none["box"] == 0 and none["cls"] > 0  # 2000 sampled negatives, no regression
    # a 40 x 2 sliver overlaps no anchor by IoU > 0.5: only the low-quality flag gives it positives
    # (torchvision)
    tiny_box = torch.tensor([[50.0, 50.0, 90.0, 52.0]])
    assert (retinanet.match(anchors, tiny_box, 0.5, 0.4) >= 0).sum() == 0
    assert (retinanet.match(anchors, tiny_box, 0.5, 0.4, low_quality=True) >= 0).sum() >= 1


@pytest.mark.parametrize("view", ["lcc", "rcc"])
def test_mapped_back_boxes_land_on_the_lesion_in_the_official_orientation(tmp_path, view):
    S, H, W = 3, 84, 70
    stored = np.zeros((S, H, W), np.uint16)
    # bright chest wall on the stored LEFT: the official reader rotates an R view 180 deg
    stored[:, :, :30] = 300
    stored[1, 10:20, 40:52] = 1000  # the lesion, on slice 1, stored rows 10-19, columns 40-51
    path = tmp_path / f"{view}.dcm"
    phantoms.write_bto(path, stored, laterality=view[0].upper(), view="CC")
    # the BCS-DBT box, in the official frame
    x, y, w, h = (40, 10, 12, 10) if view == "lcc" else (W - 52, H - 20, 12, 10)
    vol = dict(path=str(path), view=view, rows=H, cols=W, n_slices=S)
    size = 56
    img = detect.read_resized(vol, [1], size)[0, 0]  # (size, size)
    peak = (img > 0.9 * img.max()).nonzero().float().mean(0)  # lesion centre, model px (row, col)
    centre = detect.to_original(vol, torch.tensor([[peak[1], peak[0]] * 2]) + 0.5, size)[0, :2]
    assert x <= centre[0] <= x + w and y <= centre[1] <= y + h
    box = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
    torch.testing.assert_close(detect.to_original(vol, detect.to_model(vol, box, size), size), box)


def test_slices_go_through_the_backbones_clahe(tmp_path):
    """read_resized(clahe=True): each slice in the official orientation through CLAHE (scikit-
    image's, the oracle), then resized; SliceCache passes it on; a backbone whose backbone.json
    says clahe gets it by default (utils.recorded_preprocess)."""
    from skimage.exposure import equalize_adapthist
    path = phantoms.write_phantom_dicom(tmp_path / "v.dcm", (3, 84, 70), "native", seed=2)
    vol = dict(path=str(path), view="lcc", rows=84, cols=70, n_slices=3)
    raw = dicom.read_dbt(path, frames=[1], view="lcc")[0][0]
    want = F.interpolate(torch.from_numpy(np.float32(equalize_adapthist(raw, clip_limit=0.01)))
                         [None, None], size=(56, 56), mode="bilinear", antialias=True)[0, 0]
    got = detect.read_resized(vol, [1], 56, clahe=True)[0, 0]
    assert (got - want).abs().max() <= 1e-3
    assert (detect.read_resized(vol, [1], 56)[0, 0] - want).abs().max() > 0.05  # CLAHE did work
    cached = detect.SliceCache(56, clahe=True).get(vol, [1])[0, 0]
    assert (cached - got).abs().max() <= 1e-3  # fp16 storage
    (tmp_path / "backbone.pth").write_bytes(b"")
    (tmp_path / "backbone.json").write_text('{"preprocess": "clahe"}')
    assert utils.recorded_preprocess(str(tmp_path / "backbone.pth")) == "clahe"


class _LesionFinder(torch.nn.Module):
    """A stand-in detector for the single anchor [0, 0, S, S]: on a slice with pixels above 0.5 (the
    lesion; the chest wall is ~0.3) it scores 10 and regresses to their bounding box, in model
    pixels; elsewhere it scores -10."""

    def forward(self, x):  # (B, 3, S, S)
        S, logits, boxes = x.shape[-1], [], []
        for img in x[:, 0]:
            yx = (img > 0.5).nonzero()  # (n, 2) row, column
            lo, hi = (yx.amin(0), yx.amax(0) + 1) if len(yx) else (torch.zeros(2), torch.ones(2))
            boxes.append(torch.stack([lo[1], lo[0], hi[1], hi[0]]).float())
            logits.append(10.0 if len(yx) else -10.0)
        deltas = retinanet.encode(torch.tensor([[0.0, 0.0, S, S]]), torch.stack(boxes))  # (B, 4)
        return torch.tensor(logits)[:, None], deltas[:, None]  # (B, 1), (B, 1, 4)


@pytest.mark.parametrize("view", ["lcc", "rcc"])
def test_predict_volume_gives_boxes_in_original_pixels_and_official_orientation(tmp_path, view):
    S, H, W, size = 5, 84, 70, 56  # non-square: x and y scale differently to the model's 56 x 56
    stored = np.zeros((S, H, W), np.uint16)
    for z in range(S):  # chest wall on the stored left (an R view turns 180 deg), wider per slice
        stored[z, :, :20 + 4 * z] = 300
    # the lesion, on slice 3 (the second chunk of 2), stored rows 10-19, cols 40-51
    stored[3, 10:20, 40:52] = 1000
    path = tmp_path / f"{view}.dcm"
    phantoms.write_bto(path, stored, laterality=view[0].upper(), view="CC")
    # the BCS-DBT box, in the official frame
    x, y, w, h = (40, 10, 12, 10) if view == "lcc" else (W - 52, H - 20, 12, 10)
    vol = dict(path=str(path), view=view, rows=H, cols=W, n_slices=S)
    args = detect.get_args([])
    args.image_size, args.chunk = size, 2
    cache = detect.SliceCache(size)
    dets = detect.predict_volume(_LesionFinder(), torch.tensor([[0.0, 0.0, size, size]]), vol, args,
                                 torch.device("cpu"), cache)
    assert dets["slices"].tolist() == [3]
    # one model pixel is 1.25 x 1.5 original pixels; unmapped or x/y-swapped boxes are off by 3-8 px
    truth = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
    torch.testing.assert_close(dets["boxes"], truth, atol=1.2, rtol=0)
    # rounded as the cache rounds
    central = detect.read_resized(vol, [S // 2], size)[0, 0].half().float()
    assert np.array_equal(dets["mask"], preprocess.tissue_mask(central.numpy()))
    assert not cache.store  # inference slices are not kept (tens of GB on BCS-DBT)


def test_flips_and_zoom_move_the_image_and_its_boxes_together():
    S = 112
    img = torch.zeros(1, S, S)
    box = torch.tensor([[20.0, 30.0, 44.0, 44.0]])  # 24 x 14: zoomable at 112 px
    img[:, 30:44, 20:44] = 1.0

    def bright_box(im):  # the bounding box of the pixels above 0.5, xyxy
        yx = (im[0] > 0.5).nonzero()
        return torch.cat([yx.amin(0).flip(0), yx.amax(0).flip(0) + 1]).float()
    seen = []
    for seed in range(24):
        out, b = detect.augment(img, box, np.random.default_rng(seed))
        assert out.shape == img.shape and len(b) == 1
        # noise may move an edge pixel
        torch.testing.assert_close(bright_box(out), b[0], atol=1.5, rtol=0)
        seen.append(b[0])
    seen = torch.stack(seen)
    assert (seen[:, 0] > S / 2).any() and (seen[:, 1] > S / 2).any()  # both flips happened
    assert ((seen[:, 2] - seen[:, 0] - 24).abs() > 2).any()  # and zooms
    for f in (0.8, 1.4):  # a pad and a crop, at random offsets
        out, b = detect.zoom(img, box, f, np.random.default_rng(0))
        torch.testing.assert_close(bright_box(out), b[0], atol=1.0, rtol=0)
        torch.testing.assert_close(b[0, 2:] - b[0, :2], (box[0, 2:] - box[0, :2]) * f,
                                   atol=1.0, rtol=0)


def test_classic_path_is_used_when_the_descriptive_file_is_missing(archive, tmp_path):
    # the archive's tree under another name, the descriptive paths pointing nowhere
    root = tmp_path / "classic"
    root.mkdir()
    (root / "tcia").symlink_to(archive / "Breast-Cancer-Screening-DBT")
    with open(archive / "file-paths.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        rest = r["descriptive_path"].split("/", 1)[1]
        r.update(descriptive_path="missing/" + rest, classic_path="tcia/" + rest)
    with open(root / "file-paths.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for name in ("labels", "boxes"):
        (root / f"{name}.csv").write_text((archive / f"{name}.csv").read_text())
    volumes, skipped = cohorts.load_volumes(root)
    assert skipped == 0 and len(volumes) == len(rows)
    assert all("/tcia/" in v["path"] for v in volumes)


def test_submission_from_ground_truth_scores_one(archive):
    volumes, skipped = cohorts.load_volumes(archive)
    assert skipped == 0 and any(v["view"] == "rcc" and v["boxes"] for v in volumes)
    rows = []
    # per-slice "detections" on the GT boxes, on slices z-1..z+2 peaking at z, grouped in 3-D
    for v in volumes:
        sl, bx, sc = [], [], []
        for b in v["boxes"]:
            for z in range(max(0, b[4] - 1), min(v["n_slices"], b[4] + 3)):
                sl.append(z)
                bx.append(b[:4])
                sc.append(0.9 - 0.1 * abs(z - b[4]))
        dets = dict(slices=torch.tensor(sl, dtype=torch.long),
                    boxes=torch.tensor(bx).reshape(-1, 4), scores=torch.tensor(sc))
        cands = detect.aggregate(dets, v, 0.5, 0.6)
        assert len(cands) == len(v["boxes"])
        truth = {(b["X"], b["Y"], b["Width"], b["Height"]) for b in v["raw_boxes"]}
        for r, c in zip(detect.submission_rows(v, cands), cands):
            # Z the first slice, Depth the span
            assert r["Z"] == c["z0"] and r["Z"] + r["Depth"] / 2 == (c["z0"] + c["z1"]) / 2
            # each row is a ground-truth box, column for column: at 128 x 96 the 100 px radius
            # covers most of the image, so the evaluator alone would not notice X and Y (or Width
            # and Height) swapped
            assert (r["X"], r["Y"], r["Width"], r["Height"]) in truth
        rows += detect.submission_rows(v, cands)
    result = metrics.dbtex_evaluate(archive / "labels.csv", archive / "boxes.csv", rows)
    assert result["mean_sensitivity_positive"] == 1.0 and result["sensitivity_at_2_fps_all"] == 1.0
    # 150 px off: beyond the 100 px radius of these boxes
    shifted = [dict(r, X=r["X"] + 150) for r in rows]
    assert metrics.dbtex_evaluate(archive / "labels.csv", archive / "boxes.csv", shifted)[
        "mean_sensitivity_positive"] == 0.0


def test_end_to_end_run_and_bad_input(archive, tmp_path):
    # the archive's CSVs plus a labels/file-paths row whose file is missing
    broken = tmp_path / "broken"
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
    flags = ["--data", str(broken), "--out", str(out), "--steps", "2", "--eval-every", "2",
             "--batch-size", "2", "--image-size", "112", "--channels", "32", "--n-boot", "20",
             "--baseline-draws", "2", "--device", "cpu", "--backbone", ""]
    result = detect.main(detect.get_args(flags))
    assert json.loads((out / "metrics.json").read_text())["volumes"] == result["volumes"]
    assert json.loads((out / "args.json").read_text())["skipped_volumes"] == 1
    with open(out / "predictions.csv") as f:
        header = "PatientID,StudyUID,View,X,Width,Y,Height,Z,Depth,Score".split(",")
        assert next(csv.reader(f)) == header
    official = {"sensitivity_at_2_fps_all", "mean_sensitivity_positive",
                *(f"sensitivity_at_{k}_fps_positive" for k in (1, 2, 3, 4))}
    assert (out / "froc.png").exists() and (out / "curves.png").exists()
    assert set(result["official"]) == official
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(math.isfinite(float(r["loss"])) for r in map(json.loads, (
        out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train")
    with pytest.raises(ValueError, match="already holds a run"):
        detect.main(detect.get_args(flags))
    cmd = [sys.executable, str(ROOT / "detect.py"), "--data", str(tmp_path / "nowhere"),
           "--out", str(tmp_path / "x")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
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
        xyxy = [[b[1], b[2], b[1] + b[3], b[2] + b[4]] for b in boxes]
        return dict(slices=torch.tensor([b[0] for b in boxes]),
                    scores=torch.tensor([b[5] for b in boxes]),
                    boxes=torch.tensor(xyxy, dtype=torch.float32))
    one_slice = dets((5, 10, 10, 40, 40, 0.9))
    assert detect.aggregate(one_slice, vol, 0.5, 0.6) == []
    assert len(detect.aggregate(one_slice, vol, 0.5, 0.6, min_slices=1)) == 1
    # w 200 <= 206, h 100 <= 182: kept
    wide = dets((5, 10, 10, 200, 100, 0.9), (6, 10, 10, 200, 100, 0.8))
    tall = dets((5, 10, 10, 100, 190, 0.9), (6, 10, 10, 100, 190, 0.8))  # h 190 > 182: dropped
    assert len(detect.aggregate(wide, vol, 0.5, 0.6)) == 1
    assert detect.aggregate(tall, vol, 0.5, 0.6) == []
    # 7 slices apart > 24 / 4: two groups
    far = dets((5, 10, 10, 40, 40, 0.9), (12, 10, 10, 40, 40, 0.8))
    assert len(detect.aggregate(far, vol, 0.5, 0.6, min_slices=1)) == 2
    many = dets(*[(z, 60 * i, 10, 40, 40, 0.9 - 0.01 * i) for i in range(8) for z in (3, 4)])
    c = detect.aggregate(many, vol, 0.5, 0.6, max_keep=3)
    assert [round(x["score"], 2) for x in c] == [0.9, 0.89, 0.88]
    assert detect.aggregate(many, vol, 0.95, 0.6) == []
    # validate() relies on this prefix
    assert c == detect.aggregate(many, vol, 0.5, 0.6, max_keep=8)[:3]
    at_s = dets((5, 10, 10, 40, 40, 0.75))  # score >= s is kept
    assert len(detect.aggregate(at_s, vol, 0.75, 0.6, min_slices=1)) == 1
    # a 40 x 40 box inside the best one (intersection over the smaller 1) joins it; a box
    # overlapping it by 30 x 100 (intersection over the smaller 0.3 < 0.6) starts its own group
    nested = dets((5, 10, 10, 100, 100, 0.9), (6, 30, 30, 40, 40, 0.8), (7, 80, 10, 100, 100, 0.7))
    c = detect.aggregate(nested, vol, 0.5, 0.6, min_slices=1)
    assert [(x["box"], x["z0"], x["z1"], x["median"], round(x["score"], 6)) for x in c] == [
        ([10, 10, 110, 110], 5, 6, 5, 0.85), ([80, 10, 180, 110], 7, 7, 7, 0.7)]


def test_resume_auto_continues_exactly(archive, tmp_path, monkeypatch):
    def flags(out):
        return detect.get_args([
            "--data", str(archive), "--out", str(out), "--steps", "4", "--eval-every", "2",
            "--log-every", "1", "--batch-size", "2", "--image-size", "112", "--channels", "32",
            "--n-boot", "10", "--baseline-draws", "1", "--device", "cpu", "--resume", "auto"])
    whole = detect.main(flags(tmp_path / "whole"))
    save = utils.save_checkpoint

    def crash_after_first_save(path, state):
        save(path, state)
        raise KeyboardInterrupt  # preempted right after the step-2 checkpoint

    monkeypatch.setattr(utils, "save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        detect.main(flags(tmp_path / "cut"))
    monkeypatch.setattr(utils, "save_checkpoint", save)
    resumed = detect.main(flags(tmp_path / "cut"))
    logs = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("whole", "cut")]
    losses = [[r["loss"] for r in map(json.loads, log) if r["split"] == "train"] for log in logs]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert resumed["official"] == whole["official"]


def test_early_stop_epochs_no_test_split_warning_and_resume_checks(archive, tmp_path, monkeypatch):
    """Early stopping at step 2 of 6: epochs and time per epoch come from the steps run. No test
    split: the score is the validation split's, with a warning. --resume auto refuses, in one line
    and leaving args.json alone, other run flags and a file lacking keys; flags such as --n-boot may
    change."""
    flat = (dict(s=0.5, t=0.6, max_keep=8, min_slices=1), 0.0)
    # never better than the first evaluation
    monkeypatch.setattr(detect, "validate", lambda *a: flat)
    out = tmp_path / "run"
    flags = ["--data", str(archive), "--out", str(out), "--steps", "6", "--eval-every", "1",
             "--patience", "1", "--batch-size", "2", "--image-size", "112", "--channels", "32",
             "--n-boot", "10", "--baseline-draws", "1", "--device", "cpu", "--backbone", "random",
             "--test-fraction", "0", "--resume", "auto"]
    result = detect.main(detect.get_args(flags))
    split = cohorts.split_volumes(cohorts.load_volumes(archive)[0], 0.2, 0.0, 0)
    # 2 steps x 2 slices / annotated slices
    epochs = 2 * 2 / len(detect.training_slices(split["train"])[0])
    assert result["best_step"] == 1 and result["epochs"] == pytest.approx(epochs)
    assert result["s_per_epoch"] == pytest.approx(result["train_s"] / epochs)
    assert result["split"] == "val" and "optimistic" in result["warning"]
    before = (out / "args.json").read_text()
    with pytest.raises(ValueError, match="does not fit the flags: --channels 32 in the checkpoint, "
                                         "64 now; --seed 0 in the checkpoint, 1 now$") as e:
        detect.main(detect.get_args(flags + ["--seed", "1", "--channels", "64"]))
    assert "\n" not in str(e.value) and (out / "args.json").read_text() == before
    # already stopped: evaluates only
    again = detect.main(detect.get_args(flags + ["--n-boot", "5"]))
    assert again["epochs"] == pytest.approx(epochs) and again["s_per_epoch"] is None
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["heads"]["head.cls.bias"] = torch.zeros(3)  # 9 anchors: a hand-edited file whose flags fit
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(ValueError, match="heads do not fit the model .*head.cls.bias") as e:
        detect.main(detect.get_args(flags))
    assert "\n" not in str(e.value)
    del ckpt["heads"]
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(ValueError, match=r"not a detect.py ckpt.pt \(it lacks \['heads'\]\)") as e:
        detect.main(detect.get_args(flags))
    assert "\n" not in str(e.value)


def test_backbone_is_the_newest_run_or_random_on_request(saved_run):
    """No --backbone takes the newest runs/*/backbone.pth; --backbone random an untrained ViT
    (seeded) even then."""
    vit, line = detect.load_backbone(detect.get_args([]))
    assert "runs/b/backbone.pth" in line and torch.equal(vit.pos_embed, saved_run.pos_embed)
    vit, line = detect.load_backbone(detect.get_args(["--backbone", "random", "--seed", "3"]))
    torch.manual_seed(3)
    assert "RANDOM" in line and "--backbone random" in line
    assert torch.equal(vit.pos_embed, model.build("tiny").pos_embed)


def test_compile_flag_compiles_the_frozen_backbone_with_the_same_features(torch_compile):
    """detect.py --compile: the backbone's blocks run compiled (model.compile_blocks, tested in
    test_model) and its features equal the eager backbone's (same seed, same weights) to 1e-5 at
    the detector's input size."""
    eager, _ = detect.load_backbone(detect.get_args(["--backbone", "random"]))
    comp, _ = detect.load_backbone(detect.get_args(["--backbone", "random", "--compile"]))
    assert eager.blocks[0].forward.__func__ is model.Block.forward
    assert comp.blocks[0].forward.__func__ is not model.Block.forward
    x = torch.rand(2, 3, 112, 84, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = eager.eval().forward_features(x), comp.eval().forward_features(x)
    assert (a["x_norm_patchtokens"] - b["x_norm_patchtokens"]).abs().max() < 1e-5


def test_an_unreadable_csv_is_one_line_naming_it(tmp_path):
    # a "Unicode text" export
    (tmp_path / "labels.csv").write_bytes("PatientID,StudyUID,View\n".encode("utf-16"))
    with pytest.raises(ValueError, match="labels.csv: not a readable CSV"):
        cohorts._rows(tmp_path / "labels.csv", ("PatientID",))


def test_split_volumes_keeps_patients_whole_and_lesions_in_validation():
    """Without a split in the CSVs: whole patients (their views never straddle train and test),
    seeded, and the patients with boxes spread over the splits, so validation is never left
    without a lesion."""
    volumes = [dict(patient=f"P{p:02d}", split="",
                    boxes=[[1, 2, 3, 4, 5]] if p % 8 == 0 and v == 0 else [], view=view)
               for p in range(40) for v, view in enumerate(("lcc", "rcc", "lmlo", "rmlo"))]
    # 5 patients with a lesion: unstratified, 4 of these 10 seeds left validation with none
    for seed in range(10):
        split = cohorts.split_volumes(volumes, 0.2, 0.2, seed)
        owners = {s: {v["patient"] for v in vols} for s, vols in split.items()}
        assert not (owners["train"] & owners["val"] or owners["train"] & owners["test"]
                    or owners["val"] & owners["test"])
        assert [len(owners[s]) for s in ("train", "val", "test")] == [24, 8, 8]
        lesions = [sum(bool(v["boxes"]) for v in split[s]) for s in ("train", "val", "test")]
        assert lesions == [3, 1, 1]
    assert split == cohorts.split_volumes(volumes, 0.2, 0.2, 9)
    assert split != cohorts.split_volumes(volumes, 0.2, 0.2, 4)
