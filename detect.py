"""Lesion detection on DBT: frozen DINOv2 ViT -> simple feature pyramid -> RetinaNet, 3-D volume candidates, and the
official DBTex submission and score (DBT-DINO paper §3.5, §6.2.3; spec downstream.md §4-5).

    python detect.py                                   # 24 phantom patients (768 x 576), tiny ViT, CPU, ~4-6 min
    python detect.py --data /bcs-dbt --backbone dbt_dino.pth --model vitb14 --amp --compile --out runs/det  # GPU
    python detect.py --data /bcs-dbt --backbone dbt_dino.pth --model vitb14 --trials 20 --out runs/search
    python detect.py --out runs/det --resume auto      # continue an interrupted run exactly

--data is a folder holding the BCS-DBT CSVs and the DICOM tree (the public layout; data.py's phantoms copy it):
    *file-paths*.csv  PatientID,StudyUID,View,descriptive_path[,classic_path]   paths relative to the folder
    *labels*.csv      PatientID,StudyUID,View,...                                one row per volume
    *boxes*.csv       PatientID,StudyUID,View,Slice,X,Y,Width,Height,Class,VolumeSlices   (X, Y) top-left, 0-based
                      Slice, original pixels in the orientation of data.read_dbt(path, view=View) (= dcmread_image)
CSV names containing train / validation / test give the official split; otherwise patients are split, seeded.
Outputs in --out: args.json, metrics.jsonl, ckpt.pt, predictions.csv (the official submission: X, Width, Y, Height,
Z = first slice, Depth = span, so Z + Depth/2 is the centre the evaluator uses), metrics.json, froc.png, examples.png,
curves.png (training loss terms, lr and validation mean sensitivity).
LR: --lr is per 64 images (DBT-DINO's batch) and scales linearly with --batch-size; the effective LR is printed.
Shapes: B images, A anchors, G ground-truth boxes, D backbone width, C neck channels, g patch grid.
"""
import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes, sigmoid_focal_loss

import data
import metrics
import model

ANCHOR_SIZES = (16, 32, 64, 128)  # base size per level P3-P6 at 518 px (DBT-DINO); scaled with --image-size
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # h / w
ANCHOR_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))  # 1, 1.26, 1.587
BOX_CLAMP = math.log(1000 / 16)  # torchvision's clamp on decoded dw, dh
REF = 518  # DBT-DINO's image side: anchor sizes, box size limits and augmentation sizes are given at it
SIZE_LIMITS = (15, 206, 9, 182)  # DBT-DINO: candidate / zoomed box w in [15, 206], h in [9, 182] at 518 px
SEARCH_SPACE = {  # paper §6.2.3 (Optuna there, seeded random search here): flag -> (kind, low, high | choices)
    "lr": ("log", 1e-5, 1e-2), "weight_decay": ("log", 1e-6, 1e-3), "label_smoothing": ("uniform", 0.0, 0.1),
    "dropout": ("choice", (0.0, 0.05, 0.1, 0.15)), "cls_weight": ("log", 0.1, 10.0), "alpha": ("uniform", 0.25, 0.95),
    "gamma": ("uniform", 0.5, 2.0), "fg_iou": ("uniform", 0.4, 0.6), "bg_iou": ("uniform", 0.2, 0.5),
    "neg_ratio": ("int", 1, 5), "nms_iou": ("uniform", 0.03, 0.3)}


def get_args(argv=None):
    p = data.one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    count, fraction, rate = data.number(int, 1), data.number(float, 0, 1), data.number(float, 0, lo_open=True)
    p.add_argument("--data", default="synthetic", help="BCS-DBT folder (CSVs + DICOM tree) or 'synthetic' (phantoms "
                   "from data.py under $DBT_DINO_CACHE, sized by --synthetic-*)")
    p.add_argument("--synthetic-patients", type=count, default=24, help="phantom patients (4 views each)")
    p.add_argument("--synthetic-size", type=count, nargs=3, default=[16, 768, 576], metavar=("S", "H", "W"),
                   help="phantom slices, rows, columns: realistic sizes keep the 100 px hit radius small")
    p.add_argument("--synthetic-lesions", type=data.number(float, 0, 10), default=2.0,
                   help="mean extra masses per phantom view (data.write_archive's lesion_rate)")
    p.add_argument("--synthetic-seed", type=data.number(int, 0), default=1, help="phantom archive seed")
    p.add_argument("--out", default=time.strftime("runs/detect-%Y%m%d-%H%M%S"), help="run folder")
    p.add_argument("--resume", default="", choices=["", "auto"], help="auto: continue <out>/ckpt.pt if present")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that already holds a run")
    p.add_argument("--backbone", default="", help="frozen ViT weights for model.load_pretrained (hub, DBT-DINO, "
                   "ours); random: an untrained ViT; empty: the newest runs/*/backbone.pth, else random")
    p.add_argument("--model", default="tiny", choices=sorted(model.PRESETS) + [k + "_reg" for k in model.PRESETS
                   if k != "tiny"], help="architecture of --backbone")
    p.add_argument("--image-size", type=data.number(int, 0), default=0, help="slice side in px, a multiple of the "
                   "patch size; 0: 518 (DBT-DINO) for hub ViTs, 336 for tiny on a CPU (why: at main())")
    p.add_argument("--channels", type=data.number(int, 0), default=0,
                   help="neck/head width, a multiple of 32; 0: 256 (DBT-DINO) for hub ViTs, 64 for tiny on a CPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the frozen ViT's blocks "
                   "(model.compile_blocks; the same features to 1e-5)")
    p.add_argument("--seed", type=data.number(int, 0, data.SEED_MAX), default=0,
                   help="split, sampling, augmentation seed")
    p.add_argument("--val-fraction", type=fraction, default=0.2, help="patients for validation (no official split)")
    p.add_argument("--test-fraction", type=fraction, default=0.25, help="patients held out for the final score")
    p.add_argument("--steps", type=count, default=400, help="training iterations (epochs are derived and logged)")
    p.add_argument("--batch-size", type=count, default=8, help="slices per step")
    p.add_argument("--lr", type=rate, default=8e-3, help="AdamW LR per 64 images (linear scaling)")
    p.add_argument("--weight-decay", type=data.number(float, 0), default=1e-4, help="AdamW weight decay")
    p.add_argument("--dropout", type=data.number(float, 0, 0.9), default=0.05, help="dropout in the head towers")
    p.add_argument("--alpha", type=data.number(float, -1, 1), default=0.9, help="focal alpha (-1: no weighting)")
    p.add_argument("--gamma", type=data.number(float, 0), default=1.5, help="focal gamma")
    p.add_argument("--label-smoothing", type=fraction, default=0.05, help="targets y(1 - e) + e/2")
    p.add_argument("--pos-weight", type=rate, default=2.0, help="weight of positive anchors in the focal loss")
    p.add_argument("--cls-weight", type=rate, default=1.0, help="total = this x focal + smooth-L1")
    p.add_argument("--fg-iou", type=fraction, default=0.5, help="anchor positive if IoU > this")
    p.add_argument("--bg-iou", type=fraction, default=0.4, help="anchor negative if IoU < this")
    p.add_argument("--low-quality-matches", action="store_true", help="each box keeps its best anchors (torchvision)")
    p.add_argument("--neg-ratio", type=count, default=3, help="negative anchors sampled per positive")
    p.add_argument("--negatives", type=fraction, default=0.25, help="fraction of each batch drawn from slices of "
                   "box-free volumes (DBT-DINO: 0)")
    p.add_argument("--nms-iou", type=fraction, default=0.2, help="NMS IoU over all levels of one slice")
    p.add_argument("--score-thresh", type=fraction, default=0.05, help="per-slice detections kept above this")
    p.add_argument("--score-grid", type=fraction, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.75, 0.85, 0.95],
                   help="3-D grouping score thresholds tried on validation (DBT-DINO: 0.75 0.85 0.95)")
    p.add_argument("--overlap-grid", type=fraction, nargs="+", default=[0.6, 0.7, 0.8],
                   help="intersection-over-smaller thresholds tried on validation")
    p.add_argument("--max-candidates", type=count, nargs="+", default=[2, 4, 8],
                   help="most 3-D candidates kept per volume, tried on validation (DBT-DINO: 8)")
    p.add_argument("--min-slices", type=count, nargs="+", default=[1, 2],
                   help="slices a 3-D group needs, tried on validation (DBT-DINO: 2; calcifications show on 1-2)")
    p.add_argument("--chunk", type=count, default=16, help="slices per forward pass at inference")
    p.add_argument("--eval-every", type=count, default=100, help="validation mean sensitivity every N steps")
    p.add_argument("--patience", type=count, default=10, help="stop after this many evals without improvement")
    p.add_argument("--log-every", type=count, default=10, help="progress line + metrics.jsonl every N steps")
    p.add_argument("--n-boot", type=count, default=1000, help="bootstrap resamples (patients) for the CI")
    p.add_argument("--baseline-draws", type=count, default=20, help="random-box baselines averaged")
    p.add_argument("--trials", type=data.number(int, 0), default=0, help="seeded random search over SEARCH_SPACE "
                   "(each trial a run in <out>/trial-k); 0: one run with the flags given")
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


# -----------------------------------------------------------------------------------------------------------
# anchors and box coding

def grid_sizes(image_size, patch=14):
    """P3-P6 side lengths: x2 upsampling, the patch grid, 2x2 max-pool (floor), stride-2 3x3 conv (ceil)."""
    g = image_size // patch
    return 2 * g, g, g // 2, (g // 2 + 1) // 2


def make_anchors(image_size, grid_sizes):
    """(A, 4) xyxy anchors, level by level, row-major (y, x), 9 per location ratio-major then scale.

    DBT-DINO's float stride image_size/grid with centres at (i + 0.5) stride (torchvision floors the stride and
    starts at 0, which puts P6's last centres 0.56 stride off the image's centre line)."""
    levels = []
    for g, base in zip(grid_sizes, ANCHOR_SIZES):
        size = base * image_size / REF
        wh = torch.tensor([(size * s / math.sqrt(r), size * s * math.sqrt(r))  # area size^2 s^2, h/w = r
                           for r in ANCHOR_RATIOS for s in ANCHOR_SCALES], dtype=torch.float64)  # (9, 2)
        cell = torch.cat([-wh / 2, wh / 2], dim=1)  # (9, 4)
        c = (torch.arange(g, dtype=torch.float64) + 0.5) * (image_size / g)
        cy, cx = torch.meshgrid(c, c, indexing="ij")  # (g, g)
        centre = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (g*g, 1, 4)
        levels.append((centre + cell).reshape(-1, 4))  # (g*g*9, 4)
    return torch.cat(levels).float()


def _centre_size(b):
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode(anchors, boxes):
    """Regression targets (dx, dy, dw, dh) of xyxy boxes against anchors, torchvision's BoxCoder with weights 1."""
    ax, ay, aw, ah = _centre_size(anchors)
    gx, gy, gw, gh = _centre_size(boxes)
    return torch.stack([(gx - ax) / aw, (gy - ay) / ah, torch.log(gw / aw), torch.log(gh / ah)], dim=-1)


def decode(anchors, deltas):
    """Inverse of encode; dw, dh clamped at log(1000/16) as torchvision, so a wild logit cannot overflow exp."""
    ax, ay, aw, ah = _centre_size(anchors)
    cx, cy = ax + deltas[..., 0] * aw, ay + deltas[..., 1] * ah
    w = aw * deltas[..., 2].clamp(max=BOX_CLAMP).exp()
    h = ah * deltas[..., 3].clamp(max=BOX_CLAMP).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


# -----------------------------------------------------------------------------------------------------------
# the model: frozen ViT -> neck (P3-P6) -> shared RetinaNet head

class Neck(nn.Module):
    """DBT-DINO's pyramid from the last ViT map: 1x1 projection, then P3 (bilinear x2), P4, P5 (max-pool), each a
    3x3 conv, and P6 a stride-2 3x3 conv on P5. No norms or activations, as the released code."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.lateral = nn.Conv2d(in_dim, dim, 1)
        self.p3, self.p4, self.p5 = (nn.Conv2d(dim, dim, 3, padding=1) for _ in range(3))
        self.p6 = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x):  # x (B, D, g, g)
        x = self.lateral(x)  # (B, C, g, g)
        p3 = self.p3(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))  # (B, C, 2g, 2g)
        p5 = self.p5(F.max_pool2d(x, 2))  # (B, C, g//2, g//2)
        return [p3, self.p4(x), p5, self.p6(p5)]


class Head(nn.Module):
    """RetinaNet head shared by all levels: two towers of 4 x (3x3 conv, GroupNorm(32), ReLU, dropout)."""

    def __init__(self, dim, dropout, prior=0.05, n_anchors=9):
        super().__init__()

        def tower():
            return nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(dim, dim, 3, padding=1, bias=False),
                                   nn.GroupNorm(32, dim), nn.ReLU(inplace=True), nn.Dropout(dropout))])
        self.cls_tower, self.box_tower = tower(), tower()
        self.cls = nn.Conv2d(dim, n_anchors, 3, padding=1)
        self.box = nn.Conv2d(dim, 4 * n_anchors, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # DBT-DINO's std 0.001 (torchvision: 0.01)
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # the prior: every anchor starts at P(lesion) = prior, so the first focal losses are not swamped by
        # the ~10^5 easy negatives (Lin et al. 2017)
        nn.init.constant_(self.cls.bias, -math.log((1 - prior) / prior))

    def forward(self, feats):
        logits, deltas = [], []
        for f in feats:
            B = f.shape[0]  # (B, K, h, w) -> (B, h*w*9, K): the anchors' (y, x, anchor) order
            logits.append(self.cls(self.cls_tower(f)).permute(0, 2, 3, 1).reshape(B, -1))  # (B, h*w*9)
            deltas.append(self.box(self.box_tower(f)).permute(0, 2, 3, 1).reshape(B, -1, 4))  # (B, h*w*9, 4)
        return torch.cat(logits, 1), torch.cat(deltas, 1)  # (B, A), (B, A, 4)


class Detector(nn.Module):
    """Frozen backbone (kept in eval mode, no gradients) + trainable neck and head."""

    def __init__(self, backbone, dim, dropout):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.neck, self.head = Neck(backbone.embed_dim, dim), Head(dim, dropout)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_state(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def forward(self, x):  # x (B, 3, S, S) in [0, 1], grey replicated, no ImageNet normalisation (DBT-DINO)
        with torch.no_grad():
            f = self.backbone.get_intermediate_layers(x, 1, reshape=True)[0]  # (B, D, g, g)
        return self.head(self.neck(f.float()))


# -----------------------------------------------------------------------------------------------------------
# matching and losses

def match(anchors, boxes, fg_iou, bg_iou, low_quality=False):
    """(A,) index of each anchor's box: >= 0 positive (IoU > fg_iou), -1 negative (IoU < bg_iou), -2 ignored."""
    if len(boxes) == 0:
        return torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    iou = box_iou(boxes, anchors)  # (G, A)
    best, idx = iou.max(0)
    matched = idx.clone()
    matched[best <= fg_iou] = -2
    matched[best < bg_iou] = -1
    if low_quality:  # torchvision's rescue of each box's best anchors, except when that best IoU is 0 (its quirk)
        top = iou.max(1, keepdim=True).values  # (G, 1)
        rescue = ((iou == top) & (top > 0)).any(0)
        matched[rescue] = idx[rescue]
    return matched


def focal_terms(logits, targets, alpha, gamma, smoothing=0.0):
    """Per-element sigmoid focal loss (torchvision) on label-smoothed targets y(1 - e) + e/2."""
    return sigmoid_focal_loss(logits, targets * (1 - smoothing) + smoothing / 2, alpha=alpha, gamma=gamma,
                              reduction="none")


def detection_loss(logits, deltas, anchors, targets, args, generator=None):
    """DBT-DINO's loss: focal on the positives (x pos_weight) and neg_ratio x as many sampled negatives (2000 when
    an image has no positive), smooth-L1 on the positives' deltas, each normalised by max(1, positives) per image
    and averaged over images. logits (B, A), deltas (B, A, 4), targets: B tensors (G_i, 4) -> named losses."""
    cls_terms, box_terms = [], []
    for b, boxes in enumerate(targets):
        m = match(anchors, boxes, args.fg_iou, args.bg_iou, args.low_quality_matches)
        pos, neg = torch.nonzero(m >= 0).squeeze(1), torch.nonzero(m == -1).squeeze(1)
        n_neg = min(len(neg), args.neg_ratio * len(pos) if len(pos) else 2000)
        neg = neg[torch.randperm(len(neg), generator=generator)[:n_neg]]
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(logits.device)
        focal = focal_terms(logits[b, torch.cat([pos, neg])], y, args.alpha, args.gamma, args.label_smoothing)
        n = max(1, len(pos))
        cls_terms.append((focal[:len(pos)].sum() * args.pos_weight + focal[len(pos):].sum()) / n)
        target = encode(anchors[pos], boxes[m[pos]])  # (P, 4)
        # beta 1/9: Detectron's RetinaNet value; deltas are small, so torch's beta 1 would be nearly all L2
        box_terms.append(F.smooth_l1_loss(deltas[b, pos], target, beta=1 / 9, reduction="sum") / n)
    cls, box = torch.stack(cls_terms).mean(), torch.stack(box_terms).mean()
    return {"cls": cls, "box": box, "loss": args.cls_weight * cls + box}


def postprocess(logits, deltas, anchors, image_size, score_thresh, nms_iou, max_det=100):
    """Per image of a chunk: sigmoid scores > score_thresh, decoded, clipped, one NMS over all levels (batched by
    image) -> list of (boxes (n, 4) xyxy, scores (n,)) in input pixels."""
    scores = logits.sigmoid()  # (B, A)
    img, a = torch.nonzero(scores > score_thresh, as_tuple=True)
    boxes = clip_boxes_to_image(decode(anchors[a], deltas[img, a]), (image_size, image_size))
    score = scores[img, a]
    keep = remove_small_boxes(boxes, 1.0)
    img, boxes, score = img[keep], boxes[keep], score[keep]
    keep = batched_nms(boxes, score, img, nms_iou)  # sorted by score
    img, boxes, score = img[keep], boxes[keep], score[keep]
    return [(boxes[img == i][:max_det], score[img == i][:max_det]) for i in range(len(logits))]


# -----------------------------------------------------------------------------------------------------------
# data: the BCS-DBT CSVs read as published, slices through data.read_dbt in the official orientation

SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
BOX_FIELDS = ("X", "Y", "Width", "Height", "Slice", "VolumeSlices")


def _csvs(root, kind):
    """{split or None: path} of the CSVs in root whose name contains kind (the last name wins: -v2 over -v1)."""
    found = {}
    for p in sorted(Path(root).glob("*.csv")):
        name = p.name.lower()
        if kind in name:
            rest = name.replace(kind, "")
            found[next((v for k, v in SPLIT_NAMES.items() if k in rest), None)] = p
    return found


def _rows(path, columns):
    rows = data.read_csv(path)
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _key(r):
    return r["PatientID"], r["StudyUID"], r["View"]


def _boxes_by_volume(files):
    """(PatientID, StudyUID, View) -> box rows, numeric fields parsed (a bad number is an error naming the row)."""
    out = {}
    for path in files:
        for i, r in enumerate(_rows(path, ("PatientID", "StudyUID", "View") + BOX_FIELDS)):
            try:
                num = {k: float(r[k]) for k in BOX_FIELDS}
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {i + 1}: a box field of {BOX_FIELDS} is not a number") from None
            out.setdefault(_key(r), []).append(dict(r, **num))
    return out


def load_volumes(root):
    """One dict per labels row: key, patient, path, view, split, header sizes, boxes (raw rows and clipped xyxy).
    Rows whose file is missing or unreadable are reported once each and skipped; returns (volumes, skipped)."""
    paths, labels = _csvs(root, "file-paths"), _csvs(root, "labels")
    if not paths or not labels:
        raise FileNotFoundError(f"{root}: no *file-paths*.csv and *labels*.csv (the BCS-DBT layout)")
    where = {}
    for split, p in paths.items():
        for r in _rows(p, ("PatientID", "StudyUID", "View", "descriptive_path")):
            rel = r["descriptive_path"]
            if not (rel and (Path(root) / rel).exists()) and r.get("classic_path"):
                rel = r["classic_path"]  # a tree downloaded in TCIA's classic layout
            where[_key(r)] = (rel, split)
    boxes = _boxes_by_volume(_csvs(root, "boxes").values())
    volumes, skipped, dropped = [], 0, 0
    for split, p in labels.items():
        for r in _rows(p, ("PatientID", "StudyUID", "View")):
            rel, path_split = where.get(_key(r), ("", None))
            try:
                if not rel:
                    raise ValueError(f"{p}: volume {_key(r)} has no file-paths row")
                meta = data.index_volume(Path(root) / rel)
            except (ValueError, OSError) as e:
                data.log(f"skipped: {e}")
                skipped += 1
                continue
            vol = dict(key=_key(r), patient=r["PatientID"], path=str(Path(root) / rel), view=r["View"],
                       split=split or path_split, rows=meta["rows"], cols=meta["cols"], n_slices=meta["n_frames"],
                       raw_boxes=boxes.get(_key(r), []))
            vol["boxes"] = _clip_boxes(vol)
            dropped += len(vol["raw_boxes"]) - len(vol["boxes"])
            volumes.append(vol)
    if not volumes:
        raise ValueError(f"{root}: none of the listed volumes could be read ({skipped} skipped)")
    if skipped or dropped:
        data.log(f"{skipped} volume(s) skipped (missing or unreadable file), {dropped} zero-size box(es) dropped")
    return volumes, skipped


def _clip_boxes(vol):
    """Boxes as [x0, y0, x1, y1, slice, class] clipped to the image; zero-size or out-of-volume boxes dropped."""
    out = []
    for b in vol["raw_boxes"]:
        x0, y0 = max(b["X"], 0.0), max(b["Y"], 0.0)
        x1, y1 = min(b["X"] + b["Width"], vol["cols"]), min(b["Y"] + b["Height"], vol["rows"])
        if x1 > x0 and y1 > y0 and 0 <= b["Slice"] < vol["n_slices"]:
            out.append([x0, y0, x1, y1, int(b["Slice"]), b.get("Class", "")])
    return out


def split_volumes(volumes, val_fraction, test_fraction, seed):
    """{train, val, test}: the CSVs' split when they name one, else whole patients, seeded and stratified by
    whether a patient has any box (lesions are rare; an unlucky split could leave validation without any)."""
    if all(v["split"] for v in volumes) and {"train", "val"} <= {v["split"] for v in volumes}:
        return {s: [v for v in volumes if v["split"] == s] for s in ("train", "val", "test")}
    rng, part = np.random.default_rng(seed), {}
    positive = {v["patient"] for v in volumes if v["boxes"]}
    for group in (sorted(positive), sorted({v["patient"] for v in volumes} - positive)):
        group = [group[i] for i in rng.permutation(len(group))]
        n_test, n_val = round(len(group) * test_fraction), round(len(group) * val_fraction)
        part.update({p: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                     for i, p in enumerate(group)})
    return {s: [v for v in volumes if part[v["patient"]] == s] for s in ("train", "val", "test")}


def read_resized(vol, frames, size):
    """Slices `frames` of a volume in the official BCS-DBT orientation, resized (aspect not kept, as DBT-DINO)
    -> (n, 1, size, size) float32 in [0, 1]."""
    x, _ = data.read_dbt(vol["path"], frames=frames, view=vol["view"])  # (n, H, W)
    return F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def to_model(vol, boxes, size):
    """xyxy boxes in original pixels -> model input pixels."""
    return torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * _scale(vol, size)


def to_original(vol, boxes, size):
    """xyxy boxes in model input pixels -> original pixels (the orientation is the official one in both)."""
    return boxes / _scale(vol, size).to(boxes.device)


def _scale(vol, size):
    return torch.tensor([size / vol["cols"], size / vol["rows"]] * 2)


def training_slices(volumes, n_negative=2, seed=0):
    """DBT-DINO's training slices: per volume, boxes whose slices lie within VolumeSlices/4 of the group's first
    share one slice (the group's median); plus n_negative central slices of every box-free volume, seeded."""
    rng, positives, negatives = np.random.default_rng(seed), [], []
    for vi, v in enumerate(volumes):
        boxes = sorted(v["boxes"], key=lambda b: b[4])
        while boxes:
            group = [b for b in boxes if b[4] - boxes[0][4] <= v["n_slices"] / 4]
            boxes = boxes[len(group):]
            positives.append((vi, int(np.median([b[4] for b in group])), [b[:4] for b in group]))
        if not v["boxes"]:  # lesions (and the phantoms') sit in the central half of the volume
            n = v["n_slices"]
            negatives += [(vi, int(s), []) for s in rng.integers(n // 4, max(n // 4 + 1, 3 * n // 4), n_negative)]
    return positives, negatives


def augment(img, boxes, rng):
    """Paper §6.2.3 on a (1, S, S) image and its (G, 4) boxes together; sizes are given at 518 px and scaled."""
    S = img.shape[-1]
    if rng.random() < 0.5:  # horizontal flip
        img, boxes = img.flip(-1), torch.stack([S - boxes[:, 2], boxes[:, 1], S - boxes[:, 0], boxes[:, 3]], 1)
    if rng.random() < 0.5:  # vertical flip
        img, boxes = img.flip(-2), torch.stack([boxes[:, 0], S - boxes[:, 3], boxes[:, 2], S - boxes[:, 1]], 1)
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
    """Rescale by f: crop (f > 1) or pad (f < 1) back to S x S. Skipped when a zoomed box would leave DBT-DINO's
    size limits; a crop keeps every box inside when the boxes fit in one window."""
    S = img.shape[-1]
    n = max(1, round(S * f))
    b = boxes * (n / S)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    lo_w, hi_w, lo_h, hi_h = (v * S / REF for v in SIZE_LIMITS)
    if ((w < lo_w) | (w > hi_w) | (h < lo_h) | (h > hi_h)).any():
        return img, boxes
    big = F.interpolate(img[None], size=(n, n), mode="bilinear", align_corners=False, antialias=n < S)[0]
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
    S, k = img.shape[-1], img.shape[-1] / REF
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
    """Resized slices (fp16), kept in memory when asked (keep=True): training revisits its few slices every epoch.
    Inference reads every slice of every volume, tens of GB on BCS-DBT, so those are read, rounded the same way,
    and dropped."""

    def __init__(self, size):
        self.size, self.store = size, {}

    def get(self, vol, frames, keep=True):
        got = {f: self.store[vol["path"], f] for f in frames if (vol["path"], f) in self.store}
        missing = [f for f in frames if f not in got]
        if missing:
            got.update(zip(missing, read_resized(vol, missing, self.size).half()))
            if keep:
                self.store.update({(vol["path"], f): got[f] for f in missing})
        return torch.stack([got[f] for f in frames]).float()  # (n, 1, S, S)


def make_batch(samples, negatives, volumes, cache, step, args):
    """Step `step`'s images (B, 3, S, S) and boxes [(G_i, 4)], drawn and augmented from (seed, step) alone, so a
    resumed run sees the same batches."""
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


# -----------------------------------------------------------------------------------------------------------
# volume inference and 3-D candidates

def _autocast(device, amp=True):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def predict_volume(det, anchors, vol, args, device, cache):
    """Every slice, in chunks -> per-slice detections in original pixels: slices (n,), boxes (n, 4), scores (n,),
    plus the breast mask of the central slice at model size (for the random baseline)."""
    was_training = det.training
    det.eval()
    slices, boxes, scores, mid = [], [], [], vol["n_slices"] // 2
    for start in range(0, vol["n_slices"], args.chunk):
        frames = list(range(start, min(start + args.chunk, vol["n_slices"])))
        x = cache.get(vol, frames, keep=False)  # (n, 1, S, S)
        if mid in frames:
            image = x[mid - start, 0]  # (S, S), the central slice, for the mask
        with _autocast(device, args.amp):
            logits, deltas = det(x.to(device).expand(-1, 3, -1, -1))
        dets = postprocess(logits.float(), deltas.float(), anchors, args.image_size, args.score_thresh, args.nms_iou)
        for f, (b, s) in zip(frames, dets):
            slices.append(torch.full((len(s),), f))
            boxes.append(to_original(vol, b.cpu(), args.image_size))
            scores.append(s.cpu())
    det.train(was_training)
    return dict(slices=torch.cat(slices), boxes=torch.cat(boxes), scores=torch.cat(scores),
                mask=data.tissue_mask(image.numpy()))


def aggregate(dets, vol, s, t, max_keep=8, min_slices=2):
    """DBT-DINO's 3-D grouping (downstream.md §4) -> candidates, best first: dict(box xyxy original px, z0, z1,
    median slice, score). Greedy from the best box: the free boxes near its slice (below) and with intersection
    over the smaller box >= t join it; one-slice groups are dropped; a group is the union box, scored by the mean
    of its top 10 scores; then the size filter and the cumulative-softmax cut.
    "Near": DBT-DINO's "within half the span of the kept slices" splits a lesion seen on 6 slices in two
    (measured on phantoms); we take the evaluator's slice tolerance, VolumeSlices/4 of the best box's slice.
    In numpy: validation runs this for every volume at each of its grid's settings."""
    sc = dets["scores"].numpy()
    order = np.argsort(-sc, kind="stable")
    order = order[sc[order] >= s]
    sl, bx, sc = dets["slices"].numpy()[order], dets["boxes"].numpy()[order], sc[order]
    area = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])  # (n,)
    window, free, cands = vol["n_slices"] / 4, np.ones(len(sc), dtype=bool), []
    ref = np.array([REF / vol["cols"], REF / vol["rows"]])  # the size limits are at 518 px
    for i in range(len(sc)):
        if not free[i]:
            continue
        wh = (np.minimum(bx[i, 2:], bx[:, 2:]) - np.maximum(bx[i, :2], bx[:, :2])).clip(min=0)  # (n, 2)
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
        cands.append(dict(box=box.tolist(), z0=int(z[0]), z1=int(z[-1]), median=int(z[(len(z) - 1) // 2]),
                          score=float(sc[members][:10].mean())))
    cands.sort(key=lambda c: -c["score"])
    mass = torch.softmax(torch.tensor([c["score"] for c in cands] or [0.0]), 0).cumsum(0)
    n = int((mass < 0.95).sum()) + 1  # candidates until the cumulative softmax reaches 0.95
    return cands[:min(n, max_keep)]


def submission_rows(vol, cands):
    """Official submission rows: integer X, Width, Y, Height (original pixels), Z = first slice, Depth = span."""
    pid, study, view = vol["key"]
    return [dict(PatientID=pid, StudyUID=study, View=view, X=round(c["box"][0]), Width=round(c["box"][2] - c["box"][0]),
                 Y=round(c["box"][1]), Height=round(c["box"][3] - c["box"][1]), Z=c["z0"], Depth=c["z1"] - c["z0"],
                 Score=round(c["score"], 6)) for c in cands]


def truth_rows(volumes):
    """The labels and boxes tables of these volumes, as the official CSVs give them."""
    labels = [dict(PatientID=v["key"][0], StudyUID=v["key"][1], View=v["key"][2]) for v in volumes]
    return labels, [b for v in volumes for b in v["raw_boxes"]]


def official_score(volumes, preds):
    """metrics.dbtex_evaluate on rows (an empty submission scores 0)."""
    labels, boxes = truth_rows(volumes)
    return metrics.dbtex_evaluate(labels, boxes, preds)


# -----------------------------------------------------------------------------------------------------------
# evaluation: official score, DBT-DINO's variant, CI over patients, class split, random baseline, figures

def paper_variant(volumes, cands):
    """DBT-DINO's own evaluator (NOT the official DBTex metric): boxes and predictions in 518-px space, a 24-px
    minimum radius, positive volumes only, Z = median slice with Depth = 1."""
    pos = [(v, c) for v, c in zip(volumes, cands) if v["raw_boxes"]]
    if not pos:
        return {}
    scaled = lambda v, r, keys: {k: r[k] * REF / (v["cols"] if k in ("X", "Width") else v["rows"]) for k in keys}
    boxes = [dict(b, **scaled(v, b, ("X", "Width", "Y", "Height"))) for v, _ in pos for b in v["raw_boxes"]]
    preds = [dict(r, Z=c["median"], Depth=1, **scaled(v, r, ("X", "Width", "Y", "Height")))
             for v, cs in pos for r, c in zip(submission_rows(v, cs), cs)]
    if not preds:
        return {"mean_sensitivity": 0.0}
    res = metrics.dbtex_evaluate(truth_rows([v for v, _ in pos])[0], boxes, preds, radius=metrics.DBT_DINO_RADIUS)
    return {k.replace("_positive", ""): x for k, x in res.items() if k.endswith("_positive")}


def _renamed(volumes, cands, idx):
    """The tables of a bootstrap resample: a volume drawn twice becomes two volumes (StudyUID suffixed)."""
    labels, boxes, preds, seen = [], [], [], {}
    for i in idx:
        seen[i] = seen.get(i, 0) + 1
        v, tag = volumes[i], f"#{seen[i]}"
        labels.append(dict(StudyUID=v["key"][1] + tag, View=v["key"][2]))
        boxes += [dict(b, StudyUID=b["StudyUID"] + tag) for b in v["raw_boxes"]]
        preds += [dict(r, StudyUID=r["StudyUID"] + tag) for r in submission_rows(v, cands[i])]
    return labels, boxes, preds


def mean_sensitivity_ci(volumes, cands, n_boot, seed):
    """Official mean sensitivity with a percentile CI from resampling whole patients (metrics.bootstrap_ci)."""
    def stat(idx):
        labels, boxes, preds = _renamed(volumes, cands, idx)
        if not boxes:
            raise ValueError("no boxes in this resample")  # bootstrap_ci skips it
        return metrics.dbtex_evaluate(labels, boxes, preds)["mean_sensitivity_positive"] if preds else 0.0
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
    """The random-box baseline: per volume as many boxes as the model's candidates, with their sizes and depths,
    centred on uniform breast pixels, at uniform slices, with uniform scores."""
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
            out.append(dict(box=[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], z0=z0, z1=z0 + d, score=rng.random()))
        rows += submission_rows(v, out)
    return rows


def draw_froc(path, curves, max_fps=6.0):
    """froc.png with Pillow: sensitivity against FP per positive volume, the ranking range 1-4 FP shaded."""
    W, H, m = 640, 440, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    px = lambda f, s: (m + f / max_fps * (W - 2 * m), H - m - s * (H - 2 * m))
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
    metrics.save_png(img, path)


def draw_examples(path, volumes, cands, cache, size, n=4):
    """examples.png: up to n positive volumes at a ground-truth slice; GT green (thin: a lesion centred on another
    slice within the evaluator's VolumeSlices/4, which a lesion seen on several slices shows here), candidates
    spanning the slice red + score."""
    tiles = []
    for v, cs in zip(volumes, cands):
        if not v["boxes"] or len(tiles) == n:
            continue
        z = v["boxes"][0][4]
        img = Image.fromarray((cache.get(v, [z], keep=False)[0, 0].numpy() * 255).astype(np.uint8)).convert("RGB")
        d = ImageDraw.Draw(img)
        for b in v["boxes"]:
            if abs(b[4] - z) <= v["n_slices"] / 4:
                d.rectangle(to_model(v, [b[:4]], size)[0].tolist(), outline=(0, 220, 0), width=2 if b[4] == z else 1)
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
        metrics.save_png(sheet, path)


# -----------------------------------------------------------------------------------------------------------
# training

def validate(det, anchors, volumes, cache, args, device):
    """Predict every validation slice -> (setting, mean sensitivity): the best validation mean sensitivity on the
    grid of score threshold s, overlap t, candidates kept per volume and slices per group."""
    dets = [predict_volume(det, anchors, v, args, device, cache) for v in volumes]
    best, grouped = None, {}  # (s, t, n) -> candidates at the largest max_keep; a smaller one is a prefix
    for s, t, keep, n in itertools.product(args.score_grid, args.overlap_grid, args.max_candidates, args.min_slices):
        if (s, t, n) not in grouped:
            grouped[s, t, n] = [aggregate(d, v, s, t, max(args.max_candidates), n) for v, d in zip(volumes, dets)]
        cands = [c[:keep] for c in grouped[s, t, n]]
        rows = [r for v, c in zip(volumes, cands) for r in submission_rows(v, c)]
        score = official_score(volumes, rows)["mean_sensitivity_positive"]
        if best is None or score > best[1]:
            best = (dict(s=s, t=t, max_keep=keep, min_slices=n), score)
    return best


CURVES = [("train", "loss"), ("train", "cls"), ("train", "box"), ("train", "lr"), ("val", "mean_sensitivity")]


def train(det, anchors, split, cache, args, device, ckpt=None):
    """AdamW + cosine, early stopping on validation mean sensitivity -> the best neck/head state; ckpt: a checked
    ckpt.pt (load_resume) to continue from."""
    samples, negatives = training_slices(split["train"], seed=args.seed)
    if not samples:
        raise ValueError(f"{args.data}: no annotated training slices (no boxes in the training split)")
    negatives = negatives if args.negatives > 0 else []
    params = [p for p in det.parameters() if p.requires_grad]
    lr = args.lr * args.batch_size / 64
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    lr_at = lambda step: 1e-6 + (lr - 1e-6) * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # eta_min 1e-6
    ckpt_path, start = os.path.join(args.out, "ckpt.pt"), 0
    state = dict(best=None, best_score=-1.0, best_step=0, bad_evals=0)
    writer = metrics.JsonlWriter(os.path.join(args.out, "metrics.jsonl"))
    if ckpt:  # checked by load_resume; the heads are in det already (main)
        opt.load_state_dict(ckpt["optimizer"])
        start, state = ckpt["step"], ckpt["early_stop"]
        writer.truncate_after(start)
        data.log(f"resumed from {ckpt_path} at step {start}")
    data.log(f"{len(samples)} annotated + {len(negatives)} negative training slices, {len(split['val'])} validation "
             f"volumes; lr {lr:.2e} (= {args.lr:g} x {args.batch_size}/64)")
    progress, window, t_train = metrics.Progress(args.steps, start), [], 0.0
    done = start  # the last step run: early stopping may end before args.steps
    for step in range(start, args.steps):
        if state["bad_evals"] >= args.patience:
            break
        data.seed_everything(args.seed + 65536 * step)  # dropout, noise and anchor sampling from (seed, step)
        t0 = time.perf_counter()
        images, targets = make_batch(samples, negatives, split["train"], cache, step, args)
        t1 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with _autocast(device, args.amp):
            logits, deltas = det(images.to(device))
        losses = detection_loss(logits.float(), deltas.float(), anchors, [b.to(device) for b in targets], args)
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
            data.log(progress.line(done, dict(values, lr=lr_at(step)), args.batch_size / (ms / 1e3), ms, data_ms))
            writer.write(dict(step=done, split="train", time=time.time(), epoch=done * args.batch_size / len(samples),
                              **values, lr=lr_at(step)))
            window = []
        if done % args.eval_every == 0 or done == args.steps:
            setting, score = validate(det, anchors, split["val"], cache, args, device)
            if score > state["best_score"]:
                best = {k: v.detach().cpu().clone() for k, v in det.trainable_state().items()}  # a copy, not a view
                state.update(best=best, best_score=score, best_step=done, bad_evals=0, best_setting=setting)
            else:
                state["bad_evals"] += 1
            data.log(f"step {done}: val mean sensitivity {score:.4f} ({setting}); best {state['best_score']:.4f} "
                     f"at step {state['best_step']}")
            writer.write(dict(step=done, split="val", time=time.time(), mean_sensitivity=score, **setting))
            model.save_checkpoint(ckpt_path, dict(version=1, step=done, args=vars(args), heads=det.trainable_state(),
                                                  optimizer=opt.state_dict(), early_stop=state))
            metrics.draw_curves(os.path.join(args.out, "curves.png"), writer.read(), CURVES, title=f"detect.py: "
                                f"{args.out}, step {done}/{args.steps}, validation mean sensitivity (official rules)")
    epochs, run_epochs = (n * args.batch_size / len(samples) for n in (done, done - start))  # t_train: this run's
    return state, dict(train_s=t_train, epochs=epochs, s_per_epoch=t_train / run_epochs if run_epochs else None)


def evaluate(det, anchors, split, cache, args, device, timing, chosen=None):
    """Thresholds on validation (chosen: the (setting, score) training found for these weights); then the held-out
    split: official metrics, DBT-DINO's variant, FROC points, per-class sensitivity, patient bootstrap CI, random
    baseline, predictions.csv and figures."""
    setting, val_score = chosen or validate(det, anchors, split["val"], cache, args, device)
    held = split["test"] or split["val"]
    name = "test" if split["test"] else "val"
    t0 = time.perf_counter()
    dets = [predict_volume(det, anchors, v, args, device, cache) for v in held]
    per_slice = (time.perf_counter() - t0) / max(1, sum(v["n_slices"] for v in held))
    cands = [aggregate(d, v, **setting) for d, v in zip(dets, held)]
    rows = [r for v, c in zip(held, cands) for r in submission_rows(v, c)]
    cols = ["PatientID", "StudyUID", "View", "X", "Width", "Y", "Height", "Z", "Depth", "Score"]
    metrics.atomic_write(os.path.join(args.out, "predictions.csv"), metrics.csv_text(rows, cols))
    result = dict(split=name, volumes=len(held), thresholds=dict(setting, val_mean_sensitivity=val_score),
                  seconds_per_slice_inference=per_slice, **timing)
    if not split["test"]:  # --test-fraction 0, or official CSVs without a test file
        result["warning"] = ("no test split: the score is on the validation split that chose the early-stopping "
                             "step and the thresholds, so it is optimistic")
        data.log(f"WARNING: {result['warning']}")
    if not any(v["raw_boxes"] for v in held):
        data.log(f"{name}: no ground-truth boxes; wrote predictions.csv only")
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
    result["random_baseline"] = dict(mean_sensitivity_mean=float(np.mean(base)), sd=float(np.std(base)),
                                     draws=len(base), boxes=len(rows))
    random_curve = metrics.dbtex_froc(labels, boxes, draws[0], max_fps=6.0) if rows else curve
    draw_froc(os.path.join(args.out, "froc.png"), [
        (f"model: mean sens {result['official']['mean_sensitivity_positive']:.3f}", curve, (30, 80, 200)),
        (f"random boxes: {np.mean(base):.3f} (mean of {len(base)})", random_curve, (150, 150, 150))])
    draw_examples(os.path.join(args.out, "examples.png"), held, cands, cache, args.image_size)
    return result


# -----------------------------------------------------------------------------------------------------------
# main flow, random search, the bench hook

def load_backbone(args):
    """The frozen ViT and a line saying where it came from; no --backbone: newest runs/*/backbone.pth, else random."""
    path, how = model.backbone_file(args.backbone)
    torch.manual_seed(args.seed)  # a random backbone is the same in every run of this seed (resume relies on it)
    vit = model.build(args.model)
    source = f"backbone: RANDOM {args.model} ViT ({how}): untrained features, a plumbing check, not DBT-DINO"
    if path:
        model.load_pretrained(vit, path)
        source = f"backbone: {args.model} from {path} (frozen, {how})"
    if args.compile:  # after the weights are in: the compiled blocks run whatever the module holds
        model.compile_blocks(vit, log=data.log)
    return vit, source


# flags that neither change the trained weights nor the choices made on validation: a resume may change them
RESUME_FREE = ("out", "resume", "overwrite", "device", "amp", "compile", "chunk", "log_every", "n_boot",
               "baseline_draws", "trials")


def load_resume(path, args):
    """ckpt.pt -> dict, checked as pretrain.py's: a file that is not a detect.py checkpoint, or one whose run flags
    (data, split, model, training, validation grid) differ from these, is one error naming the file and the flags."""
    ckpt = model.read_checkpoint(path)  # a corrupt file is one line naming it
    need = {"heads", "optimizer", "step", "early_stop", "args"}
    have = set(ckpt) if isinstance(ckpt, dict) else set()
    if not need <= have:
        raise ValueError(f"{path}: not a detect.py ckpt.pt (it lacks {sorted(need - have)}); --resume auto continues "
                         "a detect.py run, --overwrite starts afresh")
    metrics.check_resume_flags(path, ckpt["args"], args, [k for k in vars(args) if k not in RESUME_FREE])
    return ckpt


def main(args):
    if args.trials:
        return search(args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    hub = args.model != "tiny"
    # tiny on a CPU: 336 px (a 24 x 24 patch grid) shrinks a 768-px phantom 2.3x, so its smallest lesions (~36 px)
    # stay ~16 px, the size of the smallest P3 anchors (16 x 336/518 x 1-1.6); at 224 they would fall below them,
    # and 518 costs 2.4x the head compute of 336 per slice
    args.image_size = args.image_size or (REF if hub else 336)
    args.channels = args.channels or (256 if hub else 64)
    backbone, source = load_backbone(args)  # checked before the (slow, once) phantom archive is built
    args.backbone = model.backbone_file(args.backbone)[0] or "random"  # the file used: a resume checks it
    if args.data == "synthetic":
        S, H, W = args.synthetic_size
        name = f"detect-p{args.synthetic_patients}-s{args.synthetic_seed}-{S}x{H}x{W}-l{args.synthetic_lesions:g}"
        root = data.synthetic_archive(data.cache_base() / name, args.synthetic_patients, args.synthetic_seed,
                                      (S, H, W), args.synthetic_lesions)
    elif not os.path.isdir(args.data):
        raise FileNotFoundError(f"{args.data}: no such folder")
    else:
        root = args.data
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = load_resume(ckpt_path, args) if args.resume == "auto" and os.path.exists(ckpt_path) else None
    stale = [] if ckpt else metrics.check_run_folder(args.out, "ckpt.pt", args.overwrite, "detect.py", (
        "metrics.json", "predictions.csv", "froc.png", "examples.png", "curves.png"))
    volumes, skipped = load_volumes(root)
    split = split_volumes(volumes, args.val_fraction, args.test_fraction, args.seed)
    if not split["val"]:
        raise ValueError(f"{root}: no validation volumes; raise --val-fraction")
    det = Detector(backbone, args.channels, args.dropout).to(device)
    if ckpt:
        try:
            det.load_state_dict(ckpt["heads"], strict=False)
        except RuntimeError as e:  # the flags fit but the weights do not: a hand-edited or foreign file
            why = " ".join(str(e).split())[:200]
            raise ValueError(f"{ckpt_path}: its heads do not fit the model ({why})") from None
    data.log(f"*** {source} ***")
    # only now: a refused start leaves the run's args.json (and with --overwrite the old run's files) alone
    metrics.write_args(args.out, args, "detect.py", stale, backbone_source=source, torch=torch.__version__,
                       skipped_volumes=skipped)
    data.log(f"{root}: " + ", ".join(f"{k} {len(v)} volumes ({sum(len(x['boxes']) for x in v)} boxes)"
                                     for k, v in split.items()) + f"; {args.image_size} px on {device}")
    anchors = make_anchors(args.image_size, grid_sizes(args.image_size, backbone.patch_size)).to(device)
    cache = SliceCache(args.image_size)
    state, timing = train(det, anchors, split, cache, args, device, ckpt)
    if state["best"] is not None:
        det.load_state_dict(state["best"], strict=False)
    chosen = (state["best_setting"], state["best_score"]) if state.get("best_setting") else None
    result = evaluate(det, anchors, split, cache, args, device, dict(timing, best_step=state["best_step"]), chosen)
    result["backbone"] = source
    metrics.atomic_write(os.path.join(args.out, "metrics.json"), json.dumps(result, indent=1) + "\n")
    _report(result, args.out)
    return result


def _report(r, out):
    if "official" not in r:
        return
    o, ci, b = r["official"], r["mean_sensitivity_ci95"], r["random_baseline"]
    data.log(f"{r['split']} ({r['volumes']} volumes), official DBTex: mean sensitivity "
             f"{o['mean_sensitivity_positive']:.3f}"
             f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, patients resampled), sens@2FP all {o['sensitivity_at_2_fps_all']:.3f};"
             f" random boxes {b['mean_sensitivity_mean']:.3f} +- {b['sd']:.3f}")
    data.log(f"paper variant (NOT official): {r['paper_variant_NOT_official']}; by class @4FP: "
             f"{r['sensitivity_at_4_fps_by_class']}; written to {out}")
    if "warning" in r:  # repeated under the score it qualifies
        data.log(f"WARNING: {r['warning']}")


def _sample(rng, kind, a, b=None):
    if kind == "choice":
        return a[int(rng.integers(len(a)))]
    if kind == "int":
        return int(rng.integers(a, b + 1))
    x = rng.uniform(math.log(a), math.log(b)) if kind == "log" else rng.uniform(a, b)
    return float(math.exp(x) if kind == "log" else x)


def search(args):
    """--trials N: N runs with flags drawn from SEARCH_SPACE (seeded), ranked by validation mean sensitivity."""
    rng, results = np.random.default_rng(args.seed), []
    os.makedirs(args.out, exist_ok=True)
    for k in range(args.trials):
        trial = copy.copy(args)
        trial.trials, trial.out = 0, os.path.join(args.out, f"trial-{k}")
        drawn = {name: _sample(rng, *spec) for name, spec in SEARCH_SPACE.items()}  # every draw, every trial
        drawn["bg_iou"] = min(drawn["bg_iou"], drawn["fg_iou"])
        vars(trial).update(drawn)
        done = os.path.join(trial.out, "metrics.json")
        r = json.load(open(done)) if os.path.exists(done) else main(trial)
        results.append(dict(trial=k, val_mean_sensitivity=r["thresholds"]["val_mean_sensitivity"], **drawn))
        results.sort(key=lambda x: -x["val_mean_sensitivity"])
        metrics.atomic_write(os.path.join(args.out, "trials.json"), json.dumps(results, indent=1) + "\n")
    data.log(f"best trial: {results[0]} -> {args.out}/trial-{results[0]['trial']}")
    return results


@torch.no_grad()
def time_inference(device, image_size=518, n_slices=64, name="vitb14", channels=256, chunk=16):
    """Volume inference throughput on random slices, for bench.py: backbone + neck + head + score threshold.
    NMS is left out of the figure on purpose: an untrained head scores every anchor near its 0.05 prior, so NMS
    would sort ~10^4 boxes per slice, a cost a trained detector (a few boxes above threshold) never pays."""
    device = torch.device(device)
    det = Detector(model.build(name), channels, 0.0).to(device).eval()
    anchors = make_anchors(image_size, grid_sizes(image_size)).to(device)
    x = torch.rand(chunk, 3, image_size, image_size, device=device)
    with _autocast(device):
        det(x[:2])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(math.ceil(n_slices / chunk)):
        with _autocast(device):
            logits, deltas = det(x)
        postprocess(logits.float(), deltas.float(), anchors, image_size, 0.5, 0.2)  # 0.5: no untrained box passes
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = math.ceil(n_slices / chunk) * chunk
    return dict(model=name, image_size=image_size, slices=n, seconds=seconds, slices_per_s=n / seconds,
                dtype="bf16" if device.type == "cuda" else "fp32")


if __name__ == "__main__":
    try:
        main(get_args())
    except (ValueError, FileNotFoundError, OSError) as e:  # bad input: one line naming it, not a traceback
        sys.exit(f"error: {e}")
