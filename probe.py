"""Frozen-backbone probes on DBT exams: cached embeddings, breast density, 5-year risk (DBT-DINO §2.4, §6.2).

Every slice of the four views of an exam goes through a frozen backbone once; per view the patch and CLS tokens
are summarised (mean, std, min, max jointly over slices and patches; CLS mean and std over slices), the views are
concatenated in DBT-DINO's order RCC, LCC, RMLO, LMLO, and a linear head is trained on top:
  density  Linear(F, 4), cross-entropy, AdamW (wd 1e-4) + cosine, batch 64, 75 epochs, LR search in [1e-5, 1e-2]
  risk     DBT-DINO's cumulative hazard head (softplus, upper-triangular sum, 1 - exp(-H)), masked BCE normalised
           per sample, balanced sampling, 100 epochs, LR search in [1e-5, 1e-3]
Facts: ../shared/spec/downstream.md §1-3 (what DBT-DINO's code does), detection_metrics.md §4 (Mirai).

Commands and flags: README.md and --help.
The exam table (--data, or a folder holding exams.csv) has one row per exam: patient, exam, LCC, RCC, LMLO, RMLO
(paths relative to the CSV), and optionally density (a-d), years_to_cancer (empty when none),
years_of_followup, split (train/val/test, one per patient; else 60/20/20 by patient, seeded) and any --subgroups
columns.
From a PACS (--data dicomweb+..., the table as --manifest) each view cell names one instance as
StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID; only those are ever requested (README, pacs.py).
Embeddings are cached per exam under $DBT_DINO_CACHE/embeddings/<backbone weights + preprocessing>/: a rerun
embeds only what is missing. On a GPU, --compile (the ViT's blocks) and --precision bf16-weights are the fastest
embedding settings measured (README, Performance). --out gets args.json, metrics.jsonl (LR-search curves), metrics.json,
predictions.csv, head.pt and confusion.png (density) or roc.png (risk).
Differences from DBT-DINO's code: features are standardised with the training set's mean and std before the
head (an affine map the head could absorb; it makes one LR range fit every backbone), and the LR search draws
log-uniform at random with Optuna's median-pruning rule instead of Optuna's TPE sampler.
"""
import argparse
import copy
import csv
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import metrics
import model
import pacs

VIEWS = ("RCC", "LCC", "RMLO", "LMLO")  # DBT-DINO's concatenation order
STATS = ("patch_mean", "patch_std", "patch_min", "patch_max", "cls_mean", "cls_std")
FEATURES = {"patch-mean-std": ("patch_mean", "patch_std"), "patch-mean": ("patch_mean",),
            "cls-mean": ("cls_mean",), "cls-mean-std": ("cls_mean", "cls_std"),
            "patch-all": ("patch_mean", "patch_std", "patch_min", "patch_max")}
TASKS = {"density": dict(epochs=75, lr=(1e-5, 1e-2)), "risk": dict(epochs=100, lr=(1e-5, 1e-3))}
PRECISIONS = ("autocast", "bf16-weights", "fp32")
ARCH_BY_WIDTH = {96: "tiny", 384: "vits14", 768: "vitb14", 1024: "vitl14", 1536: "vitg14"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREPROCESS_VERSION = 2  # bump when the display transform, resize or statistics change: the cache key uses it
YEARS = 5


# ----------------------------------------------------------------------------- the exam table
def read_exams(source):
    """--data (a CSV, or a folder holding exams.csv) -> (rows as dicts, the folder view paths are relative to)."""
    path = Path(source)
    path = path / "exams.csv" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exam table (give a CSV, or a folder holding exams.csv)")
    rows = data.read_csv(path)
    if not rows:
        raise ValueError(f"{path}: no exams")
    missing = [c for c in ("patient", "exam") + VIEWS if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    seen = set()
    for i, r in enumerate(rows):
        if r["exam"] in seen:
            raise ValueError(f"{path}: row {i + 1}: exam {r['exam']!r} appears twice")
        seen.add(r["exam"])
    return rows, path.parent


def assign_splits(rows, seed):
    """The table's `split` column, else 60/20/20 by patient, seeded: all exams of one patient share a split."""
    if "split" in rows[0]:
        bad = next((i for i, r in enumerate(rows) if r["split"] not in ("train", "val", "test")), None)
        if bad is not None:
            raise ValueError(f"exam table row {bad + 1}: split {rows[bad]['split']!r} is not train, val or test")
        first = {}
        for r in rows:  # a patient in two splits leaks their other exams' features into the evaluation
            s = first.setdefault(r["patient"], r["split"])
            if s != r["split"]:
                raise ValueError(f"exam table: patient {r['patient']!r} has exams in both the {s} and the "
                                 f"{r['split']} split; all of a patient's exams must share one split")
        return [r["split"] for r in rows]
    patients = sorted({r["patient"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train, n_val = round(0.6 * len(patients)), round(0.2 * len(patients))
    split_of = {patients[i]: "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
                for rank, i in enumerate(order)}
    return [split_of[r["patient"]] for r in rows]


def stratified_subset(labels, fraction, seed):
    """Sorted indices of a class-stratified `fraction` of the cases (at least one per class), seeded."""
    rng, keep = np.random.default_rng(seed), []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep += rng.choice(idx, max(1, round(fraction * len(idx))), replace=False).tolist()
    return np.sort(keep)


# ----------------------------------------------------------------------------- backbones
class DenseNetFeatures(nn.Module):
    """The paper's CNN baseline: torchvision DenseNet-121 (ImageNet normalisation inside), the pooled 1024-d vector
    per slice. It is returned as the CLS token and as the only patch token, so aggregate() gives the paper's mean
    and std over slices for both."""

    def __init__(self, weights=None):
        super().__init__()
        import torchvision  # only this baseline needs it
        net = torchvision.models.densenet121(weights=None)
        if weights:
            state = model.read_checkpoint(weights)
            if not isinstance(state, dict):
                raise ValueError(f"{weights}: not a DenseNet-121 state dict (a {type(state).__name__})")
            # torchvision's released file names layers "norm.1"; the module calls them "norm1"
            state = {re.sub(r"\.(norm|relu|conv)\.([12])(?=\.)", r".\1\2", k): v for k, v in state.items()}
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"{weights}: not a DenseNet-121 state dict ({str(e).splitlines()[0]})") from None
        self.features = net.features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.config = {"img_size": 224}

    def forward_features(self, x):
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        pooled = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)  # (B, 1024)
        return {"x_norm_clstoken": pooled, "x_norm_patchtokens": pooled[:, None]}  # (B, D), (B, 1, D)


def load_backbone(spec="", arch="auto", weights="", seed=0):
    """-> (frozen backbone with forward_features, one-line description).

    spec: a model.load_pretrained file (--arch names the architecture; auto reads it from the width), the word
    densenet121, the word random, or '' for the newest runs/*/backbone.pth, else a randomly initialised tiny ViT
    (seeded)."""
    if spec == "densenet121":
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # random weights are reproducible, so their cache entries are reused
            net = DenseNetFeatures(weights or None)
        return net.eval(), f"DenseNet-121, {weights or f'RANDOM weights (seed {seed})'}, ImageNet normalisation"
    if weights:
        raise ValueError("--weights is only for --backbone densenet121; give a ViT file as --backbone PATH")
    spec, how = model.backbone_file(spec)
    if not spec:  # --arch picks the random ViT (a random ViT-B baseline); a bad name is one line, not ignored
        name = "tiny" if arch == "auto" else arch
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = model.build(name)
        return net.eval(), f"RANDOMLY INITIALISED {name} ViT (seed {seed}; {how})"
    state = model.backbone_state_dict(model.read_checkpoint(spec), spec)
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{spec}: not a ViT backbone (no pos_embed / patch_embed)")
    width = state["pos_embed"].shape[-1]
    if arch == "auto":
        if width not in ARCH_BY_WIDTH:
            raise ValueError(f"{spec}: width {width} matches no architecture; name one with --arch")
        arch = ARCH_BY_WIDTH[width] + ("_reg" if "register_tokens" in state else "")
    grid, patch = math.isqrt(state["pos_embed"].shape[1] - 1), state["patch_embed.proj.weight"].shape[-1]
    net = model.load_pretrained(model.build(arch, img_size=grid * patch, patch_size=patch), state)
    return net.eval(), f"{spec} ({arch}, {grid * patch} px, {how})"


# ----------------------------------------------------------------------------- embedding
def voi_rows(meta):
    """Per-slice display parameters with data.apply_voi's conventions folded in: float32 (S, 4) rows of
    [slope, intercept, center, width] and (S,) bool, True for a SIGMOID window."""
    rows, sigmoid = [], []
    for slope, icpt, c, w, fn in meta["voi"]:
        if c is None:  # no window: the nominal stored range, LINEAR_EXACT (as apply_voi)
            lo = -(2 ** (meta["bits_stored"] - 1)) if meta["signed"] else 0
            lo, hi = sorted((lo * slope + icpt, (lo + 2 ** meta["bits_stored"] - 1) * slope + icpt))
            c, w, fn = (lo + hi) / 2, max(hi - lo, 1e-12), "LINEAR_EXACT"
        if fn not in ("SIGMOID", "LINEAR_EXACT"):
            c, w = c - 0.5, w - 1
        rows.append([slope, icpt, c, w if fn == "SIGMOID" else max(w, 1e-12)])
        sigmoid.append(fn == "SIGMOID")
    return torch.tensor(rows, dtype=torch.float32), torch.tensor(sigmoid)


def display(stored, rows, sigmoid, invert):
    """data.apply_voi and the MONOCHROME1 inversion on the device: stored (S, H, W) integers -> (S, H, W) in [0, 1]."""
    slope, icpt, c, w = rows.T[..., None, None]  # each (S, 1, 1)
    x = stored.float() * slope + icpt
    lin = ((x - c) / w + 0.5).clamp(0, 1)
    x = torch.where(sigmoid[:, None, None], torch.sigmoid(4 * (x - c) / w), lin) if sigmoid.any() else lin
    return 1 - x if invert else x


class VolumeReader(torch.utils.data.Dataset):
    """One item per volume, decoded on a loader worker one slice at a time: (i, dict) with the stored integers
    (S, H, W) and their display parameters, or (i, message) when the volume cannot be read."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.read(i, self.paths[i])

    def read(self, i, path):
        try:
            meta = data.index_volume(path)  # headers + the volume's one orientation decision
            first = data.decode_slice(meta, 0)  # (H, W): gives the stored dtype
            stored = torch.empty((meta["n_frames"], *first.shape), dtype=torch.from_numpy(first[:0]).dtype)
            if torch.utils.data.get_worker_info() is not None:
                # decode straight into shared memory, so the hand-over to the main process moves a file descriptor
                # instead of copying the volume: 50 -> 63 slices/s with 1 worker, 71 -> 95 with 2 (60 x 2457 x 1996,
                # 2-core CPU, median of 4 alternated runs); the copy's cost is page faults on 590 MB of fresh memory
                stored.share_memory_()
            out = stored.numpy()  # (S, H, W), the same memory
            out[0] = first
            for s in range(1, meta["n_frames"]):
                out[s] = data.decode_slice(meta, s)
        except (ValueError, OSError) as e:
            return i, str(e)
        rows, sigmoid = voi_rows(meta)
        return i, {"stored": stored, "rows": rows, "sigmoid": sigmoid, "invert": meta["invert"], "flip": meta["flip"]}


class RemoteVolumeReader(VolumeReader):
    """VolumeReader for DICOMweb instances (uids: dicts of pacs.UID_COLUMNS): each worker fetches into the rotating
    cache and reads the file through VolumeReader.read, pinned only while read (one volume per worker). A failed
    fetch is an (i, message) skip; AuthError and CacheFull come back as the item, for embed_volumes to raise."""

    def __init__(self, client, uids):
        self.client, self.uids = client, list(uids)
        self.paths = ["/".join(u[c] for c in pacs.UID_COLUMNS) for u in self.uids]  # labels for the logs

    def __getitem__(self, i):
        try:
            path, pin = self.client.fetch(self.uids[i])
        except pacs.FetchError as e:
            return i, str(e)
        except (pacs.AuthError, pacs.CacheFull) as e:
            return i, e
        try:
            return self.read(i, path)
        finally:
            self.client.cache.unpin(pin)


def aggregate(patch_tokens, cls_tokens):
    """DBT-DINO's per-view statistics (downstream.md §1): patch tokens (S, N, D) jointly over slices and patches,
    CLS tokens (S, D) over slices -> dict of six (D,) tensors. Std is unbiased, torch's default, as theirs (so a
    one-slice view has a NaN cls_std)."""
    p = patch_tokens.reshape(-1, patch_tokens.shape[-1])  # (S*N, D)
    return {"patch_mean": p.mean(0), "patch_std": p.std(0), "patch_min": p.amin(0), "patch_max": p.amax(0),
            "cls_mean": cls_tokens.mean(0), "cls_std": cls_tokens.std(0)}


def _prepare(backbone, device, precision):
    """-> (network, input dtype, autocast on?). bf16-weights casts a copy, so the caller's backbone stays fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    net = backbone.to(device).eval()
    if precision == "bf16-weights":
        return copy.deepcopy(net).to(torch.bfloat16), torch.bfloat16, False
    return net, torch.float32, precision == "autocast" and device.type == "cuda"


def display_chunks(item, device, chunk):
    """Displayed slices of one VolumeReader item, `chunk` at a time: (c, H, W) in [0, 1] on `device`, mirrored to
    the canonical orientation (chest wall left) by the volume's index decision, as data.read_dbt."""
    stored = item["stored"].to(device, non_blocking=True)  # (S, H, W) stored integers: 2 bytes a pixel to move
    rows, sigmoid = item["rows"].to(device), item["sigmoid"].to(device)
    for start in range(0, len(stored), chunk):
        part = slice(start, start + chunk)
        x = display(stored[part], rows[part], sigmoid[part], item["invert"])  # (c, H, W)
        yield x.flip(-1) if item["flip"] else x


def _embed_one(net, item, device, size, chunk, dtype, amp):
    patches, cls = [], []
    for x in display_chunks(item, device, chunk):
        # DBT-DINO stretches every slice to a square, grey repeated to 3 channels, no ImageNet normalisation
        x = F.interpolate(x[:, None], size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net.forward_features(x.expand(-1, 3, -1, -1).to(dtype))  # (c, 3, size, size) in
        patches.append(out["x_norm_patchtokens"].float())  # (c, N, D)
        cls.append(out["x_norm_clstoken"].float())  # (c, D)
    return {k: v.cpu() for k, v in aggregate(torch.cat(patches), torch.cat(cls)).items()}


@torch.inference_mode()
def embed_volumes(backbone, paths, device, *, size=518, chunk=75, workers=2, precision="autocast", client=None):
    """Embed DBT volumes with a frozen backbone -> (features, stats).

    paths: local files, or with a pacs.Client `client`, dicts of the instances' three UIDs. features: per path the
    six aggregate() (D,) tensors, or None when unreadable or not fetched (logged); AuthError and CacheFull stop the
    run. stats: slices, seconds, wait_seconds (blocked on the loader), skipped. Workers decode; the display
    transform, mirror and resize run on `device`, `chunk` slices at a time. precision: one of PRECISIONS."""
    device = torch.device(device)
    net, dtype, amp = _prepare(backbone, device, precision)
    reader = VolumeReader(paths) if client is None else RemoteVolumeReader(client, paths)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    features, stats = [None] * len(paths), dict(slices=0, seconds=0.0, wait_seconds=0.0, skipped=0)
    progress, t0, every = metrics.Progress(len(paths)), time.perf_counter(), max(1, len(paths) // 10)
    batches = iter(loader)
    for n in range(1, len(paths) + 1):
        t = time.perf_counter()
        i, item = next(batches)
        stats["wait_seconds"] += time.perf_counter() - t
        if isinstance(item, Exception):  # a refused login or a full cache: every further volume would fail too
            raise item
        if isinstance(item, str):
            data.log(f"skipped unreadable view: {item}")
            stats["skipped"] += 1
        else:
            features[i] = _embed_one(net, item, device, size, chunk, dtype, amp)  # .cpu() waits for the device
            stats["slices"] += len(item["stored"])
        if n % every == 0 or n == len(paths):
            spent = time.perf_counter() - t0
            rate, wait = stats["slices"] / spent, stats["wait_seconds"] / spent
            data.log("embed " + progress.line(n, {"slices/s": rate, "data_wait": wait}, rate,
                                              1000 * spent / n, 1000 * stats["wait_seconds"] / n))
    stats["seconds"] = time.perf_counter() - t0
    return features, stats


# ----------------------------------------------------------------------------- the per-exam cache
def cache_key(net, size, precision, device):
    """Weights (every tensor's bytes) + preprocessing: a different file, size or precision never reuses entries."""
    h = hashlib.sha1()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    effective = {"autocast": "bf16-autocast" if device.type == "cuda" else "fp32"}.get(precision, precision)
    h.update(json.dumps([type(net).__name__, size, effective, PREPROCESS_VERSION]).encode())
    return h.hexdigest()[:16]


def exam_file(folder, row, root):
    """An exam's cache file, named by patient, exam and its views: for local files the resolved path, size and
    modification time of each (a file copied over a view, or another cohort with the same IDs and relative paths,
    never reuses an entry); for a DICOMweb exam table (root None) the instances' UIDs alone, which name immutable
    instances, so the same exam through any server URL, proxy or port reuses it."""
    views = [f"dicomweb:{row[v]}" if root is None else _file_identity(Path(root) / row[v]) for v in VIEWS]
    ident = json.dumps([row["patient"], row["exam"]] + views)
    return Path(folder) / f"{hashlib.sha1(ident.encode()).hexdigest()[:20]}.pt"


def _file_identity(path):
    """[resolved path, size, mtime in ns]; a missing file has no size (its exam is skipped, never cached)."""
    path = path.resolve()
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def _cached(file):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # a file from another version, or damaged on disk: embed again
        return None


def embed_exams(net, rows, root, folder, device, *, size, chunk, workers, precision, batch=128, client=None):
    """{row index: {view: {stat: (D,)}}} for every readable exam; one atomic cache file per exam, so a rerun
    embeds only the missing ones. Exams with a missing, unreadable or unfetchable view are left out and counted.
    With a pacs.Client `client`, each view cell names an instance (instance_uids) and root is unused."""
    root = None if client else root
    out, todo, skipped = {}, [], 0
    # named before any view is read: a file replaced while it is embedded gets a new name on the next run
    files = [exam_file(folder, r, root) for r in rows]
    for j, r in enumerate(rows):
        record = _cached(files[j])  # None when absent or unreadable
        if record is not None:
            out[j] = record
            continue
        absent = _absent_views(r, root)
        for what in absent:
            data.log(f"skipped exam {r['exam']}: {what}")
        skipped += bool(absent)
        todo += [] if absent else [j]
    reused = len(out)
    data.log(f"embeddings: {reused} exams reused from {folder}, {len(todo)} to embed")
    Path(folder).mkdir(parents=True, exist_ok=True)
    if client and todo:  # a few instances to fetch, first views first (the first exam's may all be absent)
        cells = list(dict.fromkeys(rows[j][v] for v in VIEWS for j in todo[:3]))[:3]
        check_remote(client, [instance_uids(c) for c in cells], workers, reused)
    for start in range(0, len(todo), batch):  # batches bound the memory; each finished exam is saved at once
        part = todo[start:start + batch]
        views = [rows[j][v] for j in part for v in VIEWS]
        views = [instance_uids(c) for c in views] if client else [root / c for c in views]
        feats, _ = embed_volumes(net, views, device, size=size, chunk=chunk, workers=workers, precision=precision,
                                 client=client)
        for a, j in enumerate(part):
            views = feats[4 * a:4 * a + 4]
            if any(v is None for v in views):
                skipped += 1
                continue
            out[j] = dict(zip(VIEWS, views))
            model.save_checkpoint(files[j], out[j])
    data.log(f"embeddings: {reused} reused, {len(out) - reused} embedded, {skipped} exams left out "
             "(missing or unreadable views)")
    return out, dict(reused=reused, embedded=len(out) - reused, skipped=skipped)


def _absent_views(row, root):
    """What makes an exam unembeddable before reading it: view files missing, or (DICOMweb, root None) empty cells."""
    if root is None:
        return [f"view {v} names no instance" for v in VIEWS if not row[v]]
    return [f"view file missing: {root / row[v]}" for v in VIEWS if not (root / row[v]).exists()]


def instance_uids(cell, where="view"):
    """'StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID' -> dict of pacs.UID_COLUMNS, each a valid DICOM UID."""
    uids = cell.split("/")
    if len(uids) != 3 or not all(len(u) <= 64 and pacs.UID.fullmatch(u) for u in uids):
        raise ValueError(f"{where}: {cell[:80]!r} is not StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID")
    return dict(zip(pacs.UID_COLUMNS, uids))


def check_remote(client, candidates, workers, reused=0):
    """Fetch the first fetchable of `candidates` before the loader forks: a refused login stops here after one
    request, and its size tells whether the cache holds one pinned volume per worker. When none can be fetched and
    no exam was reused, the server is taken for unreachable (instead of retrying every instance in turn)."""
    reasons = []
    for uids in candidates:
        try:
            path, pin = client.fetch(uids)
            break
        except pacs.FetchError as e:
            reasons.append(str(e))
    else:
        if reasons and not reused:
            raise ValueError(f"{client.url}: none of the first {len(reasons)} instances could be fetched: "
                             + "; ".join(reasons))
        return
    try:
        size = path.stat().st_size
    finally:
        client.cache.unpin(pin)
    n = max(workers, 1)
    if n * size > client.cache.cap:
        raise ValueError(f"--cache-bytes {client.cache.cap} cannot hold the {n} volumes read at once "
                         f"(one per loader worker, about {size / 2**20:.0f} MiB each): use at least "
                         f"{math.ceil(n * size / 2**20)}M")


def feature_matrix(records, features):
    """(M, F) float32: per statistic of --features, the four views in DBT-DINO's order (RCC, LCC, RMLO, LMLO)."""
    x = torch.stack([torch.cat([rec[v][s] for s in FEATURES[features] for v in VIEWS]) for rec in records])
    bad = int((~torch.isfinite(x).all(1)).sum())
    if bad:
        raise ValueError(f"--features {features}: {bad} exams have non-finite features (cls-std of a one-slice "
                         "view is undefined); choose patch features")
    return x.float()  # (M, F)


# ----------------------------------------------------------------------------- heads, labels, losses
def risk_labels(years_to_cancer, years_of_followup, years=YEARS):
    """Mirai's get_label -> (y_label, y_mask), float32 (N, years) arrays.

    A cancer within `years` (years_to_cancer < years; NaN or inf = none) has event year t = int(years_to_cancer):
    y_label[t:] = 1, observed through t. Otherwise t = int(min(follow-up, years) - 1) and y_label is all 0. The
    mask is 1 for years 0..t; follow-up <= 0 gives an all-zero mask (Mirai's check_label drops the exam)."""
    ytc = np.nan_to_num(np.asarray(years_to_cancer, dtype=float), nan=np.inf)
    yfu = np.asarray(years_of_followup, dtype=float)
    cancer = ytc < years
    t = np.where(cancer, np.trunc(np.where(cancer, ytc, 0)), np.trunc(np.minimum(yfu, years) - 1))
    k = np.arange(years)[None, :]  # (1, years)
    y_label = (cancer[:, None] & (k >= t[:, None])).astype(np.float32)
    y_mask = (k <= t[:, None]).astype(np.float32)
    return y_label, y_mask


class CumulativeRiskHead(nn.Module):
    """DBT-DINO's risk head: hazards = softplus(Linear(F, years)), H[j] = sum_{i <= j} hazards[i] through an
    upper-triangular mask, p = 1 - exp(-H). forward -> (B, years) probabilities, in [0, 1] and non-decreasing.
    (Mirai uses ReLU hazards + an unconstrained base hazard and reads the sum as a logit: detection_metrics §4.1.)"""

    def __init__(self, in_dim, years=YEARS):
        super().__init__()
        self.hazard_fc = nn.Linear(in_dim, years)
        self.register_buffer("upper", torch.triu(torch.ones(years, years)))  # upper[i, j] = 1 iff i <= j

    def forward(self, x):
        hazards = F.softplus(self.hazard_fc(x))  # (B, years), > 0
        return 1 - torch.exp(-(hazards @ self.upper))  # (B, years)


def risk_loss(p, y_label, y_mask):
    """DBT-DINO's masked BCE: per sample, the BCE summed over observed years divided by that sample's number of
    observed years, then averaged over the batch (Mirai divides by the batch's total instead)."""
    bce = F.binary_cross_entropy(p, y_label, weight=y_mask, reduction="none")  # (B, years), 0 where censored
    return (bce.sum(1) / y_mask.sum(1).clamp(min=1)).mean()


# ----------------------------------------------------------------------------- training and the LR search
def train_head(head, loss_fn, train, val, *, lr, epochs, batch_size, seed, weights=None, prune=None, log=None):
    """AdamW (wd 1e-4) with a cosine schedule over `epochs`; keeps the epoch with the lowest validation loss.

    train, val: (features, tuple of targets). weights: (per-case sampling weights, draws per epoch), drawn with
    replacement; None = one shuffled pass. prune(epoch, best val loss so far) -> True stops the trial.
    Returns (best val loss, its head state, its epoch, val-loss curve)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    (x, ys), (xv, yvs) = train, val
    best, curve = (math.inf, None, -1), []
    for epoch in range(epochs):
        head.train()
        order = (torch.multinomial(weights[0], weights[1], replacement=True, generator=g) if weights is not None
                 else torch.randperm(len(x), generator=g))
        total = 0.0
        for idx in order.split(batch_size):
            loss = loss_fn(head(x[idx]), *(y[idx] for y in ys))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        head.eval()
        with torch.no_grad():
            v = loss_fn(head(xv), *yvs).item()
        curve.append(v)
        if log:
            log(epoch, total / len(order), v)
        if v < best[0]:
            best = (v, copy.deepcopy(head.state_dict()), epoch)
        if prune and prune(epoch, min(curve)):
            break
    return (*best, curve)


def lr_search(make_head, loss_fn, train, val, *, lr_range, trials, epochs, batch_size, seed, weights=None,
              writer=None):
    """Seeded log-uniform LR search with Optuna's MedianPruner rule (DBT-DINO's: 5 startup trials, 15 warm-up
    epochs): from epoch 15 on, a trial stops when its best validation loss so far is worse than the median of the
    completed trials' losses at that epoch. Returns dict(lr, state, val_loss, epoch, trial)."""
    rng, done, best = random.Random(seed), [], None
    for t in range(trials):
        lr = math.exp(rng.uniform(math.log(lr_range[0]), math.log(lr_range[1])))

        def prune(epoch, value):
            at = [c[epoch] for c in done if len(c) > epoch]
            return len(done) >= 5 and epoch >= 15 and bool(at) and value > statistics.median(at)

        def log(epoch, train_loss, val_loss):
            if writer:
                writer.write({"step": t * epochs + epoch, "trial": t, "epoch": epoch, "lr": lr,
                              "train_loss": train_loss, "val_loss": val_loss})

        torch.manual_seed(seed * 1000 + t)  # head initialisation
        v, state, epoch, curve = train_head(make_head(), loss_fn, train, val, lr=lr, epochs=epochs,
                                            batch_size=batch_size, seed=seed * 1000 + t, weights=weights,
                                            prune=prune, log=log)
        pruned = len(curve) < epochs
        if not pruned:
            done.append(curve)
        data.log(f"trial {t + 1}/{trials}: lr {lr:.2e}, best val loss {v:.4f} at epoch {epoch + 1}"
                 + (f" (pruned at epoch {len(curve)})" if pruned else ""))
        if best is None or v < best["val_loss"]:
            best = dict(lr=lr, state=state, val_loss=v, epoch=epoch, trial=t)
    if best["state"] is None:  # every epoch of every trial had a NaN or infinite validation loss
        raise ValueError(f"LR search: none of the {trials} trials reached a finite validation loss; check the "
                         "val split's labels and features")
    return best


# ----------------------------------------------------------------------------- reports
def _finite(x):
    """JSON-safe: NaN/inf -> None, numpy scalars and arrays -> Python."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def _nanmean(values):
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _ci(statistic, *arrays, groups, n_boot, seed):
    """[estimate, low, high] by patient bootstrap; NaN when undefined (e.g. a class absent from the test set)."""
    def defined(*a):
        v = statistic(*a)
        if not np.isfinite(v):
            raise ValueError("undefined on this resample")
        return v
    try:
        with warnings.catch_warnings():  # resamples without positives are expected on small test sets
            warnings.simplefilter("ignore")
            return list(metrics.bootstrap_ci(defined, *arrays, n_boot=n_boot, seed=seed, groups=groups))
    except ValueError:
        return [float(statistic(*arrays)), math.nan, math.nan]


def density_report(y, probs, patients, subgroups, n_boot, seed, train_majority):
    """metrics.json for density: accuracy (+ CI by patient), macro F1, one-vs-rest AUROC, confusion, A/B vs C/D,
    and majority_rate, the accuracy of always predicting `train_majority` (the training split's commonest class:
    the test set's own would be a baseline that peeks at the test labels)."""
    pred = probs.argmax(1)
    ovr = {c: metrics.auroc(y == k, probs[:, k]) if 0 < (y == k).sum() < len(y) else math.nan
           for k, c in enumerate("abcd")}
    report = {"accuracy": metrics.accuracy(y, pred),
              "accuracy_ci": _ci(metrics.accuracy, y, pred, groups=patients, n_boot=n_boot, seed=seed)[1:],
              "macro_f1": metrics.macro_f1(y, pred),
              "auroc_ovr": dict(ovr, mean=_nanmean(list(ovr.values()))),
              "confusion": metrics.confusion_matrix(y, pred, labels=range(4)).tolist(),
              "binary_accuracy": metrics.accuracy(y >= 2, pred >= 2), "n_test": len(y),
              "majority_rate": float(np.mean(y == train_majority))}
    report["subgroups"] = {col: {v: dict(zip(("accuracy", "low", "high"), _ci(
        metrics.accuracy, y[values == v], pred[values == v], groups=patients[values == v], n_boot=n_boot,
        seed=seed)), n=int((values == v).sum())) for v in sorted(set(values))} for col, values in subgroups.items()}
    return report


def risk_block(probs, ytc, yfu, patients, rule, n_boot, seed):
    """Per-year AUROC by `rule` with patient-bootstrap CIs, and their mean."""
    def year(k):
        return lambda p, t, u: metrics.risk_auroc_by_year(p, t, u, YEARS, rule)[k]

    def mean(p, t, u):
        return float(np.mean(list(metrics.risk_auroc_by_year(p, t, u, YEARS, rule).values())))
    cis = {k: _ci(year(k), probs, ytc, yfu, groups=patients, n_boot=n_boot, seed=seed) for k in range(1, YEARS + 1)}
    mean_ci = _ci(mean, probs, ytc, yfu, groups=patients, n_boot=n_boot, seed=seed)
    return {"auroc": {k: v[0] for k, v in cis.items()}, "auroc_ci": {k: v[1:] for k, v in cis.items()},
            "auroc_mean": mean_ci[0], "auroc_mean_ci": mean_ci[1:], "rule": rule}


def risk_report(probs, ytc, yfu, patients, density, rule, n_boot, seed):
    """metrics.json for risk: the chosen rule's per-year AUROC at the top, both rules in by_rule, and per-year
    AUROC per density class by both rules (paper Table 4)."""
    by_rule = {r: risk_block(probs, ytc, yfu, patients, r, n_boot, seed) for r in metrics.RISK_RULES}
    report = dict(by_rule[rule], n_test=len(probs), n_cancer=int((ytc < YEARS).sum()), by_rule=by_rule)
    report["by_density"] = {r: {d: risk_block(probs[density == d], ytc[density == d], yfu[density == d],
                                              patients[density == d], r, n_boot, seed)
                                for d in sorted(set(density))} for r in metrics.RISK_RULES}
    return report


# ----------------------------------------------------------------------------- plots (Pillow)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def draw_confusion(confusion, title, path):
    """Counts in a 4 x 4 grid, shaded by the row (true class) fraction."""
    cell, pad = 70, 60
    img = Image.new("RGB", (pad + 4 * cell + 20, pad + 4 * cell + 40), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    d.text((pad + 2 * cell - 30, pad + 4 * cell + 15), "predicted", fill="black")
    d.text((4, pad + 2 * cell), "true", fill="black")
    c = np.asarray(confusion, dtype=float)
    share = c / np.maximum(c.sum(1, keepdims=True), 1)
    for i in range(4):
        d.text((pad + i * cell + cell // 2, pad - 15), "abcd"[i], fill="black")
        d.text((pad - 15, pad + i * cell + cell // 2), "abcd"[i], fill="black")
        for j in range(4):
            shade = int(255 - 200 * share[i, j])
            box = (pad + j * cell, pad + i * cell, pad + (j + 1) * cell, pad + (i + 1) * cell)
            d.rectangle(box, fill=(shade, shade, 255), outline="grey")
            d.text((box[0] + cell // 2 - 8, box[1] + cell // 2 - 6), str(int(c[i, j])),
                   fill="white" if shade < 128 else "black")
    metrics.save_png(img, path)


def draw_roc(curves, title, path):
    """One ROC curve per year; curves: {label: (fpr, tpr)}."""
    size, pad = 400, 50
    img = Image.new("RGB", (size + 2 * pad + 150, size + 2 * pad), "white")
    d = ImageDraw.Draw(img)
    xy = lambda f, t: (pad + f * size, pad + (1 - t) * size)  # noqa: E731  (axes to pixels)
    d.rectangle((pad, pad, pad + size, pad + size), outline="black")
    d.line([xy(0, 0), xy(1, 1)], fill="lightgrey")
    d.text((pad, 15), title, fill="black")
    d.text((pad + size // 2 - 40, pad + size + 15), "false positive rate", fill="black")
    d.text((5, pad - 20), "true positive rate", fill="black")
    for n, (label, (fpr, tpr)) in enumerate(curves.items()):
        colour = COLOURS[n % len(COLOURS)]
        d.line([xy(f, t) for f, t in zip(fpr, tpr)], fill=colour, width=2)
        d.text((pad + size + 10, pad + 20 * n), label, fill=colour)
    metrics.save_png(img, path)


# ----------------------------------------------------------------------------- the two tasks
def _split_indices(split, task):
    parts = [np.flatnonzero(split == s) for s in ("train", "val", "test")]
    empty = [s for s, p in zip(("train", "val", "test"), parts) if len(p) == 0]
    if empty:
        raise ValueError(f"{task}: the {' and '.join(empty)} split(s) are empty; add exams or a split column")
    return parts


def _standardise(x, train):
    mu, sd = x[train].mean(0), x[train].std(0, unbiased=False) + 1e-6
    return (x - mu) / sd, mu, sd


def density_targets(rows):
    y = []
    for r in rows:
        d = (r.get("density") or "").strip().lower()
        if len(d) != 1 or d not in "abcd":
            raise ValueError(f"exam {r['exam']}: density {r.get('density')!r} is not one of a, b, c, d")
        y.append("abcd".index(d))
    return np.array(y)


def run_density(args, rows, split, x, writer):
    y, patients = density_targets(rows), np.array([r["patient"] for r in rows])
    tr, va, te = _split_indices(split, "density")
    tr = tr[stratified_subset(y[tr], args.fraction, args.seed)]
    z, mu, sd = _standardise(x, tr)
    yt = torch.from_numpy(y)
    task = TASKS["density"]
    best = lr_search(lambda: nn.Linear(z.shape[1], 4), F.cross_entropy, (z[tr], (yt[tr],)), (z[va], (yt[va],)),
                     lr_range=task["lr"], trials=args.trials, epochs=args.epochs or task["epochs"],
                     batch_size=args.batch_size, seed=args.seed, writer=writer)
    head = nn.Linear(z.shape[1], 4)
    head.load_state_dict(best["state"])
    with torch.no_grad():
        probs = torch.softmax(head(z[te]), 1).double().numpy()  # (n_test, 4)
    groups = {c: np.array([rows[i][c] for i in te]) for c in args.subgroups}
    majority = int(np.bincount(y[tr], minlength=4).argmax())  # ties: the first class
    report = density_report(y[te], probs, patients[te], groups, args.n_boot, args.seed, majority)
    preds = [dict(patient=rows[i]["patient"], exam=rows[i]["exam"], density="abcd"[y[i]],
                  pred="abcd"[int(p.argmax())], **{f"p_{c}": f"{v:.6f}" for c, v in zip("abcd", p)})
             for i, p in zip(te, probs)]
    draw_confusion(report["confusion"], f"density, {len(te)} test exams: accuracy {report['accuracy']:.3f}",
                   Path(args.out) / "confusion.png")
    data.log(f"density: accuracy {report['accuracy']:.3f} (95% CI {report['accuracy_ci'][0]:.3f}-"
             f"{report['accuracy_ci'][1]:.3f}), train's majority class ({'abcd'[majority]}) "
             f"{report['majority_rate']:.3f}, macro F1 {report['macro_f1']:.3f}, A/B vs C/D "
             f"{report['binary_accuracy']:.3f}, {len(te)} test exams")
    return report, preds, head, (mu, sd), best, len(tr)


def risk_targets(rows):
    ytc, yfu = [], []
    for r in rows:
        try:
            ytc.append(float(r["years_to_cancer"]) if (r.get("years_to_cancer") or "").strip() else math.inf)
            yfu.append(float(r["years_of_followup"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"exam {r['exam']}: years_to_cancer {r.get('years_to_cancer')!r} / years_of_followup "
                             f"{r.get('years_of_followup')!r} are not numbers (years_to_cancer empty = none)") from None
        for name, value in (("years_to_cancer", ytc[-1]), ("years_of_followup", yfu[-1])):
            if math.isnan(value) or value < 0:  # NaN would only fail after training, far from its exam
                raise ValueError(f"exam {r['exam']}: {name} {r.get(name)!r} is NaN or negative (years_to_cancer "
                                 "empty = none)")
    return np.array(ytc), np.array(yfu)


def _observed_splits(split, unobserved, rows):
    """train, val, test indices without the exams that have no follow-up; each split must keep some exams (an
    empty val split would leave the LR search without a loss, an empty test split nothing to report)."""
    before = _split_indices(split, "risk")
    parts = [np.setdiff1d(p, unobserved) for p in before]
    for name, exams, after in zip(("train", "val", "test"), before, parts):
        if len(after) == 0:
            raise ValueError(f"risk: all {len(exams)} exams of the {name} split have no follow-up "
                             f"(years_of_followup 0, e.g. exam {rows[exams[0]]['exam']}); the split needs exams "
                             "with follow-up")
    return parts


def _balanced_val(va, cancer, seed):
    """DBT-DINO's validation set: the validation cancers plus as many healthy exams (all of val without cancers)."""
    pos, neg = va[cancer[va]], va[~cancer[va]]
    if len(pos) == 0 or len(neg) == 0:
        data.log("risk: the val split lacks cancers or healthy exams; validating on all of it")
        return va
    return np.sort(np.r_[pos, np.random.default_rng(seed).choice(neg, min(len(pos), len(neg)), replace=False)])


def run_risk(args, rows, split, x, writer):
    ytc, yfu = risk_targets(rows)
    y_label, y_mask = (torch.from_numpy(a) for a in risk_labels(ytc, yfu))
    cancer, patients = ytc < YEARS, np.array([r["patient"] for r in rows])
    unobserved = np.flatnonzero(y_mask.sum(1).numpy() == 0)  # no follow-up at all: Mirai's check_label drops them
    if len(unobserved):
        data.log(f"risk: {len(unobserved)} exams without follow-up left out (e.g. {rows[unobserved[0]]['exam']})")
    tr, va, te = _observed_splits(split, unobserved, rows)
    tr = tr[stratified_subset(cancer[tr], args.fraction, args.seed)]
    n_cancer, n_healthy = int(cancer[tr].sum()), int((~cancer[tr]).sum())
    if n_cancer == 0 or n_healthy == 0:
        raise ValueError(f"risk: the train split has {n_cancer} exams with cancer within {YEARS} years and "
                         f"{n_healthy} without; both are needed")
    z, mu, sd = _standardise(x, tr)
    # DBT-DINO's WeightedRandomSampler: weights 1/n_cancer and 1/n_healthy, len(healthy train) draws
    weights = (torch.from_numpy(np.where(cancer[tr], 1 / n_cancer, 1 / n_healthy)), n_healthy)
    vb = _balanced_val(va, cancer, args.seed)
    task = TASKS["risk"]
    best = lr_search(lambda: CumulativeRiskHead(z.shape[1]), risk_loss, (z[tr], (y_label[tr], y_mask[tr])),
                     (z[vb], (y_label[vb], y_mask[vb])), lr_range=task["lr"], trials=args.trials,
                     epochs=args.epochs or task["epochs"], batch_size=args.batch_size, seed=args.seed, weights=weights,
                     writer=writer)
    head = CumulativeRiskHead(z.shape[1])
    head.load_state_dict(best["state"])
    with torch.no_grad():
        probs = head(z[te]).double().numpy()  # (n_test, 5)
    density = np.array([(rows[i].get("density") or "?") for i in te])
    report = risk_report(probs, ytc[te], yfu[te], patients[te], density, args.rule, args.n_boot, args.seed)
    preds = [dict(patient=rows[i]["patient"], exam=rows[i]["exam"], density=d,
                  years_to_cancer="" if math.isinf(ytc[i]) else ytc[i], years_of_followup=yfu[i],
                  **{f"p{k + 1}": f"{v:.6f}" for k, v in enumerate(p)}) for i, p, d in zip(te, probs, density)]
    curves = {}
    for k in range(1, YEARS + 1):
        keep, label = metrics.risk_year_cases(ytc[te], yfu[te], k, YEARS, args.rule)
        if 0 < label[keep].sum() < keep.sum():
            curves[f"year {k}: AUROC {report['auroc'][k]:.3f}"] = metrics.roc_curve(label[keep], probs[keep, k - 1])
    draw_roc(curves, f"risk, {len(te)} test exams, {args.rule} rule", Path(args.out) / "roc.png")
    shown = ", ".join(f"{k}y {v:.3f}" for k, v in report["auroc"].items())
    data.log(f"risk ({args.rule} rule): AUROC {shown}; mean {report['auroc_mean']:.3f}; {len(te)} test exams, "
             f"{report['n_cancer']} with cancer within {YEARS} years")
    return report, preds, head, (mu, sd), best, len(tr)


# ----------------------------------------------------------------------------- probe / embed commands
def load_source(args):
    """-> (exam rows, the folder their view paths are relative to, pacs.Client or None for local files)."""
    if pacs.is_dicomweb(args.data):
        return remote_exams(args)
    if args.manifest:
        raise ValueError("--manifest is only for a dicomweb+http(s):// --data (a local exam table is --data itself)")
    if args.data == "synthetic":
        return *read_exams(data.synthetic_archive(None, args.patients, args.data_seed,
                                                  (args.slices, args.height, args.width))), None
    return *read_exams(args.data), None


def remote_exams(args):
    """--data dicomweb+http(s)://... --manifest exams.csv: the view cells (instance UIDs) are the allow-list."""
    if not args.manifest:
        raise ValueError(f"{pacs.redact(args.data)}: a DICOMweb source needs --manifest (the exam table naming "
                         "the instances it may fetch)")
    rows, root = read_exams(args.manifest)
    instances = {}
    for i, r in enumerate(rows):
        for v in VIEWS:
            r[v] = (r[v] or "").strip()
            if r[v]:  # an empty cell is a missing view: its exam is left out and counted
                instances[r[v]] = instance_uids(r[v], f"{args.manifest} row {i + 1} {v}")
    cache = pacs.Cache(data.cache_base(), args.cache_bytes, floor_bytes=2**30)
    client = pacs.Client(args.data, list(instances.values()), cache,
                         pacs.load_credentials(args.dicomweb_credentials or None), args.dicomweb_ca_bundle or None)
    data.log(f"exams: {len(rows)} from {args.manifest}, {len(instances)} instances on {client.url} (the only "
             "ones ever requested)")
    return rows, root, client


def embeddings(args, backbone, rows, root, device, client=None):
    """Announce the backbone (net, description) in one loud line and embed every exam, reusing the cache."""
    net, desc = backbone
    print(f"*** backbone: {desc} ***", flush=True)
    if args.compile:  # once, before any bf16-weights copy (copies stay compiled); get_args refuses DenseNet
        model.compile_blocks(net, log=data.log)  # its measured gain: model.compile_blocks
    size = args.size or net.config["img_size"]
    folder = Path(args.cache or data.cache_base() / "embeddings") / cache_key(net, size, args.precision, device)
    records, counts = embed_exams(net, rows, root, folder, device, size=size, chunk=args.chunk,
                                  workers=args.workers, precision=args.precision, client=client)
    source = dict(source=client.url) if client else {}  # redacted: never user info
    return records, dict(counts, backbone=desc, size=size, cache=str(folder), **source)


def run_probe(args, device):
    backbone = load_backbone(args.backbone, args.arch, args.weights)  # a bad file: one line before any archive
    rows, root, client = load_source(args)
    absent = [c for c in args.subgroups if c not in rows[0]]
    if absent:
        raise ValueError(f"--subgroups: column(s) {', '.join(absent)} not in the exam table")
    (density_targets if args.task == "density" else risk_targets)(rows)  # bad labels fail before any embedding
    splits = np.array(assign_splits(rows, args.seed))  # and a bad split column
    stale = metrics.check_run_folder(args.out, "metrics.json", args.overwrite, "probe.py",
                                     ("predictions.csv", "head.pt", "confusion.png", "roc.png"))
    records, info = embeddings(args, backbone, rows, root, device, client)
    if not records:
        raise ValueError("no exam could be embedded")
    keep = sorted(records)
    split = splits[keep]  # (from the whole table, so a skipped exam moves no one to another split)
    x = feature_matrix([records[j] for j in keep], args.features)
    metrics.write_args(args.out, args, "probe.py", stale, embeddings=info)
    writer = metrics.JsonlWriter(Path(args.out) / "metrics.jsonl")
    writer.truncate_after(-1)  # an interrupted run's curves: this run redoes the (cheap) search from the start
    run = run_density if args.task == "density" else run_risk
    report, preds, head, (mu, sd), best, n_train = run(args, [rows[j] for j in keep], split, x, writer)
    report.update(task=args.task, features=args.features, fraction=args.fraction, n_train=n_train,
                  lr=best["lr"], best_epoch=best["epoch"] + 1, val_loss=best["val_loss"], backbone=info["backbone"],
                  exams_left_out=info["skipped"])
    out = Path(args.out)
    metrics.atomic_write(out / "predictions.csv", metrics.csv_text(preds))
    model.save_checkpoint(out / "head.pt", {"task": args.task, "features": args.features, "head": head.state_dict(),
                                            "feature_mean": mu, "feature_std": sd, "lr": best["lr"]})
    metrics.atomic_write(out / "metrics.json", json.dumps(_finite(report), indent=1) + "\n")  # last: the marker
    data.log(f"wrote {out}/metrics.json, predictions.csv, head.pt")
    return report


def run_embed(args, device):
    backbone = load_backbone(args.backbone, args.arch, args.weights)
    rows, root, client = load_source(args)
    _, info = embeddings(args, backbone, rows, root, device, client)
    print(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- compare
def load_run(folder):
    folder = Path(folder)
    try:
        report = json.loads((folder / "metrics.json").read_text())
        with open(folder / "predictions.csv", newline="", encoding="utf-8-sig") as fh:
            preds = {r["exam"]: r for r in csv.DictReader(fh)}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{folder}: not a finished probe run ({Path(e.filename).name} missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, KeyError):
        raise ValueError(f"{folder}: metrics.json or predictions.csv is not a probe run's") from None
    if not isinstance(report, dict) or "task" not in report:
        raise ValueError(f"{folder}: metrics.json is not a probe run's (no task)")
    return report, preds


def pair_tests(task, preds, names, exams, rule):
    """Every pair of runs on the common exams: McNemar on correctness (density), DeLong per year (risk)."""
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    if task == "density":
        correct = [np.array([p[e]["pred"] == p[e]["density"] for e in exams]) for p in preds]
        return [dict(a=names[a], b=names[b], metric="accuracy", value_a=float(correct[a].mean()),
                     value_b=float(correct[b].mean()), p=metrics.mcnemar(correct[a], correct[b])) for a, b in pairs]
    tests = []
    first = preds[0]
    ytc = np.array([float(first[e]["years_to_cancer"] or "inf") for e in exams])
    yfu = np.array([float(first[e]["years_of_followup"]) for e in exams])
    scores = [np.array([[float(p[e][f"p{k}"]) for k in range(1, YEARS + 1)] for e in exams]) for p in preds]
    for k in range(1, YEARS + 1):
        keep, label = metrics.risk_year_cases(ytc, yfu, k, YEARS, rule)
        if label[keep].sum() < 2 or (~label[keep]).sum() < 2:
            data.log(f"compare: year {k} has too few positives or negatives for DeLong; left out")
            continue
        for a, b in pairs:
            auc_a, auc_b, p = metrics.delong_test(label[keep], scores[a][keep, k - 1], scores[b][keep, k - 1])
            tests.append(dict(a=names[a], b=names[b], metric=f"auroc_year{k}", value_a=auc_a, value_b=auc_b, p=p))
    return tests


def run_compare(args):
    runs = [load_run(r) for r in args.runs]
    tasks = {rep.get("task") for rep, _ in runs}
    if len(tasks) != 1:
        raise ValueError(f"compare: the runs are of different tasks ({', '.join(map(str, sorted(map(str, tasks))))})")
    names = [Path(r).name or str(r) for r in args.runs]  # folder names read best in the table, when distinct
    task, names = tasks.pop(), names if len(set(names)) == len(names) else [str(r) for r in args.runs]
    exams = sorted(set.intersection(*(set(p) for _, p in runs)))
    if not exams:
        raise ValueError("compare: the runs share no test exams")
    tests = pair_tests(task, [p for _, p in runs], names, exams, args.rule)
    if not tests:
        raise ValueError("compare: no comparison is defined on the common exams")
    for t, q in zip(tests, metrics.benjamini_hochberg([t["p"] for t in tests])):
        t["p_bh"] = float(q)
    lines = [f"{task}: {len(exams)} common test exams" + (f", {args.rule} rule" if task == "risk" else ""),
             f"{'metric':<13} {'A':<28} {'B':<28} {'A':>7} {'B':>7} {'p':>8} {'p (BH)':>8}"]
    lines += [f"{t['metric']:<13} {t['a'][-28:]:<28} {t['b'][-28:]:<28} {t['value_a']:7.3f} {t['value_b']:7.3f} "
              f"{t['p']:8.4f} {t['p_bh']:8.4f}" for t in tests]
    print("\n".join(lines))
    metrics.check_run_folder(args.out, "compare.json", args.overwrite)
    os.makedirs(args.out, exist_ok=True)
    result = dict(task=task, runs=[str(r) for r in args.runs], n_common=len(exams),
                  rule=args.rule if task == "risk" else None, test="mcnemar" if task == "density" else "delong",
                  correction="benjamini-hochberg", tests=tests)
    metrics.atomic_write(Path(args.out) / "compare.json", json.dumps(_finite(result), indent=1) + "\n")
    return result


# ----------------------------------------------------------------------------- show: what the backbone sees
def last_block_attention(vit, x):
    """The last block's attention, computed explicitly from the same q, k, v its SDPA call uses.

    x (B, 3, H, W) -> dict: attn (B, nh, T, T) = softmax(q k^T / sqrt(hd)) with T = 1 + R + N (CLS, registers,
    patches), q/k/v (B, nh, T, hd) and block_input, the normed tokens the attention module receives."""
    tokens = vit.prepare_tokens_with_masks(x)  # (B, T, D)
    for blk in vit.blocks[:-1]:
        tokens = blk(tokens)
    blk = vit.blocks[-1]
    h = blk.norm1(tokens)
    B, T, D = h.shape
    nh = blk.attn.num_heads
    q, k, v = blk.attn.qkv(h).reshape(B, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, T, hd)
    attn = torch.softmax(q @ k.transpose(-2, -1) * (D // nh) ** -0.5, dim=-1)  # (B, nh, T, T)
    return {"attn": attn, "q": q, "k": k, "v": v, "block_input": h}


def _heat(grey, a):
    """Blend a grey image (P, P) in [0, 1] with a red-yellow heat map of a (P, P) in [0, 1] -> uint8 RGB."""
    colour = np.stack([np.ones_like(a), a, np.zeros_like(a)], -1)  # red -> yellow
    rgb = grey[..., None] * (1 - 0.6 * a[..., None]) + colour * 0.6 * a[..., None]
    return (255 * rgb.clip(0, 1)).astype(np.uint8)


def _resize(a, p, mode):
    t = torch.as_tensor(a, dtype=torch.float32)
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    return F.interpolate(t, size=(p, p), mode=mode)[0].permute(1, 2, 0).squeeze(-1).numpy()


def attention_figure(vit, x, title, panel=336):
    """Three panels: the input slice; the last block's CLS attention per head (registers excluded) over it, as
    DINO shows it; the first three PCA components of the patch features as RGB, as DINOv2 shows it."""
    grid = x.shape[-1] // vit.patch_size
    with torch.inference_mode():
        attn = last_block_attention(vit, x)["attn"][0]  # (nh, T, T)
        patches = vit.forward_features(x)["x_norm_patchtokens"][0].float()  # (N, D)
    cls = attn[:, 0, 1 + vit.num_register_tokens:].reshape(-1, grid, grid)  # (nh, g, g): patches only
    cls = (cls / cls.amax((1, 2), keepdim=True)).numpy()
    centred = patches - patches.mean(0)
    pcs = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:3].T  # (N, 3)
    pcs = ((pcs - pcs.amin(0)) / (pcs.amax(0) - pcs.amin(0) + 1e-12)).reshape(grid, grid, 3).numpy()
    grey = _resize(x[0, 0].numpy(), panel, "bilinear")
    cols = math.ceil(math.sqrt(len(cls)))
    cell = panel // cols
    heads = np.full((panel, panel, 3), 255, np.uint8)
    for i, a in enumerate(cls):
        r, c = divmod(i, cols)
        heads[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = _heat(_resize(grey, cell, "bilinear"),
                                                                         _resize(a, cell, "bilinear"))
    img = Image.new("RGB", (3 * panel + 40, panel + 50), "white")
    img.paste(Image.fromarray((255 * grey.clip(0, 1)).astype(np.uint8)).convert("RGB"), (10, 40))
    img.paste(Image.fromarray(heads), (panel + 20, 40))
    img.paste(Image.fromarray((255 * _resize(pcs, panel, "nearest")).astype(np.uint8)), (2 * panel + 30, 40))
    d = ImageDraw.Draw(img)
    d.text((10, 5), title, fill="black")
    for i, text in enumerate(("slice (model input)", f"last-block CLS attention, {len(cls)} heads",
                              "patch features, PCA 1-3 as RGB")):
        d.text((10 + i * (panel + 10), 24), text, fill="black")
    return img


def run_show(args, device):
    if not args.image:
        raise ValueError("show needs --image DICOM")
    net, desc = load_backbone(args.backbone, args.arch, args.weights)
    print(f"*** backbone: {desc} ***", flush=True)
    if not isinstance(net, model.ViT):
        raise ValueError("show needs a ViT backbone (DenseNet-121 has no attention)")
    n = data.index_volume(args.image)["n_frames"]
    s = n // 2 if args.slice < 0 else args.slice
    if s >= n:
        raise ValueError(f"--slice {s}: {args.image} has {n} slices")
    img, _ = data.read_dbt(args.image, frames=[s])
    size = args.size or net.config["img_size"]
    x = F.interpolate(torch.from_numpy(img)[None], size=(size, size), mode="bilinear", antialias=True)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1)  # (1, 3, size, size)
    metrics.check_run_folder(args.out, "attention.png", args.overwrite)
    os.makedirs(args.out, exist_ok=True)
    metrics.save_png(attention_figure(net.float(), x, f"{Path(args.image).name}, slice {s}/{n}: {desc}"),
                     Path(args.out) / "attention.png")
    data.log(f"wrote {args.out}/attention.png")


# ----------------------------------------------------------------------------- command line
def get_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = data.one_line_errors(argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=fmt))
    p.add_argument("command", nargs="?", default="probe", choices=["probe", "embed", "compare", "show"],
                   help="probe: train and test a head (--task); embed: fill the cache; compare RUN_A RUN_B ...: "
                   "McNemar/DeLong + BH; show: attention.png")
    p.add_argument("runs", nargs="*", help="compare: run folders holding metrics.json and predictions.csv")
    p.add_argument("--task", default="density", choices=sorted(TASKS), help="what the head predicts")
    p.add_argument("--data", default="synthetic", help="exam table CSV, a folder holding exams.csv, synthetic, or "
                   "dicomweb+http(s)://host/prefix (the PACS; the exam table is then --manifest)")
    data.add_dicomweb_flags(p, "dicomweb --data: the exam table, each view cell StudyInstanceUID/SeriesInstanceUID/"
                            "SOPInstanceUID, the only instances ever requested")
    p.add_argument("--patients", type=data.number(int, 2), default=64, help="synthetic archive: patients")
    p.add_argument("--data-seed", type=data.number(int, 0), default=0, help="synthetic archive: seed")
    p.add_argument("--slices", type=data.number(int, 1), default=24, help="synthetic archive: slices per view")
    p.add_argument("--height", type=data.number(int, 16), default=256, help="synthetic archive: rows per slice")
    p.add_argument("--width", type=data.number(int, 16), default=192, help="synthetic archive: columns per slice")
    p.add_argument("--backbone", default="", help="a model.load_pretrained file, densenet121, random (an untrained "
                   "ViT of --arch, tiny for auto), or '' for the newest runs/*/backbone.pth, else a random tiny ViT")
    p.add_argument("--arch", default="auto", help="model.build name of --backbone (auto: from its width)")
    p.add_argument("--weights", default="", help="DenseNet-121 state dict (torchvision's file); '' = random")
    p.add_argument("--size", type=data.number(int, 0), default=0, help="input side; 0 = the backbone's own "
                   "(tiny 112, hub ViT 518, DenseNet 224)")
    p.add_argument("--chunk", type=data.number(int, 1), default=75, help="slices per forward pass")
    p.add_argument("--workers", type=data.number(int, 0), default=2, help="decoding loader workers")
    p.add_argument("--precision", default="autocast", choices=PRECISIONS, help="autocast: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the ViT's blocks for embedding "
                   "(model.compile_blocks: the same features to 1e-5; cache entries are shared with eager runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    p.add_argument("--cache", default="", help="embedding cache folder ('' = $DBT_DINO_CACHE/embeddings)")
    p.add_argument("--features", default="patch-mean-std", choices=sorted(FEATURES), help="statistics fed to "
                   "the head (all six are cached)")
    p.add_argument("--trials", type=data.number(int, 1, 1000), default=24, help="LR search trials")
    p.add_argument("--epochs", type=data.number(int, 0), default=0, help="epochs per trial; 0 = the paper's "
                   "(density 75, risk 100)")
    p.add_argument("--batch-size", type=data.number(int, 1), default=64, help="head training batch")
    p.add_argument("--fraction", type=data.number(float, 0.05, 1.0), default=1.0,
                   help="stratified fraction of the training split (sample-efficiency curve)")
    p.add_argument("--subgroups", default="", help="comma-separated exam-table columns: accuracy per value")
    p.add_argument("--rule", default="mirai", choices=metrics.RISK_RULES, help="per-year AUROC rule reported "
                   "first and used by compare (both are always in metrics.json)")
    p.add_argument("--n-boot", type=data.number(int, 10), default=1000, help="bootstrap resamples (by patient)")
    p.add_argument("--seed", type=data.number(int, 0, data.SEED_MAX), default=0,
                   help="splits, subsets, LR search, head init")
    p.add_argument("--out", default="", help="run folder ('' = runs/<task or command>-<date-time>)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--image", default="", help="show: a DICOM volume")
    p.add_argument("--slice", type=data.number(int, -1), default=-1, help="show: slice index (-1 = central)")
    args = p.parse_args(argv)
    if args.runs and args.command != "compare":
        p.error(f"unexpected argument(s) {' '.join(args.runs)} (only compare takes run folders)")
    if args.command == "compare" and len(args.runs) < 2:
        p.error("compare needs at least two run folders")
    if args.compile and args.backbone == "densenet121":
        p.error("argument --compile: compiles a ViT's blocks (model.compile_blocks); the DenseNet-121 baseline runs "
                "eager, so leave --compile off")
    if args.command == "embed" and args.out:  # embed fills the cache only: an --out would be silently ignored
        p.error("argument --out: embed writes only the embedding cache (--cache); it takes no --out")
    if args.size and args.backbone != "densenet121" and args.size % 14:  # every ViT here has 14-px patches
        p.error(f"argument --size: {args.size} is not a multiple of the ViT patch size 14")
    if args.size and args.backbone == "densenet121" and args.size < 32:  # its five stride-2 stages need 32 px
        p.error(f"argument --size: {args.size} is below DenseNet-121's 32 px")
    args.subgroups = [c for c in args.subgroups.split(",") if c]
    what = args.task if args.command == "probe" else args.command
    args.out = args.out or f"runs/{what}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv=None):
    args = get_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if device.type == "cpu":  # the loader workers decode on their own cores; more threads only contend with them
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - args.workers)))
    command = {"probe": run_probe, "embed": run_embed, "show": run_show}.get(args.command)
    return command(args, device) if command else run_compare(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
