"""Tests that pin the training recipe: one train_step's loss recomposed from DINOv2's definitions
(dinov2/loss/*.py, dinov2/train/ssl_meta_arch.py) and MammoDINO's adjacent-slice loss, per-part
gradient clipping, data.MultiCrop's per-crop augmentation schedule (dinov2/data/augmentations.py),
the tissue grid following a flipped crop, and drop_path's expectation. Expected values are computed
here, in float64, from those definitions; none of pretrain's loss functions is called. CPU, tiny
sizes, a few seconds."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import model
import pretrain

B, N_LOCAL = 4, 8  # images per batch, local crops per image
G, L = 56, 28  # global and local crop sides (tiny ViT, patch 14)
TINY = ["--global-size", str(G), "--local-size", str(L), "--prototypes", "64",
        "--head-hidden", "32", "--head-bottleneck", "16", "--warmup", "0",
        "--freeze-last-layer", "0", "--teacher-temp-warmup", "0", "--steps", "2",
        "--batch-size", str(B), "--drop-path", "0"]
SCHED = dict(lr=1e-3, last_layer_lr=1e-3, wd=0.04, momentum=0.99, teacher_temp=0.05)


def sigma_ok(count, n, p, k=5):
    """count ~ Binomial(n, p) within k standard deviations (p = 0 or 1 must be met exactly)."""
    return abs(count - n * p) <= k * math.sqrt(n * p * (1 - p))


# --------------------------------------------------------------------------------------------------
# One train_step, recomposed in float64

def ce(t, s, temp=0.1):
    """Per-row cross-entropy -sum_k t_k log softmax(s / temp)_k, float64."""
    s = s.double() / temp
    return -(t.double() * (s - torch.logsumexp(s, dim=-1, keepdim=True))).sum(-1)


def sinkhorn64(logits, temp, iterations=3):
    """Sinkhorn-Knopp as DINOv2's dino_clstoken_loss.py runs it: rows of the result sum to 1,
    prototypes get equal mass."""
    Q = torch.exp(logits.double() / temp).t()  # (K, rows)
    K, rows = Q.shape
    Q = Q / Q.sum()
    for _ in range(iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / rows
    return (Q * rows).t()


def targets64(logits, center, temp, mode):
    if mode == "sinkhorn":
        return sinkhorn64(logits, temp)
    return torch.softmax((logits.double() - center.double()) / temp, dim=-1)


def koleo64(x):
    """-mean_i log ||z_i - z_nn(i)|| on L2-normalised rows; nn(i): nearest other row by cosine."""
    z = F.normalize(x.double(), dim=-1)
    dots = z @ z.t() - 3 * torch.eye(len(z), dtype=torch.float64)
    return -torch.log((z - z[dots.argmax(1)]).norm(dim=-1)).mean()


def recipe_batch(seed=0):
    """A collate_pretrain-shaped batch: crop-major rows, half of the global crops without a mask."""
    g = torch.Generator().manual_seed(seed)
    n = (G // 14) ** 2
    masks = torch.rand(2 * B, n, generator=g) < 0.4
    masks[::2] = False
    masks[1, :2] = True  # at least one masked patch
    per_image = masks.sum(-1, keepdim=True).clamp_min(1)
    return {"global": torch.randn(2 * B, 3, G, G, generator=g),
            "local": torch.randn(N_LOCAL * B, 3, L, L, generator=g),
            "adjacent": torch.randn(2 * B, 3, G, G, generator=g), "masks": masks,
            "adjacent_valid": torch.tensor([0.0] + [1.0] * (B - 1)).repeat(2),  # image 0: FFDM
            "mask_indices": masks.flatten().nonzero().flatten(), "n_masked": int(masks.sum()),
            "masks_weight": (1 / per_image).expand_as(masks)[masks].float()}


def captured_step(argv, batch, centers=None):
    """Runs one train_step on CPU and returns (args, returned terms as floats, student and teacher
    outputs, the centers it started from). Outputs are caught with forward hooks: SSLModel returns
    (CLS of views[0], [logits per view], masked-patch logits)."""
    args = pretrain.get_args(TINY + argv)
    student, teacher = pretrain.build_models(args, torch.device("cpu"))
    # LayerScale 1 instead of 1e-5: distinct CLS tokens, so KoLeo is not float noise
    gammas = [p for net in (student, teacher) for n, p in net.named_parameters() if "gamma" in n]
    with torch.no_grad():
        for p in gammas:
            p.fill_(1.0)
    opt = torch.optim.AdamW(pretrain.param_groups(student, args.layer_decay))
    seen = {}
    student.register_forward_hook(lambda m, i, o: seen.setdefault("student", o))
    teacher.register_forward_hook(lambda m, i, o: seen.setdefault("teacher", o))
    if centers is None:
        centers = {k: torch.zeros(1, args.prototypes) for k in ("dino", "ibot")}
    before = {k: v.clone() for k, v in centers.items()}
    out = pretrain.train_step(student, teacher, batch, centers, opt, dict(SCHED), args)
    return args, {k: float(v) for k, v in out.items()}, seen["student"], seen["teacher"], before


def expected_terms(args, batch, s_out, t_out, centers):
    """The loss of one step from the DINOv2/MammoDINO definitions, float64."""
    s_cls = s_out[0].detach()  # (2B, D) backbone CLS
    s_patch = s_out[2].detach()  # (M, K) masked patches
    s_glob, s_loc, s_adj = [v.detach() for v in s_out[1]]  # (2B, K), (n_l B, K), (2B, K)
    _, (t_glob, t_adj), t_patch = t_out
    temp, mode = SCHED["teacher_temp"], args.centering
    tg = targets64(t_glob, centers["dino"], temp, mode)
    ta = targets64(t_adj, centers["dino"], temp, mode)
    # DINO: every student view against every teacher global view except itself; batch mean per pair
    locals_ = [(f"l{j}", x) for j, x in enumerate(s_loc.chunk(N_LOCAL))]
    student_views = list(zip(["g1", "g2"], s_glob.chunk(2))) + locals_
    teacher_views = list(zip(["g1", "g2"], tg.chunk(2)))
    pairs = [(sv, tv, ce(t, s).mean())
             for sv, s in student_views for tv, t in teacher_views if sv != tv]
    assert len(pairs) == 18  # (n_g - 1) n_g + n_l n_g with 2 global and 8 local crops
    dino_global = sum(v for sv, _, v in pairs if sv.startswith("g")) / len(pairs)
    dino_local = sum(v for sv, _, v in pairs if sv.startswith("l")) / len(pairs)
    # iBOT: mean over the 2B global crops of the mean CE over that crop's masked patches (unmasked
    # crops add 0)
    per_patch = ce(targets64(t_patch, centers["ibot"], temp, mode), s_patch)
    image_of = batch["mask_indices"] // batch["masks"].shape[1]
    masked = [i for i in range(2 * B) if (image_of == i).any()]
    ibot = sum(per_patch[image_of == i].mean() for i in masked) / (2 * B)
    # KoLeo on the backbone CLS tokens of each global crop separately
    koleo = args.koleo_weight * (koleo64(s_cls[:B]) + koleo64(s_cls[B:]))
    # adjacent slice, symmetrised: student(s) vs teacher(s') and student(s') vs teacher(s), the
    # pair's rows [s of B images; s' of B], over the images that have a neighbouring slice (image
    # 0 has none)
    has = batch["adjacent_valid"][:B].bool()
    adjacent = args.adjacent_weight * 0.5 * (ce(ta[B:], s_adj[:B])[has].mean()
                                             + ce(ta[:B], s_adj[B:])[has].mean())
    terms = dict(dino_global=dino_global, dino_local=dino_local, ibot=args.ibot_weight * ibot,
                 koleo=koleo, adjacent=adjacent)
    terms = {k: float(v) for k, v in terms.items()}
    return dict(terms, loss=sum(terms.values()))


@pytest.mark.parametrize("mode", ["centering", "sinkhorn"])
def test_train_step_loss_is_the_dinov2_composition(mode):
    batch = recipe_batch()
    centers = {k: 0.3 * torch.randn(1, 64, generator=torch.Generator().manual_seed(7))
               for k in ("dino", "ibot")}
    argv = ["--centering", mode, "--adjacent-weight", "0.5"]
    args, got, s_out, t_out, before = captured_step(argv, batch, centers)
    want = expected_terms(args, batch, s_out, t_out, before)
    assert set(want) <= set(got), (got, want)
    for k in want:
        assert abs(got[k] - want[k]) < 1e-5, (k, got[k], want[k])
    assert want["koleo"] > 0 and want["adjacent"] > 0 and want["ibot"] > 0  # every term takes part


def test_gradients_are_clipped_per_part_at_3():
    """Backbone, DINO head and iBOT head are each clipped to norm 3.0 (DINOv2's train.py), not
    jointly."""
    args = pretrain.get_args(TINY + ["--separate-ibot-head", "--centering", "centering"])
    student, teacher = pretrain.build_models(args, torch.device("cpu"))
    opt = torch.optim.AdamW(pretrain.param_groups(student, args.layer_decay))
    raw, clipped = {}, {}
    for name, p in student.named_parameters():
        p.register_hook(lambda g: g * 1e3)  # every part's unclipped norm far above 3
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: raw.__setitem__(name, p.grad.detach().clone()))
    real_step = opt.step

    def step(*a, **kw):  # the gradients as the optimizer receives them
        clipped.update({n: p.grad.detach().clone() for n, p in student.named_parameters()
                        if p.grad is not None})
        return real_step(*a, **kw)

    opt.step = step
    centers = {k: torch.zeros(1, args.prototypes) for k in ("dino", "ibot")}
    pretrain.train_step(student, teacher, recipe_batch(), centers, opt, dict(SCHED), args)
    parts = ("backbone.", "dino_head.", "ibot_head.")
    assert set(raw) == set(clipped) and all(any(n.startswith(p) for p in parts) for n in raw)
    for part in parts:
        names = [n for n in raw if n.startswith(part)]
        norm = lambda grads: torch.sqrt(sum(grads[n].double().pow(2).sum() for n in names)).item()
        assert norm(raw) > 30, (part, norm(raw))
        assert abs(norm(clipped) - pretrain.CLIP_GRAD) < 1e-4, (part, norm(raw), norm(clipped))
        scale = pretrain.CLIP_GRAD / (norm(raw) + 1e-6)  # torch's clip_grad_norm_ factor
        assert all(torch.allclose(clipped[n], raw[n] * scale, rtol=1e-4, atol=1e-9)
                   for n in names), part
    assert pretrain.CLIP_GRAD == 3.0


# --------------------------------------------------------------------------------------------------
# Augmentation schedule of data.MultiCrop, counted over seeded draws

@pytest.fixture
def multicrop():
    return data.MultiCrop(global_size=G, local_size=L, n_local=N_LOCAL)


def draw(multicrop, image, n, mask=None, seed=0):
    """n MultiCrop samples of `image` (64, 48), with an all-tissue mask unless one is given."""
    mask = np.ones((64, 48), bool) if mask is None else mask
    rng = np.random.default_rng(seed)
    return [multicrop(image, mask, 64 // mask.shape[0], rng) for _ in range(n)]


def test_blur_and_solarize_probabilities_per_crop(multicrop, monkeypatch):
    """A white slice stays >= 0.6 through the jitter, so solarize (x >= 0.5 -> 1 - x) is visible;
    the patched blur paints 0.55, which nothing else produces: 0.55 = blur, 0.45 = blur then
    solarize, < 0.4 = solarize."""
    monkeypatch.setattr(data, "gaussian_blur", lambda x, sigma, *a, **kw: torch.full_like(x, 0.55))
    n = 600
    items = draw(multicrop, torch.ones(64, 48), n)
    crops = {"global1": torch.stack([it["global_crops"][0] for it in items]),
             "global2": torch.stack([it["global_crops"][1] for it in items]),
             "local": torch.cat([it["local_crops"] for it in items])}
    # blur p, solarize p as DINOv2 trains (the released quirk: global 1 never blurred)
    schedule = {"global1": (0.0, 0.0), "global2": (0.9, 0.2), "local": (0.5, 0.0)}
    for name, x in crops.items():
        v = x[:, 0].flatten(1)  # (n, h*w)
        # constant crops: one outcome each
        assert ((v.max(1).values - v.min(1).values) < 1e-5).all(), name
        v = v[:, 0]
        blurred = ((v - 0.55).abs() < 1e-4) | ((v - 0.45).abs() < 1e-4)
        solarized = ((v - 0.45).abs() < 1e-4) | (v <= 0.4 + 1e-6)
        assert ((v >= 0.6 - 1e-6) | blurred | solarized).all(), name
        p_blur, p_sol = schedule[name]
        count = len(v)
        assert sigma_ok(int(blurred.sum()), count, p_blur), (name, int(blurred.sum()), count)
        assert sigma_ok(int(solarized.sum()), count, p_sol), (name, int(solarized.sum()), count)


def test_adjacent_pair_is_conservative_and_the_main_crops_unchanged(monkeypatch):
    """mammodino's pair (adjacent_k > 0) on a white slice and its white neighbour, counted as above:
    the pair is never blurred or solarized and its brightness stays in [0.8, 1] (jitter 0.8-1.2;
    a white pixel only darkens), while the main crops keep DINOv2's schedule and 0.6-1.4 jitter."""
    monkeypatch.setattr(data, "gaussian_blur", lambda x, sigma, *a, **kw: torch.full_like(x, 0.55))
    mc = data.MultiCrop(global_size=G, local_size=L, n_local=N_LOCAL, adjacent_k=1)
    white, rng, n = torch.ones(64, 48), np.random.default_rng(3), 600
    items = [mc(white, np.ones((64, 48), bool), 1, rng, 0, 2, lambda s: white) for _ in range(n)]
    assert all(it["slice_index"].tolist() == [0, 1] for it in items)
    crops = {"global1": (torch.stack([it["global_crops"][0] for it in items]), (0.0, 0.0)),
             "global2": (torch.stack([it["global_crops"][1] for it in items]), (0.9, 0.2)),
             "local": (torch.cat([it["local_crops"] for it in items]), (0.5, 0.0)),
             "pair s": (torch.stack([it["adjacent"][0] for it in items]), (0.0, 0.0)),
             "pair s'": (torch.stack([it["adjacent"][1] for it in items]), (0.0, 0.0))}
    for name, (x, (p_blur, p_sol)) in crops.items():
        v = x[:, 0, 0, 0]  # constant crops: one value each
        blurred = ((v - 0.55).abs() < 1e-4) | ((v - 0.45).abs() < 1e-4)
        solarized = ((v - 0.45).abs() < 1e-4) | (v <= 0.4 + 1e-6)
        assert sigma_ok(int(blurred.sum()), len(v), p_blur), (name, int(blurred.sum()))
        assert sigma_ok(int(solarized.sum()), len(v), p_sol), (name, int(solarized.sum()))
        plain = v[~blurred & ~solarized]
        low = 0.8 if name.startswith("pair") else 0.6  # the recipe's stated jitter ranges
        assert plain.min() >= low - 1e-6 and plain.min() < low + 0.03, (name, plain.min())


def test_colour_jitter_probability_and_factor_range(multicrop):
    """RandomApply(ColorJitter(brightness .4, contrast .4), p .8) on grey: brightness and contrast
    factors uniform in [0.6, 1.4]. On an image of mean m and deviation d the output has mean m*b and
    deviation d*b*c in either order (nothing clips), so each draw reveals b and c."""
    x = torch.full((1, 4, 4), 0.35)
    x[:, :, :2] = 0.45  # left half 0.45, right half 0.35: mean 0.4, deviation 0.05
    rng, n = np.random.default_rng(1), 4000
    b, c = [], []  # brightness and contrast factor of each draw
    for _ in range(n):
        y = multicrop._photo(x.clone(), rng, 0.0, 0.0)[0].double()  # _photo works in place
        b.append(y.mean().item() / 0.4)
        c.append((y[:, :2].mean() - y[:, 2:].mean()).item() / 2 / 0.05 / b[-1])
    b, c = np.array(b), np.array(c)
    jittered = (np.abs(b - 1) > 1e-6) | (np.abs(c - 1) > 1e-6)
    assert sigma_ok(int(jittered.sum()), n, 0.8), int(jittered.sum())
    from scipy import stats
    for f in (b[jittered], c[jittered]):
        assert f.min() >= 0.6 - 1e-5 and f.max() <= 1.4 + 1e-5, (f.min(), f.max())
        # uniform over the whole range
        assert stats.kstest(f, stats.uniform(0.6, 0.8).cdf).pvalue > 1e-4


def is_flipped(crop):
    """A crop of a left-to-right ramp: increasing unless mirrored."""
    cols = crop[0].mean(0)  # (w,)
    return bool(cols[-1] < cols[0])


def test_every_crop_is_flipped_with_probability_half(multicrop, monkeypatch):
    # geometry only
    monkeypatch.setattr(multicrop, "_photo", lambda x, *a, **kw: x.expand(3, -1, -1))
    ramp = torch.linspace(0.1, 0.9, 48).expand(64, 48).contiguous()  # (H, W)
    n = 400
    items = draw(multicrop, ramp, n, seed=2)
    for name, crops in [("global1", [it["global_crops"][0] for it in items]),
                        ("global2", [it["global_crops"][1] for it in items]),
                        ("local", [c for it in items for c in it["local_crops"]])]:
        flipped = sum(is_flipped(c) for c in crops)
        assert sigma_ok(flipped, len(crops), 0.5), (name, flipped, len(crops))


# --------------------------------------------------------------------------------------------------
# The tissue grid follows its crop

def wedge_mask(H=64, W=48):
    """Tissue left of a slanted edge: asymmetric left/right in every row."""
    y, x = np.mgrid[:H, :W]
    return x < W * (0.2 + 0.5 * y / H)  # (H, W) bool


def test_tissue_grid_of_a_flipped_crop_is_mirrored(multicrop):
    mask, img = wedge_mask(), torch.from_numpy(wedge_mask().astype(np.float32))
    box = (4, 2, 40, 36)
    grid = multicrop._tissue_grid(mask, 1, box, False)
    grid_f = multicrop._tissue_grid(mask, 1, box, True)
    assert (grid - grid.flip(-1)).abs().max() > 0.3  # the box really is asymmetric
    assert torch.equal(grid_f, grid.flip(-1))
    levels = data.Pyramid.of(img)
    crop, crop_f = multicrop._crop(levels, box, False, G), multicrop._crop(levels, box, True, G)
    assert torch.equal(crop_f, crop.flip(-1))


def test_sampled_tissue_grids_match_their_global_crops(multicrop, monkeypatch):
    """With the image equal to the tissue mask, each global crop pooled to the patch grid equals its
    tissue grid (up to the bicubic resize at the edge); a grid left unflipped matches the mirrored
    crop instead."""
    monkeypatch.setattr(multicrop, "_photo", lambda x, *a, **kw: x.expand(3, -1, -1))
    mask = wedge_mask()
    items = draw(multicrop, torch.from_numpy(mask.astype(np.float32)), 60, mask=mask, seed=3)
    checked = flipped = 0
    for it in items:
        for crop, grid in zip(it["global_crops"], it["global_tissue"]):
            pooled = F.adaptive_avg_pool2d(crop[:1], G // 14)[0]  # (G/p, G/p)
            if (pooled - pooled.flip(-1)).abs().max() < 0.3:
                continue  # (nearly) symmetric crop: says nothing about orientation
            checked += 1
            # tissue (left of the slice) on the right
            flipped += bool(pooled[:, -1].sum() > pooled[:, 0].sum())
            near, mirrored = (grid - pooled).abs().max(), (grid - pooled.flip(-1)).abs().max()
            assert near < 0.15 and near < mirrored, (near, mirrored)
    # both orientations seen
    assert checked >= 60 and 15 <= flipped <= checked - 15, (checked, flipped)


# --------------------------------------------------------------------------------------------------
# Stochastic depth

def test_drop_path_keeps_the_expectation_and_rescales_survivors():
    torch.manual_seed(0)
    n, rate = 40000, 0.3
    x = torch.rand(n, 2, 3) + 0.5  # (samples, tokens, dim), no zeros
    y = model.drop_path(x, rate, training=True)
    ratio = (y / x).flatten(1)  # one factor per sample: 0 or 1 / (1 - rate)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))
    kept = ratio[:, 0] != 0
    assert torch.allclose(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - rate)), rtol=1e-6)
    assert sigma_ok(int(kept.sum()), n, 1 - rate)
    # E[drop_path(x)] = x: the mean factor is 1 within 5 sigma of its sampling error
    sd = math.sqrt(rate / (1 - rate) / n)
    assert abs(ratio[:, 0].mean().item() - 1) < 5 * sd
    assert torch.equal(model.drop_path(x, rate, training=False), x)
    assert torch.equal(model.drop_path(x, 0.0, True), x)


# --------------------------------------------------------------------------------------------------
# --compile: the loss terms through torch.compile

def test_loss_terms_cast_bf16_logits_to_fp32():
    """Under --amp the head's logits are bf16; every loss term computes in fp32 (as on logits cast
    beforehand)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 64, generator=g).bfloat16()
    t = torch.softmax(torch.randn(6, 64, generator=g), -1)
    s32 = s.float()
    assert pretrain.dino_loss([s], [t]).dtype == torch.float32
    assert pretrain.dino_loss([s], [t]) == pretrain.dino_loss([s32], [t])
    w = torch.full((6,), 0.5)
    assert pretrain.ibot_loss(s, t, w, 3) == pretrain.ibot_loss(s32, t, w, 3)
    assert torch.equal(pretrain.softmax_center(s, torch.zeros(1, 64), 0.05),
                       pretrain.softmax_center(s32, torch.zeros(1, 64), 0.05))
    assert torch.equal(pretrain.sinkhorn_knopp(s, 0.05), pretrain.sinkhorn_knopp(s32, 0.05))


@pytest.mark.parametrize("mode", ["centering", "sinkhorn"])
def test_compiled_loss_terms_equal_eager(mode, monkeypatch, torch_compile):
    """With --compile, train_step's loss terms (and the centering softmax) run through
    pretrain.compiled: the same terms and centers as eager to 1e-5, gradients to 1e-4 relative.
    compile_blocks has its own test (test_model)."""
    asked, real = [], pretrain.compiled
    monkeypatch.setattr(pretrain, "compiled", lambda fn: asked.append(fn.__name__) or real(fn))
    results = []
    for fused in (False, True):
        args = pretrain.get_args(TINY + ["--centering", mode, "--adjacent-weight", "0.5"])
        # same seed: same weights
        student, teacher = pretrain.build_models(args, torch.device("cpu"))
        args.compile = fused  # after build_models: the blocks stay eager, the loss terms change
        grads = {}
        for name, p in student.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: grads.__setitem__(name, p.grad.clone()))
        opt = torch.optim.AdamW(pretrain.param_groups(student, args.layer_decay))
        centers = {k: 0.3 * torch.randn(1, 64, generator=torch.Generator().manual_seed(7))
                   for k in ("dino", "ibot")}
        asked.clear()
        out = pretrain.train_step(student, teacher, recipe_batch(), centers, opt, dict(SCHED), args)
        results.append((out, grads, centers, sorted(set(asked))))
    eager, eager_grads, eager_centers, eager_asked = results[0]
    comp, comp_grads, comp_centers, comp_asked = results[1]
    wanted = ["adjacent_slice_loss", "dino_loss", "ibot_loss"]
    wanted += ["softmax_center"] if mode == "centering" else []
    assert eager_asked == [] and comp_asked == wanted
    assert eager.keys() == comp.keys()
    assert all(abs(float(eager[k]) - float(comp[k])) < 1e-5 for k in eager)
    assert eager_grads.keys() == comp_grads.keys() and len(eager_grads) > 10
    for name, g in eager_grads.items():
        # fused kernels sum in another order: float32 noise of a few 1e-5 relative on sums over many
        # tokens
        assert (g - comp_grads[name]).abs().max() <= 1e-4 * (1e-3 + g.abs().max()), name
    assert all(torch.allclose(eager_centers[k], comp_centers[k], atol=1e-6) for k in eager_centers)


def test_train_step_applies_each_groups_schedule_and_moves_the_teacher_by_ema():
    """The step sets lr and weight decay per parameter from the schedules (layer decay, patch-embed
    x0.2, the last layer on its own schedule, no decay on biases, norms and gammas) and then
    teacher = m t + (1 - m) s."""
    args = pretrain.get_args(TINY + ["--layer-decay", "0.5"])
    student, teacher = pretrain.build_models(args, torch.device("cpu"))
    opt = torch.optim.AdamW(pretrain.param_groups(student, args.layer_decay))
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    sched = dict(SCHED, last_layer_lr=0.0)  # the first epoch's frozen prototypes
    centers = {k: torch.zeros(1, args.prototypes) for k in ("dino", "ibot")}
    pretrain.train_step(student, teacher, recipe_batch(), centers, opt, sched, args)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    params = dict(student.named_parameters())
    lr, wd = SCHED["lr"], SCHED["wd"]
    depth = student.backbone.n_blocks  # by hand: 0.5 ** (depth + 1 - layer)
    wanted = {"backbone.patch_embed.proj.weight": (lr * 0.5 ** (depth + 1) * 0.2, wd),
              "backbone.cls_token": (lr * 0.5 ** (depth + 1), wd),
              "backbone.blocks.0.norm1.weight": (lr * 0.5 ** depth, 0.0),
              f"backbone.blocks.{depth - 1}.mlp.fc1.weight": (lr * 0.5, wd),
              f"backbone.blocks.{depth - 1}.ls1.gamma": (lr * 0.5, 0.0),
              "backbone.norm.weight": (lr, 0.0), "dino_head.mlp.0.weight": (lr, wd),
              "dino_head.mlp.0.bias": (lr, 0.0),
              "dino_head.last_layer.weight_v": (0.0, wd)}
    for name, (want_lr, want_wd) in wanted.items():
        g = group[id(params[name])]
        assert g["lr"] == pytest.approx(want_lr), name
        assert g["weight_decay"] == pytest.approx(want_wd), name
    m = SCHED["momentum"]
    for name, p in teacher.named_parameters():
        want = m * before[name] + (1 - m) * params[name].detach()
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
