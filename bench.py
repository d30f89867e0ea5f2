"""Benchmarks for the three costs that decide whether the papers' workloads are affordable.

    python bench.py all                  # every figure below, one table, bench.json (2-core CPU: < 10 min)
    python bench.py all --quick          # small sizes, well under a minute (the test suite runs this)
    python bench.py backbone --device cuda --chunk 75

1. backbone  - embedding throughput (probe.py's step): slices/s of ViT-S/14 and ViT-B/14 at 518x518 for
               our model.py and, side by side in the same process, the reference implementations when
               installed (PyPI `dinov2`, timm); fp32 on CPU, bf16 autocast on CUDA; TFLOP/s from an
               analytic FLOP count and its fraction of the device's dense bf16 peak.
2. pretrain  - images/s, ms/step and peak memory of one DINOv2 + iBOT + KoLeo training step (tiny on CPU,
               the dbt-dino recipe on CUDA) with model FLOPs utilisation.
3. read      - one-slice read vs full decode of a 60 x 2457 x 1996 uint16 DBT volume (native and JPEG 2000):
               time and peak memory (measured in a fresh subprocess); slices/s per core of the full
               pretraining sample path (read -> window -> crops -> masks).

Every figure is a median over --repeats runs after --warmup runs; every comparison is a ratio taken in
this process, with the implementations interleaved run by run (alternating order) so drift hits all equally.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import model

# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts); used only for the "fraction of peak" column.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "backbone", "pretrain", "read"],
                   help="which benchmark to run")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--chunk", type=int, default=0,
                   help="slices per forward; 0 = DBT-DINO's extraction chunk (75) on CUDA, 2 on CPU")
    p.add_argument("--size", type=int, default=518, help="input side for the backbone benchmark")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    p.add_argument("--cache", default="cache/bench", help="where the synthetic DICOM volumes are written once")
    p.add_argument("--out", default="bench.json", help="where the results are written")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns, repeats, warmup, device):
    """Median seconds per call of each function, run round-robin (order reversed every other round) so that
    load changes and warm caches favour none of them."""
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


def vit_flops(vit, H, W):
    """Forward FLOPs (2 per multiply-add) of one image: matmuls and attention, norms/softmax ignored."""
    D, p, L = vit.embed_dim, vit.patch_size, vit.n_blocks
    n = (H // p) * (W // p)
    N = 1 + vit.num_register_tokens + n
    mlp = vit.blocks[0].mlp
    ffn = sum(m.in_features * m.out_features for m in mlp.children() if isinstance(m, torch.nn.Linear))
    per_block = 2 * N * (3 * D * D + D * D + ffn) + 4 * N * N * D  # qkv, proj, FFN; QK^T and AV
    return 2 * n * 3 * p * p * D + L * per_block


def peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def reference_models(arch, ours, size):
    """The reference implementations with our random weights copied in (None where not installed)."""
    refs = {}
    try:
        from dinov2.models import vision_transformer as vt
        ref = getattr(vt, {"vits14": "vit_small", "vitb14": "vit_base"}[arch])(
            patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
        ref.load_state_dict(ours.state_dict(), strict=True)
        refs["dinov2"] = ref
    except ImportError:
        refs["dinov2"] = None
    try:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn
        ref = timm.create_model({"vits14": "vit_small_patch14_dinov2", "vitb14": "vit_base_patch14_dinov2"}[arch],
                                pretrained=False, num_classes=0, img_size=size)  # timm fixes the input size
        ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=True)
        refs["timm"] = ref
    except ImportError:
        refs["timm"] = None
    return refs


def bench_backbone(args, device):
    rows = []
    chunk = args.chunk or (75 if device.type == "cuda" else 2)
    size = 112 if args.quick else args.size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for arch in (["vits14"] if args.quick else ["vits14", "vitb14"]):
        ours = model.build(arch).eval().to(device)
        x = torch.rand(chunk, 3, size, size, device=device)  # (chunk, 3, H, W)
        fns, outs = {}, {}
        impls = {"ours": ours, **reference_models(arch, ours, size)}
        if args.compile:
            impls["ours+compile"] = torch.compile(ours)
        for name, m in impls.items():
            if m is None:
                rows.append(dict(bench="backbone", arch=arch, impl=name, note="not installed: skipped"))
                continue
            m = m.eval().to(device)

            def run(m=m, name=name):
                with torch.inference_mode(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                    out = m.forward_features(x)
                outs[name] = out["x_norm_clstoken"] if isinstance(out, dict) else out[:, 0]
            fns[name] = run
        secs = interleaved(fns, 1 if args.quick else args.repeats, args.warmup, device)
        flops = vit_flops(ours, size, size) * chunk
        for name, s in secs.items():
            tflops = flops / s / 1e12
            peak = peak_tflops(device)
            rows.append(dict(bench="backbone", arch=arch, impl=name, size=size, chunk=chunk, dtype=str(dtype)[6:],
                             slices_per_s=chunk / s, tflops=tflops, peak_frac=tflops / peak if peak else None,
                             ours_speedup=s / secs["ours"],  # >= 1.0: ours is at least as fast
                             max_abs_diff=(outs[name].float() - outs["ours"].float()).abs().max().item()))
    return rows


# A child process measures one read, so its peak resident memory belongs to that read alone.
READ_CHILD = """
import sys, time
import bench, data
path, which = sys.argv[1], sys.argv[2]
base = bench.rss_peak_mib(reset=True)  # right after a reset the peak is the current size: imports do not count
t0 = time.perf_counter()
vol, _ = data.read_dbt(path, frames=None if which == "all" else [int(which)])
secs = time.perf_counter() - t0
print(secs, bench.rss_peak_mib() - base, vol.nbytes / 2**20)
"""


def read_once(path, which):
    out = subprocess.run([sys.executable, "-c", READ_CHILD, str(path), which], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        raise RuntimeError(f"reading {path} failed: {out.stderr.strip().splitlines()[-1]}")
    secs, peak_mib, out_mib = map(float, out.stdout.split())
    return secs, peak_mib, out_mib


def bench_read(args, device):
    import data
    shape = (8, 512, 384) if args.quick else (60, 2457, 1996)
    os.makedirs(args.cache, exist_ok=True)
    rows, repeats = [], 1 if args.quick else args.repeats
    for enc in ("native", "j2k"):
        path = os.path.join(args.cache, f"phantom_{enc}_{'x'.join(map(str, shape))}.dcm")
        if not os.path.exists(path):  # written once (about 15 s each at full size), then reused
            data.write_phantom_dicom(path + ".tmp", shape=shape, encoding=enc)
            os.replace(path + ".tmp", path)
        one = [read_once(path, str(shape[0] // 2)) for _ in range(repeats)]
        full = [read_once(path, "all") for _ in range(repeats)]
        t1, m1 = statistics.median(r[0] for r in one), statistics.median(r[1] for r in one)
        tf, mf = statistics.median(r[0] for r in full), statistics.median(r[1] for r in full)
        rows.append(dict(bench="read", encoding=enc, shape=list(shape), one_slice_s=t1, full_s=tf, time_ratio=t1 / tf,
                         one_slice_peak_mib=m1, full_peak_mib=mf, mem_ratio=m1 / mf))
    rows.append(bench_sample_path(args, path if args.quick else path.replace("j2k", "native")))
    return rows


def bench_sample_path(args, path):
    """Samples/s on one core through read -> VOI -> crops -> augmentation -> collate with masks."""
    import data
    torch.set_num_threads(1)  # per loader worker: tells how many workers one GPU needs
    import pretrain
    sizes = {k: pretrain.PRESETS["tiny" if args.quick else "dbt-dino"][k] for k in ("global_size", "local_size")}
    recipe = dict(data.RECIPES["dbt-dino"], **sizes)
    manifest = os.path.join(args.cache, "one-volume.csv")  # a --data manifest naming just this volume
    with open(manifest, "w") as f:
        f.write(f"path\n{os.path.abspath(path)}\n")
    stream = data.PretrainStream(manifest, cache_dir=os.path.join(args.cache, "index"), **recipe)
    batch, it = 4, iter(stream)
    samples = [next(it) for _ in range(batch)]  # warm-up: indexes the volume and its tissue mask once
    times = []
    for _ in range(2 if args.quick else 16):  # median over batches: single samples vary with crop sizes
        t0 = time.perf_counter()
        data.collate_pretrain([next(it) for _ in range(batch)])
        times.append(time.perf_counter() - t0)
    secs = statistics.median(times) / batch
    torch.set_num_threads(os.cpu_count() or 1)
    return dict(bench="sample_path", recipe="dbt-dino", global_size=recipe["global_size"],
                samples_per_s_per_core=1 / secs, n_local=len(samples[0]["local_crops"]))


def rss_peak_mib(reset=False):
    """This process's peak resident memory since the last reset (Linux /proc; None elsewhere)."""
    try:
        if reset:
            open("/proc/self/clear_refs", "w").write("5")
        return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) / 1024
    except OSError:
        return None


def bench_pretrain(args, device):
    """Images/s of pretrain.train_step on a fixed collated batch (data loading is timed in bench_read)."""
    import functools
    import data
    import pretrain
    preset = "tiny" if device.type == "cpu" or args.quick else "dbt-dino"
    argv = ["--preset", preset, "--device", device.type] + (["--amp"] if device.type == "cuda" else [])
    if args.quick:
        argv += ["--batch-size", "4", "--prototypes", "256"]
    elif device.type == "cuda":
        argv += ["--batch-size", str(args.chunk or 32)]  # per-GPU images that fit beside 2x518 + 8x196 crops
    p = pretrain.get_args(argv)
    recipe = dict(data.RECIPES[p.recipe], global_size=p.global_size, local_size=p.local_size)
    stream = data.PretrainStream(data.synthetic_archive(), patch_size=14, seed=0, **recipe)
    it = iter(stream)
    batch = data.collate_pretrain([next(it) for _ in range(p.batch_size)], patch_size=14)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    student, teacher = pretrain.build_models(p, device)
    optimizer = torch.optim.AdamW(pretrain.param_groups(student, p.layer_decay))
    centers = {k: torch.zeros(1, p.prototypes, device=device) for k in ("dino", "ibot")}
    sched = {k: float(v[0]) for k, v in pretrain.make_schedules(p, 1).items()}
    step = lambda: pretrain.train_step(student, teacher, batch, centers, optimizer, sched, p)  # noqa: E731
    step()  # first step allocates optimizer state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = rss_peak_mib(reset=True)
    secs = interleaved({"step": step}, 1 if args.quick else args.repeats, args.warmup, device)["step"]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_peak_mib()
    # model FLOPs per image: student forward + backward (3x) on all crops, teacher forward on the globals
    vit, G, L = student.backbone, p.global_size, p.local_size
    n_local = len(batch["local"]) // p.batch_size
    flops = 3 * (2 * vit_flops(vit, G, G) + n_local * vit_flops(vit, L, L)) + 2 * vit_flops(vit, G, G)
    tflops, peak_t = flops * p.batch_size / secs / 1e12, peak_tflops(device)
    return [dict(bench="pretrain", preset=preset, model=p.model, batch=p.batch_size, images_per_s=p.batch_size / secs,
                 ms_per_step=1e3 * secs, peak_mem_mib=peak, peak_mem_from=("cuda" if device.type == "cuda" else "rss"),
                 gflop_per_image=flops / 1e9, tflops=tflops, mfu=tflops / peak_t if peak_t else None,
                 rss_before_mib=base)]


def table(rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v).replace(" ", ""))  # noqa: E731
    cells = [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def main(args):
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    env = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
               torch=torch.__version__, threads=torch.get_num_threads(), quick=args.quick)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    rows = []
    for name, fn in [("backbone", bench_backbone), ("pretrain", bench_pretrain), ("read", bench_read)]:
        if args.what in ("all", name):
            t0 = time.perf_counter()
            rows += fn(args, device)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    for kind in dict.fromkeys(r["bench"] for r in rows):  # one table per benchmark, columns of its own
        print("\n" + table([{k: v for k, v in r.items() if k not in ("bench", "rss_before_mib")}
                            for r in rows if r["bench"] == kind]), flush=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(dict(env, rows=rows), f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return rows


if __name__ == "__main__":
    main(get_args())
