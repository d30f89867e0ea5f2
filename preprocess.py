"""Per-image preprocessing: CLAHE (MammoDINO's input standardisation), Otsu, the breast tissue mask.

clahe is scikit-image's equalize_adapthist, exactly (to one 14-bit grey level), at the speed of a
resize: the tile histograms are one bincount over tile-offset bins, a chunk of rows at a time that
stays in cache; clipping is vectorised over all tiles; the bilinear mapping is two gathers and a
lerp per chunk. otsu_threshold is skimage's threshold_otsu for float images, and tissue_mask our
rule (MammoDINO publishes none): Otsu, opening, the largest component, holes filled. data.py calls
tissue_mask once per volume (its index); the mammodino recipe equalises each slice read through
clahe_stored (data.read_clahe: the same numbers from the stored integers, without the displayed
slice).
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

import utils

_CLAHE_PIXELS = 2 ** 17  # per chunk of rows: its buffers (512 KB each) stay in L2 from op to op
_CLAHE_LANES = 4  # sub-histograms per tile, by column % 4: runs of one grey level (background)
#                   would otherwise serialise bincount's increments of a single counter


def clahe(image, clip_limit=0.01, kernel_size=None, nbins=256):
    """2D CLAHE with skimage.exposure.equalize_adapthist's semantics -> float32 numpy in [0, 1].

    As skimage does: floats in [-1, 1] become 16 bits (rint(65535 x) in x's float type, negatives
    0), then 14-bit grey levels (min-max, round half to even), binned by 1 + 16384 // nbins levels
    (a quirk: ~253 of 256 bins used); tiles of 1/8 of each side (kernel_size), their histograms
    taken from the image's corner on, reflect-padded past the far edges; clipped at clip_limit x
    tile pixels with the excess handed back as skimage's clip_histogram does; each pixel mapped
    bilinearly between its four nearest tiles' maps (edge maps repeated, weights from its place in
    the image shifted by half a tile), the sum truncated, the image min-max scaled to [0, 1].
    Integer images and floats outside [-1, 1] (skimage refuses those) are min-max scaled to [0, 1]
    first (as skimage does 8 and 16 bits). Differs from skimage by float32 rounding in the
    bilinear sum: <= 1 grey level (6e-5). Torch ops over row chunks that stay in cache, on one
    thread: ~50 ms for 2457 x 1996 (skimage: ~450 ms)."""
    with utils.one_thread():  # ops on cache-sized chunks: too small to share
        x, scale, u0, u1 = _clahe_input(image)
        if u1 <= u0:
            return np.zeros(x.shape, np.float32)
        ks, tiles = _tiling(x.shape, kernel_size)
        key, hist = _clahe_hists(x, scale, _clahe_lut(u0, u1, nbins), ks, tiles, nbins)
        return _clahe_finish(key, hist, ks, tiles, clip_limit, nbins)


def clahe_stored(stored, display, flip=False, clip_limit=0.01, nbins=256):
    """clahe(display(stored)[:, ::-1] if flip else display(stored)), bit for bit, without the
    displayed image: display maps stored integers to float32 in [0, 1] elementwise (data.py passes
    dicom.apply_voi), so it is applied once to a table of every stored value, and each pixel's
    histogram bin is one lookup of its stored value (16 bits at most). The slice's VOI pass and
    clahe's rescaling passes are skipped: decode + CLAHE of a full-size slice 24% faster."""
    x = np.asarray(stored)
    if x.ndim != 2 or x.dtype.kind not in "iu" or x.dtype.itemsize > 2:
        raise ValueError(f"clahe_stored: expected (H, W) integers of <= 16 bits, got {x.dtype} "
                         f"{x.shape}")
    with utils.one_thread():
        bits, signed = 8 * x.dtype.itemsize, x.dtype.kind == "i"
        code = np.arange(2 ** bits)  # (2^bits,) a pixel's bit pattern, read as unsigned
        value = code - (code >= 2 ** (bits - 1)) * 2 ** bits if signed else code  # (2^bits,)
        shown = torch.from_numpy(np.asarray(display(value.astype(x.dtype)), np.float32))
        levels = torch.mul(shown, 65535.0).round_().to(torch.int64)  # (2^bits,) clahe's levels
        lo, hi = (int(v) for v in np.asarray([x.min(), x.max()]).astype(np.int64))
        present = levels[torch.from_numpy(code[(value >= lo) & (value <= hi)])]
        u0, u1 = float(present.min()), float(present.max())
        if u1 <= u0:
            return np.zeros(x.shape, np.float32)
        ks, tiles = _tiling(x.shape)
        lut = _clahe_lut(u0, u1, nbins)[levels]  # (2^bits,) stored bit pattern -> bin
        view = x.view(np.uint16 if bits == 16 else np.uint8)
        key, hist = _clahe_hists(view[:, ::-1] if flip else view, None, lut, ks, tiles, nbins)
        return _clahe_finish(key, hist, ks, tiles, clip_limit, nbins)


def squares(x, size, equalise=False):
    """Displayed slices (k, H, W) float32 numpy -> (k, 1, size, size) tensor: each through clahe
    when `equalise`, then stretched to a square by antialiased bilinear resizing (aspect not
    kept, as DBT-DINO feeds slices). detect.py's slices, probe.py's fine-tuning views, the quick
    probe's."""
    x = np.stack([clahe(s) for s in x]) if equalise else x  # (k, H, W)
    return F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)


def _tiling(shape, kernel_size=None):
    """-> (tile sides: kernel_size, by default 1/8 of each side; histogram tiles per side, the
    last one reaching into the reflect padding)."""
    ks = ([max(s // 8, 1) for s in shape] if kernel_size is None
          else [int(k) for k in np.broadcast_to(kernel_size, 2)])
    return ks, [-(-s // k) for s, k in zip(shape, ks)]


def _clahe_finish(key, hist, ks, tiles, clip_limit, nbins):
    """Tile histograms -> clipped maps -> each pixel mapped: clahe's second half."""
    kpix = ks[0] * ks[1]
    clim = int(max(clip_limit * kpix, 1)) if clip_limit > 0 else kpix
    maps = np.cumsum(_clip_hist(hist.reshape(-1, nbins), clim), -1).astype(np.float64)
    maps *= 16383 / kpix  # skimage's map_histogram, rounding included
    maps = np.minimum(maps, 16383).astype(np.int64).reshape(*tiles, nbins)
    return _clahe_map(key, maps, ks)


def _clahe_input(image):
    """image (H, W) -> (float32 tensor t, scale, u0, u1): rint(t * scale) are skimage's 16-bit grey
    levels (img_as_uint), u0..u1 their range. float32 stays as given; other images are turned
    into their levels here (exact integers in float32)."""
    x = np.asarray(image)
    if x.dtype == np.float32:
        t = torch.from_numpy(np.require(x, requirements=["C", "W"]))
        lo, hi = (float(v) for v in torch.aminmax(t))
        if -1 <= lo and hi <= 1:
            # float32 products, as img_as_uint computes them for float32 images
            u0, u1 = (max(float(np.rint(np.float32(v) * np.float32(65535))), 0) for v in (lo, hi))
            return (t.clamp(min=0) if lo < 0 else t), 65535.0, u0, u1
    floats, x = x.dtype.kind == "f", x.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if not floats or lo < -1 or hi > 1:
        x = (x - lo) / max(hi - lo, 1e-300)  # outside skimage's float domain: to [0, 1]
    levels = np.maximum(np.rint(x * 65535), 0).astype(np.float32)  # (H, W)
    return torch.from_numpy(levels), 1.0, float(levels.min()), float(levels.max())


def _clahe_lut(u0, u1, nbins):
    """(65536,) int32 tensor: 16-bit grey level -> histogram bin, in skimage's float64 steps."""
    u = np.arange(2 ** 16, dtype=np.float64)
    q = np.round((np.clip(u, u0, u1) - u0) / (u1 - u0) * 16383.0)  # rescale_intensity
    return torch.from_numpy(q.astype(np.int32) // (1 + 16384 // nbins))


def _clahe_cols(width, k1, tiles1, nbins):
    """(width,) what a pixel's key adds to its bin: its tile column's and lane's offsets. int16
    where the keys fit: less memory traffic, faster bincount."""
    c = torch.arange(width)
    offsets = c // k1 * nbins + c % _CLAHE_LANES * (tiles1 * nbins)
    return offsets.to(torch.int16 if _CLAHE_LANES * tiles1 * nbins <= 2 ** 15 else torch.int32)


def _chunks(n, rows, band, shift):
    """(r0, r1): chunks of <= rows rows covering 0..n, none across a multiple of band (counted
    from -shift), so that a chunk lies in one tile row."""
    r0 = 0
    while r0 < n:
        r1 = min(r0 + rows, n, ((r0 + shift) // band + 1) * band - shift)
        yield r0, r1
        r0 = r1


def _clahe_hists(x, scale, lut, ks, tiles, nbins):
    """Bin every pixel -> (key (H, W) tensor: bin + _clahe_cols, tile histograms (h0, h1, nbins)
    int64 numpy of the reflect-padded image), a chunk of rows at a time. x: a float32 tensor whose
    rint(x * scale) index lut, or (scale None) a numpy array of unsigned integers that do."""
    (S0, S1), (k0, k1) = x.shape, ks
    cols = _clahe_cols(S1, k1, tiles[1], nbins)
    lut = lut.to(cols.dtype)
    key = torch.from_numpy(np.empty((S0, S1), cols.numpy().dtype))  # numpy: huge pages, few faults
    rows = max(1, _CLAHE_PIXELS // S1)
    levels = torch.empty(rows, S1)  # chunk buffers
    levels_int = torch.empty(rows, S1, dtype=torch.int32)
    n = _CLAHE_LANES * tiles[1] * nbins  # a tile row's histograms: lanes x tiles x bins
    hist = torch.zeros(tiles[0], n, dtype=torch.int64)
    for r0, r1 in _chunks(S0, rows, k0, 0):
        m = r1 - r0
        if scale is None:  # stored integers (a mirrored view, maybe): one cast, no rounding
            np.copyto(levels_int[:m].numpy(), x[r0:r1], casting="unsafe")
        else:
            torch.mul(x[r0:r1], scale, out=levels[:m]).round_()  # half to even, as np.rint
            levels_int[:m].copy_(levels[:m])
        chunk = key[r0:r1]
        torch.index_select(lut, 0, levels_int[:m].view(-1), out=chunk.view(-1))
        chunk.add_(cols)
        hist[r0 // k0] += torch.bincount(chunk.view(-1), minlength=n)
    hist = hist.view(tiles[0], _CLAHE_LANES, tiles[1], nbins).sum(1)
    _add_reflected(hist, key, ks, nbins)
    return key, hist.numpy()


def _reflected(n, pad):
    """Where numpy's reflect padding of pad past index n - 1 reads from: None, a slice (order does
    not matter to a histogram) or, for pads as long as the image, an index tensor."""
    if pad == 0:
        return None
    if pad < n:
        return slice(n - 1 - pad, n - 1)
    return torch.from_numpy(np.pad(np.arange(n), (0, pad), mode="reflect")[n:])


def _add_reflected(hist, key, ks, nbins):
    """Count into the last tile row and column (hist (h0, h1, nbins)) the reflect padding that
    skimage's tiles take in past the far edges of the image."""
    (S0, S1), (k0, k1), (h0, h1, _) = key.shape, ks, hist.shape
    rows, cols = _reflected(S0, h0 * k0 - S0), _reflected(S1, h1 * k1 - S1)

    def count(block):  # (lanes x tiles, nbins): a block's bins by its columns' lane and tile
        counts = torch.bincount(block.reshape(-1), minlength=_CLAHE_LANES * h1 * nbins)
        return counts.view(-1, nbins)

    if rows is not None:  # under the last tile row, each column in its own tile
        hist[-1] += count(key[rows]).view(_CLAHE_LANES, h1, nbins).sum(0)
    if cols is not None:  # right of the last tile column
        right = key[:, cols]
        for i in range(h0):
            hist[i, -1] += count(right[i * k0:(i + 1) * k0]).sum(0)
        if rows is not None:
            hist[-1, -1] += count(right[rows]).sum(0)


def _clahe_map(key, maps, ks):
    """Each pixel's bin through its four nearest tiles' maps (maps (h0, h1, nbins)), bilinearly,
    -> float32 numpy (H, W): truncated, then min-max scaled to [0, 1]. Per chunk of rows, the
    maps interpolated between two tile rows are a table L (rows, tile columns x bins) that two
    gathers read, for the tile columns left and right of each pixel."""
    (S0, S1), (k0, k1), (h0, h1, nbins) = key.shape, ks, maps.shape
    mp = np.pad(maps, ((1, 1), (1, 1), (0, 0)), mode="edge").reshape(h0 + 2, -1)
    mp = torch.from_numpy(mp.astype(np.float32))  # (h0 + 2, X): edge maps repeated
    step = mp.diff(dim=0)  # (h0 + 1, X) to the next tile row
    r, c = torch.arange(S0) + k0 // 2, torch.arange(S1) + k1 // 2  # in skimage's padded image
    w0, w1 = (r % k0).float() / k0, (c % k1).float() / k1  # bilinear weights (S0,), (S1,)
    X, rows = mp.shape[1], max(1, _CLAHE_PIXELS // S1)
    to_l = c // k1 * nbins - _clahe_cols(S1, k1, h1, nbins) + X * torch.arange(rows)[:, None]
    to_l = to_l.to(torch.int32)  # (rows, S1) key -> index into L (flattened), left tile column
    table = torch.empty(rows, X)
    idx = torch.empty(rows, S1, dtype=torch.int32)
    left, right = torch.empty(rows, S1), torch.empty(rows, S1)
    out = torch.from_numpy(np.empty((S0, S1), np.float32))
    ranges = []
    for r0, r1 in _chunks(S0, rows, k0, k0 // 2):
        m, n = r1 - r0, int(r[r0]) // k0
        torch.addr(mp[n], w0[r0:r1], step[n], out=table[:m])  # exact where two maps agree
        i = idx[:m].copy_(key[r0:r1]).add_(to_l[:m]).view(-1)
        torch.index_select(table.view(-1), 0, i, out=left[:m].view(-1))
        torch.index_select(table.view(-1)[nbins:], 0, i, out=right[:m].view(-1))
        chunk = torch.lerp(left[:m], right[:m], w1, out=out[r0:r1]).trunc_()  # skimage truncates
        ranges.append(torch.stack(torch.aminmax(chunk)))
    lo, hi = torch.stack(ranges).unbind(1)
    lo, hi = float(lo.min()), float(hi.max())
    return out.sub_(lo).div_(max(hi - lo, 1e-12)).numpy()


def _clip_hist(hist, clim):
    """Clip each row of hist (tiles, nbins) at clim and hand the excess back as skimage's
    clip_histogram does, all rows at once: evenly (bins within 2 x that of clim filled up), then
    the rest one count at a time, at a stride, to under-limit bins from bin `start` on."""
    total = hist.sum(-1)
    hist = np.minimum(hist, clim)
    incr = ((total - hist.sum(-1)) // hist.shape[-1])[:, None]
    hist = np.where(hist < clim - 2 * incr, hist + incr, clim)
    left = total - hist.sum(-1)  # (tiles,) excess still to hand back
    pos = np.arange(hist.shape[-1])
    rows = np.flatnonzero(left > 0)
    start = 0
    while rows.size:
        under = hist[rows] < clim  # (rows, nbins)
        some = under.any(-1)  # rows with no bin under the limit are done, as in skimage
        rows, under = rows[some], under[some]
        stride = np.maximum(1, under.sum(-1) // left[rows])
        hit = under & ((pos - start) % stride[:, None] == 0) & (pos >= start)
        hist[rows] += hit
        left[rows] -= hit.sum(-1)
        rows = rows[left[rows] > 0]
        start = (start + 1) % hist.shape[-1]  # skimage's `for index in range(hist.size)`, again
    return hist


def otsu_threshold(image, nbins=256):
    """Otsu with skimage.filters.threshold_otsu semantics for float images: the bin centre
    maximising the between-class variance."""
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
    """Breast mask of a slice: Otsu, opening, largest connected component, holes filled (our rule:
    MammoDINO, Methodology, "Breast tissue-aware augmentation", publishes none)."""
    x = np.asarray(image, np.float32)
    m = ndimage.binary_opening(x > otsu_threshold(x), iterations=2)
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    return ndimage.binary_fill_holes(lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1)
