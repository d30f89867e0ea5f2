"""The RetinaNet lesion detector on a frozen ViT, as modules (detect.py trains and scores it).

After DBT-DINO §2.4 and §6.2.3 (torchvision too keeps its RetinaNet apart from its scripts).
- Pyramid (Neck): the last ViT block's patch map (37 x 37 for ViT-B/14 at DBT-DINO's 518 px), a 1x1
  conv to C channels (256), then P3 = bilinear x2 (74), P4 = the map (37), P5 = 2x2 max-pool (18),
  each through a 3x3 conv, and P6 = a stride-2 3x3 conv on P5 (9); no norms or activations.
- Head: shared by the levels, two towers (class, box) of 4 x (3x3 conv, GroupNorm(32), ReLU,
  dropout); 9 anchors per location; weights normal, std 0.001; class bias for P(lesion) = 0.05.
- Anchors: base sizes 16, 32, 64, 128 px on P3-P6 at 518 px (scaled with the image side), ratios
  h/w 0.5, 1, 2, scales 1, 2^(1/3), 2^(2/3); centres at (i + 0.5) x image_size / grid.
- Box coding: torchvision's BoxCoder with weights 1; decoding clamps dw, dh at log(1000/16).
- Matching: positive when the best IoU with a box is above fg_iou (0.5), negative below bg_iou
  (0.4), ignored between; torchvision's low-quality rescue is optional (DBT-DINO has none).
- Loss: focal (Lin et al. 2017; defaults alpha 0.9, gamma 1.5, smoothing 0.05, positives x 2) on
  positives and 3 sampled negatives each, smooth-L1 on their deltas; total cls_weight x cls + box.
Shapes: B images, A anchors, G ground-truth boxes, D backbone width, C neck channels, g patch grid.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms
from torchvision.ops import box_iou
from torchvision.ops import clip_boxes_to_image
from torchvision.ops import remove_small_boxes
from torchvision.ops import sigmoid_focal_loss

ANCHOR_SIZES = (16, 32, 64, 128)  # base size per level P3-P6 at 518 px; scaled with --image-size
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # h / w
ANCHOR_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))  # 1, 1.26, 1.587
BOX_CLAMP = math.log(1000 / 16)  # torchvision's clamp on decoded dw, dh
REF = 518  # DBT-DINO's image side, at which anchor sizes, size limits and augmentations are given


def grid_sizes(image_size, patch=14):
    """P3-P6 sides: x2 upsampling, the patch grid, 2x2 max-pool (floor), stride-2 conv (ceil)."""
    g = image_size // patch
    return 2 * g, g, g // 2, (g // 2 + 1) // 2


def make_anchors(image_size, grid_sizes):
    """(A, 4) xyxy anchors, level by level, row-major (y, x), 9 per location ratio-major then scale.

    DBT-DINO's float stride image_size/grid with centres at (i + 0.5) stride (torchvision floors
    the stride and starts at 0, which puts P6's last centres 0.56 stride off the centre line)."""
    levels = []
    for g, base in zip(grid_sizes, ANCHOR_SIZES):
        size = base * image_size / REF
        # (9, 2): w, h of area (size s)^2 and h/w = r, ratio-major
        wh = torch.tensor([(size * s / math.sqrt(r), size * s * math.sqrt(r))
                           for r in ANCHOR_RATIOS for s in ANCHOR_SCALES], dtype=torch.float64)
        cell = torch.cat([-wh / 2, wh / 2], dim=1)  # (9, 4)
        c = (torch.arange(g, dtype=torch.float64) + 0.5) * (image_size / g)
        cy, cx = torch.meshgrid(c, c, indexing="ij")  # (g, g)
        centre = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)  # (g*g, 1, 4)
        levels.append((centre + cell).reshape(-1, 4))  # (g*g*9, 4)
    return torch.cat(levels).float()


def _centre_size(b):
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode(anchors, boxes):
    """Regression targets (dx, dy, dw, dh) of xyxy boxes against anchors (BoxCoder, weights 1)."""
    ax, ay, aw, ah = _centre_size(anchors)
    gx, gy, gw, gh = _centre_size(boxes)
    return torch.stack([(gx - ax) / aw, (gy - ay) / ah, (gw / aw).log(), (gh / ah).log()], dim=-1)


def decode(anchors, deltas):
    """Inverse of encode; dw, dh clamped at log(1000/16), so a wild logit cannot overflow exp."""
    ax, ay, aw, ah = _centre_size(anchors)
    cx, cy = ax + deltas[..., 0] * aw, ay + deltas[..., 1] * ah
    w = aw * deltas[..., 2].clamp(max=BOX_CLAMP).exp()
    h = ah * deltas[..., 3].clamp(max=BOX_CLAMP).exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


class Neck(nn.Module):
    """DBT-DINO's simple pyramid P3-P6 from the last ViT map (no norms or activations)."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.lateral = nn.Conv2d(in_dim, dim, 1)
        self.p3, self.p4, self.p5 = (nn.Conv2d(dim, dim, 3, padding=1) for _ in range(3))
        self.p6 = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x):  # x (B, D, g, g)
        x = self.lateral(x)  # (B, C, g, g)
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        p3 = self.p3(up)  # (B, C, 2g, 2g)
        p5 = self.p5(F.max_pool2d(x, 2))  # (B, C, g//2, g//2)
        return [p3, self.p4(x), p5, self.p6(p5)]


class Head(nn.Module):
    """RetinaNet head shared by all levels: two towers of 4 x (conv, GroupNorm, ReLU, dropout)."""

    def __init__(self, dim, dropout, prior=0.05, n_anchors=9):
        super().__init__()

        def tower():
            return nn.Sequential(*[m for _ in range(4) for m in (
                nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.GroupNorm(32, dim),
                nn.ReLU(inplace=True), nn.Dropout(dropout))])
        self.cls_tower, self.box_tower = tower(), tower()
        self.cls = nn.Conv2d(dim, n_anchors, 3, padding=1)
        self.box = nn.Conv2d(dim, 4 * n_anchors, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # DBT-DINO's std 0.001 (torchvision: 0.01)
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # the prior: every anchor starts at P(lesion) = prior, so the first focal losses are not
        # swamped by the ~10^5 easy negatives (Lin et al. 2017)
        nn.init.constant_(self.cls.bias, -math.log((1 - prior) / prior))

    def forward(self, feats):
        logits, deltas = [], []
        for f in feats:  # (B, K, h, w) -> (B, h*w*9, K): the anchors' (y, x, anchor) order
            cls = self.cls(self.cls_tower(f)).permute(0, 2, 3, 1)  # (B, h, w, 9)
            box = self.box(self.box_tower(f)).permute(0, 2, 3, 1)  # (B, h, w, 36)
            logits.append(cls.reshape(len(f), -1))  # (B, h*w*9)
            deltas.append(box.reshape(len(f), -1, 4))  # (B, h*w*9, 4)
        return torch.cat(logits, 1), torch.cat(deltas, 1)  # (B, A), (B, A, 4)


class Detector(nn.Module):
    """Frozen backbone (kept in eval mode, no gradients) + trainable neck and head."""

    def __init__(self, backbone, dim, dropout):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.neck, self.head = Neck(backbone.embed_dim, dim), Head(dim, dropout)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_state(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def forward(self, x):  # x (B, 3, S, S) in [0, 1], grey replicated, no ImageNet normalisation
        with torch.no_grad():
            f = self.backbone.get_intermediate_layers(x, 1, reshape=True)[0]  # (B, D, g, g)
        return self.head(self.neck(f.float()))


def match(anchors, boxes, fg_iou, bg_iou, low_quality=False):
    """(A,) each anchor's box: >= 0 positive (IoU > fg_iou), -1 negative (< bg_iou), -2 ignored."""
    if len(boxes) == 0:
        return torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device)
    iou = box_iou(boxes, anchors)  # (G, A)
    best, idx = iou.max(0)
    matched = idx.clone()
    matched[best <= fg_iou] = -2
    matched[best < bg_iou] = -1
    if low_quality:  # torchvision's rescue of each box's best anchors, unless their IoU is 0
        top = iou.max(1, keepdim=True).values  # (G, 1)
        rescue = ((iou == top) & (top > 0)).any(0)
        matched[rescue] = idx[rescue]
    return matched


def focal_terms(logits, targets, alpha, gamma, smoothing=0.0):
    """Per-element sigmoid focal loss (torchvision) on label-smoothed targets y(1 - e) + e/2."""
    smoothed = targets * (1 - smoothing) + smoothing / 2
    return sigmoid_focal_loss(logits, smoothed, alpha=alpha, gamma=gamma, reduction="none")


def detection_loss(logits, deltas, anchors, targets, args, generator=None):
    """DBT-DINO's loss: focal on the positives (x pos_weight) and neg_ratio x as many sampled
    negatives (2000 when an image has no positive), smooth-L1 on the positives' deltas, each
    normalised by max(1, positives) per image and averaged over images.
    logits (B, A), deltas (B, A, 4), targets: B tensors (G_i, 4) -> named losses."""
    cls_terms, box_terms = [], []
    for b, boxes in enumerate(targets):
        m = match(anchors, boxes, args.fg_iou, args.bg_iou, args.low_quality_matches)
        pos, neg = torch.nonzero(m >= 0).squeeze(1), torch.nonzero(m == -1).squeeze(1)
        n_neg = min(len(neg), args.neg_ratio * len(pos) if len(pos) else 2000)
        neg = neg[torch.randperm(len(neg), generator=generator)[:n_neg]]
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(logits.device)
        focal = focal_terms(logits[b, torch.cat([pos, neg])], y, args.alpha, args.gamma,
                            args.label_smoothing)
        n = max(1, len(pos))
        cls_terms.append((focal[:len(pos)].sum() * args.pos_weight + focal[len(pos):].sum()) / n)
        target = encode(anchors[pos], boxes[m[pos]])  # (P, 4)
        # beta 1/9: Detectron's RetinaNet value; deltas are small, so beta 1 would be nearly all L2
        box_terms.append(F.smooth_l1_loss(deltas[b, pos], target, beta=1 / 9, reduction="sum") / n)
    cls, box = torch.stack(cls_terms).mean(), torch.stack(box_terms).mean()
    return {"cls": cls, "box": box, "loss": args.cls_weight * cls + box}


def postprocess(logits, deltas, anchors, image_size, score_thresh, nms_iou, max_det=100):
    """Per image of a chunk: sigmoid scores > score_thresh, decoded, clipped, one NMS over all
    levels (batched by image) -> list of (boxes (n, 4) xyxy, scores (n,)) in input pixels."""
    scores = logits.sigmoid()  # (B, A)
    img, a = torch.nonzero(scores > score_thresh, as_tuple=True)
    boxes = clip_boxes_to_image(decode(anchors[a], deltas[img, a]), (image_size, image_size))
    score = scores[img, a]
    keep = remove_small_boxes(boxes, 1.0)
    img, boxes, score = img[keep], boxes[keep], score[keep]
    keep = batched_nms(boxes, score, img, nms_iou)  # sorted by score
    img, boxes, score = img[keep], boxes[keep], score[keep]
    return [(boxes[img == i][:max_det], score[img == i][:max_det]) for i in range(len(logits))]
