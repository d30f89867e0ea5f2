"""pretrain.py: losses, head and schedules against hand computations and the `dinov2` package;
training behaviour."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics
import model
import phantoms
import pretrain
from conftest import dies_on_call


def ce(t, s, temp=0.1):
    """Independent cross-entropy per row in float64: -sum_k t_k log softmax(s/temp)_k."""
    s = s.double() / temp
    log_p = s - torch.logsumexp(s, dim=-1, keepdim=True)
    return -(t.double() * log_p).sum(-1)


def test_dino_loss_matches_hand_and_reference():
    g = torch.Generator().manual_seed(0)
    S = [torch.randn(6, 32, generator=g) for _ in range(3)]
    T = [torch.randn(6, 32, generator=g).softmax(-1) for _ in range(2)]
    hand = sum(ce(t, s).mean() for s in S for t in T)
    ours = pretrain.dino_loss([s.double() for s in S], [t.double() for t in T])
    assert abs(ours.item() - hand.item()) < 1e-6
    # uniform student and teacher: every term is log K
    uniform = pretrain.dino_loss([torch.zeros(4, 64)], [torch.full((4, 64), 1 / 64)])
    assert abs(uniform.item() - math.log(64)) < 1e-6
    import dinov2.loss as loss  # oracle: required, never skipped
    assert abs(loss.DINOLoss(32)(S, T).item() - pretrain.dino_loss(S, T).item()) < 1e-6


def test_ibot_loss_matches_hand_and_reference():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(4, 9, generator=g) < 0.4
    masks[0] = False  # an unmasked image counts in the denominator only
    masks[1, 0] = True
    M = int(masks.sum())
    s, t = torch.randn(M, 16, generator=g), torch.randn(M, 16, generator=g).softmax(-1)
    w = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    image_of = masks.nonzero()[:, 0]
    per_patch = ce(t, s)
    hand = sum(per_patch[image_of == i].mean() for i in range(4) if masks[i].any()) / 4
    ours = pretrain.ibot_loss(s.double(), t.double(), w.double(), 4)
    assert abs(ours.item() - hand.item()) < 1e-6
    ours = pretrain.ibot_loss(s, t, w, n_images=4)
    import dinov2.loss as loss  # oracle: required, never skipped
    ref = loss.iBOTPatchLoss(16).forward_masked(s, t, student_masks_flat=masks, masks_weight=w)
    assert abs(ref.item() - ours.item()) < 1e-6


def test_koleo_matches_hand_and_reference_and_guards():
    x = torch.randn(10, 24, generator=torch.Generator().manual_seed(2))
    z = F.normalize(x.double(), dim=-1)
    d = torch.cdist(z, z) + torch.eye(10, dtype=torch.float64) * 9  # exclude self
    hand = -torch.log(d.min(1).values).mean()
    assert abs(pretrain.koleo_loss(x.double()).item() - hand.item()) < 1e-6
    import dinov2.loss as loss  # oracle: required, never skipped
    assert abs(loss.KoLeoLoss()(x).item() - pretrain.koleo_loss(x).item()) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        pretrain.koleo_loss(x[:1])
    dup = torch.cat([x[:3], x[:1]])  # a duplicated image: finite loss from the distinct pairs only
    assert torch.isfinite(pretrain.koleo_loss(dup)) and pretrain.koleo_loss(dup) < 5


def test_sinkhorn_rows_sum_to_one_columns_balanced_and_reference():
    # |cos| <= 1, like the head's
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(3)) * 0.3
    Q = pretrain.sinkhorn_knopp(logits, 0.07)
    assert torch.allclose(Q.sum(1), torch.ones(64), atol=1e-5)
    balanced = pretrain.sinkhorn_knopp(logits, 0.07, n_iterations=200).sum(0)
    assert (balanced / (64 / 16) - 1).abs().max() < 1e-3  # every prototype gets B/K at convergence
    import dinov2.loss as loss  # oracle: required, never skipped
    ref = loss.DINOLoss(16).sinkhorn_knopp_teacher(logits, 0.07)
    assert (ref - Q).abs().max() < 1e-6


def test_centering_matches_reference_over_two_steps():
    import dinov2.loss as loss  # oracle: required, never skipped
    ref, center = loss.DINOLoss(8), torch.zeros(1, 8)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        logits = torch.randn(6, 8, generator=g) * 3
        ours = pretrain.softmax_center(logits, center, 0.05)
        theirs = ref.softmax_center_teacher(logits, 0.05)
        ref.update_center(logits)
        center = pretrain.update_center(center, logits)
        assert (ours - theirs).abs().max() < 1e-6
    ref.apply_center_update()
    assert (ref.center - center).abs().max() < 1e-7


def test_center_of_bf16_logits_counts_every_row():
    """Under --amp the teacher's logits are bf16, which holds 65,713 (about dbt-dino's masked-patch
    count) only as 65,536: the row count must not take the logits' dtype."""
    # (M, K = 2), mean about 1.5
    logits = torch.linspace(1, 2, 65_713 * 2).reshape(-1, 2).to(torch.bfloat16)
    center = pretrain.update_center(torch.zeros(1, 2), logits, momentum=0.0)
    mean = logits.double().mean(0, keepdim=True)  # independent: float64 over the same bf16 values
    torch.testing.assert_close(center.double(), mean, rtol=1e-5, atol=1e-7)


def test_dino_head_keys_and_outputs_match_reference():
    torch.manual_seed(0)
    head = model.DINOHead(12, out_dim=40, hidden_dim=20, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.mul_(torch.rand(40, 1) + 0.5)  # make g matter
    x = torch.randn(5, 12)
    out = head(x)
    assert out.shape == (5, 40)
    import dinov2.layers as layers  # oracle: required, never skipped
    ref = layers.DINOHead(12, 40, hidden_dim=20, bottleneck_dim=8)
    ref.load_state_dict(head.state_dict(), strict=True)  # DINOv2 key names round-trip
    assert (ref(x) - out).abs().max() < 1e-6
    head.load_state_dict(ref.state_dict(), strict=True)


def test_cosine_schedule_formula_and_reference():
    s = pretrain.cosine_schedule(1.0, 0.1, total=20, warmup=4, start_warmup=0.2, freeze=3)
    assert len(s) == 20 and (s[:3] == 0).all()
    assert np.allclose(s[3:7], np.linspace(0.2, 1.0, 4))
    L = 20 - 4 - 3
    assert np.allclose(s[7:], [0.1 + 0.45 * (1 + math.cos(math.pi * i / L)) for i in range(L)])
    import dinov2.utils.utils as dinov2_utils  # oracle: required, never skipped
    ref = dinov2_utils.CosineScheduler(1.0, 0.1, 20, warmup_iters=4, start_warmup_value=0.2,
                                       freeze_iters=3)
    assert np.array_equal(ref.schedule, s)


def test_schedules_and_param_groups():
    args = pretrain.get_args(["--steps", "30", "--warmup", "5", "--freeze-last-layer", "3",
                              "--teacher-temp-warmup", "10", "--batch-size", "256",
                              "--teacher-temp", "0.07"])  # DINOv2's; tiny's 0.01 is constant:
    assert (pretrain.make_schedules(pretrain.get_args([]), 1)["teacher_temp"] == 0.01).all()
    sch = pretrain.make_schedules(args, world_size=1)
    assert abs(sch["lr"][5] - args.lr * 0.5) < 1e-12  # sqrt(256 / 1024) = 0.5, peak after warmup
    assert (sch["last_layer_lr"][:3] == 0).all() and sch["last_layer_lr"][3] == sch["lr"][3]
    assert sch["teacher_temp"][0] == 0.04 and np.allclose(sch["teacher_temp"][9:], 0.07)
    assert sch["momentum"][0] == 0.992 and sch["wd"][0] == pytest.approx(0.04)
    assert all(len(v) == 30 for v in sch.values())
    student = pretrain.SSLModel(model.build("tiny"), 16, 8, 4)
    groups = {id(p): g for g in pretrain.param_groups(student, 0.9) for p in g["params"]}
    named = dict(student.named_parameters())
    depth = student.backbone.n_blocks  # 4: blocks.i -> 0.9^(4 - i), embeddings 0.9^5
    lr_mult = {name: groups[id(p)]["lr_mult"] for name, p in named.items()}
    assert lr_mult["backbone.cls_token"] == pytest.approx(0.9 ** 5)
    assert lr_mult["backbone.patch_embed.proj.weight"] == pytest.approx(0.9 ** 5 * 0.2)
    assert lr_mult["backbone.blocks.1.attn.qkv.weight"] == pytest.approx(0.9 ** (depth - 1))
    assert groups[id(named["backbone.norm.weight"])]["lr_mult"] == 1.0
    assert groups[id(named["backbone.norm.weight"])]["wd_mult"] == 0.0
    assert groups[id(named["backbone.blocks.0.ls1.gamma"])]["wd_mult"] == 0.0
    assert groups[id(named["backbone.pos_embed"])]["wd_mult"] == 1.0
    assert groups[id(named["dino_head.last_layer.weight_g"])]["last_layer"]
    assert len(groups) == len(named)  # every parameter in exactly one group


def test_get_args_defaults_round_trip():
    args = pretrain.get_args([])
    assert args.preset == "tiny" and args.model == "tiny" and args.data == "synthetic"
    argv = []
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        if k == "sources":  # derived: every --data source (args.data is the first)
            continue
        if isinstance(v, bool):
            argv += [flag] if v else []
        elif isinstance(v, list):
            argv += [flag, *map(str, v)] if v else []
        else:
            argv += [flag, str(v)]
    assert vars(pretrain.get_args(argv)) == vars(args)
    big = pretrain.get_args(["--preset", "dbt-dino", "--steps", "7"])
    assert big.model == "vitb14" and big.batch_size == 160 and big.steps == 7


# --------------------------------------------------------------------------------------------------
# train_step on hand-made batches (the collate_pretrain layout), tiny model, small crops

TINY = ["--global-size", "56", "--local-size", "28", "--prototypes", "64", "--head-hidden", "32",
        "--head-bottleneck", "16", "--warmup", "0", "--freeze-last-layer", "0",
        "--teacher-temp-warmup", "0"]


def with_mask_index(batch):
    # (2B, N) bool -> flat indices, per-patch weights, count (as data.collate_pretrain)
    m = batch["masks"]
    batch.update(mask_indices=m.flatten().nonzero().flatten(), n_masked=int(m.sum()),
                 masks_weight=(1 / m.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(m)[m])
    return batch


def fake_batch(B=4, G=56, L=28, n_local=2, seed=0, adjacent=False):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(2 * B, (G // 14) ** 2, generator=g) < 0.3
    masks[::2] = False  # half of the global crops carry no mask (mask probability 0.5)
    return with_mask_index(dict(
        masks=masks, **{"global": torch.randn(2 * B, 3, G, G, generator=g)},
        local=torch.randn(n_local * B, 3, L, L, generator=g),
        adjacent=torch.randn(2 * B, 3, G, G, generator=g) if adjacent else None))


def shard(batch, rank, world):
    """The rows of images rank*B/world..: what that rank would collate from its share of the
    global batch."""
    B = len(batch["global"]) // 2
    per = B // world
    def own(x, n):  # crop-major rows
        return torch.cat([c[rank * per:(rank + 1) * per] for c in x.chunk(n)])
    n_local = len(batch["local"]) // B
    return with_mask_index(dict(masks=own(batch["masks"], 2), local=own(batch["local"], n_local),
                                adjacent=None, **{"global": own(batch["global"], 2)}))


def setup(argv):
    args = pretrain.get_args(TINY + argv)
    student, teacher = pretrain.build_models(args, torch.device("cpu"))
    opt = torch.optim.AdamW(pretrain.param_groups(student, args.layer_decay))
    centers = {k: torch.zeros(1, args.prototypes) for k in ("dino", "ibot")}
    return args, student, teacher, opt, centers, pretrain.make_schedules(args, 1)


def run_steps(n, argv, batch, student_wrap=lambda s: s, world=1):
    args, student, teacher, opt, centers, sch = setup(argv)
    sch = pretrain.make_schedules(args, world)
    wrapped = student_wrap(student)
    out = [pretrain.train_step(wrapped, teacher, batch, centers, opt,
                               {k: v[i] for k, v in sch.items()}, args) for i in range(n)]
    return out, teacher, centers


def test_train_step_lowers_loss_on_a_fixed_batch():
    losses, teacher, _ = run_steps(5, ["--steps", "5", "--batch-size", "4"], fake_batch())
    assert set(losses[0]) == {"dino_local", "dino_global", "ibot", "koleo", "loss",
                              "target_entropy", "prototypes_used"}
    assert all(math.isfinite(v["loss"]) for v in losses)
    assert losses[-1]["loss"] < losses[0]["loss"], [v["loss"] for v in losses]


def test_train_step_adjacent_slice_term_and_nonfinite_guard():
    batch = fake_batch(adjacent=True)
    argv = ["--steps", "2", "--batch-size", "4", "--adjacent-weight", "0.5"]
    losses, _, _ = run_steps(1, argv, batch)
    assert losses[0]["adjacent"] > 0
    stats = pretrain.target_stats(torch.eye(2))  # the two diagnostics: not loss terms
    terms = [v for k, v in losses[0].items() if k != "loss" and k not in stats]
    assert abs(sum(terms) - losses[0]["loss"]) < 1e-4
    batch["global"][0, 0, 0, 0] = float("nan")
    with pytest.raises(SystemExit) as e:
        run_steps(1, ["--steps", "2", "--batch-size", "4"], batch)
    assert e.value.code == 1


MODES = ["centering", "sinkhorn"]


def _ddp_worker(rank, world, init_file, batch, argv, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        for mode in MODES:
            wrap = lambda s: torch.nn.parallel.DistributedDataParallel(s)
            _, teacher, centers = run_steps(3, argv + ["--centering", mode],
                                            shard(batch, rank, world), wrap, world)
            if rank == 0:
                torch.save({"teacher": teacher.state_dict(), "centers": centers}, f"{out}.{mode}")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    # KoLeo is per process by definition (DINOv2 does not gather): off; drop path is 0 in TINY
    batch, out = fake_batch(B=4), str(tmp_path / "rank0.pt")
    argv = ["--steps", "3", "--batch-size", "2", "--koleo-weight", "0"]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), batch, argv, out),
                                nprocs=2)
    for mode in MODES:  # centers and Sinkhorn sums are all-reduced: 2 x 2 images == 1 x 4 images
        one = ["--steps", "3", "--batch-size", "4", "--koleo-weight", "0", "--centering", mode]
        _, teacher, centers = run_steps(3, one, batch)
        ddp = torch.load(f"{out}.{mode}", weights_only=True)
        diff = max((ddp["teacher"][k] - v).abs().max().item()
                   for k, v in teacher.state_dict().items())
        print(f"{mode}: max |teacher_ddp - teacher_1proc| = {diff:.2e}")
        assert diff < 1e-5, diff
        assert all((ddp["centers"][k] - centers[k]).abs().max() < 1e-5 for k in centers)


def _train(tmp_path, name, *extra):
    return pretrain.get_args(["--out", str(tmp_path / name), "--steps", "4", "--save-every", "2",
                              "--log-every", "1", "--eval-every", "2", "--batch-size", "2",
                              "--workers", "0", *TINY, *extra])


def _probes(run):
    records = map(json.loads, open(run / "metrics.jsonl"))
    return [(r["step"], r["density_acc"]) for r in records if r["split"] == "val"]


def _losses(run):
    records = map(json.loads, open(run / "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_resume_auto_replays_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    pretrain.train(_train(tmp_path, "full"))
    real_step = pretrain.train_step
    # dies in step 4: step 3 was logged, ckpt.pt holds step 2
    monkeypatch.setattr(pretrain, "train_step", dies_on_call(real_step, 4))
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(_train(tmp_path, "killed"))
    assert list(_losses(tmp_path / "killed")) == [1, 2, 3]
    monkeypatch.setattr(pretrain, "train_step", real_step)
    pretrain.train(_train(tmp_path, "killed", "--resume", "auto"))
    full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert resumed[3] == full[3] and resumed[4] == full[4], (full, resumed)
    records = map(json.loads, open(tmp_path / "killed" / "metrics.jsonl"))
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]  # step 3 is redone after the resume and logged once
    # the density probe: the starting backbone at step 0 (a fresh start only), then every 2 steps,
    # each once
    assert _probes(tmp_path / "killed") == _probes(tmp_path / "full")
    assert [s for s, _ in _probes(tmp_path / "full")] == [0, 2, 4]
    ckpt = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert {"student", "teacher", "optimizer", "loss_state", "args"} <= set(ckpt)
    model.load_pretrained(model.vit_tiny(), str(tmp_path / "killed" / "backbone.pth"))
    args = json.load(open(tmp_path / "full" / "args.json"))
    assert args["world_size"] == 1 and "torch" in args


def test_tiny_preset_leaves_the_uniform_plateau(tmp_path):
    """The tiny preset learns: its 300 steps on the phantoms (crops halved to 56 and 28 px, for
    time) end with the DINO term (dino_local + dino_global) at least 0.2 below ln K, the teacher's
    targets at least 1 nat sharper than uniform, and spread over at least 8 prototypes (means of the
    last three logs). Measured on the 2-core CPU: 5.50 vs ln 512 = 6.24, entropy 4.27, 159 in use.
    Planted LayerScale 1e-5 ends at 6.38 and 5.90 (uniform targets); planted centering that never
    moves ends on one prototype (term 0.001): each fails here."""
    run = tmp_path / "run"
    pretrain.train(pretrain.get_args(["--out", str(run), "--eval-every", "0", "--global-size",
                                      "56", "--local-size", "28", "--workers", "0"]))
    logs = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "train"]
    assert logs[-1]["step"] == 300
    last = {k: np.mean([r[k] for r in logs[-3:]]) for k in logs[-1] if k != "split"}
    dino, ln_k = last["dino_local"] + last["dino_global"], math.log(512)
    print({k: round(v, 3) for k, v in last.items()})
    assert dino < ln_k - 0.2, f"DINO term {dino:.3f} on the ln K = {ln_k:.3f} plateau"
    assert last["target_entropy"] < ln_k - 1, last  # targets differ from uniform
    assert last["prototypes_used"] >= 8, last  # and from one prototype for every image


def test_target_stats_tell_the_two_collapses_apart():
    """Uniform targets: entropy ln K, all K in use; every row on one prototype: 0 and 1; sharp
    rows on distinct prototypes (what learning needs): entropy 0, all in use."""
    K = 8
    for probs, entropy, used in [(torch.full((4, K), 1 / K), math.log(K), K),
                                 (F.one_hot(torch.zeros(4, dtype=torch.long), K).float(), 0, 1),
                                 (torch.eye(K), 0, K)]:
        got = pretrain.target_stats(probs)
        assert got["target_entropy"].item() == pytest.approx(entropy, abs=1e-6)
        assert got["prototypes_used"].item() == pytest.approx(used, rel=1e-5)


def test_probe_verdict_pairs_images_and_needs_the_ci_above_zero():
    """The end-of-run verdict: gains are paired accuracy differences on the same images, a gain
    counts only when its bootstrap CI (whole patients) lies above zero, and the held-out set's
    patients are the ones training never saw (the bigger archive's first patients are the
    training archive's)."""
    labels = torch.tensor([0, 1, 1, 2] * 40)  # 40 patients of 4 views; majority class 1: 0.5
    groups = torch.arange(160) // 4
    eval_set = dict(labels=labels, groups=groups)
    right, wrong = labels.tolist(), ((labels + 1) % 4).tolist()
    half = [r if g % 2 else w for r, w, g in zip(right, wrong, groups.tolist())]  # 0.5 by patient

    def records(first, last):
        return [dict(step=0, split="val", density_pred=first), dict(step=9, split="train"),
                dict(step=10, split="val", density_pred=last)]
    result, line = pretrain.probe_verdict(records(half, right), eval_set, 10)
    assert result["accuracy"] == 1.0 and result["gain_step0"] == 0.5
    assert result["gain_majority"] == 0.5 and result["beat_step0"] and result["beat_majority"]
    assert 0 < result["gain_step0_ci"][0] < 0.5 < result["gain_step0_ci"][1] <= 1
    assert "training beat the step-0 backbone (0.500; gain +0.500" in line
    result, line = pretrain.probe_verdict(records(half, half), eval_set, 10)
    assert result["gain_step0"] == 0 and result["gain_step0_ci"] == [0, 0]  # same predictions
    assert not result["beat_step0"] and "did NOT beat the step-0 backbone" in line
    assert not result["beat_majority"]  # 0.5 vs 0.5, the CI straddles zero
    assert pretrain.probe_verdict(records(half, right)[1:], eval_set, 10) is None  # no step 0
    planned = [p["patient"] for p in phantoms.plan_cohort(8 + pretrain.HELDOUT_PATIENTS)]
    assert planned[:8] == [p["patient"] for p in phantoms.plan_cohort(8)]
    assert phantoms.plan_cohort(48)[:8] == phantoms.plan_cohort(8)  # same draws, same phantoms


def test_density_probe_cross_validates_by_patient():
    """A backbone whose patch tokens carry the label is probed perfectly; shuffled labels not."""
    class Oracle(torch.nn.Module):  # every patch token = the image's first 4 pixels, one-hot
        def forward_features(self, x):
            return {"x_norm_patchtokens": x[:, 0, 0, :4].unsqueeze(1).repeat(1, 3, 1)}  # (B, 3, 4)
    labels = torch.arange(40) % 4  # (40,), ten patients of four images each
    images = 0.05 * torch.randn(40, 3, 14, 14, generator=torch.Generator().manual_seed(1))
    images[:, 0, 0, :4] += F.one_hot(labels, 4)
    groups = torch.arange(40) // 4
    feats = model.patch_mean_std(Oracle(), images, "cpu")  # (40, 8)
    out = metrics.density_probe_cv(feats.numpy(), labels.numpy(), groups.numpy())
    assert out == {"density_acc": 1.0, "density_majority": 0.25, "density_n": 40,
                   "density_pred": labels.tolist()}
    shuffled = labels[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    out = metrics.density_probe_cv(feats.numpy(), shuffled.numpy(), groups.numpy())
    assert out["density_acc"] < 0.75


def test_mammodino_preset_end_to_end(tmp_path):
    """The mammodino recipe (tissue-aware crops, tissue-weighted masks, adjacent slices) through
    train() on DICOM."""
    root = phantoms.synthetic_archive(tmp_path / "syn", patients=2, seed=1, shape=(6, 96, 72))
    out = tmp_path / "run"
    pretrain.train(pretrain.get_args([
        "--preset", "mammodino", "--model", "tiny", "--data", str(root), "--out", str(out),
        "--global-size", "56", "--local-size", "28", "--batch-size", "2", "--steps", "2",
        "--workers", "0", "--prototypes", "64", "--head-hidden", "32", "--head-bottleneck", "16",
        "--log-every", "1", "--eval-every", "0", "--device", "cpu"]))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logs = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in logs] == [1, 2]
    last = records[-1]
    assert last["split"] == "data" and last["skipped"] == 0 and last["volumes"] == 8
    assert all(r["adjacent"] > 0 and math.isfinite(r["loss"]) for r in logs)
    assert json.load(open(out / "args.json"))["recipe"] == "mammodino"


def test_mammodino_trains_on_clahe_of_each_slice_the_other_recipes_on_the_slice(tmp_path,
                                                                                monkeypatch):
    """pretrain.build_stream's sample for --recipe mammodino equals MultiCrop's on slices put
    through scikit-image's CLAHE (clip 0.01, the same draws); dinov2's and dbt-dino's equal it on
    the displayed slices themselves, bit for bit."""
    import functools
    import data
    from skimage.exposure import equalize_adapthist
    monkeypatch.setenv("DBT_DINO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "v").mkdir()
    path = phantoms.write_phantom_dicom(tmp_path / "v" / "v.dcm", (4, 96, 72), "native", seed=1)
    for recipe in ("mammodino", "dinov2", "dbt-dino"):
        args = pretrain.get_args(["--recipe", recipe, "--global-size", "28", "--local-size", "14"])
        stream = pretrain.build_stream(args, [str(tmp_path / "v")], 14)
        meta, mask = data.volume_index(path, stream.cache_dir)
        item = stream.sample(meta, mask, np.random.default_rng(5))
        raw = functools.partial(data.read_slice, meta)

        def clahe(s):  # the oracle: scikit-image on the displayed slice
            return torch.from_numpy(equalize_adapthist(raw(s).numpy(), clip_limit=0.01)
                                    .astype(np.float32))
        read = clahe if recipe == "mammodino" else raw
        rng = np.random.default_rng(5)
        s, S = int(rng.integers(meta["n_frames"])), meta["n_frames"]
        want = stream.multicrop(read(s), mask, meta["mask_stride"], rng, s, S, read)
        unprocessed = stream.multicrop(raw(s), mask, meta["mask_stride"], _after_slice(5, S), s,
                                       S, raw)
        for key in ("global_crops", "local_crops") + (("adjacent",) if "adjacent" in item else ()):
            gap = (item[key] - want[key]).abs().max().item()
            assert gap <= (1e-3 if recipe == "mammodino" else 0.0), (recipe, key, gap)
        moved = (item["global_crops"] - unprocessed["global_crops"]).abs().max().item()
        assert (moved > 0.05) == (recipe == "mammodino"), (recipe, moved)


def _after_slice(seed, S):
    """A generator in the state the stream's is in after drawing the slice."""
    rng = np.random.default_rng(seed)
    rng.integers(S)
    return rng


def test_a_run_records_its_preprocessing_beside_the_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv("DBT_DINO_CACHE", str(tmp_path / "cache"))
    archive = phantoms.synthetic_archive(tmp_path / "a", patients=1, seed=3, shape=(2, 64, 48))
    for recipe, want in (("mammodino", "clahe"), ("dinov2", "none")):
        out = tmp_path / recipe
        pretrain.train(pretrain.get_args(TINY + [
            "--recipe", recipe, "--data", str(archive), "--out", str(out), "--steps", "1",
            "--batch-size", "2", "--workers", "0", "--eval-every", "0", "--device", "cpu"]))
        said = json.loads((out / "backbone.json").read_text())
        assert said["preprocess"] == want and said["recipe"] == recipe
        assert torch.load(out / "ckpt.pt", weights_only=True)["preprocess"] == want
        assert pretrain.utils.recorded_preprocess(str(out / "backbone.pth")) == want


def test_the_density_probe_sees_what_the_recipe_trains_on(tmp_path, monkeypatch):
    """pretrain.probe_set under --recipe mammodino: each view's central slice through CLAHE before
    the resize (scikit-image's, as the oracle); under dinov2 the slice itself."""
    import dicom
    from skimage.exposure import equalize_adapthist
    monkeypatch.setenv("DBT_DINO_CACHE", str(tmp_path / "cache"))
    root = phantoms.synthetic_archive(tmp_path / "a", patients=2, seed=3, shape=(2, 64, 48))
    first = pretrain.utils.read_csv(root / "exams.csv")[0]["LCC"]
    meta = dicom.parse_headers(root / first)
    x = dicom.orient(meta)
    x = np.ascontiguousarray(x[:, ::-1] if meta["flip"] else x)
    for recipe, view in (("mammodino", equalize_adapthist(x, clip_limit=0.01)), ("dinov2", x)):
        args = pretrain.get_args(["--recipe", recipe, "--global-size", "28", "--data", str(root),
                                  "--eval-exams", "1"])
        got = pretrain.probe_set(args, str(root))["images"][0, 0]
        want = F.interpolate(torch.from_numpy(np.float32(view))[None, None], size=(28, 28),
                             mode="bilinear", antialias=True)[0, 0].clamp(0, 1)
        assert (got - want).abs().max() <= 1e-3, recipe
