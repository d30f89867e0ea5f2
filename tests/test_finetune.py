"""probe.py --finetune-blocks: which parameters learn, their learning rates (pretrain.py's
layer-decay rule and the warm-up + cosine schedule, computed here by hand), an exact resume after a
kill, the frozen path untouched at 0, one-line bad flags, the same images as the frozen path, and
the DBT density reading (slices per view, an exam's mean). Tiny ViT, CPU, small phantoms."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import data
import metrics
import model
import phantoms
import probe
import utils
from conftest import dies_on_call, inproc

CPU = torch.device("cpu")
FAST = ["--backbone", "random", "--arch", "tiny", "--size", "56", "--n-boot", "50", "--workers",
        "0", "--batch-size", "16"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with utils.one_thread():  # tiny tensors: one thread is faster, and the same in every run
        yield


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A VinDr-layout phantom: 25 patients, 100 images of 128 x 96."""
    return phantoms.write_2d_archive(tmp_path_factory.mktemp("ft") / "vindr", "vindr", 25,
                                     size=(128, 96))


def ft_argv(archive, out, *extra):
    return ["--task", "cancer", "--data", str(archive), "--out", str(out), *FAST,
            "--finetune-blocks", "2", "--epochs", "4", *extra]


@pytest.fixture(scope="module")
def full_run(archive, tmp_path_factory):
    """4 uninterrupted epochs with the last 2 blocks trainable."""
    out = tmp_path_factory.mktemp("full") / "run"
    with utils.one_thread():
        probe.main(ft_argv(archive, out))
    return out


def images(n, size=56, seed=0):
    """n random grey images as fine-tuning holds them, (n, 1, 1, size, size) float16, labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 1, size, size, generator=g).half()
    return x, torch.arange(n) % 2, torch.arange(n)


def built(n_blocks, *extra):
    args = probe.get_args(FAST + ["--finetune-blocks", str(n_blocks), *extra])
    torch.manual_seed(0)
    x, y, rows = images(6)
    net, opt, g, *_ = probe.build_finetuned(args, model.build("tiny"), 1, CPU)
    return args, net, opt, g, (x, y, rows)


# 1. -------------------------------------------------------------------------------------------
def test_only_the_last_n_blocks_the_final_norm_and_the_head_get_gradients():
    args, net, opt, g, (x, y, rows) = built(2)
    depth = net.backbone.n_blocks
    learn = tuple(f"backbone.blocks.{i}." for i in range(depth - 2, depth))
    learn += ("backbone.norm.", "head.")  # by name, from the depth: not from model.set_trainable
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _, step = probe.ft_epoch(net, opt, x, y, rows, g, 0, lambda s: 1e-3, args, CPU)
    assert step == 1  # one step: 6 images, batch 16
    named = dict(net.named_parameters())
    assert {"backbone.blocks.3.mlp.fc2.weight", "backbone.blocks.1.attn.qkv.weight"} <= set(named)
    for name, p in named.items():
        want = name.startswith(learn)
        assert p.requires_grad == want and (p.grad is not None) == want, name
        assert torch.equal(p, before[name]) != want, name  # the frozen ones did not move
    assert sum(name.startswith(learn) for name in named) == 2 * 14 + 4  # 14 tensors a block
    # -1: every parameter gets a gradient but the mask token (no masks when fine-tuning)
    args, net, opt, g, (x, y, rows) = built(-1)
    probe.ft_epoch(net, opt, x, y, rows, g, 0, lambda s: 1e-3, args, CPU)
    assert [n for n, p in net.named_parameters() if p.grad is None] == ["backbone.mask_token"]


def test_grad_checkpoint_changes_no_number():
    states = []
    for extra in ([], ["--grad-checkpoint"]):
        args, net, opt, g, (x, y, rows) = built(2, *extra)
        assert net.backbone.grad_checkpointing == bool(extra)
        probe.ft_epoch(net, opt, x, y, rows, g, 0, lambda s: 1e-3, args, CPU)
        states.append(net.state_dict())
    assert all(torch.equal(states[0][k], v) for k, v in states[1].items())


# 2. -------------------------------------------------------------------------------------------
def hand_lr(name, depth, base, decay):
    """pretrain.py's rule, by hand: block i -> decay^(depth - i), embeddings decay^(depth + 1)
    (patch_embed x 0.2), the final norm and the head 1."""
    if name.startswith("backbone.blocks."):
        return base * decay ** (depth - int(name.split(".")[2]))
    if name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.mask_token")):
        return base * decay ** (depth + 1)
    if name.startswith("backbone.patch_embed."):
        return base * decay ** (depth + 1) * 0.2
    assert name.startswith(("backbone.norm.", "head.")), name
    return base


def test_learning_rates_are_the_layer_decay_rule_times_the_schedule():
    args, net, opt, g, (x, y, rows) = built(-1, "--lr", "0.01", "--layer-decay", "0.5",
                                            "--batch-size", "2")
    total, warmup = 12, 4  # 4 epochs of 3 steps, one of warm-up
    depth = net.backbone.n_blocks

    def lr_at(s):
        return args.lr * probe.ft_lr(s, total, warmup)
    # after epoch 1 the last step was step 2: linear warm-up, 3/4; after epoch 2 step 5: cosine
    for epoch, factor in ((1, 3 / 4), (2, 0.5 * (1 + math.cos(math.pi * (5 - 4) / (12 - 4))))):
        _, step = probe.ft_epoch(net, opt, x, y, rows, g, 3 * (epoch - 1), lr_at, args, CPU)
        assert step == 3 * epoch
        group = {id(p): grp for grp in opt.param_groups for p in grp["params"]}
        for name, p in net.named_parameters():
            assert group[id(p)]["lr"] == pytest.approx(hand_lr(name, depth, 0.01 * factor, 0.5),
                                                       rel=1e-12), name
            plain = name.endswith(".bias") or ".norm" in name or "gamma" in name
            assert group[id(p)]["weight_decay"] == (0.0 if plain else 0.05), name
    assert sum(len(grp["params"]) for grp in opt.param_groups) == len(list(net.parameters()))
    # frozen parameters are in no group
    _, net, opt, _, _ = built(2)
    grouped = {id(p) for grp in opt.param_groups for p in grp["params"]}
    assert grouped == {id(p) for n, p in net.named_parameters()
                       if n.startswith(("backbone.blocks.2.", "backbone.blocks.3.",
                                        "backbone.norm.", "head."))}


def test_the_run_logs_the_scheduled_lr_of_each_epoch(full_run):
    report = json.loads((full_run / "metrics.json").read_text())
    per_epoch = math.ceil(report["train_images"] / 16)
    total = 4 * per_epoch
    records = [r for r in map(json.loads, open(full_run / "metrics.jsonl"))]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for r in records:
        s = r["epoch"] * per_epoch - 1  # the epoch's last step; the first epoch warms up
        hand = ((s + 1) / per_epoch if s < per_epoch else
                0.5 * (1 + math.cos(math.pi * (s - per_epoch) / (total - per_epoch))))
        assert r["lr"] == pytest.approx(1e-3 * hand, rel=1e-12)


# 3. -------------------------------------------------------------------------------------------
def test_a_killed_run_resumes_exactly(archive, full_run, tmp_path, monkeypatch):
    killed, real = tmp_path / "killed", probe.ft_epoch
    monkeypatch.setattr(probe, "ft_epoch", dies_on_call(real, 3))  # ckpt.pt then holds epoch 2
    with pytest.raises(KeyboardInterrupt):
        probe.main(ft_argv(archive, killed))
    monkeypatch.setattr(probe, "ft_epoch", real)
    ckpt = torch.load(killed / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not (killed / "metrics.json").exists()
    assert {"model", "optimizer", "rng", "early_stop", "step", "args"} <= set(ckpt)
    with pytest.raises(ValueError, match=r"already holds a run \(ckpt.pt\); use --resume auto"):
        probe.main(ft_argv(archive, killed))  # a fresh start never lands on it
    with pytest.raises(ValueError, match="--lr 0.001 in the checkpoint, 0.002 now"):
        probe.main(ft_argv(archive, killed, "--resume", "auto", "--lr", "0.002"))
    # other backbone weights (the same file rewritten): refused before a single image is decoded
    with monkeypatch.context() as m:
        m.setattr(probe, "cache_key", lambda *a, **k: "other weights")
        m.setattr(data.ViewReader, "__getitem__", lambda *a: pytest.fail("decoded first"))
        with pytest.raises(ValueError, match="ckpt.pt: fine-tuned from other backbone weights"):
            probe.main(ft_argv(archive, killed, "--resume", "auto"))
    probe.main(ft_argv(archive, killed, "--resume", "auto"))
    a, b = (torch.load(f / "head.pt", weights_only=True) for f in (full_run, killed))
    for part in ("head", "backbone"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.equal(a["feature_mean"], b["feature_mean"])
    assert (full_run / "metrics.json").read_text() == (killed / "metrics.json").read_text()
    assert (full_run / "predictions.csv").read_text() == (killed / "predictions.csv").read_text()
    curves = [[{k: v for k, v in r.items() if k != "seconds"} for r in map(json.loads, open(f))]
              for f in (full_run / "metrics.jsonl", killed / "metrics.jsonl")]
    assert curves[0] == curves[1] and len(curves[0]) == 4  # epochs 3 and 4 logged once
    # the frozen blocks are the initial random ViT's, the trained ones moved
    initial = model.load_backbone("random", "tiny")[0].state_dict()
    for k, v in b["backbone"].items():
        assert torch.equal(v, initial[k]) == (not k.startswith(("blocks.2.", "blocks.3.",
                                                                  "norm."))), k


def test_a_bad_checkpoint_is_one_line(archive, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_text("not a checkpoint")
    run = inproc("probe.py", *ft_argv(archive, tmp_path / "run", "--resume", "auto"))
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert "ckpt.pt: not a readable PyTorch checkpoint" in run.stderr


# 4. -------------------------------------------------------------------------------------------
def test_zero_blocks_is_the_frozen_cached_path(archive, full_run, tmp_path, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("the fine-tuning path ran")
    monkeypatch.setattr(probe, "ft_inputs", never)
    monkeypatch.setattr(probe, "fine_tune", never)
    optimised, nets, load = [], [], model.load_backbone

    class Recording(torch.optim.AdamW):
        def __init__(self, params, *a, **kw):
            params = list(params)
            optimised.extend(params)
            super().__init__(params, *a, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr(model, "load_backbone", lambda *a: nets.append(load(*a)) or nets[-1])
    cache = tmp_path / "cache"
    for out in ("a", "b"):
        probe.main(["--task", "cancer", "--data", str(archive), "--out", str(tmp_path / out),
                    "--cache", str(cache), "--finetune-blocks", "0", "--trials", "2",
                    "--epochs", "3", *FAST])
    info = [json.loads((tmp_path / r / "args.json").read_text())["embeddings"] for r in "ab"]
    assert info[0]["embedded"] == 100 and len(list(cache.rglob("*.pt"))) == 100
    assert info[1]["embedded"] == 0 and info[1]["reused"] == 100  # the cache serves the second
    vit = nets[0][0]
    assert optimised and not {id(p) for p in optimised} & {id(p) for p in vit.parameters()}
    initial = load("random", "tiny")[0].state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in vit.state_dict().items())
    assert not (tmp_path / "a" / "ckpt.pt").exists()
    assert "backbone" not in torch.load(tmp_path / "a" / "head.pt", weights_only=True)
    assert "finetune" not in json.loads((tmp_path / "a" / "metrics.json").read_text())
    # metrics.py compare pairs the frozen and the fine-tuned run on their common test images
    result = metrics.main(["compare", str(tmp_path / "a"), str(full_run), "--out",
                           str(tmp_path / "cmp")])
    assert result["n_common"] == 20 and [t["metric"] for t in result["tests"]] == ["auroc"]
    tuned = json.loads((full_run / "metrics.json").read_text())
    assert tuned["finetune"]["blocks"] == 2 and tuned["finetune"]["epochs_run"] == 4
    assert 1 <= tuned["finetune"]["best_epoch"] == tuned["best_epoch"] <= 4


# 5. -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--finetune-blocks", "-2"], "argument --finetune-blocks: -2 is outside [-1, inf]"),
    (["--finetune-blocks", "5", "--arch", "tiny"], "5 is more than the backbone's 4 blocks"),
    (["--finetune-blocks", "13", "--arch", "vitb14"], "13 is more than the backbone's 12 blocks"),
    (["--resume", "auto"], "argument --resume: only fine-tuning (--finetune-blocks) keeps"),
    (["--finetune-blocks", "1", "--task", "risk"], "the risk head is frozen only"),
    (["embed", "--finetune-blocks", "1"], "embed fills the frozen path's cache only"),
    (["--finetune-blocks", "1", "--backbone", "densenet121"], "DenseNet-121 baseline"),
    (["--finetune-blocks", "1", "--features", "cls-mean-std"], "one image has no CLS std"),
    (["--lr", "0.01"], "argument --lr: only fine-tuning (--finetune-blocks) uses it"),
    (["--grad-checkpoint"], "argument --grad-checkpoint: only fine-tuning")])
def test_bad_flags_are_one_line_and_exit_2(argv, says):
    run = inproc("probe.py", *argv)
    assert run.returncode == 2 and says in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_the_depth_of_a_backbone_file_is_read_for_the_check(saved_run):
    run = inproc("probe.py", "--finetune-blocks", "5")  # the newest runs/*/backbone.pth: 4 blocks
    assert run.returncode == 2 and "5 is more than the backbone's 4 blocks" in run.stderr
    assert probe.get_args(["--finetune-blocks", "-1"]).finetune_blocks == -1
    assert probe.get_args(["--finetune-blocks", "4"]).finetune_blocks == 4


# the images ---------------------------------------------------------------------------------------
def classifier(head_pt, out):
    """head.pt's fine-tuned network: its backbone, standardisation and head."""
    h = torch.load(head_pt, weights_only=True)
    vit = model.load_pretrained(model.build("tiny"), h["backbone"])
    net = model.Classifier(vit, probe.FEATURES[h["features"]], out)
    net.norm.running_mean, net.norm.running_var = h["feature_mean"], h["feature_std"] ** 2
    net.head.load_state_dict(h["head"])
    return net.eval()


def test_fine_tuning_sees_the_frozen_paths_images(archive, full_run):
    """A test image's probability, recomputed from head.pt on data.breast_view (the frozen path's
    image) = predictions.csv's, to the float16 the images are held in."""
    net = classifier(full_run / "head.pt", 1)
    with open(full_run / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:4]
    for r in rows:
        x = data.breast_view(archive / "images" / r["study_id"] / f"{r['image_id']}.dicom", 56)
        with torch.no_grad():
            p = torch.sigmoid(net(x[:1][None])).item()
        assert p == pytest.approx(float(r["prob"]), abs=2e-3)


def test_dbt_density_trains_on_slices_and_scores_an_exams_mean(tmp_path):
    root = phantoms.synthetic_archive(tmp_path / "dbt", patients=20, seed=5, shape=(4, 64, 48))
    out = tmp_path / "run"
    report = probe.main(["--task", "density", "--data", str(root / "exams.csv"), "--out", str(out),
                         "--size", "28", "--finetune-blocks", "1", "--epochs", "2",
                         "--batch-size", "4", "--backbone", "random", "--arch", "tiny",
                         "--n-boot", "50", "--workers", "0"])
    assert report["finetune"]["images_per_row"] == [4, probe.FT_SLICES] and report["n_train"] > 4
    exams = {r["exam"]: r for r in utils.read_csv(root / "exams.csv")}
    path = root / exams[next(iter(exams))]["LCC"]
    # the slices at 1/4, 1/2 and 3/4 of 4, shown as the frozen path shows them
    item = data.VolumeReader([path])[0][1]
    shown = next(probe.display_chunks(item, CPU, 4))[[1, 2, 3]]  # (3, 64, 48)
    want = torch.nn.functional.interpolate(shown[:, None], (28, 28), mode="bilinear",
                                           antialias=True)[:, 0].clamp(0, 1)
    assert torch.allclose(probe.dbt_slices(path, 28), want, atol=1e-6)
    # an exam's probabilities: the mean over its 4 views x 3 slices
    net = classifier(out / "head.pt", 4)
    for r in utils.read_csv(out / "predictions.csv")[:2]:
        x = torch.cat([probe.dbt_slices(root / exams[r["exam"]][v], 28) for v in
                       ("RCC", "LCC", "RMLO", "LMLO")])[:, None]  # (12, 1, 28, 28)
        with torch.no_grad():
            p = torch.softmax(net(x), 1).mean(0)
        assert np.allclose(p.numpy(), [float(r[f"p_{c}"]) for c in "abcd"], atol=2e-3)


def test_a_dbt_step_takes_one_slice_of_each_view_of_each_exam(monkeypatch):
    """Every image its own grey level: a batch of 2 exams holds, per exam, one of the 3 slices of
    each of its 4 views, in view order, each with the exam's label."""
    args = probe.get_args(FAST + ["--task", "density", "--finetune-blocks", "1"])
    torch.manual_seed(0)
    net, opt, g, *_ = probe.build_finetuned(args, model.build("tiny"), 4, CPU)
    level = torch.arange(24.0).reshape(2, 4, 3, 1, 1) / 100  # (exam, view, slice)
    x, y = level.expand(2, 4, 3, 56, 56).half(), torch.tensor([2, 0])
    seen, targets = [], []
    monkeypatch.setattr(probe, "augment", lambda imgs, g: seen.append(imgs) or imgs)
    monkeypatch.setattr(probe, "head_loss", lambda logits, t, w: targets.append(t) or logits.mean())
    probe.ft_epoch(net, opt, x, y, torch.arange(2), g, 0, lambda s: 1e-3, args, CPU)
    codes = (seen[0][:, 0, 0, 0] * 100).round().long()  # (8,): 12 exam + 3 view + slice
    exam, view = codes // 12, codes % 12 // 3
    assert view.tolist() == [0, 1, 2, 3] * 2 and exam.tolist() in ([0] * 4 + [1] * 4,
                                                                     [1] * 4 + [0] * 4)
    assert targets[0].tolist() == y[exam].tolist()
