"""phantoms.py's 2-D archives: each of MammoDINO's five benchmarks written in its download layout
(write_2d_archive), read back by cohorts.py's reader as a real download is, with every task's
classes in every split, the layout quirks really in the files, and the labels visible in pixels."""
import csv
import shutil
import functools
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

import cohorts
import data
import dicom
import metrics
import phantoms
import utils

SIZE = (128, 96)  # small images (fine specks need the pixels): the five archives write in ~5 s
PATIENTS = {"vindr": 50, "rsna": 60, "cbis-ddsm": 60, "cmmd": 48, "cdd-cesm": 40}  # fewer than PATIENTS_2D: faster
CLASSES = {"birads": {"vindr": range(5), "rsna": range(3), "cbis-ddsm": range(6),
                      "cdd-cesm": range(1, 6)},
           "density": range(4), "lesion-type": {"cbis-ddsm": range(2), "cmmd": range(3)}}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """dataset -> (root, units, counts) of its archive (PATIENTS patients), read back."""
    base, out = tmp_path_factory.mktemp("archives"), {}
    for dataset in phantoms.DATASETS_2D:
        root = phantoms.write_2d_archive(base / dataset, dataset, PATIENTS[dataset], size=SIZE)
        out[dataset] = (root, *cohorts.READERS[dataset](root))
    return out


def classes(dataset, task):
    want = CLASSES.get(task, range(2))
    return set(want[dataset] if isinstance(want, dict) else want)


def pixels(root, unit):
    """The image as displayed (VOI, MONOCHROME1 inverted, chest wall left), float in [0, 1]."""
    return _pixels(str(root / unit["image"]))


@functools.lru_cache(maxsize=None)  # several tests read each image
def _pixels(path):
    path = Path(path)
    if path.suffix == ".jpg":
        return np.asarray(Image.open(path), np.float32) / 255
    return dicom.read_dbt(path)[0][0]


def read_csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


# ----------------------------------------------------------------------------- tables and splits
@pytest.mark.parametrize("dataset", phantoms.DATASETS_2D)
def test_every_listed_image_is_read_and_every_task_has_its_classes_in_every_split(archive,
                                                                                   dataset):
    root, units, counts = archive[dataset]
    n = PATIENTS[dataset]
    files = {"vindr": "images/*/*.dicom", "rsna": "train_images/*/*.dcm",
             "cbis-ddsm": "CBIS-DDSM/*/*/1.000000-full mammogram images-*/1-1.dcm",
             "cmmd": "CMMD/*/*/*/1-*.dcm", "cdd-cesm": "Low energy images of CDD-CESM/*.jpg"}
    images = sorted(p.relative_to(root).as_posix() for p in root.glob(files[dataset]))
    skipped = {"view AT": 1} if dataset == "rsna" else {}  # RSNA's one extra view, counted
    assert dict(counts["skipped"]) == skipped
    assert counts["images"] == len(images) == len(units) + len(skipped)
    assert len({u["image"] for u in units} & set(images)) == len(units)
    assert len({u["patient"] for u in units}) == n
    for task in cohorts.TASKS[dataset]:
        scored, excluded = cohorts.task_labels(dataset, units, task)
        cohorts.tally(counts, scored, excluded)  # listed = scored + excluded + skipped
        parts, leaked = cohorts.split_units(scored, seed=0)
        assert not leaked
        for split, part in parts.items():
            assert {u["label"] for u in part} == classes(dataset, task), (task, split)


def test_official_splits_come_through(archive):
    for dataset, prefix in (("vindr", None), ("cbis-ddsm", ("Mass-Test_", "Calc-Test_"))):
        root, units, _ = archive[dataset]
        official = {u["patient"] for u in units if u["split"] == "test"}
        assert 0 < len(official) < len({u["patient"] for u in units})
        scored, _ = cohorts.task_labels(dataset, units, "cancer")
        parts, _ = cohorts.split_units(scored, seed=0)
        assert {u["patient"] for u in parts["test"]} == official
        if prefix:  # CBIS-DDSM: the test CSVs list exactly the Test folders
            assert all(u["folder"].startswith(prefix) == (u["split"] == "test") for u in units)
    rows = read_csv_rows(archive["vindr"][0] / "breast-level_annotations.csv")
    assert {r[-1] for r in rows[1:]} == {"training", "test"}


def test_plan_is_seeded_and_needs_two_patients_per_state(tmp_path):
    a, b = phantoms.plan_2d("cmmd", 12, seed=3), phantoms.plan_2d("cmmd", 12, seed=3)
    assert a == b and a != phantoms.plan_2d("cmmd", 12, seed=4)
    with pytest.raises(ValueError, match="at least 12 patients"):
        phantoms.plan_2d("cbis-ddsm", 11)
    with pytest.raises(ValueError, match="not one of"):
        phantoms.write_2d_archive(tmp_path, "ddsm")


# ----------------------------------------------------------------------------- layout quirks
def test_vindr_layout(archive):
    root, units, _ = archive["vindr"]
    assert all(u["image"].endswith(".dicom") and len(u["image"].split("/")) == 3 for u in units)
    found = read_csv_rows(root / "finding_annotations.csv")
    assert found[0][9:11] == ["finding_categories", "finding_birads"]
    cats = {r[9] for r in found[1:]}
    assert "['Suspicious Calcification', 'Mass']" in cats and "['No Finding']" in cats
    assert all(r[11:15] == [""] * 4 for r in found[1:] if r[9] == "['No Finding']")
    assert '"[\'Suspicious Calcification\', \'Mass\']"' in (root / "finding_annotations.csv") \
        .read_text()  # quoted: the list holds a comma
    heads = [dicom.read_header(root / u["image"]) for u in units]
    assert {h.PhotometricInterpretation for h in heads} == {"MONOCHROME1", "MONOCHROME2"}
    assert {h.VOILUTFunction for h in heads} == {"LINEAR", "SIGMOID"}
    sums = dict(line.split(" ")[::-1] for line in (root / "SHA256SUMS.txt").read_text().split("\n")
                if line)
    assert len(sums) == len(units) + 4  # the images, three CSVs and LICENSE.txt
    first = units[0]["image"]
    assert sums[first] == hashlib.sha256((root / first).read_bytes()).hexdigest()


def test_rsna_layout_and_display_quirks(archive):
    root, units, _ = archive["rsna"]
    rows = utils.read_csv(root / "train.csv")
    assert {r["BIRADS"] for r in rows} == {"", "0.0", "1.0", "2.0"}  # floats, as published
    assert "" in {r["density"] for r in rows} and rows[0]["age"].endswith(".0")
    assert all(u["image"] == f"train_images/{u['patient_id']}/{u['image_id']}.dcm" for u in units)
    heads = [dicom.read_header(root / u["image"]) for u in units]
    assert {h.PhotometricInterpretation for h in heads} == {"MONOCHROME1", "MONOCHROME2"}
    assert {h.VOILUTFunction for h in heads} == {"LINEAR", "SIGMOID"}
    assert {len(np.atleast_1d(h.WindowCenter)) for h in heads} == {1, 2}  # multi-valued ones
    syntaxes = {str(h.file_meta.TransferSyntaxUID) for h in heads}
    assert syntaxes == {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"}
    kept, counts = cohorts.read_rsna(root, views=None)
    assert not counts["skipped"] and {u["view"] for u in kept} == {"CC", "MLO", "AT"}
    test = utils.read_csv(root / "test.csv")
    assert all(r["prediction_id"] == f"{r['patient_id']}_{r['laterality']}" for r in test)
    assert all((root / "test_images" / r["patient_id"] / f"{r['image_id']}.dcm").is_file()
               for r in test)
    submission = utils.read_csv(root / "sample_submission.csv")
    assert sorted(r["prediction_id"] for r in submission) == sorted({r["prediction_id"]
                                                                      for r in test})


def test_cbis_paths_share_only_their_folder_with_the_tree(archive):
    root, units, counts = archive["cbis-ddsm"]
    tables = sorted(root.glob("*_case_description_*_set.csv"))
    assert [t.name for t in tables] == [f"{k}_case_description_{s}_set.csv"
                                        for k in ("calc", "mass") for s in ("test", "train")]
    tree = root / "CBIS-DDSM"
    rows = [r for t in tables for r in utils.read_csv(t)]
    assert counts["rows"] == len(rows) > len(units)  # two abnormalities in some images
    for r in rows:
        for column in ("image file path", "cropped image file path", "ROI mask file path"):
            path = r[column].strip()
            assert (tree / path.split("/")[0]).is_dir()  # the folder matches ...
            assert not (tree / path).exists() and not (root / path).exists()  # ... the rest not
    assert any(r["image file path"].endswith(".dcm\n") for r in rows)
    assert '.dcm\n"' in tables[0].read_text()  # the newline sits inside the quotes
    headers = [read_csv_rows(t)[0] for t in tables]
    assert all("breast density" in h for h in headers[:2])
    assert all("breast_density" in h for h in headers[2:])
    crops = [p for p in tree.iterdir() if p.name.endswith(("_1", "_2"))]
    assert len(crops) == len(rows) and not {u["folder"] for u in units} & {p.name for p in crops}
    meta = utils.read_csv(root / "metadata.csv")
    assert {m["Series Description"] for m in meta} == {"full mammogram images", "cropped images",
                                                        "ROI mask images"}
    assert all((root / m["File Location"] / "1-1.dcm").is_file() for m in meta)


def test_cmmd_laterality_only_in_the_header(archive):
    root, units, counts = archive["cmmd"]
    table = root / "CMMD_clinicaldata_revision.xlsx"
    assert zipfile.is_zipfile(table)
    with zipfile.ZipFile(table) as z:
        assert "xl/sharedStrings.xml" in z.namelist()
    rows = utils.read_xlsx(table)
    assert list(rows[0]) == ["ID1", "LeftRight", "Age", "number", "abnormality",
                             "classification", "subtype"]
    assert counts["rows"] == len(rows) == PATIENTS["cmmd"]
    assert {r["abnormality"] for r in rows} == {"mass", "calcification", "both"}
    subtypes = {r["subtype"] for r in rows}
    assert "" in subtypes and len(subtypes) > 1 and subtypes <= {"", *phantoms.CMMD_SUBTYPES}
    for u in units:
        name = u["image"].split("/")[-1]
        assert name[:2] == "1-" and not {"L", "R"} & set(name)
        head = dicom.read_header(root / u["image"])
        assert head.ImageLaterality == u["laterality"]
        assert "Laterality" not in head and "PatientOrientation" not in head
    per_patient = {}
    for u in units:
        per_patient.setdefault(u["patient"], []).append(u)
    assert {len(v) for p, v in per_patient.items() if p.startswith("D1-")} == {2}
    assert {len(v) for p, v in per_patient.items() if p.startswith("D2-")} == {4}
    assert sum(not u["listed"] for u in units) > 0  # D2's normal breasts: no row


def test_cdd_cesm_names_and_rows(archive):
    root, units, counts = archive["cdd-cesm"]
    rows = utils.read_xlsx(root / "Radiology manual annotations.xlsx", sheet="all")
    assert "Pathology Classification/ Follow up" in rows[0]
    names = [r["Image_name"] for r in rows]
    assert any(n != n.strip() for n in names) and any(" " in n.strip() for n in names)
    assert not any(n.endswith(".jpg") for n in names)
    assert counts["rows"] == len(rows) > 2 * len(units)  # DM and CESM rows, a row per finding
    images = {u["image"].split("/")[-1] for u in units}
    assert {"P1_L_DM_MLO2.jpg", "P2_L_DM_MLO_2.jpg"} <= images
    cesm, cesm_counts = cohorts.read_cdd_cesm(root, subtracted=True)
    assert not cesm_counts["skipped"] and len(cesm) == len(units)
    assert all("_CM_" in u["image"] for u in cesm)
    assert Image.open(root / units[0]["image"]).format == "JPEG"


# ----------------------------------------------------------------------------- pixels
def breast_mean(img):
    return img[img > 0.15].mean()


def blob(img):
    """How far the brightest smoothed spot stands above the breast's median (a large mass moves
    the upper percentiles)."""
    v = ndimage.gaussian_filter(img, 1.0)[img > 0.15]
    return v.max() - np.median(v)


def specks(img):
    """Pixels of structures under 3 x 3 pixels (a white top-hat): calcifications, fine or coarse."""
    return int((ndimage.white_tophat(img, size=3) > 0.25)[img > 0.15].sum())


def fine_specks(img):
    """Pixels brighter than all 8 neighbours: fine (suspicious) calcifications, not coarse ones."""
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False
    return int(((img - ndimage.maximum_filter(img, footprint=ring)) > 0.1)[img > 0.15].sum())


@pytest.mark.parametrize("dataset", ["vindr", "rsna", "cbis-ddsm", "cdd-cesm"])
def test_density_brightens_the_breast(archive, dataset):
    root, units, _ = archive[dataset]
    scored, _ = cohorts.task_labels(dataset, units, "density", level="image")
    means = [np.mean([breast_mean(pixels(root, u)) for u in scored if u["label"] == c])
             for c in range(4)]
    assert np.all(np.diff(means) > 0.01), means


# which images hold a malignant mass, which nothing (in the other breast, same view)
MASS_VS_NONE = {
    "vindr": (lambda u: u["breast_birads"] == "BI-RADS 5",
              lambda u: u["breast_birads"] == "BI-RADS 1"),
    "rsna": (lambda u: u["cancer"] == "1", lambda u: u["biopsy"] == "0"),
    "cmmd": (lambda u: u["listed"] and u["classification"] == "Malignant" and
             u["abnormality"] != "calcification", lambda u: not u["listed"]),
    "cdd-cesm": (lambda u: "5" in u["birads"], lambda u: u["birads"] == ["1"])}


@pytest.mark.parametrize("dataset", sorted(MASS_VS_NONE))
def test_malignant_masses_are_brighter_blobs_than_the_other_breast(archive, dataset):
    root, units, _ = archive[dataset]
    positive, negative = MASS_VS_NONE[dataset]
    meta = {u["image"]: dicom.parse_headers(root / u["image"]) if "view" not in u else u
            for u in units}
    other = {(u["patient"], u["laterality"], meta[u["image"]]["view"]): u for u in units
             if negative(u)}
    gaps = [blob(pixels(root, u)) - blob(pixels(root, other[key]))
            for u in units if positive(u)
            for key in [(u["patient"], "RL"[u["laterality"] == "R"], meta[u["image"]]["view"])]
            if key in other]
    assert len(gaps) >= 8 and np.mean(np.array(gaps) > 0) >= 0.9, gaps


def test_cbis_malignant_masses_outshine_benign_ones(archive):
    root, units, _ = archive["cbis-ddsm"]
    pos = [blob(pixels(root, u)) for u in units if "5" in u["assessment"]]  # MALIGNANT masses
    neg = [blob(pixels(root, u)) for u in units if "1" in u["assessment"]]  # without callback
    assert len(pos) >= 8 and len(neg) >= 8
    assert metrics.auroc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], pos + neg) > 0.9


@pytest.mark.parametrize("dataset,task,count", [("vindr", "calcification", fine_specks),
                                                ("cmmd", "calcification", specks),
                                                ("cbis-ddsm", "lesion-type", specks)])
def test_calcifications_are_specks(archive, dataset, task, count):
    root, units, _ = archive[dataset]
    scored, _ = cohorts.task_labels(dataset, units, task, level="image")
    y = np.array([u["label"] for u in scored])  # CBIS-DDSM lesion-type: 1 is calcification
    assert metrics.auroc(y, [count(pixels(root, u)) for u in scored]) > 0.95


def test_cesm_enhances_malignant_findings(archive):
    root, _, _ = archive["cdd-cesm"]
    units, _ = cohorts.read_cdd_cesm(root, subtracted=True)
    scored, _ = cohorts.task_labels("cdd-cesm", units, "cancer")
    y = np.array([u["label"] for u in scored])
    assert metrics.auroc(y, [blob(pixels(root, u)) for u in scored]) > 0.85


# ----------------------------------------------------------------------------- cache and CLI
def test_synthetic_2d_archive_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DBT_DINO_CACHE", str(tmp_path))
    root = phantoms.synthetic_2d_archive("cmmd", patients=12, seed=1, size=(64, 48))
    assert root == tmp_path / "synthetic-2d-cmmd-p12-s1-64x48"
    stamp = (root / "CMMD_clinicaldata_revision.xlsx").stat().st_mtime_ns
    assert phantoms.synthetic_2d_archive("cmmd", patients=12, seed=1, size=(64, 48)) == root
    assert (root / "CMMD_clinicaldata_revision.xlsx").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no tmp folder left
    again = phantoms.write_2d_archive(tmp_path / "again", "cmmd", 12, seed=1, size=(64, 48))
    assert utils.read_xlsx(again / "CMMD_clinicaldata_revision.xlsx") == \
        utils.read_xlsx(root / "CMMD_clinicaldata_revision.xlsx")  # seeded


def test_cli_writes_then_reuses_a_2d_archive(tmp_path):
    assert phantoms.get_args([]).patients == 8 and phantoms.get_args([]).dataset == "dbt"
    assert phantoms.get_args(["--dataset", "rsna"]).patients == phantoms.PATIENTS_2D["rsna"]
    argv = ["--dataset", "cdd-cesm", "--out", str(tmp_path / "a"), "--patients", "10",
            "--height", "64", "--width", "48"]
    assert phantoms.synth_command(phantoms.get_args(argv)).startswith(f"wrote {tmp_path / 'a'}")
    assert phantoms.synth_command(phantoms.get_args(argv)).startswith(f"reused {tmp_path / 'a'}")
    units, _ = cohorts.read_cdd_cesm(tmp_path / "a")
    assert len({u["patient"] for u in units}) == 10
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    with pytest.raises(ValueError, match="not an archive written by phantoms.py"):
        phantoms.synth_command(phantoms.get_args(argv[:2] + ["--out", str(tmp_path / "b")]))


# ------------------------------------------------------------------------ detection, image path
def test_the_layout_is_detected_from_its_tables(archive, tmp_path):
    """Each archive names its dataset; a DBT archive is dbt; none or two: one line saying so."""
    for dataset, (root, _, _) in archive.items():
        assert cohorts.detect_dataset(root) == dataset
    assert cohorts.detect_dataset(phantoms.write_archive(tmp_path / "dbt", 1, 0, (2, 32, 24))) \
        == "dbt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds none of the known tables; name the dataset"):
        cohorts.detect_dataset(tmp_path / "empty")
    both = tmp_path / "both"
    shutil.copytree(archive["vindr"][0], both)
    shutil.copy(archive["rsna"][0] / "train.csv", both)
    with pytest.raises(ValueError, match="holds tables of vindr, rsna; name the dataset"):
        cohorts.detect_dataset(both)


@pytest.mark.parametrize("dataset", phantoms.DATASETS_2D)
def test_breast_view_of_every_layout_puts_the_breast_against_the_left_edge(archive, dataset):
    """data.breast_view on each dataset's images (DICOM of every display variant, CDD-CESM's
    JPEG): a (3, 64, 64) input whose breast touches the left edge and fills a side."""
    root, units, _ = archive[dataset]
    for unit in units[:8]:
        x = data.breast_view(root / unit["image"], size=64)[0].numpy()  # (64, 64)
        rows, cols = np.nonzero(x > 0.05)
        assert x.shape == (64, 64) and cols.min() == 0, unit["image"]
        assert max(rows.max(), cols.max()) >= 60, unit["image"]  # resized to fit, not shrunk
