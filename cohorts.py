"""Label tables read as published, into rows of volume or exam, patient, labels and split.

BCS-DBT (Duke's Breast-Cancer-Screening-DBT on TCIA, Buda et al. 2021): three kinds of CSV joined on
(PatientID, StudyUID, View), each one file or one per split named by train, validation (val) or test
(the last in sort order wins: -v2 over -v1). *file-paths*: descriptive_path (or TCIA's
classic_path); *labels*: a row per volume; *boxes*: Slice, X, Y, Width, Height (top-left, pixels of
the official orientation), Class (benign or cancer), VolumeSlices. Unless the names give train and
val, split_volumes splits whole patients, seeded, stratified by any box.

Our exam table (exams.csv), a row per exam: patient, exam, the four views of DBT-DINO §2.4 (RCC,
LCC, RMLO, LMLO: paths relative to the table, or Study/Series/SOPInstanceUID on a PACS), and as
needed density (a-d), years_to_cancer (empty: none), years_of_followup, split (train, val or test,
one per patient; without it assign_splits draws 60/20/20 % of the patients, seeded). From those,
probe.py's risk targets: Mirai's labels and masks (risk_labels), the splits without exams lacking
follow-up and DBT-DINO's balanced val set (why a year cannot be scored: metrics.py).

MammoDINO's five 2-D benchmarks as downloaded: read_vindr, read_rsna, read_cbis, read_cmmd and
read_cdd_cesm -> (units, counts), a unit per image with patient, image path, laterality, official
split and label cells checked against the published values (VOCAB; .xlsx read by utils.read_xlsx).
task_labels makes one task's classes by the rule label_rule states (VinDr cancer = BI-RADS 5,
CBIS-DDSM malignant if any abnormality is, RSNA and CMMD per breast); split_units keeps official
splits, else splits patients seeded and stratified; tally: listed = scored + excluded + skipped.
"""

import ast
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

import dicom
import metrics
import pacs
import utils

SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
BOX_FIELDS = ("X", "Y", "Width", "Height", "Slice", "VolumeSlices")
VIEWS = ("RCC", "LCC", "RMLO", "LMLO")  # DBT-DINO's concatenation order


def _csvs(root, kind):
    """{split or None: path} of the CSVs in root whose name holds kind (the last name wins)."""
    found = {}
    for p in sorted(Path(root).glob("*.csv")):
        name = p.name.lower()
        if kind in name:
            rest = name.replace(kind, "")
            found[next((v for k, v in SPLIT_NAMES.items() if k in rest), None)] = p
    return found


def _rows(path, columns, sheet=None):
    rows = utils.read_table(path, sheet)
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _key(r):
    return r["PatientID"], r["StudyUID"], r["View"]


def _boxes_by_volume(files):
    """(PatientID, StudyUID, View) -> box rows, numeric fields parsed (a bad one names its row)."""
    out = {}
    for path in files:
        for i, r in enumerate(_rows(path, ("PatientID", "StudyUID", "View") + BOX_FIELDS)):
            try:
                num = {k: float(r[k]) for k in BOX_FIELDS}
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {i + 1}: a box field of {BOX_FIELDS} is not a "
                                 "number") from None
            out.setdefault(_key(r), []).append(dict(r, **num))
    return out


def load_volumes(root):
    """-> (volumes, skipped): a dict per labels row (key, patient, path, view, split, header sizes,
    raw and clipped boxes); a row whose file is missing or unreadable is logged and skipped."""
    paths, labels = _csvs(root, "file-paths"), _csvs(root, "labels")
    if not paths or not labels:
        raise FileNotFoundError(f"{root}: no *file-paths*.csv and *labels*.csv (BCS-DBT layout)")
    where = {}
    for split, p in paths.items():
        for r in _rows(p, ("PatientID", "StudyUID", "View", "descriptive_path")):
            rel = r["descriptive_path"]
            if not (rel and (Path(root) / rel).exists()) and r.get("classic_path"):
                rel = r["classic_path"]  # a tree downloaded in TCIA's classic layout
            where[_key(r)] = (rel, split)
    boxes = _boxes_by_volume(_csvs(root, "boxes").values())
    volumes = []
    skipped = dropped = 0  # unreadable volumes, zero-size boxes
    for split, p in labels.items():
        for r in _rows(p, ("PatientID", "StudyUID", "View")):
            key = _key(r)
            rel, path_split = where.get(key, ("", None))
            try:
                if not rel:
                    raise ValueError(f"{p}: volume {key} has no file-paths row")
                meta = dicom.index_volume(Path(root) / rel)
            except (ValueError, OSError) as e:
                utils.log(f"skipped: {e}")
                skipped += 1
                continue
            vol = dict(key=key, patient=r["PatientID"], view=r["View"], split=split or path_split,
                       path=str(Path(root) / rel), rows=meta["rows"], cols=meta["cols"],
                       n_slices=meta["n_frames"], raw_boxes=boxes.get(key, []))
            vol["boxes"] = _clip_boxes(vol)
            dropped += len(vol["raw_boxes"]) - len(vol["boxes"])
            volumes.append(vol)
    if not volumes:
        raise ValueError(f"{root}: none of the listed volumes could be read ({skipped} skipped)")
    if skipped or dropped:
        utils.log(f"{skipped} volume(s) skipped (missing or unreadable file), {dropped} zero-size "
                  "box(es) dropped")
    return volumes, skipped


def _clip_boxes(vol):
    """Boxes as [x0, y0, x1, y1, slice, class] clipped to the image; empty or off-volume ones go."""
    out = []
    for b in vol["raw_boxes"]:
        x0, y0 = max(b["X"], 0.0), max(b["Y"], 0.0)
        x1, y1 = min(b["X"] + b["Width"], vol["cols"]), min(b["Y"] + b["Height"], vol["rows"])
        if x1 > x0 and y1 > y0 and 0 <= b["Slice"] < vol["n_slices"]:
            out.append([x0, y0, x1, y1, int(b["Slice"]), b.get("Class", "")])
    return out


def split_volumes(volumes, val_fraction, test_fraction, seed):
    """{train, val, test}: the CSVs' split, else whole patients, seeded, stratified by any box."""
    if all(v["split"] for v in volumes) and {"train", "val"} <= {v["split"] for v in volumes}:
        return {s: [v for v in volumes if v["split"] == s] for s in ("train", "val", "test")}
    positive = {}  # lesions are rare: unstratified, val could get none by chance
    for v in volumes:
        positive[v["patient"]] = positive.get(v["patient"], False) or bool(v["boxes"])
    part = _split_patients(positive, val_fraction, test_fraction, seed)
    return {s: [v for v in volumes if part[v["patient"]] == s] for s in ("train", "val", "test")}


def _split_patients(stratum, val_fraction, test_fraction, seed, spread=False):
    """{patient: train, val or test}: each stratum (stratum[patient], highest first) shuffled,
    seeded, and cut by the fractions; with spread, each split with a fraction gets at least one
    patient of every stratum that has enough of them for all."""
    rng, part = np.random.default_rng(seed), {}
    for s in sorted(set(stratum.values()), reverse=True):
        group = sorted(p for p, t in stratum.items() if t == s)
        group = [group[i] for i in rng.permutation(len(group))]
        n_test, n_val = round(len(group) * test_fraction), round(len(group) * val_fraction)
        if spread and len(group) > (test_fraction > 0) + (val_fraction > 0):
            n_test, n_val = max(n_test, int(test_fraction > 0)), max(n_val, int(val_fraction > 0))
        part.update({p: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                     for i, p in enumerate(group)})
    return part


def read_exams(source):
    """--data (a CSV, or a folder holding exams.csv) -> (rows, the folder view paths start from)."""
    path = Path(source)
    path = path / "exams.csv" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exam table (give a CSV, or a folder with exams.csv)")
    rows = _rows(path, ("patient", "exam") + VIEWS)
    if not rows:
        raise ValueError(f"{path}: no exams")
    seen = set()
    for i, r in enumerate(rows):
        if r["exam"] in seen:
            raise ValueError(f"{path}: row {i + 1}: exam {r['exam']!r} appears twice")
        seen.add(r["exam"])
    return rows, path.parent


def instance_uids(cell, where="view"):
    """'StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID' -> dict of pacs.UID_COLUMNS, checked."""
    uids = cell.split("/")
    if len(uids) != 3 or not all(len(u) <= 64 and pacs.UID.fullmatch(u) for u in uids):
        raise ValueError(f"{where}: {cell[:80]!r} is not "
                         "StudyInstanceUID/SeriesInstanceUID/SOPInstanceUID")
    return dict(zip(pacs.UID_COLUMNS, uids))


def manifest_instances(rows, manifest):
    """{view cell: instance_uids(cell)} of a DICOMweb exam table, cells stripped in place; an empty
    cell is a missing view (its exam is left out and counted), a malformed one names its row."""
    instances = {}
    for i, r in enumerate(rows):
        for v in VIEWS:
            r[v] = (r[v] or "").strip()
            if r[v]:
                instances[r[v]] = instance_uids(r[v], f"{manifest} row {i + 1} {v}")
    return instances


def assign_splits(rows, seed):
    """The table's `split` column, else 60/20/20 by patient, seeded; a patient's exams share one."""
    if "split" in rows[0]:
        bad = [i for i, r in enumerate(rows) if r["split"] not in ("train", "val", "test")]
        if bad:
            raise ValueError(f"exam table row {bad[0] + 1}: split {rows[bad[0]]['split']!r} is not "
                             "train, val or test")
        first = {}
        for r in rows:  # a patient in two splits leaks their other exams' features into evaluation
            s = first.setdefault(r["patient"], r["split"])
            if s != r["split"]:
                raise ValueError(f"exam table: patient {r['patient']!r} has exams in both the {s} "
                                 f"and the {r['split']} split; all of a patient's exams must share "
                                 "one split")
        return [r["split"] for r in rows]
    patients = sorted({r["patient"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train, n_val = round(0.6 * len(patients)), round(0.2 * len(patients))
    split_of = {patients[i]: "train" if rank < n_train else "val" if rank < n_train + n_val
                else "test" for rank, i in enumerate(order)}
    return [split_of[r["patient"]] for r in rows]


def stratified_subset(labels, fraction, seed):
    """Sorted indices of a seeded, class-stratified `fraction` of cases (at least one per class)."""
    rng, keep = np.random.default_rng(seed), []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep += rng.choice(idx, max(1, round(fraction * len(idx))), replace=False).tolist()
    return np.sort(keep)


def density_targets(rows):
    """The density column as classes 0-3 (a-d), (N,); a bad value names its exam."""
    y = []
    for r in rows:
        d = (r.get("density") or "").strip().lower()
        if len(d) != 1 or d not in "abcd":
            raise ValueError(f"exam {r['exam']}: density {r.get('density')!r} is not one of a, b, "
                             "c, d")
        y.append("abcd".index(d))
    return np.array(y)


def risk_targets(rows):
    """(years_to_cancer or inf, years_of_followup) as (N,) floats; a bad value names its exam."""
    ytc, yfu = [], []
    for r in rows:
        try:
            t = (r.get("years_to_cancer") or "").strip()
            ytc.append(float(t) if t else math.inf)
            yfu.append(float(r["years_of_followup"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"exam {r['exam']}: years_to_cancer {r.get('years_to_cancer')!r} / "
                             f"years_of_followup {r.get('years_of_followup')!r} are not numbers "
                             "(years_to_cancer empty = none)") from None
        for name, value in (("years_to_cancer", ytc[-1]), ("years_of_followup", yfu[-1])):
            if math.isnan(value) or value < 0:  # a NaN would fail only after training
                raise ValueError(f"exam {r['exam']}: {name} {r.get(name)!r} is NaN or negative "
                                 "(years_to_cancer empty = none)")
    return np.array(ytc), np.array(yfu)


# ----------------------------------------------------------------------------- risk: labels, splits
def risk_labels(years_to_cancer, years_of_followup, years=metrics.YEARS):
    """Mirai's get_label -> (y_label, y_mask), float32 (N, years).

    A cancer within `years` (years_to_cancer < years; NaN or inf = none) has its event year
    t = int(years_to_cancer): y_label[t:] = 1, observed through t. Otherwise y_label is 0 and
    t = int(min(follow-up, years) - 1). The mask is 1 for years 0..t: follow-up <= 0 masks all."""
    ytc = np.nan_to_num(np.asarray(years_to_cancer, dtype=float), nan=np.inf)
    yfu = np.asarray(years_of_followup, dtype=float)
    cancer = ytc < years
    t = np.where(cancer, np.trunc(np.where(cancer, ytc, 0)), np.trunc(np.minimum(yfu, years) - 1))
    k = np.arange(years)[None, :]  # (1, years)
    y_label = (cancer[:, None] & (k >= t[:, None])).astype(np.float32)
    y_mask = (k <= t[:, None]).astype(np.float32)
    return y_label, y_mask


def split_indices(split, task):
    """train, val, test indices of a split array; an empty split is an error."""
    parts = [np.flatnonzero(split == s) for s in ("train", "val", "test")]
    empty = [s for s, p in zip(("train", "val", "test"), parts) if len(p) == 0]
    if empty:
        raise ValueError(f"{task}: the {' and '.join(empty)} split(s) are empty; add exams or a "
                         "split column")
    return parts


def observed_splits(split, unobserved, rows):
    """train, val, test indices without the exams that have no follow-up; none may be empty (an
    empty val split leaves the LR search no loss, an empty test split nothing to report)."""
    before = split_indices(split, "risk")
    parts = [np.setdiff1d(p, unobserved) for p in before]
    for name, exams, after in zip(("train", "val", "test"), before, parts):
        if len(after) == 0:
            raise ValueError(f"risk: all {len(exams)} exams of the {name} split have no follow-up "
                             f"(years_of_followup 0, e.g. exam {rows[exams[0]]['exam']}); the "
                             "split needs exams with follow-up")
    return parts


def balanced_val(va, cancer, seed):
    """DBT-DINO's val set: the val cancers plus as many healthy val exams (else all of val)."""
    pos, neg = va[cancer[va]], va[~cancer[va]]
    if len(pos) == 0 or len(neg) == 0:
        utils.log("risk: the val split lacks cancers or healthy exams; validating on all of it")
        return va
    healthy = np.random.default_rng(seed).choice(neg, min(len(pos), len(neg)), replace=False)
    return np.sort(np.r_[pos, healthy])


# ----------------------------------------------------------------------------- 2-D: the datasets
LR, VIEWS_2D = ("L", "R"), ("CC", "MLO")
DENSITY_CLASS = {"A": 0, "B": 1, "C": 2, "D": 3, "1": 0, "2": 1, "3": 2, "4": 3}
LESION_TYPES = ("mass", "calcification", "both")  # the classes of lesion-type, in order
VINDR_FINDINGS = ("No Finding", "Architectural Distortion", "Asymmetry", "Focal Asymmetry",
                  "Global Asymmetry", "Mass", "Nipple Retraction", "Skin Retraction",
                  "Skin Thickening", "Suspicious Calcification", "Suspicious Lymph Node")
CDD_PATHOLOGY = "Pathology Classification/ Follow up"  # sic: a space after the slash
# The columns each reader checks, with their published values ("": a blank cell is allowed)
VOCAB = {
    "vindr": {"laterality": LR, "view_position": VIEWS_2D, "split": ("training", "test"),
              "breast_birads": tuple(f"BI-RADS {k}" for k in range(1, 6)),
              "breast_density": tuple(f"DENSITY {c}" for c in "ABCD")},
    "rsna": {"laterality": LR, "cancer": ("0", "1"), "BIRADS": ("", "0", "1", "2"),
             "density": ("", "A", "B", "C", "D")},
    "cbis-ddsm": {"left or right breast": ("LEFT", "RIGHT"), "image view": VIEWS_2D,
                  "assessment": tuple("012345"),
                  "pathology": ("BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT")},
    "cmmd": {"LeftRight": LR, "abnormality": LESION_TYPES,
             "classification": ("Benign", "Malignant")},
    "cdd-cesm": {"Side": LR, "Type": ("DM", "CESM"), "View": VIEWS_2D,
                 "BIRADS": ("",) + tuple("0123456"),
                 "Breast density (ACR)": ("",) + tuple(DENSITY_CLASS),
                 CDD_PATHOLOGY: ("Normal", "Benign", "Malignant")}}


def _glob(root, *patterns):
    """Paths matching the first pattern that matches in root, else one folder down."""
    hits = (sorted(Path(root).glob(p)) or sorted(Path(root).glob(f"*/{p}")) for p in patterns)
    return next((found for found in hits if found), [])


def _one(root, what, *patterns):
    found = _glob(root, *patterns)
    if not found:
        raise ValueError(f"{root}: no {what} {' or '.join(patterns)!r} (here or one folder down)")
    return found[0]


def _cell(r, column, allowed, at):
    """r[column] with stray spaces and a float's ".0" dropped (RSNA writes BIRADS 0.0); a value
    outside `allowed` is a one-line ValueError naming the row and the value."""
    v = re.sub(r"^(\d+)\.0+$", r"\1", " ".join((r.get(column) or "").split()))
    if v not in allowed:
        raise ValueError(f"{at}: {column} {r.get(column)!r} is not one of "
                         f"{', '.join(a or '(empty)' for a in allowed)}")
    return v


def _checked(path, dataset, ids=(), sheet=None):
    """The rows of a table that must have rows and the columns ids + VOCAB[dataset], those cells
    cleaned and checked by _cell, and `where` (file and row) for later messages."""
    rows = _rows(path, tuple(ids) + tuple(VOCAB[dataset]), sheet)
    if not rows:
        raise ValueError(f"{path}: no rows below the header")
    return [dict(r, where=f"{path} row {i + 1}", **{c: _cell(r, c, v, f"{path} row {i + 1}")
                                                   for c, v in VOCAB[dataset].items()})
            for i, r in enumerate(rows)]


def _keep(units, skipped, root, path, r, **fields):
    """A unit of row r and fields when its image file exists, else one more skipped."""
    if path.is_file():
        units.append(dict(r, image=path.relative_to(root).as_posix(), **fields))
    else:
        skipped["image file missing"] += 1


def _counts(units, rows, skipped, **more):
    """A reader's record: table rows read, images listed (kept + skipped), why some were not."""
    return dict(rows=rows, images=len(units) + sum(skipped.values()), skipped=skipped, **more)


def read_vindr(root):
    """VinDr-Mammo (PhysioNet 1.0.0) -> (units, counts): a unit per row (image) of
    breast-level_annotations.csv, images/<study_id>/<image_id>.dicom, with the official split and
    `findings`: the image's finding_categories in finding_annotations.csv (None without that
    file). VinDr has no patient id: the study stands for the patient."""
    root = Path(root)
    table = _one(root, "VinDr table", "breast-level_annotations.csv")
    images, findings = _one(root, "folder", "images"), _vindr_findings(root)
    rows, units, skipped = _checked(table, "vindr", ("study_id", "image_id")), [], Counter()
    for r in rows:
        _keep(units, skipped, root, images / r["study_id"] / f"{r['image_id']}.dicom", r,
              dataset="vindr", patient=r["study_id"], view=r["view_position"],
              split=r["split"].replace("training", "train"),
              findings=None if findings is None else sorted(findings.get(r["image_id"], ())))
    return units, _counts(units, len(rows), skipped)


def _vindr_findings(root):
    """image_id -> the set of its finding_categories (a Python-list string per box row), or None."""
    found = _glob(root, "finding_annotations.csv")
    if not found:
        return None
    out = {}
    for i, r in enumerate(_rows(found[0], ("image_id", "finding_categories"))):
        try:
            cats = ast.literal_eval(r["finding_categories"].strip())
        except (ValueError, SyntaxError):
            cats = None
        if not isinstance(cats, list) or not set(map(str, cats)) <= set(VINDR_FINDINGS):
            raise ValueError(f"{found[0]} row {i + 1}: finding_categories "
                             f"{r['finding_categories']!r} is not a list of "
                             f"{', '.join(VINDR_FINDINGS)}")
        out.setdefault(r["image_id"], set()).update(cats)
    return out


def read_rsna(root, views=VIEWS_2D):
    """RSNA Screening Mammography (Kaggle 2022-23) -> (units, counts): a unit per row (image) of
    train.csv, train_images/<patient_id>/<image_id>.dcm, with its breast's prediction_id
    (<patient_id>_<L|R>, the competition's unit); no official split (the test labels are not
    public). Views outside `views` (a few AT, LM, ML, LMO) are skipped, counted by view."""
    root = Path(root)
    table, images = _one(root, "RSNA table", "train.csv"), _one(root, "folder", "train_images")
    rows = _checked(table, "rsna", ("patient_id", "image_id", "view"))
    units, skipped = [], Counter()
    for r in rows:
        view = r["view"].strip()
        if views is not None and view not in views:
            skipped[f"view {view or '(empty)'}"] += 1
            continue
        _keep(units, skipped, root, images / r["patient_id"] / f"{r['image_id']}.dcm", r,
              dataset="rsna", patient=r["patient_id"], view=view, split="",
              prediction_id=f"{r['patient_id']}_{r['laterality']}")
    return units, _counts(units, len(rows), skipped)


def read_cbis(root):
    """CBIS-DDSM (TCIA) -> (units, counts): a unit per full mammogram of the four
    {mass,calc}_case_description_{train,test}_set.csv (a row per abnormality) with its rows'
    pathology, assessment and density, lesion_type (which CSV) and the official split. The CSV
    paths (Mass-Training_P_00001_LEFT_CC/<uid>/<uid>/000000.dcm) share only their folder with
    the download's (CBIS-DDSM/<folder>/<date>/<series>/1-1.dcm): the image is that folder's .dcm."""
    root = Path(root)
    tables = _glob(root, "*case_description*_set.csv")
    found = _glob(root, "CBIS-DDSM")
    folders = {p.name: p for p in (found[0] if found else root).iterdir() if p.is_dir()}
    if not tables or not any(f.startswith(("Mass-", "Calc-")) for f in folders):
        raise ValueError(f"{root}: no *case_description*_set.csv or no image folder 'CBIS-DDSM' "
                         "(or Mass-*, Calc-* folders)")
    by_folder, n_rows = {}, 0
    for table in tables:
        for image, values in _cbis_rows(table):
            u = by_folder.setdefault(image["folder"], dict(image, **{k: [] for k in values}))
            for k, v in values.items():
                u[k].append(v)
            n_rows += 1
    units, skipped = [], Counter()
    for name, u in by_folder.items():
        files = sorted(folders[name].rglob("*.dcm")) if name in folders else []
        if files:
            units.append(dict(u, image=files[0].relative_to(root).as_posix()))
        else:
            skipped["image folder missing"] += 1
    return units, _counts(units, n_rows, skipped)


def _cbis_rows(table):
    """(the image's fields, the row's labels) per row of one CBIS-DDSM CSV; its name gives the
    kind and split, and the mass CSVs say breast_density where the calc ones say breast density."""
    name = table.name.lower()
    kind = {"mass": "mass", "calc": "calcification"}.get(name[:4])
    split = "test" if "_test" in name else "train" if "_train" in name else None
    if kind is None or split is None:
        raise ValueError(f"{table}: not a {{mass,calc}}_case_description_{{train,test}}_set.csv")
    rows = _checked(table, "cbis-ddsm", ("patient_id", "image file path"))
    density = next((c for c in ("breast_density", "breast density") if c in rows[0]), None)
    if density is None:
        raise ValueError(f"{table}: missing column breast_density (or 'breast density')")
    prefix = f"{kind[:4].title()}-{'Test' if split == 'test' else 'Training'}_"
    for r in rows:
        folder = r["image file path"].strip().split("/")[0]  # the cell may end in a newline
        if not folder.startswith(prefix):
            raise ValueError(f"{r['where']}: image file path {r['image file path']!r} does not "
                             f"start with {prefix}")
        yield (dict(dataset="cbis-ddsm", patient=r["patient_id"].strip(), folder=folder,
                    laterality=r["left or right breast"][0], view=r["image view"], split=split,
                    lesion_type=kind, where=r["where"]),
               dict(pathology=r["pathology"], assessment=r["assessment"],
                    density=_cell(r, density, tuple("1234"), r["where"])))


def _header_laterality(path):
    ds = dicom.read_header(path)
    return ds.get("ImageLaterality") or ds.get("Laterality") or ""


def read_cmmd(root, laterality_of=_header_laterality):
    """CMMD (TCIA) -> (units, counts): a unit per .dcm under CMMD/<ID1>/, joined on (ID1,
    LeftRight) to its breast's row of CMMD_clinicaldata_revision.xlsx (or a CSV export). File
    names carry no laterality: laterality_of(path) gives it, by default the header's
    ImageLaterality (else Laterality), read without pixels; a file with neither is skipped. Only
    breasts with a finding have a row: the others get listed=False. No official split."""
    root = Path(root)
    table = _one(root, "CMMD table", "CMMD_clinicaldata*.xlsx", "CMMD_clinicaldata*.csv")
    images, rows, breasts = _one(root, "folder", "CMMD"), _checked(table, "cmmd", ("ID1",)), {}
    for r in rows:
        first = breasts.setdefault((r["ID1"].strip(), r["LeftRight"]), r)
        if first["classification"] != r["classification"]:
            raise ValueError(f"{r['where']}: {r['ID1']} {r['LeftRight']} is {r['classification']} "
                             f"here but {first['classification']} at {first['where']}")
    units, skipped = [], Counter()
    for path in sorted(images.rglob("*.dcm")):
        patient, lat = path.relative_to(images).parts[0], str(laterality_of(path)).strip()
        if lat not in LR:
            skipped["no laterality in the header"] += 1
            continue
        row = breasts.get((patient, lat))
        units.append(dict(row or dict(where=str(path)), dataset="cmmd", patient=patient,
                          laterality=lat, split="", listed=row is not None,
                          image=path.relative_to(root).as_posix()))
    seen = {(u["patient"], u["laterality"]) for u in units}
    return units, _counts(units, len(rows), skipped, rows_without_images=len(set(breasts) - seen))


def read_cdd_cesm(root, subtracted=False):
    """CDD-CESM (TCIA) -> (units, counts): a unit per image of Radiology manual annotations.xlsx
    (sheet all; or a CSV export; a row per finding, whose pathology, BIRADS and density the unit
    collects): low-energy (Type DM, "Low energy images of CDD-CESM"), or with subtracted=True the
    recombined ones (Type CESM, "Subtracted images of CDD-CESM"). Image_name (no extension, stray
    spaces) matches a file name with spaces dropped and case ignored, so odd names (P281_L_DM_MLO2)
    resolve as listed; Side and View say side and view. No official split."""
    root = Path(root)
    table = _one(root, "CDD-CESM table", "Radiology manual annotations*.xlsx",
                 "Radiology manual annotations*.csv")
    folder = _one(root, "folder", ("Subtracted" if subtracted else "Low energy")
                  + " images of CDD-CESM")
    files = {"".join(p.stem.split()).lower(): p for p in folder.iterdir() if p.is_file()}
    rows, by_name = _checked(table, "cdd-cesm", ("Image_name", "Patient_ID"), sheet="all"), {}
    for r in rows:
        if r["Type"] != ("CESM" if subtracted else "DM"):
            continue
        u = by_name.setdefault("".join(r["Image_name"].split()).lower(), dict(
            dataset="cdd-cesm", Image_name=" ".join(r["Image_name"].split()),
            patient=r["Patient_ID"].strip(), laterality=r["Side"],
            view=r["View"], split="", where=r["where"], pathology=[], birads=[], density=[]))
        for k, column in (("pathology", CDD_PATHOLOGY), ("birads", "BIRADS"),
                          ("density", "Breast density (ACR)")):
            u[k].append(r[column])
    units, skipped = [], Counter()
    for name, u in by_name.items():
        _keep(units, skipped, root, files.get(name, folder / name), u)
    return units, _counts(units, len(rows), skipped)


READERS = {"vindr": read_vindr, "rsna": read_rsna, "cbis-ddsm": read_cbis, "cmmd": read_cmmd,
           "cdd-cesm": read_cdd_cesm}
# The table each download has and no other (here or one folder down, as the readers look)
MARKERS = {"dbt": ("exams.csv", "*file-paths*.csv"), "vindr": ("breast-level_annotations.csv",),
           "rsna": ("train.csv",), "cbis-ddsm": ("*case_description*_set.csv",),
           "cmmd": ("CMMD_clinicaldata*.xlsx", "CMMD_clinicaldata*.csv"),
           "cdd-cesm": ("Radiology manual annotations*.xlsx", "Radiology manual annotations*.csv")}


def detect_dataset(root):
    """Which download a folder holds, from its tables (MARKERS): one name, or a one-line error
    when none or several match (then --dataset says which)."""
    found = [name for name, patterns in MARKERS.items() if _glob(root, *patterns)]
    if len(found) != 1:
        what = f"tables of {', '.join(found)}" if found else "none of the known tables"
        raise ValueError(f"{root}: holds {what}; name the dataset with --dataset "
                         f"({', '.join(MARKERS)})")
    return found[0]


# ----------------------------------------------------------------------------- 2-D: labels, splits
ANY_POSITIVE = ("cancer", "mass", "calcification")  # a breast has one if any of its images does
BREAST_LEVEL = ("rsna", "cmmd")  # labelled per breast by their publishers; the rest per image
RULES = {
    "vindr": dict(cancer="breast_birads BI-RADS >= {b} (a proxy: VinDr has no pathology)",
                  birads="breast_birads BI-RADS 1-5 -> 0-4", density="DENSITY A-D -> 0-3",
                  mass="'Mass' among the image's finding_categories",
                  calcification="'Suspicious Calcification' among the image's finding_categories"),
    "rsna": dict(cancer="the cancer column (0/1)",
                 birads="BIRADS 0 (recall), 1 (negative), 2 (normal); empty excluded",
                 density="density A-D -> 0-3; empty excluded"),
    "cbis-ddsm": {"cancer": "malignant if any abnormality of the image is MALIGNANT "
                            "(BENIGN_WITHOUT_CALLBACK is benign)",
                  "birads": "the image's highest assessment, 0-5",
                  "density": "breast density 1-4 -> 0-3 (rows of an image must agree)",
                  "lesion-type": "0 mass, 1 calcification: the CSV that lists the image"},
    "cmmd": {"cancer": "classification Malignant 1, Benign 0", "mass": "abnormality mass or both",
             "calcification": "abnormality calcification or both",
             "lesion-type": "abnormality mass 0, calcification 1, both 2"},
    "cdd-cesm": dict(cancer="malignant if any finding of the image is Malignant (Normal, Benign 0)",
                     birads="the image's highest BIRADS, 0-6; none excluded",
                     density="Breast density (ACR) A-D or 1-4 -> 0-3 (findings must agree)")}
TASKS = {dataset: tuple(rules) for dataset, rules in RULES.items()}  # what each one's labels allow


def classes(dataset, task):
    """A task's class names in label order (a binary task's: 0, 1)."""
    if task == "density":
        return ("A", "B", "C", "D")
    if task == "birads":  # VinDr's labels 0-4 are BI-RADS 1-5
        return {"vindr": tuple("12345"), "rsna": tuple("012"), "cbis-ddsm": tuple("012345"),
                "cdd-cesm": tuple("0123456")}[dataset]
    return LESION_TYPES if (dataset, task) == ("cmmd", "lesion-type") else ("0", "1")


def label_rule(dataset, task, level=None, cancer_birads=5, unlisted_negative=False):
    """The rule task_labels applies, in one line for metrics.json."""
    rule = f"{dataset} {task}: " + RULES[dataset][task].format(b=cancer_birads)
    if dataset == "cmmd":
        negative = unlisted_negative and task != "lesion-type"
        rule += f"; a breast without a row is {'negative' if negative else 'excluded'}"
    if (level or ("breast" if dataset in BREAST_LEVEL else "image")) == "image":
        return rule + "; per image"
    return rule + "; per breast, " + ("positive if any image is" if task in ANY_POSITIVE
                                       else "its images must agree")


def task_labels(dataset, units, task, level=None, cancer_birads=5, unlisted_negative=False):
    """A reader's units -> (scored units with `label`, excluded {reason: images}), by the rule
    label_rule(dataset, task, ...) states. level "breast" (RSNA's and CMMD's default: their labels
    are per breast) groups images by (patient, laterality) into units with `breast`
    (<patient>_<L|R>, RSNA's prediction_id) and `images`. VinDr cancer is BI-RADS 5 (the RSNA
    first-place solution's proxy), or >= cancer_birads. CMMD lists only breasts with a finding:
    the others are excluded ("breast not listed"), or negative with unlisted_negative."""
    if task not in TASKS[dataset]:
        raise ValueError(f"{dataset} has no task {task!r} (it has {', '.join(TASKS[dataset])})")
    level = level or ("breast" if dataset in BREAST_LEVEL else "image")
    if level not in ("image", "breast") or cancer_birads not in range(1, 6):
        raise ValueError(f"level {level!r} (image or breast) or cancer_birads {cancer_birads!r} "
                         "(1-5) is wrong")
    scored, excluded = [], Counter()
    for u in units:
        y = _label(dataset, task, u, cancer_birads, unlisted_negative)
        if isinstance(y, str):
            excluded[y] += 1
        else:
            scored.append(dict(u, label=y))
    return (_breasts(scored, task, excluded) if level == "breast" else scored), excluded


def _label(dataset, task, u, cancer_birads, unlisted_negative):
    """One image's class by RULES, or why it has none (the readers checked every value)."""
    if dataset == "vindr":
        if task in ("cancer", "birads"):
            b = int(u["breast_birads"][-1])
            return int(b >= cancer_birads) if task == "cancer" else b - 1
        if task == "density":
            return DENSITY_CLASS[u["breast_density"][-1]]
        if u["findings"] is None:
            raise ValueError(f"{u['where']}: the {task} task needs finding_annotations.csv")
        return int({"mass": "Mass", "calcification": "Suspicious Calcification"}[task]
                   in u["findings"])
    if dataset == "rsna":
        v = u[{"cancer": "cancer", "birads": "BIRADS", "density": "density"}[task]]
        return f"no {task}" if not v else DENSITY_CLASS[v] if task == "density" else int(v)
    if dataset == "cmmd":
        if not u["listed"]:
            return 0 if unlisted_negative and task != "lesion-type" else "breast not listed"
        if task == "cancer":
            return int(u["classification"] == "Malignant")
        if task == "lesion-type":
            return LESION_TYPES.index(u["abnormality"])
        return int(u["abnormality"] in (task, "both"))
    if task == "cancer":  # CBIS-DDSM and CDD-CESM: a list per image, a value per row
        return int(any(p.upper() == "MALIGNANT" for p in u["pathology"]))
    if task == "lesion-type":
        return LESION_TYPES.index(u["lesion_type"])
    values = {v for v in u["assessment" if dataset == "cbis-ddsm" and task == "birads" else task]
              if v}
    if task == "birads":
        return max(map(int, values)) if values else "no birads"
    classes = {DENSITY_CLASS[v] for v in values}
    return classes.pop() if len(classes) == 1 else "rows disagree on density" if classes \
        else "no density"


def _breasts(scored, task, excluded):
    """Images -> breasts: positive if any image is (ANY_POSITIVE), else the images must agree."""
    groups = {}
    for u in scored:
        groups.setdefault((u["patient"], u["laterality"]), []).append(u)
    out = []
    for (patient, lat), images in groups.items():
        labels = {u["label"] for u in images}
        if len(labels) > 1 and task not in ANY_POSITIVE:
            excluded["images of the breast disagree"] += len(images)
            continue
        out.append(dict(dataset=images[0]["dataset"], patient=patient, laterality=lat,
                        breast=f"{patient}_{lat}", split=images[0]["split"], label=max(labels),
                        images=[u["image"] for u in images]))
    return out


def _n_images(u):
    return len(u["images"]) if "images" in u else 1


def split_units(units, seed, val_fraction=0.2, test_fraction=0.2):
    """Labelled units -> ({train, val, test: units, `split` set}, excluded {reason: images}).

    Where every unit has an official split (VinDr's split column, CBIS-DDSM's train and test
    CSVs), test is kept as given and val drawn from the training patients (val_fraction of them;
    test_fraction is unused); a patient in both official splits keeps only their test units, the
    others are excluded. Otherwise whole patients go, seeded, stratified by label (a patient's
    highest), each label's to every split with a fraction when it has patients enough."""
    official = all(u["split"] for u in units)
    tested = {u["patient"] for u in units if official and u["split"] == "test"}
    leaked = [u for u in units if u["patient"] in tested and u["split"] != "test"]
    units = [u for u in units if u["patient"] not in tested or u["split"] == "test"]
    stratum = {}
    for u in units:
        if u["patient"] not in tested:
            stratum[u["patient"]] = max(stratum.get(u["patient"], u["label"]), u["label"])
    part = _split_patients(stratum, val_fraction, 0.0 if official else test_fraction, seed,
                           spread=True)
    out = {s: [] for s in ("train", "val", "test")}
    for u in units:
        s = "test" if u["patient"] in tested else part[u["patient"]]
        out[s].append(dict(u, split=s))
    leak = sum(map(_n_images, leaked))
    return out, {"patient also in the official test split": leak} if leak else {}


def tally(counts, scored, excluded):
    """The accounting for metrics.json: images listed = scored + excluded + skipped, checked."""
    n_scored, n_excluded, n_skipped = (sum(map(_n_images, scored)), sum(excluded.values()),
                                       sum(counts["skipped"].values()))
    if n_scored + n_excluded + n_skipped != counts["images"]:
        raise ValueError(f"{counts['images']} images listed but {n_scored} scored + {n_excluded} "
                         f"excluded + {n_skipped} skipped")
    return dict(rows_read=counts["rows"], images=counts["images"], scored_units=len(scored),
                scored_images=n_scored, excluded=excluded, skipped=counts["skipped"])


# ------------------------------------------------------------------------ 2-D: probe.py's units
IMAGE_IDS = {"vindr": ("study_id", "image_id"), "rsna": ("patient_id", "image_id"),
             "cbis-ddsm": ("folder",), "cmmd": ("image",), "cdd-cesm": ("Image_name",)}


def unit_ids(dataset, u):
    """The dataset's own id columns of a scored unit (an image, or a breast with `images`)."""
    if "images" in u:
        if dataset == "cmmd":
            return {"ID1": u["patient"], "LeftRight": u["laterality"]}
        return {"prediction_id" if dataset == "rsna" else "breast": u["breast"]}
    return {c: " ".join(str(u[c]).split()) for c in IMAGE_IDS[dataset]}


def unit_images(u):
    return u["images"] if "images" in u else [u["image"]]  # a breast's, or the image itself


def drop_unreadable(parts, images, records, counts):
    """Units keep their readable images; units with none are dropped. The unreadable ones move to
    counts' skipped ("unreadable image"). -> {split: units}, each unit's `rows` into images."""
    where = {im: k for k, im in enumerate(images)}
    bad = sum(where[im] not in records for im in images)
    if bad:
        counts["skipped"]["unreadable image"] += bad
    out = {}
    for s, units in parts.items():
        out[s] = []
        for u in units:
            rows = [where[im] for im in unit_images(u) if where[im] in records]
            if rows:
                out[s].append(dict(u, rows=rows, images=[images[k] for k in rows])
                              if "images" in u else dict(u, rows=rows))
    return out
