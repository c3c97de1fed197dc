"""The trainer's data stream: determinism across worker counts, exact resume, safe decoding, skip counting."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from protoreg.parts import OCCLUDER
from tests.train_fakes import write_fake_dataset
from trainer.augment import NUM_DRAWS, AugParams, crop_box, draw_params, erase_mask, fit_sample, resize_labels
from trainer.config import AugmentConfig
from trainer.data import (
    DataSpecError,
    ShardStream,
    collate,
    iterate_samples,
    load_prototype_bank,
    make_loader,
    point_subset,
    rank_shards,
    resolve_spec,
    to_device_batch,
)


@pytest.fixture(scope="module")
def fake_ds(tmp_path_factory) -> Path:
    return write_fake_dataset(tmp_path_factory.mktemp("fake") / "ds", n_samples=24, shard_size=6)


def take(stream: ShardStream, n: int, workers: int) -> list[dict]:
    out = []
    for b in make_loader(stream, workers):
        out.append(b)
        if len(out) == n:
            return out
    return out


def stream(ds: Path, **kw) -> ShardStream:
    src = resolve_spec(str(ds))
    args = dict(batch_size=4, image_hw=(64, 32), seed=3, shuffle_buffer=8, augment=AugmentConfig())
    args.update(kw)
    return ShardStream(src.urls, **args)


def test_spec_forms_resolve_to_the_same_shards(fake_ds):
    folder = resolve_spec(str(fake_ds))
    assert [Path(u).name for u in folder.urls] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert folder.prototypes == str(fake_ds / "prototypes.h5")
    brace = resolve_spec(str(fake_ds / "shard-{000000..000003}.tar"))
    assert brace.urls == folder.urls and brace.prototypes == folder.prototypes
    with pytest.raises(DataSpecError, match="shard-000008.tar not found"):
        resolve_spec(str(fake_ds / "shard-{000008..000009}.tar"))
    with pytest.raises(DataSpecError, match="no manifest.json"):
        resolve_spec(str(fake_ds.parent))


def test_batches_identical_for_any_worker_count_and_resume_position(fake_ds):
    # 16 batches: more than the 2 x 6 shared-memory slots of 2 workers, so every slot is reused
    one = take(stream(fake_ds), 16, workers=0)
    two = take(stream(fake_ds), 16, workers=2)
    assert [b["batch_index"] for b in two] == list(range(16))
    for a, b in zip(one, two, strict=True):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["parts"], b["parts"])
        assert torch.equal(a["vid"], b["vid"]) and torch.equal(a["valid"], b["valid"])
    # the shuffle buffer mixes across epochs: 24 draws cover most of the 24 samples
    keys = [k for b in one[:6] for k in b["keys"]]
    assert len(keys) == 24 and len(set(keys)) >= 18
    resumed = take(stream(fake_ds, start_batch=4), 2, workers=2)
    assert [b["batch_index"] for b in resumed] == [4, 5]
    for a, b in zip(one[4:6], resumed, strict=True):
        assert torch.equal(a["images"], b["images"]) and a["keys"] == b["keys"]


def test_batch_tensors_have_the_documented_types(fake_ds):
    """The loader hands over compact batches (uint8 images and parts, uint16 vid, bool valid);
    to_device_batch makes the model's float images in [0,1] and long labels from them, value for value."""
    b = take(stream(fake_ds), 1, workers=0)[0]
    assert b["images"].shape == (4, 3, 64, 32) and b["images"].dtype == torch.uint8
    assert b["parts"].shape == (4, 64, 32) and b["parts"].dtype == torch.uint8
    assert b["vid"].dtype == torch.uint16 and b["valid"].dtype == torch.bool
    assert int(b["parts"].max()) <= 15 and b["identity"].tolist() == [int(k) % 3 for k in b["keys"]]
    d = to_device_batch(b, "cpu")
    assert d["images"].dtype == torch.float32 and d["images"].shape == (4, 3, 64, 32)
    assert torch.allclose(d["images"] * 255, b["images"].float(), rtol=0, atol=1e-4)
    assert 0 <= float(d["images"].min())
    assert float(d["images"].max()) <= 1 and d["parts"].dtype == torch.long and d["vid"].dtype == torch.long
    assert torch.equal(d["parts"], b["parts"].long()) and torch.equal(d["vid"], b["vid"].long())
    assert torch.equal(d["valid"], b["valid"]) and d["keys"] == b["keys"]
    empty = collate([], [], 4, 7)  # every sample of a batch corrupt: an empty batch, still counted
    assert empty["images"].shape[0] == 0 and empty["parts"].dtype == torch.uint8 and empty["skipped"] == 4


def test_garment_labels_follow_the_crop_and_erasing_and_ride_in_the_batch():
    from protoreg.dataset import GARMENT_ID
    from trainer.augment import augment_garments, augment_sample, params_from_draws

    parts = np.zeros((128, 64), np.uint8)
    parts[20:110, 16:48] = 2
    garments = np.where(parts > 0, GARMENT_ID["top"], GARMENT_ID["none"]).astype(np.uint8)
    cfg = AugmentConfig(enabled=True, crop_scale=(0.6, 0.6), erase_p=1.0, background_p=0, garment_p=0)
    params = params_from_draws(np.full(NUM_DRAWS, 0.3), (64, 32), cfg)
    assert params.erase is not None and params.box != (0.0, 0.0, 1.0, 1.0)
    rgb = np.zeros((128, 64, 3), np.uint8)
    _, out_parts, _ = augment_sample(params, rgb, parts, parts.astype(np.int32), (64, 32))
    out = augment_garments(garments, params, (64, 32))
    assert out.shape == (64, 32)
    assert np.array_equal(out == GARMENT_ID["top"], (out_parts >= 1) & (out_parts <= 14))  # same pixels
    y0, x0, eh, ew = params.erase
    assert (out[y0 : y0 + eh, x0 : x0 + ew] == GARMENT_ID["none"]).all()  # erased: an occluder
    item = {"rgb": np.zeros((64, 32, 3), np.uint8), "parts": out_parts, "vid": np.zeros((64, 32), np.uint16),
            "aug": params, "identity": 0, "key": "0", "url": "u"}  # fmt: skip
    batch = collate([{**item, "garments": out}, {**item, "garments": None}], [0, 1], 0, 0)
    assert torch.equal(batch["parts"][0], torch.from_numpy(out_parts))  # the part labels as they were
    assert torch.equal(batch["parts"][1], torch.from_numpy(out_parts))
    assert torch.equal(batch["garments"][0], torch.from_numpy(out) + 1)  # label + 1 ...
    assert int(batch["garments"][1].max()) == 0  # ... and 0 where a sample has no garments.png
    assert to_device_batch(batch, "cpu")["garments"].dtype == torch.long


def test_device_conversion_keeps_16_bit_vertex_ids_and_scales_images():
    """vid crosses to the device as its bits in int16: ids above 32767 must come back unchanged."""
    vid = torch.tensor([[[0, 1, 32767, 32768, 65535]]], dtype=torch.int32).to(torch.uint16)
    images = torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8).view(1, 1, 1, 5).repeat(1, 3, 1, 1)
    batch = {"images": images, "parts": torch.full((1, 1, 5), 15, dtype=torch.uint8), "vid": vid,
             "valid": torch.tensor([[[True, False, True, True, True]]]), "keys": ["k"]}  # fmt: skip
    d = to_device_batch(batch, torch.device("cpu"))
    assert d["vid"].tolist() == [[[0, 1, 32767, 32768, 65535]]] and d["vid"].dtype == torch.long
    expected = torch.tensor([0.0, 1.0, 128.0, 254.0, 255.0], dtype=torch.float64) / 255
    for c in range(3):
        got = d["images"][0, c, 0]
        assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, rtol=1e-7, atol=0)
        assert float(got[0]) == 0.0 and float(got[-1]) == 1.0  # the ends exactly
    assert d["parts"].dtype == torch.long and d["valid"].tolist() == [[[True, False, True, True, True]]]


def test_ranks_get_disjoint_shards():
    urls = [f"s{i}.tar" for i in range(7)]
    shares = [rank_shards(urls, 5, r, 3) for r in range(3)]
    assert sorted(u for s in shares for u in s) == sorted(urls)
    assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1 :])
    with pytest.raises(DataSpecError, match="2 shard\\(s\\) for 3 ranks"):
        rank_shards(urls[:2], 5, 0, 3)


class Boom:
    """Unpickling this would create a marker file: proof that a shard entry was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_entries_are_never_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(Boom(str(marker)))
    assert not marker.exists()
    extra = {i: {"pyd": payload, "pkl": payload, "pickle": payload} for i in range(6)}
    ds = write_fake_dataset(tmp_path / "ds", n_samples=6, shard_size=6, extra_entries=extra)
    with tarfile.open(ds / "shard-000000.tar") as tf:
        assert any(n.endswith(".pyd") for n in tf.getnames())
    batches = take(stream(ds, batch_size=3, shuffle_buffer=1), 2, workers=0)
    samples = list(iterate_samples(resolve_spec(str(ds)).urls))
    assert len(samples) == 6 and all("pyd" not in s and "pkl" not in s for s in samples)
    assert sum(len(b["keys"]) for b in batches) == 6 and all(b["skipped"] == 0 for b in batches)
    assert not marker.exists()


def test_truncated_shard_and_corrupt_sample_are_skipped_and_counted(tmp_path):
    ds = write_fake_dataset(tmp_path / "ds", n_samples=12, shard_size=6)
    shard = ds / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated mid-shard
    src = resolve_spec(str(ds))
    batches = take(ShardStream(src.urls, 4, (64, 32), seed=0, shuffle_buffer=1), 6, workers=0)
    keys = [k for b in batches for k in b["keys"]]
    skipped = sum(b["skipped"] for b in batches)
    assert skipped >= 1
    assert set(keys) >= {f"{i:09d}" for i in range(6)}  # the intact shard is read completely
    assert len(set(keys)) < 12  # samples behind the truncation are gone, not invented


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path):
    bad = {2: {"rgb.jpg": b"\xff\xd8 this is not a jpeg"}}
    ds = write_fake_dataset(tmp_path / "ds", n_samples=6, shard_size=6, extra_entries=bad)
    src = resolve_spec(str(ds))
    batches = take(ShardStream(src.urls, 3, (64, 32), seed=0, shuffle_buffer=1), 2, workers=0)
    keys = [k for b in batches for k in b["keys"]]
    assert "000000002" not in keys and len(keys) == 5
    assert sum(b["skipped"] for b in batches) == 1


def test_tar_reader_gives_tarfiles_members_and_webdatasets_keys(tmp_path):
    """The loader's own tar parser (every worker runs it on every sample) against the standard library:
    the same regular files with the same bytes from ustar, pax and GNU headers (long names, a prefix
    field), __meta__ names and directories left out; keys split as webdataset's regex splits them."""
    import io
    import re

    from trainer.data import _tar_number, split_key, tar_file_members

    names = ["000001.rgb.jpg", "000001.json", "d" * 120 + "/000002.vid.png", "__index__", "sub/x.y.z"]
    for fmt, path in [(tarfile.USTAR_FORMAT, tmp_path / "u.tar"), (tarfile.PAX_FORMAT, tmp_path / "p.tar"),
                      (tarfile.GNU_FORMAT, tmp_path / "g.tar")]:  # fmt: skip
        with tarfile.open(path, "w", format=fmt) as tf:
            info = tarfile.TarInfo("adir")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
            long = [] if fmt == tarfile.USTAR_FORMAT else ["e" * 130 + ".json"]  # a pax / GNU long name
            for i, n in enumerate(names + long):
                data = bytes(range(i, i + 7)) * (i * 100 + 1)
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tf:
            expected = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
        expected = [(n, d) for n, d in expected if n != "__index__"]
        with open(path, "rb") as f:
            assert list(tar_file_members(f, str(path))) == expected, fmt
    assert _tar_number(b"0000644\0") == 0o644 and _tar_number(b"\x80" + bytes(6) + b"\x01\x00") == 256
    webdataset_split = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
    for name in ["a.b", "dir/x.y.Z", ".hidden", "a", "d.e/f", "d/.x", "a.b/.x", "x..y", "a.b/"]:
        m = webdataset_split.match(name)
        assert split_key(name) == ((m.group(1), m.group(2).lower()) if m else None), name


def test_prototype_bank_and_fixed_point_subset(fake_ds):
    bank = load_prototype_bank(fake_ds / "prototypes.h5", max_points=200)
    assert bank.points.shape == (3, 200, 3) and bank.parts.shape == (200,)
    assert bank.ids.tolist() == [0, 1, 2] and bank.rows(torch.tensor([2, 0])).tolist() == [2, 0]
    assert set(bank.parts.tolist()) <= set(range(1, 15))
    assert point_subset(448, 200).tolist() == point_subset(448, 200).tolist()
    assert len(set(point_subset(448, 200).tolist())) == 200
    assert point_subset(100, 200).tolist() == list(range(100))


def augment_one(rng, rgb, parts, vid, out_hw, cfg):
    """fit_sample (the whole per-sample augmentation) -> (H,W,3) image as float, labels, valid."""
    rgb, parts, vid, params = fit_sample(rng, rgb, parts, vid, out_hw, cfg)
    valid = np.empty(parts.shape, bool)
    erase_mask(valid, params)
    return rgb.astype(np.float64), parts.astype(np.int64), vid.astype(np.int64), valid


def test_crop_moves_labels_with_pixels():
    rng = np.random.default_rng(0)
    h, w = 64, 32
    parts = (np.arange(h)[:, None] // 8 * 2 + np.arange(w)[None] // 16).astype(np.uint8)  # 8x2 blocks
    rgb = np.repeat((parts * 15)[..., None], 3, axis=2).astype(np.uint8)
    vid = parts.astype(np.int32) + 1
    cfg = AugmentConfig(
        jpeg_p=0, erase_p=0, blur_p=0, noise_p=0, gray_p=0, brightness=0, contrast=0, saturation=0, hue=0,
        garment_p=0,
    )
    out_rgb, out_parts, out_vid, valid = augment_one(rng, rgb, parts, vid, (h, w), cfg)
    assert out_rgb.shape == (h, w, 3) and valid.all()
    assert np.array_equal(out_vid, out_parts.astype(np.int64) + 1)
    # away from block borders the bilinear RGB agrees with the nearest-neighbour labels
    agree = np.abs(out_rgb[..., 0] - out_parts.astype(int) * 15) <= 2
    assert agree.mean() > 0.7
    shifted = np.abs(out_rgb[..., 0] - np.roll(out_parts, 3, axis=0).astype(int) * 15) <= 2
    assert shifted.mean() < agree.mean() - 0.2  # labels one crop-shift off would not agree
    # a real crop happened: the crop box is a strict part of the image
    params = draw_params(np.random.default_rng(0), (32, 16), cfg)
    assert params.geometric and params.box[2] * params.box[3] < 1.0
    box = crop_box(rng, (h, w), (32, 16), None)
    assert box == (0.0, 0.0, 32.0, 64.0)
    assert np.array_equal(resize_labels(parts, box, (64, 32)), parts)


def test_worker_noise_is_the_shifted_field_on_uint8_and_seeded():
    """The loader worker's noise on uint8 is the float definition (`shifted_noise`, std in [0,1] units)
    rounded and saturated; the same parameters give the same pixels, and the input is left alone."""
    from trainer.augment import PhotoParams, noise_field_hwc, noise_sample, shifted_noise

    rgb = np.random.default_rng(3).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    rgb[0, 0] = (0, 255, 128)  # saturation at both ends
    keep = rgb.copy()
    def noised(seed: int) -> np.ndarray:
        return noise_sample(rgb, AugParams(photo=PhotoParams(noise_std=0.05, noise_seed=seed)))

    out = noised(12345)
    assert np.array_equal(rgb, keep) and out.dtype == np.uint8
    field = shifted_noise(12345, (16, 8)).permute(1, 2, 0).double().numpy()
    ref = np.clip(np.rint(rgb.astype(np.float64) + 255 * 0.05 * field), 0, 255)
    assert np.abs(out - ref).max() <= 1  # float32 rounding at .5 only
    assert np.array_equal(out, noised(12345)) and not np.array_equal(out, noised(9))
    assert noise_sample(rgb, AugParams()) is rgb  # no noise drawn: no pass at all
    assert noise_field_hwc(3, (16, 8)).flags.c_contiguous  # else every noised sample copies the field


def test_erased_pixels_keep_labels_but_are_invalid():
    rng = np.random.default_rng(1)
    parts = np.full((64, 32), 2, np.uint8)
    rgb = np.full((64, 32, 3), 128, np.uint8)
    cfg = AugmentConfig(erase_p=1.0, jpeg_p=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), noise_p=0,
                        blur_p=0, brightness=0, contrast=0, saturation=0, hue=0, background_p=0, garment_p=0,
                        erase_occluder=False)  # fmt: skip
    out, out_parts, _, valid = augment_one(rng, rgb, parts, parts.astype(np.int32), (64, 32), cfg)
    assert (~valid).sum() > 0 and (out_parts == 2).all()
    params = draw_params(np.random.default_rng(1), (64, 32), cfg)
    fill = [round(v * 255) for v in params.erase_fill]
    assert (out[~valid] == fill).all() and (out[valid] == 128).all()  # the box painted, nothing else
    assert (rgb == 128).all()  # the caller's image is not painted


def test_erased_box_is_labelled_occluder_without_a_vertex_and_stays_valid():
    rng = np.random.default_rng(1)
    parts = np.full((64, 32), 2, np.uint8)
    vid = np.full((64, 32), 77, np.int32)
    rgb = np.full((64, 32, 3), 128, np.uint8)
    cfg = AugmentConfig(erase_p=1.0, jpeg_p=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), noise_p=0,
                        blur_p=0, brightness=0, contrast=0, saturation=0, hue=0, background_p=0,
                        garment_p=0)  # fmt: skip
    out, out_parts, out_vid, valid = augment_one(rng, rgb, parts, vid, (64, 32), cfg)
    painted = (out != 128).any(axis=-1)
    assert painted.sum() > 0 and valid.all()
    assert (out_parts[painted] == OCCLUDER).all() and (out_parts[~painted] == 2).all()
    assert (out_vid[painted] == 0).all() and (out_vid[~painted] == 77).all()
    assert (parts == 2).all() and (vid == 77).all()  # the caller's labels are not changed


def test_background_replacement_repaints_only_background_pixels_and_is_seeded():
    from trainer.augment import augment_sample, params_from_draws

    parts = np.zeros((64, 32), np.uint8)
    parts[10:50, 8:24] = 2  # the person
    parts[50:60, 0:10] = 15  # an occluder is not background
    rgb = np.full((64, 32, 3), 77, np.uint8)
    cfg = AugmentConfig(enabled=True, background_p=0.6, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                        brightness=0, contrast=0, saturation=0, hue=0, blur_p=0, noise_p=0, jpeg_p=0,
                        erase_p=0, garment_p=0)  # fmt: skip
    u = np.full(NUM_DRAWS, 0.5)
    drawn = params_from_draws(u, (64, 32), cfg)
    assert drawn.background_seed >= 0

    def run(params):  # noqa: ANN001, ANN202
        return augment_sample(params, rgb, parts, parts.astype(np.int32), (64, 32))

    out, out_parts, _ = run(drawn)
    again, _, _ = run(params_from_draws(u, (64, 32), cfg))
    assert np.array_equal(out, again) and np.array_equal(out_parts, parts)
    inside = np.zeros_like(parts, dtype=bool)
    inside[12:48, 10:22] = True  # the person two pixels in from its outline
    assert (out[inside] == 77).all()  # person and occluder untouched
    assert (out[parts == 0] != 77).any(axis=-1).mean() > 0.9  # the backdrop is repainted
    edge_in, edge_out = out[30, 8].astype(int), out[30, 7].astype(int)  # either side of the left edge
    assert not np.array_equal(edge_in, [77, 77, 77])  # the outline mixes the new backdrop in (soft matte)...
    assert np.abs(edge_in - 77).sum() < np.abs(edge_out - 77).sum()  # ...less inside than outside
    u[25] = 0.7  # over background_p: the render's backdrop stays
    kept, _, _ = run(params_from_draws(u, (64, 32), cfg))
    assert np.array_equal(kept, rgb)


def test_garment_recolouring_repaints_garment_regions_only_and_keeps_their_shading():
    from trainer.augment import GARMENT_REGIONS, augment_sample, params_from_draws

    parts = np.zeros((64, 32), np.uint8)
    parts[0:8] = 1  # head (skin and hair: never repainted)
    parts[8:24] = 2  # torso (the top)
    parts[24:48] = 11  # left lower leg (the bottom)
    parts[48:56] = 7  # a hand
    parts[56:64] = 13  # a foot (the shoes)
    rgb = np.zeros((64, 32, 3), np.uint8)
    rgb[..., 0] = np.arange(32, dtype=np.uint8)[None] * 4 + 40  # shading along x: kept as luminance
    rgb[..., 1], rgb[..., 2] = 90, 60
    cfg = AugmentConfig(enabled=True, garment_p=0.5, background_p=0, crop_scale=(1.0, 1.0),
                        crop_ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0, hue=0, blur_p=0,
                        noise_p=0, jpeg_p=0, erase_p=0)  # fmt: skip
    u = np.full(NUM_DRAWS, 0.9)
    u[27:31] = (0.1, 0.6, 1.0, 0.5)  # top: repainted, a saturated blue, gain 1
    params = params_from_draws(u, (64, 32), cfg)
    assert params.garment_tints[0] is not None and params.garment_tints[1:] == (None, None)
    assert len(params.garment_tints) == len(GARMENT_REGIONS)
    out, out_parts, _ = augment_sample(params, rgb, parts, parts.astype(np.int32), (64, 32))
    assert np.array_equal(out_parts, parts)
    top = parts == 2
    assert np.array_equal(out[~top], rgb[~top])  # head, hands, legs and shoes as rendered
    r, g, b = out[top].astype(int).T
    assert (b > r).all() and (b > g).all()  # blue now
    luma_in = rgb[top].astype(float) @ np.array([0.299, 0.587, 0.114])
    luma_out = out[top].astype(float) @ np.array([0.299, 0.587, 0.114])
    assert np.corrcoef(luma_in, luma_out)[0, 1] > 0.9  # the shading survives the repaint
    assert params_from_draws(u, (64, 32), cfg) == params  # drawn from the slots alone
    cfg.garment_p = 0.0
    assert params_from_draws(u, (64, 32), cfg).garment_tints == (None, None, None)


def test_garment_labels_decide_what_is_recoloured_when_the_dataset_has_them():
    from protoreg.dataset import GARMENT_ID
    from trainer.augment import augment_sample, params_from_draws

    parts = np.full((64, 32), 2, np.uint8)  # all torso...
    garments = np.full((64, 32), GARMENT_ID["top"], np.uint8)
    garments[:, :10] = GARMENT_ID["skin"]  # ...but a bare midriff on the left
    garments[:, 10:16] = GARMENT_ID["hair"]  # and long hair over the shoulder
    rgb = np.zeros((64, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 150, 110, 90
    cfg = AugmentConfig(enabled=True, garment_p=0.5, background_p=0, crop_scale=(1.0, 1.0),
                        crop_ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0, hue=0, blur_p=0,
                        noise_p=0, jpeg_p=0, erase_p=0)  # fmt: skip
    u = np.full(NUM_DRAWS, 0.9)
    u[27:31] = (0.1, 0.6, 1.0, 0.5)  # top: repainted blue
    params = params_from_draws(u, (64, 32), cfg)
    by_parts, _, _ = augment_sample(params, rgb, parts, parts.astype(np.int32), (64, 32))
    by_labels, _, _ = augment_sample(params, rgb, parts, parts.astype(np.int32), (64, 32), garments)
    assert (by_parts[..., 2] > by_parts[..., 0]).all()  # without labels the whole torso is the top
    top = garments == GARMENT_ID["top"]
    assert np.array_equal(by_labels[~top], rgb[~top])  # skin and hair keep their colours
    assert np.array_equal(by_labels[top], by_parts[top])


def test_side_light_darkens_one_side_and_lightens_the_other():
    from trainer.augment import augment_sample, params_from_draws

    parts = np.zeros((64, 32), np.uint8)
    rgb = np.full((64, 32, 3), 100, np.uint8)
    cfg = AugmentConfig(enabled=True, shading_p=0.5, shading=0.6, background_p=0, garment_p=0,
                        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0,
                        hue=0, blur_p=0, noise_p=0, jpeg_p=0, erase_p=0)  # fmt: skip
    u = np.full(NUM_DRAWS, 0.9)
    u[39:42] = (0.1, 0.0, 1.0)  # side light from the right (direction 0), full strength
    params = params_from_draws(u, (64, 32), cfg)
    assert params.shading == pytest.approx((0.0, 0.6))
    out, out_parts, _ = augment_sample(params, rgb, parts, parts.astype(np.int32), (64, 32))
    assert np.array_equal(out_parts, parts)
    left, right = out[:, 0].astype(int), out[:, -1].astype(int)
    assert (left == round(100 * np.exp(-0.6 / np.sqrt(2)))).all()  # exp(-s) on one edge (along x: s/sqrt 2)
    assert (right == round(100 * np.exp(0.6 / np.sqrt(2)))).all()
    assert (np.diff(out[10, :, 0].astype(int)) >= 0).all()  # and it grows in between
    u[39] = 0.6  # over shading_p: no side light
    assert params_from_draws(u, (64, 32), cfg).shading is None


def test_photometric_is_vectorised_and_bounded():
    from trainer.augment import PhotoParams, photometric

    x = torch.rand(3, 3, 16, 8)
    same = photometric(x.clone(), [PhotoParams()] * 3)
    assert torch.equal(same, x)
    p = [
        PhotoParams(brightness=1.3, blur_sigma=1.0, noise_std=0.05, noise_seed=7),
        PhotoParams(),
        PhotoParams(gray=True),
    ]
    y = photometric(x.clone(), p)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert torch.allclose(y[1], x[1], atol=1e-5)  # identity params leave a sample unchanged
    g = y[2]
    assert torch.allclose(g[0], g[1], atol=1e-5) and torch.allclose(g[1], g[2], atol=1e-5)
    assert torch.equal(photometric(x.clone(), p), y)  # seeded noise: reproducible


def test_batch_colour_map_matches_the_per_pixel_definition():
    """Brightness, contrast (around the mean grey), saturation and hue of the batched affine map equal
    the step-by-step definition; the mean grey measured on a 1/16 subsample is close to the full one."""
    from trainer.augment import FROM_YIQ, TO_YIQ, PhotoParams, colour_batch, mean_gray

    img = np.random.default_rng(0).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    full = float((x[0].permute(1, 2, 0).double() @ torch.tensor([0.299, 0.587, 0.114]).double()).mean())
    assert abs(mean_gray(img) - full) < 0.05  # 128 of 2048 uniform-noise pixels
    p = PhotoParams(brightness=1.2, contrast=0.8, saturation=1.3, hue=0.05)
    out = colour_batch(x.clone(), [AugParams(photo=p, mean_gray=full)])[0]
    g = torch.tensor([0.299, 0.587, 0.114])
    y = x[0] * 1.2
    y = (y - full * 1.2) * 0.8 + full * 1.2
    grey = torch.einsum("c,chw->hw", g, y)
    y = (y - grey) * 1.3 + grey
    a = 0.05 * 2 * np.pi
    c, s = np.cos(a), np.sin(a)
    rot = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float32)
    y = torch.einsum("ij,jhw->ihw", FROM_YIQ @ rot @ TO_YIQ, y)
    assert torch.allclose(out, y, atol=1e-4)
    grey_img = colour_batch(x.clone(), [AugParams(photo=PhotoParams(gray=True), mean_gray=full)])[0]
    assert torch.allclose(grey_img[0], grey_img[1], atol=1e-5)
    assert torch.allclose(grey_img[1], grey_img[2], atol=1e-5)


def _png_bytes(a: np.ndarray, **kw) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, **kw).save(buf, format="PNG")
    return buf.getvalue()


def test_decoders_give_pillows_pixels_and_refuse_what_the_schema_does_not_allow():
    import io

    from PIL import Image

    from protoreg import dataset as ds

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=80)
    jpeg = buf.getvalue()
    with Image.open(io.BytesIO(jpeg)) as im:
        assert np.array_equal(ds.decode_rgb(jpeg), np.asarray(im.convert("RGB")))
    labels = rng.integers(0, 16, (48, 24), dtype=np.uint8)
    vid = rng.integers(0, 65536, (48, 24)).astype(np.uint16)
    assert np.array_equal(ds.decode_parts(_png_bytes(labels)), labels)
    palette = Image.fromarray(labels, mode="L").convert("P")  # palette indices are the labels
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    assert np.array_equal(ds.decode_parts(buf.getvalue()), np.asarray(palette))
    decoded = ds.decode_vid(_png_bytes(vid))
    assert decoded.dtype == np.int32 and np.array_equal(decoded, vid)
    stored = ds.decode_vid_values(_png_bytes(vid))  # what the training loader packs
    assert stored.dtype == np.uint16 and np.array_equal(stored, vid)
    for bad, decode, words in [
        (jpeg[: len(jpeg) // 2], ds.decode_rgb, "truncated JPEG"),
        (_png_bytes(labels), ds.decode_rgb, "expected a JPEG"),
        (jpeg, ds.decode_parts, "expected a PNG"),
        (_png_bytes(labels), ds.decode_vid, "expected a 16-bit"),
        (_png_bytes(vid), ds.decode_parts, "expected an 8-bit"),
        (_png_bytes(vid)[:-40], ds.decode_vid, "does not decode"),
        (_png_bytes(labels)[:-40], ds.decode_parts, "does not decode"),
        (jpeg[:-300] + b"\xff\xd9", ds.decode_rgb, "does not decode"),
    ]:
        with pytest.raises(ds.DatasetFormatError, match=words):
            decode(bad)


def test_per_sample_colour_and_blur_follow_the_batch_definitions():
    """The loader's uint8 OpenCV path and the float torch path (`photometric`) are one definition:
    they agree to rounding, and default parameters leave a sample untouched."""
    from trainer.augment import PhotoParams, augment_sample, blur_batch, colour_batch, mean_gray

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    parts = rng.integers(0, 16, (64, 32), dtype=np.uint8)
    vid = rng.integers(0, 7000, (64, 32)).astype(np.int32)
    same = augment_sample(AugParams(), rgb, parts, vid, (64, 32))
    assert all(np.array_equal(a, b) for a, b in zip(same, (rgb, parts, vid), strict=True))
    photo = PhotoParams(brightness=1.15, contrast=0.85, saturation=1.2, hue=0.02, blur_sigma=1.0)
    params = AugParams(photo=photo)
    out, out_parts, out_vid = augment_sample(params, rgb, parts, vid, (64, 32))
    assert np.array_equal(out_parts, parts) and np.array_equal(out_vid, vid)
    assert params.mean_gray == pytest.approx(mean_gray(rgb))
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    ref = blur_batch(colour_batch(x, [params]).clamp_(0, 1), [params])[0].permute(1, 2, 0).numpy() * 255
    inner = (slice(4, -4), slice(4, -4))  # borders: OpenCV and torch pad the blur alike, compare inside
    assert np.abs(out.astype(float) - ref)[inner].max() <= 2.0
    assert np.abs(out.astype(float) - rgb)[inner].mean() > 5  # and it did change the image


def test_workers_without_shared_memory_slots_give_the_same_batches(fake_ds, monkeypatch):
    """A small /dev/shm: workers hand over batches in fresh shared memory instead of reused slots."""
    import trainer.data

    monkeypatch.setattr(trainer.data, "shared_memory_free", lambda: 0)
    one = take(stream(fake_ds), 5, workers=0)
    two = take(stream(fake_ds), 5, workers=2)
    for a, b in zip(one, two, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
        assert torch.equal(a["vid"], b["vid"]) and torch.equal(a["valid"], b["valid"])


def test_noise_reaches_batches_in_any_memory_layout():
    """Noise is added in place through numpy views: a channels-last batch must be noised too, and the
    noise is the bank field shifted by the seed."""
    from trainer.augment import PhotoParams, noise_batch, shifted_noise

    x = torch.rand(2, 16, 8, 3).permute(0, 3, 1, 2) * 0.5 + 0.25  # channels-last strides, away from 0/1
    params = [AugParams(photo=PhotoParams(noise_std=0.05, noise_seed=9)), AugParams()]
    y = noise_batch(x.clone(), params)
    assert torch.allclose(y[0], (x[0] + 0.05 * shifted_noise(9, (16, 8))).clamp(0, 1), atol=1e-6)
    assert torch.equal(y[1], x[1])


