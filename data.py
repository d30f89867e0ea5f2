"""Data for DBT-DINO / MammoDINO: DBT DICOM reading, synthetic phantoms, tissue-aware pretraining stream.

Layouts accepted under `--data`:
  DIR/**/*.dcm            any tree of DICOM files; each file is one volume (BTO multi-frame, MG 2D, multi-frame
                          SC/CT), except a folder holding only the single-frame slices of one series at distinct
                          ImagePositionPatient z (legacy layout), which is one volume. Files named *.dcm, *.dicom,
                          *.ima, by their UID (1.2.840...) or without a suffix.
  manifest.csv            a CSV with a `path` column (relative to the CSV); a path may also be a folder holding the
                          single-frame legacy slices of ONE series (sorted by ImagePositionPatient z, then
                          InstanceNumber).
  dicomweb+https://host/prefix  with a manifest (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID): instances
                          streamed from a PACS over WADO-RS into a rotating cache (pacs.py), then read as files
  synthetic               `synthetic_archive()`: phantoms written as real DICOM in the BCS-DBT layout:
      Breast-Cancer-Screening-DBT/<PatientID>/<exam>/<view>/1-1.dcm
      file-paths.csv  PatientID,StudyUID,View,descriptive_path,classic_path   (View: lcc, rcc, lmlo, rmlo)
      labels.csv      PatientID,StudyUID,View,Normal,Actionable,Benign,Cancer
      boxes.csv       PatientID,StudyUID,View,Subject,Slice,X,Y,Width,Height,Class,AD,VolumeSlices
      exams.csv       patient,exam,LCC,RCC,LMLO,RMLO,density,years_to_cancer,years_of_followup
Boxes follow the official BCS-DBT convention: (X, Y) top-left, 0-based Slice, in the frame of
`read_dbt(path, view=...)`.
Intensities: stored -> rescale -> VOI (LINEAR, LINEAR_EXACT, SIGMOID) -> MONOCHROME1/INVERSE fix, in [0, 1].
Orientation: with `view` the official BCS-DBT rule (180 deg rotation when the edge-sum side disagrees with the view);
without it our canonical one: mirrored so the chest wall (the brighter edge) is on the image LEFT.
Per-volume index (frames, windows, flip, tissue mask) is cached under $DBT_DINO_CACHE (default ./cache)/index.
"""
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
from scipy import ndimage

import dicom
import pacs
import utils

INDEX_VERSION = 3  # bump when the cached per-volume index changes meaning
# Crop recipes: PretrainStream(src, global_size=..., local_size=..., **RECIPES[name]). Crop sizes are not here:
# they live with the model and schedule in pretrain.PRESETS. MammoDINO's numbers are our proposal (data.md 4.2).
RECIPES = {
    "dinov2": dict(global_scale=(0.32, 1.0), local_scale=(0.05, 0.32)),
    "dbt-dino": dict(global_scale=(0.5, 1.0), local_scale=(0.2, 0.5)),
}
RECIPES["mammodino"] = dict(RECIPES["dinov2"], tissue_aware=True, min_tissue_global=0.5, min_tissue_local=0.3,
                            adjacent_k=2)


# ----------------------------------------------------------------------------- distributed + seeding


# ----------------------------------------------------------------------------- DICOM reading


# ----------------------------------------------------------------------------- CLAHE, Otsu, tissue mask
def clahe(image, clip_limit=0.01, kernel_size=None, nbins=256):
    """2D CLAHE with skimage.exposure.equalize_adapthist semantics (spec data.md 5.2) -> float in [0, 1]."""
    img = np.asarray(image, np.float64)
    lo, hi = img.min(), img.max()
    if hi <= lo:
        return np.zeros(img.shape, np.float32)
    q = np.round((img - lo) / (hi - lo) * 16383).astype(np.int64)  # skimage works on 14-bit grey levels
    ks = [max(s // 8, 1) for s in q.shape] if kernel_size is None else list(np.broadcast_to(kernel_size, 2))
    pads = [(k // 2, (k - s % k) % k + math.ceil(k / 2)) for k, s in zip(ks, q.shape)]
    b = np.pad(q, pads, mode="reflect") // (1 + 16384 // nbins)  # bin_size quirk: ~253 of 256 bins used
    (k0, k1), (P0, P1) = ks, b.shape
    h0, h1 = P0 // k0 - 1, P1 // k1 - 1  # histogram tiles, offset by half a tile
    tiles = b[k0 // 2: k0 // 2 + h0 * k0, k1 // 2: k1 // 2 + h1 * k1].reshape(h0, k0, h1, k1)
    tiles = tiles.transpose(0, 2, 1, 3).reshape(h0 * h1, -1)
    hist = np.bincount((tiles + nbins * np.arange(h0 * h1)[:, None]).ravel(), minlength=h0 * h1 * nbins)
    hist = _clip_hist(hist.reshape(h0 * h1, nbins), int(max(clip_limit * k0 * k1, 1)) if clip_limit > 0 else k0 * k1)
    maps = np.minimum(np.cumsum(hist, -1) * 16383.0 / (k0 * k1), 16383).astype(np.int64)
    maps = np.pad(maps.reshape(h0, h1, nbins), ((1, 1), (1, 1), (0, 0)), mode="edge")
    n0, n1 = P0 // k0, P1 // k1
    blocks = b.reshape(n0, k0, n1, k1).transpose(0, 2, 1, 3).reshape(n0, n1, -1)  # (n0, n1, k0*k1)
    w0 = np.repeat(np.arange(k0) / k0, k1)  # bilinear weights inside a block
    w1 = np.tile(np.arange(k1) / k1, k0)
    out = np.zeros(blocks.shape, np.float32)
    for e0 in (0, 1):
        for e1 in (0, 1):
            mapped = np.take_along_axis(maps[e0:e0 + n0, e1:e1 + n1], blocks, -1)
            out += mapped * ((w0 if e0 else 1 - w0) * (w1 if e1 else 1 - w1)).astype(np.float32)
    out = out.astype(np.int64).reshape(n0, n1, k0, k1).transpose(0, 2, 1, 3).reshape(P0, P1)  # skimage truncates
    out = out[pads[0][0]:P0 - pads[0][1], pads[1][0]:P1 - pads[1][1]].astype(np.float32)
    return (out - out.min()) / max(out.max() - out.min(), 1e-12)


def _clip_hist(hist, clim):
    """Clip each row at clim and hand the excess back: evenly, then one count per under-limit bin with a stride."""
    total = hist.sum(-1, keepdims=True)
    hist = np.minimum(hist, clim)
    hist = np.minimum(hist + (total - hist.sum(-1, keepdims=True)) // hist.shape[-1], clim)
    for row, left in zip(hist, (total - hist.sum(-1, keepdims=True)).ravel()):  # residual, as skimage spreads it
        for start in range(row.size):
            under = row < clim
            if left <= 0 or not under.any():
                break
            step = max(1, int(under.sum()) // left)
            picked = np.flatnonzero(under[start::step]) * step + start
            row[picked] += 1
            left -= len(picked)
    return hist


def otsu_threshold(image, nbins=256):
    """Otsu with skimage.filters.threshold_otsu semantics for float images: the bin centre maximising the
    between-class variance."""
    x = np.asarray(image, np.float64).ravel()
    if x.min() == x.max():
        return float(x.min())
    counts, edges = np.histogram(x, bins=nbins, range=(x.min(), x.max()))
    centers = (edges[:-1] + edges[1:]) / 2
    w1, w2 = np.cumsum(counts), np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centers) / np.maximum(w1, 1)
    m2 = (np.cumsum((counts * centers)[::-1]) / np.maximum(w2[::-1], 1))[::-1]
    return float(centers[np.argmax(w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2)])


def tissue_mask(image):
    """Breast mask: Otsu, opening, largest connected component, holes filled (spec data.md 4.2 item 1)."""
    x = np.asarray(image, np.float32)
    m = ndimage.binary_opening(x > otsu_threshold(x), iterations=2)
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    return ndimage.binary_fill_holes(lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1)


# ----------------------------------------------------------------------------- synthetic phantoms as DICOM


# ----------------------------------------------------------------------------- pretraining stream


def volume_index(path, cache_dir):
    """index_volume + the tissue mask of the (canonically flipped) central slice; cached on disk (atomic npz)."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{INDEX_VERSION}".encode()).hexdigest()
    file = Path(cache_dir) / key[:2] / f"{key}.npz"
    if file.exists():
        with np.load(file) as z:
            return json.loads(str(z["meta"])), z["mask"]
    meta = dicom.parse_headers(path)
    mid = dicom.orient(meta)  # (H, W) displayed central slice; the breast outline barely changes with depth
    mid = mid[:, ::-1] if meta["flip"] else mid
    meta["mask_stride"] = max(1, math.ceil(max(mid.shape) / 256))  # a <= 256 px mask is plenty for crop decisions
    mask = tissue_mask(mid[::meta["mask_stride"], ::meta["mask_stride"]])
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = utils.tmp_name(file)
    with open(tmp, "wb") as fh:
        np.savez(fh, meta=json.dumps(meta), mask=mask)
    os.replace(tmp, file)
    return meta, mask


def remote_source(source, manifest=None, cache_bytes=50 * 2**30, credentials=None, ca_bundle=None, prefetch=2,
                  floor_bytes=2**30):
    """(manifest rows, pacs.Client, prefetch) for a dicomweb+http(s):// source: the manifest is the allow-list, the
    rotating cache lives under $DBT_DINO_CACHE/dicomweb. Credentials: DICOMWEB_* variables or the `credentials` file."""
    rows = dicom.scan(source, manifest)
    cache = pacs.Cache(utils.cache_base(), cache_bytes, floor_bytes)
    client = pacs.Client(source, rows, cache, pacs.load_credentials(credentials), ca_bundle)
    return rows, client, prefetch


class PretrainStream(torch.utils.data.IterableDataset):
    """Endless DINOv2 multi-crop samples, one random slice per draw, sharded by volume over (rank, worker).

    Items: global_crops (2, 3, G, G), local_crops (n_local, 3, L, L), global_tissue (2, G/p, G/p) per-patch tissue
    fraction, slice_index (2,) = [s, s'], volume (int), and adjacent (2, 3, G, G) when adjacent_k > 0."""

    def __init__(self, source, *, patch_size=14, global_size=112, local_size=56, n_local=8,
                 global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), tissue_aware=False, min_tissue_global=0.5,
                 min_tissue_local=0.3, adjacent_k=0, seed=0, cache_dir=None, slices_per_volume=4, shuffle_buffer=16,
                 dicomweb=None):
        self.client, self.prefetch = None, 0
        if pacs.is_dicomweb(source):  # self.paths: "study/series/instance" labels, for skips and logs
            self.rows, self.client, self.prefetch = remote_source(source, **(dicomweb or {}))
            self.paths = ["/".join(r[c] for c in pacs.UID_COLUMNS) for r in self.rows]
            # hits, misses, bytes fetched, samples drawn: one row per process (0 = main, w + 1 = loader worker w),
            # in shared memory so the main process can report its workers' figures
            self.fetch_stats = torch.zeros(257, 4, dtype=torch.float64).share_memory_()
            self._synced = torch.zeros(3, dtype=torch.float64)  # this process's counts already in its row
        else:
            self.paths = dicom.scan(source)
        self.patch_size, self.n_local = patch_size, n_local
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = global_scale, local_scale
        self.tissue_aware, self.adjacent_k = tissue_aware, adjacent_k
        self.min_tissue_global, self.min_tissue_local = min_tissue_global, min_tissue_local
        self.seed, self.slices_per_volume = seed, slices_per_volume
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = Path(cache_dir) if cache_dir else utils.cache_base() / "index"
        self.epoch = 0
        self.skipped, self._reported = {}, set()  # skipped: path -> reason, each logged once
        # stops at the first readable volume; a remote source tries its first 3 (each with all its retries)
        first = self.paths if self.client is None else range(min(3, len(self.paths)))
        if not any(self._probe(p) for p in first):
            reasons = "; ".join(list(self.skipped.values())[:3])
            raise ValueError(f"{pacs.redact(source)}: no readable DICOM among the first {len(first)} of "
                             f"{len(self.paths)} volumes. {reasons}")

    @property
    def n_skipped(self):
        return len(self.skipped)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _skip(self, path, reason):
        if path not in self.skipped:
            reason = str(reason) if str(path) in str(reason) else f"{path}: {reason}"  # a reason names its file
            self.skipped[path] = reason
            print(f"data: skipping {reason}", file=sys.stderr)

    def _unreported(self):
        """Skips this process has not yet passed on: they ride with the next item to the main process (SkipCounter),
        since loader workers are separate processes."""
        new = {p: r for p, r in self.skipped.items() if p not in self._reported}
        self._reported.update(new)
        return new

    def _index(self, path, label=None):
        try:
            return volume_index(path, self.cache_dir)
        except (ValueError, OSError) as e:
            self._skip(label or path, e)

    def _probe(self, p):
        """Is this volume readable: a local path, or a remote volume's index (fetched once, then unpinned)."""
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
        """Resident volumes are pinned, so the cache must hold all of them at once on this node (ranks x workers x
        (the one in use + the prefetched)), or the stream would wait on itself until CacheFull."""
        resident = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * workers * (self.prefetch + 1)
        need = resident * self.volume_bytes
        if need > self.client.cache.cap:
            raise ValueError(f"--cache-bytes {self.client.cache.cap} cannot hold the {resident} volumes resident at "
                             f"once on this node (ranks x loader workers x (1 + {self.prefetch} prefetched), about "
                             f"{self.volume_bytes / 2**20:.0f} MiB each): use at least {need / 2**20:.0f}M")

    def _resident(self, volumes, row):
        """(v, local path or None, pin) per volume, in order. A remote instance is fetched `prefetch` volumes
        ahead into the rotating cache and stays pinned (never evicted) until the caller retires it."""
        if self.client is None:
            yield from ((v, self.paths[v], None) for v in volumes)
            return
        todo = [v for v in volumes if self.paths[v] not in self.skipped]  # failed for good in this process
        for v, (_, path, pin) in zip(todo, self.client.prefetch([self.rows[v] for v in todo], self.prefetch)):
            if path is None:  # retried, then given up: pin is the FetchError, logged once with the UIDs
                self._skip(self.paths[v], pin)
                pin = None
            self._sync_fetch_stats(row)
            yield v, path, pin

    def _sync_fetch_stats(self, row, samples=0):
        """Add this process's fetch counts since the last call (and samples drawn) to its row of the shared table."""
        now = torch.tensor([self.client.stats[k] for k in ("hits", "misses", "bytes")], dtype=torch.float64)
        self.fetch_stats[row, :3] += now - self._synced
        self.fetch_stats[row, 3] += samples
        self._synced = now

    def cache_report(self):
        """Remote sources: cache hit rate, GB fetched and bytes fetched per sample drawn so far, over every worker
        and rank (a collective: all ranks call it at the same steps). {} for local data."""
        if self.client is None:
            return {}
        nccl = utils.rank_world()[1] > 1 and torch.distributed.get_backend() == "nccl"
        totals = utils.all_reduce(self.fetch_stats.sum(0).to("cuda" if nccl else "cpu")).tolist()
        hits, misses, fetched, samples = totals
        return dict(cache_hit=hits / max(hits + misses, 1), fetched_gb=fetched / 1e9,
                    bytes_per_sample=fetched / max(samples, 1))

    def shard(self, epoch, rank=0, world=1, worker=0, workers=1):
        """Volume indices for one (rank, worker): a strided slice of a (seed, epoch) permutation, wrapped so that
        all get as many."""
        n, total = len(self.paths), world * workers
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)  # identical on every rank: no communication
        g = rank * workers + worker
        return [int(perm[(g + j * total) % n]) for j in range(math.ceil(n / total))]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = utils.rank_world()
        epoch, buffer = self.epoch, []
        row = worker + 1 if info else 0  # this process's row of fetch_stats
        if self.client is not None:  # a new worker starts from the counts it inherited, already reported
            self._check_room(workers)
            self._synced = torch.tensor([self.client.stats[k] for k in ("hits", "misses", "bytes")],
                                        dtype=torch.float64)
        while True:
            rng = np.random.default_rng([self.seed, epoch, rank, worker])
            produced = 0
            for v, path, pin in self._resident(self.shard(epoch, rank, world, worker, workers), row):
                # bad local files fail again (logged once): history-free
                index = self._index(path, self.paths[v]) if path else None
                try:
                    for _ in range(self.slices_per_volume if index else 0):  # then the volume retires
                        try:
                            item = dict(self.sample(*index, rng), volume=v)
                        except ValueError as e:  # e.g. a corrupt frame deep inside an otherwise fine file
                            self._skip(self.paths[v], e)
                            break
                        produced += 1
                        buffer.append(item)  # mixes slices of consecutive volumes so a batch is not one breast
                        if self.client is not None:
                            self._sync_fetch_stats(row, samples=1)
                        if len(buffer) > self.shuffle_buffer:
                            item = buffer.pop(int(rng.integers(len(buffer))))
                            yield dict(item, skipped=self._unreported())  # skips so far travel with the next item
                finally:  # unpinned: the LRU may evict it now
                    if pin is not None:
                        self.client.cache.unpin(pin)
            # a shard of only unreadable volumes (likely when ranks x workers ~ volumes) moves on to the next
            # epoch's shard; only when every volume has failed here is there nothing left to read
            if not produced and all(p in self.skipped for p in self.paths):
                raise ValueError(f"rank {rank} worker {worker}: no readable volume ({self.n_skipped} files skipped)")
            epoch += 1

    def sample(self, meta, mask, rng):
        """One item from a random slice s of one volume (and s' = s +- delta for the adjacent-slice loss)."""
        S, stride = meta["n_frames"], meta["mask_stride"]
        s = int(rng.integers(S))
        img = self._slice(meta, s)  # (H, W)
        boxes = [self._box(rng, img.shape, self.global_scale, mask, stride, self.min_tissue_global) for _ in range(2)]
        flips = [bool(f) for f in rng.random(2) < 0.5]

        # DINOv2 as released: blur never on global 1, 0.9 on global 2 + solarize 0.2 (dinov2.md 1f)
        def global_views(x):
            return torch.stack([self._photo(self._crop(x, b, f, self.global_size), rng, *p)
                                for b, f, p in zip(boxes, flips, [(0.0, 0.0), (0.9, 0.2)])])  # (2, 3, G, G)

        out = {"global_crops": global_views(img)}
        local = []
        for _ in range(self.n_local):  # locals: blur 0.5, no solarize
            b = self._box(rng, img.shape, self.local_scale, mask, stride, self.min_tissue_local)
            local.append(self._photo(self._crop(img, b, rng.random() < 0.5, self.local_size), rng, 0.5, 0.0))
        out["local_crops"] = torch.stack(local)  # (n_local, 3, L, L)
        out["global_tissue"] = torch.stack([self._tissue_grid(mask, stride, b, f) for b, f in zip(boxes, flips)])
        s2 = s  # kept for a single-slice image (FFDM): collate marks it, and its adjacent-slice term is masked
        if self.adjacent_k > 0:
            # delta uniform over the offsets in +-1..+-k that stay inside the volume: s' != s whenever S > 1
            # (clamping s + delta to the volume gave s' = s, e.g. s = 0, delta = -2 in a 2-slice volume)
            inside = [d for d in range(-self.adjacent_k, self.adjacent_k + 1) if d and 0 <= s + d < S]
            s2 = s + inside[int(rng.integers(len(inside)))] if inside else s
            out["adjacent"] = global_views(self._slice(meta, s2))  # same geometry, own photometric augmentation
        out["slice_index"] = torch.tensor([s, s2])
        return out

    def _slice(self, meta, s):
        x = dicom.read_slices(meta, [s])[0]  # (H, W)
        return torch.from_numpy(np.ascontiguousarray(x[:, ::-1] if meta["flip"] else x))

    def _box(self, rng, shape, scale, mask, stride, min_tissue):
        """RandomResizedCrop geometry (top, left, h, w); tissue-aware: centred on tissue and >= min_tissue of it."""
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
            box = (int(np.clip(cy * stride - h // 2, 0, H - h)), int(np.clip(cx * stride - w // 2, 0, W - w)), h, w)
            if mask_crop(mask, stride, box).mean() >= min_tissue:
                return box
        if tissue is None:  # torchvision's fallback: the whole image cut to the 3/4-4/3 aspect range, centred
            h, w = min(H, round(W * 4 / 3)), min(W, round(H * 4 / 3))
            return (H - h) // 2, (W - w) // 2, h, w
        h = w = min(H, W, int(math.sqrt(H * W * scale[0])))
        ys, xs = np.nonzero(mask)  # fallback: the smallest crop centred on the tissue bounding box
        cy, cx = (ys.min() + ys.max()) * stride // 2, (xs.min() + xs.max()) * stride // 2
        return int(np.clip(cy - h // 2, 0, H - h)), int(np.clip(cx - w // 2, 0, W - w)), h, w

    def _crop(self, img, box, flip, size):
        t, l, h, w = box
        x = F.interpolate(img[None, None, t:t + h, l:l + w], size=(size, size), mode="bicubic",
                          align_corners=False, antialias=True)[0]  # (1, size, size)
        return (x.flip(-1) if flip else x).clamp(0, 1)

    def _tissue_grid(self, mask, stride, box, flip):
        m = torch.from_numpy(mask_crop(mask, stride, box)).float()
        grid = F.adaptive_avg_pool2d(m[None, None], self.global_size // self.patch_size)[0, 0]  # (G/p, G/p)
        return grid.flip(-1) if flip else grid

    def _photo(self, x, rng, blur_p, solarize_p):
        """Grey version of DINOv2's colour augmentation; returns (3, h, w) with the grey channel replicated."""
        if rng.random() < 0.8:  # ColorJitter(brightness .4, contrast .4): random order, clamped after each op;
            b, c = rng.uniform(0.6, 1.4, 2)  # its saturation and hue (and RandomGrayscale) do nothing on grey
            for op in rng.permutation(2):
                x = (x * b if op == 0 else (x - x.mean()) * c + x.mean()).clamp(0, 1)
        if rng.random() < blur_p:
            x = gaussian_blur(x, float(rng.uniform(0.1, 2.0)))
        if rng.random() < solarize_p:
            x = torch.where(x >= 0.5, 1 - x, x)
        return x.clamp(0, 1).expand(3, -1, -1)


def gaussian_blur(x, sigma, k=9):
    """torchvision's GaussianBlur(k) on (C, h, w) with reflect padding, as two 1-D passes: the kernel is an outer
    product, so this is the same filter at 2k instead of k^2 multiplies per pixel (blur was a third of a sample)."""
    r = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=x.dtype)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    g = g / g.sum()  # (k,)
    y = F.pad(x[:, None], (k // 2,) * 4, mode="reflect")  # (C, 1, h + k - 1, w + k - 1)
    y = F.conv2d(F.conv2d(y, g.view(1, 1, 1, k)), g.view(1, 1, k, 1))  # rows, then columns
    return y[:, 0]


def mask_crop(mask, stride, box):
    """The part of the strided tissue mask under a full-resolution box (top, left, h, w)."""
    t, l, h, w = box
    return mask[t // stride:-(-(t + h) // stride), l // stride:-(-(l + w) // stride)]


# ----------------------------------------------------------------------------- masking, collate, loader
class MaskingGenerator:
    """DINOv2/BEiT block masking on a (h, w) patch grid, drawn with python's `random` like the reference."""

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
                top, left = random.randint(0, self.height - h), random.randint(0, self.width - w)
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
    """Tissue-prioritised iBOT masks: per image, counts[i] patches without replacement, weight eps + p
    (Gumbel top-k)."""
    masks = torch.zeros(tissue.shape, dtype=torch.bool)  # (B, N)
    keys = (tissue + eps).log() - torch.log(-torch.log(torch.rand(tissue.shape).clamp_min(1e-20)))
    for i, k in enumerate(counts):
        if k > 0:
            masks[i, keys[i].topk(k).indices] = True
    return masks


def collate_pretrain(samples, *, patch_size=14, mask_probability=0.5, mask_ratio=(0.1, 0.5), tissue_masking=False):
    """Stack crop-major ([crop1 of all B; crop2 of all B]) and draw iBOT masks with DINOv2's ratio schedule."""
    def crop_major(key):
        return torch.stack([s[key][i] for i in range(len(samples[0][key])) for s in samples])

    out = {"skipped": {p: r for s in samples for p, r in s.get("skipped", {}).items()},  # path -> reason
           "global": crop_major("global_crops"),  # (2B, 3, G, G)
           "local": crop_major("local_crops"),  # (n_local*B, 3, L, L)
           "adjacent": crop_major("adjacent") if "adjacent" in samples[0] else None}  # (2B, 3, G, G)
    if out["adjacent"] is not None:  # (2B,) 0 where s' = s (a single-slice image): no neighbour, no adjacent term
        has_neighbour = [float(s["slice_index"][0] != s["slice_index"][1]) for s in samples]
        out["adjacent_valid"] = torch.tensor(has_neighbour).repeat(2)  # crop-major, like the crops
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
    else:  # each size drawn right before its blocks, so one seed gives the reference's masks exactly
        # max_num_patches as the reference's float chain computes it
        gen = MaskingGenerator((n, n), max_num_patches=0.5 * G // patch_size * G // patch_size)
        masks = [torch.from_numpy(gen(size(i)).ravel()) for i in range(n_masked)]
        masks += [torch.zeros(N, dtype=torch.bool)] * (2 * B - n_masked)
        random.shuffle(masks)
        masks = torch.stack(masks)  # (2B, N)
    per_image = masks.sum(-1, keepdim=True).clamp_min(1)
    out.update(masks=masks, mask_indices=masks.flatten().nonzero().flatten(),
               masks_weight=(1 / per_image).expand_as(masks)[masks].float(), n_masked=int(masks.sum()))
    return out


def _worker_init(_):
    seed = torch.initial_seed() % 2 ** 32  # differs per worker and follows the loader's seeded generator
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size, workers, collate_fn, seed):
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn,
                                       generator=generator, worker_init_fn=_worker_init, drop_last=True,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


class SkipCounter:
    """Unreadable volumes over the main process, its loader workers (their skips arrive in batch["skipped"]) and all
    ranks. update() gathers them (a collective: every rank calls it at the same steps); total, check and summary
    then read that one gathered view."""

    def __init__(self, stream):
        self.stream, self.local, self.skipped = stream, {}, {}

    def add(self, skipped):
        self.local.update(skipped)

    def update(self):
        """Gather path -> reason over all ranks; returns how many volumes proved unreadable so far."""
        merged = dict(self.stream.skipped, **self.local)  # the main process's own skips (it indexes at start)
        if utils.rank_world()[1] > 1:
            parts = [None] * utils.rank_world()[1]
            torch.distributed.all_gather_object(parts, merged)
            merged = {p: r for part in parts for p, r in part.items()}
        self.skipped = merged
        return len(merged)

    def summary(self, first=3):
        lines = [f"data: {len(self.skipped)} of {len(self.stream.paths)} volumes skipped as unreadable"]
        lines += [f"  {r}" for r in list(self.skipped.values())[:first]]
        return "\n".join(lines + (["  ..."] if len(self.skipped) > first else []))

    def check(self, max_fraction):
        """Stop (one ValueError on every rank) when more than max_fraction of the volumes proved unreadable."""
        n = len(self.stream.paths)
        if len(self.skipped) > max_fraction * n:
            raise ValueError(f"{len(self.skipped)} of {n} volumes are unreadable, more than --max-skip-fraction "
                             f"{max_fraction:g}; the first: {next(iter(self.skipped.values()))}")


def density_eval_set(root, size=112, max_exams=None):
    """Central slice of every view of the first `max_exams` exams in exams.csv, canonical orientation, resized
    -> images, density 0..3, patient groups."""
    root = Path(root)
    exams = utils.read_csv(root / "exams.csv")[:max_exams]
    images, labels = [], []
    groups, patients = [], {}  # patient index per image; patient id -> index
    for e in exams:
        for col in ("LCC", "RCC", "LMLO", "RMLO"):
            meta = dicom.parse_headers(root / e[col])  # one header parse per view
            x = dicom.orient(meta)  # (H, W) the displayed central slice, decoded once for the decision and the image
            x = np.ascontiguousarray(x[:, ::-1] if meta["flip"] else x)  # canonical: chest wall on the left
            x = F.interpolate(torch.from_numpy(x)[None, None], size=(size, size), mode="bilinear", antialias=True)[0]
            images.append(x[0].clamp(0, 1).expand(3, -1, -1))  # (3, size, size)
            labels.append("abcd".index(e["density"]))
            groups.append(patients.setdefault(e["patient"], len(patients)))
    return {"images": torch.stack(images), "labels": torch.tensor(labels), "groups": torch.tensor(groups)}


# ----- moved in (issue 20)
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
            meta = dicom.index_volume(path)  # headers + the volume's one orientation decision
            first = dicom.decode_slice(meta, 0)  # (H, W): gives the stored dtype
            stored = torch.empty((meta["n_frames"], *first.shape), dtype=torch.from_numpy(first[:0]).dtype)
            if torch.utils.data.get_worker_info() is not None:
                # decode straight into shared memory, so the hand-over to the main process moves a file descriptor
                # instead of copying the volume: 50 -> 63 slices/s with 1 worker, 71 -> 95 with 2 (60 x 2457 x 1996,
                # 2-core CPU, median of 4 alternated runs); the copy's cost is page faults on 590 MB of fresh memory
                stored.share_memory_()
            out = stored.numpy()  # (S, H, W), the same memory
            out[0] = first
            for s in range(1, meta["n_frames"]):
                out[s] = dicom.decode_slice(meta, s)
        except (ValueError, OSError) as e:
            return i, str(e)
        rows, sigmoid = dicom.voi_rows(meta)
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
