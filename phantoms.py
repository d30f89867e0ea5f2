"""Write synthetic archives, DBT or 2-D mammography, in public download layouts (no patients).

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
if none before follow-up ends), years_of_followup. CLI: python phantoms.py [--dataset D] --out DIR

2-D archives (write_2d_archive; synthetic_2d_archive caches one) copy the downloads of MammoDINO's
five benchmarks (--dataset) as cohorts.py's readers read them, an image a phantom slice (render_2d).
A patient's index breast cycles through STATES_2D (normal, or a mass and/or calcifications, their
pathology BENIGN_WITHOUT_CALLBACK, BENIGN or MALIGNANT: malignant masses larger, denser and
spiculated, malignant calcifications many fine specks, benign ones a few coarse), so cancer, mass,
calcification, lesion type and BI-RADS (rising with suspicion) show in the pixels, density via g.
  vindr     images/<study_id>/<image_id>.dicom (a third of studies SIGMOID, a third MONOCHROME1);
            breast-level_ and finding_annotations.csv (split), metadata.csv (columns ours)
  rsna      train_images/<patient_id>/<image_id>.dcm, j2k or native (for RSNA's JPEG lossless,
            which nothing here writes), MONOCHROME1, SIGMOID, two windows, by machine_id;
            train.csv (site 2: BIRADS, density empty; BIRADS 0.0; an AT view), test.csv
  cbis-ddsm the four *_case_description_*_set.csv (breast_density, breast density; paths that
            share only their folder with CBIS-DDSM/<folder>[_<id>]/<date>/<series>/1-1.dcm;
            newlines in quoted paths), crops, ROI masks, metadata.csv; 16 bits, no window
  cmmd      CMMD/<ID1>/<date>/<series>/1-<k>.dcm, D1 2 images, D2 4, laterality only in
            ImageLaterality; CMMD_clinicaldata_revision.xlsx (zip of XML, shared strings)
  cdd-cesm  Low energy and Subtracted images of CDD-CESM/*.jpg (P1_L_DM_MLO2, P2_L_DM_MLO_2);
            Radiology manual annotations.xlsx, sheet all: a row per finding, stray spaces
DICOM is native except RSNA's (JPEG 2000 as in its download; native for its JPEG lossless).
"""

import argparse
import csv
import hashlib
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
    c, w = _window(voi_function, 2 ** bits_stored)
    ds = _image_dataset(dicom.BTO, encoding, (H, W), view, monochrome1, bits_stored, patient_id,
                        study_uid)
    ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "NONE"]
    orientations = {"LCC": "A\\R", "RCC": "P\\L", "LMLO": "A\\FR", "RMLO": "P\\FL"}
    ds.PatientOrientation = orientations[laterality + view]
    ds.NumberOfFrames = S
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
    _save_image(ds, path, stored, encoding)


def _window(voi_function, top):
    """(center, width) on a stored range of `top` levels. LINEAR*: identity on the stored range;
    SIGMOID: a window in the middle."""
    return {"SIGMOID": (0.4 * top, 0.5 * top)}.get(voi_function, (top / 2, top))


def _image_dataset(sop_class, encoding, size, view, monochrome1, bits_stored, patient_id,
                   study_uid):
    """The header every phantom image shares: meta, UIDs, view code, pixel description."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ts = {"j2k": "1.2.840.10008.1.2.4.90"}.get(encoding, "1.2.840.10008.1.2.1")  # else Explicit LE
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = patient_id, "MG"
    codes = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
    if view in codes:  # RSNA's few AT, LM, ML views: no code here
        sct, meaning = codes[view]
        ds.ViewCodeSequence = [_item(CodeValue=sct, CodingSchemeDesignator="SCT",
                                     CodeMeaning=meaning)]
    ds.Rows, ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored = 16, bits_stored
    ds.HighBit, ds.PixelRepresentation = bits_stored - 1, 0
    return ds


def _save_image(ds, path, stored, encoding):
    """Pixels (frames (S, H, W) or one (H, W)) into ds: native, rle or lossless j2k; then save
    atomically."""
    if encoding == "j2k":
        frames = []
        for f in stored.reshape(-1, *stored.shape[-2:]):
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
    return _write_once(root, "exams.csv",
                       lambda tmp: write_archive(tmp, patients, seed, shape, lesion_rate, hazard))


# ----------------------------------------------------------------------------- 2-D archives
DATASETS_2D = ("vindr", "rsna", "cbis-ddsm", "cmmd", "cdd-cesm")
PATIENTS_2D = {"vindr": 150, "rsna": 150, "cbis-ddsm": 150, "cmmd": 200, "cdd-cesm": 150}
TABLE_2D = {"vindr": "breast-level_annotations.csv", "rsna": "train.csv",  # after the images
            "cbis-ddsm": "mass_case_description_train_set.csv",
            "cmmd": "CMMD_clinicaldata_revision.xlsx",
            "cdd-cesm": "Radiology manual annotations.xlsx"}
MG = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
B, W, M = "BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT"
STRENGTH = {W: 0.0, B: 0.4, M: 1.0}  # how suspicious a finding looks (_add_finding)
# The findings (kind, pathology) a patient's index breast cycles through; None: normal. Each
# dataset's labels follow from its state: VinDr's and CDD-CESM's BI-RADS is 1 + the state
STATES_2D = {
    "vindr": (None, ("calcification", W), ("mass", B), ("calcification", M), ("both", M)),
    "rsna": (None, ("calcification", W), ("mass", B), ("mass", M)),
    "cbis-ddsm": (("calcification", W), ("calcification", B), ("calcification", M),
                  ("mass", W), ("mass", B), ("mass", M)),
    "cmmd": (("calcification", B), ("mass", B), ("both", B), ("calcification", M), ("mass", M),
             ("both", M)),
    # a malignant mass in every cancer: calcifications alone are invisible at the tiny ViT's 112 px
    "cdd-cesm": (None, ("calcification", W), ("mass", B), ("mass", M), ("both", M))}


def plan_2d(dataset, patients, seed=0):
    """A 2-D archive's patients, no pixels: a balanced design, shuffled. Design row p has state
    p % S (S states), density (p + p // S) % 4 and is in the official test split when its block
    p // S is the 5th of every 5 (the last one, with fewer than 5 blocks), so test holds every
    state and density; row and block pick the rest (RSNA's site and machine, CMMD's D1 or D2)."""
    n_states = len(STATES_2D[dataset])
    if patients < 2 * n_states:
        raise ValueError(f"{dataset}: at least {2 * n_states} patients (2 per state)")
    rng = np.random.default_rng(seed)
    test_block = min(4, (patients - 1) // n_states)
    plan = []
    for p in rng.permutation(patients):
        state = p % n_states
        plan.append(dict(row=int(p), state=int(state), finding=STATES_2D[dataset][state],
                         density=int((p + p // n_states) % 4), block=int(p // n_states),
                         test=(p // n_states) % 5 == test_block, side="LR"[rng.integers(2)],
                         age=int(rng.integers(35, 80)), seed=int(rng.integers(2 ** 31))))
    return plan


def render_2d(size, density, mlo, kinds=(), pathology=B, seed=0):
    """One 2-D phantom (H, W) in [0, 1], chest wall left -> (image, [(kind, mask (H, W))]):
    make_phantom's breast (one slice) at the density's glandular fraction, plus a finding of each
    of `kinds` (mass, calcification) painted as suspicious as `pathology` makes it."""
    rng = np.random.default_rng(seed)
    g = [0.1, 0.25, 0.5, 0.75][density] * rng.uniform(0.8, 1.25)  # as plan_cohort
    img = make_phantom((1,) + tuple(size), g, mlo, seed=int(rng.integers(2 ** 31)))[0][0]
    marks = [(k, _add_finding(img, k, STRENGTH[pathology], rng)) for k in kinds]
    return np.clip(img, 0, 1), marks


def _add_finding(img, kind, strength, rng):
    """Paint a mass or a calcification cluster into a phantom (H, W), in place -> its mask.
    strength 0-1: malignant masses are larger, denser and spiculated; malignant calcifications
    many fine specks (a pixel each), benign ones fewer and coarse (2 x 2 pixels)."""
    H, W = img.shape
    breast, scale = img > 0, H / 256
    depth = ndimage.distance_transform_edt(breast)
    cy, cx = rng.choice(np.argwhere(depth >= 0.5 * depth.max()))  # inside, off the skin
    y, x = np.ogrid[:H, :W]
    if kind == "mass":
        spikes = 1 + 0.3 * strength * np.sin(7 * np.arctan2(y - cy, x - cx) + rng.uniform(0, 7))
        # radius 6-26 px at 256 rows, density 0.55-0.95: at the tiny ViT's 112 px a random one's
        # features tell malignant from benign masses (CV AUROC 0.59 at 6-14 px, 0.94 at 6-26)
        d = np.hypot(y - cy, x - cx) / ((6 + 20 * strength) * scale * spikes)
        dense = 0.55 + 0.4 * strength  # denser than gland (0.5), whatever lies behind it
        img += np.clip(dense - img, 0.05, None) * 0.5 * erfc((d - 1) * 3) * breast  # erfc margin
        return breast & (d <= 1)
    n = int(4 + 21 * strength)  # 4, 12, 25 specks
    sy, sx = np.round(rng.normal([cy, cx], 10 * scale, (n, 2))).astype(int).T
    keep = (sy >= 0) & (sy < H - 1) & (sx >= 0) & (sx < W - 1)
    mask = np.zeros_like(breast)
    mask[sy[keep], sx[keep]] = True
    mask[cy, cx] = True  # never empty: boxes, crops and ROI masks need a pixel
    if strength < 0.5:  # benign calcifications are coarse: 2 x 2 pixels, not fine specks
        mask = ndimage.binary_dilation(mask, np.ones((2, 2), bool))
    mask &= breast
    img[mask] += 0.35
    return mask


def _views(dataset, pt):
    """(side, view) of a patient's images: both breasts' CC and MLO, but only the breast with
    the finding for CBIS-DDSM and for CMMD's D1 patients (block parity)."""
    one = dataset == "cbis-ddsm" or (dataset == "cmmd" and pt["block"] % 2 == 0)
    return [(s, v) for s in ("RL" if not one else pt["side"]) for v in ("CC", "MLO")]


def _image(pt, side, view, size, k, kinds=None):
    """Image k of a patient: the finding only in its side's breast; a right breast is mirrored
    (chest wall right), as write_archive does. -> (image (H, W), [(kind, mask)])"""
    finding = pt["finding"] if side == pt["side"] else None
    if kinds is None:
        kinds = () if finding is None else ("mass", "calcification") if finding[0] == "both" \
            else (finding[0],)
    img, marks = render_2d(size, pt["density"], view == "MLO", kinds,
                           finding[1] if finding else B, [pt["seed"], k])
    if side == "R":
        img, marks = img[:, ::-1], [(kind, m[:, ::-1]) for kind, m in marks]
    return np.ascontiguousarray(img), marks


def write_mg(path, img, side, view, bits=12, encoding="native", voi="LINEAR", mono1=False,
             windows=1, patient_id="SYN", **attrs):
    """A display image (H, W) in [0, 1] as a one-frame Digital Mammography DICOM (native or
    lossless j2k) with ImageLaterality; windows: 0 none (display by the stored range), 1, or 2
    (multi-valued WindowCenter/Width: readers use the first); attrs: more header values."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds = _image_dataset(MG, encoding, img.shape, view, mono1, bits, patient_id, None)
    ds.update(attrs)
    ds.ImageLaterality, ds.PresentationIntentType = side, "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    c, w = _window(voi, 2 ** bits)
    if windows:
        ds.WindowCenter, ds.WindowWidth = [c, 0.45 * 2 ** bits][:windows], \
            [w, 0.7 * 2 ** bits][:windows]
        ds.VOILUTFunction = voi
    _save_image(ds, path, quantize(img, bits, mono1), encoding)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _date(rng):
    return f"{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}-{rng.integers(2008, 2017)}"


def _write_vindr(root, plan, size, rng):
    """VinDr-Mammo: a finding_annotations row per box (round all of an image's findings), else
    No Finding (BI-RADS 2's benign calcifications too); ids of 32 hex digits; SHA256SUMS.txt."""
    head = "study_id,series_id,image_id,laterality,view_position,height,width,breast_birads," \
           "breast_density".split(",")
    breast, found, meta, names = [], [], [], {"mass": "Mass", "calcification": "Suspicious "
                                                                             "Calcification"}
    for pt in plan:  # a study's images share one machine's display
        study = rng.bytes(16).hex()
        voi, mono1 = [("LINEAR", False), ("SIGMOID", False), ("LINEAR", True)][pt["row"] % 3]
        for k, (side, view) in enumerate(_views("vindr", pt)):
            image = rng.bytes(16).hex()
            img, marks = _image(pt, side, view, size, k)
            write_mg(root / "images" / study / f"{image}.dicom", img, side, view, voi=voi,
                     mono1=mono1, patient_id=study)
            birads = 1 + pt["state"] if side == pt["side"] else 1
            split = "test" if pt["test"] else "training"
            row = [study, rng.bytes(16).hex(), image, side, view, *size, f"BI-RADS {birads}",
                   f"DENSITY {'ABCD'[pt['density']]}"]
            breast.append(row + [split])
            if birads >= 3:  # one box round all its findings, as VinDr's combined categories
                ys, xs = np.nonzero(np.any([m for _, m in marks], axis=0))
                cats = sorted({names[kind] for kind, _ in marks}, reverse=True)
                box = [f"{v:.2f}" for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)]
                found.append(row + [str(cats), f"BI-RADS {birads}"] + box + [split])
            else:
                found.append(row + ["['No Finding']", "", "", "", "", "", split])
            meta.append([image, "MONOCHROME1" if mono1 else "MONOCHROME2", voi, *size])
    _write_csv(root / "finding_annotations.csv", head + ["finding_categories", "finding_birads",
                                                         "xmin", "ymin", "xmax", "ymax", "split"],
               found)
    _write_csv(root / "metadata.csv", ["image_id", "Photometric Interpretation",
                                       "VOILUTFunction", "Rows", "Columns"], meta)
    (root / "LICENSE.txt").write_text("Synthetic phantoms (phantoms.py): no patient data.\n")
    _write_csv(root / "breast-level_annotations.csv", head + ["split"], breast)
    sums = [f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.relative_to(root).as_posix()}"
            for p in sorted(root.rglob("*")) if p.is_file()]
    (root / "SHA256SUMS.txt").write_text("\n".join(sums) + "\n")


# machine_id -> (encoding, VOILUTFunction, MONOCHROME1, windows): patients cycle through them
RSNA_MACHINES = {29: ("j2k", "LINEAR", False, 1), 21: ("j2k", "LINEAR", True, 1),
                 49: ("native", "SIGMOID", False, 2), 93: ("j2k", "LINEAR", False, 2),
                 48: ("native", "LINEAR", True, 1)}
# BIRADS per state: 1 (negative) a normal breast, 2 benign calcifications (BI-RADS 2 is benign;
# RSNA's page says normal), 0 the masses recalled; so split_units' strata keep each in every split
RSNA_BIRADS = ("1.0", "2.0", "0.0", "0.0")


def _write_rsna(root, plan, size, rng):
    """RSNA: train_images and train.csv; test_images, test.csv and sample_submission.csv of one
    more patient (no labels)."""
    head = "site_id,patient_id,image_id,laterality,view,age,cancer,biopsy,invasive,BIRADS," \
           "implant,density,machine_id,difficult_negative_case".split(",")
    rows, pids = [], rng.choice(np.arange(10000, 65536), len(plan) + 1, replace=False)
    for pt, pid in zip(plan, pids):
        machine, site = list(RSNA_MACHINES)[pt["row"] % 5], 2 if pt["row"] % 3 == 2 else 1
        views = _views("rsna", pt) + [(pt["side"], "AT")] * (pt["row"] == 0)
        for k, (side, view) in enumerate(views):
            image = int(rng.integers(2 ** 31))
            write_mg(root / "train_images" / str(pid) / f"{image}.dcm",
                     _image(pt, side, view, size, k)[0], side, view, 12,
                     *RSNA_MACHINES[machine], str(pid))
            state = pt["state"] if side == pt["side"] else 0
            cancer, biopsy = int(state == 3), int(state >= 2)
            rows.append([site, pid, image, side, view, f"{pt['age']:.1f}", cancer, biopsy,
                         cancer * (pt["block"] % 3 > 0), "" if site == 2 else RSNA_BIRADS[state],
                         int(pt["row"] == 1), "" if site == 2 else "ABCD"[pt["density"]],
                         machine, bool(biopsy and not cancer)])
    pid, pt, test = pids[-1], dict(plan[0], finding=None, seed=plan[0]["seed"] + 1), []
    for k, (side, view) in enumerate(_views("rsna", pt)):  # the test patient: no labels
        image = int(rng.integers(2 ** 31))
        write_mg(root / "test_images" / str(pid) / f"{image}.dcm",
                 _image(pt, side, view, size, k)[0], side, view, 12, patient_id=str(pid))
        test.append([1, pid, image, side, view, f"{pt['age']:.1f}", 0, 29, f"{pid}_{side}"])
    _write_csv(root / "test.csv", "site_id,patient_id,image_id,laterality,view,age,implant,"
               "machine_id,prediction_id".split(","), test)
    _write_csv(root / "sample_submission.csv", ["prediction_id", "cancer"],
               sorted({(r[-1], 0.021) for r in test}))
    _write_csv(root / "train.csv", head, rows)


CBIS_ASSESSMENT = {("calcification", W): 2, ("calcification", B): 3, ("calcification", M): 4,
                   ("mass", W): 1, ("mass", B): 0, ("mass", M): 5}
LOOK = {"mass": {W: ("ROUND", "CIRCUMSCRIBED"), B: ("OVAL", "OBSCURED"),  # shape, margins
                 M: ("IRREGULAR", "SPICULATED")},
        "calcification": {W: ("LUCENT_CENTER", "SCATTERED"), B: ("PUNCTATE", "REGIONAL"),
                          M: ("PLEOMORPHIC", "CLUSTERED")}}  # type, distribution


def _tcia_series(root, rng, subject, description, meta):
    """CBIS-DDSM/<subject>/<date>-DDSM-NA-<n>/1.000000-<description>-<n>/1-1.dcm, listed in
    meta as metadata.csv's Series UID, Series Description, File Location -> (path, header)."""
    uid = generate_uid()
    where = f"CBIS-DDSM/{subject}/{_date(rng)}-DDSM-NA-{rng.integers(10000, 100000)}/" \
            f"1.000000-{description}-{rng.integers(10000, 100000)}"
    meta.append([uid, description, f"./{where}"])
    return root / where / "1-1.dcm", dict(SeriesInstanceUID=uid, SeriesDescription=description)


def _cbis_uid(rng):
    return "1.3.6.1.4.1.9590.100.1.2." + "".join(map(str, rng.integers(10, size=36)))


def _write_cbis(root, plan, size, rng):
    """CBIS-DDSM: a CSV row per abnormality (1 or 2 an image), its crop and ROI mask in
    <folder>_<abnormality id>; calc ROI paths and each calc CSV's first image path end in a
    newline."""
    tables, meta, pad = {}, [], int(8 * size[0] / 256) + 1  # crops: the finding and a margin
    for i, pt in enumerate(plan):
        kind, pathology = pt["finding"]
        pid, split = f"P_{3 * i + 1:05d}", "Test" if pt["test"] else "Training"
        for k, (side, view) in enumerate(_views("cbis-ddsm", pt)):
            n = 1 + (pt["block"] % 3 == 2)  # some images have two abnormalities
            img, marks = _image(pt, side, view, size, k, kinds=(kind,) * n)
            folder = f"{kind[:4].title()}-{split}_{pid}_{'LEFT' if side == 'L' else 'RIGHT'}_{view}"
            path, series = _tcia_series(root, rng, folder, "full mammogram images", meta)
            write_mg(path, img, side, view, 16, windows=0, patient_id=folder, **series)
            image_path = f"{folder}/{_cbis_uid(rng)}/{_cbis_uid(rng)}/000000.dcm"
            for a, (_, mask) in enumerate(marks, 1):
                (y0, y1), (x0, x1) = [(max(v.min() - pad, 0), v.max() + pad)
                                      for v in np.nonzero(mask)]
                path, series = _tcia_series(root, rng, f"{folder}_{a}", "ROI mask images", meta)
                write_mg(path, mask.astype(np.float32), side, view, 8, windows=0,
                         patient_id=folder, **series)
                path, series = _tcia_series(root, rng, f"{folder}_{a}", "cropped images", meta)
                write_mg(path, img[y0:y1, x0:x1], side, view, 16, windows=0, patient_id=folder,
                         **series)
                study = _cbis_uid(rng)
                crop_path = f"{folder}_{a}/{study}/{_cbis_uid(rng)}/000000.dcm"
                roi_path = f"{folder}_{a}/{study}/{_cbis_uid(rng)}/000001.dcm"
                rows = tables.setdefault((kind[:4], split.lower()), [])
                rows.append([pid, pt["density"] + 1, "LEFT" if side == "L" else "RIGHT", view, a,
                             kind, *LOOK[kind][pathology], CBIS_ASSESSMENT[kind, pathology],
                             pathology, 2 + round(3 * STRENGTH[pathology]),
                             image_path + "\n" * (not rows and kind[:4] == "calc"), crop_path,
                             roi_path + "\n" * (kind[:4] == "calc")])
    _write_csv(root / "metadata.csv", ["Series UID", "Series Description", "File Location"], meta)
    paths = ["image file path", "cropped image file path", "ROI mask file path"]
    for kind, split in sorted(tables):  # mass_case_description_train_set.csv last
        cols = ("breast_density", "mass shape", "mass margins") if kind == "mass" else \
            ("breast density", "calc type", "calc distribution")
        head = ["patient_id", cols[0], "left or right breast", "image view", "abnormality id",
                "abnormality type", *cols[1:], "assessment", "pathology", "subtlety", *paths]
        _write_csv(root / f"{kind}_case_description_{split.replace('ing', '')}_set.csv", head,
                   tables[kind, split])


CMMD_SUBTYPES = ("Luminal A", "Luminal B", "HER2-enriched", "triple negative")


def _write_cmmd(root, plan, size, rng):
    """CMMD: no window, the view in ViewCodeSequence; a clinical row per breast with a finding
    (number: the patient's images, our reading; subtype for D2's malignant ones, else blank)."""
    rows, count = [], [0, 0]
    for pt in plan:
        d2 = pt["block"] % 2
        count[d2] += 1
        id1, (kind, pathology) = f"D{1 + d2}-{count[d2]:04d}", pt["finding"]
        series = root / "CMMD" / id1 / f"{_date(rng)}-NA-NA-{rng.integers(10000, 100000)}" / \
            f"1.000000-NA-{rng.integers(10000, 100000)}"
        views = _views("cmmd", pt)
        order = rng.permutation(len(views))  # the file names say nothing either
        for k, (side, view) in enumerate(views):
            write_mg(series / f"1-{order[k] + 1}.dcm", _image(pt, side, view, size, k)[0], side,
                     view, windows=0, patient_id=id1)
        subtype = CMMD_SUBTYPES[rng.integers(4)] if d2 and pathology == M else None
        rows.append([id1, pt["side"], pt["age"], len(views), kind, pathology.title(), subtype])
    header = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
    utils.write_xlsx(root / "CMMD_clinicaldata_revision.xlsx", header, sorted(rows))


def _subtracted(img, marks, strength):
    """CESM's recombined image: grey where the breast is, brighter with gland and, most, where a
    malignant finding takes up iodine."""
    cm = np.where(img > 0, 0.25 + 0.6 * np.clip(ndimage.gaussian_filter(img, 2) - 0.3, 0, 1), 0)
    for _, m in marks:
        blob = ndimage.gaussian_filter(m.astype(np.float32), 3 * img.shape[0] / 256)
        cm += (0.05 + 0.35 * strength) * blob / max(blob.max(), 1e-6) * (img > 0)
    return np.clip(cm, 0, 1)


def _write_cdd_cesm(root, plan, size, rng):
    """CDD-CESM: P<id>_<L|R>_<DM|CM>_<view>.jpg, the odd names a second MLO; a row per finding
    (a normal image: one), BIRADS 1 + state (a calcification beside a malignant mass: 4)."""
    head = ["Image_name", "Patient_ID", "Side", "Type", "Age", "Breast density (ACR)", "BIRADS",
            "Findings", "View", "Tags", "Machine", "Pathology Classification/ Follow up"]
    rows = []
    for i, pt in enumerate(plan):
        views = [(s, v, v) for s, v in _views("cdd-cesm", pt)]
        views += [("L", "MLO", {0: "MLO2", 1: "MLO_2"}[i])] if i < 2 else []
        for k, (side, view, name) in enumerate(views):
            img, marks = _image(pt, side, view, size, k)
            pathology = pt["finding"][1] if marks else None
            for typ, code, folder in (("DM", "DM", "Low energy"), ("CESM", "CM", "Subtracted")):
                pix = img if typ == "DM" else _subtracted(img, marks, STRENGTH[pathology or B])
                out = root / f"{folder} images of CDD-CESM" / f"P{i + 1}_{side}_{code}_{name}.jpg"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.round(pix * 255).astype(np.uint8)).save(out, quality=95)
                cell = f"P{i + 1}_{side}_{code}_{name}" + " " * (len(rows) % 5 == 4)
                cell = cell.replace("_", " _", 1) if len(rows) == 7 else cell
                common = [cell, i + 1, side, typ, pt["age"], "ABCD"[pt["density"]]]
                if not marks:
                    rows.append(common + [1, None, view, None, "phantom", "Normal"])
                for kind, _ in marks:
                    birads = 1 + pt["state"] - (kind == "calcification" and len(marks) > 1)
                    rows.append(common + [birads, "mass" if kind == "mass" else "calcifications",
                                          view, " ".join(LOOK[kind][pathology]).lower(),
                                          "phantom", "Malignant" if pathology == M else "Benign"])
    utils.write_xlsx(root / "Radiology manual annotations.xlsx", head, rows, sheet="all")


WRITERS_2D = {"vindr": _write_vindr, "rsna": _write_rsna, "cbis-ddsm": _write_cbis,
              "cmmd": _write_cmmd, "cdd-cesm": _write_cdd_cesm}


def write_2d_archive(root, dataset, patients=None, seed=0, size=(256, 192)):
    """A phantom archive of a 2-D benchmark (DATASETS_2D) in its download layout -> root.
    patients: PATIENTS_2D[dataset] when None; size: (H, W) of every full image."""
    if dataset not in WRITERS_2D:
        raise ValueError(f"{dataset!r}: not one of {', '.join(DATASETS_2D)}")
    plan = plan_2d(dataset, patients or PATIENTS_2D[dataset], seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    WRITERS_2D[dataset](Path(root), plan, tuple(size), np.random.default_rng([seed, 2]))
    return Path(root)


def synthetic_2d_archive(dataset, patients=None, seed=0, root=None, size=(256, 192)):
    """write_2d_archive once (in a tmp dir, then os.replace) -> the folder: root, else
    synthetic-2d-<dataset>-p<patients>-s<seed>[-<H>x<W> when not 256 x 192] in the cache."""
    patients = patients or PATIENTS_2D.get(dataset, 0)
    return _write_once(Path(root or _cache_2d(dataset, patients, seed, size)),
                       TABLE_2D.get(dataset, "?"),
                       lambda tmp: write_2d_archive(tmp, dataset, patients, seed, size))


def _cache_2d(dataset, patients, seed, size):
    size = "" if tuple(size) == (256, 192) else "-{}x{}".format(*size)
    return utils.cache_base() / f"synthetic-2d-{dataset}-p{patients}-s{seed}{size}"


def _write_once(root, marker, write):
    """root with its marker file, written by write(tmp folder) then os.replace'd unless there."""
    if (root / marker).exists():
        return root
    tmp = Path(utils.tmp_name(root))
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        os.replace(tmp, root)
    except OSError:  # another process won the race (or root is a non-empty folder): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / marker).exists():
            raise ValueError(f"{root}: exists and is not a synthetic archive") from None
    return root


def get_args(argv=None):
    p = utils.one_line_errors(argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    num = utils.number
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=argparse.SUPPRESS,  # its default depends on --dataset
                   help="output folder: new, empty, or an archive this command wrote "
                   f"(then reused); none given: {utils.cache_base() / 'synthetic'} for dbt, "
                   "synthetic_2d_archive's folder for the others")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("dbt",) + DATASETS_2D, default="dbt",
                   help="dbt: BCS-DBT's layout; else that 2-D benchmark's download layout")
    g.add_argument("--patients", type=num(int, 1, 100000), default=argparse.SUPPRESS,
                   help="patients, 4 views each (2-D: as their dataset has them); none given: 8 "
                   f"for dbt, else {', '.join(f'{k} {v}' for k, v in PATIENTS_2D.items())}")
    g.add_argument("--seed", type=num(int, 0, utils.SEED_MAX), default=0, help="random seed")
    g.add_argument("--height", type=num(int, 16, 8192), default=256, help="rows per slice")
    g.add_argument("--width", type=num(int, 16, 8192), default=192, help="columns per slice")
    g = p.add_argument_group("dbt only")
    g.add_argument("--slices", type=num(int, 1, 1000), default=24, help="slices per volume")
    g.add_argument("--lesion-rate", type=num(float, 0, 10), default=0.0,
                   help="mean extra masses per view (detection archives; BCS-DBT's are enriched)")
    g.add_argument("--hazard", type=num(float, 0, 10, lo_open=True), default=HAZARD,
                   help="base of the yearly cancer hazard, exp(0.5 density + 0.8 risk) times this")
    args = p.parse_args(argv)
    args.patients = getattr(args, "patients", None) or PATIENTS_2D.get(args.dataset, 8)
    dbt_out = str(utils.cache_base() / "synthetic") if args.dataset == "dbt" else None
    args.out = getattr(args, "out", None) or dbt_out
    return args


def synth_command(args):
    """`python phantoms.py`: write an archive, or reuse the one there and say how large it is."""
    if args.dataset != "dbt":
        return synth_2d_command(args)
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
    _check_new(out)
    shape = (args.slices, args.height, args.width)
    root = synthetic_archive(out, args.patients, args.seed, shape, args.lesion_rate, args.hazard)
    return f"wrote {root}: {4 * args.patients} volumes of {args.patients} patients"


def _check_new(out):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an archive written by phantoms.py; "
                         "choose another --out")


def synth_2d_command(args):
    """`python phantoms.py --dataset NAME`: a 2-D benchmark's phantom archive, written or reused."""
    size = (args.height, args.width)
    out = Path(args.out or _cache_2d(args.dataset, args.patients, args.seed, size))
    if (out / TABLE_2D[args.dataset]).exists():
        return f"reused {out}: a {args.dataset} archive; remove the folder to rewrite it"
    _check_new(out)
    synthetic_2d_archive(args.dataset, args.patients, args.seed, out, size)
    return f"wrote {out}: {args.dataset} layout, {args.patients} patients, {size[0]}x{size[1]}"


if __name__ == "__main__":
    try:
        print(synth_command(get_args()))
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
