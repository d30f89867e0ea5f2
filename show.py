"""Attention and PCA maps of a backbone on one DBT slice, after DINO's visualize_attention.py.

    python show.py --image view.dcm --backbone runs/demo/backbone.pth     # attention.png
    python show.py --image /dicom/folder --backbone runs/demo/backbone.pth  # + attention in tissue

`python show.py --image X.dcm [--backbone F] [--slice S]` stretches one slice (the central one by
default) to the backbone's square input, as the probes do, and writes attention.png, three panels:
the slice the model sees; per head, the last block's attention from the CLS token to each patch,
scaled to its maximum, as DINO draws it (registers left out: they are no place in the image); the
first three principal components of the normed patch features as R, G, B, as DINOv2 draws it. The
block calls fused SDPA, which never forms the attention matrix, so last_block_attention recomputes
softmax(q k^T / sqrt(hd)) from its q and k.

Attention inside tissue, a number for MammoDINO's qualitative claim that its features "concentrate
on clinically meaningful tissue regions": per image, the share of the last block's CLS-to-patch
attention that falls on breast tissue (tissue_share: each patch weighted by its tissue fraction,
preprocess.tissue_mask; averaged over heads). --image may be a folder (or a CSV manifest): the
share of every volume's chosen slice goes to tissue_attention.csv, their mean with a bootstrap 95%
CI to tissue_attention.json and the screen, beside the share attention spread evenly would get (the
tissue fraction); attention.png shows the first.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL import ImageDraw

import dicom
import metrics
import model
import preprocess
import utils


def last_block_attention(vit, x):
    """The last block's attention from the q, k, v its SDPA uses: x (B, 3, H, W) -> dict of attn
    (B, nh, T, T), T = 1 + R + N (CLS, registers, patches); q, k, v (B, nh, T, hd); block_input."""
    tokens = vit.prepare_tokens_with_masks(x)  # (B, T, D)
    for blk in vit.blocks[:-1]:
        tokens = blk(tokens)
    blk = vit.blocks[-1]
    h = blk.norm1(tokens)
    B, T, D = h.shape
    nh = blk.attn.num_heads
    q, k, v = blk.attn.qkv(h).reshape(B, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4).unbind(0)
    attn = torch.softmax(q @ k.transpose(-2, -1) * (D // nh) ** -0.5, dim=-1)  # (B, nh, T, T)
    return {"attn": attn, "q": q, "k": k, "v": v, "block_input": h}


def tissue_share(cls_attention, tissue):
    """The share of CLS attention on tissue: cls_attention (nh, N) the CLS token's attention to the
    N patches (registers left out), tissue (N,) each patch's tissue fraction in [0, 1] -> the mean
    over heads of sum(a * f) / sum(a) (renormalised over the patches: CLS and registers take
    some)."""
    a = cls_attention.double()
    return float(((a * tissue.double()).sum(-1) / a.sum(-1)).mean())


def attention_in_tissue(vit, x, image):
    """tissue_share of one input x (1, 3, S, S) whose displayed slice before resizing is `image`
    (H, W): the tissue mask of the slice, resized with it and pooled to the patch grid. -> (share,
    the tissue fraction of the input: the share attention spread evenly would get)."""
    grid = x.shape[-1] // vit.patch_size
    mask = torch.from_numpy(preprocess.tissue_mask(image).astype(np.float32))[None, None]
    mask = F.interpolate(mask, x.shape[-2:], mode="nearest")  # (1, 1, S, S), as the slice went
    tissue = F.adaptive_avg_pool2d(mask, grid).flatten()  # (N,) fraction per patch
    with torch.inference_mode():
        attn = last_block_attention(vit, x)["attn"][0]  # (nh, T, T)
    return tissue_share(attn[:, 0, 1 + vit.num_register_tokens:], tissue), float(tissue.mean())


def _heat(grey, a):
    """A grey image (P, P) in [0, 1] blended with a red-yellow heat map of a (P, P) -> uint8 RGB."""
    colour = np.stack([np.ones_like(a), a, np.zeros_like(a)], -1)  # red -> yellow
    rgb = grey[..., None] * (1 - 0.6 * a[..., None]) + colour * 0.6 * a[..., None]
    return (255 * rgb.clip(0, 1)).astype(np.uint8)


def _resize(a, p, mode):
    """A (H, W) or (H, W, C) array resized to (p, p) or (p, p, C)."""
    t = torch.as_tensor(a, dtype=torch.float32)
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]  # (1, C, H, W)
    return F.interpolate(t, size=(p, p), mode=mode)[0].permute(1, 2, 0).squeeze(-1).numpy()


def attention_figure(vit, x, title, panel=336):
    """The three panels of the module docstring as one Pillow image, `title` on top."""
    grid = x.shape[-1] // vit.patch_size
    with torch.inference_mode():
        attn = last_block_attention(vit, x)["attn"][0]  # (nh, T, T)
        patches = vit.forward_features(x)["x_norm_patchtokens"][0].float()  # (N, D)
    cls = attn[:, 0, 1 + vit.num_register_tokens:].reshape(-1, grid, grid)  # (nh, g, g): patches
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
        tile = _heat(_resize(grey, cell, "bilinear"), _resize(a, cell, "bilinear"))
        heads[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = tile
    img = Image.new("RGB", (3 * panel + 40, panel + 50), "white")
    img.paste(Image.fromarray((255 * grey.clip(0, 1)).astype(np.uint8)).convert("RGB"), (10, 40))
    img.paste(Image.fromarray(heads), (panel + 20, 40))
    pca = (255 * _resize(pcs, panel, "nearest")).astype(np.uint8)
    img.paste(Image.fromarray(pca), (2 * panel + 30, 40))
    d = ImageDraw.Draw(img)
    d.text((10, 5), title, fill="black")
    for i, text in enumerate(("slice (model input)", f"last-block CLS attention, {len(cls)} heads",
                              "patch features, PCA 1-3 as RGB")):
        d.text((10 + i * (panel + 10), 24), text, fill="black")
    return img


def model_input(path, slice_, size, clahe=False):
    """One slice (-1: the central one) as the probes stretch it (with clahe, through
    preprocess.clahe first, as the mammodino recipe trains) -> (x (1, 3, size, size), the displayed
    slice (H, W), its index, the volume's slice count)."""
    n = dicom.index_volume(path)["n_frames"]
    s = n // 2 if slice_ < 0 else slice_
    if s >= n:
        raise ValueError(f"--slice {s}: {path} has {n} slices")
    img, _ = dicom.read_dbt(path, frames=[s])  # (1, H, W)
    seen = preprocess.clahe(img[0])[None] if clahe else img  # (1, H, W) what the backbone sees
    x = F.interpolate(torch.from_numpy(seen)[None], (size, size), mode="bilinear", antialias=True)
    return x.clamp(0, 1).expand(-1, 3, -1, -1), img[0], s, n  # (1, 3, size, size)


def run_show(args):
    net, desc = model.load_backbone(args.backbone, args.arch, args.weights)
    print(f"*** backbone: {desc} ***", flush=True)
    if not isinstance(net, model.ViT):
        raise ValueError("show needs a ViT backbone (DenseNet-121 has no attention)")
    net, size = net.float().eval(), args.size or net.config["img_size"]
    clahe = utils.preprocessing(args.backbone, args.preprocess) == "clahe"
    paths = [args.image] if Path(args.image).is_file() and not args.image.endswith(".csv") \
        else dicom.scan(args.image)
    x, img, s, n = model_input(paths[0], args.slice, size, clahe)  # a bad file: before --out
    utils.check_run_folder(args.out, "attention.png", args.overwrite,
                           outputs=("tissue_attention.csv", "tissue_attention.json"))
    os.makedirs(args.out, exist_ok=True)
    title = f"{Path(paths[0]).name}, slice {s}/{n}: {desc}"
    utils.save_png(attention_figure(net, x, title), Path(args.out) / "attention.png")
    rows, skipped = [], 0
    for path in paths:
        try:
            x, img, s, n = model_input(path, args.slice, size, clahe)
        except (ValueError, OSError) as e:  # a folder's unreadable file: said and counted
            utils.log(f"skipped {path}: {e}")
            skipped += 1
            continue
        share, fraction = attention_in_tissue(net, x, img)
        rows.append(dict(image=path, slice=s, share=share, tissue_fraction=fraction))
    shares = np.array([r["share"] for r in rows])
    even = float(np.mean([r["tissue_fraction"] for r in rows]))  # attention spread evenly
    mean, low, high = metrics.bootstrap_ci(np.mean, shares, n_boot=1000, seed=0) \
        if len(rows) > 1 else (float(shares.mean()), math.nan, math.nan)
    summary = dict(backbone=desc, images=len(rows), skipped=skipped, mean=mean, ci=[low, high],
                   even_attention=even)
    utils.atomic_write(Path(args.out) / "tissue_attention.csv", utils.csv_text(rows))
    utils.atomic_write(Path(args.out) / "tissue_attention.json",
                       json.dumps(utils.finite(summary), indent=1) + "\n")
    utils.log(f"attention inside tissue: {mean:.3f} (95% CI {low:.3f}-{high:.3f}) over "
              f"{len(rows)} images, {skipped} skipped; attention spread evenly: {even:.3f}")
    utils.log(utils.folder_line(args.out))


def get_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=fmt)
    p = utils.one_line_errors(parser)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="", help="a model.load_pretrained file, random (an "
                   "untrained ViT of --arch), or '' for the newest runs/*/backbone.pth")
    g.add_argument("--arch", default="auto", help="model.build name of --backbone (auto: by width)")
    g.add_argument("--size", type=utils.number(int, 0), default=0, help="input side, a multiple of "
                   "14; 0 = the backbone's own (tiny 112, hub ViT 518)")
    utils.add_preprocess_flag(g)
    g = p.add_argument_group("data")
    g.add_argument("--image", required=True, help="a DICOM volume or 2-D image; or a folder or "
                   ".csv manifest of them (attention.png of the first, attention in tissue of all)")
    g.add_argument("--slice", type=utils.number(int, -1), default=-1,
                   help="slice index (-1 = central)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default="", help="run folder ('' = runs/show-<date-time>)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    args = p.parse_args(argv)
    if args.size % 14:
        p.error(f"argument --size: {args.size} is not a multiple of the ViT patch size 14")
    args.weights = ""  # model.load_backbone's DenseNet weights: show draws ViT attention only
    args.out = args.out or f"runs/show-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


if __name__ == "__main__":
    try:
        run_show(get_args())
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
