"""RegistrationNet: image pixels and prototype points embedded in one space, in plain torch.

- Image branch: a small residual encoder (strides 2-16) with an attention-pooled global-context vector
  (identity cues such as skin tone, hair colour and build are global; the learned pooling looks at the
  person, not the backdrop) and a feature-pyramid decoder back to stride 4, giving L2-normalised D-dim
  pixel embeddings and 16-class part logits (0 bg, 1-14 parts, 15 occluder); optionally a material head
  (none, skin, hair, top, bottom, shoes, from garments.png) whose masks add skin and hair colours to the
  per-image part-colour code.
- Point branch: a DGCNN-style encoder over a static kNN graph. All prototypes share one sampling
  (point i is the same anatomical place on every body), so the graph is computed once per point-set
  topology and cached. Edge layers use a linear edge function with mean aggregation, computed as one
  sparse product for all prototypes at once (a (P,N,k,C) neighbour tensor was 3-4x slower on CPU).
  Point features: xyz, normals, albedo; a max-pooled global descriptor is appended to every point. The
  who-half also reads K fixed body places (AnchorReadout): local girth, proportions and hair colour.
- Factorised embedding (model.identity_dim > 0): every embedding is [where | who], each half unit-length
  and weighted, so cos = (1-s) cos_where + s cos_who. A point's who-half is its prototype's (one vector
  per identity); a pixel's who-half is its own evidence (part colours, context). The best match of a
  pixel inside a prototype is therefore chosen by WHERE it is on the body, and WHO only raises or lowers
  that prototype's similarities: the correspondence rate (same part, similarity >= T) then measures
  registration and identity together instead of the identity term dragging matches to other parts.

Inputs to `encode_image` are RGB in [0, 1]; normalisation happens inside.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoreg.dataset import GARMENT_LABELS
from protoreg.parts import NUM_LABELS
from trainer.config import ModelConfig

__all__ = ["ImageFeatures", "ModelConfig", "RegistrationNet", "count_parameters", "knn_graph"]


IMAGE_MEAN = (0.45, 0.42, 0.40)
IMAGE_STD = (0.25, 0.25, 0.25)


@dataclass
class ImageFeatures:
    embeddings: Tensor  # (B, D, h, w) L2-normalised over D
    seg_logits: Tensor  # (B, 16, h, w)
    stride: int  # input pixels per feature cell
    material_logits: Tensor | None = None  # (B, 6, h, w): GARMENT_LABELS, when model.material_head


def factorised(where: Tensor, who: Tensor | None, share: float, dim: int) -> Tensor:
    """Unit embeddings [sqrt(1-s) n(where), sqrt(s) n(who)] along `dim`: the cosine of two such embeddings
    is (1-s) cos(where) + s cos(who), so a prototype's best-matching point is chosen by the where-half
    (one identity's points share most of their who-half) while the who-half lifts or sinks every match."""
    if who is None:
        return F.normalize(where.float(), dim=dim)
    w = F.normalize(where.float(), dim=dim) * (1 - share) ** 0.5
    return torch.cat([w, F.normalize(who.float(), dim=dim) * share**0.5], dim=dim)


EXPOSURE_QUANTILE = 0.95
EXPOSURE_GAIN = (0.5, 3.0)


def exposure_normalised(images: Tensor, target: float) -> Tensor:
    """Each (3, H, W) image in [0, 1] scaled so that its EXPOSURE_QUANTILE grey level is `target`, then
    clipped: the scene's exposure is unknown to the recogniser, so the network never learns to read it."""
    grey = images.float().mean(dim=1).flatten(1)  # (B, HW)
    level = torch.quantile(grey, EXPOSURE_QUANTILE, dim=1).clamp_min(1e-3)
    gain = (target / level).clamp(*EXPOSURE_GAIN)
    return (images.float() * gain[:, None, None, None]).clamp(0.0, 1.0).to(images.dtype)


def identity_dims(cfg: ModelConfig) -> int:
    """The who-half's size: model.identity_dim, at most half the embedding."""
    if cfg.identity_dim < 0 or not 0 <= cfg.identity_share < 1:
        raise ValueError(
            f"model.identity_dim / identity_share: expected >= 0 and in [0, 1), got {cfg.identity_dim} / "
            f"{cfg.identity_share}"
        )
    return min(int(cfg.identity_dim), cfg.embed_dim // 2)


def conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ResBlock(nn.Module):
    """Strided 3x3 conv then a residual 3x3 pair: the encoder's unit."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.down = conv_bn(cin, cout, stride)
        self.conv1 = conv_bn(cout, cout)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return F.relu(x + self.conv2(self.conv1(x)))


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.widths
        if len(w) != 4:
            raise ValueError(f"model.widths: expected 4 widths (strides 2, 4, 8, 16), got {list(w)}")
        d = cfg.decoder_width
        self.stem = conv_bn(3, w[0], 2)
        self.stage1 = ResBlock(w[0], w[1], 2)
        self.stage2 = ResBlock(w[1], w[2], 2)
        self.stage3 = ResBlock(w[2], w[3], 2)
        self.pool = nn.Conv2d(w[3], 1, 1)  # attention pooling: where the global context looks
        self.context = nn.Sequential(nn.Linear(w[3], d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.lat3 = nn.Conv2d(w[3], d, 1)
        self.lat2 = nn.Conv2d(w[2], d, 1)
        self.lat1 = nn.Conv2d(w[1], d, 1)
        self.fuse = nn.Sequential(conv_bn(d, d), conv_bn(d, d))
        self.id_dim, self.share = identity_dims(cfg), cfg.identity_share
        self.embed = nn.Conv2d(d, cfg.embed_dim - self.id_dim, 1)
        self.who = nn.Conv2d(d, self.id_dim, 1) if self.id_dim else None
        self.seg = nn.Conv2d(d, NUM_LABELS, 1)
        self.material = nn.Conv2d(d, len(GARMENT_LABELS), 1) if cfg.material_head else None
        self.exposure = float(cfg.auto_exposure)
        colour_inputs = NUM_LABELS + (len(GARMENT_LABELS) if cfg.material_head else 0)
        # Part colours: the mean input colour and its spread under each predicted part (skin on the hands
        # and face, hair on the head, ...), a per-image appearance code added to every pixel's who-half; the
        # image-side twin of the point branch's appearance shortcut. Identity lives in these colours, not in
        # the pixel's own.
        self.part_colour = nn.Sequential(
            nn.Linear(colour_inputs * 7, d), nn.ReLU(inplace=True), nn.Linear(d, self.id_dim or cfg.embed_dim)
        )
        self.register_buffer("mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.exposure > 0:
            images = exposure_normalised(images, self.exposure)
        x = (images - self.mean) / self.std
        c1 = self.stage1(self.stem(x))  # stride 4
        c2 = self.stage2(c1)  # stride 8
        c3 = self.stage3(c2)  # stride 16
        attn = self.pool(c3).flatten(2).float().softmax(dim=-1)  # (B, 1, hw)
        pooled = (c3.flatten(2).float() * attn).sum(-1).to(c3.dtype)
        ctx = self.context(pooled)[:, :, None, None]
        p = self.lat3(c3) + ctx
        p = F.interpolate(p, size=c2.shape[-2:], mode="nearest") + self.lat2(c2)
        p = F.interpolate(p, size=c1.shape[-2:], mode="nearest") + self.lat1(c1)
        p = self.fuse(p)
        seg = self.seg(p)
        material = None if self.material is None else self.material(p)
        code = self.appearance_code(images, seg, material)[:, :, None, None]
        if self.who is None:
            return factorised(self.embed(p) + code, None, 0.0, 1), seg, material
        return factorised(self.embed(p), self.who(p) + code, self.share, 1), seg, material

    def appearance_code(self, images: Tensor, seg: Tensor, material: Tensor | None = None) -> Tensor:
        """(B, D): mean colour, colour spread and share under each predicted part (and each material, with
        the material head), through a small MLP."""
        probs = seg.detach().float().softmax(dim=1)  # (B, 16, h, w); no gradient into the segmentation
        if material is not None:
            probs = torch.cat([probs, material.detach().float().softmax(dim=1)], dim=1)
        share = probs.sum(dim=(2, 3)) / (probs.shape[-1] * probs.shape[-2])  # (B, 16)
        # Colours are read at the input's resolution under sharpened probabilities: a 4x4 block on the
        # outline, or a pixel the segmentation is unsure of, mixes backdrop, occluder or the next part into
        # the part's colour (docs/benchmarks.md, eighth session)
        weight = F.interpolate(probs, size=images.shape[-2:], mode="bilinear", align_corners=False) ** 3
        mass = weight.sum(dim=(2, 3))
        x = images.float()
        colour = torch.einsum("bkhw,bchw->bkc", weight, x) / (mass[..., None] + 1e-3)
        power = torch.einsum("bkhw,bchw->bkc", weight, x * x) / (mass[..., None] + 1e-3)
        spread = (power - colour * colour).clamp_min(0).add(1e-4).sqrt()  # hair and face mixed in the head
        feats = torch.cat([(colour - 0.5) * 4, spread * 8, share[..., None] * 4], dim=-1)  # (B, 16, 7)
        return self.part_colour(feats.flatten(1))


def knn_graph(points: Tensor, k: int) -> Tensor:
    """(N, k) indices of each point's k nearest neighbours (itself excluded), by Euclidean distance."""
    n = points.shape[0]
    k = min(k, n - 1)
    d = torch.cdist(points.float(), points.float())
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).indices


class NeighbourGraph:
    """A static kNN graph as row-normalised sparse adjacency (and its transpose, for the backward pass)."""

    def __init__(self, nbrs: Tensor) -> None:
        n, k = nbrs.shape
        with warnings.catch_warnings():  # torch labels sparse CSR 'beta'; the products used here are plain
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.arange(n).repeat_interleave(k)
            adj = torch.sparse_coo_tensor(
                torch.stack([rows, nbrs.reshape(-1).cpu()]), torch.full((n * k,), 1.0 / k), (n, n)
            ).coalesce()
            self.nbrs = nbrs
            self.adj = adj.to_sparse_csr()
            self.adj_t = adj.t().coalesce().to_sparse_csr()

    def to(self, device: torch.device | str) -> NeighbourGraph:
        if self.adj.device == torch.device(device):
            return self
        out = NeighbourGraph.__new__(NeighbourGraph)
        out.nbrs, out.adj, out.adj_t = self.nbrs.to(device), self.adj.to(device), self.adj_t.to(device)
        return out


class _NeighbourMean(torch.autograd.Function):
    """y = A x with the transpose precomputed for the gradient (sparse CSR products both ways)."""

    @staticmethod
    def forward(ctx, x: Tensor, adj: Tensor, adj_t: Tensor) -> Tensor:  # noqa: ANN001
        ctx.adj_t = adj_t
        return adj @ x

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        return ctx.adj_t @ grad.contiguous(), None, None


def neighbour_mean(v: Tensor, graph: NeighbourGraph) -> Tensor:
    """Mean of each point's neighbours' features: (P,N,C) -> (P,N,C), one sparse product for all P."""
    p, n, c = v.shape
    x = v.transpose(0, 1).reshape(n, p * c).float()
    y = _NeighbourMean.apply(x, graph.adj, graph.adj_t)
    return y.reshape(n, p, c).transpose(0, 1).to(v.dtype)


class EdgeLayer(nn.Module):
    """Static-graph edge convolution with a linear edge function and mean aggregation:
    h_i = relu(LN(A x_i + B mean_j (x_j - x_i))), j over the kNN of i (GraphSAGE/DGCNN-like)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.center = nn.Linear(cin, cout)
        self.neigh = nn.Linear(cin, cout, bias=False)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: Tensor, graph: NeighbourGraph) -> Tensor:
        rel = neighbour_mean(x, graph) - x
        return F.relu(self.norm(self.center(x) + self.neigh(rel)))


def farthest_points(points: Tensor, k: int) -> Tensor:
    """(k,) indices of a farthest-point sample of (N, 3) points, starting from point 0 (deterministic)."""
    k = min(k, points.shape[0])
    chosen = torch.zeros(k, dtype=torch.long)
    dist = torch.full((points.shape[0],), float("inf"))
    for i in range(1, k):
        dist = torch.minimum(dist, ((points - points[chosen[i - 1]]) ** 2).sum(-1))
        chosen[i] = int(dist.argmax())
    return chosen


class AnchorReadout(nn.Module):
    """Who-evidence from fixed places on the body. The max-pooled global descriptor barely tells two similar
    bodies apart (their who-halves came out at cosine 0.95-0.99 for several pairs of the demo cast); here each
    of K anchors (rest-pose positions, set once from the training prototypes' mean) pools its nearby points'
    offset from it and their albedo, so girth, proportions and the hair colour on the scalp reach the
    who-half as numbers a linear map can separate (the closest pair of the demo cast fell from 0.99 to 0.96).
    Works for any point count."""

    def __init__(self, k: int, sigma: float, out_dim: int) -> None:
        super().__init__()
        self.sigma = sigma
        self.register_buffer("anchors", torch.zeros(k, 3))
        self.norm = nn.LayerNorm(k * 6)
        self.out = nn.Linear(k * 6, out_dim)

    def set_anchors(self, mean_points: Tensor) -> None:
        """Anchors = a farthest-point sample of the (N, 3) mean prototype (stored with the weights)."""
        pts = mean_points.detach().float().cpu()
        k = self.anchors.shape[0]
        idx = farthest_points(pts, k).repeat(-(-k // pts.shape[0]))[:k]  # fewer points than anchors: reuse
        self.anchors.copy_(pts[idx].to(self.anchors.device))

    def forward(self, xyz: Tensor, albedo: Tensor) -> Tensor:
        d2 = torch.cdist(self.anchors[None].expand(xyz.shape[0], -1, -1), xyz.float()) ** 2  # (P, K, N)
        w = torch.softmax(-d2 / (2 * self.sigma**2), dim=-1)
        offset = (w @ xyz.float() - self.anchors[None]) / self.sigma  # (P, K, 3)
        colour = w @ ((albedo.float().clamp_min(0).sqrt() - 0.5) * 4)  # (P, K, 3)
        return self.out(self.norm(torch.cat([offset, colour], dim=-1).flatten(1)))


class PointEncoder(nn.Module):
    """Per-point input MLP, static-graph edge layers, then a head that sees the point's multi-scale local
    features plus the set's global descriptor (max-pooled, projected once per set, not per point)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cin = 3 + (3 if cfg.use_normals else 0) + (3 if cfg.use_albedo else 0)
        self.cfg = cfg
        w0 = cfg.point_widths[0]
        self.input = nn.Sequential(nn.Linear(cin, w0), nn.LayerNorm(w0), nn.ReLU())
        layers, c = [], w0
        for w in cfg.point_widths:
            layers.append(EdgeLayer(c, w))
            c = w
        self.layers = nn.ModuleList(layers)
        cat = sum(cfg.point_widths)
        hidden = 2 * cfg.embed_dim
        self.global_proj = nn.Sequential(
            nn.Linear(cat, cfg.point_global), nn.ReLU(), nn.Linear(cfg.point_global, hidden)
        )
        self.local_proj = nn.Linear(cat, hidden)
        self.id_dim, self.share = identity_dims(cfg), cfg.identity_share
        out_dim = cfg.embed_dim - self.id_dim
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        # the who-half, from the set's global descriptor (one vector per prototype)
        who_head = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, self.id_dim))
        self.who = who_head if self.id_dim else None
        # Appearance shortcut: the point's own colour and its set's mean colour straight into the embedding.
        # Without it the same point of different people starts (and stays) almost identical, and the
        # identity gradient, a product of two near-zero differences, never gets going.
        self.appearance = nn.Linear(6, self.id_dim or cfg.embed_dim) if cfg.use_albedo else None
        use_anchors = cfg.shape_anchors > 0 and self.id_dim > 0 and cfg.use_albedo
        self.anchors = None
        if use_anchors:
            self.anchors = AnchorReadout(cfg.shape_anchors, cfg.anchor_sigma, self.id_dim)

    def forward(self, feats: Tensor, graph: NeighbourGraph) -> Tensor:
        x = self.input(feats)
        outs = []
        for layer in self.layers:
            x = layer(x, graph)
            outs.append(x)
        local = torch.cat(outs, dim=-1)  # (P, N, sum(widths))
        glob = self.global_proj(local.amax(dim=1))  # (P, hidden): identity-level shape and colour summary
        h = self.local_proj(local) + glob[:, None, :]
        where = self.head(h)
        look = None
        if self.appearance is not None:
            colour = (feats[..., -3:].clamp_min(0).sqrt() - 0.5) * 4  # albedo, roughly perceptual, centred
            mean = colour.mean(dim=1, keepdim=True).expand_as(colour)
            look = self.appearance(torch.cat([colour, mean], dim=-1))
        if self.who is None:
            return factorised(where if look is None else where + look, None, 0.0, -1)
        # One who-vector per set (its shape and colour summary, the same for every point): which point of a
        # prototype a pixel matches is then decided by the where-half alone, and the who-half only
        # raises or lowers the whole prototype's similarities.
        who = self.who(glob)[:, None, :]
        if look is not None:
            who = who + look.mean(dim=1, keepdim=True)
        if self.anchors is not None:
            who = who + self.anchors(feats[..., :3], feats[..., -3:])[:, None, :]
        return factorised(where, who.expand(-1, where.shape[1], -1), self.share, -1)


class RegistrationNet(nn.Module):
    """Pixels and prototype points in one L2-normalised embedding space, plus part segmentation."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        # channels-last convolutions ran ~1.7x faster on this CPU (oneDNN); weights are the same numbers
        self.image_encoder = ImageEncoder(self.config).to(memory_format=torch.channels_last)
        self.point_encoder = PointEncoder(self.config)
        self.log_temperature = nn.Parameter(torch.tensor(float(self.config.temperature_init)).log())
        self._knn_cache: OrderedDict[tuple, NeighbourGraph] = OrderedDict()
        self._fixed_graph: NeighbourGraph | None = None

    @property
    def stride(self) -> int:
        return 4

    @property
    def temperature(self) -> Tensor:
        """Softmax temperature of the cosine similarities (learnable, clamped to [0.01, 1])."""
        return self.log_temperature.exp().clamp(0.01, 1.0)

    def encode_image(self, images: Tensor) -> ImageFeatures:
        """images (B,3,H,W) float in [0,1] -> ImageFeatures at stride 4."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_image: expected (B,3,H,W) images, got {tuple(images.shape)}")
        emb, seg, material = self.image_encoder(images.contiguous(memory_format=torch.channels_last))
        material = None if material is None else material.float()
        return ImageFeatures(F.normalize(emb.float(), dim=1), seg.float(), self.stride, material)

    def set_anchors(self, mean_points: Tensor) -> None:
        """Place the who-half's shape anchors on the (N, 3) mean training prototype (no-op when off)."""
        if self.point_encoder.anchors is not None:
            self.point_encoder.anchors.set_anchors(mean_points)

    def set_point_graph(self, nbrs: Tensor | None) -> None:
        """Fix the kNN graph (N,k) used for every N-point set (training sets it from the mean prototype and
        checkpoints keep it), so a prototype's embedding depends on nothing but its own points."""
        self._fixed_graph = None if nbrs is None else NeighbourGraph(nbrs.detach().cpu().long())

    @property
    def point_graph(self) -> Tensor | None:
        """The fixed (N,k) neighbour indices, if set."""
        return None if self._fixed_graph is None else self._fixed_graph.nbrs

    def neighbours(self, points: Tensor) -> NeighbourGraph:
        """The fixed graph when it matches N, else the cached kNN graph of points[0] (computed once)."""
        if self._fixed_graph is not None and self._fixed_graph.nbrs.shape[0] == points.shape[1]:
            return self._fixed_graph.to(points.device)
        ref = points[0].detach().to("cpu", torch.float32)
        key = (ref.shape[0], self.config.knn, hashlib.sha1(ref.half().numpy().tobytes()).hexdigest())
        graph = self._knn_cache.get(key)
        if graph is None:
            graph = NeighbourGraph(knn_graph(ref, self.config.knn))
            self._knn_cache[key] = graph
            while len(self._knn_cache) > 16:
                self._knn_cache.popitem(last=False)
        return graph.to(points.device)

    def point_features(self, points: Tensor, normals: Tensor | None, albedo: Tensor | None) -> Tensor:
        feats = [points]
        if self.config.use_normals:
            feats.append(normals if normals is not None else torch.zeros_like(points))
        if self.config.use_albedo:
            feats.append(albedo if albedo is not None else torch.full_like(points, 0.5))
        return torch.cat(feats, dim=-1)

    def encode_points(
        self,
        points: Tensor,
        normals: Tensor | None = None,
        albedo: Tensor | None = None,
        neighbours: Tensor | NeighbourGraph | None = None,
    ) -> Tensor:
        """points (P,N,3) [normals, albedo (P,N,3)] -> (P,N,D) L2-normalised point embeddings.

        All P sets must share one sampling (point i = same anatomical place). The graph: `neighbours`
        ((N,k) indices or a NeighbourGraph) when given, else the model's fixed graph (set in training and
        stored in checkpoints) when it has N points, else the kNN graph of points[0], cached by content.
        """
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"encode_points: expected (P,N,3) points, got {tuple(points.shape)}")
        if neighbours is None:
            graph = self.neighbours(points)
        elif isinstance(neighbours, NeighbourGraph):
            graph = neighbours.to(points.device)
        else:
            graph = NeighbourGraph(neighbours.cpu()).to(points.device)
        emb = self.point_encoder(self.point_features(points.float(), normals, albedo), graph)
        return F.normalize(emb.float(), dim=-1)

    def forward(
        self,
        images: Tensor,
        points: Tensor,
        normals: Tensor | None = None,
        albedo: Tensor | None = None,
        neighbours: Tensor | NeighbourGraph | None = None,
    ) -> tuple[ImageFeatures, Tensor]:
        """Both branches in one call (what DDP wraps)."""
        return self.encode_image(images), self.encode_points(points, normals, albedo, neighbours)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
