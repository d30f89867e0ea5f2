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
follow-up, DBT-DINO's balanced val set, and why a year cannot be scored (year_not_scored).
"""

import math
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


def _rows(path, columns):
    rows = utils.read_csv(path)
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
    rng, part = np.random.default_rng(seed), {}
    positive = {v["patient"] for v in volumes if v["boxes"]}  # rare: val could get none by chance
    for group in (sorted(positive), sorted({v["patient"] for v in volumes} - positive)):
        group = [group[i] for i in rng.permutation(len(group))]
        n_test, n_val = round(len(group) * test_fraction), round(len(group) * val_fraction)
        part.update({p: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                     for i, p in enumerate(group)})
    return {s: [v for v in volumes if part[v["patient"]] == s] for s in ("train", "val", "test")}


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


def year_not_scored(years_to_cancer, years_of_followup, year, rule):
    """Why `year` has no AUROC by `rule` (metrics.risk_year_cases) on these exams: "no cancers
    within 1 year" or "no exams ... (their negatives)", else None (it has both classes)."""
    keep, positive = metrics.risk_year_cases(years_to_cancer, years_of_followup, year,
                                             metrics.YEARS, rule)
    span = f"{year} year" + "s" * (year > 1)
    if not positive.any():
        return f"no cancers within {span}"
    if not (keep & ~positive).any():  # the rule's negatives, in its own words
        later = "by then" if rule == "mirai" else f"within {metrics.YEARS} years"
        return f"no exams followed {span} without a cancer {later}"
    return None
