"""Frozen-backbone probes: DBT density and 5-year risk (DBT-DINO §2.4, §6.2), MammoDINO's 2-D tasks.

    python probe.py --data exams.csv --backbone dbt_dino.pth              # density head, tested
    python probe.py --task risk --data exams.csv --backbone dbt_dino.pth  # 5-year risk head
    python probe.py embed --data exams.csv --backbone dbt_dino.pth        # fill the cache only
    python metrics.py compare RUN_A RUN_B [--rule mirai|dbt-dino]         # p-values of two runs
    python show.py --image X.dcm --backbone dbt_dino.pth                  # attention maps
    python probe.py --task cancer --data /data/vindr-mammo                # a 2-D benchmark
    python probe.py --task cancer --data synthetic --dataset rsna         # its phantom, ~20 s
    python probe.py --task cancer --data /data/vindr-mammo --finetune-blocks 2   # fine-tuned

MammoDINO's 2-D benchmarks (VinDr-Mammo, RSNA, CBIS-DDSM, CMMD, CDD-CESM): --data is the folder as
downloaded, its layout told by its tables (--dataset overrides). cohorts.py reads them, labels by
the task's rule (cohorts.RULES; --cancer-birads, --level, --cesm-subtracted, --cmmd-unlisted; in
metrics.json as label_rule) and splits (official where published, else by patient, seeded and
stratified). Each image is cut to its breast (data.breast_view: first VOI window, MONOCHROME1
inverted, chest wall left, tissue box, aspect kept, --size square) and embedded once, cached per
file. The linear head learns on the train images (two classes: logistic loss; more: cross-entropy
weighted n / (C n_c)); a breast scores the mean of its images. metrics.json: auroc, or accuracy,
macro_f1, weighted_f1 (MammoDINO names neither F1) and confusion, CIs by patient bootstrap, and the
counts (images listed = scored + excluded + skipped); predictions.csv has the dataset's own ids.

Embedding: each slice of an exam's four views goes once through the frozen backbone, stretched to a
square, grey repeated to 3 channels. Per view, patch tokens are summarised jointly over slices and
patches (mean, std, min, max), CLS tokens over slices (mean, std); --features picks statistics,
concatenated in DBT-DINO's view order RCC, LCC, RMLO, LMLO. All six are cached per exam under
$DBT_DINO_CACHE/embeddings/<weights + preprocessing>/: a rerun embeds only what is missing.

Heads (DBT-DINO §6.2.1-2) train on train, keep the LR of lowest val loss, are scored once on test:
  density  Linear(F, 4), cross-entropy, AdamW (weight decay 1e-4) + cosine, batch 64, 75 epochs,
           LR in [1e-5, 1e-2]; accuracy, macro F1, one-vs-rest AUROC, patient-bootstrap CIs
  risk     hazards softplus(Linear(F, 5)) summed over years 1..k into H_k, p_k = 1 - exp(-H_k);
           BCE over the years an exam is observed, divided by their number; cancers and healthy
           exams drawn at equal odds; 100 epochs, LR in [1e-5, 1e-3]; validated on the val
           cancers plus as many healthy exams; per-year AUROC by --rule, both rules in metrics.json
The rules (metrics.risk_year_cases) share positives, cancers within k years. Mirai's negatives are
exams followed k years without one, so a later cancer counts as negative; DBT-DINO's must also have
no cancer within 5 years, so later cancers are left out. Departures from DBT-DINO's code: features
are standardised by the train split's mean and std (an affine map the head could absorb; one LR
range then fits every backbone), and the LR search draws log-uniform at random, seeded, with
Optuna's median pruning, instead of Optuna's TPE sampler.

The exam table (--data: a CSV, or a folder holding exams.csv) is cohorts.py's. From a PACS, --data
dicomweb+https://... takes it as --manifest, each view cell an instance's three UIDs: only those are
requested (pacs.py, docs/pacs.md). --out gets args.json, metrics.jsonl (LR-search curves),
metrics.json, predictions.csv, head.pt and confusion.png or roc.png (a panel per rule); the last
line names every file in --out. A year the test split cannot score (no cancers within it, or no
negatives) is printed with the reason, null in metrics.json (the reason in not_scored) and left
out of the mean (auroc_mean_years).

Fine-tuning (--finetune-blocks N, the 2-D tasks and DBT density; 0, the default, is all the above):
the last N blocks, the final norm and the head train (-1: every parameter) on the images, each
decoded once as the frozen path decodes it (same --size, --preprocess) and held in memory as
float16. The head is the frozen one on the same --features of each image, standardised
(model.Classifier: batch statistics in training; after every epoch, for validation and test, the
frozen path's, the train images' mean and std under the current weights, un-augmented).
AdamW (weight decay 0.05, none on biases, norms, gammas) with pretrain.py's layer-wise decay
(model.param_groups: block i at --lr x --layer-decay^(depth - i)), one epoch of linear warm-up,
a cosine to 0 over --epochs (0: 20), --batch-size 64; the epoch of lowest val loss is kept, and
training stops after --patience epochs without a lower one. Each training image is mirrored at
odds 1/2, then rotated (up to 10 degrees), scaled (0.9-1.1) and shifted (up to 5 % of its side)
by one affine map. DBT density: each view's slices at 1/4, 1/2 and 3/4 of its depth; an epoch
gives every train exam a random one of each view, with the exam's label; an exam scores the mean
of its 12 images' probabilities (val loss too). --out also gets ckpt.pt after every epoch (the
trainable weights, optimizer, step, RNG state, best state, patience), which --resume auto
continues exactly; metrics.jsonl has a record per epoch, metrics.json `finetune` (blocks, epochs
run, best epoch, ...), head.pt the fine-tuned backbone (hub keys) beside the head.
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cohorts
import data
import dicom
import metrics
import model
import pacs
import phantoms
import preprocess
import utils

STATS = ("patch_mean", "patch_std", "patch_min", "patch_max", "cls_mean", "cls_std")
FEATURES = {"patch-mean-std": ("patch_mean", "patch_std"), "patch-mean": ("patch_mean",),
            "cls-mean": ("cls_mean",), "cls-mean-std": ("cls_mean", "cls_std"),
            "patch-all": ("patch_mean", "patch_std", "patch_min", "patch_max")}
TASKS = {"density": dict(epochs=75, lr=(1e-5, 1e-2)), "risk": dict(epochs=100, lr=(1e-5, 1e-3))}
PRECISIONS = ("autocast", "bf16-weights", "fp32")
DBT_PATIENTS = 160  # --data synthetic: see get_args
PREPROCESS_VERSION = 2  # the cache key holds it: bump when display, resize or statistics change


# ----------------------------------------------------------------------------- embedding
def aggregate(patch_tokens, cls_tokens):
    """DBT-DINO's per-view statistics: patch tokens (S, N, D) jointly over slices and patches, CLS
    tokens (S, D) over slices -> six (D,) tensors. Std is unbiased (torch's, as theirs)."""
    p = patch_tokens.reshape(-1, patch_tokens.shape[-1])  # (S*N, D)
    return {"patch_mean": p.mean(0), "patch_std": p.std(0), "patch_min": p.amin(0),
            "patch_max": p.amax(0), "cls_mean": cls_tokens.mean(0),
            "cls_std": cls_tokens.std(0) if len(cls_tokens) > 1  # one image: undefined
            else torch.full_like(cls_tokens[0], math.nan)}


def _prepare(backbone, device, precision):
    """-> (network, input dtype, autocast on?); bf16-weights casts a copy, keeping the fp32 one."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    net = backbone.to(device).eval()
    if precision == "bf16-weights":
        return copy.deepcopy(net).to(torch.bfloat16), torch.bfloat16, False
    return net, torch.float32, precision == "autocast" and device.type == "cuda"


def display_chunks(item, device, chunk, clahe=False):
    """One VolumeReader item's slices as displayed, `chunk` at a time: (c, H, W) in [0, 1] on
    `device`, mirrored by the volume's own decision to the canonical side, as dicom.read_dbt; with
    clahe, each slice through preprocess.clahe (on the CPU) as pretrain.py's mammodino recipe."""
    stored = item["stored"].to(device, non_blocking=True)  # (S, H, W) integers: 2 bytes a pixel
    rows, sigmoid = item["rows"].to(device), item["sigmoid"].to(device)
    for start in range(0, len(stored), chunk):
        part = slice(start, start + chunk)
        x = dicom.display(stored[part], rows[part], sigmoid[part], item["invert"])  # (c, H, W)
        x = x.flip(-1) if item["flip"] else x
        if clahe:
            x = torch.stack([torch.from_numpy(preprocess.clahe(s.float().cpu().numpy()))
                             for s in x]).to(device)
        yield x


def _embed_one(net, item, device, size, chunk, dtype, amp, clahe=False):
    """One volume's six aggregate() statistics, on the CPU."""
    patches, cls = [], []
    for x in display_chunks(item, device, chunk, clahe):
        # DBT-DINO stretches each slice to a square, grey repeated to 3 channels, no ImageNet norm
        x = F.interpolate(x[:, None], (size, size), mode="bilinear", antialias=True).clamp(0, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net.forward_features(x.expand(-1, 3, -1, -1).to(dtype))  # (c, 3, size, size) in
        patches.append(out["x_norm_patchtokens"].float())  # (c, N, D)
        cls.append(out["x_norm_clstoken"].float())  # (c, D)
    return {k: v.cpu() for k, v in aggregate(torch.cat(patches), torch.cat(cls)).items()}


def decoded(loader, total, what, stats):
    """The readable items of a loader of `total` (index, item) pairs, logging each unreadable one
    (a message) and raising an Exception item (a refused login, a full cache: every further one
    would fail). stats (a dict) gains wait_seconds (blocked on the decoding workers), skipped and
    units (slices, or images: the rate's); a progress line per tenth, timed after the caller's work
    on the item."""
    progress, every, batches = utils.Progress(total), max(1, total // 10), iter(loader)
    t0 = time.perf_counter()
    for n in range(1, total + 1):
        t = time.perf_counter()
        i, item = next(batches)
        stats["wait_seconds"] += time.perf_counter() - t
        if isinstance(item, Exception):
            raise item
        if isinstance(item, str):
            utils.log(f"skipped unreadable {what}: {item}")
            stats["skipped"] += 1
        else:
            # a volume's slices; fine-tuning's DBT view its FT_SLICES slices; an image one
            stats["units"] += (len(item["stored"]) if isinstance(item, dict)
                               else len(item) if what == "view" else 1)
            yield i, item
        if n % every == 0 or n == total:
            spent = time.perf_counter() - t0
            line = progress.line(n, {}, stats["units"] / spent, 1000 * spent / n,
                                 1000 * stats["wait_seconds"] / n)  # ms per view or image
            unit = "slices" if what == "view" else "images"
            utils.log("embed " + line.replace("img/s", f"{unit}/s").replace("/step", f"/{what}"))
    stats["seconds"] = time.perf_counter() - t0


@torch.inference_mode()
def embed_volumes(backbone, paths, device, *, size=518, chunk=75, workers=2, precision="autocast",
                  client=None, clahe=False):
    """Embed DBT volumes with a frozen backbone -> (features, stats).

    paths: local files, or with a pacs.Client `client`, dicts of an instance's three UIDs. features:
    per path the six aggregate() (D,) tensors, or None if unreadable or not fetched (logged);
    AuthError and CacheFull stop the run. stats: slices, seconds, wait_seconds (blocked on the
    loader), skipped. Workers decode; display, mirror, resize run on `device`, `chunk` at a time."""
    device = torch.device(device)
    net, dtype, amp = _prepare(backbone, device, precision)
    reader = data.VolumeReader(paths) if client is None else data.RemoteVolumeReader(client, paths)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    features, stats = [None] * len(paths), dict(units=0, seconds=0.0, wait_seconds=0.0, skipped=0)
    for i, item in decoded(loader, len(paths), "view", stats):  # .cpu() in _embed_one: synced
        features[i] = _embed_one(net, item, device, size, chunk, dtype, amp, clahe)
    stats["slices"] = stats.pop("units")
    return features, stats


# ----------------------------------------------------------------------------- the per-exam cache
def cache_key(net, size, precision, device, preprocess="none"):
    """Weights (each tensor's bytes) + preprocessing: a new file, size, precision or --preprocess
    never hits."""
    h = hashlib.sha1()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    cpu_or_cuda = "bf16-autocast" if device.type == "cuda" else "fp32"
    effective = {"autocast": cpu_or_cuda}.get(precision, precision)
    extra = [] if preprocess == "none" else [preprocess]  # keys made before --preprocess: kept
    h.update(json.dumps([type(net).__name__, size, effective, PREPROCESS_VERSION] + extra).encode())
    return h.hexdigest()[:16]


def exam_file(folder, row, root):
    """An exam's cache file, named by patient, exam and views: for local files, each one's resolved
    path, size and mtime (a file copied over a view, or a cohort with the same IDs and paths, never
    hits); for DICOMweb (root None), the UIDs alone (immutable): any server URL or proxy hits."""
    views = [f"dicomweb:{row[v]}" if root is None else utils.file_identity(Path(root) / row[v])
             for v in cohorts.VIEWS]
    return _cache_file(folder, [row["patient"], row["exam"]] + views)


def _cache_file(folder, ident):
    """folder/<sha1 of the JSON of ident, 20 hex>.pt: one cache file per exam or image."""
    return Path(folder) / f"{hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:20]}.pt"


def embed_exams(net, rows, root, folder, device, *, size, chunk, workers, precision, batch=128,
                client=None, preprocess="none"):
    """{row index: {view: {stat: (D,)}}} for every readable exam, one atomic cache file per exam, so
    a rerun embeds only what is missing. Exams with a missing, unreadable or unfetchable view are
    left out and counted. With a pacs.Client, view cells name instances (root unused)."""
    root = None if client else root
    out, todo = {}, []  # cached or embedded records; row indices to embed
    skipped = 0
    # named before any view is read: a file replaced while it is embedded gets a new name next run
    files = [exam_file(folder, r, root) for r in rows]
    for j, r in enumerate(rows):
        record = utils.load_cached(files[j])  # None when absent or unreadable
        if record is not None:
            out[j] = record
            continue
        absent = _absent_views(r, root)
        for what in absent:
            utils.log(f"skipped exam {r['exam']}: {what}")
        skipped += bool(absent)
        todo += [] if absent else [j]
    reused = len(out)
    utils.log(f"embeddings: {reused} exams reused from {folder}, {len(todo)} to embed")
    Path(folder).mkdir(parents=True, exist_ok=True)
    if client and todo:  # a few instances, first views first (the first exam's may all be absent)
        cells = list(dict.fromkeys(rows[j][v] for v in cohorts.VIEWS for j in todo[:3]))[:3]
        pacs.check_fetchable(client, [cohorts.instance_uids(c) for c in cells], workers, reused)
    for start in range(0, len(todo), batch):  # batches bound memory; each exam is saved when done
        part = todo[start:start + batch]
        cells = [rows[j][v] for j in part for v in cohorts.VIEWS]
        views = [cohorts.instance_uids(c) if client else root / c for c in cells]
        feats, _ = embed_volumes(net, views, device, size=size, chunk=chunk, workers=workers,
                                 precision=precision, client=client, clahe=preprocess == "clahe")
        for a, j in enumerate(part):
            views = feats[4 * a:4 * a + 4]
            if any(v is None for v in views):
                skipped += 1
                continue
            out[j] = dict(zip(cohorts.VIEWS, views))
            utils.save_checkpoint(files[j], out[j])
    utils.log(f"embeddings: {reused} reused, {len(out) - reused} embedded, {skipped} exams left "
              "out (missing or unreadable views)")
    return out, dict(reused=reused, embedded=len(out) - reused, skipped=skipped)


def _absent_views(row, root):
    """Why an exam cannot be embedded, before reading: missing view files, or empty cells."""
    if root is None:
        return [f"view {v} names no instance" for v in cohorts.VIEWS if not row[v]]
    return [f"view file missing: {root / row[v]}" for v in cohorts.VIEWS
            if not (root / row[v]).exists()]


def feature_matrix(records, features, views=cohorts.VIEWS):
    """(M, F) float32: per statistic of --features, the four views in DBT-DINO's order; views None:
    records of one 2-D image each ({stat: (D,)})."""
    stats = FEATURES[features]
    x = torch.stack([torch.cat([r[s] for s in stats] if views is None else
                               [r[v][s] for s in stats for v in views]) for r in records])
    bad = int((~torch.isfinite(x).all(1)).sum())
    if bad:
        what = "exams" if views else "images"
        raise ValueError(f"--features {features}: {bad} {what} have non-finite features (cls-std "
                         "of a one-slice view or one image is undefined); choose patch features")
    return x.float()  # (M, F)


# ----------------------------------------------------------------------------- the risk head
class CumulativeRiskHead(nn.Module):
    """DBT-DINO's risk head: hazards = softplus(Linear(F, years)), H[j] = sum_{i <= j} hazards[i] by
    an upper-triangular mask, p = 1 - exp(-H) -> (B, years), in [0, 1], non-decreasing. (Mirai
    instead takes ReLU hazards plus a free base hazard, and reads the sum as a logit.)"""

    def __init__(self, in_dim, years=metrics.YEARS):
        super().__init__()
        self.hazard_fc = nn.Linear(in_dim, years)
        upper = torch.triu(torch.ones(years, years))  # (years, years): upper[i, j] = 1 iff i <= j
        self.register_buffer("upper", upper)

    def forward(self, x):
        hazards = F.softplus(self.hazard_fc(x))  # (B, years), > 0
        return 1 - torch.exp(-(hazards @ self.upper))  # (B, years)


def risk_loss(p, y_label, y_mask):
    """DBT-DINO's masked BCE: per sample, the BCE summed over its observed years and divided by
    their number, then averaged over the batch (Mirai divides by the batch's total)."""
    bce = F.binary_cross_entropy(p, y_label, weight=y_mask, reduction="none")  # (B, years)
    return (bce.sum(1) / y_mask.sum(1).clamp(min=1)).mean()  # censored years weigh 0 above


# ----------------------------------------------------------------------------- the LR search
def train_head(head, loss_fn, train, val, *, lr, epochs, batch_size, seed, weights=None,
               prune=None, log=None):
    """AdamW (wd 1e-4), cosine schedule over `epochs`; keeps the epoch of lowest val loss.

    train, val: (features, tuple of targets). weights: (per-case sampling weights, draws per epoch),
    drawn with replacement; None = one shuffled pass. prune(epoch, best val loss so far) -> True
    stops the trial. -> (best val loss, its head state, its epoch, val-loss curve)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    (x, ys), (xv, yvs) = train, val
    best, curve = (math.inf, None, -1), []
    for epoch in range(epochs):
        head.train()
        order = (torch.multinomial(weights[0], weights[1], replacement=True, generator=g)
                 if weights is not None else torch.randperm(len(x), generator=g))
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


def lr_search(make_head, loss_fn, train, val, *, lr_range, trials, epochs, batch_size, seed,
              weights=None, writer=None):
    """Seeded log-uniform LR search with Optuna's MedianPruner rule (DBT-DINO's: 5 startup trials,
    15 warm-up epochs): from epoch 15, a trial whose best val loss is worse than the median of the
    finished trials' at that epoch stops. -> dict(lr, state, val_loss, epoch, trial)."""
    rng, done = random.Random(seed), []  # done: val-loss curves of the trials that ran to the end
    best = None
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
                                            batch_size=batch_size, seed=seed * 1000 + t,
                                            weights=weights, prune=prune, log=log)
        pruned = len(curve) < epochs
        if not pruned:
            done.append(curve)
        utils.log(f"trial {t + 1}/{trials}: lr {lr:.2e}, best val loss {v:.4f} at epoch {epoch + 1}"
                  + (f" (pruned at epoch {len(curve)})" if pruned else ""))
        if best is None or v < best["val_loss"]:
            best = dict(lr=lr, state=state, val_loss=v, epoch=epoch, trial=t)
    if best["state"] is None:  # every epoch of every trial had a NaN or infinite validation loss
        raise ValueError(f"LR search: none of the {trials} trials reached a finite validation "
                         "loss; check the val split's labels and features")
    return best


# ----------------------------------------------------------------------------- the two tasks
def _standardise(x, train):
    """x standardised by the train rows' mean and std -> (z, mean, std)."""
    mu, sd = x[train].mean(0), x[train].std(0, unbiased=False) + 1e-6
    return (x - mu) / sd, mu, sd


def head_loss(logits, target, weight=None):
    """One logit: the logistic loss; more: cross-entropy, `weight` per class."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], target.float())
    return F.cross_entropy(logits, target, weight=weight)


def fit_linear(args, x, y, tr, va, te, n_classes, writer, weight=None):
    """A linear head on features standardised by the train rows, its LR by lr_search: two classes
    take one logit and the logistic loss, more take cross-entropy (`weight`: per class). ->
    (probs of the te rows: (n,) of class 1 or (n, C), head, (mean, std), the search's best)."""
    z, mu, sd = _standardise(x, tr)
    yt, out = torch.as_tensor(np.asarray(y)), 1 if n_classes == 2 else n_classes
    loss = functools.partial(head_loss, weight=weight)
    task = TASKS.get(args.task, TASKS["density"])  # the 2-D tasks: density's epochs and range
    best = lr_search(lambda: nn.Linear(z.shape[1], out), loss, (z[tr], (yt[tr],)),
                     (z[va], (yt[va],)), lr_range=task["lr"], trials=args.trials,
                     epochs=args.epochs or task["epochs"], batch_size=args.batch_size,
                     seed=args.seed, writer=writer)
    head = nn.Linear(z.shape[1], out)
    head.load_state_dict(best["state"])
    with torch.no_grad():
        logits = head(z[te])  # (n, out)
        probs = torch.sigmoid(logits[:, 0]) if out == 1 else torch.softmax(logits, 1)
    return probs.double().numpy(), head, (mu, sd), best


def run_density(args, rows, split, x, writer, backbone="", fit=fit_linear):
    y, patients = cohorts.density_targets(rows), np.array([r["patient"] for r in rows])
    tr, va, te = cohorts.split_indices(split, "density")
    tr = tr[cohorts.stratified_subset(y[tr], args.fraction, args.seed)]
    probs, head, (mu, sd), best = fit(args, x, y, tr, va, te, 4, writer)  # probs (n_test, 4)
    groups = {c: np.array([rows[i][c] for i in te]) for c in args.subgroups}
    majority = int(np.bincount(y[tr], minlength=4).argmax())  # ties: the first class
    report = metrics.density_report(y[te], probs, patients[te], groups, args.n_boot, args.seed,
                                    majority)
    preds = [dict(patient=rows[i]["patient"], exam=rows[i]["exam"], density="abcd"[y[i]],
                  pred="abcd"[int(p.argmax())], **{f"p_{c}": f"{v:.6f}" for c, v in zip("abcd", p)})
             for i, p in zip(te, probs)]
    title = (f"density, {len(te)} test exams: accuracy {report['accuracy']:.3f} (train's "
             f"majority class {report['majority_rate']:.3f})\nbackbone: {backbone}")
    utils.draw_confusion(report["confusion"], title, Path(args.out) / "confusion.png")
    low, high = report["accuracy_ci"]
    utils.log(f"density: accuracy {report['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}), train's "
              f"majority class ({'abcd'[majority]}) {report['majority_rate']:.3f}, macro F1 "
              f"{report['macro_f1']:.3f}, A/B vs C/D {report['binary_accuracy']:.3f}, {len(te)} "
              "test exams")
    return report, preds, head, (mu, sd), best, len(tr)


def run_risk(args, rows, split, x, writer, backbone=""):
    ytc, yfu = cohorts.risk_targets(rows)
    y_label, y_mask = (torch.from_numpy(a) for a in cohorts.risk_labels(ytc, yfu))  # (N, 5) each
    cancer, patients = ytc < metrics.YEARS, np.array([r["patient"] for r in rows])
    unobserved = np.flatnonzero(y_mask.sum(1).numpy() == 0)  # no follow-up: Mirai drops them too
    if len(unobserved):
        utils.log(f"risk: {len(unobserved)} exams without follow-up left out (e.g. "
                  f"{rows[unobserved[0]]['exam']})")
    tr, va, te = cohorts.observed_splits(split, unobserved, rows)
    tr = tr[cohorts.stratified_subset(cancer[tr], args.fraction, args.seed)]
    n_cancer, n_healthy = int(cancer[tr].sum()), int((~cancer[tr]).sum())
    if n_cancer == 0 or n_healthy == 0:
        raise ValueError(f"risk: the train split has {n_cancer} exams with cancer within "
                         f"{metrics.YEARS} years and {n_healthy} without; both are needed")
    z, mu, sd = _standardise(x, tr)
    # DBT-DINO's WeightedRandomSampler: weights 1/n_cancer and 1/n_healthy, len(healthy train) draws
    weights = (torch.from_numpy(np.where(cancer[tr], 1 / n_cancer, 1 / n_healthy)), n_healthy)
    vb = cohorts.balanced_val(va, cancer, args.seed)
    task = TASKS["risk"]
    best = lr_search(lambda: CumulativeRiskHead(z.shape[1]), risk_loss,
                     (z[tr], (y_label[tr], y_mask[tr])), (z[vb], (y_label[vb], y_mask[vb])),
                     lr_range=task["lr"], trials=args.trials, epochs=args.epochs or task["epochs"],
                     batch_size=args.batch_size, seed=args.seed, weights=weights, writer=writer)
    head = CumulativeRiskHead(z.shape[1])
    head.load_state_dict(best["state"])
    with torch.no_grad():
        probs = head(z[te]).double().numpy()  # (n_test, 5)
    density = np.array([(rows[i].get("density") or "?") for i in te])
    report = metrics.risk_report(probs, ytc[te], yfu[te], patients[te], density, args.rule,
                                 args.n_boot, args.seed)
    preds = [dict(patient=rows[i]["patient"], exam=rows[i]["exam"], density=d,
                  years_to_cancer="" if math.isinf(ytc[i]) else ytc[i], years_of_followup=yfu[i],
                  **{f"p{k + 1}": f"{v:.6f}" for k, v in enumerate(p)})
             for i, p, d in zip(te, probs, density)]
    title = (f"risk: {len(te)} test exams, {report['n_cancer']} with cancer within "
             f"{metrics.YEARS} years\nbackbone: {backbone}")
    panels = metrics.roc_panels(probs, ytc[te], yfu[te], report)
    utils.draw_roc(panels, title, Path(args.out) / "roc.png")
    for line in metrics.risk_lines(report, args.rule):
        utils.log(line)
    return report, preds, head, (mu, sd), best, len(tr)


# ----------------------------------------------------------------------------- 2-D benchmarks
def image_file(folder, path):
    """A 2-D image's cache file, named as exam_file names an exam's (path, size, mtime)."""
    return _cache_file(folder, ["2d"] + utils.file_identity(Path(path)))


@torch.inference_mode()
def embed_images(net, paths, folder, device, *, size, chunk, workers, precision,
                 preprocess="none"):
    """{index into paths: aggregate() of the image} for every readable 2-D image, each cached in an
    atomic file of its own (image_file): a second task on the same images embeds nothing. Loader
    workers decode and cut each view (data.ViewReader); unreadable ones are logged and counted.
    -> (records, dict(reused, embedded, skipped, seconds))."""
    files = [image_file(folder, p) for p in paths]
    out = {i: r for i, r in enumerate(map(utils.load_cached, files)) if r is not None}
    todo, reused = [i for i in range(len(paths)) if i not in out], len(out)
    utils.log(f"embeddings: {reused} images reused from {folder}, {len(todo)} to embed")
    Path(folder).mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    net, dtype, amp = _prepare(net, device, precision)
    views = data.ViewReader([paths[i] for i in todo], size, clahe=preprocess == "clahe")
    loader = torch.utils.data.DataLoader(views,
                                         batch_size=None, num_workers=workers if todo else 0,
                                         pin_memory=device.type == "cuda")
    stats, batch = dict(units=0, seconds=0.0, wait_seconds=0.0, skipped=0), []
    t0 = time.perf_counter()

    def forward():  # one pass over `chunk` views, each saved as it comes
        x = torch.stack([view for _, view in batch]).to(device, dtype)  # (B, 3, size, size)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            o = net.forward_features(x)
        for (i, _), patches, cls in zip(batch, o["x_norm_patchtokens"].float(),
                                        o["x_norm_clstoken"].float()):  # (N, D), (D,)
            out[i] = {s: v.cpu() for s, v in aggregate(patches[None], cls[None]).items()}
            utils.save_checkpoint(files[i], out[i])
        batch.clear()
    for k, view in decoded(loader, len(todo), "image", stats):
        batch.append((todo[k], view))
        if len(batch) == chunk:
            forward()
    if batch:
        forward()
    embedded = len(out) - reused
    utils.log(f"embeddings: {reused} reused, {embedded} embedded, {stats['skipped']} unreadable")
    return out, dict(reused=reused, embedded=embedded, skipped=stats["skipped"],
                     seconds=time.perf_counter() - t0)


def read_units(args, dataset, root):
    if dataset == "cdd-cesm":  # low-energy images, or the subtracted ones
        return cohorts.read_cdd_cesm(root, args.cesm_subtracted)
    return cohorts.READERS[dataset](root)


def read_2d(args, dataset, root):
    """A 2-D download -> (its units split {train, val, test}, the counts, excluded, the rule)."""
    units, counts = read_units(args, dataset, root)
    kw = dict(level=args.level or None, cancer_birads=args.cancer_birads,
              unlisted_negative=args.cmmd_unlisted == "negative")
    scored, excluded = cohorts.task_labels(dataset, units, args.task, **kw)
    parts, leaked = cohorts.split_units(scored, args.seed)
    excluded.update(leaked)
    rule = cohorts.label_rule(dataset, args.task, **kw)
    if args.cesm_subtracted and dataset == "cdd-cesm":
        rule += "; subtracted (CESM) images"
    return parts, counts, excluded, rule


def image_rows(parts, classes):
    """Per split, the feature rows of its units' images and each image's unit label; the class
    weights n / (C n_c) of the train images (0 for a class train lacks)."""
    rows = {s: [k for u in units for k in u["rows"]] for s, units in parts.items()}
    y = {s: [u["label"] for u in units for _ in u["rows"]] for s, units in parts.items()}
    n = np.bincount(y["train"], minlength=len(classes))
    weight = np.where(n > 0, len(y["train"]) / (len(classes) * np.maximum(n, 1)), 0.0)
    for c in np.flatnonzero(n == 0):
        utils.log(f"class {classes[c]} has no train images: the head cannot learn it")
    return rows, y, torch.tensor(weight, dtype=torch.float32)


def run_2d(args, device, dataset, root):
    """probe.py on a 2-D benchmark: read, label, split, embed each image once (cached), a linear
    head on the train images, scored per unit (a breast: the mean of its images' probabilities)."""
    backbone = model.load_backbone(args.backbone, args.arch, args.weights)
    parts, counts, excluded, rule = read_2d(args, dataset, root)
    classes = cohorts.classes(dataset, args.task)
    stale, ckpt = start_run(args)
    images = sorted({im for units in parts.values() for u in units
                     for im in cohorts.unit_images(u)})
    if args.finetune_blocks:  # the images themselves, decoded once: {index: (1, size, size)}
        records, info = ft_inputs(args, backbone, [root / im for im in images], ckpt=ckpt)
    else:
        records, info = embeddings(args, backbone, None, root, device, images=images)
    parts = cohorts.drop_unreadable(parts, images, records, counts)
    test = parts["test"]
    tally = cohorts.tally(counts, [u for units in parts.values() for u in units], excluded)
    empty = [s for s, units in parts.items() if not units]
    if empty:
        raise ValueError(f"{dataset} {args.task}: no scored units in the {', '.join(empty)} "
                         f"split(s) ({tally['scored_units']} in all); too few patients")
    keep = cohorts.stratified_subset(np.array([u["label"] for u in parts["train"]]),
                                     args.fraction, args.seed)
    parts["train"] = [parts["train"][i] for i in keep]
    rows, y, weight = image_rows(parts, classes)
    order = rows["train"] + rows["val"] + rows["test"]
    x = (torch.stack([records[k][None] for k in order]) if args.finetune_blocks  # (M, 1, 1, S, S)
         else feature_matrix([records[k] for k in order], args.features, views=None))  # (M, F)
    del records  # fine-tuning's images: held once, in x
    n_tr, n_va = len(rows["train"]), len(rows["val"])
    writer = start_writer(args, stale, info, ckpt)
    probs, head, (mu, sd), best = fitter(args, backbone, device, ckpt, info)(
        args, x, y["train"] + y["val"] + y["test"], np.arange(n_tr), np.arange(n_tr, n_tr + n_va),
        np.arange(n_tr + n_va, len(order)), len(classes), writer, weight)
    at = np.cumsum([0] + [len(u["rows"]) for u in test])  # probs: the test images'
    unit_probs = np.stack([probs[a:b].mean(0) for a, b in zip(at[:-1], at[1:])])  # (n,) or (n, C)
    labels, patients = np.array([u["label"] for u in test]), np.array([u["patient"] for u in test])
    report = metrics.class_report(labels, unit_probs, patients, args.n_boot, args.seed)
    what = "breasts" if "images" in test[0] else "images"
    report.update(dataset=dataset, task=args.task, level=what[:-1], label_rule=rule,
                  classes=list(classes), id_columns=list(cohorts.unit_ids(dataset, test[0])),
                  counts=tally, units={s: len(u) for s, u in parts.items()},
                  train_images=n_tr, class_weights=weight.tolist() if len(classes) > 2 else None,
                  features=args.features, fraction=args.fraction, lr=best["lr"],
                  best_epoch=best["epoch"] + 1, val_loss=best["val_loss"],
                  backbone=info["backbone"], size=info["size"], **best.get("report", {}))
    report_2d(args, report, test, unit_probs, head, (mu, sd))
    return report


def report_2d(args, report, test, probs, head, standardise):
    """The 2-D run's screen lines, figure, predictions.csv, head.pt and (last) metrics.json."""
    out, classes, c = Path(args.out), report["classes"], report["counts"]
    utils.log(f"{report['dataset']}: {c['rows_read']} rows read, {c['images']} images listed: "
              f"{c['scored_images']} scored ({c['scored_units']} {report['level']}s), "
              f"{sum(c['excluded'].values())} excluded {dict(c['excluded'])}, "
              f"{sum(c['skipped'].values())} skipped {dict(c['skipped'])}")
    utils.log(f"label rule: {report['label_rule']}")
    head_line = f"{report['dataset']} {report['task']}, {len(test)} test {report['level']}s: "
    if probs.ndim == 1:
        low, high = report["auroc_ci"]
        head_line += f"AUROC {report['auroc']:.3f} (95% CI {low:.3f}-{high:.3f})"
        curve = metrics.roc_curve(np.array([u["label"] for u in test]), probs)
        utils.draw_roc({"test": {f"AUROC {report['auroc']:.3f}": curve}},
                       f"{head_line}\nbackbone: {report['backbone']}", out / "roc.png")
    else:
        head_line += ", ".join(f"{k.replace('_', ' ')} {report[k]:.3f} (95% CI "
                               f"{report[k + '_ci'][0]:.3f}-{report[k + '_ci'][1]:.3f})"
                               for k in ("accuracy", "macro_f1", "weighted_f1"))
        utils.draw_confusion(report["confusion"], f"{head_line}\nbackbone: {report['backbone']}",
                             out / "confusion.png", classes, report["task"])
    utils.log(head_line)
    # full precision: the metrics recomputed from this file are the same to the last digit
    columns = [f"prob_{k}" for k in classes] if probs.ndim == 2 else ["prob"]
    preds = [dict(cohorts.unit_ids(report["dataset"], u), patient=u["patient"],
                  label=classes[u["label"]],
                  **dict(zip(columns, map(repr, np.atleast_1d(p).tolist()))))
             for u, p in zip(test, probs)]
    utils.atomic_write(out / "predictions.csv", utils.csv_text(preds))
    utils.save_checkpoint(out / "head.pt", {"task": report["task"], "features": args.features,
                                            **head_state(head), "classes": classes,
                                            "feature_mean": standardise[0],
                                            "feature_std": standardise[1], "lr": report["lr"]})
    text = json.dumps(utils.finite(report), indent=1, allow_nan=False)
    utils.atomic_write(out / "metrics.json", text + "\n")
    utils.log(baseline_line(report["backbone"], args.backbone))
    utils.log(utils.folder_line(out))


# ----------------------------------------------------------------------------- fine-tuning
FT_EPOCHS = 20  # --epochs 0 with --finetune-blocks
FT_SLICES = 3  # DBT: slices of each view held for fine-tuning, at 1/4, 1/2 and 3/4 of its depth
FT_WARMUP_EPOCHS = 1  # linear LR warm-up, then a half cosine to 0 at the last step
FT_WEIGHT_DECAY = 0.05  # AdamW's, x model.param_groups' wd_mult (none on biases, norms, gammas)
# each training image: mirrored left-right at odds AUG_FLIP, then one affine map: rotated by up
# to AUG_DEGREES, scaled by a factor in AUG_SCALE, shifted by up to AUG_SHIFT of its side
AUG_FLIP, AUG_DEGREES, AUG_SCALE, AUG_SHIFT = 0.5, 10.0, (0.9, 1.1), 0.05
# flags that change neither the weights nor the choices: a resume may change them
RESUME_FREE = ("command", "out", "resume", "overwrite", "device", "amp", "compile",
               "grad_checkpoint", "chunk", "workers", "precision", "cache", "n_boot", "rule",
               "subgroups", "trials", "manifest", "dicomweb_credentials", "dicomweb_ca_bundle",
               "cache_bytes")
OUTPUTS = ("predictions.csv", "head.pt", "confusion.png", "roc.png")


def dbt_slices(path, size, clahe=False):
    """FT_SLICES slices of a DBT view of S slices (k S // (FT_SLICES + 1), k = 1, 2, ...), as the
    frozen path shows them (dicom.read_dbt: displayed, chest wall left; CLAHE; stretched to a
    square) -> (FT_SLICES, size, size) in [0, 1]."""
    meta = dicom.index_volume(path)
    frames = [(k + 1) * meta["n_frames"] // (FT_SLICES + 1) for k in range(FT_SLICES)]
    x = dicom.read_dbt(path, frames=frames, meta=meta)[0]  # (k, H, W)
    return preprocess.squares(x, size, clahe)[:, 0].clamp(0, 1)  # (k, size, size)


class SliceReader(data.ViewReader):
    """data.ViewReader for DBT views: (i, dbt_slices of view i) or (i, message naming it)."""

    def __getitem__(self, i):
        try:
            return i, dbt_slices(self.paths[i], self.size, self.clahe)
        except (ValueError, OSError) as e:
            return i, f"{self.paths[i]}: {e}"


def ft_inputs(args, backbone, paths, dbt=False, ckpt=None):
    """Fine-tuning's inputs, each file decoded once as the frozen path decodes it (2-D:
    data.ViewReader; DBT views: SliceReader), held in memory as float16, grey (0.5 MB a 518-px
    image) -> ({index into paths: (k, size, size)}, info as embeddings' for args.json). A resume
    (ckpt) from other weights, size or preprocessing is refused before any decoding."""
    net, desc = backbone
    print(f"*** {baseline_line(desc, args.backbone)} ***", flush=True)
    size = args.size or net.config["img_size"]
    how = utils.preprocessing(args.backbone, args.preprocess)
    weights = cache_key(net, size, "fp32", torch.device("cpu"), how)
    check_weights(args, ckpt, weights)
    reader = (SliceReader if dbt else data.ViewReader)(paths, size, clahe=how == "clahe")
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=args.workers)
    stats, out = dict(units=0, seconds=0.0, wait_seconds=0.0, skipped=0), {}
    for i, x in decoded(loader, len(paths), "view" if dbt else "image", stats):
        out[i] = (x if dbt else x[:1]).half()  # (k, size, size): 2-D views are grey x 3
    n = args.finetune_blocks
    tuned = "every parameter" if n == -1 else f"the last {n} block{'s' * (n > 1)}, the final norm"
    return out, dict(decoded=len(out), skipped=stats["skipped"], seconds=stats["seconds"],
                     size=size, preprocess=how, backbone=f"{desc}; fine-tuned: {tuned}, head",
                     weights=weights)


def exam_inputs(args, backbone, rows, root, ckpt=None):
    """DBT fine-tuning's inputs: ft_inputs of each exam's four views -> ({row index: (4,
    FT_SLICES, size, size)} of the exams whose every view was read, info)."""
    views, info = ft_inputs(args, backbone, [Path(root) / r[v] for r in rows
                                             for v in cohorts.VIEWS], dbt=True, ckpt=ckpt)
    out = {j: torch.stack([views[4 * j + k] for k in range(4)]) for j in range(len(rows))
           if all(4 * j + k in views for k in range(4))}
    return out, dict(info, skipped=len(rows) - len(out))


def augment(x, g):
    """(B, 1, S, S) training images, every draw from g: mirrored at odds AUG_FLIP, then rotated,
    scaled and shifted (the AUG_ constants) in one affine map, sampled bilinearly, black outside
    the image as around the breast."""
    u = torch.rand(len(x), 5, generator=g)  # (B, 5): flip, angle, scale, shift x, shift y
    sign = torch.where(u[:, 0] < AUG_FLIP, -1.0, 1.0)  # (B,)
    angle = math.radians(AUG_DEGREES) * (2 * u[:, 1] - 1)  # (B,) radians
    scale = AUG_SCALE[0] + (AUG_SCALE[1] - AUG_SCALE[0]) * u[:, 2]  # (B,)
    shift = 2 * AUG_SHIFT * (2 * u[:, 3:] - 1)  # (B, 2): grid coordinates run -1..1 per side
    cos, sin = angle.cos() / scale, angle.sin() / scale
    theta = torch.stack([torch.stack([sign * cos, -sign * sin, shift[:, 0]], 1),  # output ->
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # input: (B, 2, 3)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def ft_lr(step, total, warmup):
    """The LR factor at `step` of `total`: linear warm-up over `warmup`, then a half cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def image_chunks(x, rows, chunk):
    """The images of `rows` of x (M, V, S, H, W), about `chunk` at a time, whole rows: -> (row
    count, (c, 1, H, W) float32)."""
    per = max(1, chunk // (x.shape[1] * x.shape[2]))
    for start in range(0, len(rows), per):
        part = x[rows[start:start + per]]  # (r, V, S, H, W)
        yield len(part), part.flatten(0, 2)[:, None].float()


@torch.no_grad()
def ft_predict(net, x, rows, args, device):
    """Each row's probability, the mean of its images' (DBT: 4 views x FT_SLICES slices), no
    augmentation -> (n,) of class 1 or (n, C), float64."""
    net.eval()
    out = []
    for n, imgs in image_chunks(x, rows, args.chunk):
        with utils.autocast(device, args.amp):
            logits = net(imgs.to(device)).float()  # (n V S, out)
        p = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, 1)
        out.append(p.reshape(n, -1, *p.shape[1:]).mean(1).double().cpu())
    return torch.cat(out)


@torch.no_grad()
def standardise(net, x, rows, args, device):
    """Set the network's standardisation to the frozen path's under the current weights: the
    mean and variance of the features of the `rows`' images (the train split's), un-augmented."""
    net.eval()
    f = []
    for _, imgs in image_chunks(x, rows, args.chunk):
        with utils.autocast(device, args.amp):
            f.append(model.image_stats(net.backbone, imgs.to(device).expand(-1, 3, -1, -1),
                                       net.stats).float())  # (c, F)
    f = torch.cat(f)  # (n images, F)
    net.norm.running_mean.copy_(f.mean(0))
    net.norm.running_var.copy_(f.var(0, unbiased=False))


def prob_loss(p, y, weight=None):
    """head_loss on probabilities (a row's mean over its images): the validation loss."""
    p = p.clamp(1e-7, 1 - 1e-7)
    if p.ndim == 1:
        return F.binary_cross_entropy(p, y.double()).item()
    return F.nll_loss(p.log(), y, weight=None if weight is None else weight.double()).item()


def row_batches(rows, size, x):
    """`rows` in batches of `size`; a last batch of a single image joins the one before it (a
    BatchNorm in training needs two)."""
    parts = list(rows.split(size))
    if len(parts) > 1 and len(parts[-1]) * x.shape[1] < 2:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def ft_epoch(net, opt, x, y, rows, g, step, lr_at, args, device, weight=None):
    """One pass over the train rows in an order from g, `--batch-size` rows a step: per row and
    view a slice drawn from g (2-D: the image), augmented, the row's label; the LR set per step
    by lr_at. -> (mean loss, next step)."""
    net.train()
    total = 0.0
    for idx in row_batches(rows[torch.randperm(len(rows), generator=g)], args.batch_size, x):
        b, (V, S) = len(idx), x.shape[1:3]
        pick = torch.randint(S, (b, V), generator=g)  # (b, V): a slice of each view
        imgs = x[idx[:, None], torch.arange(V), pick].flatten(0, 1)[:, None]  # (b V, 1, H, W)
        imgs = augment(imgs.to(device).float(), g)
        target = y[idx].repeat_interleave(V).to(device)  # (b V,)
        model.set_rates(opt, lr_at(step), FT_WEIGHT_DECAY)
        with utils.autocast(device, args.amp):
            logits = net(imgs)  # (b V, out)
        loss = head_loss(logits.float(), target, weight)
        if not torch.isfinite(loss):
            raise ValueError(f"fine-tuning: non-finite training loss at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, step = total + loss.item() * b, step + 1
    return total / len(rows), step


def trainable_state(net):
    """What fine-tuning changes: the trainable parameters and the standardisation's statistics."""
    keep = {n for n, p in net.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in net.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k in keep}


def build_finetuned(args, vit, out, device, ckpt=None):
    """model.Classifier over `vit` with --finetune-blocks of it trainable, its AdamW
    (model.param_groups, --layer-decay) and g, the generator of every draw; with a ckpt.pt, all as
    it was saved. -> (net, optimizer, g, epochs done, steps done, early-stopping state)."""
    if args.finetune_blocks > vit.n_blocks:
        raise ValueError(f"--finetune-blocks {args.finetune_blocks}: the backbone has "
                         f"{vit.n_blocks} blocks")
    model.set_trainable(vit, args.finetune_blocks)
    vit.grad_checkpointing = args.grad_checkpoint
    torch.manual_seed(args.seed)  # the head's initialisation
    net = model.Classifier(vit, FEATURES[args.features], out).to(device)
    if args.compile:  # after set_trainable: the compiled blocks guard on it
        model.compile_blocks(vit, log=utils.log)
    opt = torch.optim.AdamW(model.param_groups(net, vit.n_blocks, args.layer_decay))
    g = torch.Generator().manual_seed(args.seed)
    if ckpt is None:
        return net, opt, g, 0, 0, dict(best=None, best_loss=math.inf, best_epoch=-1, bad_epochs=0)
    net.load_state_dict(ckpt["model"], strict=False)
    opt.load_state_dict(ckpt["optimizer"])
    g.set_state(ckpt["rng"]["generator"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return net, opt, g, ckpt["epoch"], ckpt["step"], ckpt["early_stop"]


def fine_tune(args, x, y, tr, va, te, n_classes, writer, weight=None, *, vit, device, ckpt,
              weights):
    """fit_linear's stand-in: the ViT's last --finetune-blocks blocks, final norm and the head
    trained on the images x (M, V, S, H, W) of the tr rows (AdamW, warm-up + cosine); the epoch of
    lowest val loss kept, stopping after --patience epochs without a lower one; ckpt.pt after
    every epoch. -> (probs of the te rows, the model.Classifier, (mean, std), best)."""
    y, tr, va, te = (torch.as_tensor(np.asarray(a)) for a in (y, tr, va, te))
    w = None if weight is None else weight.to(device)
    net, opt, g, done, step, state = build_finetuned(args, vit, 1 if n_classes == 2 else
                                                     n_classes, device, ckpt)
    epochs, per_epoch = args.epochs or FT_EPOCHS, len(row_batches(tr, args.batch_size, x))

    def lr_at(s):  # the LR at step s
        return args.lr * ft_lr(s, epochs * per_epoch, FT_WARMUP_EPOCHS * per_epoch)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    utils.log(f"fine-tuning {n_train:,} parameters: {len(tr)} train rows, {epochs} epochs of "
              f"{per_epoch} steps, lr {args.lr:g}, layer decay {args.layer_decay:g}"
              + (f"; resumed after epoch {done}" if ckpt else ""))
    while done < epochs and state["bad_epochs"] < args.patience:
        t0 = time.perf_counter()
        train_loss, step = ft_epoch(net, opt, x, y, tr, g, step, lr_at, args, device, w)
        standardise(net, x, tr, args, device)
        val_loss, done = prob_loss(ft_predict(net, x, va, args, device), y[va], weight), done + 1
        if val_loss < state["best_loss"]:
            state.update(best=trainable_state(net), best_loss=val_loss, best_epoch=done - 1,
                         bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        seconds = time.perf_counter() - t0
        writer.write(dict(step=done, split="finetune", epoch=done, lr=lr_at(step - 1),
                          train_loss=train_loss, val_loss=val_loss, seconds=seconds))
        utils.log(f"epoch {done}/{epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                  f"(best {state['best_loss']:.4f}, epoch {state['best_epoch'] + 1}), "
                  f"{seconds:.1f} s")
        utils.save_checkpoint(Path(args.out) / "ckpt.pt", dict(
            version=1, epoch=done, step=step, args=vars(args), weights=weights,
            model=trainable_state(net), optimizer=opt.state_dict(), early_stop=state,
            rng=dict(generator=g.get_state(), torch=torch.get_rng_state())))
    if state["best"] is None:
        raise ValueError("fine-tuning: no epoch reached a finite validation loss; lower --lr")
    net.load_state_dict(state["best"], strict=False)
    report = dict(blocks=args.finetune_blocks, trainable_parameters=n_train, epochs=epochs,
                  epochs_run=done, best_epoch=state["best_epoch"] + 1, lr=args.lr,
                  layer_decay=args.layer_decay, patience=args.patience,
                  weight_decay=FT_WEIGHT_DECAY, warmup_epochs=FT_WARMUP_EPOCHS,
                  augmentation=dict(flip=AUG_FLIP, degrees=AUG_DEGREES, scale=AUG_SCALE,
                                    shift=AUG_SHIFT), images_per_row=list(x.shape[1:3]))
    mean, std = net.norm.running_mean.cpu(), (net.norm.running_var.cpu() + net.norm.eps).sqrt()
    return (ft_predict(net, x, te, args, device).numpy(), net, (mean, std),
            dict(lr=args.lr, epoch=state["best_epoch"], val_loss=state["best_loss"],
                 report=dict(finetune=report)))


def load_resume(path, args):
    """ckpt.pt -> dict, checked as pretrain.py's: a file that is no probe.py fine-tuning
    checkpoint, or whose flags differ from these (all but RESUME_FREE), is one line naming it."""
    ckpt = utils.read_checkpoint(path)
    need = {"epoch", "step", "args", "weights", "model", "optimizer", "rng", "early_stop"}
    have = set(ckpt) if isinstance(ckpt, dict) else set()
    if not need <= have:
        raise ValueError(f"{path}: not a probe.py fine-tuning ckpt.pt (it lacks "
                         f"{sorted(need - have)}); use another --out, or --overwrite")
    utils.check_resume_flags(path, ckpt["args"], args,
                             [k for k in vars(args) if k not in RESUME_FREE])
    return ckpt


def start_run(args):
    """--out, checked before any work -> (the old run's files --overwrite clears, the ckpt.pt
    to resume or None). Only fine-tuning keeps one (--resume auto continues it exactly); a frozen
    run is marked by its metrics.json, and its cheap LR search simply runs again."""
    path = Path(args.out) / "ckpt.pt"
    if args.resume == "auto" and path.exists():
        return [], load_resume(path, args)
    marker, other = (("ckpt.pt", "metrics.json") if args.finetune_blocks
                     else ("metrics.json", "ckpt.pt"))
    return utils.check_run_folder(args.out, marker, args.overwrite, "probe.py",
                                  OUTPUTS + (other,)), None


def check_weights(args, ckpt, weights):
    """A resume must see the backbone weights, --size and --preprocess it was fine-tuned from."""
    if ckpt and ckpt["weights"] != weights:
        raise ValueError(f"{Path(args.out) / 'ckpt.pt'}: fine-tuned from other backbone weights, "
                         "--size or --preprocess; use another --out, or --overwrite")


def start_writer(args, stale, info, ckpt):
    """args.json, once the inputs are read (the old run's files cleared first; ft_inputs refused
    a resume from other weights, size or preprocessing before), and metrics.jsonl cut to what a
    resumed run keeps (an interrupted frozen run's curves: the search starts again)."""
    utils.write_args(args.out, args, "probe.py", stale,
                     **{"inputs" if args.finetune_blocks else "embeddings": info})
    writer = utils.JsonlWriter(Path(args.out) / "metrics.jsonl")
    writer.truncate_after(ckpt["epoch"] if ckpt else -1)
    return writer


def fitter(args, backbone, device, ckpt, info):
    """What trains the head: fit_linear on cached features, or fine_tune on the images."""
    if not args.finetune_blocks:
        return fit_linear
    return functools.partial(fine_tune, vit=backbone[0], device=device, ckpt=ckpt,
                             weights=info["weights"])


def head_state(head):
    """head.pt's weights: the linear head's, and after fine-tuning the whole backbone too (hub
    keys: model.load_pretrained takes it)."""
    if isinstance(head, model.Classifier):
        return dict(head=head.head.state_dict(),
                    backbone={k: v.cpu() for k, v in head.backbone.state_dict().items()})
    return dict(head=head.state_dict())


# ----------------------------------------------------------------------------- probe and embed
def load_source(args):
    """-> (exam rows, the folder view paths start from, pacs.Client or None for local files)."""
    if pacs.is_dicomweb(args.data):
        return remote_exams(args)
    if args.manifest:
        raise ValueError("--manifest is only for a dicomweb+http(s):// --data (a local exam table "
                         "is --data itself)")
    if args.data == "synthetic":
        shape = (args.slices, args.height, args.width)
        folder = phantoms.synthetic_archive(None, args.patients or DBT_PATIENTS, args.data_seed,
                                            shape, hazard=args.hazard)
        return *cohorts.read_exams(folder), None
    return *cohorts.read_exams(args.data), None


def remote_exams(args):
    """--data dicomweb+http(s)://... --manifest exams.csv: the view cells are the allow-list."""
    if not args.manifest:
        raise ValueError(f"{pacs.redact(args.data)}: a DICOMweb source needs --manifest (the exam "
                         "table naming the instances it may fetch)")
    rows, root = cohorts.read_exams(args.manifest)
    instances = cohorts.manifest_instances(rows, args.manifest)
    cache = pacs.Cache(utils.cache_base(), args.cache_bytes, floor_bytes=2**30)
    credentials = pacs.load_credentials(args.dicomweb_credentials or None)
    client = pacs.Client(args.data, list(instances.values()), cache, credentials,
                         args.dicomweb_ca_bundle or None)
    utils.log(f"exams: {len(rows)} from {args.manifest}, {len(instances)} instances on "
              f"{client.url} (the only ones ever requested)")
    return rows, root, client


def embeddings(args, backbone, rows, root, device, client=None, images=None):
    """Announce the backbone (net, description) in one loud line and embed every exam, or with
    `images` (paths under root) every 2-D image, cached."""
    net, desc = backbone
    print(f"*** {baseline_line(desc, args.backbone)} ***", flush=True)
    if args.compile:  # before a bf16-weights copy (copies stay compiled); get_args refuses DenseNet
        model.compile_blocks(net, log=utils.log)  # its measured gain: model.compile_blocks
    size = args.size or net.config["img_size"]
    how = utils.preprocessing(args.backbone, args.preprocess)
    key = cache_key(net, size, args.precision, device, how)
    folder = Path(args.cache or utils.cache_base() / "embeddings") / key
    kw = dict(size=size, chunk=args.chunk, workers=args.workers, precision=args.precision,
              preprocess=how)
    if images is not None:
        records, counts = embed_images(net, [root / im for im in images], folder, device, **kw)
    else:
        records, counts = embed_exams(net, rows, root, folder, device, client=client, **kw)
    source = dict(source=client.url) if client else {}  # redacted: never user info
    return records, dict(counts, backbone=desc, size=size, cache=str(folder), preprocess=how,
                         **source)


def which_data(args):
    """--data and --dataset -> (dbt or a 2-D dataset, its folder: None for dbt), the task checked
    against what its labels allow. A 2-D phantom is written once (phantoms.synthetic_2d_archive)."""
    if args.data == "synthetic" or pacs.is_dicomweb(args.data) or not Path(args.data).is_dir():
        dataset = args.dataset or "dbt"
    else:
        dataset = args.dataset or cohorts.detect_dataset(args.data)
    tasks = tuple(TASKS) if dataset == "dbt" else cohorts.TASKS[dataset]
    if args.command == "probe" and args.task not in tasks:  # embed: every image, no task
        raise ValueError(f"--task {args.task}: {dataset} has the tasks {', '.join(tasks)}")
    if dataset == "dbt":
        return dataset, None
    if pacs.is_dicomweb(args.data):
        raise ValueError(f"--dataset {dataset}: a DICOMweb --data holds DBT exams only")
    if args.data == "synthetic":
        return dataset, phantoms.synthetic_2d_archive(dataset, args.patients or None,
                                                      args.data_seed, size=(args.height,
                                                                            args.width))
    return dataset, Path(args.data)


def run_probe(args, device):
    dataset, root = which_data(args)
    if dataset != "dbt":
        return run_2d(args, device, dataset, root)
    backbone = model.load_backbone(args.backbone, args.arch, args.weights)  # bad file: fails first
    rows, root, client = load_source(args)
    absent = [c for c in args.subgroups if c not in rows[0]]
    if absent:
        raise ValueError(f"--subgroups: column(s) {', '.join(absent)} not in the exam table")
    # bad labels and a bad split column fail before any embedding
    (cohorts.density_targets if args.task == "density" else cohorts.risk_targets)(rows)
    splits = np.array(cohorts.assign_splits(rows, args.seed))
    stale, ckpt = start_run(args)
    if args.finetune_blocks:  # FT_SLICES slices of each view: {row: (4, FT_SLICES, size, size)}
        records, info = exam_inputs(args, backbone, rows, root, ckpt)
    else:
        records, info = embeddings(args, backbone, rows, root, device, client)
    if not records:
        raise ValueError("no exam could be embedded")
    keep = sorted(records)
    split = splits[keep]  # from the whole table, so a skipped exam moves no one to another split
    x = (torch.stack([records[j] for j in keep]) if args.finetune_blocks  # (M, 4, k, S, S)
         else feature_matrix([records[j] for j in keep], args.features))  # (M, F)
    del records  # fine-tuning's images: held once, in x
    writer = start_writer(args, stale, info, ckpt)
    run = run_density if args.task == "density" else run_risk
    kw = dict(fit=fitter(args, backbone, device, ckpt, info)) if args.finetune_blocks else {}
    report, preds, head, (mu, sd), best, n_train = run(args, [rows[j] for j in keep], split, x,
                                                       writer, info["backbone"], **kw)
    report.update(task=args.task, features=args.features, fraction=args.fraction, n_train=n_train,
                  lr=best["lr"], best_epoch=best["epoch"] + 1, val_loss=best["val_loss"],
                  backbone=info["backbone"], exams_left_out=info["skipped"],
                  **best.get("report", {}))
    out = Path(args.out)
    utils.atomic_write(out / "predictions.csv", utils.csv_text(preds))
    utils.save_checkpoint(out / "head.pt", {"task": args.task, "features": args.features,
                                            **head_state(head), "feature_mean": mu,
                                            "feature_std": sd, "lr": best["lr"]})
    # metrics.json last: it marks a finished run
    text = json.dumps(utils.finite(report), indent=1, allow_nan=False)  # strict JSON: no NaN
    utils.atomic_write(out / "metrics.json", text + "\n")
    utils.log(baseline_line(info["backbone"], args.backbone))
    utils.log(utils.folder_line(out))
    return report


def baseline_line(description, spec):
    """Which backbone the figures are of, and the baseline they have to beat."""
    if spec == "random" or description.startswith("RANDOMLY INITIALISED"):
        return f"backbone: {description}: the --backbone random baseline a trained one must beat"
    return f"backbone: {description}; the baseline to beat: the same command, --backbone random"


def run_embed(args, device):
    dataset, root = which_data(args)
    backbone = model.load_backbone(args.backbone, args.arch, args.weights)
    if dataset == "dbt":
        rows, root, client = load_source(args)
        _, info = embeddings(args, backbone, rows, root, device, client)
    else:  # every image the table lists
        units, _ = read_units(args, dataset, root)
        _, info = embeddings(args, backbone, None, root, device,
                             images=sorted({u["image"] for u in units}))
    print(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- command line
def get_args(argv=None):
    num = utils.number  # a type: the number in a range, else one line naming the flag
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = utils.one_line_errors(argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                                      formatter_class=fmt))
    p.add_argument("command", nargs="?", default="probe", choices=["probe", "embed"],
                   help="probe: train and test a head (--task); embed: fill the cache only "
                   "(compare runs: metrics.py compare; attention maps: show.py)")
    by_dataset = "; ".join(f"{k} {', '.join(v)}" for k, v in cohorts.TASKS.items())
    tasks = sorted(set(TASKS).union(*cohorts.TASKS.values()))
    p.add_argument("--task", default="density", choices=tasks,
                   help=f"what the head learns: dbt density, risk; {by_dataset}")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="exam table CSV, folder with exams.csv, a "
                   "2-D dataset's folder as downloaded, synthetic, or dicomweb+http(s)://host/"
                   "prefix (a PACS; the table: --manifest)")
    g.add_argument("--dataset", default="", choices=["", "dbt", *cohorts.READERS],
                   help="what --data holds ('' = dbt for a table or synthetic, else detected from "
                   "the folder's tables); with --data synthetic, a phantom in its layout")
    utils.add_dicomweb_flags(g, "dicomweb --data: the exam table, each view cell StudyInstanceUID/"
                             "SeriesInstanceUID/SOPInstanceUID, the only instances ever requested")
    g = p.add_argument_group("synthetic archive (--data synthetic)")
    # The default cohort scores every year by both rules. Year 1 needs test cancers within a year:
    # at --hazard 0.08 (phantoms.py's default: 0.03) 21 % of patients have one (52 % within 5 y);
    # year 5 needs exams followed 5 years without one (21 %: follow-up is 2-8 y). 160 patients put
    # 32 in test, 6.6 expected of each: P(none) ~ exp(-6.6) = 0.1 %; seed 0 has 5 and 7 (checked
    # in tests/test_probe.py). 8 slices a view, not 24, write and embed 3x faster: ~3 min cold.
    g.add_argument("--patients", type=num(int, 0), default=0,
                   help=f"patients; 0 = {DBT_PATIENTS} for dbt, else phantoms.PATIENTS_2D")
    g.add_argument("--data-seed", type=num(int, 0), default=0, help="archive seed")
    g.add_argument("--hazard", type=num(float, 0, 10, lo_open=True), default=0.08,
                   help="base of the yearly cancer hazard (phantoms.py; its own default 0.03)")
    g.add_argument("--slices", type=num(int, 1), default=8, help="slices per view")
    g.add_argument("--height", type=num(int, 16), default=256, help="rows per slice")
    g.add_argument("--width", type=num(int, 16), default=192, help="columns per slice")
    rules = "; ".join(f"{d} {t}: {r.format(b='--cancer-birads')}" for d, by_task in
                      cohorts.RULES.items() for t, r in by_task.items())
    g = p.add_argument_group("2-D label rules (cohorts.RULES; each in metrics.json's label_rule)",
                             rules)
    g.add_argument("--level", default="", choices=["", "image", "breast"], help="the scored unit "
                   "('' = breast for rsna and cmmd, whose labels are per breast, else image); a "
                   "breast's probability is the mean of its images'")
    g.add_argument("--cancer-birads", type=num(int, 1, 5), default=5,
                   help="vindr cancer: breast_birads at least this (a proxy: VinDr has no biopsy)")
    g.add_argument("--cesm-subtracted", action="store_true",
                   help="cdd-cesm: the subtracted (CESM) images, not the low-energy (DM) ones")
    g.add_argument("--cmmd-unlisted", default="exclude", choices=["exclude", "negative"],
                   help="cmmd: a breast the table does not list (no finding recorded)")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="", help="a model.load_pretrained file, densenet121, "
                   "random (an untrained ViT of --arch, tiny for auto), or '' for the newest "
                   "runs/*/backbone.pth, else a random tiny ViT")
    g.add_argument("--arch", default="auto", help="model.build name of --backbone (auto: by width)")
    g.add_argument("--weights", default="",
                   help="DenseNet-121 state dict (torchvision's file); '' = random")
    g.add_argument("--size", type=num(int, 0), default=0, help="input side; 0 = the backbone's own "
                   "(tiny 112, hub ViT 518, DenseNet 224)")
    utils.add_preprocess_flag(g)
    g = p.add_argument_group("speed")
    g.add_argument("--chunk", type=num(int, 1), default=75, help="slices per forward pass")
    g.add_argument("--workers", type=num(int, 0), default=2, help="decoding loader workers")
    g.add_argument("--precision", default="autocast", choices=PRECISIONS,
                   help="embedding: autocast is bf16 on CUDA, fp32 on CPU (fine-tuning: --amp)")
    g.add_argument("--compile", action="store_true", help="torch.compile the ViT's blocks "
                   "(model.compile_blocks: features equal to 1e-5, cache shared with eager runs)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available")
    g.add_argument("--cache", default="", help="embedding cache ('' = $DBT_DINO_CACHE/embeddings)")
    g = p.add_argument_group("head and LR search")
    g.add_argument("--features", default="patch-mean-std", choices=sorted(FEATURES),
                   help="statistics fed to the head (all six are cached)")
    g.add_argument("--trials", type=num(int, 1, 1000), default=24, help="LR search trials")
    g.add_argument("--epochs", type=num(int, 0), default=0, help="epochs per trial; 0 = the "
                   f"paper's (density 75, risk 100); fine-tuning's: 0 = {FT_EPOCHS}")
    g.add_argument("--batch-size", type=num(int, 1), default=64,
                   help="head training batch; fine-tuning: images, or DBT exams (4 images each)")
    g.add_argument("--fraction", type=num(float, 0.05, 1.0), default=1.0,
                   help="stratified fraction of the training split (sample-efficiency curve)")
    g.add_argument("--seed", type=num(int, 0, utils.SEED_MAX), default=0,
                   help="splits, subsets, LR search, head init")
    g = p.add_argument_group("fine-tuning (--finetune-blocks; 2-D tasks and DBT density)")
    g.add_argument("--finetune-blocks", type=num(int, -1), default=0, help="train the ViT's last "
                   "N blocks, its final norm and the head on the images (-1: every parameter); 0: "
                   "the frozen backbone, embeddings cached")
    g.add_argument("--lr", type=num(float, 0, lo_open=True), default=1e-3,
                   help="peak LR of the head and final norm (block i: x --layer-decay^(depth "
                   f"- i)), after {FT_WARMUP_EPOCHS} epoch of linear warm-up; cosine to 0")
    g.add_argument("--layer-decay", type=num(float, 0, 1, lo_open=True), default=0.75,
                   help="block i's LR x this^(depth - i), pretrain.py's rule (model.param_groups)")
    g.add_argument("--patience", type=num(int, 1), default=5,
                   help="stop after this many epochs without a lower val loss")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on CPU)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute the blocks in backward: same numbers, far less memory")
    g.add_argument("--resume", default="", choices=["", "auto"],
                   help="auto: continue the fine-tuning run in --out from its ckpt.pt, exactly")
    g = p.add_argument_group("report")
    g.add_argument("--subgroups", default="", help="comma-separated columns: accuracy per value")
    g.add_argument("--rule", default="mirai", choices=metrics.RISK_RULES, help="per-year AUROC "
                   "rule shown first (both are in metrics.json; metrics.py compare takes its own)")
    g.add_argument("--n-boot", type=num(int, 10), default=1000, help="patient-bootstrap resamples")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default="", help="run folder ('' = runs/<task or command>-<date-time>)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    args = p.parse_args(argv)
    if args.compile and args.backbone == "densenet121":
        p.error("argument --compile: compiles a ViT's blocks (model.compile_blocks); the "
                "DenseNet-121 baseline runs eager, so leave --compile off")
    if args.command == "embed" and args.out:  # embed fills the cache only: --out would be ignored
        p.error("argument --out: embed writes only the embedding cache (--cache); it takes no "
                "--out")
    if args.size and args.backbone != "densenet121" and args.size % 14:  # every ViT here: 14-px
        p.error(f"argument --size: {args.size} is not a multiple of the ViT patch size 14")
    if args.size and args.backbone == "densenet121" and args.size < 32:  # five stride-2 stages
        p.error(f"argument --size: {args.size} is below DenseNet-121's 32 px")
    check_finetune(p, args)
    args.subgroups = [c for c in args.subgroups.split(",") if c]
    what = args.task if args.command == "probe" else args.command
    args.out = args.out or f"runs/{what}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def check_finetune(p, args):
    """--finetune-blocks and its flags against the rest: one line each (p.error: exit code 2)."""
    n, bad = args.finetune_blocks, ""
    if not n and args.resume:
        p.error("argument --resume: only fine-tuning (--finetune-blocks) keeps a ckpt.pt; the "
                "frozen path's LR search simply runs again")
    elif not n:
        unused = [f"--{k.replace('_', '-')}" for k in ("lr", "layer_decay", "patience", "amp",
                                                       "grad_checkpoint")
                  if getattr(args, k) != p.get_default(k)]
        if unused:  # the frozen path would silently ignore them
            p.error(f"argument {unused[0]}: only fine-tuning (--finetune-blocks) uses it")
        return
    if args.backbone == "densenet121":
        bad = "fine-tunes a ViT; the DenseNet-121 baseline (--backbone) is frozen only"
    elif args.command == "embed":
        bad = "probe.py embed fills the frozen path's cache only"
    elif args.task == "risk":
        bad = "the risk head is frozen only; fine-tuning is for the 2-D tasks and DBT density"
    elif "cls_std" in FEATURES[args.features]:
        bad = f"--features {args.features}: one image has no CLS std"
    elif pacs.is_dicomweb(args.data):
        bad = "fine-tuning reads local files only, not a DICOMweb --data"
    if bad:
        p.error(f"argument --finetune-blocks: {bad}")
    spec = utils.backbone_file(args.backbone)[0]
    name = "tiny" if args.arch == "auto" else args.arch.removesuffix("_reg")
    depth = (model.block_count(spec) if spec and args.arch == "auto"
             else model.PRESETS.get(name, {}).get("depth"))  # None: the load says why
    if depth is not None and n > depth:
        p.error(f"argument --finetune-blocks: {n} is more than the backbone's {depth} blocks")


def main(argv=None):
    args = get_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if device.type == "cpu":  # the loader workers decode on their own cores: leave those to them
        free = (os.cpu_count() or 1) - args.workers
        torch.set_num_threads(max(1, min(torch.get_num_threads(), free)))
    return (run_probe if args.command == "probe" else run_embed)(args, device)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
