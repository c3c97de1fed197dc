"""Recognition latency at gallery scale, and what the per-part shortlist costs in accuracy.

One image is recognised against galleries of 10, 100 and 1,000 enrolled identities (per-part descriptor
shortlist, then full registration of the top candidates), timed per image with the gallery already open
(embeddings stay on disk; only the shortlisted rows are read). Accuracy: Rank-1 on test images with the
shortlist and with exhaustive registration, the test identities enrolled together with distractors.

Distractor identities are real prototypes of other people (sampled from the body model's shape space with
another seed) encoded by the same model. With --checkpoint and --test (a dataset folder whose identities
are in --gallery) the accuracy part uses real data; without them a random-weight model times the path.

    python bench/recognize_latency.py --checkpoint demo/run/checkpoint-last.pt \
        --gallery demo/gallery.h5 --test demo/test

Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sections import write_section as write_bench_section  # noqa: E402  (bench/ is on sys.path)

from trainer.recognition import (  # noqa: E402
    GalleryIdentity,
    Recognizer,
    load_gallery,
    read_gallery_identities,
    write_gallery,
)

SECTION = "recognize_latency"


def load(checkpoint: str | None):
    """(model, fingerprint, input size (W, H), max_points)."""
    if checkpoint:
        from trainer.recognition_cli import load_checkpoint

        lm = load_checkpoint(checkpoint)
        return lm.model, lm.fingerprint, lm.input_size, lm.max_points
    from trainer.config import ModelConfig, model_fingerprint
    from trainer.models import RegistrationNet

    torch.manual_seed(0)
    cfg = ModelConfig()
    h, w = cfg.image_size
    return RegistrationNet(cfg).eval(), model_fingerprint(cfg), (w, h), 2048


def distractors(model, n: int, max_points: int, seed: int = 4242) -> list[GalleryIdentity]:
    """n other people's prototypes (embedded default body), encoded by the model."""
    from protoreg.body import load_body_model
    from protoreg.identities import sample_identities
    from protoreg.prototypes import read_prototypes, write_prototypes
    from trainer.recognition import encode_prototypes
    from trainer.recognition_cli import subset_prototypes

    with tempfile.TemporaryDirectory() as tmp:
        try:
            body = load_body_model(None)
        except Exception:  # noqa: BLE001 - the default body not baked yet: the synthetic test body
            from protoreg.body.synthetic import synthetic_body_arrays

            np.savez(Path(tmp) / "body.npz", **synthetic_body_arrays(num_betas=10, seed=3))
            body = load_body_model(Path(tmp) / "body.npz")
        idents = sample_identities(n, seed, body)
        for i in idents:
            i.name = f"distractor{i.id:04d}"
        path = write_prototypes(Path(tmp) / "distractors.h5", idents, body)
        protos = subset_prototypes(list(read_prototypes(path).values()), max_points)
    t = time.perf_counter()
    out = encode_prototypes(model, protos, batch_size=8)
    print(f"encoded {n} distractor prototypes in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def test_images(test: str | None, n: int) -> list[tuple[np.ndarray, str]]:
    """(image, identity name) pairs: test-set samples, else the astronaut photograph."""
    if test:
        from trainer.data import iterate_samples, resolve_spec

        src = resolve_spec(test)
        return [(s["rgb"], s["json"]["identity"]["name"]) for s in iterate_samples(src.urls, None, n)]
    from skimage import data

    return [(data.astronaut(), "")] * n


def time_recognition(model, gallery_path: Path, size: tuple[int, int], images, shortlist: int) -> list[float]:
    gal = load_gallery(gallery_path)
    rec = Recognizer(model, gal, size, shortlist=shortlist)
    rec.recognize(images[0][0])  # warm-up (allocations, kNN-free path)
    times = []
    for img, _ in images:
        t = time.perf_counter()
        rec.recognize(img)
        times.append(time.perf_counter() - t)
    return times


def rank1(model, gallery_path: Path, size: tuple[int, int], images, shortlist: int) -> float:
    gal = load_gallery(gallery_path, in_memory=True)
    rec = Recognizer(model, gal, size, shortlist=shortlist)
    hits = [rec.recognize(img).decision.best == name for img, name in images]
    return float(np.mean(hits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="trained checkpoint (default: random-weight model, latency only)")
    ap.add_argument("--gallery", help="gallery of the test identities (enrolled with --checkpoint)")
    ap.add_argument("--test", help="test dataset folder for the accuracy comparison")
    ap.add_argument("--sizes", default="10,100,1000", help="gallery sizes, comma separated")
    ap.add_argument("--images", type=int, default=10, help="images timed per gallery size")
    ap.add_argument("--accuracy-images", type=int, default=60, help="test images for shortlist vs exhaustive")
    ap.add_argument("--shortlist", type=int, default=32, help="identities fully registered")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, fingerprint, input_size, max_points = load(args.checkpoint)
    base: list[GalleryIdentity] = []
    attrs = {"model_fingerprint": fingerprint}
    if args.gallery:
        source = load_gallery(args.gallery, in_memory=True)
        base = read_gallery_identities(source)
        # the source's calibrated thresholds, so the accuracy columns are those recognition would give
        attrs["similarity_threshold"] = source.similarity_threshold
        attrs["unknown_threshold"] = source.unknown_threshold
    extra = distractors(model, max(0, max(sizes) - len(base)), max_points)
    images = test_images(args.test, args.images)
    acc_images = test_images(args.test, args.accuracy_images) if args.test and args.gallery else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            ids = (base + extra)[:n]
            path = write_gallery(Path(tmp) / f"g{n}.h5", ids, attrs)
            t = time.perf_counter()
            load_gallery(path)
            open_s = time.perf_counter() - t
            short = time_recognition(model, path, input_size, images, args.shortlist)
            full = time_recognition(model, path, input_size, images[:3], 0)
            acc = (rank1(model, path, input_size, acc_images, args.shortlist),
                   rank1(model, path, input_size, acc_images, 0)) if acc_images else (None, None)
            rows.append((n, open_s, statistics.median(short), max(short), statistics.median(full), *acc))
            print(rows[-1], file=sys.stderr)
    cpu = platform.processor() or platform.machine()
    threshold = attrs.get("similarity_threshold", "default")
    load_avg = os.getloadavg()[0]
    lines = [
        "## Recognition latency at gallery scale (`bench/recognize_latency.py`)",
        "",
        f"Machine: {torch.get_num_threads()} torch threads on this {cpu} CPU host "
        f"({'trained checkpoint' if args.checkpoint else 'random-weight model'}, input {input_size[0]}x"
        f"{input_size[1]}, {len(extra[0].embeddings) if extra else '?'} points per identity, "
        f"embeddings float16 on disk). Per image: encode the image, per-part shortlist over all "
        f"identities, full registration of the best {args.shortlist}. Median over {len(images)} images, "
        f"gallery already open; thresholds: the --gallery's (T {threshold}). "
        "The image's mirror view is encoded and registered too (recognition's default). "
        f"1-minute load average {load_avg:.1f} on {os.cpu_count()} cores when it ran "
        "(other jobs slow every row alike).",
        "",
        "| identities | open gallery (s) | per image, shortlist (s) | worst (s) | per image, exhaustive (s) "
        "| Rank-1 shortlist | Rank-1 exhaustive |",
        "|---|---|---|---|---|---|---|",
    ]
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    for n, open_s, med, worst, full, a_s, a_f in rows:
        cells = [str(n), f"{open_s:.3f}", f"{med:.3f}", f"{worst:.3f}", f"{full:.3f}", pct(a_s), pct(a_f)]
        lines.append("| " + " | ".join(cells) + " |")
    if acc_images:
        lines += ["", f"Accuracy: {len(acc_images)} images of `{args.test}`, its {len(base)} identities "
                  f"enrolled with {max(sizes) - len(base)} distractor identities (other people's prototypes) "
                  "filling the gallery to each size."]
    write_bench_section(SECTION, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
