"""`protoreg show-identities`: a PNG contact sheet of the cast (front and side views, coloured by part).

People look at this to check that the sampled (or enrolled) identities are plausible and distinct
before spending hours rendering them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from protoreg.identities import Identity, IdentityError, resolve_identities
from protoreg.parts import BODY_PART_IDS, PART_COLORS, SMPL_JOINT_NAMES, part_name

PIXELS_PER_METRE = 180
CELL_HEIGHT_M = 2.2  # drawing area per identity, metres (fits a 2.1 m person)
FLOOR_M = 0.04  # floor line height above the bottom of the cell
CELL_MARGIN_M = 0.06
FRONT_SLOT_M = {"a": 1.3, "t": 2.0}  # room for the front view: arms down (A) or out (T)
SIDE_SLOT_M = 0.55
CELL_SIDE_GAP_M = 0.1
A_POSE_DEG = 55.0  # arms lowered from the T-pose
TITLE_PX = 44
LEGEND_PX = 70
MAX_COLUMNS = 5
LIGHT = np.array([-0.35, 0.55, 0.76])  # from the viewer's upper left


@dataclass
class View:
    """An orthographic view: which body axis goes right, which goes up, and which points at the camera."""

    right: np.ndarray
    up: np.ndarray
    toward: np.ndarray


FRONT = View(
    np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
)  # subject's left on the right
SIDE = View(
    np.array([0, 0, 1.0]), np.array([0, 1.0, 0]), np.array([-1.0, 0, 0])
)  # from the right, facing right


def _covered_pixels(
    tri_x: np.ndarray, tri_y: np.ndarray, size: tuple[int, int], span: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pixel, triangle, barycentric) for pixel centres inside each triangle (each fits a span x span box)."""
    h, w = size
    x0 = np.floor(tri_x.min(axis=1)).astype(np.int64)
    y0 = np.floor(tri_y.min(axis=1)).astype(np.int64)
    gx, gy = np.meshgrid(np.arange(span), np.arange(span))
    px = x0[:, None] + gx.reshape(1, -1)  # (F, S*S) candidate pixel columns
    py = y0[:, None] + gy.reshape(1, -1)
    cx, cy = px + 0.5, py + 0.5
    ax, ay = tri_x[:, 0:1], tri_y[:, 0:1]
    bx, by = tri_x[:, 1:2], tri_y[:, 1:2]
    qx, qy = tri_x[:, 2:3], tri_y[:, 2:3]
    den = (by - qy) * (ax - qx) + (qx - bx) * (ay - qy)
    den = np.where(np.abs(den) < 1e-12, 1e-12, den)
    l0 = ((by - qy) * (cx - qx) + (qx - bx) * (cy - qy)) / den
    l1 = ((qy - ay) * (cx - qx) + (ax - qx) * (cy - qy)) / den
    l2 = 1.0 - l0 - l1
    inside = (l0 >= -1e-6) & (l1 >= -1e-6) & (l2 >= -1e-6) & (px >= 0) & (px < w) & (py >= 0) & (py < h)
    fi, ci = np.nonzero(inside)
    bary = np.stack([l0[fi, ci], l1[fi, ci], l2[fi, ci]], axis=1)
    return py[fi, ci] * w + px[fi, ci], fi, bary


def rasterize(
    vertices: np.ndarray,
    faces: np.ndarray,
    vertex_colors: np.ndarray,
    vertex_normals: np.ndarray,
    view: View,
    origin: tuple[float, float],
    size: tuple[int, int],
    ppm: float,
) -> np.ndarray:
    """Z-buffered, Lambert-shaded orthographic render -> (H, W, 4) float RGBA (alpha 0 = background).

    Each pixel takes the colour of the triangle corner with the largest barycentric weight, the same rule
    the prototypes use for point parts, so borders look like the labels the trainer sees.
    """
    h, w = size
    x = (vertices @ view.right - origin[0]) * ppm
    y = (origin[1] - vertices @ view.up) * ppm
    depth = vertices @ view.toward
    tri_x, tri_y = x[faces], y[faces]
    extent = np.maximum(np.ptp(tri_x, axis=1), np.ptp(tri_y, axis=1))
    # Triangles grouped by on-screen size, so one big triangle does not inflate every triangle's pixel box.
    spans = np.minimum(2 ** np.ceil(np.log2(np.maximum(extent, 1.0) + 2.0)), 64).astype(np.int64)
    pix_l, fi_l, bary_l = [], [], []
    for span in np.unique(spans):
        group = np.flatnonzero(spans == span)
        pix, fi, bary = _covered_pixels(tri_x[group], tri_y[group], size, int(span))
        pix_l.append(pix)
        fi_l.append(group[fi])
        bary_l.append(bary)
    pix, fi, bary = np.concatenate(pix_l), np.concatenate(fi_l), np.concatenate(bary_l)
    z = np.einsum("nk,nk->n", bary, depth[faces[fi]])
    order = np.lexsort((-z, pix))  # nearest first within each pixel
    pix, fi, bary = pix[order], fi[order], bary[order]
    first = np.ones(len(pix), dtype=bool)
    first[1:] = pix[1:] != pix[:-1]
    pix, fi, bary = pix[first], fi[first], bary[first]
    corner = faces[fi, bary.argmax(axis=1)]
    normal = np.einsum("nk,nkd->nd", bary, vertex_normals[faces[fi]])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    cam = np.stack([normal @ view.right, normal @ view.up, normal @ view.toward], axis=1)
    cam *= np.where(cam[:, 2:3] < 0, -1.0, 1.0)  # two-sided: whatever is seen faces the camera
    light = LIGHT / np.linalg.norm(LIGHT)
    shade = 0.38 + 0.62 * np.clip(cam @ light, 0.0, 1.0)
    image = np.zeros((h * w, 4))
    image[pix, :3] = vertex_colors[corner] * shade[:, None]
    image[pix, 3] = 1.0
    return image.reshape(h, w, 4)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of the contact sheet for n identities."""
    rows = int(math.ceil(n / MAX_COLUMNS))
    cols = int(math.ceil(n / rows))  # balanced rows: 6 -> 2 x 3, not 5 + 1
    return rows, cols


def cell_size_px(pose: str) -> tuple[int, int]:
    """(width, height) in pixels of one identity's cell, title row included."""
    width_m = 2 * CELL_MARGIN_M + FRONT_SLOT_M[pose] + CELL_SIDE_GAP_M + SIDE_SLOT_M
    return int(round(width_m * PIXELS_PER_METRE)), int(round(CELL_HEIGHT_M * PIXELS_PER_METRE)) + TITLE_PX


def sheet_size_px(n: int, pose: str, title: bool = True) -> tuple[int, int]:
    """(width, height) in pixels of the whole PNG for n drawn identities."""
    rows, cols = grid_shape(n)
    cell_w, cell_h = cell_size_px(pose)
    return cols * cell_w, rows * cell_h + LEGEND_PX + (TITLE_PX if title else 0)


def a_pose(num: int = 1) -> np.ndarray:
    """(num, 72) axis-angle pose with the arms relaxed down by A_POSE_DEG (SMPL: +x is the subject's left)."""
    pose = np.zeros((num, 24, 3), dtype=np.float32)
    angle = np.radians(A_POSE_DEG)
    pose[:, SMPL_JOINT_NAMES.index("left_shoulder"), 2] = -angle
    pose[:, SMPL_JOINT_NAMES.index("right_shoulder"), 2] = angle
    return pose.reshape(num, 72)


def _render_identity(
    verts: np.ndarray, normals: np.ndarray, faces: np.ndarray, colors: np.ndarray, pose: str
) -> np.ndarray:
    """Front view, then side view to its right, of one body standing on the cell floor -> (H, W, 4) RGBA."""
    ppm = PIXELS_PER_METRE
    w, h = cell_size_px(pose)
    h -= TITLE_PX
    top = verts[:, 1].min() + CELL_HEIGHT_M - FLOOR_M  # every body stands on the same floor line
    front_centre = CELL_MARGIN_M + 0.5 * FRONT_SLOT_M[pose]
    side_centre = CELL_MARGIN_M + FRONT_SLOT_M[pose] + CELL_SIDE_GAP_M + 0.5 * SIDE_SLOT_M
    mid_x = 0.5 * (verts[:, 0].min() + verts[:, 0].max())
    mid_z = 0.5 * (verts[:, 2].min() + verts[:, 2].max())
    front = rasterize(verts, faces, colors, normals, FRONT, (mid_x - front_centre, top), (h, w), ppm)
    side = rasterize(verts, faces, colors, normals, SIDE, (mid_z - side_centre, top), (h, w), ppm)
    mask = side[..., 3] > 0
    front[mask] = side[mask]
    return front


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055)


def _draw_cell(ax: Any, img: np.ndarray, ident: Identity, height_m: float, ruler: bool) -> None:
    """One identity: the picture on white, metre guides, name, height and colour swatches."""
    from matplotlib.patches import Rectangle

    h, w = img.shape[:2]
    ax.imshow(np.clip(img, 0.0, 1.0), interpolation="antialiased", zorder=1)  # transparent background
    floor_px = h - FLOOR_M * PIXELS_PER_METRE
    for metres in (0.5, 1.0, 1.5, 2.0):
        y = floor_px - metres * PIXELS_PER_METRE
        ax.axhline(y, color="#c8c8c8", lw=0.6, zorder=0, ls=(0, (4, 3)))  # guides behind the bodies
        if ruler:
            ax.text(2, y - 2, f"{metres:.1f} m", fontsize=7, color="#909090", va="bottom")
    ax.axhline(floor_px, color="#a0a0a0", lw=0.8, zorder=0)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    label = f"{ident.name}   {height_m:.2f} m"
    if ident.mesh is not None:
        label += "  (mesh)"
    ax.text(0.5, 1.0, label, transform=ax.transAxes, ha="center", va="bottom", fontsize=11, weight="bold")
    for i, (what, col) in enumerate((("skin", ident.skin_tone), ("hair", ident.hair_color))):
        x = 0.70 + 0.13 * i
        ax.add_patch(
            Rectangle(
                (x, 0.93),
                0.035,
                0.035 * w / h * 1.0,
                transform=ax.transAxes,
                facecolor=_linear_to_srgb(col),
                edgecolor="#606060",
                lw=0.5,
            )
        )
        ax.text(
            x + 0.045,
            0.93 + 0.017 * w / h,
            what,
            transform=ax.transAxes,
            fontsize=7,
            va="center",
            color="#606060",
        )


def _draw_legend(fig: Any, width: int, height: int) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=PART_COLORS[p] / 255.0, edgecolor="#606060", lw=0.4, label=part_name(p))
        for p in BODY_PART_IDS
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=7,
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 4 / height),
        handlelength=1.2,
        columnspacing=1.2,
    )


def _remove_quietly(path: Path) -> None:
    """Drop a temporary file after a failure; a folder that cannot hold it cannot hold it either."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _save_atomic(fig: Any, out: Path, dpi: int) -> None:
    """PNG via a temporary file in the same folder, so a failed save leaves no partial picture."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
        os.replace(tmp, out)
    except OSError as e:
        _remove_quietly(tmp)
        raise click.ClickException(f"{out}: cannot write the picture: {e.strerror or e}") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def _shapes_to_draw(
    identities: list[Identity], body: Any, pose: str
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(vertices, normals, standing height) per identity, posed as asked (height from the rest pose)."""
    import torch

    from protoreg.prototypes import identity_rest_vertices, vertex_normals_np

    bodies: dict[str, Any] = {}
    out = []
    for ident in identities:
        rest, own = identity_rest_vertices(ident, body, bodies)
        verts = rest
        if pose == "a":  # pose_mesh skins any rest mesh, so enrolled meshes get the A-pose too
            posed = own.pose_mesh(
                torch.as_tensor(rest[None], dtype=torch.float32), pose=torch.as_tensor(a_pose(1))
            )
            verts = posed.vertices.detach().cpu().numpy()[0].astype(np.float64)
        normals = vertex_normals_np(verts, np.asarray(own.faces, dtype=np.int64))
        out.append((verts, normals, float(np.ptp(rest[:, 1]))))
    return out


def render_contact_sheet(
    identities: list[Identity], body: Any, out: str | Path, title: str = "", pose: str = "a"
) -> tuple[int, int]:
    """Write the PNG contact sheet atomically; returns its (width, height) in pixels.

    pose 'a' (relaxed A-pose) or 't' (the rest T-pose). Heights are always measured at rest.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if pose not in FRONT_SLOT_M:
        raise ValueError(f"pose: expected 'a' or 't', got {pose!r}")
    faces = np.asarray(body.faces, dtype=np.int64)
    colors = PART_COLORS[np.asarray(body.vertex_parts)].astype(np.float64) / 255.0
    shapes = _shapes_to_draw(identities, body, pose)
    _, cols = grid_shape(len(identities))
    cell_w, cell_h = cell_size_px(pose)
    width, height = sheet_size_px(len(identities), pose, title=bool(title))
    top_px = TITLE_PX if title else 0
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    for k, (ident, (verts, normals, height_m)) in enumerate(zip(identities, shapes, strict=True)):
        r, c = divmod(k, cols)
        img = _render_identity(verts, normals, faces, colors, pose)
        bottom = 1 - (top_px + (r + 1) * cell_h) / height
        ax = fig.add_axes((c * cell_w / width, bottom, cell_w / width, (cell_h - TITLE_PX) / height))
        _draw_cell(ax, img, ident, height_m, ruler=c == 0)
    _draw_legend(fig, width, height)
    if title:
        fig.text(
            0.5, 1 - 0.5 * TITLE_PX / height, title, ha="center", va="center", fontsize=15, weight="bold"
        )
    _save_atomic(fig, Path(out), dpi)
    plt.close(fig)
    return width, height


@click.command("show-identities")
@click.option(
    "--identities",
    "spec",
    default="10",
    show_default=True,
    help="Number of identities to sample, or a YAML/JSONL identities file.",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed for sampled identities and traits."
)
@click.option(
    "--body-model",
    "body_model",
    default=None,
    type=click.Path(dir_okay=False),
    help="Body model .npz (default: the embedded body).",
)
@click.option(
    "--out",
    "out",
    default="shards/identities.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Output PNG.",
)
@click.option(
    "--pose",
    type=click.Choice(["a", "t"]),
    default="a",
    show_default=True,
    help="Draw in a relaxed A-pose or the rest T-pose.",
)
@click.option(
    "--max-shown",
    default=40,
    show_default=True,
    type=click.IntRange(min=1),
    help="Draw at most this many identities (the first ones).",
)
def show_identities(
    spec: str, seed: int, body_model: str | None, out: str, pose: str, max_shown: int
) -> None:
    """Draw the identities (front and side, coloured by part, with heights) into a PNG."""
    from protoreg.body import BodyModelError, load_body_model

    try:
        body = load_body_model(body_model)
    except (BodyModelError, OSError, ValueError) as e:
        raise click.BadParameter(str(e).splitlines()[0], param_hint="--body-model") from e
    try:
        identities = resolve_identities(spec, seed, body)
    except IdentityError as e:
        raise click.BadParameter(str(e), param_hint="--identities") from e
    shown = identities[:max_shown]
    title = f"{len(identities)} identities" + (
        f" (first {len(shown)} shown)" if len(shown) < len(identities) else ""
    )
    title += f"  ·  seed {seed}" if _is_count(spec) else f"  ·  {Path(spec).name}"
    width, height = render_contact_sheet(shown, body, out, title=title, pose=pose)
    click.echo(f"wrote {out} ({width}x{height} px, {len(shown)} identities)")


def _is_count(spec: str) -> bool:
    try:
        int(spec)
    except ValueError:
        return False
    return True
