"""dicom: TODO docstring."""

from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.uid import UID

import pacs
import utils


BTO = "1.2.840.10008.5.1.4.1.1.13.1.3"


# transfer syntaxes pydicom + Pillow decode alone (spec data.md 1.5); the rest need the named package (else gdcm)
DECODABLE = {"1.2.840.10008.1.2" + s for s in ("", ".1", ".1.99", ".2", ".5", ".4.50", ".4.90", ".4.91")}


OPTIONAL_DECODER = {f"1.2.840.10008.1.2.4.{n}": pkg for pkg, ns in [("pylibjpeg-libjpeg", (51, 57, 70)),
                    ("pyjpegls", (80, 81)), ("pylibjpeg-openjpeg", (201, 202, 203))] for n in ns}


VIEW_CODES = {"399162004": "CC", "R-10242": "CC", "399368009": "MLO", "R-10226": "MLO", "R-102D2": "MLO",
              "399260004": "ML", "R-10224": "ML", "399352003": "LM", "R-10228": "LM", "399192003": "XCCL"}


DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".ima"}


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


def read_header(path):
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


def parse_headers(path):
    """Parse the header(s) once: everything needed to read and display any slice, as a JSON-able dict."""
    path = Path(path)
    if path.is_dir():  # legacy layout: one file per slice, one series
        heads = [(p, read_header(p)) for p in sorted(path.iterdir()) if _dicom_name(p)]
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
        ds = read_header(path)
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


def orient(meta):
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
    meta = parse_headers(path)
    orient(meta)
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
        rows = utils.read_csv(source)
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
