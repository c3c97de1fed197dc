"""Generate the tables and picture of docs/parts.md from protoreg.parts, so the page cannot drift.

    python -m protoreg.body.parts_doc          # rewrite the generated section and the PNG

tests/test_body_labels.py checks that the committed page matches what this module generates.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from protoreg.parts import (
    MIRROR_PART,
    PART_COLORS,
    PART_NAMES,
    SMPL_JOINT_NAMES,
    SMPL_JOINT_PART,
    SMPL_PARENTS,
    TAXONOMY_VERSION,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PARTS_DOC = REPO_ROOT / "docs" / "parts.md"
PARTS_PICTURE = REPO_ROOT / "docs" / "images" / "parts-default-body.png"
BEGIN, END = "<!-- generated:parts-tables -->", "<!-- /generated:parts-tables -->"


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def parts_tables_markdown() -> str:
    """The label table and the joint->part table, as markdown (between the BEGIN/END markers)."""
    lines = [BEGIN, f"Taxonomy version {TAXONOMY_VERSION}.", "", "| id | name | colour (RGB) | mirror |"]
    lines.append("|---:|---|---|---|")
    for i, name in enumerate(PART_NAMES):
        rgb = PART_COLORS[i]
        colour = f"`{_hex(rgb)}` ({rgb[0]}, {rgb[1]}, {rgb[2]})"
        lines.append(f"| {i} | {name} | {colour} | {PART_NAMES[MIRROR_PART[i]]} |")
    lines += ["", "| joint | SMPL name | parent | part |", "|---:|---|---|---|"]
    for j, name in enumerate(SMPL_JOINT_NAMES):
        parent = SMPL_JOINT_NAMES[SMPL_PARENTS[j]] if SMPL_PARENTS[j] >= 0 else "(root)"
        lines.append(f"| {j} | {name} | {parent} | {SMPL_JOINT_PART[j]} {PART_NAMES[SMPL_JOINT_PART[j]]} |")
    lines.append(END)
    return "\n".join(lines)


def replace_generated_section(text: str) -> str:
    """`text` with its generated section replaced by the current tables."""
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + parts_tables_markdown() + text[end:]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; docs are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_parts_picture(body, out: Path) -> None:
    """Front, side and back orthographic views of the body at rest, faces coloured by vertex part."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    from protoreg.parts import BODY_PART_IDS, part_name

    vertices = body.v_template.double().cpu().numpy()
    faces = body.faces
    face_parts = body.vertex_parts[faces]
    # A face takes the majority label of its corners (the first corner on a three-way tie).
    face_label = np.where(face_parts[:, 1] == face_parts[:, 2], face_parts[:, 1], face_parts[:, 0])
    corners = vertices[faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    # (title, screen-x axis and sign, viewing direction towards the viewer): orthographic views, y up.
    views = (
        ("front (from +z)", 0, 1.0, 2, 1.0),
        ("left side (from +x)", 2, -1.0, 0, 1.0),
        ("back (from -z)", 0, -1.0, 2, -1.0),
    )
    widths = [np.ptp(vertices[:, axis]) + 0.1 for _, axis, _, _, _ in views]
    fig, axes = plt.subplots(1, 3, figsize=(11, 5.6), gridspec_kw={"width_ratios": widths})
    for ax, (title, axis, sign, depth_axis, towards) in zip(axes, views, strict=True):
        order = np.argsort(towards * corners[:, :, depth_axis].mean(1))  # painter: far faces first
        xy = np.stack([sign * corners[:, :, axis], corners[:, :, 1]], axis=-1)
        shade = 0.55 + 0.45 * np.clip(towards * normals[:, depth_axis], 0, 1)
        colors = PART_COLORS[face_label].astype(np.float64) / 255.0 * shade[:, None]
        ax.add_collection(
            PolyCollection(xy[order], facecolors=colors[order], edgecolors=colors[order], linewidths=0.15)
        )
        ax.set_xlim(xy[..., 0].min() - 0.05, xy[..., 0].max() + 0.05)
        ax.set_ylim(vertices[:, 1].min() - 0.05, vertices[:, 1].max() + 0.05)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(title, fontsize=10)
    handles = [Patch(facecolor=PART_COLORS[p] / 255.0, label=part_name(p)) for p in BODY_PART_IDS]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.12, wspace=0.02)
    fig.suptitle(f"{body.path.name}: 14 parts from skinning weights", fontsize=11)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png", facecolor="white")
    plt.close(fig)
    _write_atomic(out, buffer.getvalue())


def main() -> None:
    text = PARTS_DOC.read_text()
    _write_atomic(PARTS_DOC, replace_generated_section(text).encode())
    from protoreg.body import DEFAULT_BODY_MODEL, load_body_model

    if DEFAULT_BODY_MODEL.exists():
        render_parts_picture(load_body_model(), PARTS_PICTURE)
    print(f"wrote {PARTS_DOC}" + (f" and {PARTS_PICTURE}" if DEFAULT_BODY_MODEL.exists() else ""))


if __name__ == "__main__":
    main()
