"""metrics.py against golden values (a DBTex toy case scored by the official duke_dbt_data.evaluate;
MONAI's FROC, roc_comparison's DeLong, statsmodels and scipy on small inputs) and reference packages
(test-only)."""

import argparse
import csv
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

import metrics
import utils

# -----------------------------------------------------------------------------
# DBTex toy case: the official duke_dbt_data.evaluate, run unmodified, gives TOY_RESULT

LABELS = [{"PatientID": f"P{i}", "StudyUID": f"S{i}", "View": v, "Normal": int(i > 2),
           "Actionable": 0, "Benign": int(i == 2), "Cancer": int(i == 1)}
          for i, v in ((1, "lcc"), (2, "rmlo"), (3, "lcc"), (4, "rcc"))]
BOXES = [dict(zip(("StudyUID", "View", "X", "Y", "Width", "Height", "Slice", "VolumeSlices"), r))
         for r in (
    ("S1", "lcc", 500, 600, 120, 80, 30, 60),
    ("S2", "rmlo", 1000, 1200, 300, 260, 20, 48),
    ("S2", "rmlo", 300, 300, 40, 40, 40, 48))]
PREDICTIONS = [dict(zip(("StudyUID", "View", "X", "Width", "Y", "Height", "Z", "Depth", "Score"), r))
               for r in (
    ("S1", "lcc", 520, 100, 610, 90, 28, 4, .95),
    ("S1", "lcc", 530, 100, 620, 90, 26, 4, .90),
    ("S1", "lcc", 1500, 100, 1600, 90, 10, 4, .80),
    ("S2", "rmlo", 1050, 280, 1210, 250, 12, 4, .60),
    ("S2", "rmlo", 2000, 50, 100, 50, 5, 2, .85),
    ("S2", "rmlo", 900, 60, 900, 60, 30, 2, .40),
    ("S2", "rmlo", 310, 40, 300, 40, 35, 4, .20),
    ("S3", "lcc", 100, 50, 100, 50, 5, 2, .70),
    ("S3", "lcc", 700, 50, 700, 50, 5, 2, .30),
    ("S4", "rcc", 100, 50, 100, 50, 5, 2, .50))]
TOY_RESULT = {"sensitivity_at_2_fps_all": 1.0, "sensitivity_at_1_fps_positive": 2 / 3,
              "sensitivity_at_2_fps_positive": 1.0, "sensitivity_at_3_fps_positive": 1.0,
              "sensitivity_at_4_fps_positive": 1.0, "mean_sensitivity_positive": 0.9166666667}


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def toy_files(tmp_path, predictions=PREDICTIONS):
    return (write_csv(tmp_path / "labels.csv", LABELS), write_csv(tmp_path / "boxes.csv", BOXES),
            write_csv(tmp_path / "predictions.csv", predictions))


def test_dbtex_toy_golden_in_memory_and_csv(tmp_path):
    for result in (metrics.dbtex_evaluate(LABELS, BOXES, PREDICTIONS),
                   metrics.dbtex_evaluate(*toy_files(tmp_path))):
        assert list(result) == list(TOY_RESULT)
        for k, v in TOY_RESULT.items():
            assert result[k] == pytest.approx(v, abs=1e-9), k


def test_dbtex_froc_curve_points():
    # positive volumes (2): hits .95 (S1) and .60 (big S2 box); .90 is a duplicate (neither TP nor
    # FP); .20 hits the small S2 box; FPs among positives at .85, .80, .40
    fps, sens = metrics.dbtex_froc(LABELS, BOXES, PREDICTIONS)
    # thresholds: 1.95, TP scores .95 .90 .60 .20, -0.05
    np.testing.assert_allclose(fps, [0, 0, 0, 1.0, 1.5, 1.5])
    np.testing.assert_allclose(sens, [0, 1 / 3, 1 / 3, 2 / 3, 1.0, 1.0])
    # 4 volumes, 3 more FPs
    fps, sens = metrics.dbtex_froc(LABELS, BOXES, PREDICTIONS, positive_only=False)
    np.testing.assert_allclose(fps, [0, 0, 0, 0.75, 1.5, 1.5])


def one_box_case(dx, dz, radius=100.0, w=40, h=40):
    """One GT box (centre (520, 520), slice 30 of 60) and one prediction offset by (dx, 0, dz)."""
    labels = [{"StudyUID": "S", "View": "lcc"}]
    boxes = [{"StudyUID": "S", "View": "lcc", "X": 520 - w / 2, "Y": 520 - h / 2, "Width": w,
              "Height": h, "Slice": 30, "VolumeSlices": 60}]
    pred = [{"StudyUID": "S", "View": "lcc", "X": 510 + dx, "Y": 510, "Width": 20, "Height": 20,
             "Z": 30 + dz - 1, "Depth": 2, "Score": 0.5}]
    return metrics.dbtex_evaluate(labels, boxes, pred, radius=radius)["mean_sensitivity_positive"]


def test_dbtex_hit_rule_is_inclusive():
    # radius max(diag/2, 100), <=
    assert one_box_case(100, 0) == 1.0 and one_box_case(100.5, 0) == 0.0
    # slice window VolumeSlices/4 = 15, <=
    assert one_box_case(0, 15) == 1.0 and one_box_case(0, 15.5) == 0.0
    # diag/2 = 250
    assert one_box_case(150, 0, w=300, h=400) == 1.0 and one_box_case(251, 0, w=300, h=400) == 0.0
    # 24 px > diag/2 = 14.1
    assert one_box_case(24, 0, radius=metrics.DBT_DINO_RADIUS, w=20, h=20) == 1.0
    assert one_box_case(24.5, 0, radius=metrics.DBT_DINO_RADIUS, w=20, h=20) == 0.0


def test_dbtex_nearest_box_assignment():
    # two boxes 120 px apart; one prediction hits both (radius 100) but is nearer the second; a
    # second prediction hits only the second: if the first were assigned to box 1 sensitivity would
    # reach 1 at 0 FP
    labels = [{"StudyUID": "S", "View": "lcc"}]
    boxes = [{"StudyUID": "S", "View": "lcc", "X": x, "Y": 0, "Width": 10, "Height": 10,
              "Slice": 10, "VolumeSlices": 40} for x in (0, 120)]
    preds = [{"StudyUID": "S", "View": "lcc", "X": x, "Y": 0, "Width": 10, "Height": 10, "Z": 9,
              "Depth": 2, "Score": s} for x, s in ((70, 0.9), (150, 0.8))]
    fps, sens = metrics.dbtex_froc(labels, boxes, preds)
    # the 0.8 hit duplicates box 2: neither TP nor FP
    np.testing.assert_allclose(sens, [0, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(fps, [0, 0, 0, 0])


def test_dbtex_interpolation_vs_monai_golden():
    # MONAI's FROC golden (fp [.9,.6,.3,.2], tp [.95,.7,missed], 3 targets, 2 images) as DBTex
    labels = [{"StudyUID": s, "View": "cc"} for s in "AB"]
    boxes = [{"StudyUID": s, "View": "cc", "X": x, "Y": 0, "Width": 10, "Height": 10, "Slice": 5,
              "VolumeSlices": 20} for s, x in (("A", 0), ("B", 0), ("B", 1000))]
    preds = [{"StudyUID": s, "View": "cc", "X": x, "Y": 0, "Width": 10, "Height": 10, "Z": 4,
              "Depth": 2, "Score": p}
             for s, x, p in (("A", 0, .95), ("B", 0, .7), ("A", 500, .9), ("A", 500, .6),
                             ("B", 500, .3), ("B", 500, .2))]
    result = metrics.dbtex_evaluate(labels, boxes, preds)
    want = pytest.approx(0.6666666667, abs=1e-9)  # = MONAI at 1..4 FP
    assert result["mean_sensitivity_positive"] == want
    # at (0.25, .5, 1, 2) MONAI gives 0.5833333333 because it also samples the curve at FP scores
    # (its points are reproduced here); DBTex samples only at TP scores: (0, 1/3), (.5, 2/3),
    # (2, 2/3)
    monai = np.interp([.25, .5, 1, 2], [0, 0, .5, .5, 1, 1.5, 2],
                      [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert monai.mean() == pytest.approx(0.5833333333, abs=1e-9)
    fps, sens = metrics.dbtex_froc(labels, boxes, preds)
    dbtex = np.interp([.25, .5, 1, 2], fps, sens).mean()
    assert dbtex == pytest.approx((0.5 + 3 * 2 / 3) / 4, abs=1e-12)


def dbtex_naive(labels, boxes, preds):
    """Loop-by-loop reading of duke_dbt_data.evaluate (no numpy until the interpolation), for random
    cross-checks."""
    gt = []
    for p in preds:
        c = (p["X"] + p["Width"] / 2, p["Y"] + p["Height"] / 2, p["Z"] + p["Depth"] / 2)
        hits = [(math.dist(c, g), j) for j, b in enumerate(boxes)
                for g in [(b["X"] + b["Width"] / 2, b["Y"] + b["Height"] / 2, b["Slice"])]
                if (b["StudyUID"], b["View"]) == (p["StudyUID"], p["View"])
                and math.dist(c[:2], g[:2]) <= max(math.hypot(b["Width"], b["Height"]) / 2, 100)
                and abs(c[2] - g[2]) <= b["VolumeSlices"] / 4]
        # min over (distance, box index): nearest, first on ties
        gt.append(min(hits)[1] if hits else -1)
    scores = [p["Score"] for p in preds]
    ths = sorted({max(scores) + 1, min(scores) - 1} | {s for s, g in zip(scores, gt) if g >= 0},
                 reverse=True)
    positive = {(b["StudyUID"], b["View"]) for b in boxes}

    def sens_at(ks, only_positive):
        n_vol = sum(not only_positive or (r["StudyUID"], r["View"]) in positive for r in labels)
        curve = []
        for th in ths:
            kept = [(p, g) for p, g in zip(preds, gt) if p["Score"] >= th
                    and (not only_positive or (p["StudyUID"], p["View"]) in positive)]
            fp = sum(g < 0 for _, g in kept) / n_vol
            curve.append((fp, len({g for _, g in kept if g >= 0}) / len(boxes)))
            # as the official _froc: the loop stops AFTER the first threshold past the limit
            if fp > max(ks):
                break
        return np.interp(ks, *zip(*curve))
    return [sens_at([2], False)[0], *sens_at([1, 2, 3, 4], True)]


def test_dbtex_vs_naive_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(40):
        labels = [{"StudyUID": f"S{i}", "View": "cc"} for i in range(6)]
        boxes = [{"StudyUID": f"S{i}", "View": "cc", "X": int(x), "Y": int(y), "Width": int(w),
                  "Height": int(h), "Slice": int(z), "VolumeSlices": 40}
                 for i in range(4) for x, y, w, h, z in
                 rng.integers([0, 0, 10, 10, 5], [300, 300, 300, 300, 35], (rng.integers(1, 3), 5))]
        preds = [{"StudyUID": f"S{i}", "View": "cc", "X": int(x), "Y": int(y), "Width": int(w),
                  "Height": int(h), "Z": int(z), "Depth": int(d),
                  "Score": round(float(rng.uniform()), 1)}
                 for i in range(6) for x, y, w, h, z, d in
                 rng.integers([0, 0, 10, 10, 0, 1], [400, 400, 200, 200, 40, 8],
                              (rng.integers(0, 12), 6))]
        if not preds:
            continue
        got = list(metrics.dbtex_evaluate(labels, boxes, preds).values())
        np.testing.assert_allclose(got[:5], dbtex_naive(labels, boxes, preds), atol=1e-12)


@pytest.mark.parametrize("which, edit, message", [
    ("predictions", lambda rows: [{k: v for k, v in r.items() if k != "Score"} for r in rows],
     "column(s) Score"),
    ("predictions", lambda rows: rows[:3] + [{**rows[3], "Score": "nan"}], "row 4, column Score"),
    ("predictions", lambda rows: rows[:2] + [{**rows[2], "X": "abc"}],
     "row 3, column X: 'abc' is not a finite"),
    ("predictions", lambda rows: rows + [{**rows[0], "StudyUID": "S9"}],
     "row 11: volume (StudyUID, View)"),
    ("boxes", lambda rows: [{**rows[0], "View": "rcc"}] + rows[1:], "row 1: volume"),
    ("boxes", lambda rows: [{**rows[0], "VolumeSlices": ""}] + rows[1:],
     "row 1, column VolumeSlices"),
    ("labels", lambda rows: rows + rows[:1], "duplicate"),
])
def test_dbtex_bad_input_names_file_and_column_or_row(tmp_path, which, edit, message):
    tables = {"labels": LABELS, "boxes": BOXES, "predictions": PREDICTIONS}
    tables[which] = edit(tables[which])
    paths = [write_csv(tmp_path / f"{k}.csv", v) for k, v in tables.items()]
    with pytest.raises(ValueError) as e:
        metrics.dbtex_evaluate(*paths)
    text = str(e.value)
    assert text.startswith(str(tmp_path / f"{which}.csv")) and message in text, text


def test_dbtex_empty_file(tmp_path):
    labels, boxes, preds = toy_files(tmp_path)
    (tmp_path / "empty.csv").write_text(",".join(metrics.PREDICTION_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="empty.csv: no data rows"):
        # boxes: header only
        metrics.dbtex_evaluate(labels, str(tmp_path / "empty.csv"), str(tmp_path / "empty.csv"))
    # a submission that found nothing
    result = metrics.dbtex_evaluate(labels, boxes, str(tmp_path / "empty.csv"))
    assert len(result) == 6 and set(result.values()) == {0.0}
    crlf = open(preds, "rb").read().replace(b"\n", b"\r\n")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + crlf)
    bom = metrics.dbtex_evaluate(labels, boxes, str(tmp_path / "bom.csv"))
    assert bom == metrics.dbtex_evaluate(labels, boxes, preds)
    # e.g. a spreadsheet saved as UTF-16
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00StudyUID")
    # over csv's field size limit
    (tmp_path / "huge.csv").write_text("StudyUID\n" + "x" * 200_000 + "\n")
    for name in ("binary.csv", "huge.csv"):
        with pytest.raises(ValueError, match=f"{name}: not a readable CSV"):
            metrics.dbtex_evaluate(labels, boxes, str(tmp_path / name))


def test_cli_prints_the_six_numbers(tmp_path):
    labels, boxes, preds = toy_files(tmp_path)
    script = str(Path(__file__).resolve().parents[1] / "metrics.py")
    out = subprocess.run([sys.executable, script, "dbtex", "--labels", labels, "--boxes", boxes,
                          "--predictions", preds], capture_output=True, text=True, check=True)
    want = {k: f"{v:.10f}" for k, v in TOY_RESULT.items()}
    assert dict(line.split() for line in out.stdout.splitlines()) == want
    args = metrics.get_args(["dbtex", "--labels", "l", "--boxes", "b", "--predictions", "p"])
    assert args.radius == 100.0


# -----------------------------------------------------------------------------
# classification metrics and statistics


def random_ties(seed, n=60):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    # coarse scores: many ties
    return y, rng.integers(0, 8, n) / 7.0, rng.integers(0, 5, n) / 4.0 + 0.3 * y


def test_auroc_accuracy_f1_confusion_vs_sklearn():
    for seed in range(20):
        y, s1, s2 = random_ties(seed)
        assert abs(metrics.auroc(y, s1) - roc_auc_score(y, s1)) < 1e-12
        a, b = np.random.default_rng(seed).integers(0, 4, (2, 50))
        assert metrics.accuracy(a, b) == accuracy_score(a, b)
        assert abs(metrics.macro_f1(a, b) - f1_score(a, b, average="macro")) < 1e-12
        np.testing.assert_array_equal(metrics.confusion_matrix(a, b), sk_confusion_matrix(a, b))
    y, yhat = [0, 1, 2, 3, 0, 1, 2, 3, 1, 2], [0, 1, 1, 3, 0, 2, 2, 3, 1, 0]
    assert metrics.macro_f1(y, yhat) == pytest.approx(0.7166666667, abs=1e-9)  # sklearn's value
    sk = f1_score([0, 0, 1], [0, 2, 1], average="macro", zero_division=0)
    assert metrics.macro_f1([0, 0, 1], [0, 2, 1]) == pytest.approx(sk)
    with pytest.raises(ValueError, match="only class 1"):
        metrics.auroc([1, 1, 1], [0.2, 0.5, 0.1])


def test_weighted_f1_and_class_report_vs_sklearn():
    """weighted F1 against scikit-learn; class_report's figures equal scikit-learn's on the same
    predictions, and its CIs are bootstrap_ci's over whole patients."""
    for seed in range(20):
        a, b = np.random.default_rng(seed).integers(0, 4, (2, 50))
        b[:3] = 4  # a label only predicted: weight 0
        assert abs(metrics.weighted_f1(a, b) - f1_score(a, b, average="weighted")) < 1e-12
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    probs = rng.random((60, 3)) + 0.8 * np.eye(3)[y]  # (60, 3) better than chance
    patients = np.arange(60) // 3  # 20 patients of 3 units
    report = metrics.class_report(y, probs, patients, n_boot=100, seed=1)
    pred = probs.argmax(1)
    assert report["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-9)
    assert report["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-9)
    assert report["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"), abs=1e-9)
    assert report["confusion"] == sk_confusion_matrix(y, pred).tolist()
    want = metrics.bootstrap_ci(metrics.weighted_f1, y, pred, n_boot=100, seed=1, groups=patients)
    assert report["weighted_f1_ci"] == list(want[1:])
    binary = metrics.class_report(y == 2, probs[:, 2], patients, n_boot=100, seed=1)
    assert binary["auroc"] == pytest.approx(roc_auc_score(y == 2, probs[:, 2]), abs=1e-9)
    low, high = binary["auroc_ci"]
    assert low < binary["auroc"] < high and set(binary) == {"auroc", "auroc_ci"}


def delong_placement_oracle(y, a, b):
    """O(m n) DeLong: psi(x, z) = 1 if x > z, 1/2 if equal, per (positive, negative) pair; V10/V01
    are row/column means of psi, S = cov(V10)/m + cov(V01)/n."""
    y = np.asarray(y, bool)
    v10, v01 = [], []
    for s in (a, b):
        psi = (s[y][:, None] > s[~y][None]) + 0.5 * (s[y][:, None] == s[~y][None])
        v10.append(psi.mean(1)), v01.append(psi.mean(0))
    cov = np.cov(v10) / y.sum() + np.cov(v01) / (~y).sum()
    auc = [v.mean() for v in v10]
    z = (auc[0] - auc[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return auc[0], auc[1], 2 * stats.norm.sf(abs(z))


def test_delong_golden_and_vs_placement_oracle():
    y = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    s1 = [.9, .8, .7, .6, .4, .5, .3, .2, .35, .1, .65, .05]
    s2 = [.7, .9, .4, .5, .3, .6, .2, .45, .1, .3, .55, .2]
    auc1, auc2, p = metrics.delong_test(y, s1, s2)
    # = roc_comparison
    assert (auc1, auc2, p) == pytest.approx((0.9142857143, 0.7571428571, 0.1344165742), abs=1e-9)
    worst = 0.0
    for seed in range(30):
        y, a, b = random_ties(seed)
        worst = max(worst, np.max(np.abs(np.subtract(metrics.delong_test(y, a, b),
                                                     delong_placement_oracle(y, a, b)))))
    assert worst < 1e-9
    assert metrics.delong_test(y, a, a)[2] == 1.0
    with pytest.raises(ValueError, match="only class 0"):
        metrics.delong_test([0, 0, 0], [1, 2, 3], [1, 2, 3])


def test_mcnemar_golden_and_vs_statsmodels():
    # table [[30, 12], [4, 54]]: b = 12 cases only A right, c = 4 only B (p values: statsmodels')
    a = np.repeat([1, 1, 0, 0], [30, 12, 4, 54])
    b = np.repeat([1, 0, 1, 0], [30, 12, 4, 54])
    assert metrics.mcnemar(a, b) == pytest.approx(0.0768127441, abs=1e-9)
    assert metrics.mcnemar(a, b, exact=False) == pytest.approx(0.0801183137, abs=1e-9)
    chi2 = metrics.mcnemar(a, b, exact=False, correction=False)
    assert chi2 == pytest.approx(0.0455002639, abs=1e-9)
    rng = np.random.default_rng(0)
    for _ in range(30):
        a, b = rng.integers(0, 2, (2, rng.integers(5, 80))).astype(bool)
        table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
        if table[0][1] + table[1][0] == 0:
            continue
        for exact, corr in ((True, True), (False, True), (False, False)):
            ref = sm_mcnemar(table, exact=exact, correction=corr).pvalue
            assert abs(metrics.mcnemar(a, b, exact=exact, correction=corr) - ref) < 1e-12


def test_benjamini_hochberg_golden_and_vs_statsmodels():
    p = [.01, .04, .03, .005, .20, .049]
    adj = metrics.benjamini_hochberg(p)
    np.testing.assert_allclose(adj, [.03, .0588, .0588, .03, .2, .0588], atol=1e-9)  # = statsmodels
    assert list(adj <= 0.05) == [True, False, False, True, False, False]
    rng = np.random.default_rng(0)
    for _ in range(30):
        p = np.round(rng.uniform(0, 1, rng.integers(1, 40)) ** 3, 2)  # rounding makes ties
        np.testing.assert_allclose(metrics.benjamini_hochberg(p),
                                   multipletests(p, method="fdr_bh")[1], atol=1e-12)


def test_risk_auroc_by_year_inclusion_rule():
    # exam: 0 cancer at 0.5 y | 1 cancer at 2.3 y | 2 no cancer, 6 y follow-up | 3 none, 1.5 y | 4
    # none, 3 y | 5 cancer after 7 y (beyond 5: a negative), 8 y | 6 none, 0.5 y (Mirai's int()
    # truncation keeps it for year 1)
    score = np.array([0.5, 0.25, 0.2, 0.7, 0.3, 0.1, 0.6])
    ytc = [0.5, 2.3, np.inf, np.inf, np.inf, 7.0, np.inf]
    yfu = [0.5, 2.3, 6.0, 1.5, 3.0, 8.0, 0.5]
    auc = metrics.risk_auroc_by_year(np.tile(score[:, None], 5), ytc, yfu)
    # year 1: {0} vs {1..6}: 0.5 beats .25 .2 .3 .1, loses .7 .6 | year 2: exams 3, 6 excluded |
    # year 3: {0, 1} vs {2, 4, 5} | year 4: exam 4 excluded | year 5: {0, 1} vs {2, 5}
    assert auc == pytest.approx({1: 4 / 6, 2: 1.0, 3: 5 / 6, 4: 1.0, 5: 1.0}, abs=1e-12)


# -----------------------------------------------------------------------------
# bootstrap


def test_bootstrap_matches_scipy_percentile():
    x = np.arange(20.0)
    est, low, high = metrics.bootstrap_ci(np.mean, x, n_boot=1000, seed=0)
    ref = stats.bootstrap((x,), np.mean, n_resamples=1000, method="percentile",
                          rng=np.random.default_rng(0))
    assert (low, high) == pytest.approx((ref.confidence_interval.low,
                                         ref.confidence_interval.high), abs=1e-12)
    assert (low, high) == pytest.approx((6.95, 11.9), abs=1e-9) and est == 9.5  # scipy's, seed 0


def test_bootstrap_reproducible_contains_estimate_and_paired():
    y, a, b = random_ties(3, n=80)

    def delta(y, a, b):
        return metrics.auroc(y, a) - metrics.auroc(y, b)
    first = metrics.bootstrap_ci(delta, y, a, b, n_boot=200, seed=7)
    assert first == metrics.bootstrap_ci(delta, y, a, b, n_boot=200, seed=7)
    assert first != metrics.bootstrap_ci(delta, y, a, b, n_boot=200, seed=8)
    assert first[1] <= first[0] <= first[2] and first[0] == delta(y, a, b)
    # same indices for both models
    assert metrics.bootstrap_ci(delta, y, a, a, n_boot=50) == (0.0, 0.0, 0.0)


def test_bootstrap_keeps_groups_whole():
    sizes = np.array([1, 2, 3, 4, 5, 6])
    # interleaved cases
    groups = np.repeat(np.arange(6), sizes)[np.random.default_rng(0).permutation(21)]
    seen = []

    def whole(g):
        counts = np.bincount(g, minlength=6)
        seen.append(np.all(counts % sizes == 0))
        return counts @ sizes
    metrics.bootstrap_ci(whole, groups, n_boot=100, groups=groups)
    assert len(seen) == 101 and all(seen)
    seen.clear()
    metrics.bootstrap_ci(whole, groups, n_boot=100)  # case resampling splits groups
    assert not all(seen)


# -----------------------------------------------------------------------------
# logging helpers


def test_progress_line_and_eta():
    p = utils.Progress(1000, start_step=100)
    p.t0 = time.monotonic() - 60  # 100 steps in 60 s -> 800 remaining steps take 8 min
    line = p.line(200, {"loss": 9.8123, "dino": 7.1, "koleo": -0.31, "lr": 3.2e-4}, 412.3, 38.2,
                  2.1, 21.3)
    assert line == ("step 200/1000 | loss 9.812 dino 7.1 koleo -0.31 | lr 3.2e-04 | 412 img/s | "
                    "38 ms/step | data 2 ms | eta 0h08m | mem 21.3G")
    assert "mem" not in p.line(200, {"loss": 1.0}, 1, 1, 1)
    # no loss terms (probe.py's embedding), and a slow rate keeps its first digits
    assert p.line(200, {}, 1.123, 890, 0).startswith("step 200/1000 | 1.1 img/s | 890 ms/step")


def test_jsonl_writer_parses_line_by_line(tmp_path):
    w = utils.JsonlWriter(tmp_path / "run" / "metrics.jsonl")
    w.write({"step": 1, "loss": np.float32(0.5), "n": np.int64(3)})
    w.write({"step": 2, "split": "val", "auc": 0.75})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s) for s in lines] == [{"step": 1, "loss": 0.5, "n": 3.0},
                                              {"step": 2, "split": "val", "auc": 0.75}]
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    assert w.read() == [{"step": 1, "loss": 0.5, "n": 3.0},
                        {"step": 2, "split": "val", "auc": 0.75}]


def test_check_run_folder_refuses_another_scripts_run_and_overwrite_clears_it(tmp_path):
    out = tmp_path / "run"
    utils.check_run_folder(out, "ckpt.pt", script="detect.py")  # no folder yet: nothing to refuse
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file: --out names a file, not a folder"):
        utils.check_run_folder(tmp_path / "file", "ckpt.pt")
    utils.write_args(out, argparse.Namespace(seed=0), "pretrain.py")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    utils.check_run_folder(out, "ckpt.pt", script="pretrain.py")  # its own, stopped before a ckpt
    owned = r"already holds a run of pretrain.py \(its args.json\); use another --out"
    with pytest.raises(ValueError, match=owned):  # no marker, but another script's folder
        utils.check_run_folder(out, "metrics.json", script="probe.py")
    (out / "ckpt.pt").write_bytes(b"old weights")
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(ValueError, match=r"a run \(ckpt.pt\); use --resume auto to continue it"):
        utils.check_run_folder(out, "ckpt.pt", script="pretrain.py")
    with pytest.raises(ValueError,
                       match=r"a run \(metrics.json\); use another --out, or --overwrite"):
        # probe's marker: no --resume to offer
        utils.check_run_folder(out, "metrics.json", script="pretrain.py")
    # deleted to save space: the run's outputs still mark the folder
    (out / "ckpt.pt").rename(out / "ckpt.bak")
    with pytest.raises(ValueError, match=r"a run \(metrics.json\)"):
        utils.check_run_folder(out, "ckpt.pt", script="pretrain.py", outputs=("metrics.json",))
    (out / "ckpt.bak").rename(out / "ckpt.pt")
    stale = utils.check_run_folder(out, "ckpt.pt", overwrite=True, script="detect.py",
                                   outputs=("metrics.json",))
    assert stale == ["args.json", "ckpt.pt", "metrics.json", "metrics.jsonl"]
    assert (out / "ckpt.pt").exists()
    # the inputs were good
    utils.write_args(out, argparse.Namespace(seed=1), "detect.py", clear=stale)
    # no old ckpt.pt for --resume auto
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "notes.txt"]
    assert json.loads((out / "args.json").read_text())["script"] == "detect.py"


def test_draw_curves_puts_each_point_where_its_values_say(tmp_path):
    """curves.png: panels in the order asked, only for keys the records hold; step left to right,
    value bottom to top within each panel's own range; the baseline dashed grey at its value;
    written atomically."""
    from PIL import Image
    records = [{"step": s, "split": "train", "loss": 10.0 - s, "koleo": 0.5, "time": 1e9 + s}
               for s in range(1, 11)]
    records += [{"step": 5, "split": "val", "density_acc": 0.3, "density_majority": 0.5},
                {"step": 10, "split": "val", "density_acc": 0.6, "density_majority": 0.5}]
    panels = [("train", "loss"), ("train", "ibot"), ("train", "koleo"), ("val", "density_acc")]
    path = tmp_path / "curves.png"
    boxes = utils.draw_curves(path, records, panels, {"density_acc": "density_majority"}, title="t")
    assert list(boxes) == ["loss", "koleo", "density_acc"]  # no ibot records: no empty panel
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    img, white = Image.open(path).convert("RGB"), (255, 255, 255)

    def at(key, step, value):  # colours within 2 px (lines are 1-2 px wide) of (step, value),
        x0, y0, x1, y1, s_lo, s_hi, lo, hi = boxes[key]  # computed from the returned box and ranges
        x = x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0)
        y = y1 - (value - lo) / (hi - lo) * (y1 - y0)
        return {img.getpixel((round(x), round(y) + dy)) for dy in range(-2, 3)} - {white}

    assert boxes["loss"][4:] == (1, 10, 0.0, 9.0) and boxes["density_acc"][4:] == (5, 10, 0.3, 0.6)
    for step in (1, 3.25, 5.5, 10):  # on the line from (1, 9) down to (10, 0)
        assert at("loss", step, 10.0 - step), step
    assert not at("loss", 3.25, 10.0 - 7.75)  # where an upside-down axis would put it
    assert at("koleo", 5, 0.5)  # a flat series is drawn mid-panel, not lost on the frame
    assert at("density_acc", 7.5, 0.45) and not at("density_acc", 7.5, 0.35)
    # dashes
    assert at("density_acc", 5.2, 0.5) == {(150, 150, 150)} and not at("density_acc", 5.8, 0.5)


def test_dbtex_interpolates_towards_the_first_point_past_the_limit():
    """As the official _froc: the point whose fps first exceeds max k is kept, so k FP interpolates
    towards it. One volume, 2 boxes: hit at .95, five FPs at .9-.5, hit at .4 -> curve (0, 0),
    (0, .5), (5, 1)."""
    labels = [{"StudyUID": "S1", "View": "lcc"}]
    boxes = [{"StudyUID": "S1", "View": "lcc", "X": 100, "Y": 100, "Width": 50, "Height": 50,
              "Slice": 10, "VolumeSlices": 40},
             {"StudyUID": "S1", "View": "lcc", "X": 1000, "Y": 1000, "Width": 50, "Height": 50,
              "Slice": 10, "VolumeSlices": 40}]

    def pred(x, s):
        return {"StudyUID": "S1", "View": "lcc", "X": x, "Y": x, "Width": 50, "Height": 50, "Z": 9,
                "Depth": 2, "Score": s}
    preds = [pred(100, 0.95)] + [pred(2000 + 300 * i, 0.9 - 0.1 * i)
                                 for i in range(5)] + [pred(1000, 0.4)]
    out = metrics.dbtex_evaluate(labels, boxes, preds)
    want = [0.6, 0.7, 0.8, 0.9]  # 0.5 + 0.5 * k / 5, by hand
    got = [out[f"sensitivity_at_{k}_fps_positive"] for k in (1, 2, 3, 4)]
    assert got == pytest.approx(want, abs=1e-12)
    assert out["mean_sensitivity_positive"] == pytest.approx(0.75, abs=1e-12)
    assert out["sensitivity_at_2_fps_all"] == pytest.approx(0.7, abs=1e-12)


def test_roc_curve_matches_sklearn_with_ties():
    from sklearn.metrics import roc_curve as sk_roc_curve
    y, s, _ = random_ties(7, n=60)
    fpr, tpr = metrics.roc_curve(y, s)
    ref_fpr, ref_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(y, s), abs=1e-12)


def test_draw_curves_survives_a_flat_huge_series(tmp_path):
    """--lr 1e30 logs a flat 1e30 line: padding it by 0.5 changes nothing in float, which divided by
    zero."""
    records = [{"step": s, "split": "train", "lr": 1e30} for s in range(1, 4)]
    box = utils.draw_curves(tmp_path / "c.png", records, [("train", "lr")])["lr"]
    assert box[6] < 1e30 < box[7] and (tmp_path / "c.png").exists()


def test_csv_text_quotes_an_id_holding_a_comma():
    """probe's and detect's predictions.csv: an exam or patient ID may hold a comma or quotes."""
    preds = [dict(patient="P1", exam='CC, "left" 2019', density="a", pred="b", p_a="0.100000"),
             dict(patient="P2", exam="E2", density="c", pred="c", p_a="0.700000")]
    assert [dict(r) for r in csv.DictReader(io.StringIO(utils.csv_text(preds)))] == preds
    lines = utils.csv_text(preds, ["exam", "patient"]).splitlines()
    assert lines == ["exam,patient", '"CC, ""left"" 2019",P1', "E2,P2"]


def test_radar_vertices_sit_at_their_axis_angle_and_radius(tmp_path):
    """radar.png read back: each value's dot where an independent computation puts it: axis k of n
    at 2 pi k / n clockwise from 12 o'clock, value v at v x the rim's radius from the centre."""
    axes = ["vindr cancer", "rsna cancer", "cbis-ddsm birads", "cmmd lesion-type", "density"]
    polygons = {"A": [0.9, 0.5, 0.7, 0.3, 0.6], "B": [0.4, 0.8, None, 0.65, 0.2]}
    cx, cy = utils.draw_radar(axes, polygons, "radar", tmp_path / "radar.png")
    img = np.asarray(Image.open(tmp_path / "radar.png").convert("RGB"))
    for colour, values in zip(utils.CURVE_COLOURS, polygons.values()):
        for k, v in enumerate(values):
            if v is None:
                continue
            theta = 2 * np.pi * k / len(axes)
            x = cx + utils.RADAR_RADIUS * v * np.sin(theta)
            y = cy - utils.RADAR_RADIUS * v * np.cos(theta)
            assert img[round(y), round(x)].tolist() == list(colour), (k, v)
    rim = img[round(cy - utils.RADAR_RADIUS), round(cx)]  # the 1.0 ring crosses axis 0 there
    assert rim.tolist() != [255, 255, 255]
