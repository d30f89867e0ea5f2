"""Write synthetic DBT archives in the BCS-DBT layout, for tests and demos (no patients).

A phantom (make_phantom) is a volume (S, H, W) in [0, 1], chest wall on the left: a half-ellipse
breast with fat 0.3 and gland 0.5 from 3-D power-law noise (spectrum 1/f^beta) cut at its (1 - g)
quantile, so the glandular fraction g sets the density; plus skin, pectoral muscle (MLO), lesions, z
blur and noise. An archive (write_archive) has one exam of four views a patient: BI-RADS density a-d
(10/40/40/10 %) sets g ~ 0.1/0.25/0.5/0.75; a latent risk r ~ N(0, 1) shows only in the texture
(beta = 3 + 0.3 r) and, with density, sets the yearly cancer hazard h exp(0.5 density + 0.8 r) (h =
--hazard, 0.03; probe.py's cohort takes 0.08); follow-up is 2-8 years; a cancer within a year
puts a mass in that breast's views; 15 % of views get benign calcifications.
BCS-DBT's CSVs, keyed by PatientID, StudyUID, View:
  file-paths.csv  descriptive_path, classic_path
  labels.csv      Normal, Actionable, Benign, Cancer
  boxes.csv       Subject, Slice, X, Y, Width, Height, Class, AD, VolumeSlices
and exams.csv (ours): patient, exam, LCC, RCC, LMLO, RMLO (paths), density, years_to_cancer (empty
if none before follow-up ends), years_of_followup. CLI: python phantoms.py --out DIR --patients N
"""

import argparse
import csv
import io
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from scipy import ndimage
from scipy.special import erfc

import dicom
import utils


def make_phantom(shape=(24, 256, 192), glandular=0.25, mlo=False, lesions=(), beta=3.0, seed=0):
    """-> (volume (S, H, W) in [0, 1], boxes [dict(Class, Slice, X, Y, Width, Height)] in pixels).
    lesions: "cancer" (a mass), "benign" (calcifications), "benign mass" (a mass, Class benign)."""
    rng = np.random.default_rng(seed)
    S, H, W = shape
    z = np.linspace(-1, 1, S)[:, None, None] if S > 1 else np.zeros((1, 1, 1))
    y, x = np.linspace(0, 1, H)[None, :, None], np.linspace(0, 1, W)[None, None, :]
    shrink = np.sqrt(1 - 0.3 * z ** 2)  # compressed breasts are thinner at the top and bottom
    a = rng.uniform(0.5, 0.7) * shrink  # half-axes (S, 1, 1), drawn in this order: a, b, centre y0
    b = rng.uniform(0.3, 0.4) * shrink
    y0 = rng.uniform(0.45, 0.55)
    r = np.sqrt((x / a) ** 2 + ((y - y0) / b) ** 2)  # (S, H, W) 1 on the skin line
    breast = r <= 1
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    f2 = sum(np.meshgrid(*[f.astype(np.float32) ** 2 for f in freqs], indexing="ij", sparse=True))
    amp = np.where(f2 > 0, f2, np.inf) ** (-beta / 4)  # |f|^(-beta/2): power spectrum 1/f^beta
    white = rng.standard_normal(shape, np.float32)  # (S, H, W)
    noise = np.fft.irfftn(np.fft.rfftn(white) * amp, shape, axes=(0, 1, 2))
    noise = noise / noise.std() + 2 * np.clip(1 - r, 0, 1) ** 0.5  # glands behind the nipple
    t = np.quantile(noise[breast], 1 - glandular)
    vol = 0.3 + 0.2 / (1 + np.exp(-(noise - t) / 0.15))  # fat 0.3, gland 0.5
    vol = ndimage.gaussian_filter1d(vol, 1.5, axis=0)  # poor out-of-plane resolution of DBT
    vol[breast & (r > 1 - 3 / (a * W))] *= 1.15  # skin rim
    if mlo:  # pectoral muscle: bright triangle in the upper chest-wall corner, convex edge
        pw, ph = rng.uniform(0.1, 0.25), rng.uniform(0.2, 0.35)
        u = x / pw + y / ph
        vol[breast & (u <= 1 + 0.15 * np.sin(np.pi * np.clip(x / pw, 0, 1)))] = 0.65
    boxes, scale = [], H / 256
    Z, Y, X = np.ogrid[:S, :H, :W]
    central = np.abs(z) <= max(0.5, np.abs(z).min())  # (the middle slice of a very thin volume)
    inner = np.argwhere(breast & (r < 0.6) & central)  # lesion centres: central, not the skin
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
            specks = rng.normal([cy, cx], 6 * scale, (n, 2))  # (n, 2) centres, y and x
            sy, sx = np.clip(specks, 0, [H - 1, W - 1]).astype(int).T
            for dz in (0, 1):
                vol[np.clip(cz + dz, 0, S - 1), sy, sx] += 0.4 * (1 - 0.5 * dz)
            x0, y0_ = sx.min() - 2, sy.min() - 2
            x1, y1 = sx.max() + 3, sy.max() + 3
        x0, y0_ = max(int(x0), 0), max(int(y0_), 0)
        boxes.append(dict(Class=cls.split()[0], Slice=int(cz), X=x0, Y=y0_,
                          Width=int(min(x1, W) - x0), Height=int(min(y1, H) - y0_)))
    vol = vol + rng.standard_normal(shape) * 0.01 * np.sqrt(np.clip(vol, 0, None))  # quantum noise
    return np.where(breast, np.clip(vol, 0, 1), 0).astype(np.float32), boxes


def quantize(volume, bits_stored=10, monochrome1=False):
    """[0, 1] display values -> stored uint16; MONOCHROME1 stores the minimum as white."""
    stored = np.round(np.clip(volume, 0, 1) * (2 ** bits_stored - 1)).astype(np.uint16)
    return (2 ** bits_stored - 1) - stored if monochrome1 else stored


def write_bto(path, stored, laterality="L", view="CC", encoding="native", voi_function="LINEAR",
              monochrome1=False, bits_stored=10, patient_id="SYN-P00000", study_uid=None,
              spacing=0.1):
    """Write stored uint16 (S, H, W) as a BTO file, atomically: native, rle or lossless j2k."""
    S, H, W = stored.shape
    top = 2 ** bits_stored
    # LINEAR*: identity on the stored range; SIGMOID: a window in the middle
    c, w = {"SIGMOID": (0.4 * top, 0.5 * top)}.get(voi_function, (top / 2, top))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ts = {"j2k": "1.2.840.10008.1.2.4.90"}.get(encoding, "1.2.840.10008.1.2.1")  # else Explicit LE
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = dicom.BTO
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = patient_id, "MG"
    ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    orientations = {"LCC": "A\\R", "RCC": "P\\L", "LMLO": "A\\FR", "RMLO": "P\\FL"}
    ds.PatientOrientation = orientations[laterality + view]
    codes = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
    sct, meaning = codes[view]
    ds.ViewCodeSequence = [_item(CodeValue=sct, CodingSchemeDesignator="SCT", CodeMeaning=meaning)]
    ds.Rows, ds.Columns = H, W
    ds.NumberOfFrames, ds.SamplesPerPixel = S, 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored = 16, bits_stored
    ds.HighBit, ds.PixelRepresentation = bits_stored - 1, 0
    ds.SharedFunctionalGroupsSequence = [_item(  # pydicom's VOI helpers never look in here
        PixelMeasuresSequence=[_item(PixelSpacing=[spacing, spacing], SliceThickness=1.0)],
        FrameVOILUTSequence=[_item(WindowCenter=c, WindowWidth=w, VOILUTFunction=voi_function)],
        PixelValueTransformationSequence=[_item(RescaleSlope=1, RescaleIntercept=0,
                                                RescaleType="US")],
        FrameAnatomySequence=[_item(FrameLaterality=laterality)])]
    ds.PerFrameFunctionalGroupsSequence = [_item(  # 1 mm slices
        PlanePositionSequence=[_item(ImagePositionPatient=[0.0, 0.0, float(i)])],
        FrameContentSequence=[_item(InStackPositionNumber=i + 1, DimensionIndexValues=[1, i + 1])])
        for i in range(S)]
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
    tmp = utils.tmp_name(path)
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def _item(**attrs):
    item = Dataset()
    item.update(attrs)
    return item


def write_phantom_dicom(path, shape=(60, 2457, 1996), encoding="native", seed=0, **kw):
    """A phantom BTO file of any size (tests, bench.py): anatomy drawn at <= 512 px, upsampled."""
    f = max(1, math.ceil(max(shape[1:]) / 512))
    small, _ = make_phantom((shape[0], math.ceil(shape[1] / f), math.ceil(shape[2] / f)), seed=seed)
    iy, ix = np.arange(shape[1]) // f, np.arange(shape[2]) // f
    stored = np.empty(shape, np.uint16)  # (S, H, W)
    for s in range(shape[0]):
        upsampled = small[s][iy][:, ix]  # (H, W)
        stored[s] = quantize(upsampled, kw.get("bits_stored", 10), kw.get("monochrome1", False))
    write_bto(path, stored, encoding=encoding, **kw)
    return Path(path)


def cached_volume(folder, shape, encoding="native"):
    """One phantom file of `shape` written once into `folder` and then reused: its path. bench.py's
    full-size volumes take about 15 s each to write, so a crash mid-write leaves only a .tmp."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"phantom_{encoding}_{'x'.join(map(str, shape))}.dcm")
    if not os.path.exists(path):
        write_phantom_dicom(path + ".tmp", shape=shape, encoding=encoding)
        os.replace(path + ".tmp", path)
    return path


HAZARD = 0.03  # the base of the yearly cancer hazard (see the module docstring)
VIEW_ORDER = ("LCC", "RCC", "LMLO", "RMLO")  # the order views are drawn and written in


def plan_cohort(patients=8, seed=0, hazard=HAZARD):
    """An archive's random draws, no pixels: per patient its exams.csv labels (years as the CSV
    holds them) and per view its lesions, glandular fraction and phantom seed. write_archive draws
    this, so a test can read a cohort's labels in milliseconds. hazard scales every patient's
    yearly cancer hazard: onsets divide by hazard / HAZARD and every other draw stays."""
    rng = np.random.default_rng(seed)
    cohort = []
    for p in range(patients):
        density = int(rng.choice(4, p=[0.1, 0.4, 0.4, 0.1]))  # BI-RADS a-d prevalence
        risk = rng.normal()  # latent risk, visible only through texture (beta): the probe learns it
        rate = hazard * math.exp(0.5 * density + 0.8 * risk)
        onset, followup = rng.exponential(1 / rate), rng.uniform(2, 8)
        side = "LR"[rng.integers(2)]
        views = []
        for view in VIEW_ORDER:
            cancer = ["cancer"] if onset < 1 and view[0] == side else []
            lesions = cancer + (["benign"] if rng.random() < 0.15 else [])
            g = [0.1, 0.25, 0.5, 0.75][density] * rng.uniform(0.8, 1.25)
            views.append(dict(view=view, lesions=lesions, glandular=g,
                              seed=int(rng.integers(2 ** 31))))
        ytc = str(round(onset, 3)) if onset < followup else ""  # str(float), as csv writes it
        yfu = str(round(min(onset, followup), 3))
        cohort.append(dict(patient=f"SYN-P{p:05d}", density="abcd"[density], beta=3 + 0.3 * risk,
                           years_to_cancer=ytc, years_of_followup=yfu, views=views))
    return cohort


def write_archive(root, patients=8, seed=0, shape=(24, 256, 192), lesion_rate=0.0,
                  hazard=HAZARD):
    """A small BCS-DBT-like archive of plan_cohort's patients. lesion_rate: mean extra masses per
    view (Poisson), benign or cancer at even odds, as BCS-DBT's enriched val/test sets; in boxes.csv
    and labels.csv only."""
    root = Path(root)
    enrich = np.random.default_rng([seed, 1])  # own stream: lesion_rate 0 changes no other draw
    paths, labels = [], []  # rows of file-paths.csv, labels.csv,
    boxes, exams = [], []  # boxes.csv and exams.csv
    # 8 views of every 16 cover all variants, the rest are cheap j2k (native: 2.4 MB a view)
    variants = [("native", "LINEAR", False), ("j2k", "SIGMOID", False), ("j2k", "LINEAR", True),
                ("rle", "LINEAR_EXACT", False), ("j2k", "LINEAR", False), ("rle", "SIGMOID", True),
                ("j2k", "LINEAR_EXACT", False), ("rle", "LINEAR", False)]
    variants += [("j2k", "LINEAR", False)] * 8
    for p, patient in enumerate(plan_cohort(patients, seed, hazard)):
        pid = patient["patient"]
        study = generate_uid(entropy_srcs=[str(seed), pid])
        exam = dict(patient=pid, exam=study)
        for k, planned in enumerate(patient["views"]):
            view = planned["view"]
            extra = enrich.integers(2, size=enrich.poisson(lesion_rate))  # 0 cancer, 1 benign
            lesions = planned["lesions"] + [("cancer", "benign mass")[int(c)] for c in extra]
            vol, bxs = make_phantom(shape, planned["glandular"], view.endswith("MLO"), lesions,
                                    beta=patient["beta"], seed=planned["seed"])
            if view[0] == "R":  # right breasts are displayed with the chest wall on the right
                vol = vol[:, :, ::-1]
                for b in bxs:
                    b["X"] = shape[2] - b["X"] - b["Width"]
            encoding, voi, mono1 = variants[(4 * p + k) % len(variants)]
            rel = f"Breast-Cancer-Screening-DBT/{pid}/{study}/{view.lower()}/1-1.dcm"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            write_bto(root / rel, quantize(vol, 10, mono1), view[0], view[1:], encoding, voi,
                      mono1, patient_id=pid, study_uid=study, spacing=0.1 * 2457 / shape[1])
            key = dict(PatientID=pid, StudyUID=study, View=view.lower())
            paths.append(dict(key, descriptive_path=rel, classic_path=rel))
            cls = {b["Class"] for b in bxs}
            labels.append(dict(key, Normal=int(not cls), Actionable=0,
                               Benign=int(cls == {"benign"}), Cancer=int("cancer" in cls)))
            boxes += [dict(key, Subject=pid, **b, AD=0, VolumeSlices=shape[0]) for b in bxs]
            exam[view] = rel
        exams.append(dict(exam, **{k: patient[k] for k in ("density", "years_to_cancer",
                                                           "years_of_followup")}))
    _write_tables(root, paths, labels, boxes, exams)
    return root


def _write_tables(root, paths, labels, boxes, exams):
    box_fields = "PatientID StudyUID View Subject Slice X Y Width Height Class AD VolumeSlices"
    for name, rows, fields in [("file-paths", paths, None), ("labels", labels, None),
                               ("boxes", boxes, box_fields.split()), ("exams", exams, None)]:
        with open(root / f"{name}.csv", "w", newline="") as fh:  # boxes.csv: a header when empty
            w = csv.DictWriter(fh, fieldnames=fields or list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def synthetic_archive(root=None, patients=8, seed=0, shape=(24, 256, 192), lesion_rate=0.0,
                      hazard=HAZARD):
    """Create once (in a tmp dir, then os.replace) and return the archive folder. Its default name
    holds every argument, so other shape, lesion or hazard flags never get one built with different
    ones (the defaults add nothing: older archives keep their names)."""
    shape_name = "x".join(map(str, shape)) + (f"-l{lesion_rate:g}" if lesion_rate else "")
    shape_name += f"-h{hazard:g}" if hazard != HAZARD else ""
    root = Path(root or utils.cache_base() / f"synthetic-p{patients}-s{seed}-{shape_name}")
    if (root / "exams.csv").exists():
        return root
    tmp = Path(utils.tmp_name(root))
    shutil.rmtree(tmp, ignore_errors=True)
    write_archive(tmp, patients, seed, shape, lesion_rate, hazard)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race (or root is a non-empty folder): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "exams.csv").exists():
            raise ValueError(f"{root}: exists and is not a synthetic archive") from None
    return root


def get_args(argv=None):
    p = utils.one_line_errors(argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    num = utils.number
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=str(utils.cache_base() / "synthetic"),
                   help="output folder: new, empty, or an archive this command wrote (then reused)")
    g = p.add_argument_group("data")
    g.add_argument("--patients", type=num(int, 1, 100000), default=8, help="patients, 4 views each")
    g.add_argument("--seed", type=num(int, 0, utils.SEED_MAX), default=0, help="random seed")
    g.add_argument("--slices", type=num(int, 1, 1000), default=24, help="slices per volume")
    g.add_argument("--height", type=num(int, 16, 8192), default=256, help="rows per slice")
    g.add_argument("--width", type=num(int, 16, 8192), default=192, help="columns per slice")
    g.add_argument("--lesion-rate", type=num(float, 0, 10), default=0.0,
                   help="mean extra masses per view (detection archives; BCS-DBT's are enriched)")
    g.add_argument("--hazard", type=num(float, 0, 10, lo_open=True), default=HAZARD,
                   help="base of the yearly cancer hazard, exp(0.5 density + 0.8 risk) times this")
    return p.parse_args(argv)


def synth_command(args):
    """`python phantoms.py`: write an archive, or reuse the one there and say how large it is."""
    out = Path(args.out)
    if (out / "exams.csv").exists():
        rows = utils.read_csv(out / "exams.csv")
        if not rows or "LCC" not in rows[0]:
            raise ValueError(f"{out / 'exams.csv'}: no exams; remove the folder to rewrite it")
        head = dicom.read_header(out / rows[0]["LCC"])  # every volume has one shape
        has = (len(rows), int(head.get("NumberOfFrames") or 1), int(head.Rows), int(head.Columns))
        want = (args.patients, args.slices, args.height, args.width)
        ask = "; {} patients of {}x{}x{} were asked for: remove the folder to rewrite it"
        ask = "" if has == want else ask.format(*want)
        return "reused {}: {} volumes of {} patients, {}x{}x{}".format(out, 4 * has[0], *has) + ask
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an archive written by phantoms.py; "
                         "choose another --out")
    shape = (args.slices, args.height, args.width)
    root = synthetic_archive(out, args.patients, args.seed, shape, args.lesion_rate, args.hazard)
    return f"wrote {root}: {4 * args.patients} volumes of {args.patients} patients"


if __name__ == "__main__":
    try:
        print(synth_command(get_args()))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
