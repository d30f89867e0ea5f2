"""probe.py and show.py: aggregation, risk head/labels/loss, both per-year AUROC rules, the
embedding path and its cache, bad input, the two default tasks end to end, compare (metrics.py),
and show.py's explicit attention and one-line errors. CPU, tiny archives."""
import argparse
import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import cohorts
import data
import dicom
import metrics
import model
import phantoms
import preprocess
import probe
import show
import utils
from conftest import inproc

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--slices", "4", "--height", "64", "--width", "48", "--size", "28", "--workers", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, far faster on a shared, loaded CPU."""
    with utils.one_thread():
        yield


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """10 patients, 4 slices of 64 x 48: every encoding and display variant of the phantoms."""
    folder = tmp_path_factory.mktemp("probe") / "arch"
    return phantoms.synthetic_archive(folder, patients=10, seed=5, shape=(4, 64, 48))


@pytest.fixture(scope="module")
def table(archive):
    """The archive's views with hand-set labels and splits (4 test exams: 2 cancers, 2 healthy)."""
    with open(archive / "exams.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    density = "abcdabcdab"
    ytc = ["", "1.5", "", "", "2.5", "", "0.5", "", "3.5", ""]
    yfu = ["6", "1.5", "4.5", "7", "2.5", "3", "0.5", "8", "3.5", "5.5"]
    # test: exams 1 (cancer 1.5 y), 6 (cancer 0.5 y), 7 and 9 (healthy); train holds the cancers at
    # 2.5 and 3.5 y
    split = "train test train train train val test test train test".split()
    for r, d, t, f, s in zip(rows, density, ytc, yfu, split):
        site = "AB"[int(r["patient"][-1]) % 2]
        r.update(density=d, years_to_cancer=t, years_of_followup=f, split=s, site=site)
    with open(archive / "labelled.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return archive / "labelled.csv"


def random_tiny():
    torch.manual_seed(0)
    return model.build("tiny").eval()


# ----------------------------------------------------------------------------- aggregation
def test_aggregate_known_tokens_joint_over_slices_and_patches():
    patch = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 0.0], [7.0, -2.0]]])  # (S=2, N=2, D=2)
    cls = torch.tensor([[0.0, 1.0], [2.0, 5.0]])  # (S=2, D=2)
    out = probe.aggregate(patch, cls)
    # dim 0 holds 1, 3, 5, 7 and dim 1 holds 2, 4, 0, -2: both have squared deviations summing to 20
    # (n - 1 = 3)
    expected = {"patch_mean": [4, 1], "patch_std": [(20 / 3) ** 0.5] * 2, "patch_min": [1, -2],
                "patch_max": [7, 4], "cls_mean": [1, 3], "cls_std": [2 ** 0.5, 8 ** 0.5]}
    assert set(out) == set(probe.STATS)
    for k, v in expected.items():
        assert out[k].tolist() == pytest.approx(v, abs=1e-6), k


def test_feature_matrix_order_is_statistic_then_rcc_lcc_rmlo_lmlo():
    # value = 10 * (stored view order) + stat
    record = {v: {s: torch.full((2,), 10.0 * i + j) for j, s in enumerate(probe.STATS)}
              for i, v in enumerate(("LCC", "RCC", "LMLO", "RMLO"))}
    x = probe.feature_matrix([record], "patch-mean-std")[0]
    # RCC, LCC, RMLO, LMLO are 1, 0, 3, 2 in the stored order; patch_mean is stat 0, patch_std 1
    assert x.tolist() == [10, 10, 0, 0, 30, 30, 20, 20, 11, 11, 1, 1, 31, 31, 21, 21]


# ----------------------------------------------------------------------------- risk
def test_risk_labels_hand_worked():
    ytc = [2.3, 0.4, np.nan, np.inf, 6.0, np.inf, np.inf]
    yfu = [2.3, 0.4, 3.7, 8.0, 6.0, 0.5, 0.0]
    y_label, y_mask = cohorts.risk_labels(ytc, yfu)
    assert y_label.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]] + [[0] * 5] * 5
    assert y_mask.tolist() == [[1, 1, 1, 0, 0],  # cancer at 2.3 y: observed through event year 2
                               [1, 0, 0, 0, 0],  # cancer at 0.4 y
                               [1, 1, 1, 0, 0],  # healthy, 3.7 y: int(3.7 - 1) = 2
                               [1, 1, 1, 1, 1],  # healthy, 8 y (capped at 5)
                               [1, 1, 1, 1, 1],  # cancer after 6 y: beyond 5 years, a negative
                               [1, 0, 0, 0, 0],  # 0.5 y: int(-0.5) = 0, as Mirai's int()
                               [0, 0, 0, 0, 0]]  # no follow-up: Mirai's check_label drops it


def test_head_probabilities_in_unit_interval_non_decreasing_and_cumulative_hazard():
    torch.manual_seed(0)
    head = probe.CumulativeRiskHead(8)
    x = torch.randn(64, 8) * 5
    p = head(x)
    assert p.shape == (64, 5) and (p >= 0).all() and (p <= 1).all()
    assert (p.diff(dim=1) >= 0).all()
    # computed independently: cumsum, not a mask
    hazards = F.softplus(x @ head.hazard_fc.weight.T + head.hazard_fc.bias)
    assert torch.allclose(p, 1 - torch.exp(-hazards.cumsum(1)), atol=1e-6)


def test_risk_loss_per_sample_normalisation_and_censored_targets_ignored():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.2, 0.4, 0.6, 0.8, 0.9]])
    y = torch.tensor([[0.0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    m = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    first = -(np.log(0.9) + np.log(0.8) + np.log(0.3)) / 3
    second = -(np.log(0.8) + np.log(0.6) + np.log(0.4) + np.log(0.2) + np.log(0.1)) / 5
    assert probe.risk_loss(p, y, m).item() == pytest.approx((first + second) / 2, rel=1e-6)
    # Mirai's batch normalisation would give (3 first + 5 second) / 8: different here
    assert abs((3 * first + 5 * second) / 8 - (first + second) / 2) > 0.05

    torch.manual_seed(1)
    head, x = probe.CumulativeRiskHead(6), torch.randn(2, 6)
    grads = []
    for censored in (0.0, 1.0):
        y2 = y.clone()
        y2[0, 3:] = censored  # sample 0 is censored after year 3: its later targets must not matter
        head.zero_grad()
        loss = probe.risk_loss(head(x), y2, m)
        loss.backward()
        grads.append((loss.item(), [q.grad.clone() for q in head.parameters()]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_auroc_rules_hand_worked_where_they_differ():
    # exam: 0 cancer 0.5 y | 1 cancer 2.3 y | 2 healthy 6 y | 3 healthy 1.5 y | 4 healthy 3 y |
    # 5 cancer after 7 y (beyond 5: healthy) | 6 healthy 0.5 y | 7 cancer 3.5 y
    score = np.array([0.5, 0.25, 0.2, 0.7, 0.3, 0.1, 0.6, 0.9])
    ytc = [0.5, 2.3, np.inf, np.inf, np.inf, 7.0, np.inf, 3.5]
    yfu = [0.5, 2.3, 6.0, 1.5, 3.0, 8.0, 0.5, 3.5]
    probs = np.tile(score[:, None], 5)
    mirai = metrics.risk_auroc_by_year(probs, ytc, yfu, rule="mirai")
    # Mirai counts later cancers (1, 7) as negatives: year 1 {0} vs {1..7}; year 2 {0} vs
    # {1, 2, 4, 5, 7}; year 3 {0, 1} vs {2, 4, 5, 7}
    assert mirai == pytest.approx({1: 4 / 7, 2: 4 / 5, 3: 5 / 8, 4: 1.0, 5: 1.0}, abs=1e-12)
    assert metrics.risk_auroc_by_year(probs, ytc, yfu) == mirai  # Mirai's rule stays the default
    # DBT-DINO's rule excludes them, and healthy exams need >= k years: year 1 {0} vs {2, 3, 4, 5};
    # year 2 {0} vs {2, 4, 5}; year 3 {0, 1} vs {2, 4, 5}; years 4-5 {0, 1, 7} vs {2, 5}
    dbt = metrics.risk_auroc_by_year(probs, ytc, yfu, rule="dbt-dino")
    assert dbt == pytest.approx({1: 3 / 4, 2: 1.0, 3: 5 / 6, 4: 1.0, 5: 1.0}, abs=1e-12)


def test_stratified_subset_keeps_class_shares():
    labels = np.array([0] * 40 + [1] * 30 + [2] * 3)
    keep = cohorts.stratified_subset(labels, 0.25, seed=0)
    assert np.bincount(labels[keep]).tolist() == [10, 8, 1]  # rounded (7.5 -> 8), no class empty
    assert len(set(keep)) == len(keep)


def test_risk_targets_refuse_nan_and_negative_years_naming_the_exam():
    ok = dict(exam="E0", years_to_cancer="", years_of_followup="4")
    assert [a.tolist() for a in cohorts.risk_targets([ok])] == [[np.inf], [4.0]]
    for column, value in [("years_of_followup", "nan"), ("years_of_followup", "-1"),
                          ("years_to_cancer", "NaN"), ("years_to_cancer", "-0.5")]:
        with pytest.raises(ValueError) as e:
            cohorts.risk_targets([ok, dict(ok, exam="E7", **{column: value})])
        msg = str(e.value)
        assert "\n" not in msg and f"exam E7: {column} {value!r}" in msg, msg


def _risk_case(unobserved_split):
    """12 exams of 12 patients, 4 per split, each split with cancers and healthy exams, except that
    every exam of `unobserved_split` is healthy with no follow-up at all (years_of_followup 0)."""
    rows, split = [], []
    for i, s in enumerate(np.repeat(["train", "val", "test"], 4)):
        ytc, yfu = ("1.5", "1.5") if i % 2 else ("", "6")
        rows.append(dict(patient=f"P{i}", exam=f"E{i}", years_to_cancer=ytc, years_of_followup=yfu))
        if s == unobserved_split:
            rows[-1].update(years_to_cancer="", years_of_followup="0")
        split.append(s)
    args = argparse.Namespace(fraction=1.0, seed=0, trials=2, epochs=3, batch_size=64, rule="mirai",
                              n_boot=10)
    x = torch.randn(len(rows), 6, generator=torch.Generator().manual_seed(0))
    return args, rows, np.array(split), x


@pytest.mark.parametrize("name", ["val", "test"])
def test_risk_split_emptied_by_exams_without_follow_up_is_one_line(name):
    args, rows, split, x = _risk_case(name)
    with pytest.raises(ValueError) as e:
        probe.run_risk(args, rows, split, x, writer=None)
    msg = str(e.value)
    assert "\n" not in msg and f"all 4 exams of the {name} split have no follow-up" in msg, msg


def test_lr_search_without_a_finite_validation_loss_raises():
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    nan = torch.full_like(y, float("nan"))  # a val loss NaN every epoch: no epoch is ever the best
    with pytest.raises(ValueError, match="none of the 2 trials reached a finite validation loss"):
        probe.lr_search(lambda: nn.Linear(3, 1), F.mse_loss, (x, (y,)), (x, (nan,)),
                        lr_range=(1e-3, 1e-2), trials=2, epochs=2, batch_size=4, seed=0)


# ----------------------------------------------------------------------------- splits and CIs
def _multi_exam_rows(patients=20):
    """1 to 3 exams per patient: the patient-level guarantees can only fail on such a table."""
    return [dict(patient=f"P{p:02d}", exam=f"P{p:02d}-E{e}")
            for p in range(patients) for e in range(1 + p % 3)]


def test_fallback_split_keeps_every_patients_exams_together():
    rows = _multi_exam_rows()
    for seed in range(3):
        splits = {}
        for r, s in zip(rows, cohorts.assign_splits(rows, seed)):
            splits.setdefault(r["patient"], set()).add(s)
        assert all(len(s) == 1 for s in splits.values()), seed
        shares = sorted(s for (s,) in splits.values())
        # 60/20/20 of the patients
        assert [shares.count(k) for k in ("train", "val", "test")] == [12, 4, 4]


def test_split_column_refuses_a_patient_in_two_splits_before_embedding(tmp_path):
    splits = ["train", "val", "val", "test", "test", "train", "train"]
    rows = [dict(r, split=s) for r, s in zip(_multi_exam_rows(4), splits)]
    # P00 | P01, P01: no patient in two splits
    assert cohorts.assign_splits(rows[:3], 0) == ["train", "val", "val"]
    with pytest.raises(ValueError) as e:
        cohorts.assign_splits(rows, 0)  # P02's three exams: test, test, train
    assert "\n" not in str(e.value) and "patient 'P02'" in str(e.value)
    table = tmp_path / "leaky.csv"
    for r in rows:
        r.update({v: f"{v}.dcm" for v in cohorts.VIEWS}, density="a")
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match="patient 'P02'"):  # before any view is looked for
        probe.main(["--data", str(table), "--backbone", "random", "--cache",
                    str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def _patient_bootstrap(statistic, arrays, patients, n_boot, seed):
    """An independent 95% percentile CI drawing patients: the sorted IDs drawn with replacement from
    np.random.default_rng(seed), all exams of each drawn patient kept, resamples with an undefined
    value dropped."""
    ids = sorted(set(patients))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        drawn = rng.integers(len(ids), size=len(ids))
        idx = np.concatenate([np.flatnonzero(patients == ids[d]) for d in drawn])
        try:
            v = statistic(*(a[idx] for a in arrays))
        except ValueError:
            continue
        if np.isfinite(v):
            values.append(v)
    return np.quantile(values, [0.025, 0.975]).tolist()


def test_density_ci_resamples_patients_and_majority_is_the_training_class():
    rows = _multi_exam_rows(12)
    rng = np.random.default_rng(0)
    patients = np.array([r["patient"] for r in rows])
    y = rng.integers(0, 4, len(rows))
    pred = np.where(rng.random(len(rows)) < 0.6, y, (y + 1) % 4)
    report = metrics.density_report(y, np.eye(4)[pred], patients, {}, n_boot=200, seed=3,
                                    train_majority=3)
    expected = _patient_bootstrap(metrics.accuracy, (y, pred), patients, 200, 3)
    assert report["accuracy_ci"] == pytest.approx(expected, abs=1e-12)
    by_exam = metrics.bootstrap_ci(metrics.accuracy, y, pred, n_boot=200, seed=3)[1:]
    assert by_exam != pytest.approx(expected, abs=1e-3)  # resampling exams cannot pass the above
    # the baseline always predicts the training split's commonest class; the test set's own would be
    # higher here (c's 10 / 24)
    assert np.bincount(y).tolist() == [5, 3, 10, 6] and report["majority_rate"] == 6 / 24


def test_risk_ci_resamples_patients():
    rows = _multi_exam_rows(16)
    rng = np.random.default_rng(1)
    patients = np.array([r["patient"] for r in rows])
    ytc = np.where(rng.random(len(rows)) < 0.35, rng.uniform(0, 5, len(rows)), np.inf)
    yfu = np.where(np.isinf(ytc), rng.uniform(0.5, 8, len(rows)), ytc)
    probs = np.sort(rng.random((len(rows), 5)), 1)
    block = metrics.risk_block(probs, ytc, yfu, patients, "mirai", n_boot=100, seed=4)

    def mean(p, t, u):
        return np.mean(list(metrics.risk_auroc_by_year(p, t, u, 5, "mirai").values()))
    expected = _patient_bootstrap(mean, (probs, ytc, yfu), patients, 100, 4)
    assert block["auroc_mean_ci"] == pytest.approx(expected, abs=1e-12)
    year3 = _patient_bootstrap(lambda p, t, u: metrics.risk_auroc_by_year(p, t, u, 5, "mirai")[3],
                               (probs, ytc, yfu), patients, 100, 4)
    assert block["auroc_ci"][3] == pytest.approx(year3, abs=1e-12)
    # risk_block bootstraps once for all years: each year's CI must still be its own pass's
    for rule in metrics.RISK_RULES:
        block = metrics.risk_block(probs, ytc, yfu, patients, rule, n_boot=100, seed=4)
        assert not block["not_scored"] and block["auroc_mean_years"] == [1, 2, 3, 4, 5]
        whole = metrics.risk_auroc_by_year(probs, ytc, yfu, 5, rule)
        for k in range(1, 6):
            def year(p, t, u):
                return metrics.risk_auroc_by_year(p, t, u, 5, rule)[k]
            alone = _patient_bootstrap(year, (probs, ytc, yfu), patients, 100, 4)
            assert block["auroc"][k] == whole[k]
            assert block["auroc_ci"][k] == pytest.approx(alone, abs=1e-12)


def test_default_cohort_scores_every_year_by_both_rules():
    """`python probe.py --task risk`'s cohort, from phantoms.plan_cohort (its labels, no pixels):
    the test split holds cancers and negatives for every year by both rules, at least 3 of each,
    so a patient-bootstrap resample rarely lacks one and every year has a finite AUROC and CI."""
    args = probe.get_args(["--task", "risk"])
    assert args.data == "synthetic"
    rows = [dict(p, exam=p["patient"])
            for p in phantoms.plan_cohort(args.patients or probe.DBT_PATIENTS, args.data_seed,
                                          args.hazard)]
    test = np.array(cohorts.assign_splits(rows, args.seed)) == "test"
    ytc, yfu = cohorts.risk_targets(rows)
    for rule in metrics.RISK_RULES:
        for k in range(1, 6):
            keep, positive = metrics.risk_year_cases(ytc[test], yfu[test], k, 5, rule)
            n_pos, n_neg = int(positive.sum()), int((keep & ~positive).sum())
            assert n_pos >= 3 and n_neg >= 3, (rule, k, n_pos, n_neg)
            assert metrics.year_not_scored(ytc[test], yfu[test], k, rule) is None



# ----------------------------------------------------------------------------- embedding path
def test_device_display_equals_read_dbt_for_every_variant(archive):
    # 8 consecutive views cover all 8 encoding/VOI/MONOCHROME variants
    paths = sorted(archive.rglob("*.dcm"))[:8]
    reader = data.VolumeReader(paths)
    kinds = set()
    for i, path in enumerate(paths):
        _, item = reader[i]
        ours = torch.cat(list(probe.display_chunks(item, torch.device("cpu"), 3))).numpy()
        ref, meta = dicom.read_dbt(path)
        assert np.abs(ours - ref).max() < 1e-5, path
        kinds.add((meta["voi"][0][4], meta["invert"], meta.get("mirrored")))
    assert {k[0] for k in kinds} == {"LINEAR", "SIGMOID", "LINEAR_EXACT"}
    assert {k[1] for k in kinds} == {0, 1}


def test_embed_volumes_equals_direct_forward_and_precisions(archive):
    net, path = random_tiny(), sorted(archive.rglob("*.dcm"))[1]
    feats, stats = probe.embed_volumes(net, [path], "cpu", size=28, chunk=3, workers=1,
                                       precision="autocast")
    vol = torch.from_numpy(dicom.read_dbt(path)[0])  # (S, H, W)
    x = F.interpolate(vol[:, None], size=(28, 28), mode="bilinear", antialias=True).clamp(0, 1)
    with torch.no_grad():
        out = net.forward_features(x.expand(-1, 3, -1, -1))
    ref = probe.aggregate(out["x_norm_patchtokens"], out["x_norm_clstoken"])
    assert all(torch.allclose(feats[0][k], ref[k], atol=1e-5) for k in probe.STATS)
    assert stats["slices"] == 4 and stats["skipped"] == 0
    assert 0 <= stats["wait_seconds"] <= stats["seconds"]
    bf16, _ = probe.embed_volumes(net, [path], "cpu", size=28, chunk=3, workers=0,
                                  precision="bf16-weights")
    assert next(net.parameters()).dtype == torch.float32  # the caller's backbone is not cast
    assert torch.allclose(bf16[0]["patch_mean"], ref["patch_mean"], atol=0.1)


def test_densenet_baseline_is_torchvisions_pooled_feature():
    torch.manual_seed(0)
    net = model.DenseNetFeatures().eval()
    ref = torchvision.models.densenet121(weights=None)
    ref.features.load_state_dict(net.features.state_dict())
    ref.classifier = torch.nn.Identity()  # forward up to the classifier: the pooled 1024-d vector
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(model.IMAGENET_MEAN)[:, None, None]
    norm = (x - mean) / torch.tensor(model.IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        out, expected = net.forward_features(x), ref.eval()(norm)
    assert out["x_norm_clstoken"].shape == (2, 1024)
    assert torch.allclose(out["x_norm_clstoken"], expected, atol=1e-5)
    assert torch.equal(out["x_norm_patchtokens"][:, 0], out["x_norm_clstoken"])


def _embed(rows, root, folder):
    return probe.embed_exams(random_tiny(), rows, root, folder, torch.device("cpu"), size=28,
                             chunk=75, workers=0, precision="fp32")


def test_cache_resume_reembeds_nothing_then_exactly_one(archive, tmp_path):
    rows, root = cohorts.read_exams(archive)
    first, counts = _embed(rows, root, tmp_path)
    assert counts == dict(reused=0, embedded=10, skipped=0)
    second, counts = _embed(rows, root, tmp_path)
    assert counts == dict(reused=10, embedded=0, skipped=0)
    assert all(torch.equal(first[j]["RCC"]["patch_mean"], second[j]["RCC"]["patch_mean"])
               for j in first)
    probe.exam_file(tmp_path, rows[3], root).unlink()
    _, counts = _embed(rows, root, tmp_path)
    assert counts == dict(reused=9, embedded=1, skipped=0)


def test_cache_misses_a_replaced_view_and_another_cohort_at_the_same_relative_paths(
        archive, tmp_path, monkeypatch):
    """The cache name holds each view's resolved path, size and modification time: another exam's
    file copied over a view is embedded again, and so is a second cohort with the same IDs read
    through the same relative path."""
    for name in ("a", "b"):
        shutil.copytree(archive, tmp_path / name)  # copy2: the same sizes and mtimes in both
    monkeypatch.chdir(tmp_path / "a")
    rows, root = cohorts.read_exams("exams.csv")
    assert not root.is_absolute()  # the view paths as the table names them: RCC/... under "."
    first, _ = _embed(rows, root, tmp_path / "cache")
    shutil.copyfile(root / rows[1]["RCC"], root / rows[0]["RCC"])  # exam 1's RCC file over exam 0's
    again, counts = _embed(rows, root, tmp_path / "cache")
    assert counts == dict(reused=9, embedded=1, skipped=0)
    assert torch.allclose(again[0]["RCC"]["patch_mean"], first[1]["RCC"]["patch_mean"], atol=1e-6)
    assert not torch.allclose(again[0]["RCC"]["patch_mean"], first[0]["RCC"]["patch_mean"],
                              atol=1e-3)
    monkeypatch.chdir(tmp_path / "b")
    rows, root = cohorts.read_exams("exams.csv")
    _, counts = _embed(rows, root, tmp_path / "cache")
    assert counts == dict(reused=0, embedded=10, skipped=0)


def test_compile_flag_embeds_through_compiled_blocks_with_the_same_features(
        archive, tmp_path, capsys, torch_compile):
    """probe.py --compile: the ViT's blocks run compiled (model.compile_blocks, tested in
    test_model), the features equal eager ones to 1e-5 and land under the same cache key; the
    DenseNet baseline is a bad flag, in one line."""
    rows, root = cohorts.read_exams(archive)
    rows = rows[:2]
    got = {}
    for flag in ([], ["--compile"]):
        cache = str(tmp_path / str(flag))
        args = probe.get_args(["embed", "--size", "28", "--workers", "0", "--cache", cache] + flag)
        net = random_tiny()
        got[bool(flag)] = probe.embeddings(args, (net, "random tiny"), rows, root,
                                           torch.device("cpu"))
        # compiled only with the flag
        assert (net.blocks[0].forward.__func__ is model.Block.forward) != bool(flag)
    (eager, info), (comp, comp_info) = got[False], got[True]
    assert Path(info["cache"]).name == Path(comp_info["cache"]).name
    assert sorted(eager) == sorted(comp) == [0, 1]
    for j in eager:
        for view, stats in eager[j].items():
            assert all((stats[k] - comp[j][view][k]).abs().max() < 1e-5
                       for k in probe.STATS), (j, view)
    with pytest.raises(SystemExit) as exit_:
        probe.get_args(["embed", "--compile", "--backbone", "densenet121"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "--compile" in err and "DenseNet" in err


def test_truncated_and_missing_views_are_skipped_and_counted(archive, tmp_path, capsys):
    copy = tmp_path / "arch"
    shutil.copytree(archive, copy)
    rows, root = cohorts.read_exams(copy)
    truncated, missing = root / rows[2]["LMLO"], root / rows[5]["RCC"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    missing.unlink()
    records, counts = _embed(rows, root, tmp_path / "cache")
    assert counts["skipped"] == 2 and sorted(records) == [0, 1, 3, 4, 6, 7, 8, 9]
    out = capsys.readouterr().out
    assert out.count(str(truncated)) == 1 and out.count(str(missing)) == 1


# ----------------------------------------------------------------------------- command line, runs
def test_bad_input_one_line_and_nonzero_exit(tmp_path, capsys):
    for argv, flag in [(["--trials", "0"], "--trials"),
                       (["--size", "30"], "--size: 30 is not a multiple of"),
                       (["embed", "--out", "x"], "--out: embed writes only the embedding cache"),
                       (["--backbone", "densenet121", "--size", "28"],
                        "--size: 28 is below DenseNet-121's 32")]:
        with pytest.raises(SystemExit) as e:
            probe.get_args(argv)
        assert e.value.code == 2 and flag in capsys.readouterr().err
    r = inproc("probe.py", "--data", tmp_path / "none.csv")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "none.csv: no exam table" in r.stderr
    # a spreadsheet's "Unicode text"
    (tmp_path / "utf16.csv").write_bytes("patient,exam\n".encode("utf-16"))
    with pytest.raises(ValueError, match="utf16.csv: not a readable CSV"):
        cohorts.read_exams(tmp_path / "utf16.csv")
    net, what = model.load_backbone("random", arch="vits14")  # --arch picks the random ViT
    assert net.embed_dim == 384 and "RANDOMLY INITIALISED vits14" in what
    with pytest.raises(ValueError, match="unknown model 'bogus'"):
        model.load_backbone("random", arch="bogus")
    torch.save([1, 2], tmp_path / "list.pt")  # a checkpoint that is not a state dict
    with pytest.raises(ValueError, match="list.pt: not a DenseNet-121 state dict"):
        model.DenseNetFeatures(tmp_path / "list.pt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("[1, 2]")
    (tmp_path / "run" / "predictions.csv").write_text("exam\n1\n")
    with pytest.raises(ValueError, match="run: metrics.json is not a probe run's"):
        metrics.load_run(tmp_path / "run")


@pytest.fixture(scope="module")
def runs(table, tmp_path_factory):
    """The two tasks as `python probe.py` runs them by default, on the tiny table, plus a second
    density run and a second risk run."""
    out = tmp_path_factory.mktemp("runs")
    quick = SMALL + ["--data", str(table), "--trials", "2", "--epochs", "6", "--n-boot", "20",
                     "--cache", str(out / "cache")]
    reports = {}
    for name, extra in [("density", ["--subgroups", "site"]), ("risk", ["--task", "risk"]),
                        ("density_cls", ["--features", "cls-mean-std", "--seed", "1"])]:
        reports[name] = probe.main(quick + extra + ["--out", str(out / name)])
    reports["risk_b"] = probe.main(quick + ["--task", "risk", "--seed", "2", "--out",
                                            str(out / "risk_b")])
    return out, reports


def test_default_runs_write_promised_outputs(runs, table):
    out, _ = runs
    keys = {"density": {"accuracy", "accuracy_ci", "macro_f1", "auroc_ovr", "confusion",
                        "binary_accuracy", "n_test"},
            "risk": {"auroc", "auroc_ci", "auroc_mean", "rule", "n_test", "not_scored",
                     "auroc_mean_years"}}
    for task, promised in keys.items():
        report = json.loads((out / task / "metrics.json").read_text())
        assert promised <= set(report) and report["n_test"] == 4
        for name in ("args.json", "metrics.jsonl", "predictions.csv", "head.pt",
                     "confusion.png" if task == "density" else "roc.png"):
            assert (out / task / name).stat().st_size > 0, name
        head = torch.load(out / task / "head.pt", weights_only=True)
        assert head["task"] == task
    risk = json.loads((out / "risk" / "metrics.json").read_text())
    assert risk["rule"] == "mirai" and set(risk["by_rule"]) == {"mirai", "dbt-dino"}
    assert list(risk["auroc"]) == ["1", "2", "3", "4", "5"]
    density = json.loads((out / "density" / "metrics.json").read_text())
    assert np.array(density["confusion"]).sum() == 4
    assert set(density["subgroups"]["site"]) <= {"A", "B"}
    # train holds a, c, d, a, a and test b, c, d, b: the training majority (a) is never right on
    # test (the test set's own majority, b, would have given 0.5)
    assert density["majority_rate"] == 0.0
    with pytest.raises(ValueError, match="already holds a run"):  # never overwritten silently
        probe.main(SMALL + ["--data", str(table), "--out", str(out / "density")])


def _no_nan(text):
    """json.loads that refuses NaN and Infinity, which strict JSON readers reject."""
    def refuse(token):
        raise ValueError(f"{token} in metrics.json")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("task", ["density", "risk"])
def test_last_line_names_every_file_in_the_run_folder(runs, table, task, capsys):
    out, _ = runs
    run = out / f"last_{task}"
    quick = SMALL + ["--data", str(table), "--trials", "2", "--epochs", "3", "--n-boot", "20",
                     "--cache", str(out / "cache"), "--task", task, "--out", str(run),
                     "--backbone", "random"]
    probe.main(quick)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"wrote {run}: " + ", ".join(sorted(os.listdir(run)))
    png = "confusion.png" if task == "density" else "roc.png"
    assert {"args.json", "metrics.jsonl", "metrics.json", "predictions.csv", "head.pt",
            png} == set(os.listdir(run))
    Image.open(run / png).verify()
    # which backbone, and what it has to beat
    assert "RANDOMLY INITIALISED" in lines[-2] and "--backbone random baseline" in lines[-2]


def test_a_year_the_test_split_cannot_score_is_named_not_nan(runs, table, tmp_path, capsys):
    """The test split's cancer at 0.5 y moved to 1.2 y: year 1 has no positives by either rule."""
    out, _ = runs
    rows = utils.read_csv(table)
    assert rows[6]["years_to_cancer"] == "0.5" and rows[6]["split"] == "test"
    rows[6].update(years_to_cancer="1.2", years_of_followup="1.2")
    moved = table.parent / "no_year_1.csv"  # beside the views, so the cached embeddings serve
    moved.write_text(utils.csv_text(rows))
    run = tmp_path / "risk"
    probe.main(SMALL + ["--data", str(moved), "--trials", "2", "--epochs", "3", "--n-boot", "20",
                        "--cache", str(out / "cache"), "--task", "risk", "--out", str(run),
                        "--backbone", "random"])
    printed = capsys.readouterr().out
    why = "no cancers within 1 year in the test split (0 of 4 exams)"
    assert f"AUROC 1y not scored: {why}" in printed.splitlines()
    assert not re.search(r"\bnan\b", printed, re.IGNORECASE), printed
    report = _no_nan((run / "metrics.json").read_text())
    for block in [report] + list(report["by_rule"].values()):
        assert block["auroc"]["1"] is None and block["not_scored"] == {"1": why}
        assert all(isinstance(block["auroc"][k], float) for k in "2345")
        assert block["auroc_mean_years"] == [2, 3, 4, 5] and block["auroc_mean"] is not None


def test_roc_figure_has_ticks_labels_steps_diagonal_and_legend(tmp_path):
    """roc.png read back by pixel: tick marks at 0, 0.5 and 1 outside both axes (none between),
    a label under and beside each, a curve drawn as its steps, the chance diagonal, and the
    legend in the curve's colour."""
    steps = ([0, 0, 0.5, 0.5, 1], [0, 0.5, 0.5, 1, 1])  # up, right, up, right
    panels = {"Mirai's rule": {"1y AUROC 0.75": steps, "2y not scored: no cancers": None}}
    [(x0, y0, x1, y1)] = utils.draw_roc(panels, "title", tmp_path / "roc.png")
    img = np.asarray(Image.open(tmp_path / "roc.png").convert("RGB")).astype(int)

    def dark(x, y):  # black or nearly: ticks, labels
        return img[round(y), round(x)].max() < 100

    def at(fx, ty):  # rates to pixels
        return x0 + fx * (x1 - x0), y1 - ty * (y1 - y0)
    for t in utils.ROC_TICKS:
        x, y = at(t, t)
        assert dark(x, y1 + 4) and dark(x0 - 4, y), t  # the tick marks
        assert any(dark(x + dx, y1 + dy) for dx in range(-8, 9) for dy in range(9, 24)), t
        assert any(dark(x0 - dx, y + dy) for dx in range(10, 30) for dy in range(-8, 8)), t
    for t in (0.25, 0.75):  # no tick between
        x, y = at(t, t)
        assert not dark(x, y1 + 4) and not dark(x0 - 4, y)
    colour = list(utils.CURVE_COLOURS[0])
    assert img[round(at(0.25, 0.5)[1]), round(at(0.25, 0.5)[0])].tolist() == colour  # a step
    assert img[round(at(0.25, 0.25)[1]), round(at(0.25, 0.25)[0])].tolist() != colour  # no chord
    x, y = at(0.525, 0.525)  # a dash of the diagonal, away from the grid line at 0.5
    assert img[round(y), round(x)].tolist() == [150, 150, 150]
    legend = img[y1 + 45:, :]
    assert (legend == colour).all(-1).sum() > 20  # the label and swatch of the drawn curve
    assert (legend == [120, 120, 120]).all(-1).sum() > 20  # the year not scored, in grey


def test_compare_pvalues_equal_metrics(runs, capsys):
    out, _ = runs
    result = metrics.main(["compare", str(out / "density"), str(out / "density_cls"), "--out",
                           str(out / "cmp_d")])
    preds = [{r["exam"]: r for r in csv.DictReader(open(out / run / "predictions.csv"))}
             for run in ("density", "density_cls")]
    exams = sorted(preds[0])
    correct = [np.array([p[e]["pred"] == p[e]["density"] for e in exams]) for p in preds]
    assert result["tests"][0]["p"] == metrics.mcnemar(correct[0], correct[1])
    assert json.loads((out / "cmp_d" / "compare.json").read_text())["test"] == "mcnemar"

    result = metrics.main(["compare", str(out / "risk"), str(out / "risk_b"), "--out",
                           str(out / "cmp_r")])
    preds = [{r["exam"]: r for r in csv.DictReader(open(out / run / "predictions.csv"))}
             for run in ("risk", "risk_b")]
    # test exams: cancers at 1.5 y and 0.5 y, healthy with 8 y and 5.5 y: years 2-5 have 2 + 2 cases
    y = np.array([1, 1, 0, 0])
    exams = sorted(preds[0])
    assert [t["metric"] for t in result["tests"]] == [f"auroc_year{k}" for k in range(2, 6)]
    for t in result["tests"]:
        k = t["metric"][-1]
        order = sorted(exams, key=lambda e: preds[0][e]["years_to_cancer"] == "")
        a, b = ([float(p[e][f"p{k}"]) for e in order] for p in preds)
        assert t["p"] == pytest.approx(metrics.delong_test(y, a, b)[2], abs=1e-12)
    assert [t["p_bh"] for t in result["tests"]] == pytest.approx(
        metrics.benjamini_hochberg([t["p"] for t in result["tests"]]).tolist(), abs=1e-12)


def test_compare_density_mcnemar_exact_on_known_discordant_pairs(tmp_path):
    from scipy.stats import binomtest
    truth = "abcdabcdabcd"
    # A right on 10; B right on 4, all of them also right for A
    runs = {"A": "abcdabcdabdc", "B": "bacdbacdbadc"}
    for name, pred in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"task": "density"}))
        rows = "".join(f"P{i},E{i},{t},{p}\n" for i, (t, p) in enumerate(zip(truth, pred)))
        (tmp_path / name / "predictions.csv").write_text("patient,exam,density,pred\n" + rows)
    result = metrics.main(["compare", str(tmp_path / "A"), str(tmp_path / "B"), "--out",
                           str(tmp_path / "cmp")])
    (test,) = result["tests"]
    assert (test["value_a"], test["value_b"]) == (10 / 12, 4 / 12)
    assert test["p"] == pytest.approx(binomtest(0, 6, 0.5).pvalue, abs=1e-12)
    assert test["p_bh"] == test["p"]


# ----------------------------------------------------------------------------- show.py
def test_explicit_attention_equals_sdpa_and_excludes_registers():
    torch.manual_seed(0)
    vit = model.build("tiny_reg", img_size=56).eval()
    x = torch.rand(2, 3, 56, 56)
    seen = {}
    vit.blocks[-1].attn.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    with torch.no_grad():
        vit.forward_features(x)
        att = show.last_block_attention(vit, x)
    assert att["attn"].shape == (2, 3, 1 + 4 + 16, 1 + 4 + 16)
    # the same q, k, v as the real pass
    assert torch.allclose(att["block_input"], seen["inp"], atol=1e-6)
    sdpa = F.scaled_dot_product_attention(att["q"], att["k"], att["v"])
    assert torch.allclose(att["attn"] @ att["v"], sdpa, atol=1e-6)
    merged = (att["attn"] @ att["v"]).transpose(1, 2).reshape(2, 21, -1)
    assert torch.allclose(vit.blocks[-1].attn.proj(merged), seen["out"], atol=1e-6)
    img = show.attention_figure(vit, x[:1], "test", panel=60)
    assert img.size == (3 * 60 + 40, 60 + 50)


def test_show_writes_attention_png_for_a_saved_backbone(archive, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default backbone: the newest runs/*/backbone.pth under it
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    utils.save_checkpoint(tmp_path / "runs" / "demo" / "backbone.pth", random_tiny().state_dict())
    image = str(sorted(archive.rglob("*.dcm"))[0])
    show.run_show(show.get_args(["--image", image, "--size", "56", "--out", "fig"]))
    said = capsys.readouterr().out
    assert "runs/demo/backbone.pth (tiny, 112 px, newest runs/*/backbone.pth)" in said
    assert Image.open(tmp_path / "fig" / "attention.png").size == (3 * 336 + 40, 336 + 50)


def test_tissue_share_equals_a_hand_computation(monkeypatch):
    """tissue_share on a made attention map: head 0 (sums to 0.9: CLS and registers take the rest)
    0.1, 0.2, 0.3, 0.3 on patches of tissue fraction 1, 0, 0.5, 0 -> (0.1 + 0.15) / 0.9; head 1
    uniform 0.25 -> (0.25 + 0.125) / 1; the share is their mean."""
    a = torch.tensor([[0.1, 0.2, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]])
    f = torch.tensor([1.0, 0.0, 0.5, 0.0])
    assert show.tissue_share(a, f) == pytest.approx(0.5 * (0.25 / 0.9 + 0.375), abs=1e-7)  # fp32
    # through attention_in_tissue: a 4 x 4 grid whose left half is tissue; head 0 looks only at
    # patch (0, 0), head 1 at every patch alike: shares 1 and 0.5
    vit = model.build("tiny", img_size=56).eval()
    T = 1 + vit.num_register_tokens + 16
    attn = torch.zeros(1, 2, T, T)
    attn[0, 0, 0, 1 + vit.num_register_tokens] = 1.0
    attn[0, 1, 0, 1 + vit.num_register_tokens:] = 1 / 16
    monkeypatch.setattr(show, "last_block_attention", lambda net, x: {"attn": attn})
    half = np.zeros((40, 30), bool)
    half[:, :15] = True
    monkeypatch.setattr(show.preprocess, "tissue_mask", lambda image: half)
    share, even = show.attention_in_tissue(vit, torch.zeros(1, 3, 56, 56), np.zeros((40, 30)))
    assert share == pytest.approx(0.75, abs=1e-12) and even == 0.5


def test_show_scores_attention_in_tissue_over_a_folder(archive, tmp_path):
    volumes = sorted(archive.rglob("*.dcm"))
    show.run_show(show.get_args(["--image", str(archive), "--backbone", "random", "--size", "56",
                                 "--out", str(tmp_path / "fig")]))
    with open(tmp_path / "fig" / "tissue_attention.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    summary = json.loads((tmp_path / "fig" / "tissue_attention.json").read_text())
    assert [r["image"] for r in rows] == [str(v) for v in volumes]
    shares = [float(r["share"]) for r in rows]
    assert all(0 < s < 1 for s in shares) and summary["images"] == len(volumes)
    assert summary["mean"] == pytest.approx(np.mean(shares), abs=1e-9)
    assert summary["ci"][0] <= summary["mean"] <= summary["ci"][1]
    fractions = [float(r["tissue_fraction"]) for r in rows]
    assert summary["even_attention"] == pytest.approx(np.mean(fractions), abs=1e-9)
    assert (tmp_path / "fig" / "attention.png").exists()
    # the first volume's share, recomputed: its central slice, its tissue mask cut into 4 x 4
    # blocks of the 56-px input, the attention of the same random ViT
    img = dicom.read_dbt(volumes[0], frames=[dicom.index_volume(volumes[0])["n_frames"] // 2])[0]
    x = F.interpolate(torch.from_numpy(img)[None], (56, 56), mode="bilinear", antialias=True)
    mask = preprocess.tissue_mask(img[0])
    rows_at = (np.arange(56) * mask.shape[0] / 56).astype(int)  # nearest, as F.interpolate does
    cols_at = (np.arange(56) * mask.shape[1] / 56).astype(int)
    f = mask[rows_at][:, cols_at].reshape(4, 14, 4, 14).mean((1, 3)).flatten()
    vit = model.load_backbone("random", "auto", "")[0].eval()  # show.py's --backbone random
    with torch.no_grad():
        a = show.last_block_attention(vit, x.clamp(0, 1).expand(-1, 3, -1, -1))["attn"][0, :, 0]
    a = a[:, 1 + vit.num_register_tokens:].double().numpy()  # (nh, 16)
    assert shares[0] == pytest.approx(float(((a * f).sum(1) / a.sum(1)).mean()), abs=1e-6)
    assert fractions[0] == pytest.approx(f.mean(), abs=1e-6)
    # compare lists each show.py run's mean with its CI, as its tissue_attention.json says
    show.run_show(show.get_args(["--image", str(archive), "--backbone", "random", "--size", "28",
                                 "--out", str(tmp_path / "fig28")]))
    result = metrics.main(["compare", str(tmp_path / "fig"), str(tmp_path / "fig28"), "--out",
                           str(tmp_path / "cmp")])
    other = json.loads((tmp_path / "fig28" / "tissue_attention.json").read_text())
    assert result["tissue_attention"] == {str(tmp_path / "fig"): summary,
                                          str(tmp_path / "fig28"): other}
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"| {summary['mean']:.3f} | {summary['ci'][0]:.3f}-{summary['ci'][1]:.3f} |" in table


def test_show_bad_input_is_one_line_and_nonzero_exit(tmp_path):
    for argv, code, says in [([], 2, "--image"), (["--image", "gone.dcm"], 1, "gone.dcm")]:
        r = inproc("show.py", *argv)
        assert r.returncode == code and r.stderr.strip().count("\n") == 0 and says in r.stderr
        assert "Traceback" not in r.stderr


def test_backbone_random_ignores_saved_runs(saved_run):
    net, line = model.load_backbone("")
    assert "runs/b/backbone.pth" in line and torch.equal(net.pos_embed, saved_run.pos_embed)
    net, line = model.load_backbone("random", seed=3)
    torch.manual_seed(3)
    assert "--backbone random" in line
    assert torch.equal(net.pos_embed, model.build("tiny").pos_embed)
