"""model.py against DINOv2's hub models (keys, shapes, parameter counts) and reference
implementations (the `dinov2` package, timm)."""
import pytest
import torch
import torch.nn.functional as F

import model
import pretrain

# (builder, D, depth, ffn, registers) of DINOv2's hub entry points (hub/backbones.py)
ARCHS = [
    (model.dinov2_vits14, 384, 12, "mlp", 0), (model.dinov2_vitb14, 768, 12, "mlp", 0),
    (model.dinov2_vitl14, 1024, 24, "mlp", 0), (model.dinov2_vitg14, 1536, 40, "swiglu", 0),
    (model.dinov2_vits14_reg, 384, 12, "mlp", 4), (model.dinov2_vitb14_reg, 768, 12, "mlp", 4),
    (model.dinov2_vitl14_reg, 1024, 24, "mlp", 4), (model.dinov2_vitg14_reg, 1536, 40, "swiglu", 4),
]


def hub_keys(D, depth, ffn, R):
    """The hub checkpoint's keys and shapes, written out by hand."""
    keys = {"cls_token": (1, 1, D), "pos_embed": (1, 1370, D), "mask_token": (1, D),
            "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,),
            "norm.weight": (D,), "norm.bias": (D,)}
    if R:
        keys["register_tokens"] = (1, R, D)
    hidden = 4096 if ffn == "swiglu" else 4 * D  # SwiGLU: (int(4D*2/3)+7)//8*8 = 4096, D=1536
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,),
                     b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                     b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                     b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                     b + "ls1.gamma": (D,), b + "ls2.gamma": (D,)})
        if ffn == "swiglu":
            keys.update({b + "mlp.w12.weight": (2 * hidden, D), b + "mlp.w12.bias": (2 * hidden,),
                         b + "mlp.w3.weight": (D, hidden), b + "mlp.w3.bias": (D,)})
        else:
            keys.update({b + "mlp.fc1.weight": (hidden, D), b + "mlp.fc1.bias": (hidden,),
                         b + "mlp.fc2.weight": (D, hidden), b + "mlp.fc2.bias": (D,)})
    return keys


@pytest.mark.parametrize("builder,D,depth,ffn,R", ARCHS)
def test_hub_keys_and_shapes(builder, D, depth, ffn, R):
    with torch.device("meta"):  # ViT-g is 1.1B parameters: no memory is spent on meta
        m = builder()
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == hub_keys(D, depth, ffn, R)


def test_parameter_counts():
    def count(D, depth):  # independent count from the layer list: norms, qkv, proj, gammas, MLP
        per_block = (4 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (4 * D * D + 4 * D)
                     + (4 * D * D + D))
        return 3 * 14 * 14 * D + D + D + 1370 * D + D + depth * per_block + 2 * D
    s = sum(p.numel() for p in model.dinov2_vits14().parameters())
    b = sum(p.numel() for p in model.dinov2_vitb14().parameters())
    assert (s, b) == (count(384, 12), count(768, 12))
    assert round(s / 1e6, 2) == 22.06 and round(b / 1e6, 2) == 86.58  # the hub models' counts


def randomize(m, seed=0):
    """Perturb every parameter so that a wrong mapping of any of them shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return m.eval()


def test_matches_dinov2_reference_nonreg():
    """PyPI dinov2 (early 2023 snapshot) is the reference for non-register models at any size."""
    import dinov2.models.vision_transformer as vt  # oracle: required, never skipped
    ref = vt.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()
    ours = randomize(model.dinov2_vits14())
    ref.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        for H, W in [(518, 518), (224, 308), (224, 224)]:
            x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(H + W))
            a, b = ours.forward_features(x), ref.forward_features(x)
            for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
                assert (a[k] - b[k]).abs().max() < 1e-5, (H, W, k)


@pytest.mark.parametrize("name,sizes", [("vit_small_patch14_dinov2", [(518, 518)]),
                                         ("vit_small_patch14_reg4_dinov2",
                                          [(518, 518), (224, 308)])])
def test_matches_timm(name, sizes):
    """timm is exact at 518 for both families and at any size for registers."""
    import timm  # oracle: required, never skipped
    from timm.models.vision_transformer import checkpoint_filter_fn
    reg = "reg4" in name
    ours = randomize(model.dinov2_vits14_reg() if reg else model.dinov2_vits14())
    ref = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=reg).eval()
    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=True)
    with torch.no_grad():
        for H, W in sizes:
            x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(H * W))
            a, t = ours.forward_features(x), ref.forward_features(x)  # timm: normed (B, 1+R+N, D)
            assert (a["x_norm_clstoken"] - t[:, 0]).abs().max() < 1e-5
            if reg:
                assert (a["x_norm_regtokens"] - t[:, 1:5]).abs().max() < 1e-5
            else:
                # no registers: an empty slice
                assert a["x_norm_regtokens"].shape == (1, 0, ours.embed_dim)
            assert (a["x_norm_patchtokens"] - t[:, 1 + 4 * reg:]).abs().max() < 1e-5


def test_interpolation_rules():
    """Non-reg: scale_factor=(g+0.1)/M without antialias; reg: explicit size with antialias (as
    DINOv2's vision_transformer.py)."""
    non_reg = dict(scale_factor=((6 + 0.1) / 8, (10 + 0.1) / 8), antialias=False)
    for name, kwargs in [("tiny", non_reg), ("tiny_reg", dict(size=(6, 10), antialias=True))]:
        m = model.build(name)
        x = torch.zeros(1, 1 + 60, 96)
        pos = m.interpolate_pos_encoding(x, 84, 140)  # 6 x 10 patches from the stored 8 x 8 grid
        grid = m.pos_embed[:, 1:].reshape(1, 8, 8, 96).permute(0, 3, 1, 2)
        want = F.interpolate(grid, mode="bicubic", **kwargs).permute(0, 2, 3, 1).reshape(1, 60, 96)
        assert torch.equal(pos[:, 0], m.pos_embed[:, 0]) and torch.allclose(pos[:, 1:], want)
        native = m.interpolate_pos_encoding(torch.zeros(1, 65, 96), 112, 112)
        assert native is m.pos_embed  # the native grid: untouched
    # the two rules really differ, so the choice matters for reproducing features
    a = model.build("tiny").interpolate_pos_encoding(torch.zeros(1, 37, 96), 84, 84)
    no_offset = model.build("tiny", interpolate_offset=0.0)
    b = no_offset.interpolate_pos_encoding(torch.zeros(1, 37, 96), 84, 84)
    assert (a - b).abs().max() > 1e-4


def test_masks_replace_exactly_the_masked_tokens():
    m = randomize(model.build("tiny_reg"))
    x = torch.randn(2, 3, 112, 112)
    masks = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) < 0.4
    plain, masked = m.prepare_tokens_with_masks(x), m.prepare_tokens_with_masks(x, masks)
    patches_plain, patches_masked = plain[:, 5:], masked[:, 5:]  # after cls + 4 registers
    assert torch.equal(patches_plain[~masks], patches_masked[~masks])
    want = (m.mask_token + m.pos_embed[0, 1:]).expand(2, -1, -1)[masks]  # mask_token, then position
    assert torch.allclose(patches_masked[masks], want) and torch.equal(plain[:, :5], masked[:, :5])
    assert m.forward_features(x, masks)["masks"] is masks


def test_get_intermediate_layers_order_and_shapes():
    m = randomize(model.build("tiny_reg"))
    x = torch.randn(2, 3, 84, 112)
    seen, tok = [], m.prepare_tokens_with_masks(x)
    for blk in m.blocks:
        tok = blk(tok)
        seen.append(tok)
    with torch.no_grad():
        out = m.get_intermediate_layers(x, n=2, return_class_token=True)
        assert len(out) == 2
        for (patch, cls), want in zip(out, seen[2:]):
            want = m.norm(want)
            assert torch.allclose(patch, want[:, 5:]) and torch.allclose(cls, want[:, 0])
        raw = m.get_intermediate_layers(x, n=[0, 3], reshape=True, norm=False)
        assert [r.shape for r in raw] == [(2, 96, 6, 8)] * 2
        assert torch.allclose(raw[0], seen[0][:, 5:].reshape(2, 6, 8, 96).permute(0, 3, 1, 2))
        last = m.get_intermediate_layers(x)[0]
        assert torch.allclose(last, m.forward_features(x)["x_norm_patchtokens"], atol=1e-6)
        assert torch.allclose(m(x), m.forward_features(x)["x_norm_clstoken"])


def test_ema_update():
    t, s = model.vit_tiny(), randomize(model.vit_tiny(), seed=1)
    t0 = {k: v.clone() for k, v in t.state_dict().items()}
    pretrain.ema_update(t, s, 1.0)
    assert all(torch.equal(v, t0[k]) for k, v in t.state_dict().items())
    pretrain.ema_update(t, s, 0.25)
    assert torch.allclose(t.pos_embed, 0.25 * t0["pos_embed"] + 0.75 * s.pos_embed)
    pretrain.ema_update(t, s, 0.0)
    assert all(torch.equal(v, s.state_dict()[k]) for k, v in t.state_dict().items())


def formats(m):
    """The four checkpoint layouts of the issue, built from one model's weights."""
    sd = m.state_dict()
    chunked = {}  # FSDP BlockChunks: 2 chunks of 2 blocks, keys blocks.<chunk>.<global index>.*
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}." + k[len("blocks."):]
        chunked["backbone." + k] = v
    head = {"dino_head.mlp.0.weight": torch.zeros(8, 96),
            "dino_head.last_layer.weight_g": torch.ones(16, 1)}
    teacher = {**{"backbone." + k: v for k, v in sd.items()}, **head}
    return {
        "hub": sd,
        "dinov2_teacher_chunked": {"teacher": {**chunked, **head}},
        "dbt_dino": {"teacher": teacher},
        "ours_ckpt": {"version": 1, "step": 3, "teacher": teacher,
                      "student": {"module.backbone." + k: v * 0 for k, v in sd.items()}},
    }


def test_all_checkpoint_formats_round_trip(tmp_path):
    src = randomize(model.vit_tiny())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = src.forward_features(x)["x_norm_patchtokens"]
        for fmt, ckpt in formats(src).items():
            path = tmp_path / f"{fmt}.pth"
            torch.save(ckpt, path)
            got = model.vit_tiny(weights=str(path)).eval().forward_features(x)["x_norm_patchtokens"]
            assert torch.equal(got, want), fmt


def test_pos_embed_is_resampled_to_the_model_grid():
    src = model.build("tiny", img_size=224)  # 16 x 16 grid
    with torch.no_grad():  # a smooth field that varies along rows only: a transposition would show
        rows = torch.linspace(-1, 1, 16).view(16, 1, 1).expand(16, 16, 96)
        src.pos_embed[0, 1:] = rows.reshape(256, 96)
    dst = model.load_pretrained(model.vit_tiny(), src.state_dict())  # 8 x 8 grid
    got = dst.pos_embed[0, 1:].reshape(8, 8, 96)
    assert torch.equal(dst.pos_embed[0, 0], src.pos_embed[0, 0])
    assert (got[:, :, 0] - got[:, :1, 0]).abs().max() < 1e-5  # constant along each row
    assert got[0, 0, 0] < -0.8 and got[-1, 0, 0] > 0.8


def test_bad_checkpoints_fail_with_a_named_one_line_error(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(model.vit_tiny().state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    for path in (truncated, text, listing):
        with pytest.raises(ValueError) as e:
            model.load_pretrained(model.vit_tiny(), str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    # a 4-block checkpoint into a 5-block model
    with pytest.raises(ValueError, match=r"missing \[.blocks.4.*unexpected \[\]"):
        model.load_pretrained(model.build("tiny", depth=5), str(good))
    with pytest.raises(ValueError, match=r"wrong shape.*embed"):
        model.load_pretrained(model.build("tiny", embed_dim=48), str(good))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        model.load_pretrained(model.vit_tiny(), str(tmp_path / "nope.pth"))


def test_grad_checkpointing_is_exact():
    """Recomputing blocks in backward (with drop path, whose random draws must be replayed) changes
    nothing."""
    results = []
    for recompute in (False, True):
        m = randomize(model.build("tiny", drop_path_rate=0.3)).train()
        m.grad_checkpointing = recompute
        torch.manual_seed(0)
        x = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(1))
        out = m.forward_features(x)
        out["x_norm_patchtokens"].square().mean().backward()
        grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
        results.append((out["x_norm_clstoken"].detach(), grads))
    (a, ga), (b, gb) = results
    assert len(ga) == len(gb) > 20 and torch.equal(a, b)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


@pytest.mark.parametrize("H,W", [(14, 14), (518, 518), (112, 196), (70, 42)])
def test_patch_embed_matmul_equals_the_conv(H, W):
    """The reshape + matmul patch embedding is the stride-p convolution (the float64 conv is the
    exact oracle; the fp32 conv itself sits within ~2e-6 of it, ours within 1e-6)."""
    pe = model.PatchEmbed(14, 3, 96)
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(H * W))
    # (2, 96, h, w)
    exact = F.conv2d(x.double(), pe.proj.weight.double(), pe.proj.bias.double(), stride=14)
    exact = exact.flatten(2).transpose(1, 2)  # (2, N, 96)
    with torch.no_grad():
        out = pe.as_matmul(x)  # the CUDA path, run here on the CPU
        conv = pe(x)  # the CPU path is the conv itself
    assert out.dtype == torch.float32 and out.shape == exact.shape == (2, (H // 14) * (W // 14), 96)
    assert (out.double() - exact).abs().max() < 1e-6
    assert torch.equal(conv, pe.proj(x).flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="divisible"):
        pe(torch.rand(1, 3, 28, 30))


def test_compiled_blocks_equal_eager(torch_compile):
    """model.compile_blocks: same outputs (eval, non-square, a second crop size, any batch) and
    same gradients (train, drop path, activation checkpointing) as eager to 1e-5; keys unchanged;
    compile time reported once."""
    import copy
    eager = randomize(model.build("tiny", drop_path_rate=0.2))
    logged = []
    comp = model.compile_blocks(copy.deepcopy(eager), log=logged.append)
    assert list(comp.state_dict()) == list(eager.state_dict())
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for B, H, W in [(3, 112, 112), (5, 112, 112), (2, 70, 98), (4, 70, 98)]:
            x = torch.rand(B, 3, H, W, generator=g)
            a, b = eager.forward_features(x), comp.forward_features(x)
            for k in ("x_norm_clstoken", "x_norm_patchtokens"):
                assert (a[k] - b[k]).abs().max() < 1e-5, (B, H, W, k)
    # one graph per token count, none per batch size
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert len(logged) <= 1 and all("compile" in line for line in logged)
    # a copy made after compiling runs its own weights (pretrain copies the student; probe casts a
    # copy to bf16)
    copied, scaled = copy.deepcopy(comp), copy.deepcopy(eager)
    with torch.no_grad():
        for m in (copied, scaled):
            m.blocks[1].ls2.gamma.mul_(3)
        x = torch.rand(2, 3, 112, 112, generator=g)
        a = copied.forward_features(x)["x_norm_patchtokens"]
        assert (a - scaled.forward_features(x)["x_norm_patchtokens"]).abs().max() < 1e-5
    x, w = torch.rand(4, 3, 112, 112, generator=g), torch.randn(4, 64, 96, generator=g)
    grads = []
    for m, recompute in ((eager, False), (comp, True)):
        m.train().grad_checkpointing = recompute
        torch.manual_seed(1)  # same drop-path draws
        # a random projection: no cancellation
        (m.forward_features(x)["x_norm_patchtokens"] * w).sum().backward()
        grads.append([p.grad for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 20
    for ge, gc in zip(*grads):
        assert (ge - gc).abs().max() <= 1e-5 * ge.abs().max()


# torch's default (pytest's monkeypatch undo deletes dynamo's key)
@torch._dynamo.config.patch(recompile_limit=8)
def test_compiled_checkpointed_blocks_survive_many_shapes():
    """Past dynamo's recompile limit a block runs eager; a checkpointed block compiled in its
    forward but eager in its recompute fails (bench.py all on CUDA, whose backward thread changes
    the thread count). compile_blocks must leave room for the shapes and modes of one process:
    train, 8 eval sizes, then a recompute in another thread state."""
    torch._dynamo.reset()  # entries of earlier tests count towards the limit
    # aot_eager: no C++ compiler needed
    vit = model.compile_blocks(randomize(model.build("tiny")), backend="aot_eager", log=None)
    vit.train().grad_checkpointing = True
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    vit.forward_features(x)["x_norm_clstoken"].sum().backward()
    with torch.no_grad():
        for side in range(28, 140, 14):  # 8 more entries: eval at 8 sizes
            vit.eval().forward_features(torch.rand(2, 3, side, side))
    out = vit.train().forward_features(x)["x_norm_clstoken"].sum()  # compiled (a cached entry)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # the recompute sees another global state
    try:
        out.backward()  # raised CheckpointError with room for 8 entries only
    finally:
        torch.set_num_threads(threads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vit.blocks.parameters())


def test_bf16_weights_agree_with_fp32():
    """The bf16-weights embedding mode (every parameter and the input in bf16, no autocast):
    pos_embed is still resampled for a non-square grid and the features stay close to fp32 (cosine
    > 0.99 per token)."""
    import copy
    ref = randomize(model.build("tiny"))
    bf = copy.deepcopy(ref).to(torch.bfloat16)
    # a 5 x 9 grid: pos_embed resampled
    x = torch.rand(3, 3, 70, 126, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ref.forward_features(x), bf.forward_features(x.to(torch.bfloat16))
        pos_a = ref.interpolate_pos_encoding(torch.zeros(1, 46, 96), 70, 126)
        pos_b = bf.interpolate_pos_encoding(torch.zeros(1, 46, 96, dtype=torch.bfloat16), 70, 126)
    assert pos_b.dtype == torch.bfloat16 and pos_b.shape == pos_a.shape == (1, 46, 96)
    # bf16 keeps 8 significant bits
    assert (pos_b.float() - pos_a).abs().max() <= 0.02 * pos_a.abs().max()
    for k in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert b[k].dtype == torch.bfloat16
        cos = F.cosine_similarity(a[k].reshape(-1, 96), b[k].float().reshape(-1, 96), dim=-1)
        assert cos.min() > 0.99, (k, cos.min())
