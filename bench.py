"""Benchmarks for the costs that decide whether the papers' workloads are affordable.

    python bench.py all                          # 1-6 below, tables, bench.json (2 CPUs: ~10 min)
    python bench.py all --quick                  # small sizes, about a minute (the tests run it)
    python bench.py all --device cuda --compile  # the GPU figures, torch.compile rows included

1. backbone: slices/s of ViT-S/14 and ViT-B/14 at 518 x 518, ours beside the reference code when
   installed (PyPI `dinov2`, timm): fp32 on CPU; bf16 autocast and bf16 weights on CUDA.
2. embed: DICOM on disk to features through probe.embed_volumes, and its loader alone.
3. precision: bf16 autocast and bf16 weights against fp32: token cosines, density-probe accuracy.
4. pretrain: images/s, ms/step and peak memory of one DINOv2 + iBOT + KoLeo training step.
   losses: ms of that step's loss part alone, eager and compiled.
5. read: one slice against a full decode of a 60 x 2457 x 1996 uint16 volume (native, JPEG 2000),
   and the pretraining sample path per core.
6. detect: slices/s of detect.py's volume inference (frozen ViT + pyramid + RetinaNet), in chunks.
7. stream (`bench.py stream`, not in `all`): DICOMweb from a throwaway loopback Orthanc through
   pacs.py, cold and through a rotating cache a quarter of the data.
Figures are medians over --repeats runs after --warmup, implementations interleaved run by run
(alternating order) so drift hits all alike. GPU tables add TFLOP/s (analytic matmul + attention
FLOPs) and its fraction of the matmul peak measured in the run (one 8192^3 bf16 GEMM). A CUDA
`all` run ends with issue 14's H100 targets (GOALS) against our best row for each, met or not.
"""
import argparse
import base64
import copy
import gc
import http.client
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import unittest.mock
from pathlib import Path

import pydicom
import torch

import data
import dicom
import model
import pacs
import phantoms
import preprocess
import retinanet
import utils

FULL_SIZE = (60, 2457, 1996)  # a clinical DBT volume (a small one with --quick)
ARCHS = {"vits14": ("vit_small", "vit_small_patch14_dinov2"),
         "vitb14": ("vit_base", "vit_base_patch14_dinov2")}  # ours: (dinov2 name, timm name)


class HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the module docstring as written, then each flag with its default."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormat)
    utils.one_line_errors(p)
    g = p.add_argument_group("what to run")
    g.add_argument("what", nargs="?", default="all", choices=["all", *BENCHES],
                   help="which benchmark; `all` is every one but stream, which needs Orthanc")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available")
    g.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    g.add_argument("--compile", action="store_true", help="also time our blocks under "
                   "torch.compile (model.compile_blocks), and compile the pretraining step")
    g.add_argument("--profile", action="store_true", help="print the kernel-time tables of our "
                   "fastest backbone row and of each pretraining row that fits")
    for flag, choices, text in [  # fixed sets; the first is the default
            ("--compile-mode", ["default", "max-autotune-no-cudagraphs", "max-autotune"],
             "torch.compile mode of the compiled rows; max-autotune searches matmul kernels "
             "(minutes)"),
            ("--compile-scope", ["blocks", "model"], "blocks: model.compile_blocks (what pretrain "
             "and probe use); model: torch.compile of the whole forward_features, for comparison"),
            ("--precision", ["all", "autocast", "bf16-weights"],
             "CUDA backbone rows: both precisions or one"),
            ("--arch", ["all"] + list(ARCHS), "backbone benchmark architectures")]:
        g.add_argument(flag, default=choices[0], choices=choices, help=text)
    g = p.add_argument_group("sizes")
    count, at_least_0 = utils.number(int, 1), utils.number(int, 0)
    for flag, kind, default, text in [  # range-checked numbers
            ("--repeats", count, 5, "timed runs per figure, median reported"),
            ("--warmup", at_least_0, 1, "untimed runs before timing"),
            ("--chunk", at_least_0, 0, "slices per forward; 0 = DBT-DINO's extraction chunk (75) "
             "on CUDA, 2 on CPU"),
            ("--size", utils.number(int, 14), 518, "input side for backbone, embed, precision"),
            ("--volumes", count, 24, "volume reads in the embed benchmark"),
            ("--workers", at_least_0, 0, "embed loader workers; 0 = all cores but two"),
            ("--patients", utils.number(int, 8), 32, "phantom patients in the precision "
             "benchmark's density probe")]:
        g.add_argument(flag, type=kind, default=default, help=text)
    g = p.add_argument_group("files")
    g.add_argument("--cache", default="cache/bench",
                   help="where the synthetic DICOM volumes are written once")
    g.add_argument("--out", default="bench.json", help="where the results are written")
    args = p.parse_args(argv)
    args.compile_mode = None if args.compile_mode == "default" else args.compile_mode  # torch's
    if args.size % 14:
        p.error(f"argument --size: {args.size} is not a multiple of the patch size 14")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda was asked for, but this machine has no usable CUDA device")
    return args


# ------------------------------------------------------------------------ timing, FLOPs, tables
def sync(device):
    """Wait for the device's queued work, so a timer reads the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns, repeats, warmup, device):
    """Median seconds per call of each function, run round-robin (order reversed every other round)
    so that load changes and warm caches favour none of them."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak_tflops(device, n=8192, reps=20):
    """Dense bf16 TFLOP/s of one n^3 GEMM measured now: the denominator of every 'fraction of peak'
    (measured, because clocks, power limits and parts differ from the datasheet). None on CPU."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))  # (n, n)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def add_rates(rows, flops_key, seconds_key, peak):
    """TFLOP/s and its fraction of the measured matmul peak, in place."""
    for r in rows:
        if r.get(seconds_key):
            r["tflops"] = r.pop(flops_key) / r[seconds_key] / 1e12
            r["peak_frac"] = r["tflops"] / peak if peak else None
        r.pop(flops_key, None)
    return rows


def profile(fn, name, device, rows=15):
    """Where the time goes: the costliest kernels of one call (what model.py's comments cite)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    acts += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table_text = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    print(f"profile of {name}:\n" + table_text, flush=True)


def table(rows, hidden=("bench", "rss_before_mib", "seconds")):
    """Rows of dicts as aligned text columns, in the order the keys first appear, but `hidden`."""
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in hidden]

    def fmt(v):  # cosines near 1 keep six decimals: 0.99998 is not 1
        if isinstance(v, float):
            return f"{v:.6f}" if 0.99 < v < 1 else f"{v:.4g}"
        return "-" if v is None else str(v).replace(" ", "")
    cells = [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


# ------------------------------------------------------------------------ 1. backbone
def reference_models(arch, ours, size):
    """The reference implementations with our random weights copied in (None: not installed)."""
    refs = {}
    try:
        from dinov2.models import vision_transformer as vt
        ref = getattr(vt, ARCHS[arch][0])(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
        ref.load_state_dict(ours.state_dict(), strict=True)
        refs["dinov2"] = ref
    except ImportError:
        refs["dinov2"] = None
    try:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
        ref = timm.create_model(ARCHS[arch][1], pretrained=False, num_classes=0,
                                img_size=size)  # a fixed input size
        ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=True)
        refs["timm"] = ref
    except ImportError:
        refs["timm"] = None
    return refs


def compiled_copy(vit, args):
    """`vit` with its blocks or its whole forward_features compiled, per --compile-scope."""
    if args.compile_scope == "blocks":
        return model.compile_blocks(vit, mode=args.compile_mode, log=None)
    vit.forward_features = torch.compile(vit.forward_features, mode=args.compile_mode, dynamic=False)
    return vit


def backbone_impls(arch, ours, size, args, device):
    """(name, precision) -> module: eager ours and the references at each precision (fp32 on CPU;
    autocast: bf16 autocast, fp32 weights; bf16-weights: all bf16), ours compiled by --compile."""
    refs = reference_models(arch, ours, size)
    cuda = device.type == "cuda"
    precisions = ["autocast", "bf16-weights"] if cuda else ["fp32"]
    precisions = precisions if args.precision == "all" or not cuda else [args.precision]
    impls = {}
    for prec in precisions:
        impls[("ours", prec)] = cast(ours, prec)
        for name, ref in refs.items():
            if prec == precisions[0] or name == "timm":  # dinov2 is far behind: one precision
                impls[(name, prec)] = cast(ref, prec) if ref is not None else None
        if args.compile:
            impls[("ours+compile", prec)] = compiled_copy(cast(copy.deepcopy(ours), prec), args)
    return impls


def cast(m, prec):
    """A bf16 copy of module m for bf16-weights; m itself otherwise."""
    return copy.deepcopy(m).to(torch.bfloat16) if prec == "bf16-weights" else m


def bench_backbone(args, device):
    """Embedding throughput (probe.py's step): slices/s of each implementation and precision, with
    TFLOP/s, the speed relative to timm, the largest difference from ours, and compile time."""
    rows = []
    chunk = args.chunk or (75 if device.type == "cuda" else 2)
    size = 112 if args.quick else args.size
    for arch in (["vits14"] if args.quick else list(ARCHS) if args.arch == "all" else [args.arch]):
        ours = model.build(arch).eval().to(device)
        x = torch.rand(chunk, 3, size, size, device=device)  # (chunk, 3, H, W)
        fns = {}  # (impl, precision) -> a call of forward_features
        outs = {}  # (impl, precision) -> its CLS tokens, to compare with ours
        compile_s = {}  # (impl, precision) -> seconds of the first, compiling call
        for (name, prec), m in backbone_impls(arch, ours, size, args, device).items():
            if m is None:
                rows.append(dict(bench="backbone", arch=arch, impl=name, precision=prec,
                                 note="not installed: skipped"))
                continue
            m = m.eval().to(device)
            xin = x.to(torch.bfloat16) if prec == "bf16-weights" else x

            def run(m=m, key=(name, prec), xin=xin, amp=prec == "autocast"):  # bound now, not later
                with torch.inference_mode():
                    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                        out = m.forward_features(xin)
                outs[key] = out["x_norm_clstoken"] if isinstance(out, dict) else out[:, 0]
            if name.endswith("+compile"):  # the first call compiles: timed apart, once per row
                t0 = time.perf_counter()
                run()
                sync(device)
                compile_s[(name, prec)] = time.perf_counter() - t0
            fns[(name, prec)] = run
        secs = interleaved(fns, 1 if args.quick else args.repeats, args.warmup, device)
        if args.profile:  # our fastest setting: compiled if timed, at the last precision
            ours_keys = [k for k in fns if k[0].startswith("ours")]
            profile(fns[ours_keys[-1]], ours_keys[-1], device)
        for (name, prec), s in secs.items():
            timm_s = secs.get(("timm", prec))
            diff = (outs[(name, prec)].float() - outs[("ours", prec)].float()).abs().max().item()
            rows.append(dict(bench="backbone", arch=arch, impl=name, precision=prec, size=size,
                             chunk=chunk, slices_per_s=chunk / s,
                             flops=model.vit_flops(ours, size, size) * chunk, seconds=s,
                             vs_timm=timm_s / s if timm_s else None,  # > 1: faster than timm
                             max_abs_diff=diff, compile_s=compile_s.get((name, prec))))
    return add_rates(rows, "flops", "seconds", args.peak)


# ------------------------------------------------------------------------ 2. embed
def loader_only(paths, workers, pin):
    """The embed loader alone (decode on workers, hand-over, pinning): the device side's ceiling."""
    loader = torch.utils.data.DataLoader(data.VolumeReader(paths), batch_size=None,
                                         num_workers=workers, pin_memory=pin)
    t0, slices = time.perf_counter(), 0
    for _, item in loader:
        slices += len(item["stored"]) if isinstance(item, dict) else 0
    rate = slices / (time.perf_counter() - t0)
    return dict(bench="embed", impl="loader-only" + ("+pin" if pin else ""), workers=workers,
                slices=slices, slices_per_s=rate, slices_per_s_per_core=rate / max(workers, 1))


def bench_embed(args, device):
    """Slices/s from DICOM on disk to per-view features through probe.embed_volumes (loader workers
    decode stored integers; the device does VOI, resize, ViT), per process and per loader core, and
    the share of time spent waiting for data. One volume is read --volumes times (page cache, as a
    warm archive); ViT-B/14 on CUDA, ViT-S/14 reading it once on a CPU."""
    import probe
    shape = (8, 512, 384) if args.quick else FULL_SIZE
    path = phantoms.cached_volume(args.cache, shape)
    cuda = device.type == "cuda"
    arch, size = ("tiny", 112) if args.quick else ("vitb14" if cuda else "vits14", args.size)
    workers = args.workers or (1 if args.quick else max(1, (os.cpu_count() or 2) - 2))
    chunk = args.chunk or (75 if cuda else 8)
    paths = [path] * (2 if args.quick else args.volumes if cuda else 1)
    rows = [loader_only(paths, workers, pin) for pin in ([True, False] if cuda else [False])]
    precisions = ["autocast", "bf16-weights"] if cuda else ["fp32"]
    for compiled in ([False, True] if args.compile else [False]):
        vit = model.build(arch).eval().to(device)
        if compiled:
            model.compile_blocks(vit, mode=args.compile_mode, log=None)
        for prec in precisions:
            kw = dict(size=size, chunk=chunk, workers=workers, precision=prec)
            warm = dict(kw, workers=min(workers, 1))
            probe.embed_volumes(vit, paths[:1], device, **warm)  # warm-up (compiles)
            _, stats = probe.embed_volumes(vit, paths, device, **kw)
            n, secs = stats["slices"], stats["seconds"]
            rows.append(dict(bench="embed", arch=arch, impl="ours+compile" if compiled else "ours",
                             precision=prec, size=size, volume="x".join(map(str, shape)),
                             workers=workers, slices=n, slices_per_s=n / secs,
                             slices_per_s_per_core=n / secs / max(workers, 1),
                             data_wait_share=stats["wait_seconds"] / secs,
                             skipped=stats["skipped"], flops=model.vit_flops(vit, size, size) * n,
                             seconds=secs))
    return add_rates(rows, "flops", "seconds", args.peak)


# ------------------------------------------------------------------------ 3. precision
@torch.no_grad()
def tokens(vit, images, device, prec, chunk=32):
    """CLS (M, D) and patch tokens (M, N, D) as fp32 on the CPU, at one precision."""
    cls, patches = [], []
    for x in images.split(chunk):
        x = x.to(device, torch.bfloat16 if prec == "bf16-weights" else torch.float32)
        with torch.autocast(device.type, torch.bfloat16, enabled=prec == "autocast"):
            out = vit.forward_features(x)
        cls.append(out["x_norm_clstoken"].float().cpu())
        patches.append(out["x_norm_patchtokens"].float().cpu())
    return torch.cat(cls), torch.cat(patches)


def bench_precision(args, device):
    """What reduced precision changes, with random-init weights (nothing is downloaded) on phantom
    slices: cosine of CLS and patch tokens to fp32, and the accuracy of metrics.density_probe_cv on
    model.patch_mean_std features. CUDA: ViT-B/14 at --size, --patients; CPU: ViT-S/14 at 224, 8."""
    import metrics
    cuda = device.type == "cuda" and not args.quick
    arch, size = ("vitb14", args.size) if cuda else ("tiny", 112) if args.quick else ("vits14", 224)
    archive = phantoms.synthetic_archive(patients=args.patients if cuda else 8, seed=7 if cuda else 0)
    ev = data.density_eval_set(archive, size=size)  # each view's central slice: (M, 3, size, size)
    fp32 = model.build(arch).eval().to(device)
    nets = {"fp32": fp32, "autocast": fp32, "bf16-weights": copy.deepcopy(fp32).to(torch.bfloat16)}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    feats = {k: tokens(net, ev["images"], device, k) for k, net in nets.items()}
    torch.backends.cuda.matmul.allow_tf32 = tf32
    cosine = torch.nn.functional.cosine_similarity
    rows = []
    for prec, (cls, patches) in feats.items():
        cos_cls = cosine(cls, feats["fp32"][0], dim=-1)  # (M,)
        cos_patch = cosine(patches, feats["fp32"][1], dim=-1).flatten()  # (M*N,)
        images = ev["images"].to(torch.bfloat16) if prec == "bf16-weights" else ev["images"]
        with torch.autocast(device.type, torch.bfloat16, enabled=prec == "autocast"):
            pooled = model.patch_mean_std(nets[prec], images, device)  # DBT-DINO's feature, (M, 2D)
        probe = metrics.density_probe_cv(pooled.numpy(), ev["labels"].numpy(), ev["groups"].numpy())
        rows.append(dict(bench="precision", arch=arch, weights="random-init", precision=prec,
                         size=size, images=len(cls), cos_cls_min=cos_cls.min().item(),
                         cos_cls_mean=cos_cls.mean().item(), cos_patch_min=cos_patch.min().item(),
                         cos_patch_mean=cos_patch.mean().item(), density_acc=probe["density_acc"],
                         acc_change=None, majority=probe["density_majority"]))
    for r in rows:
        r["acc_change"] = r["density_acc"] - rows[0]["density_acc"]
    return rows


# ------------------------------------------------------------------------ 4. pretrain, losses
# CUDA batch sizes tried, largest first, for dbt-dino without and with activation checkpointing
PRETRAIN_BATCHES = {False: (40, 32, 24, 16), True: (128, 112, 96, 80, 64)}


def pretrain_samples(p, n, workers):
    """n uncollated pretraining samples of the synthetic archive (workers make big batches fast)."""
    recipe = dict(data.RECIPES[p.recipe], global_size=p.global_size, local_size=p.local_size)
    stream = data.PretrainStream(phantoms.synthetic_archive(), patch_size=14, seed=0, **recipe)
    if workers == 0:
        it = iter(stream)
        return [next(it) for _ in range(n)]
    samples = []
    for part in data.make_loader(stream, 8, workers, list, seed=0):  # each worker: batches of 8
        samples += part
        if len(samples) >= n:
            return samples[:n]


def pretrain_row(args, device, p, samples):
    """One row: images/s of pretrain.train_step on a fixed collated batch of len(samples) images."""
    import pretrain
    batch = data.collate_pretrain(samples, patch_size=14)
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    student, teacher = pretrain.build_models(p, device)  # compiles the blocks when p.compile
    # as pretrain.train: fused AdamW on CUDA (one kernel for the whole update)
    optimizer = torch.optim.AdamW(pretrain.param_groups(student, p.layer_decay),
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    centers = {k: torch.zeros(1, p.prototypes, device=device) for k in ("dino", "ibot")}
    sched = {k: float(v[0]) for k, v in pretrain.make_schedules(p, 1).items()}

    def step():
        return pretrain.train_step(student, teacher, batch, centers, optimizer, sched, p)
    t0 = time.perf_counter()
    step()  # the first step allocates optimizer state (and compiles forward and backward)
    sync(device)
    first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = utils.rss_peak_mib(reset=True)
    repeats = 1 if args.quick else args.repeats
    secs = interleaved({"step": step}, repeats, args.warmup, device)["step"]
    if args.profile:
        profile(step, f"train_step at batch {p.batch_size}", device, rows=25)
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else utils.rss_peak_mib() / 2**10)
    # model FLOPs per image: student forward + backward (3x) on all crops, teacher forward on the
    # globals (activation checkpointing's extra forward is not counted: the same work done twice)
    vit = student.backbone
    G, L = p.global_size, p.local_size
    n_local = len(batch["local"]) // p.batch_size
    glob, loc = model.vit_flops(vit, G, G), model.vit_flops(vit, L, L)
    flops = 3 * (2 * glob + n_local * loc) + 2 * glob
    return dict(bench="pretrain", preset=p.preset, model=p.model, batch=p.batch_size,
                grad_checkpoint=p.grad_checkpoint, compiled=args.compile,
                images_per_s=p.batch_size / secs, ms_per_step=1e3 * secs, first_step_s=first,
                peak_mem_gib=peak, peak_mem_from=("cuda" if device.type == "cuda" else "rss"),
                gflop_per_image=flops / 1e9, flops=flops * p.batch_size, seconds=secs,
                rss_before_mib=base)


def bench_pretrain(args, device):
    """Images/s, ms/step and peak memory of pretrain.train_step (loading is timed by bench_read and
    bench_embed): tiny on CPU; on CUDA dbt-dino at the largest batch of PRETRAIN_BATCHES that fits,
    without and with --grad-checkpoint."""
    import pretrain
    cuda = device.type == "cuda" and not args.quick
    preset = "dbt-dino" if cuda else "tiny"
    base = ["--preset", preset, "--device", device.type]
    base += ["--amp"] if device.type == "cuda" else []
    base += ["--batch-size", "4", "--prototypes", "256"] if args.quick else []
    plans = [(False, (None,))]  # (with --grad-checkpoint, batches to try): the preset's on CPU
    if cuda:
        plans = [(ckpt, PRETRAIN_BATCHES[ckpt]) for ckpt in (False, True)]
    n = max(b or 8 for _, bs in plans for b in bs)
    workers = max(1, min(14, (os.cpu_count() or 2) - 2)) if cuda else 0
    samples = pretrain_samples(pretrain.get_args(base), n, workers)
    rows = []
    for ckpt, batches in plans:
        for b in batches:
            argv = base + (["--batch-size", str(b)] if b else [])
            argv += ["--grad-checkpoint"] if ckpt else []
            p = pretrain.get_args(argv + (["--compile"] if args.compile else []))
            try:
                rows.append(pretrain_row(args, device, p, samples[:p.batch_size]))
                break  # the largest batch that fits
            except torch.OutOfMemoryError:
                rows.append(dict(bench="pretrain", preset=preset, model=p.model, batch=b,
                                 grad_checkpoint=ckpt, compiled=args.compile, note="out of memory"))
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return add_rates(rows, "flops", "seconds", args.peak)


def bench_losses(args, device):
    """Ms of train_step's loss part alone (teacher_targets with centering, dino_ibot_terms, backward),
    eager and compiled: the passes over (rows, K) logits, 36 of 347 ms per dbt-dino step on an H100.
    K = 65,536; batch 32 in bf16 on CUDA (as --amp), masked patches on half the 2B global crops, 30%
    of their 1,369 (the mean iBOT ratio); batch 8 on a CPU. Loss values must agree (loss_diff)."""
    import pretrain
    K, B, M = ((4096, 2, 100) if args.quick else (65536, 32, 13140) if device.type == "cuda"
               else (65536, 8, 1000))  # prototypes, images, masked patches
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the head's under --amp
    g = torch.Generator(device).manual_seed(0)
    randn = dict(device=device, dtype=dtype, generator=g)
    s_glob, s_loc, s_patch = (torch.randn(n, K, **randn).requires_grad_()  # (n, K) each
                              for n in (2 * B, 8 * B, M))  # student logits: global, local, patches
    t_glob, t_patch = (torch.randn(n, K, **randn) for n in (2 * B, M))
    weight = torch.full((M,), 2 * B / M, device=device)  # per masked patch: 1 / its image's count

    def step(fused):  # what train_step runs between the two forwards and the backward, centering
        centers = {k: torch.zeros(1, K, device=device) for k in ("dino", "ibot")}
        probs, t_p = pretrain.teacher_targets([t_glob], t_patch, centers, 0.07, "centering", fused)
        terms = pretrain.dino_ibot_terms(s_glob, s_loc, s_patch, probs[0], t_p, weight, 1.0, fused)
        loss = sum(terms.values())
        loss.backward()
        return loss.detach()

    fns, compile_s = {"eager": lambda: step(False)}, None
    if args.compile:
        t0 = time.perf_counter()
        step(True)  # the first call compiles
        fns["compiled"], compile_s = (lambda: step(True)), time.perf_counter() - t0
    secs = interleaved(fns, 1 if args.quick else args.repeats, args.warmup, device)
    eager_loss = float(step(False))
    return [dict(bench="losses", impl=name, K=K, rows=10 * B + M, dtype=str(dtype)[6:], ms=1e3 * t,
                 vs_eager=secs["eager"] / t, first_call_s=compile_s if name == "compiled" else None,
                 loss_diff=abs(float(fns[name]()) - eager_loss)) for name, t in secs.items()]


# ------------------------------------------------------------------------ 5. read
# A child process measures one read, so its peak resident memory belongs to that read alone.
READ_CHILD = """
import sys
import time
import dicom
import utils
path, which = sys.argv[1], sys.argv[2]
base = utils.rss_peak_mib(reset=True)  # right after a reset the peak is the current size
t0 = time.perf_counter()
vol, _ = dicom.read_dbt(path, frames=None if which == "all" else [int(which)])
secs = time.perf_counter() - t0
print(secs, utils.rss_peak_mib() - base, vol.nbytes / 2**20)
"""


def read_once(path, which):
    """(seconds, peak MiB, output MiB) of reading slice `which` (or "all") in a fresh process."""
    out = subprocess.run([sys.executable, "-c", READ_CHILD, str(path), which],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        raise RuntimeError(f"reading {path} failed: {out.stderr.strip().splitlines()[-1]}")
    return tuple(map(float, out.stdout.split()))


def bench_read(args, device):
    """Time and peak memory (each in a fresh process) of one slice against a full decode, native
    and JPEG 2000; the sample path (bench_sample_path) native with and without the crop pyramid,
    and JPEG 2000, and both at --mip-margin 1; CLAHE on one full-size slice; mammodino's sample
    path without and with CLAHE, native; the embedding loader's slices/s per worker."""
    rows, repeats = [], 1 if args.quick else args.repeats
    for enc in ("native", "j2k"):
        shape = (8, 512, 384) if args.quick else FULL_SIZE
        path = phantoms.cached_volume(args.cache, shape, enc)
        one = [read_once(path, str(shape[0] // 2)) for _ in range(repeats)]
        full = [read_once(path, "all") for _ in range(repeats)]
        t1, m1 = statistics.median(r[0] for r in one), statistics.median(r[1] for r in one)
        tf, mf = statistics.median(r[0] for r in full), statistics.median(r[1] for r in full)
        rows.append(dict(bench="read", encoding=enc, shape=list(shape), one_slice_s=t1, full_s=tf,
                         time_ratio=t1 / tf, one_slice_peak_mib=m1, full_peak_mib=mf,
                         mem_ratio=m1 / mf))
    native = path.replace("phantom_j2k_", "phantom_native_")  # both written in the loop above
    rows += [bench_sample_path(args, native, pyramid) for pyramid in (True, False)]
    rows += [bench_sample_path(args, path), bench_clahe(args, native)]  # path: j2k
    # issue 23's sketch, each crop from the smallest level at least its size: faster, less exact
    rows += [bench_sample_path(args, p, margin=1.0) for p in (native, path)]
    rows += [bench_sample_path(args, native, name="mammodino", clahe=clahe)
             for clahe in (False, True)]  # what MammoDINO's CLAHE costs the sample path
    return rows + bench_embed_loader(args, native)


def bench_embed_loader(args, path):
    """Slices/s that one loader worker hands the embedding loop (probe.py embed): a DataLoader with
    one worker over data.VolumeReader, timed from its first volume to its last, the consumer's time
    left out (and, with_consumer_copy, counted: one copy of each volume, as to a GPU). mapped: an
    uncompressed volume handed over as its file's mapped bytes; decoded: frame by frame into
    shared memory."""
    volumes, rows = 2 if args.quick else 6, []
    for mapped in (True, False):
        reader = data.VolumeReader([path] * volumes, mapped=mapped)
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=1,
                                             prefetch_factor=1)
        slices, t0, copied, buffer = 0, None, 0.0, None
        for _, item in loader:
            if t0 is None:  # the worker's start-up and first volume are left out
                t0, buffer = time.perf_counter(), torch.empty_like(item["stored"])
                continue
            slices += len(item["stored"])
            t1 = time.perf_counter()
            buffer.copy_(item["stored"])  # the consumer's one read (what a copy to a GPU does)
            copied += time.perf_counter() - t1
        seconds = time.perf_counter() - t0
        rows.append(dict(bench="embed_loader", impl="mapped" if mapped else "decoded", workers=1,
                         volumes=volumes - 1, slices_per_s_per_core=slices / (seconds - copied),
                         with_consumer_copy=slices / seconds))
    return rows


def bench_clahe(args, path):
    """Ms of CLAHE on one full-size slice on one thread (MammoDINO's per-image cost): clahe of the
    displayed slice, and what the stream does instead (data.read_clahe: decode, then CLAHE with
    bins looked up from the stored integers, no displayed slice)."""
    image = dicom.read_dbt(path, frames=[1])[0][0]  # (H, W)
    meta, scratch = dicom.index_volume(path), {}
    fns = {"clahe": lambda: preprocess.clahe(image),
           "read+clahe": lambda: data.read_clahe(meta, 1, scratch)}
    with utils.one_thread():
        secs = interleaved(fns, 1 if args.quick else args.repeats, args.warmup,
                           torch.device("cpu"))
    return dict(bench="clahe", shape=list(image.shape), ms=1e3 * secs["clahe"],
                read_and_clahe_ms=1e3 * secs["read+clahe"])


def bench_sample_path(args, path, pyramid=True, name="dbt-dino", clahe=False,
                      margin=data.MultiCrop.MIP_MARGIN):
    """Samples/s per core (one thread, as a loader worker has: tells how many workers one GPU
    needs): read -> VOI (-> CLAHE) -> crops (pyramid at `margin`, or direct) -> augmentation ->
    collate."""
    import pretrain
    preset = pretrain.PRESETS["tiny" if args.quick else name]
    recipe = dict(data.RECIPES[name], global_size=preset["global_size"],
                  local_size=preset["local_size"], pyramid=pyramid, clahe=clahe, mip_margin=margin)
    manifest = os.path.join(args.cache, "one-volume.csv")  # a --data manifest naming this volume
    Path(manifest).write_text(f"path\n{os.path.abspath(path)}\n")
    stream = data.PretrainStream(manifest, cache_dir=os.path.join(args.cache, "index"), **recipe)
    batch, it, times = 4, iter(stream), []
    with utils.one_thread():
        samples = [next(it) for _ in range(batch)]  # warm-up: indexes the volume, its tissue mask
        for _ in range(2 if args.quick else 16):  # median over batches: crop sizes vary
            t0 = time.perf_counter()
            data.collate_pretrain([next(it) for _ in range(batch)])
            times.append(time.perf_counter() - t0)
    return dict(bench="sample_path", impl="pyramid" if pyramid else "direct", recipe=name,
                mip_margin=margin if pyramid else None, clahe=clahe,
                encoding=dicom.read_header(path).file_meta.TransferSyntaxUID.name,
                global_size=recipe["global_size"], n_local=len(samples[0]["local_crops"]),
                samples_per_s_per_core=batch / statistics.median(times))


# ------------------------------------------------------------------------ 6. detect
def bench_detect(args, device):
    """Slices/s of detect.py's volume inference (time_inference) in chunks of --chunk slices, the
    median of --repeats runs after --warmup."""
    arch, size, channels = ("tiny", 112, 32) if args.quick else ("vitb14", args.size, 256)
    chunk = args.chunk or (64 if device.type == "cuda" else 4)
    n = chunk * (2 if args.quick else (16 if device.type == "cuda" else 2))
    for _ in range(args.warmup):
        time_inference(device, size, chunk, arch, channels, chunk)
    runs = sorted((time_inference(device, size, n, arch, channels, chunk)
                   for _ in range(args.repeats)), key=lambda r: r["slices_per_s"])
    r = runs[len(runs) // 2]
    return [dict(bench="detect", arch=arch, precision=r["dtype"], size=size, chunk=chunk,
                 slices=r["slices"], slices_per_s=r["slices_per_s"], seconds=r["seconds"])]


@torch.no_grad()
def time_inference(device, image_size=518, n_slices=64, name="vitb14", channels=256, chunk=16):
    """Volume inference throughput on random slices: backbone + neck + head + score threshold (bf16
    autocast on CUDA). NMS is left out on purpose: an untrained head scores every anchor near its
    0.05 prior, so NMS would sort ~10^4 boxes per slice, a cost a trained detector (a few boxes
    above threshold) never pays."""
    device = torch.device(device)
    det = retinanet.Detector(model.build(name), channels, 0.0).to(device).eval()
    anchors = retinanet.make_anchors(image_size, retinanet.grid_sizes(image_size)).to(device)
    x = torch.rand(chunk, 3, image_size, image_size, device=device)  # (chunk, 3, H, W)
    with utils.autocast(device):
        det(x[:2])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(math.ceil(n_slices / chunk)):
        with utils.autocast(device):
            logits, deltas = det(x)
        # score threshold 0.5: no untrained box passes
        retinanet.postprocess(logits.float(), deltas.float(), anchors, image_size, 0.5, 0.2)
    sync(device)
    seconds = time.perf_counter() - t0
    n = math.ceil(n_slices / chunk) * chunk
    return dict(model=name, image_size=image_size, slices=n, seconds=seconds,
                slices_per_s=n / seconds, dtype="bf16" if device.type == "cuda" else "fp32")


# ------------------------------------------------------------------------ 7. stream (not in `all`)
def start_orthanc(root, user, password):
    """A throwaway Orthanc with its DICOMweb plugin and authentication on a free loopback port:
    (process, http://127.0.0.1:PORT). Loopback only: RemoteAccessAllowed is off."""
    plugin = next((p for d in ("/usr/share/orthanc/plugins", "/usr/lib/orthanc") if os.path.isdir(d)
                   for p in sorted(Path(d).glob("libOrthancDicomWeb.so*"))), None)
    if shutil.which("Orthanc") is None or plugin is None:
        raise ValueError("bench.py stream needs Orthanc and its DICOMweb plugin: apt-get install "
                         "orthanc orthanc-dicomweb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = dict(Name="bench", StorageDirectory=str(root / "db"), IndexDirectory=str(root / "db"),
                  HttpPort=port, DicomServerEnabled=False, RemoteAccessAllowed=False,
                  AuthenticationEnabled=True, RegisteredUsers={user: password},
                  Plugins=[str(plugin)], HttpCompressionEnabled=False,
                  DicomWeb={"Enable": True, "Root": "/dicom-web/"})
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(150):  # up to 15 s
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise ValueError(f"Orthanc did not start on port {port}")


def upload_phantoms(root, url, auth, shape, n):
    """n native phantom volumes, stored through Orthanc's REST API -> their manifest rows."""
    rows = []
    for i in range(n):
        path = phantoms.write_phantom_dicom(root / f"{i}.dcm", shape, "native", seed=i)
        conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
        conn.request("POST", "/instances", body=path.read_bytes(), headers={"Authorization": auth})
        if conn.getresponse().status != 200:
            raise ValueError(f"Orthanc refused the upload of {path}")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows.append({c: str(ds[c].value) for c in pacs.UID_COLUMNS})
    return rows


def bench_stream(args, device):
    """A cold fetch of every instance through pacs.py (MB/s, slices/s), then the pretraining stream
    through a rotating cache a quarter of the data (each volume fetched again on every pass, as for
    an archive far larger than its cache): samples/s, cache hit rate, MB fetched per sample."""
    shape = (8, 256, 192) if args.quick else (24, 1024, 832)  # 0.8 / 41 MB a volume
    n, spv = 16, 4  # volumes, samples per volume
    user, password = "bench", "bench-" + os.urandom(6).hex()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        proc, url = start_orthanc(root, user, password)
        try:
            auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            rows = upload_phantoms(root, url, auth, shape, n)
            manifest, source = root / "manifest.csv", "dicomweb+" + url + "/dicom-web"
            manifest.write_text(utils.csv_text(rows))
            creds = pacs.load_credentials(environ=dict(DICOMWEB_USER=user, DICOMWEB_PASSWORD=password))
            total = n * (root / "0.dcm").stat().st_size
            client = pacs.Client(source, rows, pacs.Cache(root / "cold", 2 * total, 0), creds)
            t0 = time.perf_counter()
            for _, _, pin in client.prefetch(rows, ahead=2):  # 2 requests in flight
                client.cache.unpin(pin)
            cold_s = time.perf_counter() - t0
            out = [dict(bench="stream", what="cold-fetch", volumes=n, shape=list(shape),
                        mb_per_s=total / cold_s / 1e6, slices_per_s=n * shape[0] / cold_s)]
            env = dict(DBT_DINO_CACHE=str(root / "rotating"), DICOMWEB_USER=user,
                       DICOMWEB_PASSWORD=password)
            with unittest.mock.patch.dict(os.environ, env):  # put back as it was on the way out
                remote = dict(manifest=manifest, cache_bytes=max(total // 4, 2**20), floor_bytes=0)
                stream = data.PretrainStream(source, global_size=112, local_size=56,
                                             slices_per_volume=spv, dicomweb=remote)
                draws = 2 * n * spv  # two passes over the manifest
                t0 = time.perf_counter()
                for _ in itertools.islice(stream, draws):
                    pass
                stream_s = time.perf_counter() - t0
                report = stream.cache_report()
            out.append(dict(bench="stream", what="stream-cache-1/4-data", volumes=n,
                            shape=list(shape), samples_per_volume=spv,
                            samples_per_s=draws / stream_s, cache_hit=report["cache_hit"],
                            mb_per_sample=report["bytes_per_sample"] / 1e6,
                            mb_per_s=report["fetched_gb"] * 1e3 / stream_s))
            return out
        finally:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------ goals, main
GOALS = {  # issue 14's goals for one H100, checked at the end of `bench.py all` on CUDA
    "embedding: ViT-B/14 at 518, slices/s": 1500,
    "pretraining: dbt-dino, images/s": 100,
    "pretraining: dbt-dino with --grad-checkpoint, images/s": 100,
    "ours/timm at equal precision, ViT-B/14": 1.2,
}


def goals(rows):
    """GOALS against this run's rows: the best figure of each, which row gave it, and whether it is
    met (None when the run has no such row, e.g. a batch that did not fit or timm not installed)."""
    def best(kind, key, **match):
        found = [r for r in rows if r["bench"] == kind and r.get(key) is not None
                 and all(r.get(k) == v for k, v in match.items())
                 and r.get("impl", "ours").startswith("ours")]
        top = max(found, key=lambda r: r[key], default=None)
        by = top and " ".join(f"{k} {top[k]}" if k == "batch" else str(top[k])
                              for k in ("impl", "precision", "batch") if top.get(k) is not None)
        return (top[key], by) if top else (None, None)

    measured = [best("backbone", "slices_per_s", arch="vitb14", size=518),
                best("pretrain", "images_per_s", preset="dbt-dino", grad_checkpoint=False),
                best("pretrain", "images_per_s", preset="dbt-dino", grad_checkpoint=True),
                best("backbone", "vs_timm", arch="vitb14", size=518)]
    return [dict(bench="goals", goal=goal, target=target, measured=value, by=by,
                 met=None if value is None else value >= target)
            for (goal, target), (value, by) in zip(GOALS.items(), measured)]


BENCHES = {"backbone": bench_backbone, "precision": bench_precision, "embed": bench_embed,
           "pretrain": bench_pretrain, "losses": bench_losses, "read": bench_read,
           "detect": bench_detect, "stream": bench_stream}  # `bench.py all` runs them in this order


def main(args):
    """Run the benchmarks `args.what` names, print a table per kind, and write bench.json."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    args.peak = matmul_peak_tflops(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}"
    env = dict(device=where, torch=torch.__version__, threads=torch.get_num_threads(),
               quick=args.quick, compile=args.compile, matmul_peak_tflops=args.peak)
    print(" ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in env.items()),
          flush=True)
    rows = []
    for name, fn in BENCHES.items():
        if args.what == name or (args.what == "all" and name != "stream"):
            t0 = time.perf_counter()
            new = fn(args, device)
            rows += new
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
            for kind in dict.fromkeys(r["bench"] for r in new):  # now: a long run keeps these
                print("\n" + table([r for r in new if r["bench"] == kind]) + "\n", flush=True)
    if args.what == "all" and device.type == "cuda" and not args.quick:  # the goals: H100 figures
        rows += goals(rows)
        print("\n" + table([r for r in rows if r["bench"] == "goals"]), flush=True)
    utils.atomic_write(args.out, json.dumps(dict(env, rows=rows), indent=1))
    print(f"wrote {args.out}", flush=True)
    return rows


if __name__ == "__main__":
    try:
        main(get_args())
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
