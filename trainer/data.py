"""Streaming the shards into batches: SPEC resolution, a deterministic resumable sample stream, prototypes.

The stream (per rank) is a pure function of (shards, seed, rank, world size, batch size):
- the shard list is shuffled once with the seed and split by rank (`shards[rank::world]`), so no two
  ranks ever read the same shard; each epoch then reads the rank's shards in a seeded order, forever
  (no epoch end, so ranks with unequal sample counts never hang DDP);
- raw samples (undecoded bytes) pass a seeded shuffle buffer and are numbered g = 0, 1, 2, ...;
- batch b holds positions [b*B, (b+1)*B). DataLoader worker w of W decodes and augments only the
  batches b with (b - start) % W == w and skips the rest undecoded, so the batch sequence is the same
  for any worker count, and resuming at step N means starting at batch N: exact resume.
- augmentation randomness comes from one generator per batch seeded by (seed, rank, b); row g - b*B of
  its draws belongs to position g.
- workers decode and augment every sample completely (noise and erasing included) and hand packed
  batches (compact uint8/uint16/bool arrays in reusable shared-memory slots) to the consuming process,
  which copies them out (`unpack_batch`): the batch stays compact (uint8 images) until the training step
  converts it on its device (`to_device_batch`: float images in [0,1], long labels).

Decoding uses protoreg.dataset.SAFE_DECODERS only: anything else in a sample (.pyd, .pkl, ...) is
dropped as raw bytes, never unpickled. Unreadable shards, truncated tars and corrupt samples are skipped
and counted (`skipped` in each batch) instead of crashing the run.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators

from protoreg import dataset as ds
from trainer.augment import (
    NUM_DRAWS,
    AugParams,
    augment_garments,
    augment_sample,
    erase_mask,
    fit_sample,
    params_from_draws,
)
from trainer.config import AugmentConfig

REQUIRED = ds.SAMPLE_ENTRIES


class DataSpecError(ValueError):
    """SPEC names no readable dataset; the message is one line naming SPEC and what was expected."""


# ----------------------------------------------------------------------------------------------------------
# SPEC resolution


@dataclass
class DataSource:
    """What a SPEC resolves to: shard URLs (local paths, pipe:, http(s)) and where the prototypes are."""

    spec: str
    urls: list[str]
    prototypes: str | None = None
    manifest: dict[str, Any] | None = None
    root: str | None = None  # the dataset folder (local path or URL prefix), when known


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://", "pipe:", "s3://", "gs://", "file:"))


def _read_remote_text(url: str) -> str:
    with wds.gopen(url, "rb") as f:
        return f.read().decode("utf-8")


def _manifest_shards(manifest: dict[str, Any], where: str) -> list[str]:
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataSpecError(f"{where}: manifest lists no shards")
    names = [s["name"] if isinstance(s, dict) else str(s) for s in shards]
    return names


def _check_local_shards(manifest: dict[str, Any], root: Path) -> None:
    """Every shard the manifest lists is there with its recorded size (cheap: no hashing; see verify)."""
    for shard in manifest.get("shards", []):
        if not isinstance(shard, dict):
            continue
        path = root / shard["name"]
        if not path.is_file():
            raise DataSpecError(f"{shard['name']}: missing (listed in {root / ds.MANIFEST_NAME}, not found)")
        if "bytes" in shard and path.stat().st_size != shard["bytes"]:
            raise DataSpecError(
                f"{shard['name']}: {path.stat().st_size} bytes, the manifest says {shard['bytes']} "
                f"(damaged or replaced; run `protoreg verify {root}`)"
            )


def resolve_spec(spec: str, prototypes: str = "") -> DataSource:
    """SPEC -> DataSource. A dataset folder (local or URL ending in '/' or without '.tar'), a brace list
    'dir/shard-{000000..000009}.tar', a comma/space separated list, or pipe:/http(s) URLs."""
    spec = spec.strip()
    if not spec:
        raise DataSpecError("--shards: empty SPEC (expected a dataset folder, shard list or URLs)")
    if "s3://" in spec:
        from protoreg import storage

        storage.register_webdataset_schemes()  # webdataset reads s3:// through fsspec (endpoint from env)
    local = Path(spec).expanduser()
    if not _is_url(spec) and local.is_dir():
        try:
            manifest = ds.load_manifest(local)
        except ds.DatasetFormatError as e:
            raise DataSpecError(str(e)) from None
        urls = [str(local / n) for n in _manifest_shards(manifest, str(local))]
        _check_local_shards(manifest, local)
        proto_name = (manifest.get("prototypes") or {}).get("file", ds.PROTOTYPES_NAME)
        proto = prototypes or str(local / proto_name)
        return DataSource(spec, urls, proto, manifest, str(local))
    if (
        spec.startswith(("http://", "https://", "s3://"))
        and not spec.split("?")[0].endswith(".tar")
        and "{" not in spec
    ):
        root = spec.rstrip("/")
        try:
            manifest = ds.load_manifest(root)  # remote-aware; refuses a newer major format version
        except ds.DatasetFormatError as e:
            raise DataSpecError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - any transport error means the same to the user
            raise DataSpecError(f"{spec}: cannot read {ds.MANIFEST_NAME} ({e})") from None
        urls = [f"{root}/{n}" for n in _manifest_shards(manifest, spec)]
        proto_name = (manifest.get("prototypes") or {}).get("file", ds.PROTOTYPES_NAME)
        return DataSource(spec, urls, prototypes or f"{root}/{proto_name}", manifest, root)
    parts = (
        [p for chunk in spec.split(",") for p in chunk.split()] if not spec.startswith("pipe:") else [spec]
    )
    urls: list[str] = []
    for p in parts:
        urls.extend(wds.shardlists.expand_urls(p))
    if not urls:
        raise DataSpecError(f"{spec}: no shards (expected a dataset folder, shard list or URLs)")
    for u in urls:
        if not _is_url(u) and not Path(u).exists():
            raise DataSpecError(f"{spec}: shard {u} not found")
    proto = prototypes
    root = None
    if not proto:
        first = urls[0]
        if not first.startswith("pipe:"):
            root = first.rsplit("/", 1)[0] if "/" in first else "."
            proto = f"{root}/{ds.PROTOTYPES_NAME}"
    return DataSource(spec, urls, proto or None, None, root)


def fetch_local(path_or_url: str, cache_dir: str | Path | None = None) -> Path:
    """A local path for a file that may be remote (http(s), pipe:): downloaded once into cache_dir."""
    if not _is_url(path_or_url):
        return Path(path_or_url)
    cache = Path(cache_dir or tempfile.gettempdir())
    cache.mkdir(parents=True, exist_ok=True)
    import hashlib

    target = cache / f"{hashlib.sha256(path_or_url.encode()).hexdigest()[:16]}-{Path(path_or_url).name}"
    if not target.exists():
        tmp = target.with_name(target.name + ".tmp")
        with wds.gopen(path_or_url, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------------------------------------
# Prototypes


@dataclass
class PrototypeBank:
    """All identities' prototypes as tensors, loaded once. Rows follow identity-id order."""

    names: list[str]
    ids: torch.Tensor  # (P,) long identity ids
    points: torch.Tensor  # (P, N, 3) float32
    normals: torch.Tensor  # (P, N, 3)
    albedo: torch.Tensor  # (P, N, 3)
    parts: torch.Tensor  # (N,) long 1..14 (shared sampling)
    vertex_ids: torch.Tensor  # (N,) long
    subset: torch.Tensor  # (N,) long: indices into the file's points (fixed strided subset)
    row_of_id: dict[int, int] = field(default_factory=dict)
    vertex_to_point: torch.Tensor | None = None  # (V,) long: nearest point of each body vertex, -1 unknown

    @property
    def num_points(self) -> int:
        return int(self.points.shape[1])

    def rows(self, identity_ids: torch.Tensor) -> torch.Tensor:
        """Bank rows of identity ids; an id absent from prototypes.h5 raises a clear error."""
        out = []
        for i in identity_ids.tolist():
            if i not in self.row_of_id:
                raise DataSpecError(
                    f"identity id {i}: not in prototypes.h5 (ids {sorted(self.row_of_id)[:10]}...)"
                )
            out.append(self.row_of_id[i])
        return torch.tensor(out, dtype=torch.long)


def point_subset(n_total: int, max_points: int) -> np.ndarray:
    """The fixed prototype points the model uses: all of them, or an evenly strided subset.

    Galleries must encode the same subset the model was trained on (see docs/trainer.md).
    """
    if max_points <= 0 or n_total <= max_points:
        return np.arange(n_total)
    return np.floor(np.arange(max_points) * (n_total / max_points)).astype(np.int64)


def load_prototype_bank(
    path: str | Path, max_points: int = 0, cache_dir: str | Path | None = None
) -> PrototypeBank:
    """Read prototypes.h5 (through protoreg.prototypes) into tensors."""
    from protoreg.prototypes import PrototypeError, read_prototypes

    local = fetch_local(str(path), cache_dir)
    try:
        protos = list(read_prototypes(local).values())
    except (PrototypeError, FileNotFoundError) as e:
        raise DataSpecError(f"{path}: cannot read prototypes ({str(e).splitlines()[0]})") from None
    if not protos:
        raise DataSpecError(f"{path}: holds no prototypes")
    n = len(protos[0].points)
    if any(len(p.points) != n for p in protos):
        raise DataSpecError(f"{path}: prototypes have different point counts (expected a shared sampling)")
    sub = point_subset(n, max_points)

    def stack(attr: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(p, attr)[sub] for p in protos]).astype(np.float32))

    ids = [int(p.identity_id) for p in protos]
    bank = PrototypeBank(
        names=[p.name for p in protos],
        ids=torch.tensor(ids, dtype=torch.long),
        points=stack("points"),
        normals=stack("normals"),
        albedo=stack("albedo"),
        parts=torch.from_numpy(protos[0].parts[sub].astype(np.int64)),
        vertex_ids=torch.from_numpy(protos[0].vertex_ids[sub].astype(np.int64)),
        subset=torch.from_numpy(sub.astype(np.int64)),
        row_of_id={i: r for r, i in enumerate(ids)},
    )
    bank.vertex_to_point = exact_vertex_to_point(bank)
    return bank


def exact_vertex_to_point(bank: PrototypeBank, num_vertices: int | None = None) -> torch.Tensor:
    """(V,) point index whose source vertex is that vertex, -1 elsewhere (used when no body mesh is known)."""
    v = int(num_vertices or (int(bank.vertex_ids.max()) + 1))
    table = torch.full((v,), -1, dtype=torch.long)
    table[bank.vertex_ids] = torch.arange(bank.num_points)
    return table


def nearest_vertex_to_point(bank: PrototypeBank, rest_vertices: np.ndarray) -> torch.Tensor:
    """(V,) nearest prototype point of every body vertex on the mean shape, so every pixel with a known
    vertex gets a target point (instead of only the ~30% of vertices that are some point's source)."""
    verts = torch.as_tensor(np.asarray(rest_vertices, dtype=np.float32))
    mean_pts = bank.points.mean(dim=0)
    out = torch.empty(len(verts), dtype=torch.long)
    for s in range(0, len(verts), 4096):
        out[s : s + 4096] = torch.cdist(verts[s : s + 4096], mean_pts).argmin(dim=1)
    return out


def attach_body_vertices(bank: PrototypeBank, manifest: dict[str, Any] | None) -> str:
    """Use the dataset's body model (else the embedded default) for the vertex->point table when its
    vertex count matches; returns a word on what was used (for the log)."""
    try:
        from protoreg.body import load_body_model

        info = (manifest or {}).get("body_model") or {}
        path = info.get("path") or info.get("file") if isinstance(info, dict) else None
        body = load_body_model(path if path and Path(path).exists() else None)
        if int(bank.vertex_ids.max()) >= body.num_vertices:
            return "exact vertex matches (body model has fewer vertices)"
        import torch as _t

        rest = body.rest_vertices(_t.zeros(1, int(body.num_betas)))[0].numpy()
        bank.vertex_to_point = nearest_vertex_to_point(bank, rest)
        return f"nearest points of {body.num_vertices} body vertices"
    except Exception as e:  # noqa: BLE001 - the body model is optional for training
        return f"exact vertex matches ({type(e).__name__})"


# ----------------------------------------------------------------------------------------------------------
# The raw, deterministic sample stream


class SkipCounter:
    """Exception handler for webdataset that logs, counts and continues (a truncated shard or an
    unreadable URL costs its remaining samples, not the run)."""

    def __init__(self) -> None:
        self.count = 0
        self.messages: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        if len(self.messages) < 20:
            self.messages.append(f"{type(exn).__name__}: {str(exn)[:200]}")
        return True


def rank_and_world() -> tuple[int, int]:
    """torch.distributed rank/world when initialised, else the torchrun environment, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_shards(urls: list[str], seed: int, rank: int, world: int) -> list[str]:
    """This rank's fixed, disjoint share of the shards (shuffled once with the seed)."""
    if len(urls) < world:
        raise DataSpecError(f"{len(urls)} shard(s) for {world} ranks: every rank needs at least one shard")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5A4D])).permutation(len(urls))
    return [urls[i] for i in order[rank::world]]


class TruncatedShard(ValueError):
    """A tar stream ended inside a header or a member, or a header's checksum is wrong."""


TAR_BLOCK = 512
_ZERO_BLOCK = bytes(TAR_BLOCK)
_META_NAME = re.compile(r"__[^/]*__($|/)")
_FILE_KINDS = (b"0", b"\0", b"7")


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large sizes (its zero bytes are digits)
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _read_exact(stream: Any, n: int, url: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TruncatedShard(f"{url}: truncated tar ({len(data)} of {n} bytes)")
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data) and data[i : i + 1] not in (b"", b"\0"):
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1 : i + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        i += length
    return out


def _header_name(header: bytes) -> str:
    """A ustar header's path: name, behind its prefix field when there is one."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8")
    if header[345] and header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        return f"{prefix}/{name}"
    return name


def tar_file_members(stream: Any, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a (ustar, pax or GNU) tar stream, read block by block.

    Does what webdataset's tar_file_iterator does (skips non-files and __meta__ names) at a fraction of
    tarfile's per-member cost: every loader worker parses every sample's headers to keep the shuffled
    order, so this cost is paid once per sample per worker (hence the plain loop over plain values).
    """
    read = stream.read
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        header = read(TAR_BLOCK)
        if len(header) != TAR_BLOCK:
            if not header:
                return  # a stream that simply ends
            raise TruncatedShard(f"{url}: truncated tar header")
        if header == _ZERO_BLOCK:
            return  # end of archive
        stored = header[148:156]  # the checksum counts its own field as 8 spaces
        if _tar_number(stored) != sum(header) - sum(stored) + 256:
            raise TruncatedShard(f"{url}: tar header checksum mismatch")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _tar_number(header[124:136])
        pad = -size % TAR_BLOCK
        data = _read_exact(stream, size + pad, url)  # the member and its padding in one read
        if pad:
            data = data[:size]
        if kind in _FILE_KINDS and not pax and long_name is None:  # the common case: a plain ustar file
            name = _header_name(header)
        elif kind == b"x":
            pax = _pax_records(data)
            continue
        elif kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        elif kind == b"g":
            continue
        else:
            name = pax.get("path") or long_name or _header_name(header)
            pax, long_name = {}, None
        if kind not in _FILE_KINDS or ("__" in name and _META_NAME.match(name)):
            continue
        yield name, data


def tar_members(opened: Iterator[dict[str, Any]], handler: SkipCounter) -> Iterator[tuple[str, bytes, str]]:
    """(name, bytes, url) of the files of the shards webdataset's url_opener opened; a broken shard is
    counted and left."""
    for source in opened:
        url = source["url"]
        try:
            for name, data in tar_file_members(source["stream"], url):
                yield name, data, url
        except Exception as exn:  # noqa: BLE001 - counted; the rest of the shard is lost
            handler(exn)
        finally:
            close = getattr(source["stream"], "close", None)
            if close is not None:
                close()


_BASE_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split


def split_key(name: str) -> tuple[str, str] | None:
    """webdataset's key/extension split of a member name: (path up to the first dot of the base name,
    the rest lower-cased), or None without such a dot (string methods: a regex per member costs more)."""
    base = name.rfind("/") + 1
    dot = name.find(".", base)
    if dot < 0:
        return None
    if dot == base:  # a base name starting with a dot: the regex's own (odd) answer
        m = _BASE_EXT.match(name)
        return (m.group(1), m.group(2).lower()) if m else None
    return name[:dot], name[dot + 1 :].lower()


def group_samples(
    files: Iterator[tuple[str, bytes, str]], keep: set[str], handler: SkipCounter
) -> Iterator[dict[str, Any]]:
    """Consecutive tar members with the same key -> one sample holding only the entries in `keep`
    (webdataset's group_by_keys, without its per-member overhead that every worker pays for every
    sample); a duplicate entry is counted and dropped."""
    current: dict[str, Any] | None = None
    current_key = None
    seen: set[str] = set()
    for name, data, url in files:
        split = split_key(name)
        if split is None:
            continue
        key, ext = split
        if key != current_key:
            if current is not None:
                yield current
            current, current_key, seen = {"__key__": key, "__url__": url}, key, set()
        if ext in seen:
            handler(ValueError(f"{name}: duplicate file name in tar file"))
            continue
        seen.add(ext)
        if ext in keep:
            current[ext] = data
    if current is not None:
        yield current


def raw_samples(
    urls: list[str], handler: SkipCounter, bad_samples: list[int], shard_log: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes) of the given shards in order; entries other than the schema's are dropped here,
    so a pickle entry is never even passed on. Samples missing an entry are counted and skipped."""
    keep = set(ds.SAFE_DECODERS)
    for url in urls:
        if shard_log is not None:
            shard_log.append(url)
        stream = tariterators.url_opener([dict(url=url)], handler=handler)
        for sample in group_samples(tar_members(stream, handler), keep, handler):
            if any(e not in sample for e in REQUIRED):
                bad_samples[0] += 1
                continue
            yield sample


def shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Seeded reservoir-style shuffle buffer: fill to `size`, then emit a random slot per new item."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(0, size))
        out, buf[j] = buf[j], item
        yield out
    while buf:
        j = int(rng.integers(0, len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def batch_draws(seed: int, rank: int, batch_index: int, batch_size: int) -> np.ndarray:
    """(batch_size, NUM_DRAWS) uniforms of batch b: row i holds the augmentation draws of position
    b*batch_size + i (one generator per batch; one per sample cost as much as a decode)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, rank, batch_index, 0xA06]))
    return rng.random((batch_size, NUM_DRAWS))


def identity_of(meta: dict[str, Any]) -> int:
    ident = meta.get("identity")
    if isinstance(ident, dict) and "id" in ident:
        return int(ident["id"])
    if "identity_id" in meta:
        return int(meta["identity_id"])
    raise ds.DatasetFormatError("json: no identity id (expected identity.id)")


def decode_training_entries(raw: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Only the entries training reads (rgb, parts, vid, json), with the schema's safe decoders; vid as its
    stored uint16 values (what the batches are packed as)."""
    rgb, parts, meta = (ds.decode_entry(n, raw[n]) for n in ("rgb.jpg", "parts.png", "json"))
    vid = ds.decode_vid_values(raw["vid.png"])  # raw_samples hands out plain bytes
    if parts.shape != rgb.shape[:2] or vid.shape != rgb.shape[:2]:
        raise ds.DatasetFormatError(f"sample {raw['__key__']}: rgb/parts/vid sizes differ")
    return rgb, parts, vid, meta


def decode_and_augment(raw: dict[str, Any], params: AugParams, out_hw: tuple[int, int]) -> dict[str, Any]:
    """Decode and run the whole augmentation with the sample's parameters (`valid` follows from its erase
    box when packed); raises on a corrupt sample."""
    rgb, parts, vid, meta = decode_training_entries(raw)
    garments = None
    if "garments.png" in raw:
        garments = ds.decode_entry("garments.png", raw["garments.png"])
        if garments.shape != parts.shape:
            raise ds.DatasetFormatError(f"sample {raw['__key__']}: garments.png size differs from parts.png")
    source_garments = garments if any(params.garment_tints) else None
    rgb, parts, vid = augment_sample(params, rgb, parts, vid, out_hw, source_garments)
    return {
        "rgb": rgb,
        "parts": parts,
        "vid": vid,
        "garments": None if garments is None else augment_garments(garments, params, out_hw),
        "aug": params,
        "identity": identity_of(meta),
        "key": str(raw["__key__"]),
        "url": str(raw["__url__"]),
    }


def packed_bytes(batch_size: int, hw: tuple[int, int]) -> int:
    """Bytes of one packed batch: rgb (B,3,H,W) uint8, parts (B,H,W) uint8, vid (B,H,W) uint16,
    valid (B,H,W) bool."""
    return batch_size * hw[0] * hw[1] * 7


def packed_views(buffer: np.ndarray, b: int, hw: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """rgb, parts, vid, valid arrays laid out in a flat uint8 buffer of at least packed_bytes(b, hw)
    (vid at an even offset, so its uint16 view is aligned)."""
    h, w = hw
    n = b * h * w
    rgb = buffer[: 3 * n].reshape(b, 3, h, w)
    parts = buffer[3 * n : 4 * n].reshape(b, h, w)
    vid = buffer[4 * n : 6 * n].view(np.uint16).reshape(b, h, w)
    valid = buffer[6 * n : 7 * n].view(np.bool_).reshape(b, h, w)
    return rgb, parts, vid, valid


def shared_buffer(nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor in shared memory, uninitialised (no copy, unlike share_memory_())."""
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).new(storage)


def shared_memory_free() -> int:
    """Free bytes of /dev/shm, where torch's shared memory lives (containers often give it only 64 MB)."""
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


class BatchSlots:
    """Shared-memory slots that DataLoader workers pack batches into and the consumer releases once it has
    finished them: fresh shared memory for every batch costs more (page faults on both sides) than
    packing it. Created before the workers start, so they inherit it; worker w owns `per_worker` slots
    and fills them in turn, waiting only if the consumer still holds the one it needs."""

    def __init__(self, workers: int, per_worker: int, batch_size: int, hw: tuple[int, int]) -> None:
        n = workers * per_worker
        self.per_worker = per_worker
        self.data = shared_buffer(n * packed_bytes(batch_size, hw)).view(n, -1)
        self.busy = shared_buffer(n)
        self.busy.zero_()

    def acquire(self, worker: int, count: int) -> int:
        """Slot of the worker's `count`-th batch, once free."""
        slot = worker * self.per_worker + count % self.per_worker
        busy = self.busy.numpy()
        while busy[slot]:
            time.sleep(0.0005)
        busy[slot] = 1
        return slot

    def release(self, slot: int) -> None:
        self.busy.numpy()[slot] = 0


def pack_batch(
    items: list[dict[str, Any]],
    positions: list[int],
    skipped: int,
    batch_index: int,
    slots: BatchSlots | None = None,
    slot: int = -1,
) -> dict[str, Any]:
    """Per-sample results in one flat uint8 buffer (`packed_views`: rgb uint8, parts uint8, vid uint16,
    valid bool from each sample's erase box) plus plain-Python metadata. This is what crosses from a
    loader worker to the trainer: 7 bytes per pixel in a single shared-memory block (a float/long batch
    would take 29), as copying batches through shared memory costs more than augmenting. Packed into
    `slots[slot]` when given, the batch names only its slot ("buffer" None): the consumer reads the slot
    through its own mapping, so no tensor crosses over (each one costs a file descriptor fetched from the
    worker's resource-sharer socket and a second mapping of the slots)."""
    b = len(items)
    hw = items[0]["parts"].shape if items else (1, 1)
    nbytes = packed_bytes(b, hw)
    if slots is not None and slot >= 0:
        buffer = slots.data[slot, :nbytes]
    elif get_worker_info() is not None:
        buffer = shared_buffer(nbytes)
    else:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    rgb, parts, vid, valid = packed_views(buffer.numpy(), b, hw)
    if slot >= 0:
        buffer = None
    if items:
        cv2 = ds.opencv()
        for i, it in enumerate(items):
            planes = list(rgb[i])
            if cv2.split(it["rgb"], planes)[0].ctypes.data != planes[0].ctypes.data:
                rgb[i] = it["rgb"].transpose(2, 0, 1)  # OpenCV declined the views: plain copy
        np.stack([it["parts"] for it in items], out=parts)
        for i, it in enumerate(items):  # garments.png labels ride in the high bits of parts (0: none known)
            if it.get("garments") is not None:
                parts[i] |= (it["garments"] + 1) << 4
        np.stack([it["vid"] for it in items], out=vid, casting="unsafe")  # 16-bit PNG values (int32 ok)
        for i, it in enumerate(items):
            erase_mask(valid[i], it["aug"])
    return {
        "buffer": buffer,
        "hw": tuple(hw),
        "slot": slot,
        "identity": [it["identity"] for it in items],
        "position": list(positions),
        "keys": [it["key"] for it in items],
        "urls": [it["url"] for it in items],
        "skipped": int(skipped),
        "batch_index": int(batch_index),
    }


def unpack_batch(packed: dict[str, Any]) -> dict[str, Any]:
    """A packed batch -> the trainer's compact batch (see docs/trainer.md): uint8 images (B,3,H,W), uint8
    parts, uint16 vid, bool valid, as tensors over one private copy of the packed bytes (one memcpy, one
    thread), so the packed buffer can be reused as soon as this returns. No conversion here: that is
    `to_device_batch`'s, in the training step, on the device."""
    b = len(packed["keys"])
    nbytes = packed_bytes(b, packed["hw"])
    own = np.array(packed["buffer"].numpy()[:nbytes])  # numpy's copy: a plain memcpy, this thread only
    rgb, parts, vid, valid = (torch.from_numpy(a) for a in packed_views(own, b, packed["hw"]))
    garments = parts >> 4  # garments.png label + 1, 0 where the sample has none (pack_batch)
    parts &= 15
    return {
        "images": rgb,
        "parts": parts,
        "garments": garments,
        "vid": vid,
        "valid": valid,
        "identity": torch.tensor(packed["identity"], dtype=torch.long),
        "position": torch.tensor(packed["position"], dtype=torch.long),
        "keys": packed["keys"],
        "urls": packed["urls"],
        "skipped": packed["skipped"],
        "batch_index": packed["batch_index"],
    }


def to_device_batch(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The loader's compact batch -> what the model and losses take, converted on `device`: images float
    in [0,1] (B,3,H,W; x * (1/255): 0 and 255 map to exactly 0 and 1, a multiply costs a third of a
    divide on a CPU), parts and vid long (B,H,W), valid bool; other entries as they are (identity and
    position stay long on the host). uint8 crosses the host and the host->device copy (4x fewer bytes
    than float32, as FFCV and DALI hand data over); vid crosses as its bits in int16 (torch's uint16 has
    few device kernels) and is widened back to 0..65535 there."""
    device = torch.device(device)
    images = batch["images"].to(device, non_blocking=True).float().mul_(1 / 255)  # x / 255 within an ulp
    vid = batch["vid"]
    if vid.dtype == torch.uint16:
        vid = vid.view(torch.int16).to(device, non_blocking=True).long().bitwise_and_(0xFFFF)
    else:
        vid = vid.to(device, non_blocking=True).long()
    return {
        **batch,
        "images": images,
        "parts": batch["parts"].to(device, non_blocking=True).long(),
        "vid": vid,
        "valid": batch["valid"].to(device, non_blocking=True),
        **({"garments": batch["garments"].to(device).long()} if "garments" in batch else {}),
    }


def collate(
    items: list[dict[str, Any]], positions: list[int], skipped: int, batch_index: int
) -> dict[str, Any]:
    """Samples -> the trainer's compact batch (`pack_batch` then `unpack_batch`)."""
    return unpack_batch(pack_batch(items, positions, skipped, batch_index))


class ShardStream(IterableDataset):
    """Infinite, resumable, worker-count-invariant batches of one rank (see the module docstring)."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        image_hw: tuple[int, int],
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start_batch: int = 0,
        shuffle_buffer: int = 256,
        augment: AugmentConfig | None = None,
        shard_log_path: str | None = None,
    ) -> None:
        super().__init__()
        self.urls = rank_shards(list(urls), seed, rank, world)
        self.batch_size = int(batch_size)
        self.image_hw = tuple(image_hw)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.start_batch = int(start_batch)
        self.shuffle_buffer = int(shuffle_buffer)
        self.augment = augment
        self.shard_log_path = shard_log_path
        self.slots: BatchSlots | None = None  # set by BatchLoader while it starts the workers

    def epoch_order(self, epoch: int) -> list[str]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, epoch, 0xE90C]))
        return [self.urls[i] for i in rng.permutation(len(self.urls))]

    def _positions(self, handler: SkipCounter, bad: list[int], log: list[str] | None):
        """(raw sample, position, newly skipped before it) forever, epoch after epoch."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.rank, 0x5B0F]))

        def epochs():
            epoch = 0
            while True:
                n = 0
                for s in raw_samples(self.epoch_order(epoch), handler, bad, log):
                    n += 1
                    yield s
                if n == 0:
                    msgs = "; ".join(handler.messages[-3:])
                    raise ds.DatasetFormatError(f"no readable samples in {len(self.urls)} shard(s) ({msgs})")
                epoch += 1

        seen_bad = 0
        for pos, s in enumerate(shuffled(epochs(), self.shuffle_buffer, rng)):
            total = handler.count + bad[0]
            yield s, pos, total - seen_bad
            seen_bad = total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        handler, bad = SkipCounter(), [0]
        log: list[str] | None = [] if self.shard_log_path else None
        logged = 0
        bsz = self.batch_size
        items: list[dict[str, Any]] = []
        positions: list[int] = []
        skipped = 0
        draws, draws_of = None, -1
        slots = self.slots if info is not None else None
        packed = 0
        for raw, pos, newly_bad in self._positions(handler, bad, log):
            b = pos // bsz
            mine = b >= self.start_batch and (b - self.start_batch) % nw == wid
            if log is not None and len(log) > logged:
                self._log_shards(log[logged:], wid)
                logged = len(log)
            if mine:
                skipped += newly_bad
                if draws_of != b:
                    draws, draws_of = batch_draws(self.seed, self.rank, b, bsz), b
                params = params_from_draws(draws[pos - b * bsz], self.image_hw, self.augment)
                try:
                    items.append(decode_and_augment(raw, params, self.image_hw))
                    positions.append(pos)
                except Exception as e:  # noqa: BLE001 - a corrupt sample is skipped and counted
                    skipped += 1
                    if len(handler.messages) < 20:
                        handler.messages.append(f"{raw.get('__key__')}: {type(e).__name__}: {e}")
            if pos % bsz == bsz - 1 and mine:
                slot = slots.acquire(wid, packed) if slots is not None and items else -1
                packed += 1
                yield pack_batch(items, positions, skipped, b, slots, slot)
                items, positions, skipped = [], [], 0

    def _log_shards(self, urls: list[str], wid: int) -> None:
        with open(self.shard_log_path, "a") as f:
            for u in urls:
                f.write(f"{self.rank}\t{wid}\t{u}\n")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _as_is(packed: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's per-batch conversion, as nothing: a packed batch is ready to send (the default
    walks every list and dict of it looking for numpy arrays, in every worker, for every batch)."""
    return packed


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def reuse_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc serve allocations below `mmap_threshold` from its heap and keep up to `trim_threshold`
    of freed memory: unpacking a batch allocates a fresh ~7 MB copy (batch 32 at 128x256), and with the
    defaults every one of them is mapped and page-faulted anew. False where not glibc."""
    if sys.platform != "linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):
        return False


class BatchLoader:
    """Iterates a DataLoader of packed batches and unpacks each one in this process (`unpack_batch`)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.iterator: Any = None  # the running DataLoader iterator (its workers), for measurements

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reuse_freed_memory()
        stream, workers = self.loader.dataset, self.loader.num_workers
        slots = None
        if workers > 0 and sys.platform == "linux" and isinstance(stream, ShardStream):
            per_worker = (self.loader.prefetch_factor or 2) + 2  # queued batches + one being packed + slack
            need = workers * per_worker * packed_bytes(stream.batch_size, stream.image_hw)
            if need < shared_memory_free() // 2:  # else (a small /dev/shm) fresh memory per batch
                slots = BatchSlots(workers, per_worker, stream.batch_size, stream.image_hw)
        stream.slots = slots
        try:
            self.iterator = iter(self.loader)  # starts (forks) the workers, which keep `slots`
        finally:
            stream.slots = None
        for packed in self.iterator:
            try:
                if packed["buffer"] is None:  # packed into a slot (see pack_batch)
                    packed["buffer"] = slots.data[packed["slot"]]
                batch = unpack_batch(packed)
            finally:
                if slots is not None and packed["slot"] >= 0:
                    slots.release(packed["slot"])
            yield batch


def make_loader(stream: ShardStream, workers: int) -> BatchLoader:
    """Compact batches of the stream: decoded, augmented and packed in the DataLoader workers
    (batch_size=None), copied out in the consuming process; `to_device_batch` converts them."""
    kwargs: dict[str, Any] = {"collate_fn": _as_is}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False, worker_init_fn=_worker_init)
        if sys.platform == "linux":
            kwargs["multiprocessing_context"] = "fork"
    return BatchLoader(DataLoader(stream, batch_size=None, num_workers=workers, **kwargs))


# ----------------------------------------------------------------------------------------------------------
# Finite reading (validation, evaluation)


def iterate_samples(
    urls: list[str],
    image_hw: tuple[int, int] | None = None,
    limit: int | None = None,
    skips: SkipCounter | None = None,
) -> Iterator[dict[str, Any]]:
    """Every sample of the shards once, in order, decoded safely and (optionally) resized, no augmentation.

    Yields dicts rgb (H,W,3) uint8, parts, vid, valid, identity, key, url. Corrupt samples are skipped.
    """
    handler = skips or SkipCounter()
    bad = [0]
    n = 0
    for raw in raw_samples(urls, handler, bad):
        try:
            rgb, parts, vid, meta = decode_training_entries(raw)
            hw = image_hw or rgb.shape[:2]
            rgb, parts, vid, params = fit_sample(np.random.default_rng(0), rgb, parts, vid, hw, None)
        except Exception:  # noqa: BLE001
            handler.count += 1
            continue
        out = {
            "rgb": rgb,
            "parts": parts,
            "vid": vid.astype(np.int32),
            "valid": np.ones(parts.shape, bool),
            "aug": params,
            "identity": identity_of(meta),
            "key": str(raw["__key__"]),
            "url": str(raw["__url__"]),
            "json": meta,
        }
        yield out
        n += 1
        if limit is not None and n >= limit:
            return
    handler.count += bad[0]


def iterate_batches(
    urls: list[str], batch_size: int, image_hw: tuple[int, int], limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """iterate_samples grouped into compact batches (no augmentation; convert with `to_device_batch`)."""
    items: list[dict[str, Any]] = []
    n = 0
    for s in iterate_samples(urls, image_hw, limit):
        items.append(s)
        if len(items) == batch_size:
            yield collate(items, list(range(n, n + len(items))), 0, n // batch_size)
            n += len(items)
            items = []
    if items:
        yield collate(items, list(range(n, n + len(items))), 0, n // batch_size)
