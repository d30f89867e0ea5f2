"""Lesion detection on DBT: a RetinaNet on a frozen ViT, 3-D candidates, the official DBTex score.

    python detect.py      # 24 phantom patients (768 x 576), tiny ViT, CPU, ~4-6 min
    python detect.py --data /bcs-dbt --backbone dbt_dino.pth --model vitb14 --amp --compile  # GPU
    python detect.py --data /bcs-dbt --backbone dbt_dino.pth --model vitb14 --trials 20 --out runs/s
    python detect.py --out runs/det --resume auto   # continue an interrupted run exactly

Official DBTex rules (metrics.dbtex_evaluate): a predicted box hits a ground-truth box when its
centre is within max(GT diagonal / 2, 100 px) of the GT centre, in original pixels, and its centre
slice Z + Depth/2 within VolumeSlices/4 of the GT's slice; the ranking figure is the mean
sensitivity at 1, 2, 3 and 4 false positives per volume, over the volumes with boxes. DBT-DINO
used its own rules (518-px coordinates, a 24-px minimum radius, Z = median slice with Depth 1,
positive volumes only), not comparable with the leaderboard: reported here labelled NOT official.

3-D candidates (aggregate; DBT-DINO §2.4, §6.2.3): retinanet.py's per-slice boxes scoring at least
s, best first, each gather the free boxes within VolumeSlices/4 slices whose intersection over the
smaller box is at least t; a group on min_slices slices or more becomes the union box, scored by
the mean of its top 10 scores, if it fits DBT-DINO's size limits; the best are kept until their
cumulative softmax reaches 0.95 or max_keep are kept. Validation chooses s, t, max_keep, min_slices.

--data: a BCS-DBT folder in the public layout (CSVs + DICOM tree; cohorts.py reads it, phantoms.py
writes one). In --out: args.json, metrics.jsonl, ckpt.pt, predictions.csv (the submission: X,
Width, Y, Height, Z = first slice, Depth = span), metrics.json, froc.png, examples.png, curves.png.
Shapes: B images, G ground-truth boxes, S model image side, n slices or detections.
"""
import argparse
import copy
import itertools
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL import ImageDraw
from torchvision.ops import box_iou
from torchvision.ops import clip_boxes_to_image

import cohorts
import dicom
import metrics
import model
import phantoms
import preprocess
import retinanet
import utils

SIZE_LIMITS = (15, 206, 9, 182)  # DBT-DINO's box w in [15, 206], h in [9, 182] px at 518 px
SEARCH_SPACE = {  # DBT-DINO §6.2.3 (Optuna there): flag -> (kind, low, high | choices)
    "lr": ("log", 1e-5, 1e-2), "weight_decay": ("log", 1e-6, 1e-3),
    "label_smoothing": ("uniform", 0.0, 0.1), "dropout": ("choice", (0.0, 0.05, 0.1, 0.15)),
    "cls_weight": ("log", 0.1, 10.0), "alpha": ("uniform", 0.25, 0.95),
    "gamma": ("uniform", 0.5, 2.0), "fg_iou": ("uniform", 0.4, 0.6),
    "bg_iou": ("uniform", 0.2, 0.5), "neg_ratio": ("int", 1, 5), "nms_iou": ("uniform", 0.03, 0.3)}


def get_args(argv=None):
    p = utils.one_line_errors(argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    count, whole = utils.number(int, 1), utils.number(int, 0)
    fraction, rate = utils.number(float, 0, 1), utils.number(float, 0, lo_open=True)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="BCS-DBT folder (CSVs + DICOM tree) or "
                   "'synthetic' (phantoms.py's, under $DBT_DINO_CACHE, sized by --synthetic-*)")
    g.add_argument("--synthetic-patients", type=count, default=24, help="phantoms (4 views each)")
    g.add_argument("--synthetic-size", type=count, nargs=3, default=[16, 768, 576],
                   metavar=("S", "H", "W"), help="realistic sizes: the 100 px radius stays small")
    g.add_argument("--synthetic-lesions", type=utils.number(float, 0, 10), default=2.0,
                   help="mean extra masses per phantom view (phantoms.write_archive's lesion_rate)")
    g.add_argument("--synthetic-seed", type=whole, default=1, help="phantom archive seed")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=time.strftime("runs/detect-%Y%m%d-%H%M%S"), help="run folder")
    g.add_argument("--resume", default="", choices=["", "auto"], help="auto: resume <out>/ckpt.pt")
    g.add_argument("--overwrite", action="store_true", help="start afresh if --out holds a run")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="", help="frozen ViT weights for model.load_pretrained "
                   "(hub, DBT-DINO, ours); random: an untrained ViT; empty: the newest "
                   "runs/*/backbone.pth, else random")
    archs = sorted(model.PRESETS) + [k + "_reg" for k in model.PRESETS if k != "tiny"]
    g.add_argument("--model", default="tiny", choices=archs, help="architecture of --backbone")
    utils.add_preprocess_flag(g)
    g.add_argument("--image-size", type=whole, default=0, help="slice side in px, a multiple of "
                   "14; 0: 518 (DBT-DINO) for hub ViTs, 336 for tiny on a CPU (why: main())")
    g.add_argument("--channels", type=whole, default=0, help="neck/head width, a multiple of 32; "
                   "0: 256 (DBT-DINO) for hub ViTs, 64 for tiny on a CPU")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the frozen ViT's blocks "
                   "(model.compile_blocks; the same features to 1e-5)")
    g = p.add_argument_group("split and schedule")
    g.add_argument("--seed", type=utils.number(int, 0, utils.SEED_MAX), default=0,
                   help="split, sampling, augmentation seed")
    g.add_argument("--val-fraction", type=fraction, default=0.2,
                   help="patients for validation (no official split)")
    g.add_argument("--test-fraction", type=fraction, default=0.25, help="held-out test patients")
    g.add_argument("--steps", type=count, default=400, help="training iterations (epochs logged)")
    g.add_argument("--batch-size", type=count, default=8, help="slices per step")
    g.add_argument("--lr", type=rate, default=8e-3, help="AdamW LR per 64 images (linear scaling)")
    g.add_argument("--weight-decay", type=utils.number(float, 0), default=1e-4, help="for AdamW")
    g = p.add_argument_group("regularisation, losses, sampling")
    g.add_argument("--dropout", type=utils.number(float, 0, 0.9), default=0.05,
                   help="dropout in the head towers")
    g.add_argument("--alpha", type=utils.number(float, -1, 1), default=0.9,
                   help="focal alpha (-1: no weighting)")
    g.add_argument("--gamma", type=utils.number(float, 0), default=1.5, help="focal gamma")
    g.add_argument("--label-smoothing", type=fraction, default=0.05, help="targets y(1-e) + e/2")
    g.add_argument("--pos-weight", type=rate, default=2.0, help="focal weight of positive anchors")
    g.add_argument("--cls-weight", type=rate, default=1.0, help="total = this x focal + smooth-L1")
    g.add_argument("--fg-iou", type=fraction, default=0.5, help="anchor positive if IoU > this")
    g.add_argument("--bg-iou", type=fraction, default=0.4, help="anchor negative if IoU < this")
    g.add_argument("--low-quality-matches", action="store_true",
                   help="each box keeps its best anchors (torchvision)")
    g.add_argument("--neg-ratio", type=count, default=3, help="negatives sampled per positive")
    g.add_argument("--negatives", type=fraction, default=0.25, help="fraction of each batch from "
                   "slices of box-free volumes (DBT-DINO: 0)")
    g = p.add_argument_group("inference and 3-D candidates (grids: tried on validation)")
    g.add_argument("--nms-iou", type=fraction, default=0.2, help="NMS IoU over a slice's levels")
    g.add_argument("--score-thresh", type=fraction, default=0.05, help="per-slice boxes kept above")
    g.add_argument("--score-grid", type=fraction, nargs="+", help="3-D grouping score thresholds "
                   "(DBT-DINO: 0.75 0.85 0.95)", default=[0.1, 0.2, 0.3, 0.5, 0.75, 0.85, 0.95])
    g.add_argument("--overlap-grid", type=fraction, nargs="+", default=[0.6, 0.7, 0.8],
                   help="intersection-over-smaller thresholds")
    g.add_argument("--max-candidates", type=count, nargs="+", default=[2, 4, 8],
                   help="most 3-D candidates kept per volume (DBT-DINO: 8)")
    g.add_argument("--min-slices", type=count, nargs="+", default=[1, 2], help="slices a 3-D "
                   "group needs (DBT-DINO: 2; calcifications show on 1-2)")
    g.add_argument("--chunk", type=count, default=16, help="slices per forward pass")
    g = p.add_argument_group("validation, evaluation, search")
    g.add_argument("--eval-every", type=count, default=100, help="validate every N steps")
    g.add_argument("--patience", type=count, default=10, help="evals without gain before stopping")
    g.add_argument("--log-every", type=count, default=10, help="log + metrics.jsonl every N steps")
    g.add_argument("--n-boot", type=count, default=1000, help="patient resamples for the CI")
    g.add_argument("--baseline-draws", type=count, default=20, help="random-box baselines averaged")
    g.add_argument("--trials", type=whole, default=0, help="seeded random search over SEARCH_SPACE "
                   "(each trial a run in <out>/trial-k); 0: one run, these flags")
    args = p.parse_args(argv)
    if args.bg_iou > args.fg_iou:
        p.error(f"argument --bg-iou: {args.bg_iou} is above --fg-iou {args.fg_iou}")
    if args.channels % 32:
        p.error(f"argument --channels: {args.channels} is not a multiple of 32 (GroupNorm(32))")
    if args.image_size and (args.image_size % 14 or args.image_size < 112):
        p.error(f"argument --image-size: {args.image_size} is not a multiple of 14 of at least 112")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda was asked for, but this machine has no usable CUDA device")
    return args


# --- data: slices in the official BCS-DBT orientation, augmentation, batches --------------------
def read_resized(vol, frames, size, clahe=False):
    """Slices `frames` of a volume in the official BCS-DBT orientation (with clahe: each through
    preprocess.clahe, as the mammodino recipe trains), resized (aspect not kept, as DBT-DINO) ->
    (n, 1, size, size) float32 in [0, 1]."""
    x, _ = dicom.read_dbt(vol["path"], frames=frames, view=vol["view"])  # (n, H, W)
    return preprocess.squares(x, size, clahe)  # (n, 1, size, size)


def to_model(vol, boxes, size):
    """xyxy boxes in original pixels -> model input pixels."""
    return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * _scale(vol, size)


def to_original(vol, boxes, size):
    """xyxy boxes in model input pixels -> original pixels (both in the official orientation)."""
    return boxes / _scale(vol, size).to(boxes.device)


def _scale(vol, size):
    return torch.tensor([size / vol["cols"], size / vol["rows"]] * 2)


def training_slices(volumes, n_negative=2, seed=0):
    """DBT-DINO's training slices: per volume, boxes within VolumeSlices/4 slices of a group's first
    share the group's median slice; plus n_negative central slices of each box-free volume."""
    rng = np.random.default_rng(seed)
    positives, negatives = [], []
    for vi, v in enumerate(volumes):
        boxes = sorted(v["boxes"], key=lambda b: b[4])
        while boxes:
            group = [b for b in boxes if b[4] - boxes[0][4] <= v["n_slices"] / 4]
            boxes = boxes[len(group):]
            positives.append((vi, int(np.median([b[4] for b in group])), [b[:4] for b in group]))
        if not v["boxes"]:  # lesions (and the phantoms') sit in the central half of the volume
            n = v["n_slices"]
            picks = rng.integers(n // 4, max(n // 4 + 1, 3 * n // 4), n_negative)
            negatives += [(vi, int(s), []) for s in picks]
    return positives, negatives


def augment(img, boxes, rng):
    """DBT-DINO §6.2.3 augmentation of a (1, S, S) image and its (G, 4) boxes; sizes at 518 px."""
    S = img.shape[-1]
    if rng.random() < 0.5:  # horizontal flip
        img = img.flip(-1)
        boxes = torch.stack([S - boxes[:, 2], boxes[:, 1], S - boxes[:, 0], boxes[:, 3]], 1)
    if rng.random() < 0.5:  # vertical flip
        img = img.flip(-2)
        boxes = torch.stack([boxes[:, 0], S - boxes[:, 3], boxes[:, 2], S - boxes[:, 1]], 1)
    if rng.random() < 0.5:
        img, boxes = zoom(img, boxes, rng.uniform(0.8, 1.5), rng)
    if rng.random() < 0.3:
        img = coarse_dropout(img, boxes, rng)
    if rng.random() < 0.3:  # gamma contrast
        img = img.clamp(0, 1) ** rng.uniform(0.8, 1.2)
    if rng.random() < 0.3:  # Gaussian noise, sigma 0.05 on [0, 1] images
        img = (img + 0.05 * torch.randn(img.shape)).clamp(0, 1)
    return img, boxes


def zoom(img, boxes, f, rng):
    """Rescale by f, then crop (f > 1) or pad (f < 1) to S x S; skipped if a zoomed box would leave
    DBT-DINO's size limits. A crop keeps every box inside when the boxes fit in one window."""
    S = img.shape[-1]
    n = max(1, round(S * f))
    b = boxes * (n / S)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    lo_w, hi_w, lo_h, hi_h = (v * S / retinanet.REF for v in SIZE_LIMITS)
    if ((w < lo_w) | (w > hi_w) | (h < lo_h) | (h > hi_h)).any():
        return img, boxes
    big = F.interpolate(img[None], size=(n, n), mode="bilinear", align_corners=False,
                        antialias=n < S)[0]  # (1, n, n)
    if n >= S:
        ox, oy = (_crop_offset(rng, n - S, b[:, i], b[:, i + 2], S) for i in (0, 1))
        img, b = big[:, oy:oy + S, ox:ox + S], b - torch.tensor([ox, oy, ox, oy])
    else:
        ox, oy = (int(v) for v in rng.integers(0, S - n + 1, 2))
        img = F.pad(big, (ox, S - n - ox, oy, S - n - oy))
        b = b + torch.tensor([ox, oy, ox, oy])
    b = clip_boxes_to_image(b, (S, S))
    return img, b[(b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)]


def _crop_offset(rng, room, lo, hi, S):
    a, c = 0, room
    if len(lo):
        a, c = max(0, math.ceil(float(hi.max()) - S)), min(room, math.floor(float(lo.min())))
    if a > c:  # the boxes do not fit in one window: any crop
        a, c = 0, room
    return int(rng.integers(a, c + 1))


def coarse_dropout(img, boxes, rng):
    """15-20 black rectangles of 20-40 px (at 518) that never cover a lesion."""
    S, k = img.shape[-1], img.shape[-1] / retinanet.REF
    img = img.clone()
    for _ in range(rng.integers(15, 21)):
        w, h = (int(v) for v in rng.integers(round(20 * k), round(40 * k) + 1, 2))
        x, y = int(rng.integers(0, S - w + 1)), int(rng.integers(0, S - h + 1))
        hole = torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)
        if len(boxes) and (box_iou(hole, boxes) > 0).any():
            continue
        img[:, y:y + h, x:x + w] = 0
    return img


class SliceCache:
    """Resized slices (fp16). Training keeps its few slices in memory (keep=True); inference reads
    every slice of every volume, tens of GB on BCS-DBT, so those are rounded alike and dropped."""

    def __init__(self, size, clahe=False):
        self.size, self.store, self.clahe = size, {}, clahe  # store: (path, frame) -> (1, S, S)

    def get(self, vol, frames, keep=True):
        got = {f: self.store[vol["path"], f] for f in frames if (vol["path"], f) in self.store}
        missing = [f for f in frames if f not in got]
        if missing:
            got.update(zip(missing, read_resized(vol, missing, self.size, self.clahe).half()))
            if keep:
                self.store.update({(vol["path"], f): got[f] for f in missing})
        return torch.stack([got[f] for f in frames]).float()  # (n, 1, S, S)


def make_batch(samples, negatives, volumes, cache, step, args):
    """Step `step`'s images (B, 3, S, S) and boxes [(G_i, 4)], from (seed, step) alone (resume)."""
    rng = np.random.default_rng([args.seed, step])
    n_neg = round(args.negatives * args.batch_size) if negatives else 0
    picks = ([samples[i] for i in rng.integers(len(samples), size=args.batch_size - n_neg)]
             + [negatives[i] for i in rng.integers(len(negatives), size=n_neg)])
    images, targets = [], []
    for vi, s, boxes in picks:
        img = cache.get(volumes[vi], [s])[0]  # (1, S, S)
        img, b = augment(img, to_model(volumes[vi], boxes, args.image_size), rng)
        images.append(img)
        targets.append(b)
    return torch.stack(images).expand(-1, 3, -1, -1), targets


# --- volume inference, 3-D candidates, the submission ---------------------------------------------
@torch.no_grad()
def predict_volume(det, anchors, vol, args, device, cache):
    """Every slice, in chunks -> per-slice detections in original pixels: slices (n,), boxes (n, 4),
    scores (n,); and the central slice's breast mask at model size (for the random baseline)."""
    was_training = det.training
    det.eval()
    slices, boxes, scores = [], [], []
    mid = vol["n_slices"] // 2
    for start in range(0, vol["n_slices"], args.chunk):
        frames = list(range(start, min(start + args.chunk, vol["n_slices"])))
        x = cache.get(vol, frames, keep=False)  # (n, 1, S, S)
        if mid in frames:
            image = x[mid - start, 0]  # (S, S), the central slice, for the mask
        with utils.autocast(device, args.amp):
            logits, deltas = det(x.to(device).expand(-1, 3, -1, -1))
        dets = retinanet.postprocess(logits.float(), deltas.float(), anchors, args.image_size,
                                     args.score_thresh, args.nms_iou)
        for f, (b, s) in zip(frames, dets):
            slices.append(torch.full((len(s),), f))
            boxes.append(to_original(vol, b.cpu(), args.image_size))
            scores.append(s.cpu())
    det.train(was_training)
    return dict(slices=torch.cat(slices), boxes=torch.cat(boxes), scores=torch.cat(scores),
                mask=preprocess.tissue_mask(image.numpy()))


def aggregate(dets, vol, s, t, max_keep=8, min_slices=2):
    """DBT-DINO's 3-D grouping (module docstring) -> candidates, best first: dict(box xyxy original
    px, z0, z1, median slice, score). Near: DBT-DINO's "within half the span of the kept slices"
    split a 6-slice lesion in two on phantoms, so we take the evaluator's VolumeSlices/4 around the
    best box's slice. In numpy: validation runs this per volume and setting of its grid."""

    sc = dets["scores"].numpy()
    order = np.argsort(-sc, kind="stable")
    order = order[sc[order] >= s]
    sl, bx, sc = dets["slices"].numpy()[order], dets["boxes"].numpy()[order], sc[order]
    area = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])  # (n,)
    window = vol["n_slices"] / 4
    free, cands = np.ones(len(sc), dtype=bool), []
    ref = np.array([retinanet.REF / vol["cols"], retinanet.REF / vol["rows"]])  # limits at 518 px
    for i in range(len(sc)):
        if not free[i]:
            continue
        lo, hi = np.maximum(bx[i, :2], bx[:, :2]), np.minimum(bx[i, 2:], bx[:, 2:])
        wh = (hi - lo).clip(min=0)  # (n, 2) intersections with box i
        ios = wh[:, 0] * wh[:, 1] / np.maximum(np.minimum(area[i], area), 1e-6)
        members = free & (np.abs(sl - sl[i]) <= window) & (ios >= t)
        free &= ~members
        z = np.sort(sl[members])
        if len(np.unique(z)) < min_slices:  # DBT-DINO: 2 (one-slice groups dropped)
            continue
        box = np.concatenate([bx[members, :2].min(0), bx[members, 2:].max(0)])
        w, h = (box[2:] - box[:2]) * ref
        if not (SIZE_LIMITS[0] <= w <= SIZE_LIMITS[1] and SIZE_LIMITS[2] <= h <= SIZE_LIMITS[3]):
            continue
        cands.append(dict(box=box.tolist(), z0=int(z[0]), z1=int(z[-1]),
                          median=int(z[(len(z) - 1) // 2]), score=float(sc[members][:10].mean())))
    cands.sort(key=lambda c: -c["score"])
    mass = torch.softmax(torch.tensor([c["score"] for c in cands] or [0.0]), 0).cumsum(0)
    n = int((mass < 0.95).sum()) + 1  # candidates until the cumulative softmax reaches 0.95
    return cands[:min(n, max_keep)]


def submission_rows(vol, cands):
    """Official rows: integer X, Width, Y, Height (original px), Z = first slice, Depth = span."""
    pid, study, view = vol["key"]
    return [dict(PatientID=pid, StudyUID=study, View=view, X=round(c["box"][0]),
                 Width=round(c["box"][2] - c["box"][0]), Y=round(c["box"][1]),
                 Height=round(c["box"][3] - c["box"][1]), Z=c["z0"], Depth=c["z1"] - c["z0"],
                 Score=round(c["score"], 6)) for c in cands]


def truth_rows(volumes):
    """The labels and boxes tables of these volumes, as the official CSVs give them."""
    labels = [dict(PatientID=v["key"][0], StudyUID=v["key"][1], View=v["key"][2]) for v in volumes]
    return labels, [b for v in volumes for b in v["raw_boxes"]]


def official_score(volumes, preds):
    """metrics.dbtex_evaluate on rows (an empty submission scores 0)."""
    labels, boxes = truth_rows(volumes)
    return metrics.dbtex_evaluate(labels, boxes, preds)


# --- evaluation: DBT-DINO's variant, CI over patients, classes, random baseline, figures ---------
def paper_variant(volumes, cands):
    """DBT-DINO's evaluator, NOT official: 518 px, 24-px radius, positives, Z = median, Depth 1."""
    pos = [(v, c) for v, c in zip(volumes, cands) if v["raw_boxes"]]
    if not pos:
        return {}
    def scaled(v, r):  # in 518-px space: X and Width scale with the columns, Y and Height the rows
        return {k: r[k] * retinanet.REF / v["cols" if k in ("X", "Width") else "rows"]
                for k in ("X", "Width", "Y", "Height")}
    boxes = [dict(b, **scaled(v, b)) for v, _ in pos for b in v["raw_boxes"]]
    preds = [dict(r, Z=c["median"], Depth=1, **scaled(v, r))
             for v, cs in pos for r, c in zip(submission_rows(v, cs), cs)]
    if not preds:
        return {"mean_sensitivity": 0.0}
    labels = truth_rows([v for v, _ in pos])[0]
    res = metrics.dbtex_evaluate(labels, boxes, preds, radius=metrics.DBT_DINO_RADIUS)
    return {k.replace("_positive", ""): x for k, x in res.items() if k.endswith("_positive")}


def _renamed(volumes, cands, idx):
    """A bootstrap resample's tables: a volume drawn twice is two volumes (StudyUID suffixed)."""
    labels, boxes, preds = [], [], []
    seen = {}  # volume index -> times drawn so far
    for i in idx:
        seen[i] = seen.get(i, 0) + 1
        v, tag = volumes[i], f"#{seen[i]}"
        labels.append(dict(StudyUID=v["key"][1] + tag, View=v["key"][2]))
        boxes += [dict(b, StudyUID=b["StudyUID"] + tag) for b in v["raw_boxes"]]
        preds += [dict(r, StudyUID=r["StudyUID"] + tag) for r in submission_rows(v, cands[i])]
    return labels, boxes, preds


def mean_sensitivity_ci(volumes, cands, n_boot, seed):
    """Official mean sensitivity, with a percentile CI over resampled patients (bootstrap_ci)."""
    def stat(idx):
        labels, boxes, preds = _renamed(volumes, cands, idx)
        if not boxes:
            raise ValueError("no boxes in this resample")  # bootstrap_ci skips it
        if not preds:
            return 0.0
        return metrics.dbtex_evaluate(labels, boxes, preds)["mean_sensitivity_positive"]
    return metrics.bootstrap_ci(stat, np.arange(len(volumes)), n_boot=n_boot, seed=seed,
                                groups=np.array([v["patient"] for v in volumes]))


def by_class(volumes, preds):
    """Sensitivity at 4 FP per positive volume for each lesion class alone (the paper's Fig. 6B)."""
    out = {}
    for cls in sorted({b.get("Class", "") for v in volumes for b in v["raw_boxes"]} - {""}):
        kept = [dict(v, raw_boxes=[b for b in v["raw_boxes"] if b.get("Class") == cls]) for v in volumes]
        out[cls] = official_score(kept, preds)["sensitivity_at_4_fps_positive"]
    return out


def random_rows(volumes, cands, masks, seed):
    """The random-box baseline: per volume as many boxes as the model's candidates, with their sizes
    and depths, centred on uniform breast pixels, at uniform slices, with uniform scores."""
    rng, rows = np.random.default_rng(seed), []
    for v, cs, mask in zip(volumes, cands, masks):
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            continue
        out = []
        for c in cs:
            k = rng.integers(len(ys))
            cx = (xs[k] + rng.random()) * v["cols"] / mask.shape[1]
            cy = (ys[k] + rng.random()) * v["rows"] / mask.shape[0]
            w, h, d = c["box"][2] - c["box"][0], c["box"][3] - c["box"][1], c["z1"] - c["z0"]
            z0 = int(rng.integers(0, max(1, v["n_slices"] - d)))
            out.append(dict(box=[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], z0=z0, z1=z0 + d,
                            score=rng.random()))
        rows += submission_rows(v, out)
    return rows


def draw_froc(path, curves, max_fps=6.0):
    """froc.png with Pillow: sensitivity against FP per positive volume, the range 1-4 FP shaded."""
    W, H, m = 640, 440, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    def px(f, s):  # (FP, sensitivity) -> pixel
        return m + f / max_fps * (W - 2 * m), H - m - s * (H - 2 * m)
    d.rectangle([px(1, 1), px(4, 0)], fill=(225, 235, 250))
    d.text(px(1.05, 0.98), "1-4 FP: DBTex ranking range", fill=(60, 80, 140))
    for k in range(int(max_fps) + 1):
        d.line([px(k, 0), px(k, -0.015)], fill="black")
        d.text((px(k, 0)[0] - 3, H - m + 8), str(k), fill="black")
    for k in range(6):
        d.line([px(0, k / 5), px(-0.08, k / 5)], fill="black")
        d.text((m - 35, px(0, k / 5)[1] - 6), f"{k / 5:.1f}", fill="black")
    d.line([px(0, 1), px(0, 0), px(max_fps, 0)], fill="black")
    d.text((W // 2 - 90, H - 25), "false positives per positive volume", fill="black")
    d.text((8, 8), "sensitivity", fill="black")
    for i, (label, (fps, sens), colour) in enumerate(curves):
        pts = [px(min(f, max_fps), s) for f, s in zip(fps, sens)] + [px(max_fps, sens[-1])]
        d.line([px(0, 0)] + pts, fill=colour, width=2)
        d.text((W - 250, 20 + 16 * i), label, fill=colour)
    utils.save_png(img, path)


def draw_examples(path, volumes, cands, cache, size, n=4):
    """examples.png: up to n positive volumes at a GT slice; GT boxes green (thin: a lesion centred
    on a slice within VolumeSlices/4, seen here too), candidates spanning the slice red + score."""
    tiles = []
    for v, cs in zip(volumes, cands):
        if not v["boxes"] or len(tiles) == n:
            continue
        z = v["boxes"][0][4]
        grey = cache.get(v, [z], keep=False)[0, 0].numpy()  # (S, S) in [0, 1]
        img = Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB")
        d = ImageDraw.Draw(img)
        for b in v["boxes"]:
            if abs(b[4] - z) <= v["n_slices"] / 4:
                d.rectangle(to_model(v, [b[:4]], size)[0].tolist(), outline=(0, 220, 0),
                            width=2 if b[4] == z else 1)
        for c in cs:
            if c["z0"] <= z <= c["z1"]:
                b = to_model(v, c["box"], size)[0].tolist()
                d.rectangle(b, outline=(255, 40, 40), width=2)
                d.text((b[0], max(0, b[1] - 12)), f"{c['score']:.2f}", fill=(255, 40, 40))
        d.text((4, 4), f"{v['key'][0]} {v['key'][2]} slice {z}", fill=(255, 255, 0))
        tiles.append(img)
    if tiles:
        sheet = Image.new("RGB", (size * len(tiles), size))
        for i, t in enumerate(tiles):
            sheet.paste(t, (i * size, 0))
        utils.save_png(sheet, path)


# --- training -------------------------------------------------------------------------------------
def validate(det, anchors, volumes, cache, args, device):
    """Predict every validation slice -> (setting, score): the best validation mean sensitivity on
    the grid of score threshold s, overlap t, candidates kept per volume and slices per group."""
    dets = [predict_volume(det, anchors, v, args, device, cache) for v in volumes]
    best, grouped = None, {}  # (s, t, n) -> candidates at the largest max_keep (others: prefixes)
    grid = (args.score_grid, args.overlap_grid, args.max_candidates, args.min_slices)
    for s, t, keep, n in itertools.product(*grid):
        if (s, t, n) not in grouped:
            grouped[s, t, n] = [aggregate(d, v, s, t, max(args.max_candidates), n)
                                for v, d in zip(volumes, dets)]
        cands = [c[:keep] for c in grouped[s, t, n]]
        rows = [r for v, c in zip(volumes, cands) for r in submission_rows(v, c)]
        score = official_score(volumes, rows)["mean_sensitivity_positive"]
        if best is None or score > best[1]:
            best = (dict(s=s, t=t, max_keep=keep, min_slices=n), score)
    return best


CURVES = [("train", k) for k in ("loss", "cls", "box", "lr")] + [("val", "mean_sensitivity")]


def train(det, anchors, split, cache, args, device, ckpt=None):
    """AdamW + cosine, early stop on val mean sensitivity -> best head state; ckpt: resume it."""
    samples, negatives = training_slices(split["train"], seed=args.seed)
    if not samples:
        raise ValueError(f"{args.data}: no annotated training slices (no boxes in the train split)")
    negatives = negatives if args.negatives > 0 else []
    params = [p for p in det.parameters() if p.requires_grad]
    lr = args.lr * args.batch_size / 64
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    def lr_at(step):  # cosine from lr down to eta_min 1e-6
        return 1e-6 + (lr - 1e-6) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    ckpt_path, start = os.path.join(args.out, "ckpt.pt"), 0
    state = dict(best=None, best_score=-1.0, best_step=0, bad_evals=0)
    writer = utils.JsonlWriter(os.path.join(args.out, "metrics.jsonl"))
    if ckpt:  # checked by load_resume; the heads are in det already (main)
        opt.load_state_dict(ckpt["optimizer"])
        start, state = ckpt["step"], ckpt["early_stop"]
        writer.truncate_after(start)
        utils.log(f"resumed from {ckpt_path} at step {start}")
    utils.log(f"{len(samples)} annotated + {len(negatives)} negative training slices, "
              f"{len(split['val'])} validation volumes; lr {lr:.2e} (= {args.lr:g} x {args.batch_size}/64)")
    progress = utils.Progress(args.steps, start)
    window, t_train = [], 0.0  # (step s, data s) since the last log line; training seconds
    done = start  # the last step run: early stopping may end before args.steps
    for step in range(start, args.steps):
        if state["bad_evals"] >= args.patience:
            break
        utils.seed_everything(args.seed + 65536 * step)  # dropout, noise, anchors: (seed, step)
        t0 = time.perf_counter()
        images, targets = make_batch(samples, negatives, split["train"], cache, step, args)
        t1 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with utils.autocast(device, args.amp):
            logits, deltas = det(images.to(device))
        targets = [b.to(device) for b in targets]
        losses = retinanet.detection_loss(logits.float(), deltas.float(), anchors, targets, args)
        if not torch.isfinite(losses["loss"]):
            terms = ", ".join(f"{k} {float(v)}" for k, v in losses.items())
            sys.exit(f"error: non-finite loss at step {step}: {terms}")
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        window.append((time.perf_counter() - t0, t1 - t0))
        t_train += window[-1][0]
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            values = {k: float(v.detach()) for k, v in losses.items()}
            ms, data_ms = (1e3 * float(np.median([w[i] for w in window])) for i in (0, 1))
            utils.log(progress.line(done, dict(values, lr=lr_at(step)), args.batch_size / (ms / 1e3), ms, data_ms))
            epoch = done * args.batch_size / len(samples)
            writer.write(dict(step=done, split="train", time=time.time(), epoch=epoch, **values, lr=lr_at(step)))
            window = []
        if done % args.eval_every == 0 or done == args.steps:
            setting, score = validate(det, anchors, split["val"], cache, args, device)
            if score > state["best_score"]:  # a copy of the weights, not a view
                best = {k: v.detach().cpu().clone() for k, v in det.trainable_state().items()}
                state.update(best=best, best_score=score, best_step=done, bad_evals=0, best_setting=setting)
            else:
                state["bad_evals"] += 1
            utils.log(f"step {done}: val mean sensitivity {score:.4f} ({setting}); best "
                      f"{state['best_score']:.4f} at step {state['best_step']}")
            writer.write(dict(step=done, split="val", time=time.time(), mean_sensitivity=score, **setting))
            utils.save_checkpoint(ckpt_path, dict(version=1, step=done, args=vars(args),
                                                  heads=det.trainable_state(),
                                                  optimizer=opt.state_dict(), early_stop=state))
            utils.draw_curves(os.path.join(args.out, "curves.png"), writer.read(), CURVES, title=(
                f"detect.py: {args.out}, step {done}/{args.steps}, validation mean sensitivity "
                "(official rules)"))
    epochs, run_epochs = (n * args.batch_size / len(samples) for n in (done, done - start))
    s_per_epoch = t_train / run_epochs if run_epochs else None  # t_train: this run's (a resume's)
    return state, dict(train_s=t_train, epochs=epochs, s_per_epoch=s_per_epoch)


def evaluate(det, anchors, split, cache, args, device, timing, chosen=None):
    """Thresholds from validation (or `chosen` by training), then on the held-out split: official
    metrics and CI, DBT-DINO's variant, FROC, classes, random baseline, predictions.csv, figures."""

    setting, val_score = chosen or validate(det, anchors, split["val"], cache, args, device)
    held, name = (split["test"], "test") if split["test"] else (split["val"], "val")

    t0 = time.perf_counter()
    dets = [predict_volume(det, anchors, v, args, device, cache) for v in held]
    per_slice = (time.perf_counter() - t0) / max(1, sum(v["n_slices"] for v in held))
    cands = [aggregate(d, v, **setting) for d, v in zip(dets, held)]
    rows = [r for v, c in zip(held, cands) for r in submission_rows(v, c)]
    cols = ["PatientID", "StudyUID", "View", "X", "Width", "Y", "Height", "Z", "Depth", "Score"]
    utils.atomic_write(os.path.join(args.out, "predictions.csv"), utils.csv_text(rows, cols))
    result = dict(split=name, volumes=len(held), thresholds=dict(setting, val_mean_sensitivity=val_score),
                  seconds_per_slice_inference=per_slice, **timing)
    if not split["test"]:  # --test-fraction 0, or official CSVs without a test file
        result["warning"] = ("no test split: the score is on the validation split that chose the "
                             "early-stopping step and the thresholds, so it is optimistic")
        utils.log(f"WARNING: {result['warning']}")
    if not any(v["raw_boxes"] for v in held):
        utils.log(f"{name}: no ground-truth boxes; wrote predictions.csv only")
        return result
    labels, boxes = truth_rows(held)
    result["official"] = official_score(held, rows)
    result["mean_sensitivity_ci95"] = mean_sensitivity_ci(held, cands, args.n_boot, args.seed)[1:]
    result["paper_variant_NOT_official"] = paper_variant(held, cands)
    result["sensitivity_at_4_fps_by_class"] = by_class(held, rows)
    curve = metrics.dbtex_froc(labels, boxes, rows, max_fps=6.0) if rows else (np.zeros(1), np.zeros(1))

    result["froc_points"] = dict(fps=curve[0].tolist(), sensitivity=curve[1].tolist())
    masks = [d["mask"] for d in dets]
    draws = [random_rows(held, cands, masks, [args.seed, k]) for k in range(args.baseline_draws)]
    base = [official_score(held, r)["mean_sensitivity_positive"] for r in draws]
    result["random_baseline"] = dict(mean_sensitivity_mean=float(np.mean(base)),
                                     sd=float(np.std(base)), draws=len(base), boxes=len(rows))
    random_curve = metrics.dbtex_froc(labels, boxes, draws[0], max_fps=6.0) if rows else curve
    model_label = f"model: mean sens {result['official']['mean_sensitivity_positive']:.3f}"
    random_label = f"random boxes: {np.mean(base):.3f} (mean of {len(base)})"
    draw_froc(os.path.join(args.out, "froc.png"), [(model_label, curve, (30, 80, 200)),
                                                   (random_label, random_curve, (150, 150, 150))])
    draw_examples(os.path.join(args.out, "examples.png"), held, cands, cache, args.image_size)
    return result


# --- main flow, resume, random search -------------------------------------------------------------
def load_backbone(args):
    """-> (frozen ViT, its source); no --backbone: the newest runs/*/backbone.pth, else random."""
    path, how = utils.backbone_file(args.backbone)
    torch.manual_seed(args.seed)  # a random backbone is the same in every run of this seed (resume)
    vit = model.build(args.model)
    source = f"backbone: RANDOM {args.model} ViT ({how}): untrained features, a plumbing check, not DBT-DINO"
    if path:
        model.load_pretrained(vit, path)
        source = f"backbone: {args.model} from {path} (frozen, {how})"
    if args.compile:  # after the weights are in: the compiled blocks run whatever the module holds
        model.compile_blocks(vit, log=utils.log)
    return vit, source


RESUME_FREE = ("out", "resume", "overwrite", "device", "amp", "compile", "chunk", "log_every",
               "n_boot", "baseline_draws", "trials")  # changing neither weights nor choices


def load_resume(path, args):
    """ckpt.pt -> dict, checked as pretrain.py's: a file that is no detect.py checkpoint, or whose
    run flags (data, split, model, training, validation grid) differ, is one error naming both."""
    ckpt = utils.read_checkpoint(path)  # a corrupt file is one line naming it
    need = {"heads", "optimizer", "step", "early_stop", "args"}
    have = set(ckpt) if isinstance(ckpt, dict) else set()
    if not need <= have:
        raise ValueError(f"{path}: not a detect.py ckpt.pt (it lacks {sorted(need - have)}); "
                         "--resume auto continues a detect.py run, --overwrite starts afresh")
    utils.check_resume_flags(path, ckpt["args"], args, [k for k in vars(args) if k not in RESUME_FREE])
    return ckpt


def main(args):
    if args.trials:
        return search(args)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    hub = args.model != "tiny"
    # tiny on a CPU: 336 px (a 24 x 24 patch grid) shrinks a 768-px phantom 2.3x, so its smallest
    # lesions (~36 px) stay ~16 px, the size of the smallest P3 anchors (16 x 336/518 x 1-1.6); at
    # 224 they would fall below them, and 518 costs 2.4x the head compute of 336 per slice
    args.image_size = args.image_size or (retinanet.REF if hub else 336)
    args.channels = args.channels or (256 if hub else 64)
    backbone, source = load_backbone(args)  # checked before the slow, one-off phantom archive
    clahe = utils.preprocessing(args.backbone, args.preprocess) == "clahe"
    args.backbone = utils.backbone_file(args.backbone)[0] or "random"  # resume checks the file
    if args.data == "synthetic":
        S, H, W = args.synthetic_size
        name = f"detect-p{args.synthetic_patients}-s{args.synthetic_seed}-{S}x{H}x{W}-l{args.synthetic_lesions:g}"
        root = phantoms.synthetic_archive(utils.cache_base() / name, args.synthetic_patients,
                                          args.synthetic_seed, (S, H, W), args.synthetic_lesions)
    elif not os.path.isdir(args.data):
        raise FileNotFoundError(f"{args.data}: no such folder")
    else:
        root = args.data
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = load_resume(ckpt_path, args) if args.resume == "auto" and os.path.exists(ckpt_path) else None
    outputs = ("metrics.json", "predictions.csv", "froc.png", "examples.png", "curves.png")
    stale = [] if ckpt else utils.check_run_folder(args.out, "ckpt.pt", args.overwrite, "detect.py", outputs)
    volumes, skipped = cohorts.load_volumes(root)
    split = cohorts.split_volumes(volumes, args.val_fraction, args.test_fraction, args.seed)
    if not split["val"]:
        raise ValueError(f"{root}: no validation volumes; raise --val-fraction")
    det = retinanet.Detector(backbone, args.channels, args.dropout).to(device)
    if ckpt:
        try:
            det.load_state_dict(ckpt["heads"], strict=False)
        except RuntimeError as e:  # flags fit, weights do not: a hand-edited or foreign file
            why = " ".join(str(e).split())[:200]
            raise ValueError(f"{ckpt_path}: its heads do not fit the model ({why})") from None
    utils.log(f"*** {source} ***")
    # only now, so a refused start leaves args.json (and, with --overwrite, the old run's files)
    utils.write_args(args.out, args, "detect.py", stale, backbone_source=source,
                     torch=torch.__version__, skipped_volumes=skipped)
    sizes = ", ".join(f"{k} {len(v)} volumes ({sum(len(x['boxes']) for x in v)} boxes)"
                      for k, v in split.items())
    utils.log(f"{root}: {sizes}; {args.image_size} px on {device}")
    grids = retinanet.grid_sizes(args.image_size, backbone.patch_size)
    anchors = retinanet.make_anchors(args.image_size, grids).to(device)
    cache = SliceCache(args.image_size, clahe)
    state, timing = train(det, anchors, split, cache, args, device, ckpt)
    if state["best"] is not None:
        det.load_state_dict(state["best"], strict=False)
    chosen = (state["best_setting"], state["best_score"]) if state.get("best_setting") else None
    result = evaluate(det, anchors, split, cache, args, device, dict(timing, best_step=state["best_step"]), chosen)
    result["backbone"] = source
    utils.atomic_write(os.path.join(args.out, "metrics.json"), json.dumps(result, indent=1) + "\n")
    _report(result, args.out)
    utils.log(utils.folder_line(args.out))
    return result


def _report(r, out):
    if "official" not in r:
        return
    o, ci, b = r["official"], r["mean_sensitivity_ci95"], r["random_baseline"]
    utils.log(f"{r['split']} ({r['volumes']} volumes), official DBTex: mean sensitivity "
              f"{o['mean_sensitivity_positive']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}, patients "
              f"resampled), sens@2FP all {o['sensitivity_at_2_fps_all']:.3f}; random boxes "
              f"{b['mean_sensitivity_mean']:.3f} +- {b['sd']:.3f}")
    utils.log(f"paper variant (NOT official): {r['paper_variant_NOT_official']}; by class @4FP: "
              f"{r['sensitivity_at_4_fps_by_class']}; written to {out}")
    if "warning" in r:  # repeated under the score it qualifies
        utils.log(f"WARNING: {r['warning']}")


def _sample(rng, kind, a, b=None):
    if kind == "choice":
        return a[int(rng.integers(len(a)))]
    if kind == "int":
        return int(rng.integers(a, b + 1))
    x = rng.uniform(math.log(a), math.log(b)) if kind == "log" else rng.uniform(a, b)
    return float(math.exp(x) if kind == "log" else x)


def search(args):
    """--trials N: N runs of flags drawn from SEARCH_SPACE (seeded), best validation score first."""

    rng, results = np.random.default_rng(args.seed), []
    os.makedirs(args.out, exist_ok=True)
    for k in range(args.trials):
        trial = copy.copy(args)
        trial.trials, trial.out = 0, os.path.join(args.out, f"trial-{k}")
        # every flag is drawn in every trial, so trial k's draws do not depend on the others
        drawn = {name: _sample(rng, *spec) for name, spec in SEARCH_SPACE.items()}
        drawn["bg_iou"] = min(drawn["bg_iou"], drawn["fg_iou"])
        vars(trial).update(drawn)
        done = os.path.join(trial.out, "metrics.json")
        r = json.load(open(done)) if os.path.exists(done) else main(trial)
        results.append(dict(trial=k, val_mean_sensitivity=r["thresholds"]["val_mean_sensitivity"], **drawn))
        results.sort(key=lambda x: -x["val_mean_sensitivity"])
        utils.atomic_write(os.path.join(args.out, "trials.json"), json.dumps(results, indent=1) + "\n")
    utils.log(f"best trial: {results[0]} -> {args.out}/trial-{results[0]['trial']}")
    utils.log(utils.folder_line(args.out))
    return results


if __name__ == "__main__":
    try:
        main(get_args())
    except (ValueError, FileNotFoundError, OSError) as e:  # bad input: one line, not a traceback

        sys.exit(f"error: {e}")
