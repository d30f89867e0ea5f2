"""Self-supervised pretraining of a ViT on DBT slices: DINOv2's losses, schedules and training loop.

Follows facebookresearch/dinov2 (`dinov2/loss/*`, `train/ssl_meta_arch.py`, `utils/param_groups.py`)
on plain torch.distributed: DDP on the student, the teacher updated identically on every rank, no
xformers, FSDP or YAML. B images per process, K prototypes, 2 global and n_l = 8 local crops per
image, M masked patches.

The DINOv2 recipe (Oquab et al. 2023), as coded below:
- DINO loss on CLS tokens: student softmax(logits / 0.1) against a teacher target at a temperature
  rising linearly from 0.04 to 0.07 (--teacher-temp, over --teacher-temp-warmup steps),
  normalised (--centering) by 3 Sinkhorn-Knopp iterations (every prototype gets an equal share of
  the global batch) or by centering, softmax((t - c) / temp), c an EMA (momentum 0.9) of teacher
  logits updated after use.
  The teacher sees the 2 global crops only. Each student global crop meets the teacher's *other* one
  (2 pairs, never the same view), each local crop both (2 n_l = 16 pairs); the loss is the mean of
  the 18 batch-mean cross-entropies.
- iBOT: half of the 2B global crops get block masks over 10-50% of their patches; the student sees
  mask_token there, the teacher the unmasked crop. The cross-entropy per masked patch (same head
  unless --separate-ibot-head, same temperatures and normalisation, own center) is averaged within
  each image, then over all 2B global crops, unmasked ones counting 0. Weight 1.
- KoLeo (weight 0.1): -mean log distance from each L2-normalised student CLS token (before the head)
  to its nearest neighbour, per global crop and process: it spreads the batch over the sphere.
- Teacher: EMA of the student, momentum cosine from 0.992 to 1 (DINOv2 uses 0.994 for ViT-L/g).
- AdamW, lr = --lr x sqrt(global batch / 1024), linear warm-up, cosine to 1e-6; layer-wise decay
  0.9^(depth + 1 - layer) (layer 0: embeddings; i + 1: block i; depth + 1: final norm, heads), patch
  embedding x 0.2, prototype layer at lr 0 for --freeze-last-layer steps. Weight decay: cosine 0.04
  to 0.2 (DINOv2's ViT-L/g value; default 0.4), none on biases, norms and LayerScale. Gradient norm
  clipped at 3, backbone and each head apart. One DINOv2 "epoch" is 1,250 steps.

DBT-DINO (§2.3, §6.1) continues DINOv2 pretraining of the hub ViT-B/14 (--init) on DBT slices:
global crops 0.5-1.0 at 518 px, local 0.2-0.5 at 196 px, batch 640 (160 x 4 GPUs), 60,000 steps,
checkpoints ranked by a density probe (quick_probe). The rest is unstated: --preset dbt-dino takes
DINOv2's defaults (lr 0.004, warm-up 12,500, teacher temperature warm-up 37,500, last layer frozen
1,250, drop path 0.3, K 65,536, head 2048 -> 256, centering). 160 per GPU does not fit an 80 GB H100
even with --grad-checkpoint (96 does): run 8 GPUs x 80.
MammoDINO (§2) adds tissue-aware crops and masking and an adjacent-slice loss: student on slice s
against teacher on s' = s + d, 0 < |d| <= 2, same crop geometry, DINO cross-entropy, symmetrised,
weight 0.5, none for single-slice images. Its method is not public: these numbers, the tissue
thresholds (data.RECIPES) and --preset mammodino's 224/98 px crops (DINOv2's scales) are ours.

--preset tiny (the default) departs from DINOv2 so that a CPU minute learns (docs/dinov2.md has
the experiments): LayerScale starts at 1, not 1e-5; the teacher temperature is 0.01, constant;
centering, not Sinkhorn. Its density probe is fit and scored on 40 phantom patients training never
saw, and the last lines say whether training beat the step-0 backbone and the majority class
(paired bootstrap by patient).

From the repo root (--resume auto continues after a crash; --preset mammodino runs like dbt-dino):
  python pretrain.py --out runs/demo       # tiny ViT, synthetic phantom DICOM, CPU, about a minute
  torchrun --nproc_per_node=2 pretrain.py --out runs/ddp      # 2 CPU processes (gloo)
  torchrun --nproc_per_node=8 pretrain.py --data /dbt --preset dbt-dino --batch-size 80 --amp \\
      --grad-checkpoint --init dinov2_vitb14_pretrain.pth --out runs/dbt-dino
--init: a hub file, DINOv2's teacher_checkpoint.pth (head reused if it fits), dbt_dino.pth or our
ckpt.pt/backbone.pth. --out: args.json, metrics.jsonl, ckpt.pt, backbone.pth (teacher), curves.png.
"""
import argparse, copy, functools, json, math, os, sys, time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import metrics
import model
import phantoms
import utils

STUDENT_TEMP, CENTER_MOMENTUM = 0.1, 0.9  # DINOv2's defaults for both DINO and iBOT
MIN_LR = 1e-6
CLIP_GRAD = 3.0
WARMUP_TEACHER_TEMP, TEACHER_TEMP = 0.04, 0.07  # DINO's advice: > 0.07 is unstable, warm up
HELDOUT_PATIENTS = 40  # phantom patients the quick probe is fit and scored on: 160 images
# Presets set the defaults of the flags below; explicit flags override them. Steps are iterations.
PRESETS = {
    # tiny learns on a CPU in a minute by three departures, found by experiment (docs/dinov2.md):
    # LayerScale 1 (DINO v1 has none), teacher temperature 0.01 (not 0.04 -> 0.07) and DINO's
    # softmax centering (DINOv2's other option; Sinkhorn stayed on the plateau)
    "tiny": dict(model="tiny", recipe="dinov2", global_size=112, local_size=56, batch_size=8,
                 steps=300, lr=0.02, warmup=30, teacher_temp_warmup=0, freeze_last_layer=30,
                 drop_path=0.0, prototypes=512, head_hidden=256, head_bottleneck=64, log_every=25,
                 eval_every=300, save_every=100, workers=1, centering="centering", layerscale=1.0,
                 teacher_temp=0.01),
    "dbt-dino": dict(model="vitb14", recipe="dbt-dino", global_size=518, local_size=196,
                     batch_size=160, steps=60000, lr=0.004, warmup=12500, teacher_temp_warmup=37500,
                     freeze_last_layer=1250, drop_path=0.3, prototypes=65536, head_hidden=2048,
                     head_bottleneck=256, log_every=10, eval_every=2500, save_every=2500,
                     workers=10, centering="centering", layerscale=1e-5,
                     teacher_temp=TEACHER_TEMP),
}
PRESETS["mammodino"] = dict(PRESETS["dbt-dino"], recipe="mammodino", global_size=224, local_size=98)
MODELS = sorted(list(model.PRESETS) + [m + "_reg" for m in model.PRESETS if m != "tiny"])


def get_args(argv=None):
    # the preset sets the defaults of the flags below, so read it first: --help shows real values
    pre = utils.one_line_errors(argparse.ArgumentParser(add_help=False))
    pre.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    d = PRESETS[pre.parse_known_args(argv)[0].preset]
    p = utils.one_line_errors(argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    count, steps = utils.number(int, 1), utils.number(int, 0)  # steps of a phase; 0 = none
    positive, weight = utils.number(float, 0, lo_open=True), utils.number(float, 0)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model + data recipe "
                   "+ schedule: sets the defaults shown below (e.g. --preset dbt-dino --help)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d["model"], choices=MODELS, help="model.build architecture")
    g.add_argument("--init", default="", help="initial backbone: a DINOv2/DBT-DINO/our checkpoint")
    g.add_argument("--drop-path", type=utils.number(float, 0, 0.99), default=d["drop_path"],
                   help="student stochastic depth rate (teacher has none)")
    g.add_argument("--layerscale", type=utils.number(float, 0, lo_open=True),
                   default=d["layerscale"], help="LayerScale init of every residual branch "
                   "(DINOv2 trains from 1e-5; --init overwrites it with the checkpoint's)")
    g.add_argument("--prototypes", type=count, default=d["prototypes"], help="K, head output size")
    g.add_argument("--head-hidden", type=count, default=d["head_hidden"], help="head hidden width")
    g.add_argument("--head-bottleneck", type=count, default=d["head_bottleneck"],
                   help="head bottleneck width (L2-normalised)")
    g.add_argument("--separate-ibot-head", action="store_true",
                   help="own head for patches (vitl/g recipe)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=["synthetic"], help="DICOM archive root, a .csv "
                   "manifest, 'synthetic' (phantoms from data.py, under $DBT_DINO_CACHE) or "
                   "dicomweb+https://host/prefix (with --manifest); several local ones are mixed "
                   "by --data-weights (the first holds the probe's exams.csv)")
    g.add_argument("--data-weights", nargs="+", type=utils.number(float, 0), default=[],
                   help="each --data source's share of the volumes drawn, however many files it "
                   "holds (MammoDINO: 2-D mammograms and DBT); none = equal shares")
    utils.add_dicomweb_flags(g, "dicomweb sources: CSV of StudyInstanceUID, SeriesInstanceUID, "
                             "SOPInstanceUID, the only instances ever requested")
    g.add_argument("--samples-per-volume", type=count, default=4, help="samples drawn from each "
                   "volume (local or fetched) before the stream moves on")
    g.add_argument("--recipe", default=d["recipe"], choices=sorted(data.RECIPES), help="crop "
                   "recipe (scales, tissue-aware crops, adjacent slices): data.RECIPES")
    g.add_argument("--global-size", type=count, default=d["global_size"], help="global crop side, "
                   "px (2 per image)")
    g.add_argument("--local-size", type=count, default=d["local_size"], help="local crop side, px "
                   "(8 per image)")
    g.add_argument("--mip-margin", type=utils.number(float, 1), default=data.MultiCrop.MIP_MARGIN,
                   help="a crop is resampled from the smallest 2x2-mean copy of the slice where "
                   "its box is at least this many times its side (JPEG 2000 is decoded there): 6 "
                   "keeps crops within 0.03 of the direct resize; 1 is faster, up to 0.13 off")
    g.add_argument("--batch-size", type=count, default=d["batch_size"], help="images per process "
                   "(global batch = this x world size)")
    g.add_argument("--workers", type=utils.number(int, 0), default=d["workers"], help="data loader "
                   "processes per rank")
    g.add_argument("--max-skip-fraction", type=utils.number(float, 0, 1), default=0.5,
                   help="stop when more than this fraction of the volumes is unreadable")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=count, default=d["steps"], help="total iterations")
    g.add_argument("--lr", type=positive, default=d["lr"], help="base LR x sqrt(global batch/1024)")
    g.add_argument("--warmup", type=steps, default=d["warmup"], help="linear LR warmup iterations")
    g.add_argument("--wd", type=weight, default=0.04, help="weight decay, cosine to --wd-end")
    g.add_argument("--wd-end", type=weight, default=0.2, help="final weight decay")
    g.add_argument("--momentum", type=utils.number(float, 0, 1), default=0.992,
                   help="teacher EMA momentum at step 0 (cosine to 1)")
    g.add_argument("--teacher-temp", type=utils.number(float, 0, 1, lo_open=True),
                   default=d["teacher_temp"], help="teacher temperature after its warm-up")
    g.add_argument("--teacher-temp-warmup", type=steps, default=d["teacher_temp_warmup"],
                   help=f"iterations of linear teacher temp {WARMUP_TEACHER_TEMP} -> "
                   "--teacher-temp")
    g.add_argument("--freeze-last-layer", type=steps, default=d["freeze_last_layer"],
                   help="iterations with the prototype layer frozen")
    g.add_argument("--layer-decay", type=utils.number(float, 0, 1, lo_open=True), default=0.9,
                   help="layer-wise LR decay (1 = none)")
    g = p.add_argument_group("losses")
    g.add_argument("--centering", default=d["centering"], choices=["centering", "sinkhorn"],
                   help="teacher normalisation: EMA center + softmax, or Sinkhorn-Knopp")
    g.add_argument("--koleo-weight", type=weight, default=0.1, help="KoLeo loss weight (0 = off)")
    g.add_argument("--ibot-weight", type=weight, default=1.0, help="iBOT loss weight (0 = off)")
    g.add_argument("--adjacent-weight", type=weight, default=0.5, help="lambda of the "
                   "adjacent-slice loss (used when the recipe loads adjacent slices)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=time.strftime("runs/pretrain-%Y%m%d-%H%M%S"), help="run folder")
    g.add_argument("--resume", default="", help="'' (fresh), 'auto' (<out>/ckpt.pt if present) or "
                   "a ckpt.pt path")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out with a run")
    g.add_argument("--seed", type=utils.number(int, 0, utils.SEED_MAX), default=0,
                   help="base seed; rank r uses seed + r")
    g.add_argument("--log-every", type=count, default=d["log_every"], help="progress line + "
                   "metrics.jsonl every N")
    g.add_argument("--eval-every", type=steps, default=d["eval_every"], help="quick density probe "
                   "every N steps, at the last and, on a fresh start, at step 0 (0 = never)")
    g.add_argument("--eval-exams", type=count, default=100, help="exams of --data (4 views "
                   "each) in the quick density probe; on the phantoms it takes "
                   f"{HELDOUT_PATIENTS} held-out patients")
    g.add_argument("--save-every", type=count, default=d["save_every"], help="ckpt.pt every N "
                   "steps (also the data stream reseed point)")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda "
                   "if available")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the ViT blocks "
                   "(model.compile_blocks) and the loss terms (compiled)")
    g.add_argument("--grad-checkpoint", action="store_true", help="recompute student blocks in "
                   "backward: same numbers, far less memory (dbt-dino on 40 GB GPUs)")
    args = p.parse_args(argv)
    patch = 14
    for flag in ("global_size", "local_size"):
        if getattr(args, flag) % patch:
            p.error(f"argument --{flag.replace('_', '-')}: {getattr(args, flag)} is not a "
                    f"multiple of the patch size {patch}")
    if args.koleo_weight > 0 and args.batch_size < 2:
        p.error("argument --batch-size: KoLeo needs at least 2 images per process; "
                "use --koleo-weight 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda was asked for, but this machine has no usable CUDA device")
    if args.data_weights and len(args.data_weights) != len(args.data):
        p.error(f"argument --data-weights: {len(args.data_weights)} weights for "
                f"{len(args.data)} --data sources")
    if args.data_weights and not sum(args.data_weights) > 0:
        p.error("argument --data-weights: all are 0")
    args.sources, args.data = args.data, args.data[0]  # the first: the probe's, --resume's
    return args


# --------------------------------------------------------------------------------------------------
# Heads and losses. Logits are (rows, K); "probs" are teacher targets that sum to 1 over K.

class SSLModel(nn.Module):
    """Backbone + heads; one forward per step so DDP sees every use of every parameter. state_dict
    keys backbone.*, dino_head.*, ibot_head.*: the layout of DINOv2's teacher_checkpoint.pth."""

    def __init__(self, backbone, prototypes, hidden, bottleneck, separate_ibot_head=False):
        super().__init__()
        self.backbone = backbone
        self.dino_head = model.DINOHead(backbone.embed_dim, prototypes, hidden, bottleneck)
        if separate_ibot_head:
            self.ibot_head = model.DINOHead(backbone.embed_dim, prototypes, hidden, bottleneck)

    def forward(self, views, masks=None, mask_indices=None):
        """views: list of crop batches (n_i, 3, H_i, W_i); masks (n_0, N) and mask_indices (M,)
        refer to views[0]. Returns the backbone CLS of views[0] (n_0, D), the head logits of each
        view [(n_i, K)] and the masked-patch logits (M, K)."""
        feats = [self.backbone.forward_features(v, masks=masks if i == 0 else None)
                 for i, v in enumerate(views)]
        cls = [f["x_norm_clstoken"] for f in feats]  # [(n_i, D)]
        patches = feats[0]["x_norm_patchtokens"].flatten(0, 1)[mask_indices]  # (M, D) masked only
        separate = hasattr(self, "ibot_head")
        # one head pass over all n = sum n_i CLS [+ M patch] tokens, as DINOv2 concatenates them
        sizes = [len(c) for c in cls]
        logits = self.dino_head(torch.cat(cls + ([] if separate else [patches])))  # (n [+ M], K)
        *per_view, rest = logits.split(sizes + [len(logits) - sum(sizes)])
        return cls[0], per_view, self.ibot_head(patches) if separate else rest


def at_least_fp32(x):
    """bf16 logits (--amp) -> fp32 inside the (compiled) loss, so the cast fuses; fp64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dino_loss(student_logits, teacher_probs, student_temp=STUDENT_TEMP):
    """-sum_s sum_t mean_rows sum_k t * log_softmax(s / temp): lists of row-aligned (rows, K)."""
    total = 0.0
    for s in student_logits:
        log_p = F.log_softmax(at_least_fp32(s) / student_temp, dim=-1)
        for t in teacher_probs:
            total = total - (t * log_p).sum(-1).mean()
    return total


def ibot_loss(student_logits, teacher_probs, masks_weight, n_images, student_temp=STUDENT_TEMP):
    """-sum_j w_j sum_k t_jk log_softmax(s_j / temp) / n_images over the M masked patches (rows of
    (M, K)); w_j = 1 / (#masked patches in j's image), so this is the mean over all n_images global
    crops of the per-image mean patch loss (images without masks count as 0)."""
    log_p = F.log_softmax(at_least_fp32(student_logits) / student_temp, -1)
    per_patch = (teacher_probs * log_p).sum(-1)  # (M,)
    return -(per_patch * masks_weight).sum() / n_images


def koleo_loss(x, eps=1e-8):
    """Kozachenko-Leonenko entropy estimate -mean_i log(d_i), d_i = distance from row i of the
    L2-normalised x (B, D) to its nearest other row."""
    if x.shape[0] < 2:  # one sample has no neighbour: DINOv2 returns NaN/inf here (dinov2 #314)
        raise ValueError("KoLeo needs at least 2 images per process and crop; use --koleo-weight 0")
    with torch.autocast(x.device.type, enabled=False):
        z = F.normalize(x, dim=-1, eps=eps)
        dots = z @ z.t()  # (B, B) cosine similarity
        dots.fill_diagonal_(-1)  # never pick yourself as the neighbour
        nearest = dots.argmax(dim=1)  # (B,)
        d = F.pairwise_distance(z, z[nearest], p=2, eps=eps)  # (B,); adds eps to the difference
        # duplicates (d ~ 0) would add -log(1e-8) = 18 and an exploding gradient that only measure
        # a data bug (dinov2 #143, #492): leave them out of the mean (no-op on distinct inputs)
        keep = d > 1e-6
        return -torch.log(d[keep] + eps).mean() if keep.any() else d.sum() * 0


def adjacent_slice_loss(student_s, student_adj, teacher_s, teacher_adj, valid,
                        student_temp=STUDENT_TEMP):
    """MammoDINO: DINO cross-entropy of the student on slice s against the teacher on the adjacent
    slice (the pair shares its crop box and flip and has milder photometry: data.MultiCrop), and
    the reverse, averaged. student_*: (B, K) logits, teacher_*: (B, K) probs, a row per image.
    valid (B,): 0 for a single-slice image, which has no neighbour; the mean is over valid rows."""
    def cross_entropy(s, t):  # (2B,)
        return -(t * F.log_softmax(at_least_fp32(s) / student_temp, dim=-1)).sum(-1)
    per_row = 0.5 * (cross_entropy(student_s, teacher_adj) + cross_entropy(student_adj, teacher_s))
    return (per_row * valid).sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):
    """(rows, K) logits -> (rows, K) targets, each row summing to 1 and every prototype getting an
    equal share of the global batch. Sums over samples are all-reduced: ranks act as one batch."""
    Q = torch.exp(teacher_logits.float() / teacher_temp).t()  # (K, rows); the normed head bounds it
    K = Q.shape[0]
    B = utils.all_reduce(torch.tensor(float(Q.shape[1]), device=Q.device))  # global sample count
    Q /= utils.all_reduce(Q.sum())
    for _ in range(n_iterations):
        Q /= utils.all_reduce(Q.sum(dim=1, keepdim=True))  # each prototype gets total mass 1/K ...
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # ... and each sample 1/B (columns are local to the rank)
        Q /= B
    return (Q * B).t()


@torch.no_grad()
def softmax_center(teacher_logits, center, teacher_temp):
    """DINO centering: softmax((logits - center) / temp) over K; center (1, K), an EMA of logits."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center, teacher_logits, momentum=CENTER_MOMENTUM):
    """center <- m * center + (1 - m) * mean of the logits over all rows of all ranks; returns it.
    DINOv2 averages per-rank means: the same when ranks hold equal row counts, as CLS tokens do."""
    # the row count in fp32 whatever the logits' dtype: bf16 (--amp) rounds 65,713 rows to 65,536
    count = torch.full((1,), float(len(teacher_logits)), device=teacher_logits.device)
    stats = torch.cat([teacher_logits.float().sum(0), count])
    stats = utils.all_reduce(stats.float())  # (K + 1,): logit sums and the row count
    if stats[-1] == 0:  # no masked patch anywhere this step
        return center
    return center * momentum + stats[:-1].unsqueeze(0) / stats[-1] * (1 - momentum)


@torch.no_grad()
def target_stats(t_probs):
    """DINO's two ways to fail, as numbers (DINO §5.3): the mean entropy of the teacher's CLS
    targets (ln K: uniform, nothing to learn; 0: one-hot) and exp(entropy of their batch mean),
    the prototypes in use (1: every image on one prototype, a collapse). Learning needs both:
    sharp targets that differ between images. t_probs (rows, K), rows summing to 1."""
    p = t_probs.float()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    mean = p.mean(0)
    used = torch.exp(-(mean * mean.clamp_min(1e-12).log()).sum())
    return {"target_entropy": entropy, "prototypes_used": used}


@functools.cache
def compiled(fn):
    """torch.compile(fn), built once per function: --compile fuses the loss terms' elementwise
    passes over (rows, K) logits. bench.py losses --compile: they were 36 ms of a 347 ms dbt-dino
    step on an H100; on 2 CPU cores, centering + DINO + iBOT forward and backward at K = 65,536
    (16 + 64 crops, 1,000 masked rows): 1,218 -> 334 ms. The first call per shape compiles."""
    return torch.compile(fn)


def loss_fn(fn, fused):
    """fn itself, or with fused (--compile) its compiled version: same result to float rounding."""
    return compiled(fn) if fused else fn


# --------------------------------------------------------------------------------------------------
# Schedules: one value per iteration, precomputed as DINO does, so the loop only indexes them.

def cosine_schedule(base, final, total, warmup=0, start_warmup=0, freeze=0):
    """DINOv2's CosineScheduler as an array: `freeze` zeros, linspace(start_warmup, base, warmup),
    then a half cosine from base to final over the remaining total - warmup - freeze iterations."""
    iters = np.arange(total - warmup - freeze)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([np.zeros(freeze), np.linspace(start_warmup, base, warmup), cosine])


def make_schedules(args, world_size):
    """Per-iteration lr, last-layer lr, weight decay, teacher momentum and teacher temperature."""
    lr = args.lr * math.sqrt(args.batch_size * world_size / 1024)  # DINOv2's sqrt_wrt_1024 rule
    warmup = min(args.warmup, args.steps)
    freeze = min(args.freeze_last_layer, args.steps)
    temp_warmup = min(args.teacher_temp_warmup, args.steps)
    lr_schedule = cosine_schedule(lr, MIN_LR, args.steps, warmup)
    last_layer_lr = lr_schedule.copy()
    last_layer_lr[:freeze] = 0  # prototypes frozen at first (DINOv2's freeze_last_layer)
    return {
        "lr": lr_schedule,
        "last_layer_lr": last_layer_lr,
        "wd": cosine_schedule(args.wd, args.wd_end, args.steps),
        "momentum": cosine_schedule(args.momentum, 1.0, args.steps),
        # linear 0.04 -> --teacher-temp (DINOv2: 0.07), then constant (DINOv2 builds it with
        # total = warmup; past the end its scheduler returns the final value)
        "teacher_temp": cosine_schedule(args.teacher_temp, args.teacher_temp, args.steps,
                                        temp_warmup, WARMUP_TEACHER_TEMP),
    }


def param_groups(student, layer_decay):
    """AdamW groups with DINOv2's multipliers (model.param_groups, the rule probe.py's fine-tuning
    shares): lr x layer_decay^(depth + 1 - layer_id) (layer 0 = embeddings, i + 1 = blocks.i,
    depth + 1 = final norm and heads), x0.2 for patch_embed; no weight decay on biases, norms and
    LayerScale gammas; the prototype layer follows the last-layer lr."""
    return model.param_groups(student, student.backbone.n_blocks, layer_decay)


# --------------------------------------------------------------------------------------------------
# One training iteration

@torch.no_grad()
def teacher_targets(cls_logits, patch_logits, centers, temp, mode, fused=False):
    """Teacher logits (bf16 under --amp) -> fp32 probs: per-view CLS [(2B, K)], masked patches
    (M, K). Centering uses the centers from before this batch, then updates them in place (DINOv2
    applies the update lazily). fused: softmax_center through torch.compile."""
    if mode == "sinkhorn":  # all-reduces inside: eager
        return [sinkhorn_knopp(c, temp) for c in cls_logits], sinkhorn_knopp(patch_logits, temp)
    softmax = loss_fn(softmax_center, fused)
    probs = [softmax(c, centers["dino"], temp) for c in cls_logits]
    patch_probs = softmax(patch_logits, centers["ibot"], temp)
    centers["dino"] = update_center(centers["dino"], cls_logits[0])  # global crops only, as DINOv2
    centers["ibot"] = update_center(centers["ibot"], patch_logits)
    return probs, patch_probs


def dino_ibot_terms(s_global, s_local, s_patch, t_global, t_patch, masks_weight, ibot_weight,
                    fused=False):
    """The DINO (local and global crops) and iBOT terms from student logits and teacher targets:
    s_global, t_global (2B, K) with rows [crop 1; crop 2] of the same B images, s_local
    (n_local B, K), s_patch, t_patch (M, K). fused: through torch.compile (loss_fn)."""
    n_images = len(s_global)  # 2B global crops
    n_local = len(s_local) // (n_images // 2)
    n_terms = 2 + max(2 * n_local, 1)  # 2 global-vs-other-global pairs + 2 per local crop = 18
    t_swapped = torch.cat(t_global.chunk(2)[::-1])  # [crop 2; crop 1]: row pairs are cross-view
    dino = loss_fn(dino_loss, fused)
    ibot = loss_fn(ibot_loss, fused)
    return {  # both DINO parts have weight 1; the global term is one mean over 2B rows x 2 pairs
        "dino_local": dino(s_local.chunk(n_local), t_global.chunk(2)) / n_terms if n_local else 0.0,
        "dino_global": 2 * dino([s_global], [t_swapped]) / n_terms,
        "ibot": ibot_weight * ibot(s_patch, t_patch, masks_weight, n_images),
    }


@torch.no_grad()
def ema_update(teacher, student, m):
    """teacher = m * teacher + (1 - m) * student, parameter by parameter (buffers not averaged)."""
    t, s = list(teacher.parameters()), list(student.parameters())
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, s, alpha=1.0 - m)


def train_step(student, teacher, batch, centers, optimizer, sched, args):
    """One iteration on a collated batch (data.collate_pretrain, on the device): student step,
    teacher EMA, centers. `sched`: this iteration's schedule values. Returns 0-d loss terms."""
    raw = student.module if isinstance(student, DDP) else student
    model.set_rates(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
    glob = batch["global"]  # (2B, 3, G, G)
    masks = batch["masks"]  # (2B, N)
    idx = batch["mask_indices"]  # (M,)
    adjacent = batch.get("adjacent") if args.adjacent_weight > 0 else None  # (2B, 3, G, G): s, s'
    device = glob.device.type
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=args.amp and device == "cuda")
    extra = [adjacent] if adjacent is not None else []
    with torch.no_grad(), amp:  # the teacher sees the global crops unmasked, and no local crops
        _, t_logits, t_patch = teacher([glob] + extra, None, idx)
    t_probs, t_patch = teacher_targets(t_logits, t_patch, centers, sched["teacher_temp"],
                                       args.centering, args.compile)
    with amp:
        # (2B, D), [(2B | n_l B | 2B, K)], (M, K)
        s_cls, s_logits, s_patch = student([glob, batch["local"]] + extra, masks, idx)
    s_global, t_global = s_logits[0], t_probs[0]  # (2B, K): [crop 1; crop 2] of B images
    losses = dino_ibot_terms(s_global, s_logits[1], s_patch, t_global, t_patch,
                             batch["masks_weight"], args.ibot_weight, args.compile)
    if args.koleo_weight > 0:  # per global crop, never across two crops of one image; no gather
        losses["koleo"] = args.koleo_weight * sum(koleo_loss(c) for c in s_cls.float().chunk(2))
    if adjacent is not None:
        adjacent_loss = loss_fn(adjacent_slice_loss, args.compile)
        # hand-made batches carry no adjacent_valid: every row counts
        valid = batch.get("adjacent_valid", torch.ones(len(glob), device=glob.device))
        s_pair, t_pair = s_logits[2].chunk(2), t_probs[1].chunk(2)  # (B, K) each: s, then s'
        losses["adjacent"] = args.adjacent_weight * adjacent_loss(*s_pair, *t_pair,
                                                                  valid.chunk(2)[0])
    total = sum(losses.values())
    # 0-d tensors: no host sync here
    values = {k: torch.as_tensor(v, device=glob.device).detach().float() for k, v in losses.items()}
    values["loss"] = total.detach().float()
    values.update(target_stats(t_global))
    # the step's one host sync: all ranks learn whether any rank's loss is non-finite and stop
    # together, before this step touches any weight or file (logging syncs every --log-every)
    bad = utils.all_reduce((~torch.isfinite(values["loss"])).float())
    if bad.item():
        if utils.is_main():
            terms = " ".join(f"{k}={float(v):.4g}" for k, v in values.items())
            print(f"error: non-finite loss on {int(bad.item())} rank(s) at this step, stopping "
                  f"without saving (rank 0: {terms})", file=sys.stderr, flush=True)
        sys.exit(1)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    for part in (raw.backbone, raw.dino_head, getattr(raw, "ibot_head", None)):
        if part is not None:  # clipped separately, as DINOv2
            nn.utils.clip_grad_norm_(part.parameters(), CLIP_GRAD)
    optimizer.step()
    ema_update(teacher, raw, sched["momentum"])  # teacher = m * teacher + (1 - m) * student
    return values


# --------------------------------------------------------------------------------------------------
# Setup, checkpoints, evaluation

def build_models(args, device):
    """Student (backbone with drop path + heads) and its EMA teacher, an exact copy in eval mode."""
    torch.manual_seed(args.seed)  # same init on every rank: the teacher is copied before DDP syncs
    # LayerScale 1e-5 is DINOv2's training init; --init overwrites it with the checkpoint's gammas
    backbone = model.build(args.model, init_values=args.layerscale, drop_path_rate=args.drop_path)
    backbone.grad_checkpointing = args.grad_checkpoint  # no effect on the teacher copy: no grad
    student = SSLModel(backbone, args.prototypes, args.head_hidden, args.head_bottleneck,
                       args.separate_ibot_head)
    if args.init:
        model.load_pretrained(student.backbone, args.init)
        # a DINOv2 teacher_checkpoint.pth (or our ckpt.pt) also holds heads: reuse them if they fit
        saved = utils.read_checkpoint(args.init).get("teacher") or {}
        heads = {k: v for k, v in saved.items() if k.startswith(("dino_head.", "ibot_head."))}
        own = student.state_dict()
        if heads and all(k in own and own[k].shape == v.shape for k, v in heads.items()):
            student.load_state_dict(heads, strict=False)
    student.to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)  # eval: no drop path in teacher
    if args.compile:  # after the copy (compiled modules do not deep-copy); same state_dict keys
        model.compile_blocks(student.backbone)
        model.compile_blocks(teacher.backbone)
    return student, teacher


# What shapes the weights and makes a continuation exact: schedules, data and random streams
# (reseeded at every --save-every step) and loss. --data, --workers and speed flags may change.
RESUME_SETTINGS = (
    "model", "layerscale", "prototypes", "head_hidden", "head_bottleneck", "separate_ibot_head",
    "seed", "recipe", "global_size", "local_size", "mip_margin", "samples_per_volume",
    "batch_size", "steps", "save_every", "lr", "warmup", "wd", "wd_end", "momentum", "teacher_temp",
    "teacher_temp_warmup", "freeze_last_layer", "layer_decay", "drop_path", "centering",
    "koleo_weight", "ibot_weight", "adjacent_weight")


def load_resume(path, args, device):
    """ckpt.pt -> dict, checked like --init: a missing, unreadable or wrong kind of file, or a
    model/head that does not fit the flags, is one error naming the file and what is wrong."""
    ckpt = utils.read_checkpoint(path, device)
    need = {"student", "teacher", "optimizer", "loss_state", "step", "args"}
    if not isinstance(ckpt, dict) or not need <= set(ckpt):
        raise ValueError(f"{path}: not a pretrain.py ckpt.pt (it lacks "
                         f"{sorted(need - set(ckpt or {}))}); --resume continues a run from its "
                         "ckpt.pt, --init starts from backbone weights such as backbone.pth")
    ckpt["args"].setdefault("mip_margin", 2.5)  # what runs made before the flag resampled at
    utils.check_resume_flags(path, ckpt["args"], args, RESUME_SETTINGS)
    return ckpt


def probe_set(args, source):
    """The quick probe's images (rank 0). On the phantoms: HELDOUT_PATIENTS patients of a larger
    archive drawn from the same seed (its first patients are the training ones, removed), so the
    probe is fit and scored on patients training never saw. On --data: the first --eval-exams exams
    of the training archive itself, DBT-DINO's checkpoint check, said to be not held out."""
    clahe = data.PREPROCESS[args.recipe] == "clahe"  # the probe sees what training sees
    if args.data != "synthetic":
        return dict(data.density_eval_set(source, args.global_size, args.eval_exams, clahe=clahe),
                    what="exams of the training archive, NOT held out")
    trained = {e["patient"] for e in utils.read_csv(os.path.join(source, "exams.csv"))}
    bigger = phantoms.synthetic_archive(patients=len(trained) + HELDOUT_PATIENTS)
    return dict(data.density_eval_set(bigger, args.global_size, exclude=trained, clahe=clahe),
                what=f"held-out phantom patients, {len(trained)} training patients removed")


def quick_probe(step, teacher, eval_set, device, writer):
    """DBT-DINO's checkpoint check (rank 0): a density probe on the teacher's frozen patch stats."""
    feats = model.patch_mean_std(teacher.backbone, eval_set["images"], device)  # (M, 2D)
    result = metrics.density_probe_cv(feats.numpy(), eval_set["labels"].numpy(),
                                      eval_set["groups"].numpy())
    n_patients = len(eval_set["groups"].unique())
    utils.log(f"step {step}: density_acc {result['density_acc']:.4f} (majority class "
              f"{result['density_majority']:.4f}; {result['density_n']} images of {n_patients} "
              f"{eval_set['what']}; 5-fold by patient)")
    writer.write(dict(step=step, split="val", time=time.time(), **result))


def probe_verdict(records, eval_set, step):
    """The end-of-run line: did the probe at `step` beat the step-0 backbone and the majority class?
    Paired accuracy gains on the same images, 95% CIs from 2,000 bootstrap draws of whole patients;
    a gain counts only when its CI lies above zero. None without a step-0 probe on record."""
    val = {r["step"]: r for r in records if r.get("split") == "val" and "density_pred" in r}
    if 0 not in val or step not in val or step == 0:
        return None
    y, groups = eval_set["labels"].numpy(), eval_set["groups"].numpy()
    final = np.asarray(val[step]["density_pred"]) == y  # (M,) correct or not, per image
    baselines = {"step0": ("step-0 backbone", np.asarray(val[0]["density_pred"]) == y),
                 "majority": ("majority class", y == np.bincount(y).argmax())}
    gain = lambda a, b: float(np.mean(a) - np.mean(b))  # noqa: E731  paired: same resample
    result, parts = dict(step=step, split="verdict", accuracy=float(final.mean())), []
    for key, (name, base) in baselines.items():
        est, lo, hi = metrics.bootstrap_ci(gain, final, base, n_boot=2000, groups=groups)
        result.update({f"gain_{key}": est, f"gain_{key}_ci": [lo, hi], f"beat_{key}": lo > 0})
        parts.append(f"{'beat' if lo > 0 else 'did NOT beat'} the {name} ({base.mean():.3f}; "
                     f"gain {est:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f})")
    line = (f"held-out density probe at step {step}: {final.mean():.3f}; training "
            + " and ".join(parts))
    return result, line


# the loss terms and the quick probe, as curves.png shows them (unlogged terms left out)
CURVES = [("train", k) for k in ("loss", "dino_local", "dino_global", "ibot", "koleo", "adjacent")]
CURVES += [("train", k) for k in ("target_entropy", "prototypes_used", "lr")]
CURVES += [("val", "density_acc")]


def save_run(args, step, student, teacher, optimizer, centers, writer):
    """ckpt.pt (everything to resume), backbone.pth and curves.png, each written atomically."""
    heads = dict(prototypes=args.prototypes, hidden=args.head_hidden,
                 bottleneck=args.head_bottleneck, separate_ibot_head=args.separate_ibot_head)
    utils.save_checkpoint(os.path.join(args.out, "ckpt.pt"), dict(
        version=1, step=step, config=student.backbone.config, args=vars(args), heads=heads,
        preprocess=data.PREPROCESS[args.recipe],
        student=student.state_dict(), teacher=teacher.state_dict(),
        optimizer=optimizer.state_dict(), loss_state=centers))
    # the teacher backbone alone, hub keys: what probe.py, detect.py and DINOv2's code load; its
    # preprocessing beside it (a key inside would break strict loading by DINOv2's code)
    utils.save_checkpoint(os.path.join(args.out, "backbone.pth"), teacher.backbone.state_dict())
    utils.atomic_write(os.path.join(args.out, "backbone.json"), json.dumps(
        dict(preprocess=data.PREPROCESS[args.recipe], recipe=args.recipe, step=step)) + "\n")
    # from metrics.jsonl (the steps before a resume too); density_acc against the majority class
    title = (f"pretrain.py --preset {args.preset} --model {args.model}: {args.out}, "
             f"step {step}/{args.steps}")
    utils.draw_curves(os.path.join(args.out, "curves.png"), writer.read(), CURVES,
                      {"density_acc": "density_majority"}, title=title)


# --------------------------------------------------------------------------------------------------

def train(args):
    # ---------------- distributed, inputs, output folder ----------------
    rank, local_rank, world, device = utils.setup_distributed()
    if args.device != "auto":
        device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" else args.device)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    resume = ckpt_path if args.resume == "auto" and os.path.exists(ckpt_path) else args.resume
    resume = "" if resume == "auto" else resume
    ckpt = load_resume(resume, args, device) if resume else None
    stale = []  # a fresh run, or a --resume from elsewhere, never lands silently on another run
    if ckpt is None or os.path.dirname(os.path.abspath(resume)) != os.path.abspath(args.out):
        stale = utils.check_run_folder(args.out, "ckpt.pt", args.overwrite, "pretrain.py",
                                       ("backbone.pth", "backbone.json", "curves.png"))

    # ---------------- student, teacher, optimizer, loss state ----------------
    student, teacher = build_models(args, device)
    fused = device.type == "cuda"  # one kernel for the whole update instead of a few per tensor
    optimizer = torch.optim.AdamW(param_groups(student, args.layer_decay), betas=(0.9, 0.999),
                                  fused=fused)
    centers = {"dino": torch.zeros(1, args.prototypes, device=device),  # EMA of teacher logits
               "ibot": torch.zeros(1, args.prototypes, device=device)}
    start = 0
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        centers, start = ckpt["loss_state"], ckpt["step"]
    ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(student, device_ids=ids) if world > 1 else student
    schedules = make_schedules(args, world)

    # ---------------- data ----------------
    sources = [str(phantoms.synthetic_archive()) if s == "synthetic" else s for s in args.sources]
    source = sources[0]  # its exams.csv, if any, feeds the density probe
    remote = dict(manifest=args.manifest, cache_bytes=args.cache_bytes,
                  credentials=args.dicomweb_credentials or None,
                  ca_bundle=args.dicomweb_ca_bundle or None)
    patch = student.backbone.patch_size
    stream = build_stream(args, sources, patch, remote)
    collate = functools.partial(data.collate_pretrain, patch_size=patch,
                                tissue_masking=stream.multicrop.tissue_aware)
    has_labels = os.path.exists(os.path.join(source, "exams.csv"))  # density labels (data.py)
    # rank 0 alone reads the probe's images while the others wait in the first all-reduce: the
    # cap keeps that wait (and the images' memory at --global-size) inside the collective timeout
    eval_set = (probe_set(args, source)
                if args.eval_every and has_labels and utils.is_main() else None)

    if start >= args.steps:  # a relaunched finished job, its inputs still valid: leave its folder
        utils.log(f"{resume}: this run already finished (step {start} of {args.steps}); "
                  "nothing to do")
        if world > 1:
            dist.destroy_process_group()
        return

    # ---------------- the inputs are valid: only now touch the run folder ----------------
    writer = None
    if utils.is_main():
        utils.write_args(args.out, args, "pretrain.py", stale, torch=torch.__version__,
                         world_size=world)
        writer = utils.JsonlWriter(os.path.join(args.out, "metrics.jsonl"))
        dropped = writer.truncate_after(start)  # steps after the checkpoint are redone: logged once
        if ckpt is not None:
            utils.log(f"resumed from {resume} at step {start} ({dropped} later metrics.jsonl "
                      "records dropped)")
    n_params = sum(p.numel() for p in student.parameters()) / 1e6
    utils.log(f"{args.model}: {n_params:.1f}M student parameters, world {world} x batch "
              f"{args.batch_size}, peak lr {schedules['lr'].max():.2e} on {device}")
    if args.eval_every and not has_labels:
        utils.log(f"no exams.csv under {source}: the density probe is off")
    run_loop(args, ddp, student, teacher, optimizer, centers, schedules, stream, collate, eval_set,
             writer, start, device)
    if world > 1:
        dist.destroy_process_group()


def build_stream(args, sources, patch, remote=None):
    """The training stream: --recipe's crops, and its preprocessing (data.PREPROCESS: CLAHE for
    mammodino, once per slice read), over one source or several mixed by --data-weights."""
    recipe = dict(data.RECIPES[args.recipe], global_size=args.global_size,
                  local_size=args.local_size, mip_margin=args.mip_margin)
    return data.PretrainStream(sources if len(sources) > 1 else sources[0], patch_size=patch,
                               seed=args.seed, **recipe, weights=args.data_weights or None,
                               slices_per_volume=args.samples_per_volume, dicomweb=remote,
                               clahe=data.PREPROCESS[args.recipe] == "clahe")


def source_share(drawn, args, device):
    """With several --data sources: {"source_share": each one's share of the samples drawn so far
    by every rank in this process's run}, for metrics.jsonl beside the weights asked for."""
    if len(args.sources) < 2:
        return {}
    total = utils.all_reduce(drawn.to(device)).cpu()  # on the device: NCCL reduces CUDA tensors
    return {"source_share": (total / total.sum().clamp_min(1)).tolist()}


def run_loop(args, ddp, student, teacher, optimizer, centers, schedules, stream, collate,
             eval_set, writer, start, device):
    """The training iterations from `start`: step, log every --log-every, probe, checkpoint."""
    rank, world = utils.rank_world()
    progress, skips = utils.Progress(args.steps, start), data.SkipCounter(stream)
    window = []  # (step s, data s) since the last progress line
    drawn = torch.zeros(len(args.sources), dtype=torch.float64)  # samples per --data source
    if eval_set is not None and start == 0:  # the starting backbone: what training must beat
        quick_probe(0, teacher, eval_set, device, writer)
    for it in range(start, args.steps):
        if it == start or it % args.save_every == 0:
            # each checkpoint step restarts the data and RNG streams from (seed, step, rank): a run
            # resumed from ckpt.pt sees the batches, masks and drop-path draws of an unbroken one
            utils.seed_everything(args.seed + 65536 * it, rank)
            stream.set_epoch(it)
            batches = iter(data.make_loader(stream, args.batch_size, args.workers, collate,
                                            args.seed + it + rank))
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except ValueError as e:  # this rank's shard has no readable volume left: say so from here
            e.rank_specific = True
            raise
        skips.add(batch.pop("skipped", {}))
        drawn += torch.bincount(batch.pop("source"), minlength=len(drawn)).double()
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        t1 = time.perf_counter()
        sched = {k: float(v[it]) for k, v in schedules.items()}
        values = train_step(ddp, teacher, batch, centers, optimizer, sched, args)
        window.append((time.perf_counter() - t0, t1 - t0))
        step = it + 1
        if args.compile and it == start:  # said once; the median ms/step of progress lines skips it
            utils.log(f"torch.compile: the first step took {window[-1][0]:.1f} s (compiling the "
                      "blocks and the loss terms; the iBOT rows vary, so the second step "
                      "recompiles them once with a dynamic row count)")
        if step % args.log_every == 0 or step == args.steps:  # rank-averaged terms, to log only
            avg = utils.all_reduce(torch.stack(list(values.values()))) / world
            values = dict(zip(values, avg.tolist()), lr=schedules["lr"][it])
            n_skipped = skips.update()  # unreadable volumes over all workers and ranks
            if n_skipped:
                values["skipped"] = n_skipped
            values.update(stream.cache_report())  # DICOMweb: hit rate, GB fetched, bytes per sample
            step_s, data_s = np.median([w[0] for w in window]), np.median([w[1] for w in window])
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            images_per_s = args.batch_size * world / step_s
            utils.log(progress.line(step, values, images_per_s, 1e3 * step_s, 1e3 * data_s, mem))
            share = source_share(drawn, args, device)  # a collective, like the loss terms
            if writer:
                writer.write(dict(step=step, split="train", time=time.time(), **values, **share))
            window = []
            skips.check(args.max_skip_fraction)
        if eval_set is not None and (step % args.eval_every == 0 or step == args.steps):
            quick_probe(step, teacher, eval_set, device, writer)
        if utils.is_main() and (step % args.save_every == 0 or step == args.steps):
            save_run(args, step, student, teacher, optimizer, centers, writer)
    n_skipped = skips.update()  # a collective: every rank asks
    if writer:
        writer.write(dict(step=args.steps, split="data", time=time.time(), skipped=n_skipped,
                          volumes=len(stream.paths)))
    utils.log(skips.summary())
    verdict = probe_verdict(writer.read(), eval_set, args.steps) if eval_set and writer else None
    if verdict:
        writer.write(verdict[0])
        utils.log(verdict[1])
    if utils.is_main():
        utils.log(utils.folder_line(args.out))


if __name__ == "__main__":
    try:
        train(get_args())
    except (ValueError, OSError) as e:  # bad input: one line naming the file, not a traceback
        # setup errors are the same on every rank: rank 0 says them once; one rank's error in the
        # loop (its data shard) is said by that rank. A loader worker's carries its traceback.
        if utils.is_main() or getattr(e, "rank_specific", False):
            print(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr, flush=True)
        sys.exit(1)
