"""Read DBT and mammography DICOM as displayed float32 slices in [0, 1], one frame at a time.

Read: Breast Tomosynthesis Image (BTO) objects, one multi-frame file per volume in stored slice
order (BCS-DBT's box `Slice` uses it), per-frame values from the Shared and Per-frame Functional
Groups (pydicom's VOI helpers never look there); legacy series folders (one file per slice, sorted
by z); 2-D images (MG, DX, CR) as one-slice volumes. DECODABLE transfer syntaxes need only pydicom +
Pillow (native, deflated, RLE, JPEG baseline, JPEG 2000); errors name the package for the others.

Display (PS3.3 C.11.2.1 with output y in [0, 1]): rescale x = slope * stored + intercept, then
  LINEAR         c' = c - 0.5, w' = w - 1, y = clip((x - c') / w' + 0.5, 0, 1)
  LINEAR_EXACT   the same with c' = c, w' = w
  SIGMOID        y = 1 / (1 + exp(-4 (x - c) / w)), not clipped.
No window: the nominal stored range (BitsStored, signedness, rescaled) maps LINEAR_EXACT to [0, 1].
MONOCHROME1 (or Presentation LUT Shape INVERSE) shows the minimum as white: y -> 1 - y after VOI.
_voi_row folds these conventions into four numbers once; `display` applies them to torch tensors on
any device (probe.py's GPU path), apply_voi to numpy arrays (the CPU reader), operation by operation.

Reduced resolution (decode_slice(reduce=r), read_reduced): a JPEG 2000 frame can decode r wavelet
levels down (OpenJPEG's reduce through Pillow; that frame's bytes only): (ceil(H / f), ceil(W / f))
stored values, f = 2**r, with pydicom's integer mapping. Pixel (i, j) is the LL band: a low-pass of
the full frame (DC gain 1) sampled at full-resolution pixel (f i, f j), not at the f x f block's
centre (f i + (f - 1) / 2); it approximates the mean over the f x f square centred on (f i, f j),
clipped to the image, and may overshoot the stored range at sharp edges (negative filter taps).
Other transfer syntaxes, or more levels than the codestream has, decode in full with f = 1.

Orientation, once per volume from its central slice (orient): `side` by the official BCS-DBT rule
(duke-dbt-data: the chest wall is on the edge whose column sums higher; read_dbt(view=...) rotates
180 deg when the view disagrees), `flip` by our mirror (view=None: every chest wall ends left).
"""

import io
import struct
import sys
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import UID

import pacs
import utils

BTO = "1.2.840.10008.5.1.4.1.1.13.1.3"

# transfer syntaxes pydicom + Pillow decode alone; the rest need the named package (else gdcm)
DECODABLE = {"1.2.840.10008.1.2" + s
             for s in ("", ".1", ".1.99", ".2", ".5", ".4.50", ".4.90", ".4.91")}

# uncompressed pixel data and its byte order: decode_slice reads such a frame's bytes itself
NATIVE = {"1.2.840.10008.1.2": "<", "1.2.840.10008.1.2.1": "<", "1.2.840.10008.1.2.2": ">"}

# JPEG 2000 (lossless, lossy): decode_slice(reduce=r) decodes these at 1 / 2**r resolution
J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}

OPTIONAL_DECODER = {f"1.2.840.10008.1.2.4.{n}": pkg for pkg, ns in [
    ("pylibjpeg-libjpeg", (51, 57, 70)), ("pyjpegls", (80, 81)),
    ("pylibjpeg-openjpeg", (201, 202, 203))] for n in ns}

# ViewCodeSequence code values: SNOMED CT, and the older SNOMED RT ones
VIEW_CODES = {"399162004": "CC", "R-10242": "CC", "399368009": "MLO", "R-10226": "MLO",
              "R-102D2": "MLO", "399260004": "ML", "R-10224": "ML", "399352003": "LM",
              "R-10228": "LM", "399192003": "XCCL"}

DICOM_SUFFIXES = {"", ".dcm", ".dicom", ".ima"}


def _first(v):
    return v[0] if isinstance(v, (MultiValue, list, tuple)) else v


def _fg(ds, i, macro, key):
    """Top level, then Shared, then Per-frame FG item i: the most specific wins (unlike pydicom)."""
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
    """[slope, intercept, center, width, function] of frame i; center None without a window."""
    rescale = "PixelValueTransformationSequence"
    slope, icpt = (_fg(ds, i, rescale, k) for k in ("RescaleSlope", "RescaleIntercept"))
    keys = ("WindowCenter", "WindowWidth", "VOILUTFunction")
    c, w, fn = (_fg(ds, i, "FrameVOILUTSequence", k) for k in keys)
    c, w = (float(_first(c)), float(_first(w))) if c is not None and w is not None else (None, None)
    fn = str(_first(fn or "LINEAR")).upper()
    return [float(1 if slope is None else slope), float(icpt or 0), c, w, fn]


def parse_headers(path):
    """Parse the header(s) once: all that reading and displaying any slice needs, JSON-able."""
    path = Path(path)
    if path.is_dir():  # legacy layout: one file per slice, one series
        heads = [(p, read_header(p)) for p in sorted(path.iterdir()) if _dicom_name(p)]
        if not heads:
            raise ValueError(f"{path}: empty folder")
        problem = _not_one_series([h for _, h in heads])
        if problem:
            raise ValueError(f"{path}: {problem}; a folder is one volume only when it holds one "
                             "series' slices")
        heads.sort(key=lambda ph: (float(ph[1].ImagePositionPatient[2]),
                                   int(ph[1].get("InstanceNumber") or 0)))
        ds = heads[0][1]
        frames = [[str(p), None] for p, _ in heads]
        voi = [_frame_voi(h, 0) for _, h in heads]
    else:
        ds = read_header(path)
        n = int(ds.get("NumberOfFrames") or 1)
        frames = [[str(path), i if "NumberOfFrames" in ds else None] for i in range(n)]
        voi = [_frame_voi(ds, i) for i in range(n)]
    ts = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    if "Rows" not in ds or "BitsAllocated" not in ds:  # structured reports, presentation states
        raise ValueError(f"{path}: no image in this DICOM (SOP class {ds.get('SOPClassUID', '?')})")
    if ts not in DECODABLE:
        raise ValueError(f"{path}: transfer syntax {UID(ts).name} ({ts}) cannot be decoded with "
                         f"pydicom + Pillow; install {OPTIONAL_DECODER.get(ts, 'gdcm')}")
    if ds.get("SamplesPerPixel", 1) != 1:
        raise ValueError(f"{path}: colour image ({ds.get('PhotometricInterpretation')}), "
                         "expected greyscale")
    view = ds.get("ViewCodeSequence")
    view = VIEW_CODES.get(str(view[0].get("CodeValue"))) if view else None
    lat = _fg(ds, 0, "FrameAnatomySequence", "FrameLaterality")
    lat = lat or ds.get("ImageLaterality") or ds.get("Laterality")
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
                slice_order="stored" if not path.is_dir() else "z",
                bits_allocated=int(ds.BitsAllocated), native=_native_offsets(ts, frames, ds))


def _native_offsets(ts, frames, ds):
    """File offset of each frame of an uncompressed greyscale volume of 8 (little endian) or 16
    bits, or None (pydicom decodes the others): per file, its header read again with the Pixel
    Data value deferred (its start and length, none of it read), plus a frame's bytes per index."""
    bits = int(ds.BitsAllocated)
    if ts not in NATIVE or bits not in (8, 16) or (bits == 8 and NATIVE[ts] == ">"):
        return None  # (8-bit big endian: pydicom swaps the bytes of each 16-bit word)
    size, starts, offsets = int(ds.Rows) * int(ds.Columns) * bits // 8, {}, []
    for file, index in frames:
        if file not in starts:
            try:
                pixels = pydicom.dcmread(file, defer_size=1024).get_item(0x7FE00010,
                                                                        keep_deferred=True)
            except Exception:  # pydicom's decode says what is wrong, as for any other file
                return None
            start = getattr(pixels, "value_tell", None)  # None: not deferred, or no Pixel Data
            starts[file] = None if start is None or pixels.length == 0xFFFFFFFF else (
                start, pixels.length)
        if starts[file] is None or starts[file][1] < ((index or 0) + 1) * size:
            return None
        offsets.append(starts[file][0] + (index or 0) * size)
    return offsets


def stored_dtype(meta):
    """The numpy dtype (native byte order) of an uncompressed volume's stored integers."""
    return np.dtype(f"{'i' if meta['signed'] else 'u'}{meta['bits_allocated'] // 8}")


def unused_bits_set(values, meta):
    """Do any of `values` (stored integers as read) hold bits above BitsStored: values a signed
    or unsigned BitsStored-bit integer cannot take? One pass (two for signed data)."""
    if meta["bits_stored"] >= meta["bits_allocated"]:
        return False
    hi = 1 << (meta["bits_stored"] - meta["signed"])  # past the largest value it can hold
    return bool(values.max() >= hi or (meta["signed"] and values.min() < -hi))


def _pixel_data_at(fh, start, ts):
    """Is the Pixel Data tag right before `start` in the open file (its element header: 12 bytes
    with explicit VR, 8 implicit)? False once a file was rewritten since it was indexed."""
    head = 8 if ts == "1.2.840.10008.1.2" else 12
    fh.seek(start - head)
    tag = fh.read(4)
    return tag == (b"\x7f\xe0\x00\x10" if NATIVE[ts] == ">" else b"\xe0\x7f\x10\x00")


def _voi_row(slope, icpt, c, w, fn, bits_stored, signed):
    """One slice's display parameters with the VOI conventions folded in, as `display` takes them:
    ([slope, intercept, center, width], True for SIGMOID)."""
    if c is None:  # no window: the nominal stored range, rescaled, LINEAR_EXACT
        lo = -(2 ** (bits_stored - 1)) if signed else 0
        lo, hi = sorted((lo * slope + icpt, (lo + 2 ** bits_stored - 1) * slope + icpt))
        c, w = (lo + hi) / 2, max(hi - lo, 1e-12)
        fn = "LINEAR_EXACT"
    if fn not in ("SIGMOID", "LINEAR_EXACT"):  # LINEAR: c' = c - 0.5, w' = w - 1
        c, w = c - 0.5, w - 1
    return [slope, icpt, c, w if fn == "SIGMOID" else max(w, 1e-12)], fn == "SIGMOID"


def voi_rows(meta):
    """Every slice's display parameters: float32 (S, 4) rows of [slope, intercept, center, width]
    and (S,) bool, True for a SIGMOID window."""
    rows, sigmoid = zip(*(_voi_row(*v, meta["bits_stored"], meta["signed"]) for v in meta["voi"]))
    return torch.tensor(rows, dtype=torch.float32), torch.tensor(sigmoid)


def display(stored, rows, sigmoid, invert):
    """The display transform on a device: stored (S, H, W) integers -> float32 (S, H, W) in [0, 1]:
    rescale, VOI (voi_rows' parameters), inversion, in place on one float32 copy. The CPU reader's
    apply_voi is the same arithmetic in numpy (tests/test_probe.py holds them to 1e-5)."""
    slope, icpt, c, w = rows.T[..., None, None]  # each (S, 1, 1)
    x = stored.float().mul_(slope).add_(icpt)  # (S, H, W) rescaled
    if sigmoid.all():  # SIGMOID windows only: no second buffer
        x.sub_(c).mul_(4).div_(w).sigmoid_()
    else:  # LINEAR, or a mix: the SIGMOID slices come from a second buffer
        sig = x.sub(c).mul_(4).div_(w).sigmoid_() if sigmoid.any() else None  # (S, H, W)
        x.sub_(c).div_(w).add_(0.5).clamp_(0, 1)
        if sig is not None:
            torch.where(sigmoid[:, None, None], sig, x, out=x)
    return x.neg_().add_(1) if invert else x  # -x + 1 is exactly 1 - x


def apply_voi(x, slope, icpt, c, w, fn, bits_stored=16, signed=0, invert=False, out=None):
    """`display` of one numpy array of any shape, on the CPU -> float32 numpy in [0, 1]: rescale,
    VOI (c None: no window, the nominal stored range), then the inversion when `invert`.
    numpy rather than torch because numpy's float32 exp is what every cached run was read with
    (torch's differs in the last bit); float32 and in place: a 2457x1996 slice costs ~20 MB
    (written into `out`, a float32 array of x's shape, when given). Bit for bit the same
    operations as always, but the cast is fused into the first one, and a slope of 1 and an
    intercept of 0 are skipped (x * 1 and x + 0 are x exactly): 6.5 -> 4.8 ms a full-size LINEAR
    slice on one core. (Blocks of rows that stay in the cache gain nothing: each pass is bound by
    arithmetic, not memory.)"""
    (slope, icpt, c, w), sigmoid = _voi_row(slope, icpt, c, w, fn, bits_stored, signed)
    x = np.asarray(x)
    out = np.empty(x.shape, np.float32) if out is None else out
    ops = [(np.multiply, slope)] if slope != 1 else []
    ops += [(np.add, icpt)] if icpt != 0 else []
    ops += [(np.subtract, c)]
    first, value = ops[0]
    first(x, value, out=out, dtype=np.float32, casting="unsafe")  # the cast and the first op
    for op, value in ops[1:]:
        op(out, value, out=out)
    if sigmoid:  # 1 / (1 + exp(-4 (x - c) / w))
        out *= -4 / w
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
    else:
        out /= w
        out += 0.5
        np.clip(out, 0, 1, out=out)
    if invert:  # MONOCHROME1 is inverted after VOI
        np.subtract(1, out, out=out)
    return out


def decode_slice(meta, s, reduce=0, out=None):
    """Output slice s -> (stored (h, w) in native byte order, factor). reduce=0: the full frame
    (factor 1), uncompressed ones read here (_read_native), the others decoded by pydicom; into
    `out` when given. reduce=r > 0: a JPEG 2000 frame decodes r wavelet levels down, h = ceil(H /
    2**r), factor = 2**r (_j2k_reduced; a 2457 x 1996 phantom frame: 160, 60, 20 ms at r = 0, 1,
    2 on one core, medians); any other frame, or one that cannot be reduced by r, decodes in full
    with factor 1."""
    if reduce < 0:
        raise ValueError(f"reduce must be >= 0, got {reduce}")
    if reduce and meta["transfer_syntax"] in J2K:
        stored = _j2k_reduced(meta, s, reduce)
        if stored is not None:
            return stored, 2 ** reduce
    return _decode_full(meta, s, out), 1


def _decode_full(meta, s, out=None):
    """Stored (H, W) of output slice s, native byte order (into `out` when given): uncompressed
    frames read here (_read_native), the others decoded by pydicom, one frame each."""
    stored = _read_native(meta, s, out) if meta.get("native") else None
    if stored is not None:
        return stored
    file, index = meta["frames"][s]
    try:
        stored = pixel_array(file, index=index)
    except Exception as e:
        raise ValueError(f"{file}: cannot decode frame {s} ({UID(meta['transfer_syntax']).name}): "
                         f"{type(e).__name__}: {e}") from None
    if stored.shape != (meta["rows"], meta["cols"]):
        raise ValueError(f"{file}: frame {s} has shape {stored.shape}, "
                         f"header says {(meta['rows'], meta['cols'])}")
    stored = stored.astype(stored.dtype.newbyteorder("="), copy=False)  # big-endian TS: for torch
    if out is None:
        return stored
    out[...] = stored
    return out


def _read_native(meta, s, out=None):
    """An uncompressed frame's bytes read straight into (H, W) integers, as pydicom.pixels gives
    them: byte-swapped to native order, the bits above BitsStored cleared (unsigned) or filled
    with the sign (signed). 2.0 ms for a 2457 x 1996 frame against pydicom's 4.0 ms (its header
    parse and an unconditional two-pass shift). None when the Pixel Data element is no longer
    where the index found it (the caller then decodes with pydicom)."""
    file, index = meta["frames"][s]
    bits = meta["bits_allocated"]
    out = np.empty((meta["rows"], meta["cols"]), stored_dtype(meta)) if out is None else out
    try:
        with open(file, "rb") as fh:
            start = meta["native"][s] - (index or 0) * out.nbytes  # the Pixel Data value's
            if not _pixel_data_at(fh, start, meta["transfer_syntax"]):
                return None  # rewritten since it was indexed: pydicom reads it afresh
            fh.seek(meta["native"][s])
            got = fh.readinto(memoryview(out).cast("B"))
    except OSError as e:
        raise ValueError(f"{file}: cannot read frame {s}: {e.strerror or e}") from None
    if got != out.nbytes:
        raise ValueError(f"{file}: cannot decode frame {s}: the file is cut short ({got} of "
                         f"{out.nbytes} bytes)")
    if bits > 8 and NATIVE[meta["transfer_syntax"]] != ("<" if sys.byteorder == "little" else ">"):
        out.byteswap(inplace=True)
    if unused_bits_set(out, meta):  # a pass to look; the fix only when they hold something
        shift = bits - meta["bits_stored"]
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)  # arithmetic for signed: the sign fills them
    return out


def _j2k_reduced(meta, s, r):
    """Stored (ceil(H / 2**r), ceil(W / 2**r)) of JPEG 2000 slice s, Pillow (OpenJPEG) discarding
    r resolution levels, with pydicom's integer mapping (_j2k_stored); None when it cannot, so the
    caller decodes in full: more levels asked than the codestream has, signedness the wavelet
    does not share, a mode Pillow's plugin does not give, any failure (a corrupt frame then fails
    in _decode_full, which names the file and frame)."""
    file, index = meta["frames"][s]
    p = 2 ** r
    shape = (-(-meta["rows"] // p), -(-meta["cols"] // p))  # (h, w): OpenJPEG's ceil
    try:
        codestream = _j2k_frame(file, index or 0)
        if r > _j2k_levels(codestream):
            return None
        info = get_j2k_parameters(codestream)  # what pydicom's decoders read
        precision = info.get("precision", meta["bits_stored"])
        j2k_signed = int(info.get("is_signed", meta["signed"]))
        if r and meta["signed"] and not j2k_signed:  # two's complement coded as unsigned: the
            return None  # wavelet averages -1 (2**precision - 1) with 0; only full frames map back
        im = Image.open(io.BytesIO(codestream), formats=("JPEG2000",))
        if im.mode != ("L" if precision <= 8 else "I;16"):
            return None
        if r:  # Pillow sizes the reduced image round-half-up, OpenJPEG ceil: 2457 rows at r = 2
            # fail to load. A size whose rounding either way is OpenJPEG's: n * p - p / 2
            im._size = (shape[1] * p - p // 2, shape[0] * p - p // 2)
        im.reduce = r
        im.load()
        stored = _j2k_stored(im, precision, j2k_signed, meta["signed"])
    except Exception:
        return None
    return stored if stored.shape == shape else None


def _j2k_frame(file, index):
    """Frame `index`'s JPEG 2000 codestream, reading the header and that frame's bytes only."""
    tags = ["NumberOfFrames", "ExtendedOffsetTable", "ExtendedOffsetTableLengths"]
    with open(file, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
        # dcmread stops at the Pixel Data tag: explicit VR little endian, undefined length
        group, elem, _, length = struct.unpack("<HH2s2xI", f.read(12))
        if (group, elem, length) != (0x7FE0, 0x0010, 0xFFFFFFFF):
            raise ValueError("no encapsulated Pixel Data")
        eot = ds.get("ExtendedOffsetTable")
        eot = (eot, ds.ExtendedOffsetTableLengths) if eot else None
        return get_frame(f, index, extended_offsets=eot,
                         number_of_frames=int(ds.get("NumberOfFrames") or 1))


def _j2k_levels(codestream):
    """How many resolution levels a decoder may discard from a JPEG 2000 codestream (a JP2 wrapper
    skipped): the fewest decomposition levels its main header's COD and COC give; 0 when the image
    sits at a canvas offset (XOsiz, YOsiz != 0: reduced sizes no longer ceil(H / 2**r)) or the
    header does not parse."""
    soc = codestream.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
    pos = soc + 2 if soc >= 0 else len(codestream)  # at SIZ
    levels = []
    while pos + 4 <= len(codestream):
        marker, length = struct.unpack_from(">HH", codestream, pos)
        if marker == 0xFF51 and any(struct.unpack_from(">2I", codestream, pos + 14)):
            return 0  # SIZ: Lsiz, Rsiz, Xsiz, Ysiz, then XOsiz, YOsiz
        if marker == 0xFF52:  # COD: Scod, progression, 2 bytes layers, MCT, then levels
            levels.append(codestream[pos + 9])
        elif marker == 0xFF53:  # COC (greyscale: 1-byte Ccoc), Scoc, then levels
            levels.append(codestream[pos + 6])
        elif marker == 0xFF90:  # SOT: the first tile, end of the main header
            break
        pos += 2 + length
    return min(levels, default=0)


def _j2k_stored(im, precision, j2k_signed, signed):
    """A loaded Pillow JPEG 2000 greyscale image -> stored (h, w) integers exactly as pydicom 3's
    Pillow decoder gives (pixels/decoders/pillow.py, then base._apply_sign_correction): Pillow
    returns precision-bit samples as offset binary (signed ones shifted up by 2**(precision-1)),
    MSB-aligned in 8 (L) or 16 (I;16) unsigned bits."""
    bits = 8 if precision <= 8 else 16
    shift = bits - precision
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")  # pydicom's pixel dtype
    arr = np.asarray(im).astype(f"u{bits // 8}")  # (h, w) container, native order, a copy
    if j2k_signed and signed:  # offset binary -> two's complement: pydicom's -2**(bits-1)
        arr ^= arr.dtype.type(1 << (bits - 1))
        arr = arr.view(dtype)
    arr >>= shift  # undo the MSB alignment (arithmetic when viewed signed)
    arr = arr.view(dtype)
    if shift and j2k_signed != signed:  # codestream and Pixel Representation disagree: the
        arr <<= shift  # DICOM signedness wins, as in pydicom's sign correction
        arr >>= shift
    return arr


def display_slice(meta, stored, s, out=None):
    """Stored values of slice s (any shape) -> displayed float32 in [0, 1] (apply_voi with the
    slice's own parameters; into `out` when given)."""
    return apply_voi(stored, *meta["voi"][s], meta["bits_stored"], meta["signed"], meta["invert"],
                     out=out)


def read_reduced(meta, s, reduce=0):
    """Displayed float32 (h, w) in [0, 1] of output slice s, stored orientation, and its factor:
    decode_slice(meta, s, reduce)'s stored values through the unchanged display transform (rescale
    and VOI act per pixel, so they apply to reduced values as they are)."""
    stored, factor = decode_slice(meta, s, reduce)
    return display_slice(meta, stored, s), factor


def read_slices(meta, frames):
    """Decode only `frames` (output slice indices) and display them: float32 (len(frames), H, W)."""
    out = np.empty((len(frames), meta["rows"], meta["cols"]), np.float32)  # (S, H, W)
    for k, s in enumerate(frames):
        out[k] = read_reduced(meta, s)[0]
    return out


def edge_side(image):
    """Official BCS-DBT guess of the chest-wall side: 'R' when the last column sums higher."""
    return "R" if image[:, 0].sum() < image[:, -1].sum() else "L"


def orient(meta):
    """Record the volume's one orientation decision in meta, from its central slice, so every reader
    (read_dbt, the pretraining stream, the probes) applies it to every slice (the official reader
    decides per frame read; the breast outline barely changes with depth):
      side  the official edge-sum guess, on stored pixels before any window clips them, as the
            official reader sums its MONOCHROME2 data (displayed pixels for MONOCHROME1, whose
            stored sums point the other way)
      flip  our canonical mirror: True when the displayed chest wall is on the right.
    Returns the displayed central slice (H, W), for the tissue mask."""
    s = meta["n_frames"] // 2
    stored, _ = decode_slice(meta, s)
    shown = display_slice(meta, stored, s)
    meta["side"] = edge_side(shown if meta["invert"] else stored)
    meta["flip"] = edge_side(shown) == "R"
    return shown


def index_volume(path):
    """Headers parsed once plus the volume's orientation decision (`side`, `flip`), JSON-able."""
    meta = parse_headers(path)
    orient(meta)
    return meta


def read_dbt(path, frames=None, view=None, meta=None):
    """Read a DBT volume (or only `frames`) -> (float32 (S, H, W) in [0, 1], meta).

    view (e.g. "lcc"): the official BCS-DBT orientation, a 180 deg rotation when the volume's
    `side` disagrees with view[0]. view None: canonical orientation, mirrored so the chest wall is
    on the left. `meta` from index_volume(path) (or the cached volume_index) saves parsing the
    headers again."""
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
    """Volume paths from a folder (recursive) or a CSV manifest with a `path` column; for DICOMweb,
    the manifest's rows (each names one instance by its UIDs; the manifest is the allow-list)."""
    if pacs.is_dicomweb(source):
        if not manifest:
            raise ValueError(f"{pacs.redact(source)}: a DICOMweb source needs --manifest "
                             "(the studies it may fetch)")
        return pacs.read_manifest(manifest)
    if not str(source).strip():  # an unset shell variable: never fall back to the current folder
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
        volumes = [[str(d)] if _legacy_series(fs) else map(str, fs) for d, fs in folders.items()]
        return sorted(v for vs in volumes for v in vs)
    raise ValueError(f"{source}: not a folder or a .csv manifest")


def _dicom_name(p):
    """Files worth opening as DICOM: *.dcm, *.dicom, *.ima, no suffix, or named by their UID as
    storescp and PACS exports do ('1.2.840...9465': the 'suffix' is digits); no hidden files, no
    .txt/.csv/.png beside the slices."""
    suffix = p.suffix.lower()
    dicom_suffix = suffix in DICOM_SUFFIXES or suffix[1:].isdigit()
    return p.is_file() and not p.name.startswith(".") and dicom_suffix


def _legacy_series(files):
    """True when a folder's files are the single-frame slices of one series at distinct z (the
    legacy layout), so the folder is one volume. Only folders of 3+ files pay for their headers."""
    if len(files) < 3:
        return False
    heads = []
    tags = ["NumberOfFrames", "SeriesInstanceUID", "ImagePositionPatient", "Rows", "Columns"]
    for f in files:
        try:
            heads.append(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags))
        except Exception:  # one bad slice must not split the series into 1-slice volumes: the
            pass           # folder stays one volume, which the stream skips once, naming the file
    return len(heads) >= 2 and _not_one_series(heads) is None


def _not_one_series(heads):
    """Why these headers are not the single-frame slices of one series at distinct z, or None when
    they are. Without ImagePositionPatient they are 2-D images (MG, DX: views), never slices."""
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
