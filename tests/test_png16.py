"""16-bit PNGs written unfiltered (vid.png, depth.png) and their fast reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from protoreg import png16
from protoreg.dataset import DatasetFormatError, decode_vid, decode_vid_values, opencv


def values(seed: int = 0, shape: tuple[int, int] = (37, 19)) -> np.ndarray:
    v = np.random.default_rng(seed).integers(0, 65536, shape).astype(np.uint16)
    v[0, 0], v[-1, -1] = 0, 65535
    return v


def pillow_png16(v: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(v).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def test_unfiltered_png_is_an_ordinary_png_every_reader_opens_with_the_same_values():
    v = values()
    data = png16.encode_unfiltered(v, 6)
    assert np.array_equal(png16.decode_unfiltered(data), v)
    cv2 = opencv()
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), v)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (19, 37) and np.array_equal(np.asarray(im).astype(np.uint16), v)
    got = decode_vid_values(data)
    assert got.dtype == np.uint16 and np.array_equal(got, v)
    assert decode_vid(data).dtype == np.int32 and np.array_equal(decode_vid(data), v.astype(np.int32))
    assert png16.encode_unfiltered(v, 6) == data  # deterministic bytes


def test_a_filtered_png_from_another_encoder_goes_to_the_general_decoder_with_the_same_values():
    v = np.tile(np.arange(64, dtype=np.uint16) * 700, (32, 1))  # smooth rows: Pillow filters them
    data = pillow_png16(v)
    assert png16.decode_unfiltered(data) is None
    assert np.array_equal(decode_vid_values(data), v)


def test_damaged_unfiltered_png_is_refused_with_a_one_line_error():
    data = bytearray(png16.encode_unfiltered(values(), 6))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # a flipped byte inside the compressed pixels: the chunk CRC no longer matches
    words = r"vid.png: corrupt image data \(does not decode: damaged 'IDAT' chunk"
    with pytest.raises(DatasetFormatError, match=words):
        decode_vid_values(bytes(data))
    with pytest.raises(png16.PngError, match="no IEND"):
        png16.decode_unfiltered(png16.encode_unfiltered(values(), 6)[:-12])
    with pytest.raises(ValueError, match="0..65535"):
        png16.encode_unfiltered(np.array([[70000]]), 6)
