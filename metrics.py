"""The figures a run reports, and the paired tests that compare runs (numpy, scipy).

In file order: classification (auroc, accuracy, confusion_matrix, macro_f1, weighted_f1,
risk_auroc_by_year, roc_curve), paired tests (delong_test, mcnemar, benjamini_hochberg),
bootstrap_ci, the probes' reports with CIs by patient (patient_ci, density_report, class_report),
detection (the DBTex evaluator dbtex_evaluate / dbtex_froc, density_probe_cv), probe.py's risk
report (year_not_scored, risk_block, risk_report, risk_lines, roc_panels), and the `compare` and
`dbtex` CLIs.
Each rule is written out in full by the function that applies it; in brief:
- Risk AUROC for year k (risk_year_cases): Mirai's rule (compute_auc_x_year_auc) counts cancers
  diagnosed after year k as negatives; DBT-DINO's leaves them out, and its negatives need no cancer
  within 5 years and at least k years of follow-up.
- Bootstrap CIs (DBT-DINO §2.5: 1,000 resamples) draw whole patients when `groups` is given: a
  patient's images are correlated, and resampling them one by one would shrink the CI.
- DeLong compares two AUCs on the same cases through the covariance of their placement values.
  McNemar compares two accuracies by the discordant pairs (exact binomial, or chi-squared with or
  without continuity correction). Benjamini-Hochberg adjusts all the comparisons' p-values for the
  false discovery rate (DBT-DINO §2.5).
- DBTex (duke_dbt_data.evaluate; Konz et al., JAMA Netw Open 2023): a prediction hits a box when its
  centre lies within max(box diagonal / 2, 100 px) of the box centre and within VolumeSlices / 4
  slices of its centre slice. The ranking metric is the mean sensitivity at 1, 2, 3 and 4 false
  positives per volume, over the volumes that hold a box.

    python metrics.py dbtex --labels labels.csv --boxes boxes.csv --predictions predictions.csv
    python metrics.py compare RUN_A RUN_B [RUN_C ...] [--rule mirai|dbt-dino] [--out DIR]
`compare` groups probe.py runs by what they scored (run_task) and tests every pair of a group on
their common test units (McNemar on accuracy: density and 2-D multi-class tasks; DeLong on AUROC:
2-D binary tasks and each year of risk), Benjamini-Hochberg over all the tests of all the tasks,
prints a table and writes compare.json, compare.md (each run's headline metric with its CI, each
pair's p-values) and radar.png (a polygon per backbone, an axis per task: MammoDINO's Figure 2).
Array functions raise ValueError naming the argument; table readers name the file, column and row.
"""

import argparse
import csv
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

import utils

# ------------------------------------------------------------------------ classification metrics
def _binary(y, where):
    y = np.asarray(y)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError(f"{where}: y_true must be a 1-D array of 0/1 labels")
    if y.min() == y.max():
        raise ValueError(f"{where}: y_true has only class {int(y[0])}; "
                         "AUROC needs positives and negatives")
    return y.astype(bool)


def _scores(s, n, where):
    s = np.asarray(s, dtype=float)
    if s.shape != (n,) or not np.isfinite(s).all():
        raise ValueError(f"{where}: scores must be {n} finite numbers, got shape {s.shape}")
    return s


def _placements(y, s):
    """DeLong placement values: per positive, the fraction of negatives it outscores; per negative,
    the fraction of positives that outscore it (ties count 1/2 in both). Midranks make this
    O(N log N) (Sun & Xu 2014)."""
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    ranks = stats.rankdata(np.concatenate([pos, neg]))  # midranks over all cases
    v10 = (ranks[:m] - stats.rankdata(pos)) / n
    v01 = 1.0 - (ranks[m:] - stats.rankdata(neg)) / m
    return v10, v01


def auroc(y_true, y_score):
    """AUROC = P(score_pos > score_neg) + 1/2 P(score_pos == score_neg) (Mann-Whitney)."""
    y = _binary(y_true, "auroc")
    return float(_placements(y, _scores(y_score, len(y), "auroc"))[0].mean())


def accuracy(y_true, y_pred):
    """Fraction of cases whose predicted label equals the true label."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"accuracy: y_true {y_true.shape} and y_pred {y_pred.shape} "
                         "must be equal, non-empty")
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true, y_pred, labels=None):
    """C[i, j] = number of cases with true label labels[i] predicted as labels[j]; labels default
    to the sorted union of both arrays."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    accuracy(y_true, y_pred)  # same shape checks
    labels = np.unique(np.concatenate([y_true, y_pred])) if labels is None else np.asarray(labels)
    if not (np.isin(y_true, labels).all() and np.isin(y_pred, labels).all()):
        raise ValueError("confusion_matrix: a label in y_true or y_pred is not in `labels`")
    k = len(labels)
    idx = {v: i for i, v in enumerate(labels.tolist())}
    flat = [idx[t] * k + idx[p] for t, p in zip(y_true.tolist(), y_pred.tolist())]
    return np.bincount(flat, minlength=k * k).reshape(k, k)


def macro_f1(y_true, y_pred):
    """Unweighted mean over the labels present in y_true or y_pred of F1 = 2TP / (2TP + FP + FN)."""
    c = confusion_matrix(y_true, y_pred)
    tp = np.diag(c)
    return float(np.mean(2 * tp / (c.sum(0) + c.sum(1))))  # 2TP+FP+FN = col + row sum, never 0


def weighted_f1(y_true, y_pred):
    """Mean F1 over the labels, weighted by each label's count in y_true (scikit-learn's
    average="weighted": a label only predicted weighs 0)."""
    c = confusion_matrix(y_true, y_pred)
    tp, support = np.diag(c), c.sum(1)  # true counts per label
    return float((2 * tp / (c.sum(0) + support) * support).sum() / support.sum())


RISK_RULES = ("mirai", "dbt-dino")


def risk_year_cases(years_to_cancer, years_to_followup, year, max_followup=5, rule="mirai"):
    """Which exams year `year` (1..T) scores by one of two rules, and their labels -> (keep, label),
    bool (N,) each. An exam is a cancer if years_to_cancer < T (inf when none).
    rule "mirai" (Mirai's compute_auc_x_year_auc): cancers have t = int(years_to_cancer), others
    t = int(min(years_to_followup, T) - 1); positive if cancer and t <= year-1, negative if
    t >= year-1 (so later cancers count as negatives), excluded otherwise.
    rule "dbt-dino" (DBT-DINO's per-year AUROC, stated on exam times): positives are cancers
    diagnosed within `year` years (years_to_cancer < year); negatives have no cancer within T years
    and at least `year` years of follow-up; cancers diagnosed after `year` (but within T) are
    excluded, not counted as negatives.
    """
    if rule not in RISK_RULES:
        raise ValueError(f"risk rule {rule!r}: choose from {', '.join(RISK_RULES)}")
    ytc = np.asarray(years_to_cancer, dtype=float)
    yfu = np.asarray(years_to_followup, dtype=float)
    cancer = ytc < max_followup
    if rule == "dbt-dino":
        positive = cancer & (ytc < year)
        return positive | (~cancer & (yfu >= year)), positive
    # np.trunc, not floor, reproduces Python int() in Mirai (follow-up < 1 year gives t = 0, not -1)
    t = np.where(cancer, np.trunc(ytc), np.trunc(np.minimum(yfu, max_followup) - 1))
    positive = cancer & (t <= year - 1)
    return positive | (t >= year - 1), positive


def risk_auroc_by_year(probs, years_to_cancer, years_to_followup, max_followup=5, rule="mirai"):
    """Per-year AUROC of a risk model -> {k: AUROC} for k = 1..T, by Mirai's rule (the default) or
    DBT-DINO's (risk_year_cases defines both). probs: (N, T) predicted cancer probability within
    k = 1..T years; years_to_cancer: inf (or >= T) if none. The score for year k is probs[:, k-1].
    A year with no positives or no negatives gives NaN.
    """
    probs = np.asarray(probs, dtype=float)
    ytc = np.asarray(years_to_cancer, dtype=float)
    yfu = np.asarray(years_to_followup, dtype=float)
    if (probs.shape != (len(ytc), max_followup) or ytc.shape != yfu.shape
            or np.isnan(ytc + yfu).any()):
        raise ValueError(f"risk_auroc_by_year: need probs (N, {max_followup}) and N non-NaN years, "
                         f"got {probs.shape}, {ytc.shape}, {yfu.shape}")
    out = {}
    for k in range(1, max_followup + 1):
        keep, label = risk_year_cases(ytc, yfu, k, max_followup, rule)
        label = label[keep]
        out[k] = auroc(label, probs[keep, k - 1]) if 0 < label.sum() < len(label) else float("nan")
    return out


def roc_curve(y_true, y_score):
    """ROC points (fpr, tpr) from (0, 0) to (1, 1), one per distinct score (ties move together)."""
    y = _binary(y_true, "roc_curve")
    s = _scores(y_score, len(y), "roc_curve")
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


# --------------------------------------------------------------- paired tests, multiple comparisons
def delong_test(y_true, score_a, score_b):
    """DeLong test of AUC_a == AUC_b for two scores on the same cases -> (auc_a, auc_b, 2-sided p).
    With placement values V10 (positives, m) and V01 (negatives, n) of each model, the covariance
    of the two AUCs is S = cov(V10)/m + cov(V01)/n (ddof = 1), and
    z = (auc_a - auc_b) / sqrt(S_aa + S_bb - 2 S_ab).
    """
    y = _binary(y_true, "delong_test")
    a10, a01 = _placements(y, _scores(score_a, len(y), "delong_test"))
    b10, b01 = _placements(y, _scores(score_b, len(y), "delong_test"))
    m, n = len(a10), len(a01)
    if m < 2 or n < 2:
        raise ValueError(f"delong_test: need >= 2 positives and >= 2 negatives, got {m} and {n}")
    s = np.cov(np.stack([a10, b10])) / m + np.cov(np.stack([a01, b01])) / n
    auc_a, auc_b = float(a10.mean()), float(b10.mean())
    var, diff = s[0, 0] + s[1, 1] - 2 * s[0, 1], abs(auc_a - auc_b)
    if var <= 0:  # degenerate placements (identical scores): the difference has no sampling noise
        return auc_a, auc_b, 1.0 if diff == 0 else 0.0
    return auc_a, auc_b, float(2 * stats.norm.sf(diff / np.sqrt(var)))


def mcnemar(correct_a, correct_b, exact=True, correction=True):
    """McNemar test on paired per-case correctness; b = cases only A gets right, c = only B.

    exact: p = min(1, 2 * BinomCDF(min(b, c); b + c, 1/2)). Otherwise chi2 (1 df) of
    (|b - c| - 1)^2 / (b + c), or (b - c)^2 / (b + c) with correction=False. No discordant pairs
    gives p = 1.
    """
    ca, cb = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if ca.shape != cb.shape or ca.ndim != 1 or not np.isin(np.concatenate([ca, cb]), (0, 1)).all():
        raise ValueError("mcnemar: correct_a and correct_b must be equal-length 1-D arrays "
                         "of 0/1 or bool")
    b, c = int(np.sum(ca > cb)), int(np.sum(ca < cb))
    if b + c == 0:
        return 1.0
    if exact:
        return float(min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5)))
    chi2 = (abs(b - c) - (1 if correction else 0)) ** 2 / (b + c)
    return float(stats.chi2.sf(chi2, 1))


def benjamini_hochberg(p_values):
    """Benjamini-Hochberg adjusted p-values, in the input order: p_(i) * m / i for the i-th
    smallest, made monotone from the largest down (step-up) and capped at 1. Reject H_i at FDR q
    iff adjusted_i <= q."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or p.size == 0 or not ((p >= 0) & (p <= 1)).all():
        raise ValueError("benjamini_hochberg: p_values must be a non-empty 1-D array in [0, 1] "
                         "(no NaN)")
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return adjusted


# ------------------------------------------------------------------------ bootstrap
def bootstrap_ci(statistic, *arrays, n_boot=1000, alpha=0.05, seed=0, groups=None):
    """Percentile bootstrap CI of statistic(*arrays) -> (estimate on all data, low, high).

    Each resample draws cases with replacement and applies the SAME indices to every array, so a
    paired statistic (auroc(y, a) - auroc(y, b)) keeps its pairing. With `groups` (e.g. patient
    IDs, one per case) whole groups are drawn, with all their cases. low/high are the alpha/2 and
    1 - alpha/2 quantiles. A resample on which the statistic raises ValueError (e.g. AUROC without
    positives) is skipped with a warning. The draws use np.random.default_rng(seed) alone."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0]) if arrays else 0
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci: need non-empty arrays of equal length, "
                         f"got {[len(a) for a in arrays]}")
    units = n
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"bootstrap_ci: groups must have one entry per case ({n}), "
                             f"got {groups.shape}")
        _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
        members = np.split(np.argsort(inv, kind="stable"), np.cumsum(counts)[:-1])  # per group
        units = len(members)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(units, size=units)
        idx = pick if groups is None else np.concatenate([members[g] for g in pick])
        try:
            values.append(float(statistic(*(a[idx] for a in arrays))))
        except ValueError:
            continue
    if len(values) < n_boot:
        warnings.warn(f"bootstrap_ci: statistic undefined on {n_boot - len(values)} of {n_boot} "
                      "resamples")
    if not values:
        raise ValueError("bootstrap_ci: statistic undefined on every resample")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(statistic(*arrays)), float(low), float(high)


# ------------------------------------------------------------ probe reports: CIs by patient
def nanmean(values):
    """The mean of the finite values; NaN when there is none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def patient_ci(statistic, *arrays, groups, n_boot, seed):
    """[estimate, low, high] by patient bootstrap; NaN when undefined (a class absent from test)."""
    def defined(*a):
        v = statistic(*a)
        if not np.isfinite(v):
            raise ValueError("undefined on this resample")
        return v
    try:
        with warnings.catch_warnings():  # resamples without positives are expected on small sets
            warnings.simplefilter("ignore")
            return list(bootstrap_ci(defined, *arrays, n_boot=n_boot, seed=seed, groups=groups))
    except ValueError:
        return [float(statistic(*arrays)), math.nan, math.nan]


def density_report(y, probs, patients, subgroups, n_boot, seed, train_majority):
    """probe.py's metrics.json for density: accuracy (+ CI by patient), macro F1, one-vs-rest
    AUROC, confusion, A/B vs C/D, and majority_rate, the accuracy of always predicting
    `train_majority` (the train split's commonest class: the test set's own would peek at the
    test labels)."""
    pred = probs.argmax(1)
    ovr = {c: auroc(y == k, probs[:, k]) if 0 < (y == k).sum() < len(y) else math.nan
           for k, c in enumerate("abcd")}
    kw = dict(n_boot=n_boot, seed=seed)
    report = {"accuracy": accuracy(y, pred),
              "accuracy_ci": patient_ci(accuracy, y, pred, groups=patients, **kw)[1:],
              "macro_f1": macro_f1(y, pred),
              "auroc_ovr": dict(ovr, mean=nanmean(list(ovr.values()))),
              "confusion": confusion_matrix(y, pred, labels=range(4)).tolist(),
              "binary_accuracy": accuracy(y >= 2, pred >= 2), "n_test": len(y),
              "majority_rate": float(np.mean(y == train_majority))}
    report["subgroups"] = {}
    for col, values in subgroups.items():
        per_value = report["subgroups"][col] = {}
        for v in sorted(set(values)):
            at = values == v  # (n_test,): the test exams with this value
            ci = patient_ci(accuracy, y[at], pred[at], groups=patients[at], **kw)
            per_value[v] = dict(zip(("accuracy", "low", "high"), ci), n=int(at.sum()))
    return report


def class_report(y, probs, patients, n_boot, seed):
    """A 2-D benchmark task's figures on its test units, CIs by patient bootstrap. Binary (probs
    (n,), of class 1): auroc, auroc_ci. Multi-class (probs (n, C)): accuracy, macro_f1 and
    weighted_f1 (MammoDINO names neither F1: both, labelled), each with _ci, and confusion (C x C,
    rows true)."""
    y, probs, kw = np.asarray(y), np.asarray(probs), dict(groups=patients, n_boot=n_boot, seed=seed)
    if probs.ndim == 1:
        return {"auroc": auroc(y, probs), "auroc_ci": patient_ci(auroc, y, probs, **kw)[1:]}
    pred, report = probs.argmax(1), {}
    for name, fn in (("accuracy", accuracy), ("macro_f1", macro_f1), ("weighted_f1", weighted_f1)):
        report[name] = fn(y, pred)
        report[f"{name}_ci"] = patient_ci(fn, y, pred, **kw)[1:]
    report["confusion"] = confusion_matrix(y, pred, labels=range(probs.shape[1])).tolist()
    return report


# --------------------------------- detection: DBTex evaluation (duke_dbt_data.evaluate, 2021-01-04)
LABEL_COLUMNS = ("StudyUID", "View")
BOX_COLUMNS = ("StudyUID", "View", "X", "Y", "Width", "Height", "Slice", "VolumeSlices")
PREDICTION_COLUMNS = ("StudyUID", "View", "X", "Y", "Width", "Height", "Z", "Depth", "Score")
# DBT-DINO's minimum hit radius in 518-px coordinates, as its public code scores (the paper's text,
# DBT-DINO §6.2.3, says 20 px): 100 px at ~2457 px scales to ~21 px
DBT_DINO_RADIUS = 24.0


def _read_table(src, name, columns, allow_empty=False):
    """A CSV path, or rows in memory as a list of dicts (what csv.DictReader yields)
    -> (name, keys, floats).

    floats maps every numeric column to a float array; rows are numbered from 1, header excluded.
    """
    header = None
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        try:
            with open(src, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows, header = list(reader), reader.fieldnames
        except (csv.Error, UnicodeDecodeError) as e:  # binary, or a cell over csv's size limit
            raise ValueError(f"{name}: not a readable CSV ({e})") from None
    else:
        rows = list(src)
    if not rows and not allow_empty:
        raise ValueError(f"{name}: no data rows")
    missing = [c for c in columns if c not in (rows[0] if rows else header or columns)]
    if missing:
        raise ValueError(f"{name}: missing column(s) {', '.join(missing)}")
    floats = {}
    for col in columns[2:]:
        values = []
        for i, r in enumerate(rows):
            try:
                values.append(float(r[col]))
            except (TypeError, ValueError):  # empty cell, text, or a short row (None)
                values.append(np.nan)
            if not np.isfinite(values[-1]):
                raise ValueError(f"{name}: row {i + 1}, column {col}: {r[col]!r} "
                                 "is not a finite number")
        floats[col] = np.array(values)
    return name, [(r["StudyUID"], r["View"]) for r in rows], floats


def _dbtex_match(labels, boxes, predictions, radius):
    """Read the three tables; assign each prediction to at most one GT box (see dbtex_evaluate)."""
    lname, lkeys, _ = _read_table(labels, "labels", LABEL_COLUMNS)
    bname, bkeys, b = _read_table(boxes, "boxes", BOX_COLUMNS)
    # no rows (a header at most): nothing detected, scoring 0 (where the official code fails)
    pname, pkeys, p = _read_table(predictions, "predictions", PREDICTION_COLUMNS, allow_empty=True)
    volume = {k: i for i, k in enumerate(lkeys)}
    if len(volume) != len(lkeys):
        raise ValueError(f"{lname}: duplicate (StudyUID, View) rows; it must list each volume once")
    ids = []
    for name, keys in ((bname, bkeys), (pname, pkeys)):
        i = next((i for i, k in enumerate(keys) if k not in volume), None)
        if i is not None:
            raise ValueError(f"{name}: row {i + 1}: volume (StudyUID, View) = {keys[i]} "
                             f"is not in {lname}")
        ids.append(np.array([volume[k] for k in keys]))
    bv, pv = ids
    bx, by = b["X"] + b["Width"] / 2, b["Y"] + b["Height"] / 2
    reach = np.maximum(np.sqrt(b["Width"] ** 2 + b["Height"] ** 2) / 2, radius)
    px, py, pz = p["X"] + p["Width"] / 2, p["Y"] + p["Height"] / 2, p["Z"] + p["Depth"] / 2
    gt = np.full(len(pv), -1)
    for v in np.unique(bv):
        bi, pi = np.flatnonzero(bv == v), np.flatnonzero(pv == v)  # argmin ties: first box
        dx, dy, dz = px[pi, None] - bx[bi], py[pi, None] - by[bi], pz[pi, None] - b["Slice"][bi]
        # the slice window comes from the view's first box, as in the official code
        hit = (np.sqrt(dx**2 + dy**2) <= reach[bi]) & (np.abs(dz) <= b["VolumeSlices"][bi[0]] / 4)
        dist = np.where(hit, np.sqrt(dx**2 + dy**2 + dz**2), np.inf)
        rows = hit.any(1)
        gt[pi[rows]] = bi[dist[rows].argmin(1)]  # several hits: the nearest box in 3D
    return p["Score"], gt, np.isin(pv, bv), len(lkeys), len(np.unique(bv)), len(bv)


def _froc_points(score, gt, keep, n_volumes, n_boxes, max_fps):
    """(FP per volume, sensitivity) for each threshold, high to low, up to and including the first
    point with fps > max_fps (the official loop appends, then stops), so k FP interpolates towards
    that point. Thresholds come from all predictions, whatever `keep` selects."""
    thresholds = {score.max() + 1, *score[gt >= 0], score.min() - 1}
    fps, sens = [], []
    for th in sorted(thresholds, reverse=True):
        kept = keep & (score >= th)
        fp = np.count_nonzero(kept & (gt < 0)) / n_volumes
        fps.append(fp)
        sens.append(len(np.unique(gt[kept & (gt >= 0)])) / n_boxes)
        if fp > max_fps:
            break
    return np.array(fps), np.array(sens)


def dbtex_froc(labels, boxes, predictions, radius=100.0, positive_only=True, max_fps=4.0):
    """The FROC curve sampled as in dbtex_evaluate (for plots): (fps_per_volume, sensitivity)."""
    score, gt, positive, n_all, n_pos, n_boxes = _dbtex_match(labels, boxes, predictions, radius)
    keep = positive if positive_only else np.ones_like(positive)
    return _froc_points(score, gt, keep, n_pos if positive_only else n_all, n_boxes, max_fps)


def dbtex_evaluate(labels, boxes, predictions, radius=100.0):
    """DBTex detection metrics, identical to the official duke_dbt_data.evaluate.

    Inputs: the public BCS-DBT labels and boxes CSVs and a submission CSV (paths, or lists of row
    dicts) with columns LABEL_COLUMNS, BOX_COLUMNS, PREDICTION_COLUMNS; a volume is a
    (StudyUID, View).
    - Hit: prediction centre (X + Width/2, Y + Height/2, Z + Depth/2) within
      max(sqrt(W^2 + H^2)/2, radius) px (2D, inclusive) of a GT box centre in the same volume, and
      |centre slice - Slice| <= VolumeSlices/4. A prediction hitting several boxes belongs to the
      nearest in 3D (dz in slices).
    - At threshold th, predictions with Score >= th count: sensitivity = distinct boxes hit / all
      boxes; FP = predictions hitting no box; extra hits on a detected box are neither TP nor FP.
    - Thresholds are max score + 1, every hitting prediction's score, and min score - 1; the curve
      (fps per volume, sensitivity) ends with the first point whose fps exceeds the largest k, and
      is linearly interpolated (np.interp, held flat past its last point) at k FP per volume.
    - sensitivity_at_2_fps_all: all volumes of the labels CSV (normals included). *_positive and
      the ranking metric mean_sensitivity_positive (mean over k = 1..4): only volumes with a box,
      same thresholds and boxes.
    radius=100 is the challenge rule at original resolution; DBT-DINO uses DBT_DINO_RADIUS at 518.
    """
    score, gt, positive, n_all, n_pos, n_boxes = _dbtex_match(labels, boxes, predictions, radius)
    if len(score) == 0:  # nothing detected: sensitivity 0 at every FP rate
        keys = ["sensitivity_at_2_fps_all"]
        keys += [f"sensitivity_at_{k}_fps_positive" for k in range(1, 5)]
        return dict.fromkeys(keys + ["mean_sensitivity_positive"], 0.0)
    fps, sens = _froc_points(score, gt, np.ones_like(positive), n_all, n_boxes, 2.0)
    result = {"sensitivity_at_2_fps_all": float(np.interp(2.0, fps, sens))}
    fps, sens = _froc_points(score, gt, positive, n_pos, n_boxes, 4.0)
    at = np.interp([1.0, 2.0, 3.0, 4.0], fps, sens)
    result.update({f"sensitivity_at_{k}_fps_positive": float(v) for k, v in zip((1, 2, 3, 4), at)})
    result["mean_sensitivity_positive"] = float(np.mean(at))
    return result


def density_probe_cv(feats, labels, groups, folds=5, ridge=10.0):
    """Quick density check used to pick checkpoints (as DBT-DINO did): a ridge one-vs-rest
    classifier on frozen features (M, F), cross-validated in `folds` folds of whole patients
    (groups % folds), so every image is scored once. The majority-class rate is returned beside
    the accuracy: on a handful of phantom patients the accuracy is mostly noise, and the reader
    should see how much. labels are 0..3 (BI-RADS a-d); density_pred holds each image's
    prediction, for paired comparisons between checkpoints."""
    feats = np.asarray(feats, np.float64)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    fold, pred = groups % folds, np.empty_like(labels)
    y = np.eye(4)[labels] * 2 - 1  # (M, 4) one-vs-rest targets
    for k in np.unique(fold):
        fit = fold != k
        mu, sd = feats[fit].mean(0), feats[fit].std(0, ddof=1) + 1e-6
        x = np.concatenate([(feats - mu) / sd, np.ones((len(feats), 1))], axis=1)  # (M, F + 1)
        gram = x[fit].T @ x[fit] + ridge * np.eye(x.shape[1])
        w = np.linalg.solve(gram, x[fit].T @ y[fit])  # (F + 1, 4)
        pred[~fit] = (x[~fit] @ w).argmax(1)
    majority = np.bincount(labels).max() / len(labels)
    return {"density_acc": accuracy(labels, pred), "density_majority": majority,
            "density_n": len(labels), "density_pred": pred.tolist()}


# ------------------------------------------------------------------ probe.py's risk reports
YEARS = 5  # the risk horizon of probe.py's heads: one AUROC per year 1..5


def year_not_scored(years_to_cancer, years_of_followup, year, rule):
    """Why `year` has no AUROC by `rule` (risk_year_cases) on these exams: "no cancers
    within 1 year" or "no exams ... (their negatives)", else None (it has both classes)."""
    keep, positive = risk_year_cases(years_to_cancer, years_of_followup, year,
                                             YEARS, rule)
    span = f"{year} year" + "s" * (year > 1)
    if not positive.any():
        return f"no cancers within {span}"
    if not (keep & ~positive).any():  # the rule's negatives, in its own words
        later = "by then" if rule == "mirai" else f"within {YEARS} years"
        return f"no exams followed {span} without a cancer {later}"
    return None


def risk_block(probs, ytc, yfu, patients, rule, n_boot, seed, where="the test split"):
    """Per-year AUROC by `rule` with patient-bootstrap CIs, and their mean over the scored years. A
    year without positives or negatives is None, its reason in not_scored. One bootstrap pass
    serves all: bootstrap_ci draws its resamples from the seed alone, so the per-year AUROCs seen
    on its resamples give each year the CI a pass of its own would (tests/test_probe.py)."""
    years = range(1, YEARS + 1)
    why = {k: year_not_scored(ytc, yfu, k, rule) for k in years}
    not_scored = {k: f"{w} in {where} (0 of {len(ytc)} exams)" for k, w in why.items() if w}
    scored = [k for k in years if k not in not_scored]
    seen = []  # per call, {year: AUROC}: the n_boot resamples first, in order

    def mean(p, t, u):
        seen.append(risk_auroc_by_year(p, t, u, YEARS, rule))
        return float(np.mean([seen[-1][k] for k in scored])) if scored else math.nan
    mean_ci = patient_ci(mean, probs, ytc, yfu, groups=patients, n_boot=n_boot, seed=seed)
    auroc, ci = dict.fromkeys(years), dict.fromkeys(years)  # None: not scored
    for k in scored:
        values = [r[k] for r in seen[:n_boot] if math.isfinite(r[k])]
        auroc[k] = seen[-1][k]  # the last call: all the exams
        ci[k] = np.quantile(values, [0.025, 0.975]).tolist() if values else [math.nan] * 2
    return {"auroc": auroc, "auroc_ci": ci, "auroc_mean": mean_ci[0] if scored else None,
            "auroc_mean_ci": mean_ci[1:] if scored else None, "auroc_mean_years": scored,
            "not_scored": not_scored, "rule": rule}


def risk_report(probs, ytc, yfu, patients, density, rule, n_boot, seed):
    """json for risk: the chosen rule's per-year AUROC on top, both rules in by_rule, and
    per density class by both rules (DBT-DINO Table 4)."""
    by_rule = {r: risk_block(probs, ytc, yfu, patients, r, n_boot, seed)
               for r in RISK_RULES}
    report = dict(by_rule[rule], n_test=len(probs), n_cancer=int((ytc < YEARS).sum()),
                  by_rule=by_rule)
    report["by_density"] = {r: {d: risk_block(probs[density == d], ytc[density == d],
                                              yfu[density == d], patients[density == d], r, n_boot,
                                              seed, f"the test split's density {d} exams")
                                for d in sorted(set(density))} for r in RISK_RULES}
    return report


def risk_lines(report, rule):
    """The risk figures as printed: a row per year and the mean, a column per rule (`rule` first),
    each AUROC with its CI; then each year not scored and why (once if both rules agree)."""
    rules = [rule] + [r for r in RISK_RULES if r != rule]
    blocks = [report["by_rule"][r] for r in rules]

    def cell(value, ci):  # as wide as the column heads
        if value is None:
            return f"{'not scored':<22}"
        ci = f"({ci[0]:.3f}-{ci[1]:.3f})" if ci and np.isfinite(ci).all() else "(no CI)"
        return f"{value:.3f} {ci:<16}"
    lines = [f"risk: AUROC by year (95% CI, patient bootstrap), {report['n_test']} test exams, "
             f"{report['n_cancer']} with cancer within {YEARS} years",
             "  year  " + "".join(f"{r + ' rule':<22}" for r in rules)]
    lines += [f"  {k}y    " + "".join(cell(b["auroc"][k], b["auroc_ci"][k]) for b in blocks)
              for k in range(1, YEARS + 1)]
    lines.append("  mean  " + "".join(cell(b["auroc_mean"], b["auroc_mean_ci"]) for b in blocks))
    reasons = {}  # (year, reason) -> the rules giving it
    for r, b in zip(rules, blocks):
        if b["not_scored"] and b["auroc_mean_years"]:
            years = ", ".join(map(str, b["auroc_mean_years"]))
            lines.append(f"mean ({r} rule): of years {years} only, the scored ones")
        for k, why in b["not_scored"].items():
            reasons.setdefault((k, why), []).append(r)
    for (k, why), by in sorted(reasons.items()):
        which = "" if len(by) == len(rules) else f" ({by[0]} rule)"
        lines.append(f"AUROC {k}y not scored{which}: {why}")
    return [line.rstrip() for line in lines]


def roc_panels(probs, ytc, yfu, report):
    """draw_roc's panels: per rule, a curve per scored year, labelled with its AUROC."""
    panels = {}
    for rule in RISK_RULES:
        block, curves = report["by_rule"][rule], {}
        for k, value in block["auroc"].items():
            if value is None:  # the reason in full is printed and in json
                short = "no cancers" if "no cancers" in block["not_scored"][k] else "no negatives"
                curves[f"{k}y not scored: {short}"] = None
                continue
            keep, label = risk_year_cases(ytc, yfu, k, YEARS, rule)
            curves[f"{k}y AUROC {value:.2f}"] = roc_curve(label[keep], probs[keep, k - 1])
        panels[{"mirai": "Mirai's rule", "dbt-dino": "DBT-DINO's rule"}[rule]] = curves
    return panels


# --------------------------------------------------------- compare: paired tests between probe runs
def load_run(folder):
    """(metrics.json, {unit: predictions.csv row}) of a finished probe.py run folder: a DBT run's
    units are exams, a 2-D run's its id_columns joined by "/" (e.g. VinDr study_id/image_id)."""
    folder = Path(folder)
    try:
        report = json.loads((folder / "metrics.json").read_text())
        ids = report.get("id_columns", ["exam"]) if isinstance(report, dict) else ["exam"]
        with open(folder / "predictions.csv", newline="", encoding="utf-8-sig") as fh:
            preds = {"/".join(r[c] for c in ids): r for r in csv.DictReader(fh)}
    except FileNotFoundError as e:
        missing = Path(e.filename).name
        raise FileNotFoundError(f"{folder}: not a finished probe run ({missing} missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, KeyError, TypeError):
        msg = f"{folder}: metrics.json or predictions.csv is not a probe run's"
        raise ValueError(msg) from None
    if not isinstance(report, dict) or "task" not in report:
        raise ValueError(f"{folder}: metrics.json is not a probe run's (no task)")
    return report, preds


def run_task(report):
    """What a run scored, as compare groups runs: "density", or "vindr cancer per image"."""
    if "dataset" not in report:
        return report["task"]
    return f"{report['dataset']} {report['task']} per {report.get('level', 'image')}"


def pair_tests(task, preds, names, exams, rule):
    """Every pair of runs on the common units: McNemar on accuracy (density, a 2-D multi-class
    task: prob_<class> columns, the highest is the prediction), DeLong on AUROC (a 2-D binary task:
    prob) or on each year's AUROC (risk)."""
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))]
    first = preds[0][exams[0]]
    if task == "density" or any(c.startswith("prob_") for c in first):
        if task == "density":
            correct = [np.array([p[e]["pred"] == p[e]["density"] for e in exams]) for p in preds]
        else:
            classes = [c for c in first if c.startswith("prob_")]
            correct = [np.array([max(classes, key=lambda c: float(p[e][c])) == "prob_" +
                                 p[e]["label"] for e in exams]) for p in preds]
        return [dict(a=names[a], b=names[b], metric="accuracy", value_a=float(correct[a].mean()),
                     value_b=float(correct[b].mean()), p=mcnemar(correct[a], correct[b]))
                for a, b in pairs]
    if "prob" in first:
        y = np.array([int(first_label(preds, e)) for e in exams])
        tests = []
        for a, b in pairs:
            auc_a, auc_b, p = delong_test(y, *([float(r[e]["prob"]) for e in exams]
                                               for r in (preds[a], preds[b])))
            tests.append(dict(a=names[a], b=names[b], metric="auroc", value_a=auc_a,
                              value_b=auc_b, p=p))
        return tests
    return _risk_tests(preds, names, exams, rule, pairs)


def first_label(preds, unit):
    """A unit's label, the same in every run (else the runs used different label rules)."""
    labels = {p[unit]["label"] for p in preds}
    if len(labels) > 1:
        raise ValueError(f"compare: unit {unit} has labels {', '.join(sorted(labels))} in "
                         "different runs (different label rules?)")
    return labels.pop()


def _risk_tests(preds, names, exams, rule, pairs):
    tests = []
    first = preds[0]
    ytc = np.array([float(first[e]["years_to_cancer"] or "inf") for e in exams])
    yfu = np.array([float(first[e]["years_of_followup"]) for e in exams])
    scores = [np.array([[float(p[e][f"p{k}"]) for k in range(1, YEARS + 1)] for e in exams])
              for p in preds]  # (exams, YEARS) per run
    for k in range(1, YEARS + 1):
        keep, label = risk_year_cases(ytc, yfu, k, YEARS, rule)
        if label[keep].sum() < 2 or (~label[keep]).sum() < 2:
            utils.log(f"compare: year {k} has too few positives or negatives for DeLong; left out")
            continue
        for a, b in pairs:
            auc_a, auc_b, p = delong_test(label[keep], scores[a][keep, k - 1],
                                          scores[b][keep, k - 1])
            tests.append(dict(a=names[a], b=names[b], metric=f"auroc_year{k}", value_a=auc_a,
                              value_b=auc_b, p=p))
    return tests


def run_compare(args):
    """`metrics.py compare`: runs grouped by what they scored (run_task), every pair within a
    group tested on its common units, Benjamini-Hochberg over all the tests of all the groups;
    the table on stdout; compare.json, compare.md (the table) and radar.png in --out."""
    attention = tissue_attention(args.runs)  # show.py folders: scored apart, not paired
    runs = [r for r in args.runs if str(r) not in attention]
    if attention and not runs:
        return attention_only(args, attention)
    names = [Path(r).name or str(r) for r in runs]  # folder names read best, when distinct
    names = names if len(set(names)) == len(names) else [str(r) for r in runs]
    groups, reports = {}, {}
    for name, (report, preds) in zip(names, map(load_run, runs)):
        groups.setdefault(run_task(report), []).append((name, preds))
        reports[name] = report
    alone = [task for task, runs in groups.items() if len(runs) < 2]
    if alone:
        raise ValueError(f"compare: one run only of {', '.join(alone)}; each task compared needs "
                         f"two (the runs are of {', '.join(groups)})")
    tests, common = [], {}
    for task, runs in groups.items():
        units = sorted(set.intersection(*(set(p) for _, p in runs)))
        if not units:
            raise ValueError(f"compare: the {task} runs share no test units")
        found = pair_tests(task, [p for _, p in runs], [n for n, _ in runs], units, args.rule)
        if not found:
            raise ValueError(f"compare: no comparison is defined on the common {task} units")
        tests += [dict(t, task=task) for t in found]
        common[task] = len(units)
    for t, q in zip(tests, benjamini_hochberg([t["p"] for t in tests])):
        t["p_bh"] = float(q)
    table = compare_table(groups, reports, tests)
    counts = "".join(f"{task}: {n} common test units\n" for task, n in common.items())
    print(counts + table + attention_table(attention)
          + (f"risk: {args.rule} rule\n" if "risk" in groups else ""), end="")
    out = compare_folder(args)
    kinds = sorted({"delong" if t["metric"].startswith("auroc") else "mcnemar" for t in tests})
    result = dict(task=", ".join(groups), runs=[str(r) for r in args.runs],
                  n_common=common if len(common) > 1 else common[next(iter(common))],
                  rule=args.rule if "risk" in groups else None, test="+".join(kinds),
                  correction="benjamini-hochberg", tests=tests)
    if attention:
        result["tissue_attention"] = attention
        table += attention_table(attention)
    axes, polygons = radar_values(groups, reports)
    centre = utils.draw_radar(axes, polygons, f"{', '.join(HEADLINE_NAMES)} by task and backbone",
                              out / "radar.png")
    result["radar"] = dict(axes=axes, polygons=polygons, centre=centre)
    return write_compare(out, table, result)


def compare_folder(args):
    """--out, checked (a finished compare is replaced only with --overwrite) and made."""
    utils.check_run_folder(args.out, "compare.json", args.overwrite)
    os.makedirs(args.out, exist_ok=True)
    return Path(args.out)


def write_compare(out, table, result):
    """compare.md, then compare.json (last: it marks a finished compare); -> result."""
    utils.atomic_write(out / "compare.md", table)
    utils.atomic_write(out / "compare.json", json.dumps(utils.finite(result), indent=1) + "\n")
    utils.log(utils.folder_line(out))
    return result


def tissue_attention(folders):
    """{folder: show.py's tissue_attention.json} of the folders that hold one (a show.py run)."""
    out = {}
    for folder in map(str, folders):
        file = Path(folder) / "tissue_attention.json"
        if file.exists():
            try:
                out[folder] = json.loads(file.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"{file}: not show.py's tissue_attention.json") from None
    return out


def attention_table(attention):
    """compare.md's section for show.py runs: each backbone's mean share of attention on tissue."""
    if not attention:
        return ""
    lines = ["", "| show.py run | backbone | images | attention in tissue | 95% CI "
             "| spread evenly |", "|---|---|---|---|---|---|"]
    for folder, a in attention.items():
        low, high = a.get("ci") or [math.nan, math.nan]
        lines.append(f"| {folder} | {a.get('backbone', '')} | {a.get('images')} | "
                     f"{a.get('mean', math.nan):.3f} | {low:.3f}-{high:.3f} | "
                     f"{a.get('even_attention', math.nan):.3f} |")
    return "\n".join(lines) + "\n"


def attention_only(args, attention):
    """compare given show.py folders only: the attention table, compare.md and compare.json."""
    table = attention_table(attention)
    print(table, end="")
    result = dict(runs=[str(r) for r in args.runs], tissue_attention=attention)
    return write_compare(compare_folder(args), table, result)


HEADLINE_NAMES = ("AUROC", "macro F1", "accuracy")  # radar.png's radius, by kind of task
TABLE_METRICS = ("auroc", "auroc_mean", "accuracy", "macro_f1", "weighted_f1")  # compare.md's


def headline(report):
    """The metric a task is drawn by on radar.png: AUROC (2-D binary; risk: the mean over the
    scored years), macro F1 (2-D multi-class, as MammoDINO's BI-RADS F1), accuracy (DBT density)."""
    if report["task"] == "risk":
        return "auroc_mean"
    if "auroc" in report:
        return "auroc"
    return "macro_f1" if "dataset" in report else "accuracy"


def radar_values(groups, reports):
    """radar.png's axes (the tasks compared) and a polygon per backbone (with its --features when
    the runs differ in them): its headline value per axis, None where it has no run. A backbone
    with two runs of one task gets a polygon per run folder."""
    several = len({r.get("features") for r in reports.values()}) > 1
    polygons = {}
    for k, (task, runs) in enumerate(groups.items()):
        seen = set()
        for name, _ in runs:
            rep = reports[name]
            key = rep.get("backbone") or name
            key = f"{key}, {rep.get('features')}" if several else key
            key = f"{key} ({name})" if key in seen else key
            seen.add(key)
            polygons.setdefault(key, [None] * len(groups))[k] = rep.get(headline(rep))
    return list(groups), polygons


def compare_table(groups, reports, tests):
    """compare.md: every metric of every run with its 95% CI (the headline, radar.png's, first),
    then every pair's p-values."""
    lines = ["| task | run | backbone | metric | value | 95% CI |", "|---|---|---|---|---|---|"]
    for task, runs in groups.items():
        for name, _ in runs:
            rep = reports[name]
            numbers = [k for k in TABLE_METRICS if isinstance(rep.get(k), (int, float))]
            for metric in dict.fromkeys([headline(rep)] + numbers):  # risk's auroc: by year
                ci = rep.get(f"{metric}_ci") or [math.nan, math.nan]
                value = rep.get(metric, math.nan)
                lines.append(f"| {task} | {name} | {rep.get('backbone', '')} | {metric} | "
                             f"{value:.3f} | {ci[0]:.3f}-{ci[1]:.3f} |")
    lines += ["", "| task | metric | A | B | A value | B value | p | p (BH) |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['task']} | {t['metric']} | {t['a']} | {t['b']} | {t['value_a']:.3f} | "
              f"{t['value_b']:.3f} | {t['p']:.4f} | {t['p_bh']:.4f} |" for t in tests]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ command line
def get_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dbtex", help="score detections with the official DBTex protocol",
                       formatter_class=fmt)
    g = p.add_argument_group("inputs")
    g.add_argument("--labels", required=True, help="BCS-DBT labels CSV (one row per volume)")
    g.add_argument("--boxes", required=True, help="BCS-DBT boxes CSV (ground truth)")
    g.add_argument("--predictions", required=True,
                   help="submission CSV: StudyUID, View, X, Width, Y, Height, Z, Depth, Score")
    g = p.add_argument_group("rule")
    g.add_argument("--radius", type=float, default=100.0, help="minimum hit radius in px "
                   f"(DBT-DINO's variant: {DBT_DINO_RADIUS:g} in 518-px coordinates)")
    c = sub.add_parser("compare", help="McNemar (accuracy) or DeLong (AUROC) between probe.py "
                       "runs of the same task, Benjamini-Hochberg corrected over all",
                       formatter_class=fmt)
    c.add_argument("runs", nargs="+", help="probe.py run folders (metrics.json, predictions.csv); "
                   "show.py folders add their attention in tissue (tissue_attention.json)")
    g = c.add_argument_group("tests")
    g.add_argument("--rule", default="mirai", choices=RISK_RULES,
                   help="risk runs: the per-year AUROC rule")
    g = c.add_argument_group("run folder")
    g.add_argument("--out", default="",
                   help="folder for compare.json ('' = runs/compare-<date-time>)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a finished compare.json in --out")
    utils.one_line_errors(parser)
    p.error = c.error = parser.error  # a subcommand's bad flag is one line too
    args = parser.parse_args(argv)
    if args.command == "dbtex" and not args.radius > 0:
        parser.error(f"argument --radius: {args.radius} is not a positive number of pixels")
    if args.command == "compare":
        if len(args.runs) < 2:
            parser.error("compare needs at least two run folders")
        args.out = args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv=None):
    """Run the `dbtex` or `compare` command; returns its result."""
    args = get_args(argv)
    if args.command == "compare":
        return run_compare(args)
    result = dbtex_evaluate(args.labels, args.boxes, args.predictions, radius=args.radius)
    for key, value in result.items():
        print(f"{key:<30} {value:.10f}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
