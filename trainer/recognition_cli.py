"""`protoreg enroll`, `recognize` and `evaluate` (see docs/recognition.md and docs/evaluation.md)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from protoreg.dataset import file_sha256
from trainer.recognition import (
    DEFAULT_SHORTLIST,
    UNKNOWN,
    Gallery,
    GalleryIdentity,
    Recognition,
    RecognitionError,
    Recognizer,
    check_gallery_matches,
    encode_prototypes,
    load_gallery,
    load_image,
    read_gallery_identities,
    set_gallery_attrs,
    write_gallery,
)


@dataclass
class LoadedModel:
    """A checkpoint ready for recognition."""

    model: Any
    config: dict[str, Any]
    fingerprint: str
    input_size: tuple[int, int]  # (W, H)
    max_points: int  # prototype points the model was trained on (0 = all)
    path: Path


def _model_section(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("model", {}) if isinstance(config.get("model"), dict) else {}


def input_size_of(config: dict[str, Any]) -> tuple[int, int]:
    """(W, H) from the training configuration: model.image_size is (H, W)."""
    size = _model_section(config).get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[1]), int(size[0])
    from trainer.recognition import DEFAULT_INPUT_SIZE, model_input_size

    return model_input_size(config) if config else DEFAULT_INPUT_SIZE


def fingerprint_of(config: dict[str, Any], checkpoint: Path) -> str:
    """The checkpoint's fingerprint: of its architecture and weights when known, else of its architecture
    config, else of the file itself."""
    for key in ("weights_fingerprint", "model_fingerprint"):
        if config.get(key):
            return str(config[key])
    from trainer.config import ModelConfig, config_from_dict, model_fingerprint

    try:
        return model_fingerprint(config_from_dict(_model_section(config), ModelConfig, "model"))
    except Exception:  # noqa: BLE001 - fall back to the file itself
        return file_sha256(checkpoint)


def load_checkpoint(path: str | Path) -> LoadedModel:
    """The model in eval mode and what recognition needs to know about it; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise RecognitionError(f"{path}: checkpoint file not found")
    from trainer.checkpoint import load_model

    try:
        model, config = load_model(str(path), device="cpu")
    except RecognitionError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to load means the same to the user
        detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise RecognitionError(f"{path}: cannot load checkpoint ({detail[:200]})") from None
    config = dict(config or {})
    fp = fingerprint_of(config, path)
    max_points = int((config.get("data") or {}).get("max_points", 0) or 0)
    model.eval()
    return LoadedModel(model, config, str(fp), input_size_of(config), max_points, path)


MIRROR_OPTION = click.option(
    "--mirror/--no-mirror",
    default=True,
    show_default=True,
    help="Count the pixels of each image's mirror image too in its correspondence rates (a second look at "
    "the same person; the explanation registers the image itself). Calibrate and recognise alike.",
)


def _errors(fn):  # noqa: ANN001, ANN202
    """Turn the project's one-line errors into click errors (exit code 1, no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RecognitionError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise click.ClickException(msg) from None

    return wrapper


# ----------------------------------------------------------------------------------------------------------
# enroll


def prototypes_file(spec: str | Path) -> Path:
    """A prototypes.h5 path, or a dataset folder holding one."""
    from protoreg.dataset import PROTOTYPES_NAME

    p = Path(spec)
    if p.is_dir():
        p = p / PROTOTYPES_NAME
    if not p.is_file():
        raise RecognitionError(
            f"{spec}: prototypes file not found (expected prototypes.h5 or a dataset folder)"
        )
    return p


def subset_prototypes(protos: list[Any], max_points: int) -> list[Any]:
    """The fixed strided point subset the model was trained on (trainer.data.point_subset)."""
    from dataclasses import replace

    from trainer.data import point_subset

    out = []
    for p in protos:
        sub = point_subset(len(p.points), max_points)
        out.append(
            replace(
                p,
                points=p.points[sub],
                normals=p.normals[sub],
                parts=p.parts[sub],
                vertex_ids=p.vertex_ids[sub],
                albedo=p.albedo[sub],
            )
        )
    return out


def enroll_identities(loaded: LoadedModel, prototypes: Path, batch_size: int = 1) -> list[GalleryIdentity]:
    """Encode every prototype of the file with the model (the gallery's point embeddings)."""
    from protoreg.prototypes import PrototypeError, read_prototypes

    try:
        protos = list(read_prototypes(prototypes).values())
    except PrototypeError as e:
        raise RecognitionError(str(e).splitlines()[0]) from None
    if not protos:
        raise RecognitionError(f"{prototypes}: holds no prototypes (the gallery would be empty)")
    protos = subset_prototypes(protos, loaded.max_points)
    import torch

    torch.manual_seed(0)
    return encode_prototypes(loaded.model, protos, batch_size=batch_size)


def build_gallery(
    loaded: LoadedModel, prototypes: Path, out: Path, add: bool = False, dtype: str = "float16"
) -> Path:
    """Write (or extend, with `add`) the gallery file for `loaded` from a prototypes file."""
    new = enroll_identities(loaded, prototypes)
    source = {"file": prototypes.name, "sha256": file_sha256(prototypes), "identities": len(new)}
    existing: list[GalleryIdentity] = []
    attrs: dict[str, Any] = {
        "model_fingerprint": loaded.fingerprint,
        "prototypes_sha256": source["sha256"],
        "sources": [source],
        "max_points": loaded.max_points,
    }
    if add and out.exists():
        old = load_gallery(out, in_memory=True)
        check_gallery_matches(old, loaded.fingerprint, loaded.path)
        clash = sorted(set(old.names) & {g.name for g in new})
        if clash:
            raise RecognitionError(f"{out}: identity {clash[0]!r} is already enrolled (names must be unique)")
        existing = read_gallery_identities(old)
        attrs = {
            k: v
            for k, v in old.attrs.items()
            if k not in ("format_version", "embedding_dim", "num_points", "num_identities")
        }
        attrs["sources"] = list(attrs.get("sources", [])) + [source]
        if existing and existing[0].embeddings.shape[0] != new[0].embeddings.shape[0]:
            raise RecognitionError(
                f"{prototypes}: {new[0].embeddings.shape[0]} points per identity, the gallery "
                f"holds {existing[0].embeddings.shape[0]}"
            )
    elif out.exists() and not add:
        pass  # replaced atomically below
    return write_gallery(out, existing + new, attrs, dtype=dtype)


@click.command("enroll")
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(dir_okay=False),
    help="Trained model checkpoint (checkpoint-last.pt).",
)
@click.option(
    "--prototypes",
    required=True,
    type=click.Path(),
    help="prototypes.h5 of the identities to enrol, or a dataset folder holding one.",
)
@click.option(
    "--out", "out", required=True, type=click.Path(dir_okay=False), help="Gallery file to write (.h5)."
)
@click.option(
    "--add", is_flag=True, help="Add these identities to an existing gallery instead of replacing it."
)
@click.option(
    "--calibrate",
    "calibrate_spec",
    default=None,
    help="Validation shards (dataset folder or shard list) to calibrate T and the open-set threshold on.",
)
@click.option(
    "--calibration-limit",
    default=200,
    show_default=True,
    type=click.IntRange(1),
    help="Use at most this many validation images for calibration.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Storage precision of the point embeddings.",
)
@MIRROR_OPTION
@_errors
def enroll(
    checkpoint: str,
    prototypes: str,
    out: str,
    add: bool,
    calibrate_spec: str | None,
    calibration_limit: int,
    dtype: str,
    mirror: bool,
) -> None:
    """Encode each prototype once and cache its point embeddings in a gallery (HDF5)."""
    loaded = load_checkpoint(checkpoint)
    out_path = Path(out)
    build_gallery(loaded, prototypes_file(prototypes), out_path, add=add, dtype=dtype)
    gal = load_gallery(out_path)
    click.echo(
        f"enrolled {gal.size} identities into {out_path} (D = {gal.attrs['embedding_dim']}, "
        f"{gal.attrs['num_points']} points each)"
    )
    if calibrate_spec:
        cal = calibrate_gallery(loaded, out_path, calibrate_spec, calibration_limit, mirror)
        click.echo(
            f"calibrated on {cal.samples} validation images: T = {cal.similarity_threshold:.3f}, "
            f"U = {cal.unknown_threshold:.3f} (validation Rank-1 {cal.rank1:.1%}, "
            f"open-set EER {cal.eer_open_set:.1%})"
        )


def calibrate_gallery(
    loaded: LoadedModel, gallery_path: Path, spec: str, limit: int, mirror: bool = True
) -> Any:
    """Register validation images against the gallery and store the chosen T and U in its attributes."""
    from tqdm import tqdm

    from trainer.data import DataSpecError, iterate_samples, resolve_spec
    from trainer.evaluation import Evaluator, calibrate

    gal = load_gallery(gallery_path, in_memory=True)
    try:
        source = resolve_spec(spec)
    except DataSpecError as e:
        raise RecognitionError(str(e)) from None
    ev = Evaluator(
        loaded.model,
        gal,
        loaded.input_size,
        gal.similarity_threshold,
        gal.unknown_threshold,
        keep_examples=0,
        mirror=mirror,
    )
    with tqdm(total=limit, desc="calibrate", unit="img", leave=False) as bar:
        results = ev.run(iterate_samples(source.urls, None, limit), bar)
    cal = calibrate(results)
    set_gallery_attrs(
        gallery_path,
        {
            "similarity_threshold": cal.similarity_threshold,
            "unknown_threshold": cal.unknown_threshold,
            "calibration": {**cal.to_json(), "data": str(spec), "mirror": bool(mirror)},
        },
    )
    return cal


# ----------------------------------------------------------------------------------------------------------
# recognize


def open_gallery_for(loaded: LoadedModel, gallery: str | Path, in_memory: bool = False) -> Gallery:
    gal = load_gallery(gallery, in_memory=in_memory)
    check_gallery_matches(gal, loaded.fingerprint, loaded.path)
    return gal


def recognition_record(image: str, rec: Recognition, sentence: str, top: int) -> dict[str, Any]:
    """The JSON written per image."""
    from protoreg.parts import BODY_PART_IDS, PART_NAMES

    d = rec.decision
    best = rec.best
    parts = {}
    if best is not None:
        for p in BODY_PART_IDS:
            n = int(best.part_pixels[p])
            parts[PART_NAMES[p]] = {
                "pixels": n,
                "matched": int(best.part_matched[p]),
                "strength": None if n == 0 else round(float(best.part_matched[p] / n), 4),
            }
    return {
        "image": image,
        "identity": d.identity,
        "best_match": d.best,
        "correspondence_rate": round(d.rate, 6),
        "unknown_threshold": d.unknown_threshold,
        "similarity_threshold": rec.similarity_threshold,
        "foreground_pixels": int(len(rec.pixels.parts)),
        "justification": sentence,
        "parts": parts,
        "ranking": [
            {
                "rank": i + 1,
                "identity": c.name,
                "correspondence_rate": None if c.rate is None else round(c.rate, 6),
                "mean_similarity": round(c.mean_similarity, 6),
                "shortlist_score": round(c.shortlist_score, 6),
            }
            for i, c in enumerate(rec.candidates[:top])
        ],
    }


def ranked_table(image: str, rec: Recognition, top: int) -> str:
    d = rec.decision
    lines = [
        f"{image}: {d.identity}" + (f" (closest {d.best})" if d.identity == UNKNOWN else ""),
        f"  {'rank':>4}  {'identity':<24} {'rate':>7} {'mean sim':>9}",
    ]
    for i, c in enumerate(rec.candidates[:top]):
        rate = "   -   " if c.rate is None else f"{c.rate:7.1%}"
        lines.append(f"  {i + 1:>4}  {c.name:<24} {rate} {c.mean_similarity:9.3f}")
    return "\n".join(lines)


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}-{k}"
    used.add(stem)
    return stem


@click.command("recognize")
@click.option(
    "--checkpoint", required=True, type=click.Path(dir_okay=False), help="Trained model checkpoint."
)
@click.option(
    "--gallery",
    required=True,
    type=click.Path(dir_okay=False),
    help="Gallery written by `protoreg enroll` with the same checkpoint.",
)
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out",
    default="recognition",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the per-image JSON and explanation PNG.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(-1.0, 1.0),
    default=None,
    help="Confidence threshold T on cosine similarity [default: the gallery's calibrated value].",
)
@click.option(
    "--top", type=click.IntRange(1), default=5, show_default=True, help="Identities listed per image."
)
@click.option(
    "--unknown-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Open-set threshold U on the correspondence rate [default: the gallery's calibrated value].",
)
@click.option(
    "--shortlist",
    type=click.IntRange(0),
    default=DEFAULT_SHORTLIST,
    show_default=True,
    help="Identities fully registered after the per-part shortlist (0 = all).",
)
@MIRROR_OPTION
@_errors
def recognize(
    checkpoint: str,
    gallery: str,
    images: tuple[str, ...],
    out: str,
    threshold: float | None,
    top: int,
    unknown_threshold: float | None,
    shortlist: int,
    mirror: bool,
) -> None:
    """Who is in each IMAGE among the enrolled identities, and why (table, JSON, sentence, PNG)."""
    from trainer.evaluation import write_text_atomic
    from trainer.explain import justification, save_explanation

    pictures = [(p, load_image(p)) for p in images]  # refuse bad images before any work
    loaded = load_checkpoint(checkpoint)
    gal = open_gallery_for(loaded, gallery)
    if not gal.calibrated and unknown_threshold is None:
        click.echo(
            f"note: {gallery} is not calibrated; open-set threshold U = {gal.unknown_threshold} "
            "(never unknown). Calibrate with `protoreg enroll --calibrate VAL`.",
            err=True,
        )
    rec = Recognizer(loaded.model, gal, loaded.input_size, threshold, unknown_threshold, shortlist, mirror)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path, image in pictures:
        result = rec.recognize(image, top=top)
        sentence = justification(result)
        stem = _unique_stem(Path(path), used)
        record = recognition_record(path, result, sentence, top)
        png = save_explanation(out_dir / f"{stem}.png", image, result, sentence)
        record["explanation_png"] = png.name
        write_text_atomic(out_dir / f"{stem}.json", json.dumps(record, indent=2))
        click.echo(ranked_table(path, result, top))
        click.echo(f"  {sentence}")
        click.echo(f"  -> {out_dir / (stem + '.json')}, {png}")


# ----------------------------------------------------------------------------------------------------------
# evaluate


def rest_vertices_for(gallery: Gallery, source: Any) -> dict[int, np.ndarray]:
    """Each enrolled identity's rest mesh (for correspondence errors in metres); empty when unavailable."""
    try:
        import torch

        from protoreg.body import load_body_model
        from protoreg.prototypes import read_prototypes

        protos = read_prototypes(source.prototypes) if source.prototypes else {}
        info = (source.manifest or {}).get("body_model") or {}
        path = info.get("path") or info.get("file") if isinstance(info, dict) else None
        body = load_body_model(path if path and Path(path).exists() else None)
        out = {}
        for row, name in enumerate(gallery.names):
            if name in protos:
                betas = torch.as_tensor(protos[name].betas[None], dtype=torch.float32)
                out[row] = body.rest_vertices(betas)[0].detach().cpu().numpy().astype(np.float32)
        return out
    except Exception as e:  # noqa: BLE001 - the error metric is optional
        click.echo(
            f"note: no body model for correspondence errors ({type(e).__name__}: {str(e)[:80]})", err=True
        )
        return {}


@click.command("evaluate")
@click.option(
    "--checkpoint", required=True, type=click.Path(dir_okay=False), help="Trained model checkpoint."
)
@click.option("--shards", required=True, help="Test set: dataset folder, brace-expanded shard list or URLs.")
@click.option(
    "--gallery",
    required=True,
    type=click.Path(dir_okay=False),
    help="Gallery written by `protoreg enroll` with the same checkpoint.",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for report.json, report.md and the figures.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(-1.0, 1.0),
    default=None,
    help="Confidence threshold T [default: the gallery's calibrated value].",
)
@click.option(
    "--unknown-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Open-set threshold U [default: the gallery's calibrated value].",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate at most this many images.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Images encoded per forward pass.",
)
@click.option(
    "--examples",
    type=click.IntRange(0),
    default=6,
    show_default=True,
    help="Explanation pictures in the report, shared between correct, wrong and unknown answers.",
)
@click.option("--title", default="Evaluation report", show_default=True, help="Title of report.md.")
@MIRROR_OPTION
@_errors
def evaluate(
    checkpoint: str,
    shards: str,
    gallery: str,
    out: str,
    threshold: float | None,
    unknown_threshold: float | None,
    limit: int | None,
    batch_size: int,
    examples: int,
    title: str,
    mirror: bool,
) -> None:
    """Rank-k/CMC, mAP, confusion, ROC, rate histograms, part accuracy and correspondence error on TEST."""
    from tqdm import tqdm

    from trainer.data import DataSpecError, SkipCounter, iterate_samples, resolve_spec
    from trainer.evaluation import Evaluator, summarize, write_report

    loaded = load_checkpoint(checkpoint)
    gal = open_gallery_for(loaded, gallery, in_memory=True)
    try:
        source = resolve_spec(shards)
    except DataSpecError as e:
        raise RecognitionError(str(e)) from None
    t = gal.similarity_threshold if threshold is None else threshold
    u = gal.unknown_threshold if unknown_threshold is None else unknown_threshold
    total = None
    if source.manifest:
        counts = [
            s.get("samples") or s.get("count")
            for s in source.manifest.get("shards", [])
            if isinstance(s, dict)
        ]
        total = sum(int(c) for c in counts if c) or None
    total = min(total, limit) if (total and limit) else (limit or total)
    ev = Evaluator(
        loaded.model,
        gal,
        loaded.input_size,
        t,
        u,
        rest_vertices_for(gal, source),
        batch_size=batch_size,
        keep_examples=examples,
        mirror=mirror,
    )
    skips = SkipCounter()
    with tqdm(total=total, desc="evaluate", unit="img") as bar:
        results = ev.run(iterate_samples(source.urls, None, limit, skips), bar)
    if not results:
        raise RecognitionError(f"{shards}: no readable test images")
    summary = summarize(results, gal, t, u)
    summary.update(
        {
            "checkpoint": str(checkpoint),
            "gallery": str(gallery),
            "shards": str(shards),
            "skipped_samples": int(skips.count),
        }
    )
    report_json, report_md = write_report(out, summary, results, gal, ev.examples, title)
    s = summary
    if "rank1" in s:
        click.echo(
            f"Rank-1 {s['rank1']:.1%}  Rank-5 {s['rank5']:.1%}  mAP {s['mAP']:.1%}  "
            f"EER {s['verification']['eer']:.1%}  TAR@FAR1% {s['verification']['tar_at_far_1pct']:.1%}  "
            f"({s['images_with_enrolled_identity']} images, {gal.size} identities)"
        )
    click.echo(f"report: {report_md} ({report_json.name} and figures beside it)")
    sys.stdout.flush()
