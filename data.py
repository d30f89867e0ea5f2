"""Images into training samples: multi-crop, iBOT masks, the pretraining stream, the loaders.

volume_index caches a volume's headers and tissue mask under $DBT_DINO_CACHE/index (default
./cache/index). MultiCrop is DINOv2's multi-crop augmentation of one slice, with MammoDINO's
tissue-aware crops and adjacent-slice pair as options (RECIPES: its crop scales). PretrainStream
draws one random slice per sample, sharded by volume over ranks and loader workers, keeps DICOMweb
volumes pinned while in use and counts unreadable ones (SkipCounter). collate_pretrain stacks a
batch with its iBOT masks; density_eval_set and VolumeReader serve the probes. Sources (`--data`)
are listed by dicom.scan, and slices arrive in [0, 1] with the chest wall on the image left.
"""
import functools
import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import dicom
import pacs
import preprocess
import utils

INDEX_VERSION = 4  # bump when the cached per-volume index changes meaning
# Crop recipes: MultiCrop(global_size=..., local_size=..., **RECIPES[name]), or the same keywords to
# PretrainStream. Crop sizes live with the model and schedule in pretrain.PRESETS. dbt-dino's scales
# are DBT-DINO §6.1's. MammoDINO publishes no numbers: DINOv2's scales, our tissue fractions and k.
RECIPES = {
    "dinov2": dict(global_scale=(0.32, 1.0), local_scale=(0.05, 0.32)),
    "dbt-dino": dict(global_scale=(0.5, 1.0), local_scale=(0.2, 0.5)),
}
RECIPES["mammodino"] = dict(RECIPES["dinov2"], tissue_aware=True, min_tissue_global=0.5,
                            min_tissue_local=0.3, adjacent_k=2)
# What each recipe does to a displayed slice (VOI window to [0, 1]: the intensity normalisation)
# before any crop. MammoDINO standardises inputs with CLAHE; pretrain.py records it beside the
# backbone, and probe.py applies the same to the backbone's inputs.
PREPROCESS = {"dinov2": "none", "dbt-dino": "none", "mammodino": "clahe"}


# ------------------------------------------------------------------------ per-volume index
def volume_index(path, cache_dir):
    """(meta, mask): dicom.parse_headers and the tissue mask of the (canonically flipped) central
    slice, subsampled by meta["mask_stride"]; cached on disk (an atomically written npz)."""
    st = os.stat(path)
    stamp = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{INDEX_VERSION}"
    key = hashlib.sha1(stamp.encode()).hexdigest()
    file = Path(cache_dir) / key[:2] / f"{key}.npz"
    if file.exists():
        with np.load(file) as z:
            return json.loads(str(z["meta"])), z["mask"]
    meta = dicom.parse_headers(path)
    mid = dicom.orient(meta)  # (H, W) central slice: the outline barely changes with depth
    mid = mid[:, ::-1] if meta["flip"] else mid
    meta["mask_stride"] = max(1, math.ceil(max(mid.shape) / 256))  # <= 256 px: enough for crops
    mask = preprocess.tissue_mask(mid[::meta["mask_stride"], ::meta["mask_stride"]])
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = utils.tmp_name(file)
    with open(tmp, "wb") as fh:
        np.savez(fh, meta=json.dumps(meta), mask=mask)
    os.replace(tmp, file)
    return meta, mask


def read_slice(meta, s, scratch=None):
    """Slice s of an indexed volume as displayed, canonical orientation: (H, W) float tensor.
    dicom.read_slices' arithmetic, but apply_voi's float copy of the mirrored view is the only copy:
    read_slices' array and the mirrored copy cost 3 ms a full-size slice. scratch: a dict the
    caller keeps, whose arrays the decode and the VOI reuse (fresh 10 and 20 MB arrays cost ~4 ms
    of page faults a full-size slice); the slice is then valid until its next use."""
    stored, _ = dicom.decode_slice(meta, s, out=_scratch(scratch, "stored", meta))  # (H, W)
    stored = stored[:, ::-1] if meta["flip"] else stored  # a view; the copy below mirrors it
    x = dicom.display_slice(meta, stored, s, out=_scratch(scratch, "shown", meta))
    return torch.from_numpy(x)  # (H, W), C order


def _scratch(scratch, role, meta):
    """A reusable (H, W) array from `scratch` (None: none): "stored" (uncompressed frames only, as
    decode_slice reads them) or "shown" (float32)."""
    if scratch is None or (role == "stored" and not meta.get("native")):
        return None
    dtype = np.float32 if role == "shown" else dicom.stored_dtype(meta)
    shape = (meta["rows"], meta["cols"])
    if role not in scratch or scratch[role].shape != shape or scratch[role].dtype != dtype:
        scratch[role] = np.empty(shape, dtype)
    return scratch[role]


# ------------------------------------------------------------------------ multi-crop augmentation
class MultiCrop:
    """DINOv2's multi-crop augmentation of one grey slice, after DINO's DataAugmentationDINO.

    multicrop(image, mask, stride, rng, s, n_slices, read): image is slice s (H, W) in [0, 1] of a
    volume of n_slices (a tensor, or a Pyramid that reads it at the resolution the crops ask for;
    read(s') may return either), mask its tissue mask subsampled by `stride`, rng a numpy
    Generator. Returns
    global_crops (2, 3, G, G), local_crops (n_local, 3, L, L), global_tissue (2, G/p, G/p) (tissue
    fraction per patch), slice_index [s, s'] and, for adjacent_k > 0, adjacent (2, 3, G, G): the
    pair, global crop 1's box and flip cut from slice s and from s' = read(s'), each with the mild
    PAIR_PHOTO (no blur or solarize, jitter 0.8-1.2): MammoDINO's "conservative" transforms.

    Geometry: torchvision's RandomResizedCrop (area fraction uniform in scale, aspect log-uniform in
    [3/4, 4/3], 10 tries, then its centred fallback), bicubic antialiased resize, flip with p 0.5.
    pyramid (mip-mapping): a crop is resampled from the smallest of the slice's 2x2-mean copies
    (Pyramid: made once per slice as crops need them) whose box side is >= mip_margin x its output
    side, with torch's resize weights summed over each block (_taps): the direct resize of the
    slice with each block replaced by its mean, in two embedding_bag passes (_resample: 3x torch's
    resize even from the slice itself, to 2e-5). Boxes, flips, draws: unchanged. Pixels against
    the direct resize on full-size phantom slices (5-pixel steps, sharpened further by CLAHE),
    before the photometry: margin 2.5 (the default until 2026-12-03) kept dbt-dino's crops
    within 0.025 but mammodino's (CLAHE on) only within 0.04-0.06, beyond issue 23's 0.03; 4
    within 0.040 (a box edge splitting a 2x2 block), 5 within 0.020, the default 6 within 0.011:
    at 6 the papers' global crops (224-518 px of a ~2000 px slice) all come from the slice itself
    and only mammodino's largest locals from level 1, so the pyramid pays mainly for smaller
    crops and lower margins (tests/test_loader.py measures the bound). Margin 1 (each
    crop from the smallest level at least its size, issue 23's sketch, with JPEG 2000 decoded at
    that level) is faster and mean 5e-4, max 0.08 off (0.13 from JPEG 2000). pyramid=False: the
    direct resize.
    Photometry, DINOv2's as released (dinov2/data/augmentations.py): colour jitter with p 0.8
    (brightness, contrast factors uniform in [0.6, 1.4], random order), Gaussian blur (9 taps, sigma
    in [0.1, 2]), solarize. Its GaussianBlur(p) blurs with probability 1 - p: global crop 1 is never
    blurred, global crop 2 with p 0.9 (and solarized with p 0.2), locals with p 0.5. The main
    crops keep this whatever the recipe; only the adjacent pair is milder.

    MammoDINO (Methodology: "Breast tissue-aware augmentation", "DBT adjacent slice loss") publishes
    no rule; ours: with tissue_aware, a crop is centred on a uniformly drawn tissue pixel and kept
    if at least min_tissue_global (locals: min_tissue_local) of it is tissue; after 10 misses, the
    smallest crop centred on the tissue. s' = s + delta, delta uniform over the offsets in
    +-1..+-adjacent_k inside the volume.

    Draws, all from rng, in the order tests/fixtures/multicrop.pt pins: global boxes, flips, global
    photometry; per local crop box, flip, photometry; s'; the seed of the pair's photometry."""

    GLOBAL_PHOTO = ((0.0, 0.0), (0.9, 0.2))  # (blur p, solarize p) of global crops 1 and 2
    LOCAL_PHOTO = (0.5, 0.0)
    # MammoDINO's "conservative tissue-aware transforms" for the adjacent pair (its numbers are not
    # public; ours): no blur, no solarize, brightness and contrast in [0.8, 1.2] (DINOv2: 0.6-1.4)
    PAIR_PHOTO, PAIR_JITTER = (0.0, 0.0), 0.2
    MIP_MARGIN = 6.0  # a level serves crops whose box there is >= mip_margin x the output side

    def __init__(self, *, patch_size=14, global_size=112, local_size=56, n_local=8,
                 global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), tissue_aware=False,
                 min_tissue_global=0.5, min_tissue_local=0.3, adjacent_k=0, pyramid=True,
                 mip_margin=MIP_MARGIN):
        if mip_margin < 1:
            raise ValueError(f"mip_margin must be >= 1 (a crop is never upsampled from a level "
                             f"smaller than it), got {mip_margin}")
        self.patch_size, self.n_local, self.pyramid = patch_size, n_local, pyramid
        self.mip_margin = mip_margin
        self.global_size, self.global_scale = global_size, global_scale
        self.local_size, self.local_scale = local_size, local_scale
        self.tissue_aware = tissue_aware
        self.min_tissue_global, self.min_tissue_local = min_tissue_global, min_tissue_local
        self.adjacent_k = adjacent_k

    def __call__(self, image, mask, stride, rng, s=0, n_slices=1, read=None):
        levels = image if isinstance(image, Pyramid) else Pyramid.of(image)
        shape = levels.shape  # (H, W), full resolution: the boxes are drawn in it
        boxes = [self._box(rng, shape, self.global_scale, mask, stride, self.min_tissue_global)
                 for _ in range(2)]
        flips = [bool(f) for f in rng.random(2) < 0.5]
        out = {"global_crops": self._global_views(levels, boxes, flips, rng)}
        local = []
        for _ in range(self.n_local):
            box = self._box(rng, shape, self.local_scale, mask, stride, self.min_tissue_local)
            crop = self._crop(levels, box, rng.random() < 0.5, self.local_size)
            local.append(self._photo(crop, rng, *self.LOCAL_PHOTO))
        out["local_crops"] = _grey_stack(local)  # (n_local, 3, L, L)
        grids = [self._tissue_grid(mask, stride, b, f) for b, f in zip(boxes, flips)]
        out["global_tissue"] = torch.stack(grids)  # (2, G/p, G/p)
        s2 = s  # kept for a single-slice image (FFDM): collate masks its adjacent-slice term
        if self.adjacent_k > 0:
            # only offsets inside the volume, so s' != s whenever S > 1 (clamping s + delta to the
            # volume gave s' = s, e.g. for s = 0, delta = -2 in a 2-slice volume)
            k = self.adjacent_k
            inside = [d for d in range(-k, k + 1) if d and 0 <= s + d < n_slices]
            s2 = s + inside[int(rng.integers(len(inside)))] if inside else s
            # the pair: global crop 1's box and flip on s and on s', each with the mild photometry,
            # drawn from a generator of its own (one draw here), so the pair's recipe can change
            # without moving any later sample's crops
            pair_rng = np.random.default_rng(int(rng.integers(2 ** 63)))
            view = read(s2)
            view = view if isinstance(view, Pyramid) else Pyramid.of(view)
            pair = [self._crop(v, boxes[0], flips[0], self.global_size) for v in (levels, view)]
            out["adjacent"] = _grey_stack([self._photo(x, pair_rng, *self.PAIR_PHOTO,
                                                       self.PAIR_JITTER) for x in pair])

        out["slice_index"] = torch.tensor([s, s2])
        return out

    def _global_views(self, levels, boxes, flips, rng):
        """The two global crops of one slice, each with its own photometry: (2, 3, G, G)."""
        return _grey_stack([self._photo(self._crop(levels, b, f, self.global_size), rng, *photo)
                            for b, f, photo in zip(boxes, flips, self.GLOBAL_PHOTO)])

    def _box(self, rng, shape, scale, mask, stride, min_tissue):
        """RandomResizedCrop geometry (top, left, h, w); tissue-aware: centred on tissue and at
        least min_tissue of it."""
        H, W = shape
        tissue = np.flatnonzero(mask) if self.tissue_aware and mask.any() else None
        for _ in range(10):  # torchvision's attempts before falling back
            area = H * W * rng.uniform(*scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            h, w = int(round(math.sqrt(area / ratio))), int(round(math.sqrt(area * ratio)))
            if not (0 < h <= H and 0 < w <= W):
                continue
            if tissue is None:
                return int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1)), h, w
            cy, cx = np.unravel_index(tissue[rng.integers(len(tissue))], mask.shape)
            top = int(np.clip(cy * stride - h // 2, 0, H - h))
            left = int(np.clip(cx * stride - w // 2, 0, W - w))
            if mask_crop(mask, stride, (top, left, h, w)).mean() >= min_tissue:
                return top, left, h, w
        if tissue is None:  # torchvision's fallback: the image cut to aspect 3/4..4/3, centred
            h, w = min(H, round(W * 4 / 3)), min(W, round(H * 4 / 3))
            return (H - h) // 2, (W - w) // 2, h, w
        h = w = min(H, W, int(math.sqrt(H * W * scale[0])))
        ys, xs = np.nonzero(mask)  # fallback: the smallest crop centred on the tissue bounding box
        cy, cx = (ys.min() + ys.max()) * stride // 2, (xs.min() + xs.max()) * stride // 2
        return int(np.clip(cy - h // 2, 0, H - h)), int(np.clip(cx - w // 2, 0, W - w)), h, w

    def _crop(self, levels, box, flip, size):
        """The slice cut to box (top, left, h, w), resized, flipped if `flip`: (1, size, size).
        levels: the slice's Pyramid."""
        if not self.pyramid:
            t, l, h, w = box
            x = F.interpolate(levels[0][None, None, t:t + h, l:l + w], size=(size, size),
                              mode="bicubic", align_corners=False, antialias=True)[0]
            return (x.flip(-1) if flip else x).clamp(0, 1)
        level = self._level(box, size)
        img = levels[level]
        return _resample(img, box, size, level, flip, levels.shifts[level])[None].clamp_(0, 1)

    def _level(self, box, size):
        """The pyramid level a crop is resampled from (0 without the pyramid)."""
        side = int(min(box[2:]) // (self.mip_margin * size))  # 2**level <= side < 2**(level + 1)
        return max(side.bit_length() - 1, 0) if self.pyramid else 0

    def _tissue_grid(self, mask, stride, box, flip):
        """Tissue fraction per patch of a global crop, flipped with it: (G/p, G/p)."""
        m = torch.from_numpy(mask_crop(mask, stride, box)).float()
        grid = F.adaptive_avg_pool2d(m[None, None], self.global_size // self.patch_size)[0, 0]
        return grid.flip(-1) if flip else grid

    def _photo(self, x, rng, blur_p, solarize_p, jitter=0.4):
        """Grey version of DINOv2's colour augmentation: (1, h, w) -> (1, h, w), the one channel
        that _grey_stack repeats to 3. In place on x, a crop made for this call."""
        # ColorJitter(brightness .4, contrast .4) in random order, clamped after each; its
        # saturation and hue (and RandomGrayscale) do nothing on grey
        if rng.random() < 0.8:
            b, c = rng.uniform(1 - jitter, 1 + jitter, 2)
            for op in rng.permutation(2):
                if op == 0:
                    x.mul_(b).clamp_(0, 1)
                else:  # contrast: (x - mean) c + mean
                    mean = x.mean()
                    x.sub_(mean).mul_(c).add_(mean).clamp_(0, 1)
        if rng.random() < blur_p:
            x = gaussian_blur(x, float(rng.uniform(0.1, 2.0)))
        if rng.random() < solarize_p:
            x = torch.where(x >= 0.5, 1 - x, x)
        return x.clamp_(0, 1)


def _grey_stack(crops):
    """One-channel crops (1, h, w) -> (n, 3, h, w), the grey channel repeated as a view: collate
    writes the 3 channels once, into the batch."""
    return torch.stack([c[:1] for c in crops]).expand(-1, 3, -1, -1)


def gaussian_blur(x, sigma, k=9):
    """torchvision's GaussianBlur(k) on (1, h, w) with reflect padding, as two 1-D passes (rows
    then columns, as torchvision), each an embedding_bag over a pixel's k reflected neighbours: 4x
    faster than two convolutions (a tenth of a sample's time), bit-identical at 196 and 518 px."""
    r = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=x.dtype)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()  # (k,)

    def rows_of_transpose(y):  # y (a, b) -> y.T (b, a) blurred along a's rows
        n = y.shape[1]
        return F.embedding_bag(_reflected(n, k), _transposed(y),
                               per_sample_weights=g.expand(n, k), mode="sum")

    return rows_of_transpose(rows_of_transpose(x[0]))[None]  # (1, h, w)


@functools.lru_cache(maxsize=16)
def _reflected(n, k):
    """Each of n pixels' k neighbours, centred, reflected at the ends: (n, k) indices (the crop
    sizes are few, so they are made once)."""
    i = (torch.arange(n)[:, None] + torch.arange(k) - k // 2).abs()  # (n, k)
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


class Pyramid:
    """One slice at the resolutions its crops ask for, each made once (mip-mapping): level L is
    2**L times smaller, the 2x2 means (_half) of level L - 1, or what read(L) gave.
    read(level) -> ((h, w) tensor, factor, shift): the slice at 1 / factor of its resolution,
    factor = 2**r for some r <= level (1: in full), its blocks shifted by shift (rows, columns;
    _taps); called only when no finer level is there yet, so a JPEG 2000 slice is decoded once,
    at the level the first crop asks for (read_level), unless a later crop needs a finer one.
    shape: the full-resolution (H, W), known before any read. shifts: each level's shift (a 2x2
    mean keeps its parent's)."""

    def __init__(self, shape, read):
        self.shape, self.read, self.levels, self.shifts = tuple(shape), read, {}, {}

    @classmethod
    def of(cls, image):
        """The pyramid of a slice already read in full."""
        pyramid = cls(image.shape, None)
        pyramid.levels[0], pyramid.shifts[0] = image, (0.0, 0.0)
        return pyramid

    def __getitem__(self, level):
        if level in self.levels:
            return self.levels[level]
        finer = [k for k in self.levels if k < level]
        if not finer:  # nothing finer yet: read at this level (or finer, where it must)
            image, factor, shift = self.read(level)
            finer = [factor.bit_length() - 1]
            assert 2 ** finer[0] == factor and finer[0] <= level, (factor, level)
            self.levels[finer[0]], self.shifts[finer[0]] = image, shift
        for k in range(max(finer) + 1, level + 1):  # each from the one above it
            self.levels[k], self.shifts[k] = _half(self.levels[k - 1]), self.shifts[k - 1]
        return self.levels[level]


def _half(x):
    """2x2 means of x (h, w) -> (h // 2, w // 2), an odd last row or column left out (_taps gives
    its weight to the level's last pixel). Bilinear at exactly 1/2 samples midway between 4 pixels,
    their mean, 6x faster than avg_pool2d."""
    return F.interpolate(x[None, None], scale_factor=0.5, mode="bilinear")[0, 0]


def _taps(start, length, size, level, n, shift=0.0):
    """torch's antialiased bicubic resize weights (PIL's kernel, a = -0.5) of `size` outputs over
    pixels [start, start + length) of the slice's axis, summed over each 2**level block: bags of
    level pixel indices (clamped to its n) and their weights, each (size, K). shift: where the
    level's blocks sit against [c 2**level, (c + 1) 2**level), in full-resolution pixels (< 0:
    to the left, as a JPEG 2000 reduction's: read_level); the box moves the other way."""
    start = start - shift
    s = length / size
    scale = max(s, 1.0)
    center = start + s * (np.arange(size) + 0.5)  # (size,)
    lo = np.maximum(np.floor(center - 2 * scale + 0.5), start)[:, None]  # (size, 1) first pixel
    hi = np.minimum(np.floor(center + 2 * scale + 0.5), start + length)[:, None]  # past the last
    first = np.floor(lo).astype(np.int64) >> level  # (size, 1) each bag's first block
    k = int(((np.ceil(hi).astype(np.int64) - 1 >> level) - first).max()) + 1  # blocks per bag
    j = (first << level) + np.arange(k << level)  # (size, K * 2**level) their pixels
    x = np.minimum(np.abs(j + 0.5 - center[:, None]) / scale, 2)
    x[(j < lo) | (j >= hi)] = 2  # where the kernel is 0
    w = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, ((-0.5 * x + 2.5) * x - 4) * x + 2)
    w = sum(w[:, i::1 << level] for i in range(1 << level))  # (size, K) per block
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    return torch.from_numpy(np.clip(first + np.arange(k), 0, n - 1)), torch.from_numpy(w)


def _transposed(y):
    """y (a, b) -> y.T (b, a), contiguous: numpy's transpose copy is 1.8x torch's here."""
    return torch.from_numpy(np.ascontiguousarray(y.numpy().T))


def _resample(img, box, size, level, flip, shift=(0.0, 0.0)):
    """Box (top, left, h, w) of the slice resized to (size, size) from its pyramid level `img`
    (its blocks shifted by `shift`, rows and columns: _taps): rows, then columns, each an
    embedding_bag over the level's pixels (flipped: bags reversed)."""
    t, l, h, w = box
    rows, w_rows = _taps(t, h, size, level, img.shape[0], shift[0])
    cols, w_cols = _taps(l, w, size, level, img.shape[1], shift[1])
    if flip:
        cols, w_cols = cols.flip(0), w_cols.flip(0)
    lo, hi = int(cols.min()), int(cols.max()) + 1
    y = F.embedding_bag(rows, img, per_sample_weights=w_rows, mode="sum")  # (size, W_level)
    y = _transposed(y[:, lo:hi])  # (hi - lo, size)
    return F.embedding_bag(cols - lo, y, per_sample_weights=w_cols, mode="sum").t()  # (size, size)


def mask_crop(mask, stride, box):
    """The part of the strided tissue mask under a full-resolution box (top, left, h, w)."""
    t, l, h, w = box
    return mask[t // stride:-(-(t + h) // stride), l // stride:-(-(l + w) // stride)]


# ------------------------------------------------------------------------ pretraining stream
def remote_source(source, manifest=None, cache_bytes=50 * 2**30, credentials=None, ca_bundle=None,
                  prefetch=2, floor_bytes=2**30):
    """(manifest rows, pacs.Client, prefetch) for a dicomweb+http(s):// source: the manifest is the
    allow-list, the rotating cache lives under $DBT_DINO_CACHE/dicomweb. Credentials: DICOMWEB_*
    variables or the `credentials` file."""
    rows = dicom.scan(source, manifest)
    cache = pacs.Cache(utils.cache_base(), cache_bytes, floor_bytes)
    client = pacs.Client(source, rows, cache, pacs.load_credentials(credentials), ca_bundle)
    return rows, client, prefetch


class PretrainStream(torch.utils.data.IterableDataset):
    """Endless multi-crop samples, one random slice per draw, sharded by volume over (rank, worker).

    Items: MultiCrop's dict (global_crops, local_crops, global_tissue, slice_index, adjacent),
    volume (int), source (int: which of several sources) and skipped (path -> reason, the skips not
    yet passed on). source: a folder, manifest or DICOMweb URL, or a list of local ones drawn by
    `weights` (_mix). **crop: MultiCrop's
    keywords (patch_size, global_size, ..., adjacent_k); dicomweb: remote_source's keywords.
    clahe: each slice read (the sampled one and its neighbour) goes through preprocess.clahe
    once, before any crop (MammoDINO's preprocessing)."""

    def __init__(self, source, *, seed=0, cache_dir=None, slices_per_volume=4, shuffle_buffer=16,
                 dicomweb=None, clahe=False, weights=None, **crop):
        self.client, self.prefetch, self.clahe = None, 0, clahe
        self._scratch = ({}, {})  # read_slice's reused arrays, for s and for s'
        sources = list(source) if isinstance(source, (list, tuple)) else [source]
        source = sources[0]
        self.source_of, self.draw_p = None, None  # one source: volumes by permutation (shard)
        if len(sources) > 1:
            self._mix(sources, weights)
        elif pacs.is_dicomweb(source):  # self.paths: "study/series/instance" labels for skips
            self.rows, self.client, self.prefetch = remote_source(source, **(dicomweb or {}))
            self.paths = ["/".join(r[c] for c in pacs.UID_COLUMNS) for r in self.rows]
            # hits, misses, bytes fetched, samples drawn: one row per process (0 = main, w + 1 =
            # loader worker w), in shared memory so the main process can report its workers' figures
            self.fetch_stats = torch.zeros(257, 4, dtype=torch.float64).share_memory_()
            self._synced = torch.zeros(3, dtype=torch.float64)  # this process's counts in its row
        else:
            self.paths = dicom.scan(source)
        self.multicrop = MultiCrop(**crop)
        self.seed = seed
        self.slices_per_volume, self.shuffle_buffer = slices_per_volume, shuffle_buffer
        self.cache_dir = Path(cache_dir) if cache_dir else utils.cache_base() / "index"
        self.epoch = 0
        self.skipped = {}  # path -> reason, each logged once
        self._reported = set()  # paths whose skip already rode with an item
        # stops at the first readable volume; a remote source tries its first 3 (with retries)
        first = self.paths if self.client is None else range(min(3, len(self.paths)))
        if not any(self._probe(p) for p in first):
            reasons = "; ".join(list(self.skipped.values())[:3])
            raise ValueError(f"{pacs.redact(source)}: no readable DICOM among the first "
                             f"{len(first)} of {len(self.paths)} volumes. {reasons}")

    def _mix(self, sources, weights):
        """Several local sources: volumes drawn with replacement so that source s is drawn with
        probability weights[s] / sum(weights) (default: equal), however many files each holds
        (MammoDINO mixes 42,000 mammograms with 1.35 million DBT slices)."""
        if any(pacs.is_dicomweb(s) for s in sources):
            raise ValueError("several --data sources: folders or manifests only (a DICOMweb source "
                             "streams alone)")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"--data-weights {weights}: one weight >= 0 per --data source "
                             f"({len(sources)}), not all 0")
        found = [dicom.scan(s) for s in sources]
        empty = [str(s) for s, paths in zip(sources, found) if not paths]
        if empty:
            raise ValueError(f"--data {', '.join(empty)}: no DICOM files to mix in")
        self.paths = [p for paths in found for p in paths]
        counts = np.array([len(paths) for paths in found])
        self.source_of = np.repeat(np.arange(len(found)), counts)  # (n_volumes,)
        share = np.array(weights) / sum(weights)
        self.draw_p = share[self.source_of] / counts[self.source_of]  # (n_volumes,), sums to 1

    def volume_draws(self, epoch, rank=0, world=1, worker=0, workers=1):
        """The volumes one (rank, worker) reads in an epoch: its shard, or with several sources
        as many draws by draw_p, seeded by (seed, epoch, rank, worker)."""
        if self.draw_p is None:
            return self.shard(epoch, rank, world, worker, workers)
        n = math.ceil(len(self.paths) / (world * workers))
        rng = np.random.default_rng([self.seed, epoch, rank, worker, 1])
        return rng.choice(len(self.paths), size=n, p=self.draw_p).tolist()

    @property
    def n_skipped(self):
        return len(self.skipped)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _skip(self, path, reason):
        if path not in self.skipped:  # a reason names its file
            reason = str(reason) if str(path) in str(reason) else f"{path}: {reason}"
            self.skipped[path] = reason
            print(f"data: skipping {reason}", file=sys.stderr)

    def _unreported(self):
        """Skips this process has not yet passed on: they ride with the next item to the main
        process (SkipCounter), since loader workers are separate processes."""
        new = {p: r for p, r in self.skipped.items() if p not in self._reported}
        self._reported.update(new)
        return new

    def _index(self, path, label=None):
        try:
            return volume_index(path, self.cache_dir)
        except (ValueError, OSError) as e:
            self._skip(label or path, e)

    def _probe(self, p):
        """Is this volume readable: a local path, or a remote one (fetched once, then unpinned)."""
        if self.client is None:
            return self._index(p) is not None
        try:
            path, pin = self.client.fetch(self.rows[p])
        except pacs.FetchError as e:
            return self._skip(self.paths[p], e)
        self._sync_fetch_stats(0)
        try:  # unpinned only once read: another process's eviction could delete it in between
            self.volume_bytes = path.stat().st_size  # for the cache-size check in __iter__
            return self._index(path, self.paths[p]) is not None
        finally:
            self.client.cache.unpin(pin)

    def _check_room(self, workers):
        """Resident volumes are pinned, so the cache must hold all of them at once on this node
        (ranks x workers x (the one in use + the prefetched)), or the stream would wait on itself
        until CacheFull."""
        resident = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * workers * (self.prefetch + 1)
        need = resident * self.volume_bytes
        if need > self.client.cache.cap:
            mib = self.volume_bytes / 2**20
            raise ValueError(f"--cache-bytes {self.client.cache.cap} cannot hold the {resident} "
                             f"volumes resident at once on this node (ranks x loader workers x "
                             f"(1 + {self.prefetch} prefetched), about {mib:.0f} MiB each): use at "
                             f"least {need / 2**20:.0f}M")

    def _resident(self, volumes, row):
        """(v, local path or None, pin) per volume, in order. A remote volume is fetched `prefetch`
        ahead into the rotating cache and stays pinned (never evicted) until the caller retires
        it."""
        if self.client is None:
            yield from ((v, self.paths[v], None) for v in volumes)
            return
        todo = [v for v in volumes if self.paths[v] not in self.skipped]  # failed for good here
        fetched = self.client.prefetch([self.rows[v] for v in todo], self.prefetch)
        for v, (_, path, pin) in zip(todo, fetched):
            if path is None:  # retried, then given up: pin is the FetchError, logged once
                self._skip(self.paths[v], pin)
                pin = None
            self._sync_fetch_stats(row)
            yield v, path, pin

    def _sync_fetch_stats(self, row, samples=0):
        """Add this process's fetch counts since the last call, and samples drawn, to its row."""
        now = torch.tensor([self.client.stats[k] for k in ("hits", "misses", "bytes")],
                           dtype=torch.float64)
        self.fetch_stats[row, :3] += now - self._synced
        self.fetch_stats[row, 3] += samples
        self._synced = now

    def cache_report(self):
        """Cache hit rate, GB fetched and bytes fetched per sample drawn so far, over every worker
        and rank (a collective: all ranks call it at the same steps). {} for local data."""
        if self.client is None:
            return {}
        nccl = utils.rank_world()[1] > 1 and torch.distributed.get_backend() == "nccl"
        totals = utils.all_reduce(self.fetch_stats.sum(0).to("cuda" if nccl else "cpu")).tolist()
        hits, misses, fetched, samples = totals
        return dict(cache_hit=hits / max(hits + misses, 1), fetched_gb=fetched / 1e9,
                    bytes_per_sample=fetched / max(samples, 1))

    def shard(self, epoch, rank=0, world=1, worker=0, workers=1):
        """Volume indices for one (rank, worker): a strided slice of a (seed, epoch) permutation,
        wrapped so that all get as many."""
        n, total = len(self.paths), world * workers
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)  # the same on every rank
        g = rank * workers + worker
        return [int(perm[(g + j * total) % n]) for j in range(math.ceil(n / total))]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = utils.rank_world()
        epoch, buffer = self.epoch, []
        row = worker + 1 if info else 0  # this process's row of fetch_stats
        if self.client is not None:  # a new worker starts from the counts it inherited, reported
            self._check_room(workers)
            self._synced = torch.tensor([self.client.stats[k] for k in ("hits", "misses", "bytes")],
                                        dtype=torch.float64)
        while True:
            rng = np.random.default_rng([self.seed, epoch, rank, worker])
            produced = 0
            volumes = self.volume_draws(epoch, rank, world, worker, workers)
            for v, path, pin in self._resident(volumes, row):
                # bad local files fail again (logged once): history-free
                index = self._index(path, self.paths[v]) if path else None
                try:
                    for _ in range(self.slices_per_volume if index else 0):  # then it retires
                        try:
                            item = dict(self.sample(*index, rng), volume=v,
                                        source=0 if self.source_of is None else
                                        int(self.source_of[v]))
                        except ValueError as e:  # e.g. a corrupt frame deep inside a fine file
                            self._skip(self.paths[v], e)
                            break
                        produced += 1
                        buffer.append(item)  # mixes consecutive volumes: a batch is not one breast
                        if self.client is not None:
                            self._sync_fetch_stats(row, samples=1)
                        if len(buffer) > self.shuffle_buffer:
                            item = buffer.pop(int(rng.integers(len(buffer))))
                            # skips so far travel with the next item
                            yield dict(item, skipped=self._unreported())
                finally:  # unpinned: the LRU may evict it now
                    if pin is not None:
                        self.client.cache.unpin(pin)
            # a shard of only unreadable volumes (likely when ranks x workers ~ volumes) moves on to
            # the next epoch's shard; only when every volume has failed is there nothing to read
            if not produced and all(p in self.skipped for p in self.paths):
                raise ValueError(f"rank {rank} worker {worker}: no readable volume "
                                 f"({self.n_skipped} files skipped)")
            epoch += 1

    def sample(self, meta, mask, rng):
        """One item: a random slice s of a volume (volume_index's meta, mask) through MultiCrop."""
        S = meta["n_frames"]
        s = int(rng.integers(S))  # drawn before the crops' draws
        # s and s' each reuse their own arrays from one sample to the next
        first, second = (functools.partial(self._pyramid, meta, scratch=scratch)
                         for scratch in self._scratch)
        return self.multicrop(first(s), mask, meta["mask_stride"], rng, s, S, second)

    def _pyramid(self, meta, s, scratch):
        """Slice s as a Pyramid: read at the resolution the first crop asks for (read_level);
        with CLAHE, equalised in full first (MammoDINO equalises the image, not the crop)."""
        if self.clahe:
            return Pyramid.of(read_clahe(meta, s, scratch))
        return Pyramid((meta["rows"], meta["cols"]), lambda level: read_level(meta, s, level,
                                                                             scratch))


def read_level(meta, s, level, scratch=None):
    """Slice s as read_slice gives it, at 1 / 2**r of its resolution for the largest r <= level
    its frame allows: (image, 2**r, shift) (Pyramid.read). A JPEG 2000 frame decodes r wavelet
    levels down (dicom.read_reduced; a full-size frame: 60 ms at r = 1, 20 at r = 2, 160 in
    full); any other frame, or a mirrored one whose width 2**r does not divide, is read in full.
    A reduction's sample c is centred on pixel c 2**r (the wavelet's low-pass sits on the even
    samples), 2**(r - 1) - 1/2 pixels left of a 2x2-mean block's centre: its shift, mirrored for a
    mirrored slice (without it, crops at margin 1 were 0.32 off the direct resize at edges; with
    it 0.13)."""
    aligned = not meta["flip"] or meta["cols"] % 2 ** level == 0
    if level and meta["transfer_syntax"] in dicom.J2K and aligned:
        image, factor = dicom.read_reduced(meta, s, level)  # (h, w), stored orientation
        image = image[:, ::-1] if meta["flip"] else image
        shift = 0.5 - factor / 2  # full-resolution pixels (< 0: left); 0 when not reduced
        shift = (shift, -shift if meta["flip"] else shift)  # rows, columns
        return torch.from_numpy(np.ascontiguousarray(image)), factor, shift
    return read_slice(meta, s, scratch), 1, (0.0, 0.0)


def read_clahe(meta, s, scratch=None):
    """preprocess.clahe(read_slice(meta, s)), bit for bit: (H, W) in [0, 1]. Its histogram bins
    are looked up from the stored integers (preprocess.clahe_stored), so the displayed slice is
    never made: decode + CLAHE of a full-size slice 47 ms instead of 62."""
    if meta["bits_allocated"] > 16:  # 32-bit data: too many values for a table
        return torch.from_numpy(preprocess.clahe(read_slice(meta, s, scratch).numpy()))
    stored, _ = dicom.decode_slice(meta, s, out=_scratch(scratch, "stored", meta))  # (H, W)
    display = functools.partial(dicom.display_slice, meta, s=s)  # applied to a table of values
    return torch.from_numpy(preprocess.clahe_stored(stored, display, meta["flip"]))


# ------------------------------------------------------------------------ iBOT masks and collate
class MaskingGenerator:
    """DINOv2/BEiT block masking on a (h, w) patch grid, drawn with python's `random` like the
    reference (dinov2/data/masking.py): rectangles of random area and aspect until the count."""

    def __init__(self, input_size, max_num_patches, min_num_patches=4, min_aspect=0.3):
        self.height, self.width = input_size
        self.max_num_patches, self.min_num_patches = max_num_patches, min_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _block(self, mask, max_patches):
        for _ in range(10):
            area = random.uniform(self.min_num_patches, max_patches)
            aspect = math.exp(random.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= max_patches:
                    mask[top:top + h, left:left + w] = True
                    return new
        return 0

    def __call__(self, num_masking_patches=0):
        mask = np.zeros((self.height, self.width), bool)  # (h, w)
        count = 0
        while count < num_masking_patches:
            added = self._block(mask, min(num_masking_patches - count, self.max_num_patches))
            if added == 0:
                break
            count += added
        return mask


def tissue_masks(tissue, counts, eps=0.05):
    """Tissue-prioritised iBOT masks (MammoDINO's tissue-aware masking, our rule): per image,
    counts[i] patches without replacement, weight eps + tissue fraction (Gumbel top-k)."""
    masks = torch.zeros(tissue.shape, dtype=torch.bool)  # (B, N)
    keys = (tissue + eps).log() - torch.log(-torch.log(torch.rand(tissue.shape).clamp_min(1e-20)))
    for i, k in enumerate(counts):
        if k > 0:
            masks[i, keys[i].topk(k).indices] = True
    return masks


def collate_pretrain(samples, *, patch_size=14, mask_probability=0.5, mask_ratio=(0.1, 0.5),
                     tissue_masking=False):
    """Stack crop-major ([crop1 of all B; crop2 of all B]) and draw iBOT masks with DINOv2's ratio
    schedule (dinov2/data/collate.py): mask_probability of the 2B global crops are masked, the i-th
    with a ratio uniform in [probs[i], probs[i+1]) of linspace(mask_ratio), then shuffled."""
    def crop_major(key):  # each sample's crops written once, straight into the batch
        first, B = samples[0][key], len(samples)
        out = torch.empty((len(first) * B, *first.shape[1:]), dtype=first.dtype)  # (n*B, ...)
        for b, s in enumerate(samples):
            out[b::B] = s[key]  # sample b's crop i at i*B + b; 3 grey channels from their view
        return out

    out = {"skipped": {p: r for s in samples for p, r in s.get("skipped", {}).items()},
           "global": crop_major("global_crops"),  # (2B, 3, G, G)
           "local": crop_major("local_crops"),  # (n_local*B, 3, L, L)
           "adjacent": crop_major("adjacent") if "adjacent" in samples[0] else None,  # s; s'
           "source": torch.tensor([s.get("source", 0) for s in samples])}  # (B,) --data index
    if out["adjacent"] is not None:  # (2B,) 0 where s' = s (a single-slice image): no adjacent term
        has_neighbour = [float(s["slice_index"][0] != s["slice_index"][1]) for s in samples]
        out["adjacent_valid"] = torch.tensor(has_neighbour).repeat(2)  # per row: s views, s' views
    B, G = len(samples), out["global"].shape[-1]
    n = G // patch_size  # patch grid side
    N, n_masked = n * n, int(2 * B * mask_probability)
    probs = np.linspace(*mask_ratio, n_masked + 1)

    def size(i):  # image i masks a ratio in [probs[i], probs[i+1])
        return int(N * random.uniform(probs[i], probs[i + 1]))

    if tissue_masking:
        counts = [size(i) for i in range(n_masked)] + [0] * (2 * B - n_masked)
        random.shuffle(counts)
        masks = tissue_masks(crop_major("global_tissue").flatten(1), counts)  # (2B, N)
    else:  # each size drawn right before its blocks, so one seed gives the reference's masks
        # max_num_patches as the reference's float chain computes it
        gen = MaskingGenerator((n, n), max_num_patches=0.5 * G // patch_size * G // patch_size)
        masks = [torch.from_numpy(gen(size(i)).ravel()) for i in range(n_masked)]
        masks += [torch.zeros(N, dtype=torch.bool)] * (2 * B - n_masked)
        random.shuffle(masks)
        masks = torch.stack(masks)  # (2B, N)
    per_image = masks.sum(-1, keepdim=True).clamp_min(1)
    out.update(masks=masks, mask_indices=masks.flatten().nonzero().flatten(),
               masks_weight=(1 / per_image).expand_as(masks)[masks].float(),
               n_masked=int(masks.sum()))
    return out


# ------------------------------------------------------------------------ loaders, skip accounting
def _worker_init(_):
    seed = torch.initial_seed() % 2 ** 32  # differs per worker, follows the loader's generator
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size, workers, collate_fn, seed):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
        generator=generator, worker_init_fn=_worker_init, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


class SkipCounter:
    """Unreadable volumes over the main process, its loader workers (their skips arrive in
    batch["skipped"]) and all ranks. update() gathers them (a collective: every rank calls it at the
    same steps); total, check and summary then read that one gathered view."""

    def __init__(self, stream):
        self.stream = stream
        self.local = {}  # path -> reason, from this rank's batches
        self.skipped = {}  # path -> reason, over all ranks at the last update()

    def add(self, skipped):
        self.local.update(skipped)

    def update(self):
        """Gather path -> reason over all ranks; returns how many volumes proved unreadable."""
        merged = dict(self.stream.skipped, **self.local)  # with the main process's own skips
        if utils.rank_world()[1] > 1:
            parts = [None] * utils.rank_world()[1]
            torch.distributed.all_gather_object(parts, merged)
            merged = {p: r for part in parts for p, r in part.items()}
        self.skipped = merged
        return len(merged)

    def summary(self, first=3):
        n = len(self.stream.paths)
        lines = [f"data: {len(self.skipped)} of {n} volumes skipped as unreadable"]
        lines += [f"  {r}" for r in list(self.skipped.values())[:first]]
        return "\n".join(lines + (["  ..."] if len(self.skipped) > first else []))

    def check(self, max_fraction):
        """Stop (one ValueError on every rank) when over max_fraction of the volumes are bad."""
        n = len(self.stream.paths)
        if len(self.skipped) > max_fraction * n:
            raise ValueError(f"{len(self.skipped)} of {n} volumes are unreadable, more than "
                             f"--max-skip-fraction {max_fraction:g}; the first: "
                             f"{next(iter(self.skipped.values()))}")


# ------------------------------------------------------------------------ images for the probes
def breast_view(path, size, clahe=False):
    """A 2-D view (MG, DX, CR; or a DBT volume's central slice) as a backbone input: displayed
    (the first VOI window, MONOCHROME1 inverted), mirrored so the chest wall is on the left, cut to
    the breast's bounding box (preprocess.tissue_mask), resized keeping its aspect ratio to fit
    size x size and placed top-left on black (the chest wall stays at the left edge) ->
    (3, size, size) float32 in [0, 1]. An image without tissue keeps its whole frame. A .jpg or
    .png (CDD-CESM's) is read by Pillow as grey levels / 255, mirrored by the same rule. clahe: the
    displayed image through preprocess.clahe before the cut (the tissue box still found on the
    displayed one), as the mammodino recipe trains."""
    if Path(path).suffix.lower() in (".jpg", ".jpeg", ".png"):
        with Image.open(path) as im:
            x = np.asarray(im.convert("L"), np.float32) / 255  # (H, W)
        x = x[:, ::-1] if dicom.edge_side(x) == "R" else x
    else:
        meta = dicom.index_volume(path)  # orientation decided on the central slice
        x = dicom.read_dbt(path, frames=[meta["n_frames"] // 2], meta=meta)[0][0]  # (H, W)
    rows, cols = np.nonzero(preprocess.tissue_mask(x))  # on the displayed image, as pretraining
    x = preprocess.clahe(x) if clahe else x  # then the whole image, before the cut (as a slice)
    if len(rows):
        x = x[rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # (h, w) the breast
    scale = size / max(x.shape)
    h, w = (max(1, min(size, round(n * scale))) for n in x.shape)
    small = F.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None, None], size=(h, w),
                          mode="bilinear", antialias=True)[0, 0]  # (h, w)
    out = torch.zeros(size, size)  # (size, size) black around the breast, as in the image
    out[:h, :w] = small.clamp(0, 1)
    return out.expand(3, -1, -1)  # (3, size, size) grey replicated, as DBT-DINO feeds slices


class ViewReader(torch.utils.data.Dataset):
    """One 2-D image per item, decoded and cut by breast_view on a loader worker: (i, (3, size,
    size) view) or (i, message naming the file) when it cannot be read."""

    def __init__(self, paths, size, clahe=False):
        self.paths, self.size, self.clahe = [str(p) for p in paths], size, clahe

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, breast_view(self.paths[i], self.size, self.clahe)
        except (ValueError, OSError) as e:  # pydicom's and Pillow's read errors are both
            return i, f"{self.paths[i]}: {e}"


def density_eval_set(root, size=112, max_exams=None, exclude=(), clahe=False):
    """Central slice of every view of the first `max_exams` exams in exams.csv whose patient is
    not in `exclude`, canonical orientation (with clahe: through preprocess.clahe, as the backbone
    trains), resized -> images (n, 3, size, size), labels (density 0..3), groups (patient index)."""
    root = Path(root)
    exams = [e for e in utils.read_csv(root / "exams.csv") if e["patient"] not in exclude]
    exams = exams[:max_exams]
    images, labels = [], []
    groups, patients = [], {}  # patient index per image; patient id -> index
    for e in exams:
        for col in ("LCC", "RCC", "LMLO", "RMLO"):
            meta = dicom.parse_headers(root / e[col])  # one header parse per view
            x = dicom.orient(meta)  # (H, W) the displayed central slice, decoded once for both uses
            x = np.ascontiguousarray(x[:, ::-1] if meta["flip"] else x)  # chest wall left
            x = preprocess.squares(x[None], size, clahe)[0, 0]  # (size, size)
            images.append(x.clamp(0, 1).expand(3, -1, -1))  # (3, size, size)
            labels.append("abcd".index(e["density"]))
            groups.append(patients.setdefault(e["patient"], len(patients)))
    return dict(images=torch.stack(images), labels=torch.tensor(labels),
                groups=torch.tensor(groups))


class VolumeReader(torch.utils.data.Dataset):
    """One item per volume, decoded on a loader worker one slice at a time: (i, dict) with the
    stored integers (S, H, W) and their display parameters, or (i, message) when it cannot be
    read. An uncompressed little-endian volume whose unused bits are clear is not decoded at all:
    its stored integers are the file's own bytes, mapped (mapped_volume), so nothing is copied
    through the worker; pages come from the page cache as the consumer reads them."""

    def __init__(self, paths, mapped=True):
        self.paths, self.mapped = [str(p) for p in paths], mapped

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.read(i, self.paths[i])

    def read(self, i, path):
        try:
            meta = dicom.index_volume(path)  # headers + the volume's one orientation decision
            stored = _mapping(meta) if self.mapped else None
            if stored is None:
                stored = self._decoded(meta)
        except (ValueError, OSError) as e:
            return i, str(e)
        rows, sigmoid = dicom.voi_rows(meta)
        return i, {"stored": stored, "rows": rows, "sigmoid": sigmoid, "invert": meta["invert"],
                   "flip": meta["flip"]}

    def _decoded(self, meta):
        """The volume decoded frame by frame: (S, H, W) integers, in shared memory on a worker."""
        first, _ = dicom.decode_slice(meta, 0)  # (H, W): gives the stored dtype
        dtype = torch.from_numpy(first[:0]).dtype
        stored = torch.empty((meta["n_frames"], *first.shape), dtype=dtype)  # (S, H, W)
        if torch.utils.data.get_worker_info() is not None:
            # decode into shared memory: the hand-over to the main process then moves a file
            # descriptor, not the volume, whose copy costs page faults on 590 MB of fresh memory
            # (50 -> 63 slices/s with 1 worker, 71 -> 95 with 2; 60 x 2457 x 1996, 2 cores,
            # median of 4 alternated runs)
            stored.share_memory_()
        out = stored.numpy()  # (S, H, W), the same memory
        out[0] = first
        for s in range(1, meta["n_frames"]):  # uncompressed frames: read into it directly
            dicom.decode_slice(meta, s, out=out[s])
        return stored


def mapped_volume(path, offset, shape, dtype):
    """(S, H, W) tensor over a file's own bytes (np.memmap, copy-on-write: writable, the file never
    written)."""
    return torch.from_numpy(np.memmap(path, np.dtype(dtype), "c", offset, tuple(shape)))


class _MappedVolume:
    """What a worker hands over for a mappable volume: unpickled in the main process as
    mapped_volume's tensor, so the volume's bytes never pass through the pipe or shared memory."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return mapped_volume, self.args


def _mapping(meta):
    """The volume as mapped_volume (on a worker: a _MappedVolume), or None when it must be decoded:
    compressed, big-endian, frames in several files or not back to back, or junk in the bits
    above BitsStored (one pass over the mapped bytes looks; pydicom would clear them)."""
    offsets, file = meta.get("native"), meta["frames"][0][0]
    if not offsets or dicom.NATIVE[meta["transfer_syntax"]] != "<" or sys.byteorder != "little":
        return None
    size = meta["rows"] * meta["cols"] * meta["bits_allocated"] // 8
    if any(f != file for f, _ in meta["frames"]) or any(
            o != offsets[0] + k * size for k, o in enumerate(offsets)):
        return None
    args = (file, offsets[0], (meta["n_frames"], meta["rows"], meta["cols"]),
            dicom.stored_dtype(meta).str)
    stored = mapped_volume(*args)  # (S, H, W)
    if dicom.unused_bits_set(stored.numpy(), meta):  # a pass reading all the mapped bytes
        return None
    return _MappedVolume(*args) if torch.utils.data.get_worker_info() is not None else stored


class RemoteVolumeReader(VolumeReader):
    """VolumeReader for DICOMweb instances (uids: dicts of pacs.UID_COLUMNS), fetched into the
    rotating cache and pinned only while read. A failed fetch is an (i, message) skip; AuthError and
    CacheFull come back as the item, for embed_volumes to raise."""

    def __init__(self, client, uids):
        self.client, self.mapped = client, False  # unpinned once read: the cache may evict it
        self.uids = list(uids)
        self.paths = ["/".join(u[c] for c in pacs.UID_COLUMNS) for u in self.uids]  # log labels

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

