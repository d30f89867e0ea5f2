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
import argparse, csv, hashlib, io, json, math, os, random, shutil, sys, uuid
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import UID, generate_uid
from scipy import ndimage
from scipy.special import erfc

import pacs

BTO = "1.2.840.10008.5.1.4.1.1.13.1.3"
# transfer syntaxes pydicom + Pillow decode alone (spec data.md 1.5); the rest need the named package (else gdcm)
DECODABLE = {"1.2.840.10008.1.2" + s for s in ("", ".1", ".1.99", ".2", ".5", ".4.50", ".4.90", ".4.91")}
OPTIONAL_DECODER = {f"1.2.840.10008.1.2.4.{n}": pkg for pkg, ns in [("pylibjpeg-libjpeg", (51, 57, 70)),
                    ("pyjpegls", (80, 81)), ("pylibjpeg-openjpeg", (201, 202, 203))] for n in ns}
VIEW_CODES = {"399162004": "CC", "R-10242": "CC", "399368009": "MLO", "R-10226": "MLO", "R-102D2": "MLO",
              "399260004": "ML", "R-10224": "ML", "399352003": "LM", "R-10228": "LM", "399192003": "XCCL"}
DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".ima"}
SEED_MAX = 2**31 - 1  # --seed flags: numpy's legacy seeding takes 32 bits, and seeds are offset by rank and step
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
def setup_distributed():
    """torchrun env -> process group; otherwise a single process. Returns (rank, local_rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, local_rank, world, torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def rank_world():
    """(rank, world size) of this process: the one place the stream, the losses and the logs ask."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main():
    return rank_world()[0] == 0


def all_reduce(x):
    """Sum a tensor over ranks in place (a no-op in a single process); returns it."""
    if rank_world()[1] > 1:
        torch.distributed.all_reduce(x)
    return x


def log(msg):
    """Print on rank 0 only, flushed (progress lines under torchrun are not repeated per rank)."""
    if is_main():
        print(msg, flush=True)


def number(kind, lo=None, hi=None, lo_open=False):
    """argparse type: `kind` (int or float) within [lo, hi] (lo excluded when lo_open); argparse names the flag.
    number(int, 1) is a positive count, number(float, 0, lo_open=True) a positive rate, number(float, 0, 1) a
    fraction."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        low_bad = lo is not None and (x <= lo if lo_open else x < lo)
        if low_bad or (hi is not None and x > hi) or (kind is float and not math.isfinite(x)):
            rng = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {rng}")
        return x
    parse.__name__ = kind.__name__  # argparse shows "invalid int value" style names
    return parse


def byte_size(text):
    """argparse type: a byte count, with an optional K/M/G/T suffix (powers of 2), at least 1 MiB."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number_part, unit = text.upper().rstrip("IB"), ""
    if number_part[-1:] in units:
        number_part, unit = number_part[:-1], number_part[-1]
    try:
        n = int(float(number_part) * units[unit])
    except (ValueError, OverflowError):  # OverflowError: inf, 1e400
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 50G or 500M") from None
    if n < 2**20:
        raise argparse.ArgumentTypeError(f"{text} is below 1M")
    return n


def one_line_errors(parser):
    """A bad flag prints one line naming it (not argparse's whole usage block) and exits with 2."""
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    return parser


def add_dicomweb_flags(p, manifest_help):
    """The flags of a DICOMweb --data source, shared by pretrain.py and probe.py."""
    p.add_argument("--manifest", default="", help=manifest_help + " (credentials: DICOMWEB_TOKEN, or "
                   "DICOMWEB_USER + DICOMWEB_PASSWORD, or --dicomweb-credentials)")
    p.add_argument("--dicomweb-credentials", default="", help="file (mode 600, outside the repo) of DICOMWEB_TOKEN= "
                   "or DICOMWEB_USER= and DICOMWEB_PASSWORD= lines; instead of the environment")
    p.add_argument("--dicomweb-ca-bundle", default="", help="PEM file of CAs to trust for https, besides the system's")
    p.add_argument("--cache-bytes", type=byte_size, default="50G",
                   help="cap of the rotating DICOMweb cache under $DBT_DINO_CACHE (suffixes K, M, G, T: powers of 2)")


def seed_everything(seed, rank=0):
    # + rank so that ranks draw different augmentations (spec style.md 2.6)
    seed = seed + rank
    if seed >= 2**32:  # numpy takes 32 bits: pretrain's seed + 65536 x step passes them after 65,536 steps
        seed = int(np.random.SeedSequence(seed).generate_state(1)[0])  # hashed, not wrapped onto step 0's seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- DICOM reading
def _first(v):
    return v[0] if isinstance(v, (MultiValue, list, tuple)) else v


def _fg(ds, i, macro, key):
    """Top level, then Shared FG, then Per-frame FG item i: the most specific value wins (pydicom looks only at
    the top level)."""
    value = ds.get(key)
    for seq, j in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", i)):
        groups = ds.get(seq) or []
        items = groups[j].get(macro) if len(groups) > j else None
        if items and key in items[0]:
            value = items[0].get(key)
    return value


def _header(path):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # InvalidDicomError, truncated headers, empty files
        raise ValueError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None


def _frame_voi(ds, i):
    """(slope, intercept, center, width, function) of frame i; center None when there is no window."""
    slope, icpt = (_fg(ds, i, "PixelValueTransformationSequence", k) for k in ("RescaleSlope", "RescaleIntercept"))
    c, w, fn = (_fg(ds, i, "FrameVOILUTSequence", k) for k in ("WindowCenter", "WindowWidth", "VOILUTFunction"))
    c, w = (float(_first(c)), float(_first(w))) if c is not None and w is not None else (None, None)
    return [float(1 if slope is None else slope), float(icpt or 0), c, w, str(_first(fn or "LINEAR")).upper()]


def _parse_headers(path):
    """Parse the header(s) once: everything needed to read and display any slice, as a JSON-able dict."""
    path = Path(path)
    if path.is_dir():  # legacy layout: one file per slice, one series
        heads = [(p, _header(p)) for p in sorted(path.iterdir()) if _dicom_name(p)]
        if not heads:
            raise ValueError(f"{path}: empty folder")
        problem = _not_one_series([h for _, h in heads])
        if problem:
            raise ValueError(f"{path}: {problem}; a folder is one volume only when it holds one series' slices")
        heads.sort(key=lambda ph: (float(ph[1].ImagePositionPatient[2]), int(ph[1].get("InstanceNumber") or 0)))
        ds = heads[0][1]
        frames = [[str(p), None] for p, _ in heads]
        voi = [_frame_voi(h, 0) for _, h in heads]
    else:
        ds = _header(path)
        n = int(ds.get("NumberOfFrames") or 1)
        frames = [[str(path), i if "NumberOfFrames" in ds else None] for i in range(n)]
        voi = [_frame_voi(ds, i) for i in range(n)]
    ts = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    if "Rows" not in ds or "BitsAllocated" not in ds:  # e.g. structured reports, presentation states
        raise ValueError(f"{path}: no image in this DICOM (SOP class {ds.get('SOPClassUID', '?')})")
    if ts not in DECODABLE:
        raise ValueError(f"{path}: transfer syntax {UID(ts).name} ({ts}) cannot be decoded with pydicom + Pillow; "
                         f"install {OPTIONAL_DECODER.get(ts, 'gdcm')}")
    if ds.get("SamplesPerPixel", 1) != 1:
        raise ValueError(f"{path}: colour image ({ds.get('PhotometricInterpretation')}), expected greyscale")
    view = ds.get("ViewCodeSequence")
    view = VIEW_CODES.get(str(view[0].get("CodeValue"))) if view else None
    lat = _fg(ds, 0, "FrameAnatomySequence", "FrameLaterality") or ds.get("ImageLaterality") or ds.get("Laterality")
    spacing = _fg(ds, 0, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing")
    return dict(path=str(path), frames=frames, voi=voi, n_frames=len(frames), rows=int(ds.Rows),
                cols=int(ds.Columns), bits_stored=int(ds.get("BitsStored") or ds.BitsAllocated),
                signed=int(ds.get("PixelRepresentation") or 0),
                invert=(ds.get("PhotometricInterpretation") == "MONOCHROME1"
                        or ds.get("PresentationLUTShape") == "INVERSE"),
                laterality=str(lat) if lat else None,
                view=view or (str(ds.ViewPosition) if ds.get("ViewPosition") else None),
                pixel_spacing=[float(v) for v in spacing] if spacing else None,
                sop_class=str(ds.get("SOPClassUID")), transfer_syntax=ts,
                # multi-frame objects keep their stored order (BCS-DBT Slice indices refer to it);
                # legacy files sort by z
                slice_order="stored" if not path.is_dir() else "z")


def apply_voi(x, slope, icpt, c, w, fn, bits_stored=16, signed=0):
    """Rescale then VOI to [0, 1] (PS3.3 C.11.2.1 with y_min=0, y_max=1); no window -> nominal stored range."""
    x = x.astype(np.float32)  # float32 and in place: one 2457x1996 slice costs ~20 MB, not 5x that
    x *= slope
    x += icpt
    if c is None:
        lo = -(2 ** (bits_stored - 1)) if signed else 0
        lo, hi = sorted((lo * slope + icpt, (lo + 2 ** bits_stored - 1) * slope + icpt))
        c, w = (lo + hi) / 2, max(hi - lo, 1e-12)
        fn = "LINEAR_EXACT"
    if fn == "SIGMOID":
        x -= c
        x *= -4 / w
        np.exp(x, out=x)
        x += 1
        return np.reciprocal(x, out=x)
    if fn != "LINEAR_EXACT":
        c, w = c - 0.5, w - 1
    x -= c
    x /= max(w, 1e-12)
    x += 0.5
    return np.clip(x, 0, 1, out=x)


def decode_slice(meta, s):
    """Stored pixels of output slice s, decoded alone: a path source lets pydicom seek to one frame (spec 1.6)."""
    file, index = meta["frames"][s]
    try:
        stored = pixel_array(file, index=index)
    except Exception as e:
        raise ValueError(f"{file}: cannot decode frame {s} ({UID(meta['transfer_syntax']).name}): "
                         f"{type(e).__name__}: {e}") from None
    if stored.shape != (meta["rows"], meta["cols"]):
        raise ValueError(f"{file}: frame {s} has shape {stored.shape}, header says {(meta['rows'], meta['cols'])}")
    return stored


def _display(meta, stored, s):
    """Stored -> displayed float32 (H, W) in [0, 1]: rescale and VOI of slice s, then the MONOCHROME1 inversion."""
    out = apply_voi(stored, *meta["voi"][s], meta["bits_stored"], meta["signed"])
    if meta["invert"]:  # MONOCHROME1 is inverted after VOI
        np.subtract(1, out, out=out)
    return out


def read_slices(meta, frames):
    """Decode only `frames` (output slice indices) and display them: float32 (len(frames), H, W) in [0, 1]."""
    out = np.empty((len(frames), meta["rows"], meta["cols"]), np.float32)  # (S, H, W)
    for k, s in enumerate(frames):
        out[k] = _display(meta, decode_slice(meta, s), s)
    return out


def edge_side(image):
    """Official BCS-DBT guess of where the chest wall is: 'R' when the last column sums higher than the first."""
    return "R" if image[:, 0].sum() < image[:, -1].sum() else "L"


def _orient(meta):
    """The one orientation decision of a volume, made from its central slice and recorded in the index, so every
    reader (read_dbt, the pretraining stream, the probes) applies the same one to every slice:
      side  the official BCS-DBT edge-sum guess of the chest-wall side: on stored pixels, before any window clips
            them, as the official reader sums its MONOCHROME2 data (on displayed pixels for MONOCHROME1, where
            stored sums point the other way). read_dbt(view=...) rotates 180 deg when it disagrees with the view.
      flip  our canonical mirror: True when the displayed chest wall is on the right, so it ends on the left.
    (The official reader decides from the frame it reads; the breast outline barely changes with depth.)
    Returns the displayed central slice (H, W), for the tissue mask."""
    s = meta["n_frames"] // 2
    stored = decode_slice(meta, s)
    shown = _display(meta, stored, s)
    meta["side"] = edge_side(shown if meta["invert"] else stored)
    meta["flip"] = edge_side(shown) == "R"
    return shown


def index_volume(path):
    """Headers parsed once, plus the volume's orientation decision (`side`, `flip`): a JSON-able dict."""
    meta = _parse_headers(path)
    _orient(meta)
    return meta


def read_dbt(path, frames=None, view=None, meta=None):
    """Read a DBT volume (or only `frames`) -> (float32 (S, H, W) in [0, 1], meta).

    view (e.g. "lcc"): the official BCS-DBT orientation, a 180 deg rotation when the volume's `side` disagrees with
    view[0]. view None: canonical orientation, mirrored so the chest wall is on the left. `meta` from
    index_volume(path) (or the cached volume_index) saves parsing the headers again."""
    meta = dict(meta) if meta is not None else index_volume(path)
    frames = list(range(meta["n_frames"])) if frames is None else [int(f) for f in frames]
    if any(not 0 <= f < meta["n_frames"] for f in frames):
        raise ValueError(f"{path}: frames {frames} out of range 0..{meta['n_frames'] - 1}")
    vol = read_slices(meta, frames)
    if view is not None:
        meta["rotated"] = meta["side"] != view[0].upper()
        vol = vol[:, ::-1, ::-1] if meta["rotated"] else vol
    else:
        meta["mirrored"] = meta["flip"]
        vol = vol[:, :, ::-1] if meta["mirrored"] else vol
    return np.ascontiguousarray(vol), meta


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
def make_phantom(shape=(24, 256, 192), glandular=0.25, mlo=False, lesions=(), beta=3.0, seed=0):
    """Synthetic DBT volume (S, H, W) in [0, 1], chest wall on the left (spec data.md 6.1).

    lesions: classes ("cancer" -> spiculation-free mass, "benign" -> calcification cluster, "benign mass" -> a mass
    whose box Class is "benign").
    Returns (volume, boxes) with boxes [dict(Class, Slice, X, Y, Width, Height)] in pixel units."""
    rng = np.random.default_rng(seed)
    S, H, W = shape
    z = np.linspace(-1, 1, S)[:, None, None] if S > 1 else np.zeros((1, 1, 1))
    y, x = np.linspace(0, 1, H)[None, :, None], np.linspace(0, 1, W)[None, None, :]
    shrink = np.sqrt(1 - 0.3 * z ** 2)  # compressed breasts are thinner at the top and bottom slices
    a = rng.uniform(0.5, 0.7) * shrink  # half-axes (S, 1, 1), drawn in this order: a, b, then the centre y0
    b = rng.uniform(0.3, 0.4) * shrink
    y0 = rng.uniform(0.45, 0.55)
    r = np.sqrt((x / a) ** 2 + ((y - y0) / b) ** 2)  # (S, H, W) 1 on the skin line
    breast = r <= 1
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    f2 = sum(np.meshgrid(*[f.astype(np.float32) ** 2 for f in freqs], indexing="ij", sparse=True))
    amp = np.where(f2 > 0, f2, np.inf) ** (-beta / 4)  # |f|^(-beta/2): power spectrum 1/f^beta
    noise = np.fft.irfftn(np.fft.rfftn(rng.standard_normal(shape, np.float32)) * amp, shape, axes=(0, 1, 2))
    noise = noise / noise.std() + 2 * np.clip(1 - r, 0, 1) ** 0.5  # glands sit behind the nipple, not at the skin
    t = np.quantile(noise[breast], 1 - glandular)
    vol = 0.3 + 0.2 / (1 + np.exp(-(noise - t) / 0.15))  # fat 0.3, gland 0.5
    vol = ndimage.gaussian_filter1d(vol, 1.5, axis=0)  # poor out-of-plane resolution of DBT
    vol[breast & (r > 1 - 3 / (a * W))] *= 1.15  # skin rim
    if mlo:  # pectoral muscle: bright triangle in the upper chest-wall corner with a convex edge
        pw, ph = rng.uniform(0.1, 0.25), rng.uniform(0.2, 0.35)
        u = x / pw + y / ph
        vol[breast & (u <= 1 + 0.15 * np.sin(np.pi * np.clip(x / pw, 0, 1)))] = 0.65
    boxes, scale = [], H / 256
    Z, Y, X = np.ogrid[:S, :H, :W]
    central = np.abs(z) <= max(0.5, np.abs(z).min())  # central slices (the middle one of a very thin volume)
    inner = np.argwhere(breast & (r < 0.6) & central)  # lesion centres: central slices, not the skin
    for cls in lesions:
        cz, cy, cx = inner[rng.integers(len(inner))]
        if cls in ("cancer", "benign mass"):  # ellipsoid mass with a smooth (erfc) margin
            rr, rz = rng.uniform(6, 14) * scale, rng.uniform(2, 4)
            d = np.sqrt(((X - cx) / rr) ** 2 + ((Y - cy) / rr) ** 2 + ((Z - cz) / rz) ** 2)
            vol += 0.12 * 0.5 * erfc((d - 1) * 3)
            x0, y0_ = cx - rr, cy - rr  # top-left and bottom-right corners
            x1, y1 = cx + rr, cy + rr
        else:  # calcification cluster: bright specks, each sharp in only 1-2 slices
            n = rng.integers(5, 16)
            sy, sx = (np.clip(rng.normal([cy, cx], 6 * scale, (n, 2)), 0, [H - 1, W - 1])).astype(int).T
            for dz in (0, 1):
                vol[np.clip(cz + dz, 0, S - 1), sy, sx] += 0.4 * (1 - 0.5 * dz)
            x0, y0_ = sx.min() - 2, sy.min() - 2
            x1, y1 = sx.max() + 3, sy.max() + 3
        x0, y0_ = max(int(x0), 0), max(int(y0_), 0)
        boxes.append(dict(Class=cls.split()[0], Slice=int(cz), X=x0, Y=y0_, Width=int(min(x1, W) - x0),
                          Height=int(min(y1, H) - y0_)))
    vol = vol + rng.standard_normal(shape) * 0.01 * np.sqrt(np.clip(vol, 0, None))  # quantum noise ~ sqrt(signal)
    return np.where(breast, np.clip(vol, 0, 1), 0).astype(np.float32), boxes


def quantize(volume, bits_stored=10, monochrome1=False):
    """[0, 1] display values -> stored uint16; MONOCHROME1 stores the minimum as white."""
    stored = np.round(np.clip(volume, 0, 1) * (2 ** bits_stored - 1)).astype(np.uint16)
    return (2 ** bits_stored - 1) - stored if monochrome1 else stored


def write_bto(path, stored, laterality="L", view="CC", encoding="native", voi_function="LINEAR",
              monochrome1=False, bits_stored=10, patient_id="SYN-P00000", study_uid=None, spacing=0.1):
    """Write stored uint16 (S, H, W) as a Breast Tomosynthesis Image (BTO) file with functional groups, atomically.

    encoding: native (Explicit VR LE), rle (pydicom's encoder) or j2k (lossless, Pillow/OpenJPEG)."""
    S, H, W = stored.shape
    top = 2 ** bits_stored
    c, w = {"SIGMOID": (0.4 * top, 0.5 * top)}.get(voi_function, (top / 2, top))  # LINEAR*: identity on stored range
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = {"j2k": "1.2.840.10008.1.2.4.90"}.get(encoding, "1.2.840.10008.1.2.1")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BTO
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = patient_id, "MG"
    ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    ds.PatientOrientation = {"LCC": "A\\R", "RCC": "P\\L", "LMLO": "A\\FR", "RMLO": "P\\FL"}[laterality + view]
    code = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}[view]
    ds.ViewCodeSequence = [_item(CodeValue=code[0], CodingSchemeDesignator="SCT", CodeMeaning=code[1])]
    ds.Rows, ds.Columns = H, W
    ds.NumberOfFrames, ds.SamplesPerPixel = S, 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored = 16, bits_stored
    ds.HighBit, ds.PixelRepresentation = bits_stored - 1, 0
    ds.SharedFunctionalGroupsSequence = [_item(  # pydicom's own VOI helpers never look in here: read_dbt must
        PixelMeasuresSequence=[_item(PixelSpacing=[spacing, spacing], SliceThickness=1.0)],
        FrameVOILUTSequence=[_item(WindowCenter=c, WindowWidth=w, VOILUTFunction=voi_function)],
        PixelValueTransformationSequence=[_item(RescaleSlope=1, RescaleIntercept=0, RescaleType="US")],
        FrameAnatomySequence=[_item(FrameLaterality=laterality)])]
    ds.PerFrameFunctionalGroupsSequence = [_item(  # 1 mm slices
        PlanePositionSequence=[_item(ImagePositionPatient=[0.0, 0.0, float(i)])],
        FrameContentSequence=[_item(InStackPositionNumber=i + 1, DimensionIndexValues=[1, i + 1])]) for i in range(S)]
    if encoding == "j2k":
        frames = []
        for f in stored:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)
            frames.append(buf.getvalue())
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.ascontiguousarray(stored, "<u2").tobytes()
        ds["PixelData"].VR = "OW"
        if encoding == "rle":
            ds.compress("1.2.840.10008.1.2.5", encoding_plugin="pydicom")
    tmp = _tmp(path)
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def _item(**attrs):
    item = Dataset()
    item.update(attrs)
    return item


def write_phantom_dicom(path, shape=(60, 2457, 1996), encoding="native", seed=0, **kw):
    """A phantom BTO file of any size (for tests and bench.py); anatomy is drawn at <= 512 px then upsampled."""
    f = max(1, math.ceil(max(shape[1:]) / 512))
    small, _ = make_phantom((shape[0], math.ceil(shape[1] / f), math.ceil(shape[2] / f)), seed=seed)
    iy, ix = np.arange(shape[1]) // f, np.arange(shape[2]) // f
    stored = np.empty(shape, np.uint16)  # (S, H, W)
    for s in range(shape[0]):
        stored[s] = quantize(small[s][iy][:, ix], kw.get("bits_stored", 10), kw.get("monochrome1", False))
    write_bto(path, stored, encoding=encoding, **kw)
    return Path(path)


def write_archive(root, patients=8, seed=0, shape=(24, 256, 192), lesion_rate=0.0):
    """A small BCS-DBT-like archive: 4 BTO views per exam, BCS-DBT CSVs, exams.csv for density/risk probes.

    lesion_rate: the mean number of extra lesions per view (Poisson), for detection archives, enriched with lesions
    as BCS-DBT's validation and test sets are. They are masses, as BCS-DBT's boxes are (masses and architectural
    distortions), Class benign or cancer at even odds. They are in boxes.csv and labels.csv only: exams.csv's cancer
    outcomes (the risk probe's) do not know them."""
    root, rng = Path(root), np.random.default_rng(seed)
    enrich = np.random.default_rng([seed, 1])  # its own stream: lesion_rate 0 leaves every other draw as it was
    paths, labels = [], []  # rows of file-paths.csv, labels.csv,
    boxes, exams = [], []  # boxes.csv and exams.csv
    # cycle encodings and display conventions so every exam exercises the whole reading path
    # (mostly compressed: native views cost 2.4 MB each at the default size)
    variants = [("native", "LINEAR", False), ("j2k", "SIGMOID", False), ("j2k", "LINEAR", True),
                ("rle", "LINEAR_EXACT", False), ("j2k", "LINEAR", False), ("rle", "SIGMOID", True),
                ("j2k", "LINEAR_EXACT", False), ("rle", "LINEAR", False)] + [("j2k", "LINEAR", False)] * 8
    for p in range(patients):
        pid = f"SYN-P{p:05d}"
        study = generate_uid(entropy_srcs=[str(seed), pid])
        density = int(rng.choice(4, p=[0.1, 0.4, 0.4, 0.1]))  # BI-RADS a-d prevalence
        risk = rng.normal()  # latent risk, visible only through texture (beta), so the probe has to learn it
        hazard = 0.03 * math.exp(0.5 * density + 0.8 * risk)
        onset, followup = rng.exponential(1 / hazard), rng.uniform(2, 8)
        side = "LR"[rng.integers(2)]
        exam = dict(patient=pid, exam=study)
        for k, view in enumerate(("LCC", "RCC", "LMLO", "RMLO")):
            cancer = ["cancer"] if onset < 1 and view[0] == side else []
            lesions = cancer + (["benign"] if rng.random() < 0.15 else [])
            lesions += [("cancer", "benign mass")[int(c)] for c in enrich.integers(2, size=enrich.poisson(lesion_rate))]
            g = [0.1, 0.25, 0.5, 0.75][density] * rng.uniform(0.8, 1.25)
            vol, bxs = make_phantom(shape, g, view.endswith("MLO"), lesions, beta=3 + 0.3 * risk,
                                    seed=int(rng.integers(2 ** 31)))
            if view[0] == "R":  # right breasts are displayed with the chest wall on the right
                vol = vol[:, :, ::-1]
                for b in bxs:
                    b["X"] = shape[2] - b["X"] - b["Width"]
            encoding, voi, mono1 = variants[(4 * p + k) % len(variants)]
            rel = f"Breast-Cancer-Screening-DBT/{pid}/{study}/{view.lower()}/1-1.dcm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_bto(root / rel, quantize(vol, 10, mono1), view[0], view[1:], encoding, voi, mono1,
                      patient_id=pid, study_uid=study, spacing=0.1 * 2457 / shape[1])
            key = dict(PatientID=pid, StudyUID=study, View=view.lower())
            paths.append(dict(key, descriptive_path=rel, classic_path=rel))
            cls = {b["Class"] for b in bxs}
            labels.append(dict(key, Normal=int(not cls), Actionable=0, Benign=int(cls == {"benign"}),
                               Cancer=int("cancer" in cls)))
            boxes += [dict(key, Subject=pid, **b, AD=0, VolumeSlices=shape[0]) for b in bxs]
            exam[view] = rel
        event = onset < followup
        exams.append(dict(exam, density="abcd"[density], years_to_cancer=round(onset, 3) if event else "",
                          years_of_followup=round(min(onset, followup), 3)))
    box_fields = "PatientID StudyUID View Subject Slice X Y Width Height Class AD VolumeSlices".split()
    for name, rows, fields in [("file-paths", paths, None), ("labels", labels, None), ("boxes", boxes, box_fields),
                               ("exams", exams, None)]:
        with open(root / f"{name}.csv", "w", newline="") as fh:  # boxes.csv needs its header even when empty
            w = csv.DictWriter(fh, fieldnames=fields or list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def read_csv(path):
    """The rows (dicts) of a CSV file, read as utf-8-sig: a spreadsheet's CSV starts with a byte-order mark. A
    binary file or a cell over csv's field size limit is one ValueError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh))
    except (csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from None


def cache_base():
    return Path(os.environ.get("DBT_DINO_CACHE", "cache"))


def synthetic_archive(root=None, patients=8, seed=0, shape=(24, 256, 192), lesion_rate=0.0):
    """Create once (build in a tmp dir, then os.replace) and return the synthetic archive folder. Its default name
    holds every argument, so other shape or lesion flags never get an archive built with different ones."""
    shape_name = "x".join(map(str, shape)) + (f"-l{lesion_rate:g}" if lesion_rate else "")
    root = Path(root) if root else cache_base() / f"synthetic-p{patients}-s{seed}-{shape_name}"
    if (root / "exams.csv").exists():
        return root
    tmp = Path(_tmp(root))
    shutil.rmtree(tmp, ignore_errors=True)
    write_archive(tmp, patients, seed, shape, lesion_rate)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race (or root is a non-empty folder): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "exams.csv").exists():
            raise ValueError(f"{root}: exists and is not a synthetic archive") from None
    return root


# ----------------------------------------------------------------------------- pretraining stream
def scan(source, manifest=None):
    """Volume paths from a folder (recursive) or a CSV manifest with a `path` column; for a DICOMweb source the
    manifest's rows (each names one instance by its UIDs; the manifest is the allow-list)."""
    if pacs.is_dicomweb(source):
        if not manifest:
            raise ValueError(f"{pacs.redact(source)}: a DICOMweb source needs --manifest (the studies it may fetch)")
        return pacs.read_manifest(manifest)
    if not str(source).strip():  # e.g. an unset shell variable: never fall back to the current folder
        raise ValueError("--data is empty; give a folder, a .csv manifest or `synthetic`")
    source = Path(source)
    if source.suffix.lower() == ".csv":
        rows = read_csv(source)
        if not rows or "path" not in rows[0]:
            raise ValueError(f"{source}: manifest needs a `path` column and at least one row")
        return [str(source.parent / r["path"]) for r in rows]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if _dicom_name(p))
        folders = {}
        for p in files:
            folders.setdefault(p.parent, []).append(p)
        return sorted(v for d, fs in folders.items() for v in ([str(d)] if _legacy_series(fs) else map(str, fs)))
    raise ValueError(f"{source}: not a folder or a .csv manifest")


def _dicom_name(p):
    """Files worth opening as DICOM: *.dcm, *.dicom, *.ima, no suffix, or named by their UID as storescp and PACS
    exports do ('1.2.840...9465': the 'suffix' is digits); no hidden files, no .txt/.csv/.png beside the slices."""
    suffix = p.suffix.lower()
    return p.is_file() and not p.name.startswith(".") and (suffix in DICOM_SUFFIXES or suffix[1:].isdigit())


def _tmp(path):
    """A temporary name no other process writes, even on another node sharing the cache (pids repeat)."""
    return f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _legacy_series(files):
    """True when a folder's files are the single-frame slices of one series at distinct z (spec 1.2's legacy
    layout), so the folder is one volume. Only folders of 3+ files pay for reading headers."""
    if len(files) < 3:
        return False
    heads = []
    for f in files:
        try:
            heads.append(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=[
                "NumberOfFrames", "SeriesInstanceUID", "ImagePositionPatient", "Rows", "Columns"]))
        except Exception:  # one bad slice must not split the series into 1-slice volumes: the folder stays one
            pass           # volume, which the stream then skips once, naming the bad file
    return len(heads) >= 2 and _not_one_series(heads) is None


def _not_one_series(heads):
    """Why these headers are not the single-frame slices of one series at distinct z, or None when they are.
    Without ImagePositionPatient they are 2-D images (MG, DX: separate views and breasts), never slices."""
    if any(int(h.get("NumberOfFrames") or 1) != 1 for h in heads):
        return "multi-frame files in one folder"
    n_series = len({str(h.get("SeriesInstanceUID")) for h in heads})
    if n_series > 1:
        return f"{n_series} series in one folder; pass one series folder"
    if any(h.get("ImagePositionPatient") is None for h in heads):
        return "files without ImagePositionPatient (2-D images, not slices)"
    if len({float(h.ImagePositionPatient[2]) for h in heads}) != len(heads):
        return "two files at the same z"
    if len({(h.get("Rows"), h.get("Columns")) for h in heads}) != 1:
        return "slices of different sizes"
    return None


def volume_index(path, cache_dir):
    """index_volume + the tissue mask of the (canonically flipped) central slice; cached on disk (atomic npz)."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{INDEX_VERSION}".encode()).hexdigest()
    file = Path(cache_dir) / key[:2] / f"{key}.npz"
    if file.exists():
        with np.load(file) as z:
            return json.loads(str(z["meta"])), z["mask"]
    meta = _parse_headers(path)
    mid = _orient(meta)  # (H, W) displayed central slice; the breast outline barely changes with depth
    mid = mid[:, ::-1] if meta["flip"] else mid
    meta["mask_stride"] = max(1, math.ceil(max(mid.shape) / 256))  # a <= 256 px mask is plenty for crop decisions
    mask = tissue_mask(mid[::meta["mask_stride"], ::meta["mask_stride"]])
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(file)
    with open(tmp, "wb") as fh:
        np.savez(fh, meta=json.dumps(meta), mask=mask)
    os.replace(tmp, file)
    return meta, mask


def remote_source(source, manifest=None, cache_bytes=50 * 2**30, credentials=None, ca_bundle=None, prefetch=2,
                  floor_bytes=2**30):
    """(manifest rows, pacs.Client, prefetch) for a dicomweb+http(s):// source: the manifest is the allow-list, the
    rotating cache lives under $DBT_DINO_CACHE/dicomweb. Credentials: DICOMWEB_* variables or the `credentials` file."""
    rows = scan(source, manifest)
    cache = pacs.Cache(cache_base(), cache_bytes, floor_bytes)
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
            self.paths = scan(source)
        self.patch_size, self.n_local = patch_size, n_local
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = global_scale, local_scale
        self.tissue_aware, self.adjacent_k = tissue_aware, adjacent_k
        self.min_tissue_global, self.min_tissue_local = min_tissue_global, min_tissue_local
        self.seed, self.slices_per_volume = seed, slices_per_volume
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = Path(cache_dir) if cache_dir else cache_base() / "index"
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
        nccl = rank_world()[1] > 1 and torch.distributed.get_backend() == "nccl"
        totals = all_reduce(self.fetch_stats.sum(0).to("cuda" if nccl else "cpu")).tolist()
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
        rank, world = rank_world()
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
        x = read_slices(meta, [s])[0]  # (H, W)
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
        if rank_world()[1] > 1:
            parts = [None] * rank_world()[1]
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
    exams = read_csv(root / "exams.csv")[:max_exams]
    images, labels = [], []
    groups, patients = [], {}  # patient index per image; patient id -> index
    for e in exams:
        for col in ("LCC", "RCC", "LMLO", "RMLO"):
            meta = _parse_headers(root / e[col])  # one header parse per view
            x = _orient(meta)  # (H, W) the displayed central slice, decoded once for the decision and the image
            x = np.ascontiguousarray(x[:, ::-1] if meta["flip"] else x)  # canonical: chest wall on the left
            x = F.interpolate(torch.from_numpy(x)[None, None], size=(size, size), mode="bilinear", antialias=True)[0]
            images.append(x[0].clamp(0, 1).expand(3, -1, -1))  # (3, size, size)
            labels.append("abcd".index(e["density"]))
            groups.append(patients.setdefault(e["patient"], len(patients)))
    return {"images": torch.stack(images), "labels": torch.tensor(labels), "groups": torch.tensor(groups)}


# ----------------------------------------------------------------------------- CLI
def get_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = one_line_errors(argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=fmt))
    p.add_argument("command", nargs="?", default="synth", choices=["synth"], help="synth: write a phantom DBT archive")
    p.add_argument("--out", default=str(cache_base() / "synthetic"),
                   help="output folder: new, empty, or an archive this command wrote (then it is reused)")
    p.add_argument("--patients", type=number(int, 1, 100000), default=8, help="patients (one exam of four views)")
    p.add_argument("--seed", type=number(int, 0, SEED_MAX), default=0, help="random seed")
    p.add_argument("--slices", type=number(int, 1, 1000), default=24, help="slices per volume")
    p.add_argument("--height", type=number(int, 16, 8192), default=256, help="rows per slice")
    p.add_argument("--width", type=number(int, 16, 8192), default=192, help="columns per slice")
    p.add_argument("--lesion-rate", type=number(float, 0, 10), default=0.0,
                   help="mean extra masses per view, for detection archives (BCS-DBT's sets are enriched)")
    return p.parse_args(argv)


def synth_command(args):
    """`data.py synth`: write an archive, or reuse the one already there and say how large it really is."""
    out = Path(args.out)
    if (out / "exams.csv").exists():
        rows = read_csv(out / "exams.csv")
        if not rows or "LCC" not in rows[0]:
            raise ValueError(f"{out / 'exams.csv'}: no exams; remove the folder to rewrite it")
        head = _header(out / rows[0]["LCC"])  # every volume has one shape
        has = (len(rows), int(head.get("NumberOfFrames") or 1), int(head.Rows), int(head.Columns))
        want = (args.patients, args.slices, args.height, args.width)
        asked = "" if has == want else ("; {} patients of {}x{}x{} were asked for: remove the folder to rewrite "
                                        "it").format(*want)
        return "reused {}: {} volumes of {} patients, {}x{}x{}{}".format(out, 4 * has[0], *has, asked)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an archive written by data.py synth; choose another --out")
    root = synthetic_archive(out, args.patients, args.seed, (args.slices, args.height, args.width), args.lesion_rate)
    return f"wrote {root}: {4 * args.patients} volumes of {args.patients} patients"


if __name__ == "__main__":
    try:
        print(synth_command(get_args()))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
