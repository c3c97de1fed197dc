"""Loading SMPL-format files: .npz, plain and chumpy-style .pkl without chumpy, refusal of unsafe or
broken files with a one-line error naming the file and field."""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse
import torch

from protoreg.body import BodyModelError, load_body_model
from protoreg.body.io import read_body_arrays
from protoreg.body.synthetic import synthetic_body_arrays


@pytest.fixture(scope="module")
def arrays() -> dict:
    return synthetic_body_arrays(num_betas=8, seed=4)


def assert_same_body(loaded, arrays: dict) -> None:
    assert np.array_equal(loaded.v_template, arrays["v_template"])
    assert np.array_equal(loaded.faces, arrays["f"])
    assert np.array_equal(loaded.shapedirs, arrays["shapedirs"])
    assert np.array_equal(loaded.posedirs, arrays["posedirs"])
    assert np.allclose(loaded.J_regressor, arrays["J_regressor"], atol=0)
    assert np.array_equal(loaded.weights, arrays["weights"])
    assert loaded.parents.tolist() == [-1] + arrays["kintree_table"][0, 1:].tolist()


class _FakeChumpy:
    """Installs a throwaway `chumpy.ch.Ch` while writing a pickle, and removes it before loading."""

    def __enter__(self):
        chumpy, ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
        reordering = types.ModuleType("chumpy.reordering")

        class Ch:  # holds its array in `x`, plus bookkeeping state like the real chumpy.ch.Ch
            def __init__(self, x):
                self.x = x
                self._dirty_vars = {"x"}
                self._depends_on_deps = {}
                self._make_dense = False

        class Select(Ch):  # a derived chumpy node: the array sits in `a`
            def __init__(self, a):
                super().__init__(None)
                del self.x
                self.a = a

        class MatVecMult(Ch):  # like SMPL's `J` entry: a sparse matrix times a Ch
            def __init__(self, mtx, vec):
                super().__init__(None)
                self.mtx, self.vec = mtx, vec

        for cls, module in ((Ch, "chumpy.ch"), (Select, "chumpy.reordering"), (MatVecMult, "chumpy.ch")):
            cls.__module__, cls.__qualname__ = module, cls.__name__
        ch.Ch, ch.MatVecMult, reordering.Select, chumpy.ch = Ch, MatVecMult, Select, ch
        self.modules = {"chumpy": chumpy, "chumpy.ch": ch, "chumpy.reordering": reordering}
        sys.modules.update(self.modules)
        return Ch, Select, MatVecMult

    def __exit__(self, *exc):
        for name in self.modules:
            sys.modules.pop(name, None)


def official_style_dict(arrays: dict, Ch, Select, MatVecMult) -> dict:
    """Like an official SMPL .pkl: chumpy arrays, csc J_regressor, uint32 faces and kintree (root 2**32-1)."""
    kintree = arrays["kintree_table"].astype(np.uint32)
    kintree[0, 0] = np.uint32(4294967295)
    return {
        "v_template": Ch(arrays["v_template"]),
        "f": arrays["f"].astype(np.uint32),
        "shapedirs": Ch(arrays["shapedirs"]),
        "posedirs": Select(arrays["posedirs"]),
        "J_regressor": scipy.sparse.csc_matrix(arrays["J_regressor"]),
        "weights": Ch(Ch(arrays["weights"])),
        "kintree_table": kintree,
        "J": MatVecMult(scipy.sparse.csc_matrix(arrays["J_regressor"]), Ch(arrays["v_template"])),
        "bs_style": "lbs",
        "pose_training_info": {"sigma": np.float64(0.5), "n": 3},
    }


def test_npz_round_trip(tmp_path, arrays):
    path = tmp_path / "body.npz"
    np.savez(path, **arrays)
    assert_same_body(read_body_arrays(path), arrays)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_chumpy_style_pkl_loads_without_chumpy(tmp_path, arrays, protocol):
    path = tmp_path / "SMPL_NEUTRAL.pkl"
    with _FakeChumpy() as chumpy_classes:
        path.write_bytes(pickle.dumps(official_style_dict(arrays, *chumpy_classes), protocol=protocol))
    assert "chumpy" not in sys.modules
    loaded = read_body_arrays(path)
    assert_same_body(loaded, arrays)
    assert loaded.uv is None and loaded.uv_faces is None
    assert "chumpy" not in sys.modules


def test_pkl_and_npz_give_the_same_forward(tmp_path, arrays):
    npz, pkl = tmp_path / "body.npz", tmp_path / "body.pkl"
    np.savez(npz, **arrays)
    with _FakeChumpy() as chumpy_classes:
        pkl.write_bytes(pickle.dumps(official_style_dict(arrays, *chumpy_classes), protocol=2))
    pose = 0.3 * torch.randn(2, 72, generator=torch.Generator().manual_seed(0))
    a, b = load_body_model(npz)(pose=pose), load_body_model(pkl)(pose=pose)
    assert torch.allclose(a.vertices, b.vertices, atol=1e-6)


def test_plain_numpy_pkl_loads(tmp_path, arrays):
    path = tmp_path / "body.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=pickle.HIGHEST_PROTOCOL))
    loaded = read_body_arrays(path)
    assert_same_body(loaded, arrays)
    assert np.array_equal(loaded.uv, arrays["vt"])


def test_npz_with_split_sparse_j_regressor(tmp_path, arrays):
    sparse = scipy.sparse.csr_matrix(arrays["J_regressor"])
    fields = {k: v for k, v in arrays.items() if k != "J_regressor"}
    fields.update(
        J_regressor_data=sparse.data,
        J_regressor_indices=sparse.indices,
        J_regressor_indptr=sparse.indptr,
        J_regressor_shape=np.array(sparse.shape),
        J_regressor_format=np.array("csr"),
    )
    path = tmp_path / "body.npz"
    np.savez(path, **fields)
    assert_same_body(read_body_arrays(path), arrays)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_calling_os_system_is_refused(tmp_path, arrays):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({**arrays, "v_template": _Exploit(marker)}, protocol=2))
    with pytest.raises(
        BodyModelError, match=r"refusing to load class (posix|os|nt)\.system from file .*evil\.pkl"
    ):
        read_body_arrays(path)
    assert not marker.exists()


def test_pickle_of_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps({"v_template": scipy.sparse.lil_matrix((3, 3))}))
    with pytest.raises(BodyModelError, match=r"refusing to load class scipy\.sparse\._lil\.lil_matrix"):
        read_body_arrays(path)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".npz", ".pkl"])
@pytest.mark.parametrize(
    "field", ["v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table"]
)
def test_missing_field_names_file_and_field(tmp_path, arrays, suffix, field):
    path = tmp_path / f"partial{suffix}"
    partial = {k: v for k, v in arrays.items() if k != field}
    if suffix == ".npz":
        np.savez(path, **partial)
    else:
        path.write_bytes(pickle.dumps(partial))
    with pytest.raises(BodyModelError) as excinfo:
        load_body_model(path)
    assert one_line(excinfo) == f"{path.resolve()}: missing field '{field}'"


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("v_template", np.zeros((5, 2)), "field 'v_template' has shape (5, 2), expected (*, 3)"),
        ("weights", np.zeros((1120, 23)), "field 'weights' has shape (1120, 23), expected (1120, 24)"),
        (
            "posedirs",
            np.zeros((1120, 3, 10)),
            "field 'posedirs' has shape (1120, 3, 10), expected (1120, 3, 207)",
        ),
        (
            "J_regressor",
            np.zeros((52, 1120)),
            "field 'J_regressor' has shape (52, 1120), expected (24, 1120)",
        ),
        ("f", np.full((4, 3), 5000), "field 'f' has indices outside [0, 1120)"),
        ("shapedirs", np.full((1120, 3, 2), np.nan), "field 'shapedirs' holds NaN or infinite values"),
        ("kintree_table", np.zeros((2, 24), np.int64) + np.arange(24), "joint 1 has parent 1"),
        ("vt", np.zeros((10, 3)), "field 'vt' has shape (10, 3), expected (*, 2)"),
    ],
)
def test_bad_field_is_named(tmp_path, arrays, field, value, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **{**arrays, field: value})
    with pytest.raises(BodyModelError) as excinfo:
        read_body_arrays(path)
    message = one_line(excinfo)
    assert message.startswith(str(path)) and expected in message


def test_object_array_in_npz_is_refused(tmp_path, arrays):
    path = tmp_path / "objects.npz"
    np.savez(path, **{**arrays, "weights": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(BodyModelError, match=r"objects\.npz: field 'weights' cannot be read without pickle"):
        read_body_arrays(path)


@pytest.mark.parametrize("suffix", [".npz", ".pkl"])
def test_corrupt_file_names_the_file(tmp_path, arrays, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".npz":
        np.savez(good, **arrays)
    else:
        good.write_bytes(pickle.dumps(arrays))
    for name, data in [
        ("truncated", good.read_bytes()[: len(good.read_bytes()) // 2]),
        ("garbage", b"\x00junk" * 10),
    ]:
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        with pytest.raises(BodyModelError) as excinfo:
            load_body_model(path)
        assert one_line(excinfo).startswith(str(path.resolve()))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(BodyModelError, match=r"nope\.npz: body model file not found"):
        load_body_model(tmp_path / "nope.npz")
    odd = tmp_path / "body.obj"
    odd.write_text("v 0 0 0\n")
    with pytest.raises(
        BodyModelError, match=r"body\.obj: unsupported body model file type, expected \.npz or \.pkl"
    ):
        load_body_model(odd)


def test_body_model_error_is_a_value_error():
    assert issubclass(BodyModelError, ValueError)


def test_reloads_a_rewritten_file(tmp_path, arrays):
    path = tmp_path / "body.npz"
    np.savez(path, **arrays)
    first = load_body_model(path)
    np.savez(path, **{**arrays, "v_template": arrays["v_template"] + 1.0})
    os.utime(path, ns=(1, 1))  # make sure the modification time differs
    second = load_body_model(path)
    assert second is not first and second.sha256 != first.sha256
    assert torch.allclose(second.v_template, first.v_template + 1.0)
