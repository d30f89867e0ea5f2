"""The DINOv2 Vision Transformer and DINO head, written to be read; official checkpoints load as is.

Follows facebookresearch/dinov2 (Oquab et al. 2023; `dinov2/models/vision_transformer.py`,
`dinov2/layers/*`) and its registers variant (Darcet et al. 2024). DBT-DINO (§2.3) continues
pretraining dinov2_vitb14 on DBT slices and releases a DINOv2 teacher checkpoint, so everything here
is key-for-key the hub model, and the official weights give the original features. Shapes: B batch,
H/W image size, p patch size (14), h/w = H/p, W/p grid, N = h*w patch tokens, R register tokens (0
or 4), D width, nh heads, hd = D/nh, K prototypes.
Bottom-up, as the file reads:
    PatchEmbed   image (B, 3, H, W) -> (B, N, D): a p x p convolution with stride p, row-major
    Attention    multi-head self-attention; qkv packed as [q | k | v], softmax(q k^T / sqrt(hd)) v
    Mlp, SwiGLU  D -> 4D -> D with exact GELU; ViT-g's silu(x W1) * (x W2) -> W3 instead
    LayerScale   a learnt per-channel gamma on each residual branch
    Block        pre-norm: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), drop path on both
    ViT          patches (masked := mask_token) + [cls] + pos_embed, then registers: (B, 1+R+N, D)
                 -> blocks -> LayerNorm -> x_norm_clstoken (B, D), x_norm_patchtokens (B, N, D)
    DINOHead     3-layer MLP -> L2-normalised bottleneck -> weight-normed prototypes (K)

PRESETS (patch 14, a 37 x 37 pos_embed grid for 518 px): vits14 D 384, 12 blocks, 6 heads (22.1M
parameters); vitb14 768, 12, 12 (86.6M); vitl14 1024, 24, 16; vitg14 1536, 40, 24, SwiGLU; `tiny`
(96, 4, 3, 112 px) is ours, for tests and CPU runs. `_reg` adds 4 registers and resamples pos_embed
to an explicit size with antialias; the others use scale_factor (h + 0.1) / M (M the stored grid)
without it, as trained.

load_pretrained takes (a) a hub file (flat ViT keys); (b) DINOv2's teacher_checkpoint.pth,
{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}, blocks flat or FSDP-chunked; (c)
DBT-DINO's dbt_dino.pth (format b); (d) pretrain.py's ckpt.pt ({"teacher": ...}) and backbone.pth
(format a). pos_embed is resampled to the model's grid; other mismatches are errors.
"""
import math, re, time, types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import utils

# Named architectures (module docstring). A "_reg" suffix adds the registers variant's settings.
PRESETS = {
    "tiny": dict(img_size=112, embed_dim=96, depth=4, num_heads=3),
    "vits14": dict(embed_dim=384, depth=12, num_heads=6),
    "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
    "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
    "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
# The registers variant: pos_embed resampled to an explicit size, antialiased (module docstring).
REGISTERS = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens, row-major over the (h, w) grid."""

    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {self.patch_size}")
        if x.is_cuda:  # one GEMM: 0.93 ms, not cuDNN's 4.88, per 75 x 518 x 518 chunk (H100, bf16)
            return self.as_matmul(x)
        # on the CPU the conv is as fast, and keeps the numbers bit-identical with earlier runs: the
        # two order their sums differently, and a 1e-7 weight-gradient difference grows in training
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)

    def as_matmul(self, x):
        """The stride-p conv as one matmul over flattened patches, with the same `proj` weights."""
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        x = x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p): the conv weight's order
        weight = self.proj.weight.reshape(len(self.proj.weight), -1)  # (D, C*p*p)
        return F.linear(x, weight, self.proj.bias)  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        # the 3D output is [q | k | v], each split into contiguous heads (the checkpoints' order)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hd)
        # SDPA's default scale is hd^-0.5, as in DINOv2; it picks flash/memory-efficient kernels
        x = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, not the tanh approximation
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """ViT-g's FFN: silu(x W1) * (x W2) -> W3, with W1 and W2 packed in one `w12` matrix."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # 2/3: the FLOPs of a 4D MLP; x8 for kernels
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, rate, training):
    """Stochastic depth: zero the residual branch of whole samples, rescale the survivors."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio, ffn, init_values, drop_path_rate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = (SwiGLU if ffn == "swiglu" else Mlp)(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path_rate, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training)


class ViT(nn.Module):
    """DINOv2's DinoVisionTransformer with the hub's defaults; parameter names match its keys."""

    def __init__(self, img_size=518, patch_size=14, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, ffn="mlp", num_register_tokens=0,
                 interpolate_antialias=False, interpolate_offset=0.1, init_values=1.0,
                 drop_path_rate=0.0):
        super().__init__()
        # kept so a checkpoint can rebuild the model without the command line (build(**config))
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.n_blocks, self.num_register_tokens = depth, num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))  # no registers
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # in every hub checkpoint
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, ffn, init_values,
                                          drop_path_rate) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # recompute each block in backward instead of storing its activations: same numbers, far
        # less memory (~0.4 GB per 518 px ViT-B crop); off by default, as it costs one forward
        self.grad_checkpointing = False
        self.dynamic_batch = False  # set by compile_blocks: one compiled graph for every batch size
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """DINOv2's from-scratch init; irrelevant once a checkpoint is loaded, but reproducible."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x, H, W):
        """Resample the stored square pos_embed grid to this input's (H/p, W/p) grid, as DINOv2."""
        n_patch, n_stored = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if n_patch == n_stored and H == W:
            return self.pos_embed
        pos = self.pos_embed.float()  # bicubic in fp32 even under autocast, as the reference
        M = int(math.sqrt(n_stored))
        h, w = H // self.patch_size, W // self.patch_size
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        antialias = self.interpolate_antialias
        if self.interpolate_offset:
            # QUIRK kept: the released non-register weights were evaluated so. The +0.1 makes
            # floor(M * s) land on h, and the given scale (not h/M) drives the sampling
            scale = ((h + self.interpolate_offset) / M, (w + self.interpolate_offset) / M)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
        assert grid.shape[-2:] == (h, w), (
            f"pos_embed resampled to {tuple(grid.shape[-2:])}, wanted {(h, w)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)  # (1, N, D)
        return torch.cat([pos[:, :1], grid], dim=1).to(x.dtype)  # (1, 1+N, D)

    def prepare_tokens_with_masks(self, x, masks=None):
        B, _, H, W = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:  # masks (B, N) bool, True = hidden from the student (iBOT)
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, D)
        x = x + self.interpolate_pos_encoding(x, H, W)
        if self.register_tokens is not None:  # registers go after cls and get no position
            registers = self.register_tokens.expand(B, -1, -1)  # (B, R, D)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)  # (B, 1+R+N, D)
        return x

    def mark_batch_dynamic(self, tokens):
        """Tell torch.compile that the batch size of the block inputs varies (the last chunk of
        each volume), so compiled blocks recompile per token count and mode only."""
        if self.dynamic_batch:
            torch._dynamo.maybe_mark_dynamic(tokens, 0)
        return tokens

    def forward_features(self, x, masks=None):
        """DINOv2's dict of normed tokens; a list of crops (multi-crop training) gives a list."""
        if isinstance(x, (list, tuple)):
            masks = masks if masks is not None else [None] * len(x)
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks)]
        x = self.mark_batch_dynamic(self.prepare_tokens_with_masks(x, masks))
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:  # a recomputed block replays its RNG (drop path)
            x = checkpoint(blk, x, use_reentrant=False) if recompute else blk(x)
        x_norm = self.norm(x)
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # (B, D)
            "x_norm_regtokens": x_norm[:, 1:1 + R],  # (B, R, D)
            "x_norm_patchtokens": x_norm[:, 1 + R:],  # (B, N, D)
            "x_prenorm": x,  # (B, 1+R+N, D)
            "masks": masks,
        }

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """Outputs of the last n blocks (or of the blocks indexed by n), in order, no registers."""
        B, _, H, W = x.shape
        take = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        tokens, outputs = self.mark_batch_dynamic(self.prepare_tokens_with_masks(x)), []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        if len(outputs) != len(take):
            raise ValueError(f"asked for blocks {sorted(take)} of a {self.n_blocks}-block model")
        if norm:
            outputs = [self.norm(o) for o in outputs]
        cls = [o[:, 0] for o in outputs]  # (B, D) each
        patches = [o[:, 1 + self.num_register_tokens:] for o in outputs]  # (B, N, D) each
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size  # patches -> (B, D, h, w) each
            patches = [p.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        return tuple(zip(patches, cls)) if return_class_token else tuple(patches)

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]  # (B, D); the hub head is Identity


# --------------------------------------------------------------------------------------------------
# torch.compile

COMPILE_SECONDS = {}  # (tokens per image, dtype, training, grad) -> s of the first compiled forward


def vit_flops(vit, H, W):
    """Forward FLOPs (2 per multiply-add) of one image: matmuls and attention, not norms/softmax."""
    D, p, L = vit.embed_dim, vit.patch_size, vit.n_blocks
    n = (H // p) * (W // p)
    N = 1 + vit.num_register_tokens + n
    mlp = vit.blocks[0].mlp
    linears = [m for m in mlp.children() if isinstance(m, nn.Linear)]
    ffn = sum(m.in_features * m.out_features for m in linears)
    per_block = 2 * N * (3 * D * D + D * D + ffn) + 4 * N * N * D  # qkv, proj, FFN; QK^T and AV
    return 2 * n * 3 * p * p * D + L * per_block


def compile_blocks(vit, mode=None, log=print, dynamic_batch=True, **compile_kwargs):
    """Compile every transformer block of `vit` in place, for forward_features, forward and
    get_intermediate_layers alike; activation checkpointing works through them.

    - State dict keys are unchanged (no `_orig_mod.` prefix): the parameters stay where they were.
    - The blocks share one graph per (tokens per image, dtype, train/eval, grad): dynamo caches by
      code object and parameters are graph inputs, so 12 blocks compile once, 2-3 crop sizes give
      2-3 graphs per mode (static token counts, the fast kernels). With dynamic_batch the batch
      size is symbolic: a volume's last, shorter chunk does not recompile.
    - The first forward through a new key includes its compile time: the first in the process is
      reported through `log`, all are kept in COMPILE_SECONDS.
    - Each block's `forward` becomes the compiled Block.forward bound to it, so copy.deepcopy (and
      a later .to(torch.bfloat16)) runs its own weights; module hooks stay eager."""
    # One cache entry per (tokens, dtype, train/eval, grad, thread count): one process embedding,
    # training and evaluating passes dynamo's default of 8 (bench.py all did), then runs eager, and
    # a checkpointed block recomputed eagerly (CUDA's backward thread has another thread count)
    # saves other tensors than its compiled forward: CheckpointError. 64 is plenty.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # measured (H100, ViT-B/14, 518, chunk 75): 1055 -> 1375 slices/s under autocast, 1264 -> 1460
    # with bf16 weights; dbt-dino train_step at batch 32: 92 images/s (issue 14's eager figure: 67)
    # dynamic=False: static token counts, no automatic dynamic shapes after the second crop size
    forward = torch.compile(Block.forward, dynamic=False, mode=mode, **compile_kwargs)
    for blk in vit.blocks:
        blk.forward = types.MethodType(forward, blk)
    vit.dynamic_batch = dynamic_batch
    starts = []

    def start(module, args):  # patch_embed and the final norm run eagerly, around the blocks
        starts[:] = [time.perf_counter()]

    def stop(module, args, out):
        tokens = args[0]  # (B, T, D)
        key = (tuple(tokens.shape[1:]), str(tokens.dtype)[6:], module.training,
               torch.is_grad_enabled())
        if starts and key not in COMPILE_SECONDS:
            COMPILE_SECONDS[key] = time.perf_counter() - starts[0]
            if len(COMPILE_SECONDS) == 1 and log:
                log(f"torch.compile: first forward through the compiled blocks took "
                    f"{COMPILE_SECONDS[key]:.1f} s (tokens {key[0]}, {key[1]}, "
                    f"{'train' if key[2] else 'eval'}); other shapes and modes compile at first "
                    "use (model.COMPILE_SECONDS)")
        starts.clear()
    vit.patch_embed.register_forward_pre_hook(start)
    vit.norm.register_forward_hook(stop)
    return vit


# --------------------------------------------------------------------------------------------------
# The DINO/iBOT projection head, beside the ViT as in DINO (DINOv2 teacher checkpoints carry it)

class WeightNormLinear(nn.Module):
    """Bias-free linear layer, weight = g * v / ||v|| per output row (torch weight_norm's g, v)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # PyTorch's default init, kept
        self.weight_v = nn.Parameter(v.clone())  # (K, bottleneck)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))  # (K, 1): 1 and trainable, as DINOv2

    def forward(self, x):
        scale = self.weight_g / self.weight_v.norm(dim=1, keepdim=True)  # (K, 1)
        return F.linear(x, self.weight_v * scale)


class DINOHead(nn.Module):
    """DINOv2 projection head: 3-layer MLP -> L2-normalised bottleneck -> weight-normed prototypes.
    Keys mlp.{0,2,4}.*, last_layer.weight_{g,v}: DINOv2 teacher checkpoints load unchanged."""

    def __init__(self, in_dim, out_dim=65536, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x):
        x = self.mlp(x)  # (n, bottleneck)
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)  # (n, K)


@torch.no_grad()
def patch_mean_std(backbone, images, device, chunk=64):
    """DBT-DINO's frozen slice feature: mean and std (unbiased, torch's default) of the last layer's
    normed patch tokens, (M, 3, H, W) images -> (M, 2D) on the CPU."""
    feats = []
    for x in images.split(chunk):
        p = backbone.forward_features(x.to(device))["x_norm_patchtokens"].float()  # (b, N, D)
        feats.append(torch.cat([p.mean(1), p.std(1)], dim=1).cpu())  # (b, 2D)
    return torch.cat(feats)


# --------------------------------------------------------------------------------------------------
# Builders named like the torch.hub entry points; `weights` is a local file (nothing is downloaded).

def build(name, weights=None, **kwargs):
    """A PRESETS architecture by name: build("vitb14"), build("tiny"),
    build("vits14_reg", weights="dinov2_vits14_reg4_pretrain.pth")."""
    base = name[:-4] if name.endswith("_reg") else name
    if base not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(PRESETS)} "
                         "(optionally with _reg)")
    cfg = dict(PRESETS[base], **(REGISTERS if name.endswith("_reg") else {}))
    model = ViT(**dict(cfg, **kwargs))
    return load_pretrained(model, weights) if weights is not None else model


def dinov2_vits14(weights=None, **kwargs):
    return build("vits14", weights, **kwargs)

def dinov2_vitb14(weights=None, **kwargs):
    return build("vitb14", weights, **kwargs)

def dinov2_vitl14(weights=None, **kwargs):
    return build("vitl14", weights, **kwargs)

def dinov2_vitg14(weights=None, **kwargs):
    return build("vitg14", weights, **kwargs)

def dinov2_vits14_reg(weights=None, **kwargs):
    return build("vits14_reg", weights, **kwargs)

def dinov2_vitb14_reg(weights=None, **kwargs):
    return build("vitb14_reg", weights, **kwargs)

def dinov2_vitl14_reg(weights=None, **kwargs):
    return build("vitl14_reg", weights, **kwargs)

def dinov2_vitg14_reg(weights=None, **kwargs):
    return build("vitg14_reg", weights, **kwargs)

def vit_tiny(weights=None, **kwargs):
    return build("tiny", weights, **kwargs)


# --------------------------------------------------------------------------------------------------
# Checkpoints

def backbone_state_dict(ckpt, name="<state dict>"):
    """Any checkpoint of formats (a)-(d) (module docstring) -> hub-format backbone keys: training
    wrappers, DDP/compile/ModuleDict prefixes, heads and FSDP block chunks dropped."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{name}: not a checkpoint (a {type(ckpt).__name__}, not a dict of "
                         "tensors)")
    for key in ("teacher", "model", "state_dict"):  # training files wrap the weights one level down
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    out = {}
    for k, v in ckpt.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod.", "backbone."):  # DDP, torch.compile, DINOv2's dict
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k.startswith(("dino_head.", "ibot_head.", "head.")):
            continue  # projection heads are not part of the backbone
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)] = v  # un-chunk FSDP BlockChunks
    if not out:
        raise ValueError(f"{name}: no tensors found; is this a model checkpoint?")
    return out


def resample_pos_embed(pos_embed, grid, antialias):
    """(1, 1+M*M, D) -> (1, 1+grid*grid, D): bicubic on the patch part, cls position kept."""
    M = int(math.sqrt(pos_embed.shape[1] - 1))
    patch = pos_embed[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=antialias)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)  # (1, grid*grid, D)
    return torch.cat([pos_embed[:, :1].float(), patch], dim=1).to(pos_embed.dtype)


def load_pretrained(model, path_or_state_dict):
    """Load DINOv2 / DBT-DINO / our weights into `model`; a key or shape mismatch lists them all."""
    name = "<state dict>"
    ckpt = path_or_state_dict
    if not isinstance(ckpt, dict):
        name = str(path_or_state_dict)
        ckpt = utils.read_checkpoint(name)
    state = backbone_state_dict(ckpt, name)
    own = model.state_dict()
    pos, own_pos = state.get("pos_embed"), own.get("pos_embed")
    if pos is not None and own_pos is not None and pos.shape != own_pos.shape:  # another grid
        grid = int(math.sqrt(own_pos.shape[1] - 1))
        state["pos_embed"] = resample_pos_embed(pos, grid, model.interpolate_antialias)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"{name}: does not fit the model: missing {missing}; unexpected "
                         f"{unexpected}; wrong shape {shapes}")
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------------------------------
# Training a ViT: DINOv2's layer-wise LR decay (pretrain.py) and which parameters train (probe.py)

EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
PATCH_EMBED_LR_MULT = 0.2  # DINOv2's patch_embed_lr_mult


def layer_id(name, depth):
    """DINOv2's layer of a parameter named backbone.* (a ViT) or otherwise (a head): 0 for the
    embeddings, i + 1 for backbone.blocks.i, depth + 1 for the final norm and every head."""
    if not name.startswith("backbone."):
        return depth + 1
    short = name[len("backbone."):]
    if short.startswith(EMBEDDINGS):
        return 0
    return int(short.split(".")[1]) + 1 if short.startswith("blocks.") else depth + 1


def param_groups(module, depth, layer_decay, patch_embed_lr_mult=PATCH_EMBED_LR_MULT):
    """AdamW groups of `module`'s parameters that require grad, by DINOv2's rule: lr_mult =
    layer_decay^(depth + 1 - layer_id) (x patch_embed_lr_mult for patch_embed), wd_mult 0 on
    biases, norms and LayerScale gammas, last_layer True for a DINO head's prototype layer."""
    groups = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:  # frozen: no group, so no step and no weight decay either
            continue
        lr_mult = layer_decay ** (depth + 1 - layer_id(name, depth))
        lr_mult *= patch_embed_lr_mult if "patch_embed" in name else 1.0
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        key = (lr_mult, wd_mult, "last_layer" in name)
        groups.setdefault(key, dict(params=[], lr_mult=lr_mult, wd_mult=wd_mult, last_layer=key[2]))
        groups[key]["params"].append(p)
    return list(groups.values())


def set_rates(optimizer, lr, wd, last_layer_lr=None):
    """This step's LR and weight decay in each param_groups group: lr x lr_mult (a DINO head's
    prototype layer: last_layer_lr x lr_mult, when given) and wd x wd_mult."""
    for g in optimizer.param_groups:
        top = last_layer_lr if g["last_layer"] and last_layer_lr is not None else lr
        g["lr"], g["weight_decay"] = top * g["lr_mult"], wd * g["wd_mult"]


def set_trainable(vit, n_blocks):
    """Freeze `vit` except its last n_blocks blocks and the final norm; -1: every parameter
    (the embeddings too), 0: none. -> the names of the parameters left trainable."""
    first = 0 if n_blocks == -1 else vit.n_blocks - n_blocks  # the first trainable block
    for name, p in vit.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        p.requires_grad_(n_blocks == -1 or (n_blocks > 0 and (
            name.startswith("norm.") or (block is not None and block >= first))))
    return [name for name, p in vit.named_parameters() if p.requires_grad]


def image_stats(backbone, x, stats):
    """(B, 3, H, W) -> (B, F): per image, the `stats` (names as probe.aggregate's: patch_mean,
    patch_std (unbiased), patch_min, patch_max of the normed patch tokens, cls_mean the CLS
    token), concatenated in that order; differentiable."""
    o = backbone.forward_features(x)
    p, cls = o["x_norm_patchtokens"].float(), o["x_norm_clstoken"].float()  # (B, N, D), (B, D)
    s = dict(patch_mean=p.mean(1), patch_std=p.std(1), patch_min=p.amin(1), patch_max=p.amax(1),
             cls_mean=cls)
    return torch.cat([s[k] for k in stats], 1)  # (B, F)


class Classifier(nn.Module):
    """probe.py's fine-tuned network: grey images (B, 1, H, W), repeated to 3 channels, through
    the backbone, image_stats, standardised, a Linear to `out` logits. The standardisation is a
    BatchNorm without affine terms (MAE's linear-probe head): batch statistics in training; in
    evaluation the statistics the caller sets (probe.py: the train images' under the current
    weights, a frozen probe's). Names backbone.*, norm.*, head.*: param_groups' layers."""

    def __init__(self, backbone, stats, out):
        super().__init__()
        self.backbone, self.stats = backbone, stats
        n = len(stats) * backbone.embed_dim  # F
        self.norm = nn.BatchNorm1d(n, eps=1e-12, affine=False)
        self.head = nn.Linear(n, out)

    def forward(self, x):  # (B, 1, H, W) -> (B, out)
        f = image_stats(self.backbone, x.expand(-1, 3, -1, -1), self.stats)  # (B, F)
        return self.head(self.norm(f))


def block_count(path):
    """The transformer blocks of a backbone file, read memory-mapped (cheap), or None when it
    cannot be read so (load_backbone then says why)."""
    try:
        state = backbone_state_dict(torch.load(path, map_location="cpu", weights_only=True,
                                               mmap=True), path)
    except Exception:  # a legacy (non-zip) or broken file: the real load names the problem
        return None
    return len({k.split(".")[1] for k in state if k.startswith("blocks.")}) or None


# --------------------------------------------------------------------------------------------------
# The frozen backbones of the downstream scripts

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCH_BY_WIDTH = {96: "tiny", 384: "vits14", 768: "vitb14", 1024: "vitl14", 1536: "vitg14"}


class DenseNetFeatures(nn.Module):
    """DBT-DINO's CNN baseline: torchvision DenseNet-121 (ImageNet normalisation inside), pooled to
    1024-d per slice, returned as the CLS and the only patch token (aggregate(): mean, std)."""

    def __init__(self, weights=None):
        super().__init__()
        import torchvision  # only this baseline needs it
        net = torchvision.models.densenet121(weights=None)
        if weights:
            state = utils.read_checkpoint(weights)
            if not isinstance(state, dict):
                raise ValueError(f"{weights}: not a DenseNet-121 state dict (a "
                                 f"{type(state).__name__})")
            # torchvision's released file names layers "norm.1"; the module calls them "norm1"
            state = {re.sub(r"\.(norm|relu|conv)\.([12])(?=\.)", r".\1\2", k): v
                     for k, v in state.items()}
            try:
                net.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"{weights}: not a DenseNet-121 state dict "
                                 f"({str(e).splitlines()[0]})") from None
        self.features = net.features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.config = {"img_size": 224}

    def forward_features(self, x):
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        pooled = F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)  # (B, 1024)
        return {"x_norm_clstoken": pooled, "x_norm_patchtokens": pooled[:, None]}  # (B, 1, D)


def load_backbone(spec="", arch="auto", weights="", seed=0):
    """-> (frozen backbone with forward_features, one-line description).

    spec: a load_pretrained file (`arch` names the architecture; auto: from the width),
    densenet121, random (a seeded untrained ViT: tiny, or `arch`), or '' (the newest
    runs/*/backbone.pth, else random)."""
    if spec == "densenet121":
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # random weights are reproducible, so cache entries are reused
            net = DenseNetFeatures(weights or None)
        source = weights or f"RANDOM weights (seed {seed})"
        return net.eval(), f"DenseNet-121, {source}, ImageNet normalisation"
    if weights:
        raise ValueError("--weights is only for --backbone densenet121; give a ViT file as "
                         "--backbone PATH")
    spec, how = utils.backbone_file(spec)
    if not spec:  # --arch picks the random ViT (a random ViT-B baseline); a bad name is one line
        name = "tiny" if arch == "auto" else arch
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = build(name)
        return net.eval(), f"RANDOMLY INITIALISED {name} ViT (seed {seed}; {how})"
    state = backbone_state_dict(utils.read_checkpoint(spec), spec)
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{spec}: not a ViT backbone (no pos_embed / patch_embed)")
    width = state["pos_embed"].shape[-1]
    if arch == "auto":
        if width not in ARCH_BY_WIDTH:
            raise ValueError(f"{spec}: width {width} matches no architecture; name one with --arch")
        arch = ARCH_BY_WIDTH[width] + ("_reg" if "register_tokens" in state else "")
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    patch = state["patch_embed.proj.weight"].shape[-1]
    net = load_pretrained(build(arch, img_size=grid * patch, patch_size=patch), state)
    return net.eval(), f"{spec} ({arch}, {grid * patch} px, {how})"
