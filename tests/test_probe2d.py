"""probe.py on MammoDINO's five 2-D benchmarks, end to end on phantoms in each download's layout:
every supported task runs, metrics.json equals scikit-learn's recomputation from predictions.csv,
the counts add up, a breast's score is the mean of its images', the embedding cache serves a second
task, no patient is in two splits, compare pairs 2-D runs, and bad input is one line."""
import csv
import json
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

import cohorts
import data
import metrics
import phantoms
import probe
import utils

SIZE = (128, 96)  # rows, columns of the phantom images
PATIENTS = {"vindr": 25, "rsna": 24, "cbis-ddsm": 24, "cmmd": 30, "cdd-cesm": 25}
FAST = ["--backbone", "random", "--arch", "tiny", "--size", "56", "--trials", "2", "--epochs", "4",
        "--n-boot", "50", "--workers", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """dataset -> (root, {task: run folder}): every task each phantom's labels support, run once."""
    base, out = tmp_path_factory.mktemp("probe2d"), {}
    for dataset in phantoms.DATASETS_2D:
        root = phantoms.write_2d_archive(base / dataset, dataset, PATIENTS[dataset], size=SIZE)
        out[dataset] = (root, {})
        for task in cohorts.TASKS[dataset]:
            folder = base / "runs" / f"{dataset}-{task}"
            probe.main(["--data", str(root), "--task", task, "--out", str(folder), "--cache",
                        str(base / "cache")] + FAST)
            out[dataset][1][task] = folder
    return out


def read_predictions(folder):
    with open(folder / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("dataset", phantoms.DATASETS_2D)
def test_every_task_equals_sklearn_from_predictions_and_counts_add_up(runs, dataset):
    root, folders = runs[dataset]
    assert set(folders) == set(cohorts.TASKS[dataset])  # the layout was detected from the tables
    for task, folder in folders.items():
        report = json.loads((folder / "metrics.json").read_text())
        rows = read_predictions(folder)
        classes = report["classes"]
        assert report["dataset"] == dataset and report["task"] == task
        assert report["label_rule"] == cohorts.label_rule(dataset, task)
        assert list(rows[0])[:len(report["id_columns"]) + 2] == report["id_columns"] + [
            "patient", "label"]
        y = np.array([classes.index(r["label"]) for r in rows])
        c = report["counts"]
        assert c["images"] == c["scored_images"] + sum(c["excluded"].values()) + \
            sum(c["skipped"].values())
        assert c["scored_units"] == sum(report["units"].values()) and \
            report["units"]["test"] == len(rows)
        if len(classes) == 2:
            prob = np.array([float(r["prob"]) for r in rows])
            assert report["auroc"] == pytest.approx(skm.roc_auc_score(y, prob), abs=1e-9)
            assert (folder / "roc.png").exists() and len(report["auroc_ci"]) == 2
            continue
        assert all(len(report[f"{k}_ci"]) == 2 for k in ("accuracy", "macro_f1", "weighted_f1"))
        prob = np.array([[float(r[f"prob_{k}"]) for k in classes] for r in rows])
        pred = prob.argmax(1)
        assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-9)
        for avg in ("macro", "weighted"):
            want = skm.f1_score(y, pred, average=avg, labels=np.unique(np.r_[y, pred]))
            assert report[f"{avg}_f1"] == pytest.approx(want, abs=1e-9), (task, avg)
        assert report["confusion"] == skm.confusion_matrix(y, pred,
                                                           labels=range(len(classes))).tolist()
        assert (folder / "confusion.png").exists()


def test_a_breast_scores_the_mean_of_its_images_recomputed_from_the_head(runs):
    """RSNA cancer per breast: the saved head on the cached features of each image, standardised,
    sigmoid, averaged over the breast's images = predictions.csv's prob of its prediction_id."""
    root, folders = runs["rsna"]
    folder = folders["cancer"]
    args = json.loads((folder / "args.json").read_text())
    head = torch.load(folder / "head.pt", weights_only=True)
    cache = args["embeddings"]["cache"]
    linear = torch.nn.Linear(len(head["feature_mean"]), 1)
    linear.load_state_dict(head["head"])
    images = {}
    with open(root / "train.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            path = root / "train_images" / r["patient_id"] / f"{r['image_id']}.dcm"
            images.setdefault(f"{r['patient_id']}_{r['laterality']}", []).append(path)
    rows = read_predictions(folder)
    assert len(rows) > 5
    for r in rows:
        probs = []
        for path in images[r["prediction_id"]]:
            stats = torch.load(probe.image_file(cache, path), weights_only=True)
            x = torch.cat([stats[s] for s in probe.FEATURES[head["features"]]])
            z = (x - head["feature_mean"]) / head["feature_std"]
            probs.append(torch.sigmoid(linear(z.float())).item())
        assert len(probs) >= 2 and float(r["prob"]) == pytest.approx(np.mean(probs), abs=1e-6)


def test_the_second_task_embeds_nothing(runs):
    for dataset, (_, folders) in runs.items():
        infos = [json.loads((f / "args.json").read_text())["embeddings"] for f in folders.values()]
        assert infos[0]["embedded"] > 0 and infos[0]["skipped"] == 0, dataset
        assert all(i["embedded"] == 0 and i["reused"] > 0 for i in infos[1:]), dataset


@pytest.mark.parametrize("dataset", ["vindr", "rsna", "cmmd"])
def test_no_patient_in_two_splits_and_official_splits_kept(runs, dataset):
    root, _ = runs[dataset]
    args = probe.get_args(["--data", str(root), "--task", "cancer"])
    parts, counts, excluded, rule = probe.read_2d(args, dataset, root)
    patients = {s: {u["patient"] for u in units} for s, units in parts.items()}
    assert all(patients[s] for s in parts)
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    per_patient = sum(len(u.get("images", [1])) for u in parts["train"]) / len(patients["train"])
    assert per_patient >= 2  # several images per patient, all on one side of every split
    if dataset == "vindr":  # the split column: its test rows are the test split
        with open(root / "breast-level_annotations.csv", newline="") as fh:
            official = {r["image_id"] for r in csv.DictReader(fh) if r["split"] == "test"}
        assert {u["image_id"] for u in parts["test"]} == official


def test_unreadable_and_missing_images_are_skipped_and_counted(runs, tmp_path):
    root, _ = runs["vindr"]
    copy = tmp_path / "vindr"
    phantoms.write_2d_archive(copy, "vindr", PATIENTS["vindr"], size=SIZE)
    images = sorted((copy / "images").rglob("*.dicom"))
    images[0].unlink()  # missing
    images[1].write_bytes(b"not a dicom file")  # unreadable
    out = tmp_path / "run"
    report = probe.main(["--data", str(copy), "--task", "density", "--out", str(out), "--cache",
                         str(tmp_path / "cache")] + FAST)
    c = report["counts"]
    assert c["skipped"] == {"image file missing": 1, "unreadable image": 1}
    assert c["images"] == c["rows_read"] == c["scored_images"] + 2


def test_compare_pairs_2d_runs_by_task_with_delong_mcnemar_and_bh(runs, tmp_path):
    root, folders = runs["vindr"]
    again = {}
    for task in ("cancer", "density"):
        again[task] = tmp_path / task
        probe.main(["--data", str(root), "--task", task, "--out", str(again[task]), "--cache",
                    str(tmp_path / "cache"), "--features", "patch-all"] + FAST)
    result = metrics.main(["compare", str(folders["cancer"]), str(again["cancer"]),
                           str(folders["density"]), str(again["density"]), "--out",
                           str(tmp_path / "cmp")])
    delong, mcnemar = result["tests"]
    a, b = read_predictions(folders["cancer"]), read_predictions(again["cancer"])
    y = [int(r["label"]) for r in a]
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b]
    want = metrics.delong_test(y, [float(r["prob"]) for r in a], [float(r["prob"]) for r in b])
    assert (delong["metric"], delong["p"]) == ("auroc", pytest.approx(want[2], abs=1e-12))
    a, b = read_predictions(folders["density"]), read_predictions(again["density"])
    right = [np.array([max("ABCD", key=lambda k: float(r[f"prob_{k}"])) == r["label"] for r in x])
             for x in (a, b)]
    assert mcnemar["p"] == metrics.mcnemar(*right)
    assert [t["p_bh"] for t in result["tests"]] == pytest.approx(
        metrics.benjamini_hochberg([delong["p"], mcnemar["p"]]).tolist(), abs=1e-12)
    assert result["task"] == "vindr cancer per image, vindr density per image"
    # radar.png: each run's headline value (metrics.json: auroc, macro_f1) on its task's axis
    img = np.asarray(Image.open(tmp_path / "cmp" / "radar.png").convert("RGB"))
    cx, cy = result["radar"]["centre"]
    runs_by_features = {"patch-mean-std": (folders["cancer"], folders["density"]),
                        "patch-all": (again["cancer"], again["density"])}
    dots = []
    for m, features in enumerate(runs_by_features):  # polygons in the order runs were given
        for k, (folder, metric) in enumerate(zip(runs_by_features[features],
                                                 ("auroc", "macro_f1"))):
            v = json.loads((folder / "metrics.json").read_text())[metric]
            theta = 2 * np.pi * k / 2  # axis k of 2, clockwise from 12 o'clock
            dots.append((cx + utils.RADAR_RADIUS * v * np.sin(theta),
                         cy - utils.RADAR_RADIUS * v * np.cos(theta), utils.CURVE_COLOURS[m]))
    for x, y, colour in dots:
        if all(np.hypot(x - a, y - b) > 9 for a, b, c in dots if c != colour):  # not covered
            assert img[round(y), round(x)].tolist() == list(colour)
    assert "| vindr density per image | density | " in (tmp_path / "cmp" / "compare.md").read_text()
    with pytest.raises(ValueError, match="one run only of vindr density per image"):
        metrics.main(["compare", str(folders["cancer"]), str(again["cancer"]),
                      str(folders["density"]), "--out", str(tmp_path / "cmp2")])


def cli_error(monkeypatch, capsys, argv):
    """probe.py run as a script: -> its one-line message (SystemExit, no traceback)."""
    monkeypatch.setattr(sys, "argv", ["probe.py"] + argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(probe.__file__, run_name="__main__")
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def test_bad_input_is_one_line(runs, tmp_path, monkeypatch, capsys):
    root, _ = runs["cmmd"]
    assert "cmmd has the tasks cancer, mass, calcification, lesion-type" in cli_error(
        monkeypatch, capsys, ["--data", str(root), "--task", "density"])
    # embed needs no task: the default (density) does not stop it on cmmd
    info = probe.main(["embed", "--data", str(root), "--cache", str(tmp_path / "c"), "--workers",
                       "0"] + FAST[:6])
    assert info["embedded"] > 0 and info["skipped"] == 0
    bad = tmp_path / "cmmd"
    phantoms.write_2d_archive(bad, "cmmd", 12, size=(64, 48))
    (bad / "CMMD_clinicaldata_revision.xlsx").write_text("ID1,LeftRight\n")
    assert "CMMD_clinicaldata_revision.xlsx" in cli_error(
        monkeypatch, capsys, ["--data", str(bad), "--task", "cancer"] + FAST)
    rsna = tmp_path / "rsna"
    phantoms.write_2d_archive(rsna, "rsna", 8, size=(64, 48))
    text = (rsna / "train.csv").read_text().splitlines()
    header = text[0].split(",")
    cut = header.index("BIRADS")
    drop = [",".join(v for i, v in enumerate(line.split(",")) if i != cut) for line in text]
    (rsna / "train.csv").write_text("\n".join(drop) + "\n")
    assert "train.csv: missing column(s) BIRADS" in cli_error(
        monkeypatch, capsys, ["--data", str(rsna), "--task", "cancer"] + FAST)
    (rsna / "train.csv").write_text(text[0] + "\n")
    assert "train.csv: no rows below the header" in cli_error(
        monkeypatch, capsys, ["--data", str(rsna), "--task", "cancer"] + FAST)
    vindr = tmp_path / "vindr"
    phantoms.write_2d_archive(vindr, "vindr", 10, size=(64, 48))
    table = vindr / "breast-level_annotations.csv"
    table.write_text(table.read_text().replace("BI-RADS 1", "BI-RADS 6", 1))
    assert "breast_birads 'BI-RADS 6' is not one of BI-RADS 1" in cli_error(
        monkeypatch, capsys, ["--data", str(vindr), "--task", "cancer"] + FAST)
    (vindr / "images").rename(vindr / "moved")
    assert "no folder 'images'" in cli_error(
        monkeypatch, capsys, ["--data", str(vindr), "--task", "cancer"] + FAST)
    assert "holds none of the known tables" in cli_error(
        monkeypatch, capsys, ["--data", str(tmp_path / "cmmd" / "CMMD"), "--task", "cancer"])


def test_class_weights_come_from_the_train_images(runs):
    """n / (C n_c) over the train split's images, as metrics.json records and the loss takes."""
    root, folders = runs["vindr"]
    report = json.loads((folders["density"] / "metrics.json").read_text())
    args = probe.get_args(["--data", str(root), "--task", "density"])
    parts, _, _, _ = probe.read_2d(args, "vindr", root)
    n = np.bincount([u["label"] for u in parts["train"]], minlength=4)
    assert n.min() > 0 and report["train_images"] == n.sum()
    assert report["class_weights"] == pytest.approx((n.sum() / (4 * n)).tolist(), rel=1e-6)


def test_the_backbones_preprocessing_is_applied_unless_told_otherwise(tmp_path, monkeypatch,
                                                                     capsys):
    """A backbone whose backbone.json says clahe (pretrain.py --recipe mammodino) is embedded with
    CLAHE by default: the cached features equal the backbone on data.breast_view(..., clahe=True);
    --preprocess none embeds without, into other cache entries, and says the mismatch once."""
    root = phantoms.write_2d_archive(tmp_path / "cdd", "cdd-cesm", 10, size=(64, 48))
    (tmp_path / "run").mkdir()
    torch.manual_seed(1)
    net = probe.model.build("tiny").eval()
    probe.utils.save_checkpoint(tmp_path / "run" / "backbone.pth", net.state_dict())
    (tmp_path / "run" / "backbone.json").write_text('{"preprocess": "clahe"}\n')
    argv = ["--data", str(root), "--task", "cancer", "--backbone", str(tmp_path / "run" /
            "backbone.pth"), "--cache", str(tmp_path / "cache")] + FAST[4:]
    shapes, clahe = [], data.preprocess.clahe  # CLAHE's inputs: whole images, before the cut
    monkeypatch.setattr(data.preprocess, "clahe", lambda x: shapes.append(x.shape) or clahe(x))
    probe.main(argv + ["--out", str(tmp_path / "a")])
    monkeypatch.setattr(data.preprocess, "clahe", clahe)
    images = sorted((root / "Low energy images of CDD-CESM").iterdir())
    assert len(shapes) == json.loads((tmp_path / "a" / "args.json").read_text())["embeddings"][
        "embedded"] == len(images) and set(shapes) == {(64, 48)}
    probe.main(argv + ["--out", str(tmp_path / "b"), "--preprocess", "none"])
    said = capsys.readouterr().out
    infos = [json.loads((tmp_path / r / "args.json").read_text())["embeddings"] for r in "ab"]
    assert [i["preprocess"] for i in infos] == ["clahe", "none"]
    assert infos[0]["cache"] != infos[1]["cache"] and infos[1]["embedded"] > 0
    assert said.count("--preprocess none: the backbone was trained with clahe") == 1
    image = images[0]
    for info, clahe in zip(infos, (True, False)):
        x = data.breast_view(image, 56, clahe=clahe)[None]  # (1, 3, 56, 56)
        with torch.no_grad():
            out = net.forward_features(x)
        want = out["x_norm_patchtokens"][0].mean(0)
        got = torch.load(probe.image_file(info["cache"], image), weights_only=True)["patch_mean"]
        assert torch.allclose(got, want, atol=1e-5), clahe
