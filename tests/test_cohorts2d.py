"""cohorts.py's 2-D benchmark tables (and utils.read_xlsx): the five readers on each
download's layout, each label rule against hand-computed labels, the splits, the accounting,
one-line errors."""
import csv
import zipfile
from xml.sax.saxutils import escape

import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import cohorts
import utils

MAIN = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
PKG = "http://schemas.openxmlformats.org/package/2006/relationships"


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return path


def touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def write_xlsx(path, sheet_xml, strings=(), sheet="Sheet1", target="worksheets/sheet1.xml"):
    """A workbook as Excel lays it out: workbook.xml -> rels -> the sheet (target: relative to
    xl/, or absolute in the zip)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("xl/workbook.xml", f'<workbook {MAIN} xmlns:r="{REL}"><sheets><sheet name='
                                      f'"{sheet}" sheetId="1" r:id="rId7"/></sheets></workbook>')
        z.writestr("xl/_rels/workbook.xml.rels", f'<Relationships xmlns="{PKG}"><Relationship '
                   f'Id="rId7" Type="{REL}/worksheet" Target="{target}"/>'
                   '</Relationships>')
        z.writestr("xl/sharedStrings.xml", f"<sst {MAIN}>" + "".join(
            f"<si><t>{escape(s)}</t></si>" for s in strings) + "</sst>")
        z.writestr("xl/worksheets/sheet1.xml",
                   f"<worksheet {MAIN}><sheetData>{sheet_xml}</sheetData></worksheet>")
    return path


def table_xlsx(path, header, rows, sheet="Sheet1"):
    """Strings shared, numbers as <v>, None an absent cell (its neighbours keep their refs)."""
    strings, xml = [], ""
    for i, row in enumerate([header] + rows):
        cells = ""
        for j, v in enumerate(row):
            ref = f"{'ABCDEFGHIJKL'[j]}{i + 1}"
            if isinstance(v, str):
                strings += [v] * (v not in strings)
                cells += f'<c r="{ref}" t="s"><v>{strings.index(v)}</v></c>'
            elif v is not None:
                cells += f'<c r="{ref}"><v>{v!r}</v></c>'
        xml += f'<row r="{i + 1}">{cells}</row>'
    return write_xlsx(path, xml, strings, sheet)


def write_dicom(path, laterality):
    """A header-only DICOM (the readers never decode pixels to find laterality)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if laterality:
        ds.ImageLaterality = laterality
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def labels(units, key="image_id"):
    return {u[key]: u["label"] for u in units}


# ----------------------------------------------------------------------------- xlsx
def test_read_xlsx_places_cells_by_reference_and_matches_its_csv(tmp_path):
    strings = ["ID1", "LeftRight", "Age", "classification", "D1-0001", "Malignant", "D1-0003"]
    sheet = ('<row r="1"><c r="A1" t="s"><v>0</v></c><c r="B1" t="s"><v>1</v></c>'
             '<c r="C1" t="s"><v>2</v></c><c r="D1" t="s"><v>3</v></c></row>'
             '<row r="2"><c r="A2" t="s"><v>4</v></c><c r="B2" t="inlineStr"><is><t>L</t></is></c>'
             '<c r="C2"><v>44</v></c><c r="D2" t="inlineStr"><is><r><t>Be</t></r><r><t>nign</t>'
             '</r></is></c></row>'
             '<row r="3"><c r="A3" t="str"><v>D1-0002</v></c><c r="C3"><v>0.10000000000000001</v>'
             '</c><c r="D3" t="s"><v>5</v></c></row>'
             '<row r="4"><c r="B4" s="3"/></row>'  # formatted, no value: not a row
             '<row r="5"><c r="A5" t="s"><v>6</v></c><c r="D5" t="inlineStr"><is><t>Benign</t>'
             '</is></c></row>')
    xlsx = write_xlsx(tmp_path / "clinical.xlsx", sheet, strings,
                      target="/xl/worksheets/sheet1.xml")
    expected = [dict(ID1="D1-0001", LeftRight="L", Age="44", classification="Benign"),
                dict(ID1="D1-0002", LeftRight="", Age="0.1", classification="Malignant"),
                dict(ID1="D1-0003", LeftRight="", Age="", classification="Benign")]
    assert utils.read_xlsx(xlsx) == expected
    assert utils.read_table(xlsx) == expected
    exported = write_csv(tmp_path / "clinical.csv", list(expected[0]),
                         [list(r.values()) for r in expected])
    assert utils.read_table(exported) == expected


def test_read_xlsx_errors_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "a.xlsx").write_text("ID1,LeftRight\nD1-0001,L\n")
    with zipfile.ZipFile(tmp_path / "b.xlsx", "w") as z:
        z.writestr("xl/workbook.xml", f"<workbook {MAIN}><sheets/></workbook>")
        z.writestr("xl/_rels/workbook.xml.rels", f'<Relationships xmlns="{PKG}"/>')
    table_xlsx(tmp_path / "c.xlsx", ["a"], [["x"]], sheet="calc")
    for name, sheet, message in [("a", None, "not a readable .xlsx"), ("b", None, "no sheet"),
                                 ("c", "all", "no sheet 'all' (it has calc)")]:
        with pytest.raises(ValueError) as e:
            utils.read_xlsx(tmp_path / f"{name}.xlsx", sheet)
        assert f"{name}.xlsx: {message}" in str(e.value) and "\n" not in str(e.value)
    assert utils.read_xlsx(tmp_path / "c.xlsx", "CALC") == [{"a": "x"}]


# ----------------------------------------------------------------------------- VinDr-Mammo
VINDR_HEADER = ["study_id", "series_id", "image_id", "laterality", "view_position", "height",
                "width", "breast_birads", "breast_density", "split"]


def make_vindr(root, rows=None, findings=True):
    rows = rows or [[s, f"x{s}", i, lat, view, 3518, 2800, f"BI-RADS {b}", f"DENSITY {d}", split]
                    for s, i, lat, view, b, d, split in [
                        ("s1", "i1", "L", "CC", 5, "C", "training"),
                        ("s1", "i2", "R", "CC", 4, "B", "training"),
                        ("s2", "i3", "L", "MLO", 1, "A", "test"),
                        ("s2", "i4", "R", "MLO", 3, "D", "test"),
                        ("s1", "i6", "R", "MLO", 4, "B", "training"),
                        ("s3", "i5", "L", "CC", 2, "B", "training")]]
    write_csv(root / "breast-level_annotations.csv", VINDR_HEADER, rows)
    touch(root, *[f"images/{r[0]}/{r[2]}.dicom" for r in rows if r[2] != "i5"])  # i5's is missing
    if findings:
        box = [0, 0, 0, 0, 0, 0, 0, "", "", "", "", 1.5, -2.0, 30.0, 40.0, "training"]
        cats = [("i1", "['Mass', 'Suspicious Calcification']"), ("i1", "['Mass']"),
                ("i2", "['Suspicious Calcification']"), ("i3", "['No Finding']"),
                ("i4", "['Focal Asymmetry', 'Skin Thickening']"), ("i6", "['No Finding']")]
        write_csv(root / "finding_annotations.csv", VINDR_HEADER[:-1] + [
            "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax", "split"],
            [[box[0], box[1], i] + box[3:9] + [c] + box[10:] for i, c in cats])
    return root


def test_vindr_cancer_is_birads_5_unless_asked_for_4(tmp_path):
    units, counts = cohorts.read_vindr(make_vindr(tmp_path))
    assert [u["image"] for u in units][:2] == ["images/s1/i1.dicom", "images/s1/i2.dicom"]
    assert counts == dict(rows=6, images=6, skipped={"image file missing": 1})
    scored, excluded = cohorts.task_labels("vindr", units, "cancer")
    assert labels(scored) == dict(i1=1, i2=0, i3=0, i4=0, i6=0) and excluded == {}
    scored4, _ = cohorts.task_labels("vindr", units, "cancer", cancer_birads=4)
    assert labels(scored4) == dict(i1=1, i2=1, i3=0, i4=0, i6=1)
    assert ">= 5" in cohorts.label_rule("vindr", "cancer")
    assert ">= 4" in cohorts.label_rule("vindr", "cancer", cancer_birads=4)
    assert cohorts.tally(counts, scored, excluded)["scored_images"] == 5


def test_vindr_birads_density_mass_calcification(tmp_path):
    units, _ = cohorts.read_vindr(make_vindr(tmp_path))
    expected = dict(birads=dict(i1=4, i2=3, i3=0, i4=2, i6=3),
                    density=dict(i1=2, i2=1, i3=0, i4=3, i6=1),
                    mass=dict(i1=1, i2=0, i3=0, i4=0, i6=0),
                    calcification=dict(i1=1, i2=1, i3=0, i4=0, i6=0))
    for task, want in expected.items():
        assert labels(cohorts.task_labels("vindr", units, task)[0]) == want, task
    # per breast: i2 (calcification) and i6 (none) are s1's right breast, which has one
    breasts, _ = cohorts.task_labels("vindr", units, "calcification", level="breast")
    assert labels(breasts, "breast") == {"s1_L": 1, "s1_R": 1, "s2_L": 0, "s2_R": 0}
    bare, _ = cohorts.read_vindr(make_vindr(tmp_path / "bare", findings=False))
    with pytest.raises(ValueError, match="mass task needs finding_annotations.csv"):
        cohorts.task_labels("vindr", bare, "mass")


# ----------------------------------------------------------------------------- RSNA
RSNA_HEADER = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer",
               "biopsy", "invasive", "BIRADS", "implant", "density", "machine_id",
               "difficult_negative_case"]


def make_rsna(root):
    rows = [["10006", "1", "L", "CC", "0", "", ""], ["10006", "2", "L", "MLO", "0", "", ""],
            ["10006", "3", "R", "CC", "0", "1.0", "B"], ["10006", "4", "R", "MLO", "0", "1.0", "B"],
            ["10011", "5", "L", "CC", "1", "0.0", "C"], ["10011", "6", "L", "MLO", "1", "0", "C"],
            ["10011", "7", "L", "AT", "1", "0", "C"], ["10011", "8", "R", "CC", "0", "2", "D"],
            ["10011", "9", "R", "MLO", "0", "2.0", "A"]]
    write_csv(root / "train.csv", RSNA_HEADER, [
        ["2", p, i, lat, view, "61.0", c, c, "0", b, "0", d, "29", "False"]
        for p, i, lat, view, c, b, d in rows])
    touch(root, *[f"train_images/{r[0]}/{r[1]}.dcm" for r in rows])
    return root


def test_rsna_cancer_is_per_breast_by_prediction_id(tmp_path):
    units, counts = cohorts.read_rsna(make_rsna(tmp_path))
    assert counts == dict(rows=9, images=9, skipped={"view AT": 1})
    assert units[0]["image"] == "train_images/10006/1.dcm"
    breasts, excluded = cohorts.task_labels("rsna", units, "cancer")
    assert labels(breasts, "breast") == {"10006_L": 0, "10006_R": 0, "10011_L": 1, "10011_R": 0}
    assert {b["breast"]: b["images"] for b in breasts}["10011_L"] == [
        "train_images/10011/5.dcm", "train_images/10011/6.dcm"]
    assert {u["prediction_id"] for u in units} == {b["breast"] for b in breasts}
    images, _ = cohorts.task_labels("rsna", units, "cancer", level="image")
    assert labels(images) == {"1": 0, "2": 0, "3": 0, "4": 0, "5": 1, "6": 1, "8": 0, "9": 0}
    assert "per breast, positive if any image is" in cohorts.label_rule("rsna", "cancer")
    assert cohorts.tally(counts, breasts, excluded)["scored_units"] == 4
    kept, _ = cohorts.read_rsna(tmp_path, views=None)
    assert len(kept) == 9


def test_rsna_empty_birads_and_density_are_excluded(tmp_path):
    units, counts = cohorts.read_rsna(make_rsna(tmp_path))
    birads, excluded = cohorts.task_labels("rsna", units, "birads")
    assert labels(birads, "breast") == {"10006_R": 1, "10011_L": 0, "10011_R": 2}
    assert excluded == {"no birads": 2}
    density, excluded = cohorts.task_labels("rsna", units, "density")
    assert labels(density, "breast") == {"10006_R": 1, "10011_L": 2}
    assert excluded == {"no density": 2, "images of the breast disagree": 2}
    assert cohorts.tally(counts, density, excluded) == dict(
        rows_read=9, images=9, scored_units=2, scored_images=4, excluded=excluded,
        skipped={"view AT": 1})


# ----------------------------------------------------------------------------- CBIS-DDSM
MASS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
        "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
        "image file path", "cropped image file path", "ROI mask file path"]
CALC = [c.replace("breast_density", "breast density").replace("mass shape", "calc type")
        .replace("mass margins", "calc distribution") for c in MASS]


def cbis_row(patient, side, view, abnormality, assessment, pathology, prefix, kind="mass"):
    folder = f"{prefix}_{patient}_{side}_{view}"
    path = f"{folder}/1.3.6.1.4.1.9590/1.3.6.1.4.1.9591/000000.dcm\n"  # TCIA's trailing newline
    return [patient, "3", side, view, abnormality, kind, "OVAL", "CIRCUMSCRIBED", assessment,
            pathology, "4", path, f"{folder}_{abnormality}/a/b/000000.dcm", f"{folder}_1/a/b/1.dcm"]


def make_cbis(root):
    tables = {
        "mass_case_description_train_set.csv": (MASS, [
            cbis_row("P_00001", "LEFT", "CC", "1", "5", "MALIGNANT", "Mass-Training"),
            cbis_row("P_00001", "LEFT", "CC", "2", "3", "BENIGN", "Mass-Training"),
            cbis_row("P_00002", "RIGHT", "MLO", "1", "4", "BENIGN_WITHOUT_CALLBACK",
                     "Mass-Training"),
            cbis_row("P_00004", "LEFT", "MLO", "1", "2", "BENIGN", "Mass-Training")]),
        "mass_case_description_test_set.csv": (MASS, [
            cbis_row("P_00003", "LEFT", "CC", "1", "0", "BENIGN", "Mass-Test")]),
        "calc_case_description_train_set.csv": (CALC, [
            cbis_row("P_00002", "RIGHT", "MLO", "1", "2", "BENIGN_WITHOUT_CALLBACK",
                     "Calc-Training", "calcification"),
            cbis_row("P_00005", "RIGHT", "CC", "1", "3", "BENIGN", "Calc-Training",
                     "calcification"),
            cbis_row("P_00005", "RIGHT", "CC", "2", "4", "MALIGNANT", "Calc-Training",
                     "calcification")]),
        "calc_case_description_test_set.csv": (CALC, [
            cbis_row("P_00001", "LEFT", "CC", "1", "4", "MALIGNANT", "Calc-Test",
                     "calcification")])}
    folders = set()
    for name, (header, rows) in tables.items():
        write_csv(root / name, header, rows)
        folders |= {r[11].split("/")[0] for r in rows}
    for f in sorted(folders - {"Mass-Training_P_00004_LEFT_MLO"}):  # its download is missing
        touch(root, f"CBIS-DDSM/{f}/08-07-2016-DDSM-74994/1.000000-full mammogram images-24515/"
                    "1-1.dcm", f"CBIS-DDSM/{f}_1/08-07-2016-DDSM-74994/1.000000-ROI mask "
                    "images-10/1-2.dcm")
    return root


def test_cbis_image_is_malignant_if_any_abnormality_is(tmp_path):
    units, counts = cohorts.read_cbis(make_cbis(tmp_path))
    assert '000000.dcm\n"' in (tmp_path / "mass_case_description_train_set.csv").read_text()
    assert counts == dict(rows=9, images=7, skipped={"image folder missing": 1})
    by = {u["folder"]: u for u in units}
    assert by["Mass-Training_P_00001_LEFT_CC"]["image"] == (
        "CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/08-07-2016-DDSM-74994/"
        "1.000000-full mammogram images-24515/1-1.dcm")
    scored, excluded = cohorts.task_labels("cbis-ddsm", units, "cancer")
    assert labels(scored, "folder") == {
        "Mass-Training_P_00001_LEFT_CC": 1, "Mass-Training_P_00002_RIGHT_MLO": 0,
        "Mass-Test_P_00003_LEFT_CC": 0, "Calc-Training_P_00002_RIGHT_MLO": 0,
        "Calc-Training_P_00005_RIGHT_CC": 1, "Calc-Test_P_00001_LEFT_CC": 1}
    assert "BENIGN_WITHOUT_CALLBACK is benign" in cohorts.label_rule("cbis-ddsm", "cancer")
    assert cohorts.tally(counts, scored, excluded)["scored_images"] == 6


def test_cbis_lesion_type_birads_density_and_official_split(tmp_path):
    units, _ = cohorts.read_cbis(make_cbis(tmp_path))
    want = {"lesion-type": [0, 0, 0, 1, 1, 1], "birads": [5, 4, 0, 2, 4, 4],
            "density": [2, 2, 2, 2, 2, 2]}
    order = ["Mass-Training_P_00001_LEFT_CC", "Mass-Training_P_00002_RIGHT_MLO",
             "Mass-Test_P_00003_LEFT_CC", "Calc-Training_P_00002_RIGHT_MLO",
             "Calc-Training_P_00005_RIGHT_CC", "Calc-Test_P_00001_LEFT_CC"]
    for task, y in want.items():
        got = labels(cohorts.task_labels("cbis-ddsm", units, task)[0], "folder")
        assert [got[f] for f in order] == y, task
    assert {u["folder"]: u["split"] for u in units}["Mass-Test_P_00003_LEFT_CC"] == "test"
    assert {u["laterality"] for u in units} == {"L", "R"}


# ----------------------------------------------------------------------------- CMMD
CMMD_HEADER = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]


def make_cmmd(root):
    root.mkdir(parents=True, exist_ok=True)
    table_xlsx(root / "CMMD_clinicaldata_revision.xlsx", CMMD_HEADER, [
        ["D1-0001", "R", 44, 1, "calcification", "Benign", None],
        ["D2-0001", "L", 60, 2, "both", "Malignant", "Luminal A"],
        ["D2-0002", "L", 55, 1, "mass", "Malignant", "triple negative"]])  # no images
    series = "07-18-2010-NA-NA-79377/1.000000-NA-70244"
    for patient, lats in (("D1-0001", "RR"), ("D2-0001", "LLRR"), ("D1-0002", "L ")):
        for k, lat in enumerate(lats):
            write_dicom(root / "CMMD" / patient / series / f"1-{k + 1}.dcm", lat.strip())
    return root


def test_cmmd_cancer_per_breast_with_laterality_from_the_header(tmp_path):
    units, counts = cohorts.read_cmmd(make_cmmd(tmp_path))
    assert counts == dict(rows=3, images=8, skipped={"no laterality in the header": 1},
                          rows_without_images=1)
    breasts, excluded = cohorts.task_labels("cmmd", units, "cancer")
    assert labels(breasts, "breast") == {"D1-0001_R": 0, "D2-0001_L": 1}
    assert excluded == {"breast not listed": 3}  # D2-0001 R (2 images), D1-0002 L (1)
    assert cohorts.tally(counts, breasts, excluded)["scored_images"] == 4  # 2 + 2 + 3 + 1 = 8
    negative, excluded = cohorts.task_labels("cmmd", units, "cancer", unlisted_negative=True)
    assert labels(negative, "breast") == {"D1-0001_R": 0, "D2-0001_L": 1, "D2-0001_R": 0,
                                          "D1-0002_L": 0} and excluded == {}
    assert "a breast without a row is excluded" in cohorts.label_rule("cmmd", "cancer")
    flipped, _ = cohorts.read_cmmd(tmp_path, laterality_of=lambda p: "L")
    assert labels(cohorts.task_labels("cmmd", flipped, "cancer")[0], "breast") == {"D2-0001_L": 1}


def test_cmmd_lesion_tasks(tmp_path):
    units, _ = cohorts.read_cmmd(make_cmmd(tmp_path))
    want = {"lesion-type": {"D1-0001_R": 1, "D2-0001_L": 2},
            "mass": {"D1-0001_R": 0, "D2-0001_L": 1},
            "calcification": {"D1-0001_R": 1, "D2-0001_L": 1}}
    for task, y in want.items():
        assert labels(cohorts.task_labels("cmmd", units, task)[0], "breast") == y, task


# ----------------------------------------------------------------------------- CDD-CESM
CDD_HEADER = ["Image_name", "Patient_ID", "Side", "Type", "Age", "Breast density (ACR)", "BIRADS",
              "Findings", "View", "Tags", "Machine", "Pathology Classification/ Follow up"]


def make_cdd(root):
    rows = [("P1_L_DM_CC", 1, "L", "DM", "B", 1, "CC", "Normal"),
            ("P1_L_CM_CC", 1, "L", "CESM", "B", 1, "CC", "Normal"),
            ("P2_R_DM_MLO ", 2, "R", "DM", "C", 4, "MLO", "Benign"),  # stray space
            ("P2_R_DM_MLO", 2, "R", "DM", "C", 5, "MLO", "Malignant"),  # its second finding
            ("P2_R_CM_MLO", 2, "R", "CESM", "C", 5, "MLO", "Malignant"),
            ("P281_L_DM_MLO2", 281, "L", "DM", "A", 2, "MLO", "Benign"),
            ("P99_L_DM_MLO_2", 99, "L", "DM", "D", 3, "MLO", "Benign"),
            ("P3_L_DM_CC", 3, "L", "DM", "B", 2, "CC", "Benign")]  # no file
    table_xlsx(root / "Radiology manual annotations.xlsx", CDD_HEADER, [
        [n, p, side, t, 50, d, b, "mass", v, None, "GE", y] for n, p, side, t, d, b, v, y in rows],
        sheet="all")
    low, sub = "Low energy images of CDD-CESM", "Subtracted images of CDD-CESM"
    touch(root, *[f"{low}/{n}.jpg" for n in ("P1_L_DM_CC", "P2_R_DM_MLO", "P281_L_DM_MLO2",
                                            "P99_L_DM_MLO_2")],
          f"{sub}/P1_L_CM_CC.jpg", f"{sub}/P2_R_CM_MLO.jpg")
    return root


def test_cdd_cesm_low_energy_by_default_subtracted_on_request(tmp_path):
    units, counts = cohorts.read_cdd_cesm(make_cdd(tmp_path))
    assert counts == dict(rows=8, images=5, skipped={"image file missing": 1})
    scored, _ = cohorts.task_labels("cdd-cesm", units, "cancer")
    assert labels(scored, "image") == {
        "Low energy images of CDD-CESM/P1_L_DM_CC.jpg": 0,
        "Low energy images of CDD-CESM/P2_R_DM_MLO.jpg": 1,
        "Low energy images of CDD-CESM/P281_L_DM_MLO2.jpg": 0,
        "Low energy images of CDD-CESM/P99_L_DM_MLO_2.jpg": 0}
    assert [(u["patient"], u["laterality"], u["view"]) for u in scored][1:] == [
        ("2", "R", "MLO"), ("281", "L", "MLO"), ("99", "L", "MLO")]
    for task, y in (("birads", [1, 5, 2, 3]), ("density", [1, 2, 0, 3])):
        assert [u["label"] for u in cohorts.task_labels("cdd-cesm", units, task)[0]] == y, task
    sub, counts = cohorts.read_cdd_cesm(tmp_path, subtracted=True)
    assert labels(cohorts.task_labels("cdd-cesm", sub, "cancer")[0], "image") == {
        "Subtracted images of CDD-CESM/P1_L_CM_CC.jpg": 0,
        "Subtracted images of CDD-CESM/P2_R_CM_MLO.jpg": 1}
    assert counts == dict(rows=8, images=2, skipped={})


# ----------------------------------------------------------------------------- splits
def units_of(n_patients, positive, images=3, split=None):
    return [dict(patient=f"P{p:02d}", image=f"P{p:02d}/{k}.dcm", label=int(p in positive),
                 split=split(p) if split else "") for p in range(n_patients) for k in range(images)]


def owners(parts):
    return {s: {u["patient"] for u in units} for s, units in parts.items()}


def test_split_units_keeps_the_official_split_and_draws_val_from_training(tmp_path):
    units = units_of(14, positive={0, 1, 2, 3, 4, 10}, images=2,
                     split=lambda p: "test" if p >= 10 else "train")
    parts, excluded = cohorts.split_units(units, seed=0, val_fraction=0.2, test_fraction=0.5)
    who = owners(parts)
    assert who["test"] == {"P10", "P11", "P12", "P13"} and excluded == {}
    assert len(who["val"]) == 2 and who["val"] <= {f"P{p:02d}" for p in range(10)}
    assert not who["val"] & who["train"] and len(who["train"]) == 8
    assert {u["label"] for u in parts["val"]} == {0, 1}  # 5 + 5 training patients: one of each
    assert {u["split"] for u in parts["val"]} == {"val"}
    cbis, _ = cohorts.read_cbis(make_cbis(tmp_path))
    scored, _ = cohorts.task_labels("cbis-ddsm", cbis, "cancer")
    parts, excluded = cohorts.split_units(scored, seed=0, val_fraction=0.3)
    assert excluded == {"patient also in the official test split": 1}  # P_00001's mass image
    assert sorted(u["folder"] for u in parts["test"]) == ["Calc-Test_P_00001_LEFT_CC",
                                                          "Mass-Test_P_00003_LEFT_CC"]
    assert "P_00001" not in owners(parts)["train"] | owners(parts)["val"]


def test_split_units_seeded_by_patient_and_stratified():
    units = units_of(30, positive={3, 11, 27})
    sizes = []
    for seed in range(5):
        parts, excluded = cohorts.split_units(units, seed, val_fraction=0.1, test_fraction=0.1)
        who = owners(parts)
        assert not (who["train"] & who["val"] or who["train"] & who["test"]
                    or who["val"] & who["test"]) and excluded == {}
        assert all({u["label"] for u in parts[s]} == {0, 1} for s in parts)  # 3 positives: 1 each
        sizes.append([len(who[s]) for s in ("train", "val", "test")])
    assert sizes == [[22, 4, 4]] * 5  # 1 + round(27 x 0.1) patients in val and in test
    assert parts == cohorts.split_units(units, 4, 0.1, 0.1)[0]
    assert parts != cohorts.split_units(units, 5, 0.1, 0.1)[0]


# ----------------------------------------------------------------------------- bad input
def test_bad_tables_are_one_line_errors_naming_file_and_value(tmp_path):
    rows = [["s1", "x1", "i1", "L", "CC", 1, 1, "BI-RADS 2", "DENSITY A", "training"]]
    cases = {
        "missing column": (lambda r: ((r / "images").mkdir(), write_csv(
            r / "breast-level_annotations.csv", VINDR_HEADER[:7] + VINDR_HEADER[8:],
            [rows[0][:7] + rows[0][8:]])),
                           "breast-level_annotations.csv: missing column(s) breast_birads"),
        "unknown BI-RADS": (lambda r: make_vindr(r, [rows[0][:7] + ["BI-RADS 6"] + rows[0][8:]]),
                            "breast-level_annotations.csv row 1: breast_birads 'BI-RADS 6' is "
                            "not one of BI-RADS 1"),
        "unknown finding": (lambda r: (make_vindr(r, rows, findings=False), write_csv(
            r / "finding_annotations.csv", ["image_id", "finding_categories"],
            [["i1", "['Mass']"], ["i1", "['Tumour']"]])),
            "finding_annotations.csv row 2: finding_categories \"['Tumour']\" is not a list"),
        "no image folder": (lambda r: write_csv(r / "breast-level_annotations.csv",
                                                VINDR_HEADER, rows),
                            "no folder 'images'"),
        "empty table": (lambda r: (write_csv(r / "breast-level_annotations.csv", VINDR_HEADER,
                                             []), (r / "images").mkdir()),
                        "breast-level_annotations.csv: no rows below the header")}
    for name, (make, message) in cases.items():
        root = tmp_path / name.replace(" ", "-")
        root.mkdir()
        make(root)
        with pytest.raises(ValueError) as e:
            cohorts.read_vindr(root)
        assert message in str(e.value) and "\n" not in str(e.value), name
    root = make_cmmd(tmp_path / "cmmd")
    table_xlsx(root / "CMMD_clinicaldata_revision.xlsx", CMMD_HEADER,
               [["D1-0001", "R", 44, 1, "mass", "Malign", None]])
    with pytest.raises(ValueError, match=r"CMMD_clinicaldata_revision.xlsx row 1: classification "
                                         r"'Malign' is not one of Benign, Malignant$"):
        cohorts.read_cmmd(root)
    with pytest.raises(ValueError, match="cmmd has no task 'birads'"):
        cohorts.task_labels("cmmd", [], "birads")


# ----------------------------------------------------------------------------- broken rules
def _label_with(swap):
    """cohorts._label with the rule of one (dataset, task) replaced: swap(the right label, the
    unit, the arguments) -> the broken one."""
    right = cohorts._label

    def broken(dataset, task, u, cancer_birads, unlisted_negative):
        args = [dataset, task, u, cancer_birads, unlisted_negative]
        return swap(right, args)
    return broken


def _for(dataset, task, wrong):
    """Break the (dataset, task) rule only: wrong(right label function, args) -> the label."""
    return lambda mp: mp.setattr(cohorts, "_label", _label_with(
        lambda right, a: wrong(right, a) if a[:2] == [dataset, task] else right(*a)))


BROKEN = {  # each rule test, and a plausible way to get its rule wrong
    "vindr cancer >= 4 by default": (test_vindr_cancer_is_birads_5_unless_asked_for_4, _for(
        "vindr", "cancer", lambda right, a: right(*a[:3], 4 if a[3] == 5 else a[3], a[4]))),
    "vindr mass from the calcification findings": (
        test_vindr_birads_density_mass_calcification,
        _for("vindr", "mass", lambda right, a: right(a[0], "calcification", *a[2:]))),
    "rsna scored per image by default": (
        test_rsna_cancer_is_per_breast_by_prediction_id,
        lambda mp: mp.setattr(cohorts, "BREAST_LEVEL", ("cmmd",))),
    "cbis BENIGN_WITHOUT_CALLBACK as malignant": (
        test_cbis_image_is_malignant_if_any_abnormality_is,
        _for("cbis-ddsm", "cancer", lambda right, a: int(any(
            p in ("MALIGNANT", "BENIGN_WITHOUT_CALLBACK") for p in a[2]["pathology"])))),
    "cbis lesion-type from the wrong CSV": (
        test_cbis_lesion_type_birads_density_and_official_split,
        _for("cbis-ddsm", "lesion-type", lambda right, a: 1 - right(*a))),
    "cmmd laterality not from the header": (
        test_cmmd_cancer_per_breast_with_laterality_from_the_header,
        lambda mp: mp.setattr(cohorts.dicom, "read_header", lambda p: {"Laterality": "R"})),
    "cmmd unlisted breasts negative by default": (
        test_cmmd_cancer_per_breast_with_laterality_from_the_header,
        _for("cmmd", "cancer", lambda right, a: right(*a[:4], True))),
    "cdd-cesm subtracted images by default": (
        test_cdd_cesm_low_energy_by_default_subtracted_on_request,
        lambda mp: mp.setattr(cohorts.read_cdd_cesm, "__defaults__", (True,))),
    "cdd-cesm a benign finding as cancer": (
        test_cdd_cesm_low_energy_by_default_subtracted_on_request,
        _for("cdd-cesm", "cancer", lambda right, a: int(any(
            p in ("Malignant", "Benign") for p in a[2]["pathology"])))),
}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_each_rule_test_fails_when_its_rule_is_broken(broken, tmp_path, monkeypatch):
    rule_test, plant = BROKEN[broken]
    (tmp_path / "right").mkdir()
    (tmp_path / "broken").mkdir()
    rule_test(tmp_path / "right")  # passes as the code stands
    plant(monkeypatch)
    with pytest.raises((AssertionError, KeyError)):  # a wrong label, or a unit of the wrong kind
        rule_test(tmp_path / "broken")
