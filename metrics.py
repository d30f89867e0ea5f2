"""Metrics, paired statistics, the official DBTex FROC evaluator, and logging helpers (numpy, scipy, Pillow).

What is here, in file order; each definition is written once, in the docstring of the function that computes it:
- classification: auroc, accuracy, confusion_matrix, macro_f1, roc_curve, and risk_auroc_by_year (per-year
                  AUROC by Mirai's rule or DBT-DINO's, risk_year_cases)
- paired tests:   delong_test (AUCs), mcnemar (accuracies), benjamini_hochberg (FDR across comparisons)
- bootstrap_ci:   percentile CIs that resample cases, or whole patients when `groups` is given, never images of a
                  patient independently (images of one patient are correlated, so that would shrink the CI)
- detection:      dbtex_evaluate / dbtex_froc reproduce duke_dbt_data.evaluate (DBTex challenge): a hit is a
                  predicted centre within max(GT diagonal/2, 100 px) of the GT centre and within VolumeSlices/4
                  slices of its centre slice; the ranking metric is mean sensitivity at 1-4 FP per positive volume
- logging:        Progress (one console line), JsonlWriter (metrics.jsonl) and draw_curves (curves.png from it)

CLI (scores a BCS-DBT submission with the public CSVs):
    python metrics.py dbtex --labels labels.csv --boxes boxes.csv --predictions predictions.csv
Array functions raise ValueError naming the argument; table readers name the file, column and row.
"""

import argparse
import csv
import io
import json
import os
import subprocess
import time
import warnings

import numpy as np
from PIL import Image, ImageDraw
from scipy import stats

# -----------------------------------------------------------------------------
# classification metrics


def _binary(y, where):
    y = np.asarray(y)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError(f"{where}: y_true must be a 1-D array of 0/1 labels")
    if y.min() == y.max():
        raise ValueError(f"{where}: y_true has only class {int(y[0])}; AUROC needs positives and negatives")
    return y.astype(bool)


def _scores(s, n, where):
    s = np.asarray(s, dtype=float)
    if s.shape != (n,) or not np.isfinite(s).all():
        raise ValueError(f"{where}: scores must be {n} finite numbers, got shape {s.shape}")
    return s


def _placements(y, s):
    """DeLong placement values: per positive, the fraction of negatives it outscores; per negative, the fraction
    of positives that outscore it (ties count 1/2 in both). Midranks make this O(N log N) (Sun & Xu 2014)."""
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    ranks = stats.rankdata(np.concatenate([pos, neg]))  # midranks over all cases
    v10 = (ranks[:m] - stats.rankdata(pos)) / n
    v01 = 1.0 - (ranks[m:] - stats.rankdata(neg)) / m
    return v10, v01


def auroc(y_true, y_score):
    """AUROC = P(score_pos > score_neg) + 1/2 P(score_pos == score_neg), the Mann-Whitney statistic."""
    y = _binary(y_true, "auroc")
    return float(_placements(y, _scores(y_score, len(y), "auroc"))[0].mean())


def accuracy(y_true, y_pred):
    """Fraction of cases whose predicted label equals the true label."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"accuracy: y_true {y_true.shape} and y_pred {y_pred.shape} must be equal, non-empty")
    return float(np.mean(y_true == y_pred))


def confusion_matrix(y_true, y_pred, labels=None):
    """C[i, j] = number of cases with true label labels[i] predicted as labels[j]; labels default to the sorted
    union of both arrays."""
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
    return float(np.mean(2 * tp / (c.sum(0) + c.sum(1))))  # 2TP+FP+FN = column sum + row sum; never 0 here


RISK_RULES = ("mirai", "dbt-dino")


def risk_year_cases(years_to_cancer, years_to_followup, year, max_followup=5, rule="mirai"):
    """Which exams year `year` (1..T) scores, and their labels, by one of two rules -> (keep, label) bool (N,).

    An exam is a cancer if years_to_cancer < T (inf when none). rule "mirai" (compute_auc_x_year_auc): cancers
    have t = int(years_to_cancer), others t = int(min(years_to_followup, T) - 1); positive if cancer and
    t <= year-1, negative if t >= year-1 (so later cancers count as negatives), excluded otherwise.
    rule "dbt-dino" (downstream.md §3): positives are cancers diagnosed within `year` years (years_to_cancer <
    year); negatives have no cancer within T years and at least `year` years of follow-up; cancers diagnosed
    after `year` (but within T) are excluded, not counted as negatives.
    """
    if rule not in RISK_RULES:
        raise ValueError(f"risk rule {rule!r}: choose from {', '.join(RISK_RULES)}")
    ytc, yfu = np.asarray(years_to_cancer, dtype=float), np.asarray(years_to_followup, dtype=float)
    cancer = ytc < max_followup
    if rule == "dbt-dino":
        positive = cancer & (ytc < year)
        return positive | (~cancer & (yfu >= year)), positive
    # np.trunc, not floor, reproduces Python int() in Mirai (follow-up < 1 year gives t = 0, not -1)
    t = np.where(cancer, np.trunc(ytc), np.trunc(np.minimum(yfu, max_followup) - 1))
    positive = cancer & (t <= year - 1)
    return positive | (t >= year - 1), positive


def risk_auroc_by_year(probs, years_to_cancer, years_to_followup, max_followup=5, rule="mirai"):
    """Per-year AUROC of a risk model -> {k: AUROC} for k = 1..T, by Mirai's rule (the default) or DBT-DINO's
    (risk_year_cases defines both). probs: (N, T) predicted cancer probability within k = 1..T years;
    years_to_cancer: inf (or >= T) if none. The score for year k is probs[:, k-1]. A year with no positives or
    no negatives gives NaN.
    """
    probs = np.asarray(probs, dtype=float)
    ytc, yfu = np.asarray(years_to_cancer, dtype=float), np.asarray(years_to_followup, dtype=float)
    if probs.shape != (len(ytc), max_followup) or ytc.shape != yfu.shape or np.isnan(ytc + yfu).any():
        raise ValueError(f"risk_auroc_by_year: need probs (N, {max_followup}) and N non-NaN years, got "
                         f"{probs.shape}, {ytc.shape}, {yfu.shape}")
    out = {}
    for k in range(1, max_followup + 1):
        keep, label = risk_year_cases(ytc, yfu, k, max_followup, rule)
        label = label[keep]
        out[k] = auroc(label, probs[keep, k - 1]) if 0 < label.sum() < len(label) else float("nan")
    return out


def roc_curve(y_true, y_score):
    """ROC points (fpr, tpr), from (0, 0) to (1, 1), one point per distinct score (tied cases move together)."""
    y = _binary(y_true, "roc_curve")
    s = _scores(y_score, len(y), "roc_curve")
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


# -----------------------------------------------------------------------------
# paired tests and multiple comparisons


def delong_test(y_true, score_a, score_b):
    """DeLong test of AUC_a == AUC_b for two scores on the same cases. Returns (auc_a, auc_b, two-sided p).

    With placement values V10 (positives, m) and V01 (negatives, n) of each model, the covariance of the two AUCs
    is S = cov(V10)/m + cov(V01)/n (ddof = 1), and z = (auc_a - auc_b) / sqrt(S_aa + S_bb - 2 S_ab).
    """
    y = _binary(y_true, "delong_test")
    (a10, a01), (b10, b01) = (_placements(y, _scores(s, len(y), "delong_test")) for s in (score_a, score_b))
    m, n = len(a10), len(a01)
    if m < 2 or n < 2:
        raise ValueError(f"delong_test: need >= 2 positives and >= 2 negatives, got {m} and {n}")
    s = np.cov(np.stack([a10, b10])) / m + np.cov(np.stack([a01, b01])) / n
    auc_a, auc_b = float(a10.mean()), float(b10.mean())
    var, diff = s[0, 0] + s[1, 1] - 2 * s[0, 1], abs(auc_a - auc_b)
    if var <= 0:  # degenerate placements (e.g. identical scores): the AUC difference has no sampling noise
        return auc_a, auc_b, 1.0 if diff == 0 else 0.0
    return auc_a, auc_b, float(2 * stats.norm.sf(diff / np.sqrt(var)))


def mcnemar(correct_a, correct_b, exact=True, correction=True):
    """McNemar test on paired per-case correctness. b = cases only A gets right, c = only B gets right.

    exact: p = min(1, 2 * BinomCDF(min(b, c); b + c, 1/2)). Otherwise chi2 (1 df) of (|b - c| - 1)^2 / (b + c),
    or (b - c)^2 / (b + c) with correction=False. No discordant pairs gives p = 1.
    """
    ca, cb = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    if ca.shape != cb.shape or ca.ndim != 1 or not np.isin(np.concatenate([ca, cb]), (0, 1)).all():
        raise ValueError("mcnemar: correct_a and correct_b must be equal-length 1-D arrays of 0/1 or bool")
    b, c = int(np.sum(ca > cb)), int(np.sum(ca < cb))
    if b + c == 0:
        return 1.0
    if exact:
        return float(min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5)))
    chi2 = (abs(b - c) - (1 if correction else 0)) ** 2 / (b + c)
    return float(stats.chi2.sf(chi2, 1))


def benjamini_hochberg(p_values):
    """Benjamini-Hochberg adjusted p-values, in the input order: p_(i) * m / i for the i-th smallest, made
    monotone from the largest down (step-up) and capped at 1. Reject H_i at FDR q iff adjusted_i <= q."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or p.size == 0 or not ((p >= 0) & (p <= 1)).all():
        raise ValueError("benjamini_hochberg: p_values must be a non-empty 1-D array in [0, 1] (no NaN)")
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return adjusted


# -----------------------------------------------------------------------------
# bootstrap


def bootstrap_ci(statistic, *arrays, n_boot=1000, alpha=0.05, seed=0, groups=None):
    """Percentile bootstrap CI of statistic(*arrays). Returns (estimate on all data, low, high).

    Each resample draws cases with replacement and applies the SAME indices to every array, so a paired
    comparison (statistic(y, score_a, score_b) = auroc(y, a) - auroc(y, b)) keeps its pairing. With `groups`
    (e.g. patient IDs, one per case) whole groups are drawn with replacement and all their cases kept.
    low/high are the alpha/2 and 1 - alpha/2 quantiles of the resampled statistics. A resample on which the
    statistic is undefined (it raises ValueError, e.g. AUROC without positives) is skipped with a warning.
    Uses its own np.random.default_rng(seed); global RNG state is untouched.
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0]) if arrays else 0
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_ci: need non-empty arrays of equal length, got {[len(a) for a in arrays]}")
    units = n
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"bootstrap_ci: groups must have one entry per case ({n}), got {groups.shape}")
        _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
        members = np.split(np.argsort(inv, kind="stable"), np.cumsum(counts)[:-1])  # case indices per group
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
        warnings.warn(f"bootstrap_ci: statistic undefined on {n_boot - len(values)} of {n_boot} resamples")
    if not values:
        raise ValueError("bootstrap_ci: statistic undefined on every resample")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(statistic(*arrays)), float(low), float(high)


# -----------------------------------------------------------------------------
# detection: the DBTex challenge evaluation (duke_dbt_data.evaluate, 2021-01-04)

LABEL_COLUMNS = ("StudyUID", "View")
BOX_COLUMNS = ("StudyUID", "View", "X", "Y", "Width", "Height", "Slice", "VolumeSlices")
PREDICTION_COLUMNS = ("StudyUID", "View", "X", "Y", "Width", "Height", "Z", "Depth", "Score")
# DBT-DINO's minimum hit radius in 518-px coordinates (downstream.md §4 and issue 12; spec detection_metrics.md
# says 20, the issue wins); 100 px at ~2457 px scales to ~21 px
DBT_DINO_RADIUS = 24.0


def _read_table(src, name, columns, allow_empty=False):
    """A CSV path, or rows in memory as a list of dicts (what csv.DictReader yields), -> (name, keys, floats).

    floats maps every numeric column to a float array; rows are numbered from 1, header excluded.
    """
    header = None
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
        try:
            with open(src, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows, header = list(reader), reader.fieldnames
        except (csv.Error, UnicodeDecodeError) as e:  # a binary file, or a cell over csv's field size limit
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
                raise ValueError(f"{name}: row {i + 1}, column {col}: {r[col]!r} is not a finite number")
        floats[col] = np.array(values)
    return name, [(r["StudyUID"], r["View"]) for r in rows], floats


def _dbtex_match(labels, boxes, predictions, radius):
    """Read the three tables and assign each prediction to at most one GT box (see dbtex_evaluate)."""
    lname, lkeys, _ = _read_table(labels, "labels", LABEL_COLUMNS)
    bname, bkeys, b = _read_table(boxes, "boxes", BOX_COLUMNS)
    # a submission with no rows (a header at most) detected nothing: it scores 0, where the official code fails
    pname, pkeys, p = _read_table(predictions, "predictions", PREDICTION_COLUMNS, allow_empty=True)
    volume = {k: i for i, k in enumerate(lkeys)}
    if len(volume) != len(lkeys):
        raise ValueError(f"{lname}: duplicate (StudyUID, View) rows; it must list each volume once")
    ids = []
    for name, keys in ((bname, bkeys), (pname, pkeys)):
        i = next((i for i, k in enumerate(keys) if k not in volume), None)
        if i is not None:
            raise ValueError(f"{name}: row {i + 1}: volume (StudyUID, View) = {keys[i]} is not in {lname}")
        ids.append(np.array([volume[k] for k in keys]))
    bv, pv = ids
    bx, by = b["X"] + b["Width"] / 2, b["Y"] + b["Height"] / 2
    reach = np.maximum(np.sqrt(b["Width"] ** 2 + b["Height"] ** 2) / 2, radius)
    px, py, pz = p["X"] + p["Width"] / 2, p["Y"] + p["Height"] / 2, p["Z"] + p["Depth"] / 2
    gt = np.full(len(pv), -1)
    for v in np.unique(bv):
        bi, pi = np.flatnonzero(bv == v), np.flatnonzero(pv == v)  # boxes in file order: argmin ties pick the first
        dx, dy, dz = px[pi, None] - bx[bi], py[pi, None] - by[bi], pz[pi, None] - b["Slice"][bi]
        # the slice window comes from the view's first box, as in the official code
        hit = (np.sqrt(dx**2 + dy**2) <= reach[bi]) & (np.abs(dz) <= b["VolumeSlices"][bi[0]] / 4)
        dist = np.where(hit, np.sqrt(dx**2 + dy**2 + dz**2), np.inf)
        rows = hit.any(1)
        gt[pi[rows]] = bi[dist[rows].argmin(1)]  # several hits: the nearest box in 3D
    return p["Score"], gt, np.isin(pv, bv), len(lkeys), len(np.unique(bv)), len(bv)


def _froc_points(score, gt, keep, n_volumes, n_boxes, max_fps):
    """(FP per volume, sensitivity) for each threshold, high to low, up to and including the first point with
    fps > max_fps (the official loop appends, then stops), so k FP interpolates towards that point.
    Thresholds come from all predictions, whatever `keep` selects."""
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
    """The FROC curve sampled as in dbtex_evaluate (for plots): arrays (fps_per_volume, sensitivity)."""
    score, gt, positive, n_all, n_pos, n_boxes = _dbtex_match(labels, boxes, predictions, radius)
    keep = positive if positive_only else np.ones_like(positive)
    return _froc_points(score, gt, keep, n_pos if positive_only else n_all, n_boxes, max_fps)


def dbtex_evaluate(labels, boxes, predictions, radius=100.0):
    """DBTex detection metrics, identical to the official duke_dbt_data.evaluate.

    Inputs: the public BCS-DBT labels and boxes CSVs and a submission CSV (paths, or lists of row dicts) with
    columns LABEL_COLUMNS, BOX_COLUMNS, PREDICTION_COLUMNS; a volume is a (StudyUID, View).
    - Hit: prediction centre (X + Width/2, Y + Height/2, Z + Depth/2) within max(sqrt(W^2 + H^2)/2, radius) px
      (2D, inclusive) of a GT box centre in the same volume, and |centre slice - Slice| <= VolumeSlices/4.
      A prediction hitting several boxes belongs to the nearest in 3D (dz in slices).
    - At threshold th, predictions with Score >= th count: sensitivity = distinct boxes hit / all boxes;
      FP = predictions hitting no box; extra hits on a detected box are neither TP nor FP.
    - Thresholds are max score + 1, every hitting prediction's score, and min score - 1; the curve
      (fps per volume, sensitivity) ends with the first point whose fps exceeds the largest k, and is linearly
      interpolated (np.interp, held flat past its last point) at k FP per volume.
    - sensitivity_at_2_fps_all: all volumes of the labels CSV (normals included). *_positive and the ranking
      metric mean_sensitivity_positive (mean over k = 1..4): only volumes with a box, same thresholds and boxes.
    radius=100 is the challenge rule at original resolution; DBT-DINO uses DBT_DINO_RADIUS at 518 px.
    """
    score, gt, positive, n_all, n_pos, n_boxes = _dbtex_match(labels, boxes, predictions, radius)
    if len(score) == 0:  # nothing detected: sensitivity 0 at every FP rate
        return dict.fromkeys(["sensitivity_at_2_fps_all"] + [f"sensitivity_at_{k}_fps_positive" for k in range(1, 5)]
                             + ["mean_sensitivity_positive"], 0.0)
    fps, sens = _froc_points(score, gt, np.ones_like(positive), n_all, n_boxes, 2.0)
    result = {"sensitivity_at_2_fps_all": float(np.interp(2.0, fps, sens))}
    fps, sens = _froc_points(score, gt, positive, n_pos, n_boxes, 4.0)
    at = np.interp([1.0, 2.0, 3.0, 4.0], fps, sens)
    result.update({f"sensitivity_at_{k}_fps_positive": float(v) for k, v in zip((1, 2, 3, 4), at)})
    result["mean_sensitivity_positive"] = float(np.mean(at))
    return result


def density_probe_cv(feats, labels, groups, folds=5, ridge=10.0):
    """Quick density check used to pick checkpoints (as DBT-DINO did): a ridge one-vs-rest classifier on frozen
    features (M, F), cross-validated in `folds` folds of whole patients (groups % folds), so every image is scored
    once. The majority-class rate is returned beside the accuracy: on a handful of phantom patients the accuracy is
    mostly noise, and the reader should see how much. labels are 0..3 (BI-RADS a-d)."""
    feats, labels, groups = np.asarray(feats, np.float64), np.asarray(labels), np.asarray(groups)
    fold, pred = groups % folds, np.empty_like(labels)
    y = np.eye(4)[labels] * 2 - 1  # (M, 4) one-vs-rest targets
    for k in np.unique(fold):
        fit = fold != k
        mu, sd = feats[fit].mean(0), feats[fit].std(0, ddof=1) + 1e-6
        x = np.concatenate([(feats - mu) / sd, np.ones((len(feats), 1))], axis=1)  # (M, F + 1)
        w = np.linalg.solve(x[fit].T @ x[fit] + ridge * np.eye(x.shape[1]), x[fit].T @ y[fit])  # (F + 1, 4)
        pred[~fit] = (x[~fit] @ w).argmax(1)
    return {"density_acc": accuracy(labels, pred), "density_majority": np.bincount(labels).max() / len(labels),
            "density_n": len(labels)}


# -----------------------------------------------------------------------------
# logging helpers


class Progress:
    """One progress line: step/total, each loss/term, lr, img/s, ms/step (median over window), data ms, ETA, GPU mem.

    `values` holds the loss terms (printed in the given order) and optionally "lr"; `step_ms` is the median
    ms/step of the caller's log window. ETA extrapolates the wall time per step since construction.
    """

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.start, self.t0 = total_steps, start_step, time.monotonic()

    def line(self, step: int, values: dict, images_per_s: float, step_ms: float, data_ms: float,
             mem_gb: float | None = None) -> str:
        values = dict(values)
        lr = values.pop("lr", None)
        done = max(step - self.start, 1)  # resumed runs: only steps run in this process count towards the rate
        eta_min = int((time.monotonic() - self.t0) / done * max(self.total - step, 0) / 60)
        parts = [f"step {step}/{self.total}", " ".join(f"{k} {float(v):.4g}" for k, v in values.items())]
        if lr is not None:
            parts.append(f"lr {float(lr):.1e}")
        parts += [f"{images_per_s:.0f} img/s", f"{step_ms:.0f} ms/step", f"data {data_ms:.0f} ms",
                  f"eta {eta_min // 60}h{eta_min % 60:02d}m"]
        if mem_gb is not None:
            parts.append(f"mem {mem_gb:.1f}G")
        return " | ".join(parts)


class JsonlWriter:
    """Append-only JSON-lines metrics file: one object per call, flushed at once so a crash loses nothing."""

    def __init__(self, path):
        self.path = str(path)
        if os.path.dirname(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def write(self, record: dict) -> None:
        # default=float turns numpy/torch scalars (not JSON-serialisable themselves) into plain floats
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop the records logged after `step` (a resumed run redoes those steps), atomically; returns how many.
        A torn last line from a crash mid-write is dropped too."""
        if not os.path.exists(self.path):
            return 0
        parsed, n_lines = self._parsed()
        keep = [line for line, record in parsed if record.get("step", 0) <= step]
        atomic_write(self.path, "".join(k + "\n" for k in keep))
        return n_lines - len(keep)

    def read(self) -> list:
        """The records written so far (a torn last line from a crash is left out)."""
        return [record for _, record in self._parsed()[0]]

    def _parsed(self):
        """([(line, record)] of the whole lines, number of lines); a torn last line from a crash is left out."""
        if not os.path.exists(self.path):
            return [], 0
        with open(self.path) as f:
            lines = f.read().splitlines()
        parsed = []
        for line in lines:
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue
        return parsed, len(lines)


CURVE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def draw_curves(path, records, panels, baselines=None, title="", columns=3):
    """curves.png from metrics.jsonl records, written atomically: one panel per (split, key) in `panels` that the
    records hold, the key against step with the panel's own y range, and baselines[key] (another key of the same
    records, e.g. the majority-class rate) dashed grey. Returns {key: (x0, y0, x1, y1, step_lo, step_hi, lo, hi)}:
    each panel's plot box in pixels and the data ranges mapped onto it (y up)."""
    baselines, W, H, m = baselines or {}, 300, 170, 56  # panel size and its left margin (y labels), px
    series = []
    for split, key in panels:
        pts = [(r["step"], float(r[key])) for r in records if r.get("split") == split and _number(r.get(key))]
        ref = [(r["step"], float(r[baselines[key]])) for r in records
               if key in baselines and r.get("split") == split and _number(r.get(baselines[key]))]
        if pts:
            series.append((key, pts, ref))
    rows = max(1, -(-len(series) // columns))
    img = Image.new("RGB", (columns * W, rows * H + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    boxes = {}
    for n, (key, pts, ref) in enumerate(series):
        x0, y0 = (n % columns) * W + m, 30 + (n // columns) * H + 20
        x1, y1 = x0 + W - m - 15, y0 + H - m - 15
        steps, values = [p[0] for p in pts + ref], [p[1] for p in pts + ref]
        s_lo, s_hi, lo, hi = min(steps), max(steps), min(values), max(values)
        if not hi - lo > 1e-12 * max(1.0, abs(lo), abs(hi)):  # a flat line: centre it (relative: 1e30 + 0.5 == 1e30)
            pad = 0.5 * max(1.0, abs(hi))
            lo, hi = lo - pad, hi + pad
        if s_hi == s_lo:  # one record: its point in the middle of the panel
            s_lo, s_hi = s_lo - 1, s_hi + 1
        if len(ref) == 1:  # one baseline value: a line across the panel
            ref = [(s_lo, ref[0][1]), (s_hi, ref[0][1])]
        px = lambda s, v: (x0 + (s - s_lo) / (s_hi - s_lo) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0))
        d.rectangle((x0 - 4, y0 - 6, x1 + 4, y1 + 6), outline="grey")  # a little outside: lines on the edge show
        d.text((x0, y0 - 20), key + (f" (dashed: {baselines[key]})" if ref else ""), fill="black")
        d.text((x0 - m + 4, y0 - 4), f"{hi:.3g}", fill="black")
        d.text((x0 - m + 4, y1 - 8), f"{lo:.3g}", fill="black")
        d.text((x0, y1 + 8), str(int(s_lo)), fill="black")
        d.text((x1 - 30, y1 + 8), str(int(s_hi)), fill="black")
        for (sa, va), (sb, vb) in zip(ref, ref[1:]):  # dashed: every other tenth of each segment
            for k in range(0, 10, 2):
                a, b = k / 10, (k + 1) / 10
                d.line([px(sa + a * (sb - sa), va + a * (vb - va)), px(sa + b * (sb - sa), va + b * (vb - va))],
                       fill=(150, 150, 150))
        colour = CURVE_COLOURS[n % len(CURVE_COLOURS)]
        if len(pts) == 1:
            cx, cy = px(*pts[0])
            d.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        d.line([px(s, v) for s, v in pts], fill=colour, width=2)
        boxes[key] = (x0, y0, x1, y1, s_lo, s_hi, lo, hi)
    save_png(img, path)
    return boxes


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


# -----------------------------------------------------------------------------
# run folders: shared by every script, so a run is never silently overwritten and never half-written

def atomic_write(path, text: str) -> None:
    """Write-then-rename: a crash leaves the old file or the new one, never a mixture."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def csv_text(rows, columns=None):
    """Row dicts as CSV text (header first), quoted where a value needs it: an exam or patient ID may hold a
    comma. columns: the header and its order (default: the first row's keys)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    columns = list(columns or rows[0])
    w.writerow(columns)
    w.writerows([r[c] for c in columns] for r in rows)
    return buf.getvalue()


def save_png(img, path) -> None:
    """A Pillow image to `path`, write-then-rename like atomic_write: a crash leaves the old picture or the new one."""
    tmp = f"{path}.tmp.{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)


def git_sha():
    """HEAD of the checkout this file lives in, whatever the working directory; None outside a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


RUN_FILES = ("ckpt.pt", "metrics.jsonl", "args.json")  # what every run folder holds and a new run would mix with


def check_run_folder(out, marker="ckpt.pt", overwrite=False, script=None, outputs=()):
    """A fresh run refuses, with one line that says what to do, a folder holding `marker` (a finished or interrupted
    run) or, given `script`, an args.json another script wrote: probe.py pointed at its backbone's pretraining
    folder would otherwise erase that run's metrics.jsonl. With overwrite it returns the old run's files (RUN_FILES,
    marker, outputs) for write_args to remove once the inputs are checked: the two runs never mix, a later
    --resume auto cannot pick up the old ckpt.pt, and a start that fails on a bad input leaves the old run whole."""
    if os.path.exists(out) and not os.path.isdir(out):  # found now, not after the run's work
        raise ValueError(f"{out}: --out names a file, not a folder")
    owner = script
    if script and os.path.exists(os.path.join(out, "args.json")):
        try:
            with open(os.path.join(out, "args.json")) as fh:
                owner = json.load(fh).get("script") or "an unknown script"
        except (ValueError, AttributeError):
            owner = "an unknown script"
    # the marker, or any output of a finished run whose marker was deleted (a ckpt.pt removed to save space)
    present = [name for name in (marker, *outputs) if os.path.exists(os.path.join(out, name))]
    if owner != script:
        what = f"a run of {owner} (its args.json); use another --out"
    else:  # only pretrain.py and detect.py (marker ckpt.pt) can continue a run
        what = f"a run ({present[0] if present else marker}); " + (
            "use --resume auto to continue it, another --out" if marker == "ckpt.pt" else "use another --out")
    if owner != script or present:
        if not overwrite:
            raise ValueError(f"{out}: already holds {what}, or --overwrite to replace it")
        return sorted(name for name in {*RUN_FILES, marker, *outputs} if os.path.exists(os.path.join(out, name)))
    return []


def check_resume_flags(path, saved, args, keys):
    """A resume must be given the run's own flags: one error naming each of `keys` whose value in the
    checkpoint's args (`saved`) differs from `args`."""
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} in the checkpoint, {getattr(args, k)} now"
             for k in keys if saved.get(k) != getattr(args, k)]
    if diffs:
        raise ValueError(f"{path}: does not fit the flags: " + "; ".join(diffs))


def write_args(out, args, script=None, clear=(), **extra):
    """args.json (atomic): the flags, the script that wrote it, the code version and anything the caller adds
    (world size, ...). First removes `clear` (what check_run_folder returned for --overwrite). Call it only after
    the inputs were validated, so a failed start leaves an existing run's files alone."""
    os.makedirs(out, exist_ok=True)
    for name in clear:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    record = dict(vars(args), script=script, git_sha=git_sha(), **extra)
    atomic_write(os.path.join(out, "args.json"), json.dumps(record, indent=1, default=str) + "\n")


# -----------------------------------------------------------------------------
# command line


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("dbtex", help="score detections with the official DBTex protocol",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--labels", required=True, help="BCS-DBT labels CSV (one row per volume)")
    p.add_argument("--boxes", required=True, help="BCS-DBT boxes CSV (ground truth)")
    p.add_argument("--predictions", required=True, help="submission CSV: StudyUID, View, X, Width, Y, Height, "
                   "Z, Depth, Score")
    p.add_argument("--radius", type=float, default=100.0, help="minimum hit radius in px (DBT-DINO's variant: "
                   f"{DBT_DINO_RADIUS:g} in 518-px coordinates)")
    # one line naming the flag, not argparse's whole usage block
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
    p.error = parser.error
    args = parser.parse_args(argv)
    if not args.radius > 0:
        parser.error(f"argument --radius: {args.radius} is not a positive number of pixels")
    return args


if __name__ == "__main__":
    args = get_args()
    try:
        result = dbtex_evaluate(args.labels, args.boxes, args.predictions, radius=args.radius)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for key, value in result.items():
        print(f"{key:<30} {value:.10f}")
