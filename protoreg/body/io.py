"""Loading SMPL-format body model files (.npz and official SMPL .pkl) into validated numpy arrays.

Official SMPL .pkl files hold chumpy objects and scipy sparse matrices. chumpy does not install on
Python 3.11 / numpy >= 1.24, and a plain `pickle.load` would run whatever the file names. So the .pkl
reader is a restricted unpickler: it only builds numpy arrays, and stand-ins for chumpy and scipy
sparse classes from which it takes the stored arrays. Any other class in the file is refused.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import hashlib
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

NUM_JOINTS = 24
NUM_POSE_BASIS = (NUM_JOINTS - 1) * 9  # 207: entries of (R - I) for the 23 non-root joints
SUPPORTED_SUFFIXES = (".npz", ".pkl")
# Suffixes of a sparse matrix stored field by field in an .npz (an .npz cannot hold a sparse object
# without pickle): NAME_data, NAME_indices, NAME_indptr, NAME_shape and optionally NAME_format.
SPARSE_PARTS = ("data", "indices", "indptr", "shape")


class BodyModelError(ValueError):
    """A body model file is missing, corrupt, unsafe or lacks a field; the message names file and field."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))  # always one line, whatever a library said


@dataclass(frozen=True)
class BodyArrays:
    """The validated contents of a SMPL-format file, as plain numpy arrays."""

    path: Path
    sha256: str
    v_template: np.ndarray  # (V, 3) float64
    faces: np.ndarray  # (F, 3) int64
    shapedirs: np.ndarray  # (V, 3, K) float64
    posedirs: np.ndarray  # (V, 3, 207) float64
    J_regressor: np.ndarray  # (24, V) float64, dense
    weights: np.ndarray  # (V, 24) float64
    parents: np.ndarray  # (24,) int64, -1 at the root
    uv: np.ndarray | None  # (T, 2) float64
    uv_faces: np.ndarray | None  # (F, 3) int64


# ---------------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------------


class _ChumpyStub:
    """Stands in for any chumpy class: keeps whatever state the pickle gives it, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _ChumpyStub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_init_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


class _SparseStub(_ChumpyStub):
    """Stands in for a scipy.sparse csc/csr matrix; rebuilt from its stored arrays after loading."""

    sparse_format = "csc"


class _CscStub(_SparseStub):
    sparse_format = "csc"


class _CsrStub(_SparseStub):
    sparse_format = "csr"


_NUMPY_MODULES = (
    "numpy.core.multiarray",
    "numpy._core.multiarray",
    "numpy.core.numeric",
    "numpy._core.numeric",
)
_ALLOWED_NUMPY_NAMES = {"_reconstruct", "scalar", "_frombuffer"}
_SAFE_BUILTINS = {"object", "set", "frozenset", "slice", "complex", "list", "tuple", "dict", "bytearray"}
_SPARSE_STUBS: dict[str, type[_SparseStub]] = {
    "csc_matrix": _CscStub,
    "csc_array": _CscStub,
    "csr_matrix": _CsrStub,
    "csr_array": _CsrStub,
}


def _resolve_numpy(module: str, name: str) -> Any:
    """numpy 2 pickles say numpy._core, numpy 1 pickles numpy.core: take whichever this numpy has."""
    import importlib

    for candidate in (
        module,
        module.replace("numpy._core", "numpy.core"),
        module.replace("numpy.core", "numpy._core"),
    ):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose find_class allows an explicit whitelist only (see module docstring)."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="latin1")  # latin1: py2 pickles of numpy arrays
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python2_names(module, name)
        if module in _NUMPY_MODULES and name in _ALLOWED_NUMPY_NAMES:
            return _resolve_numpy(module, name)
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if module.startswith("numpy.dtypes") and name.endswith("DType"):
            return np.dtype  # numpy >= 1.25 pickles dtypes through their DType class
        if (module, name) == ("_codecs", "encode"):
            import _codecs

            return _codecs.encode  # py3 pickles of bytes at protocol < 3
        if (module, name) == ("copyreg", "_reconstructor"):
            return copyreg._reconstructor  # builds objects of (whitelisted) classes, protocols 0/1
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)  # chumpy state holds sets, e.g. _dirty_vars
        if module == "chumpy" or module.startswith("chumpy."):
            return type(name, (_ChumpyStub,), {"__module__": "protoreg.body.io.chumpy_stub"})
        if module.startswith("scipy.sparse") and name in _SPARSE_STUBS:
            return _SPARSE_STUBS[name]
        raise pickle.UnpicklingError(f"refusing to load class {module}.{name} from file {self._source}")


def _python2_names(module: str, name: str) -> tuple[str, str]:
    """Map py2 module names (copy_reg, __builtin__) to py3 the way pickle's own find_class does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _stub_to_array(value: Any, path: Path, field: str, depth: int = 0) -> Any:
    """Turn a chumpy or sparse stand-in into the ndarray it stores; other values pass through."""
    if depth > 8:
        raise BodyModelError(f"{path}: field '{field}': chumpy object nested too deeply")
    if isinstance(value, _SparseStub):
        return _sparse_stub_to_dense(value, path, field)
    if isinstance(value, _ChumpyStub):
        for key in ("x", "a"):
            stored = value.__dict__.get(key)
            if stored is not None:
                return _stub_to_array(stored, path, field, depth + 1)
        raise BodyModelError(f"{path}: field '{field}': chumpy object without a stored array ('x' or 'a')")
    return value


def _sparse_stub_to_dense(stub: _SparseStub, path: Path, field: str) -> np.ndarray:
    state = stub.__dict__
    try:
        shape = tuple(int(s) for s in state.get("_shape", state.get("shape")))
        arrays = (np.asarray(state["data"]), np.asarray(state["indices"]), np.asarray(state["indptr"]))
        matrix_type = scipy.sparse.csc_matrix if stub.sparse_format == "csc" else scipy.sparse.csr_matrix
        return np.asarray(matrix_type(arrays, shape=shape).toarray())
    except (KeyError, TypeError, ValueError) as e:
        raise BodyModelError(f"{path}: field '{field}': unreadable sparse matrix ({e})") from e


def _read_pkl(data: bytes, path: Path) -> dict[str, Any]:
    try:
        content = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except pickle.UnpicklingError as e:
        if "refusing to load class" in str(e):
            raise BodyModelError(str(e)) from None
        raise BodyModelError(f"{path}: not a readable pickle ({e})") from None
    except Exception as e:  # any malformed stream: EOFError, struct errors, bad opcodes...
        raise BodyModelError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if isinstance(content, _ChumpyStub):
        content = content.__dict__
    if not isinstance(content, dict):
        raise BodyModelError(f"{path}: expected a pickled dict of arrays, got {type(content).__name__}")
    return {str(k): v for k, v in content.items()}


# ---------------------------------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------------------------------


class _NpzFields:
    """Lazy field access to an .npz so unused (possibly object-typed) entries are never decoded."""

    def __init__(self, data: bytes, path: Path) -> None:
        self._path = path
        try:
            self._npz = np.load(io.BytesIO(data), allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise BodyModelError(f"{path}: not a readable .npz file ({e})") from None
        if not isinstance(self._npz, np.lib.npyio.NpzFile):
            raise BodyModelError(f"{path}: not an .npz archive (a single .npy array?)")

    def keys(self) -> set[str]:
        return set(self._npz.files)

    def __getitem__(self, field: str) -> np.ndarray:
        try:
            return self._npz[field]
        except ValueError as e:  # object arrays need pickle, which we never allow
            raise BodyModelError(
                f"{self._path}: field '{field}' cannot be read without pickle ({e})"
            ) from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise BodyModelError(f"{self._path}: field '{field}' is corrupt ({e})") from None


# ---------------------------------------------------------------------------------------------------
# Field extraction and validation
# ---------------------------------------------------------------------------------------------------


def _get(fields: Any, name: str, path: Path, required: bool = True) -> np.ndarray | None:
    """Fetch field `name` as a dense ndarray (chumpy/sparse converted), or None when optional and absent."""
    keys = set(fields.keys())
    if name in keys:
        value = _stub_to_array(fields[name], path, name)
        if scipy.sparse.issparse(value):
            value = value.toarray()
    elif all(f"{name}_{part}" in keys for part in SPARSE_PARTS):
        value = _split_sparse_to_dense(fields, name, path)
    elif required:
        raise BodyModelError(f"{path}: missing field '{name}'")
    else:
        return None
    try:
        array = np.asarray(value)
    except Exception as e:
        raise BodyModelError(f"{path}: field '{name}' is not an array ({e})") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise BodyModelError(f"{path}: field '{name}' is not a numeric array (dtype {array.dtype})")
    return array


def _split_sparse_to_dense(fields: Any, name: str, path: Path) -> np.ndarray:
    fmt = "csc"
    if f"{name}_format" in set(fields.keys()):
        fmt = str(np.asarray(fields[f"{name}_format"]).item())
    if fmt not in ("csc", "csr"):
        raise BodyModelError(f"{path}: field '{name}_format' must be 'csc' or 'csr', got '{fmt}'")
    matrix_type = scipy.sparse.csc_matrix if fmt == "csc" else scipy.sparse.csr_matrix
    try:
        shape = tuple(int(s) for s in np.asarray(fields[f"{name}_shape"]).ravel())
        parts = (fields[f"{name}_data"], fields[f"{name}_indices"], fields[f"{name}_indptr"])
        return matrix_type(parts, shape=shape).toarray()
    except (TypeError, ValueError) as e:
        raise BodyModelError(f"{path}: field '{name}': unreadable sparse matrix ({e})") from None


def _check_shape(array: np.ndarray, expected: tuple[int | None, ...], path: Path, field: str) -> None:
    ok = array.ndim == len(expected) and all(
        e is None or e == s for e, s in zip(expected, array.shape, strict=False)
    )
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise BodyModelError(f"{path}: field '{field}' has shape {array.shape}, expected {want}")


def _float_field(array: np.ndarray, path: Path, field: str) -> np.ndarray:
    out = np.ascontiguousarray(array, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise BodyModelError(f"{path}: field '{field}' holds NaN or infinite values")
    return out


def _index_field(array: np.ndarray, upper: int, path: Path, field: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or np.any(array != np.round(array)):
            raise BodyModelError(f"{path}: field '{field}' must hold integer indices (dtype {array.dtype})")
    out = np.ascontiguousarray(array, dtype=np.int64)
    if out.size and (out.min() < 0 or out.max() >= upper):
        raise BodyModelError(f"{path}: field '{field}' has indices outside [0, {upper})")
    return out


def _parents_from_kintree(kintree: np.ndarray, path: Path) -> np.ndarray:
    """Row 0 of kintree_table; the root's entry (-1, or 2**32-1 in official uint32 files) becomes -1."""
    _check_shape(kintree, (2, NUM_JOINTS), path, "kintree_table")
    parents = np.asarray(kintree[0]).astype(np.int64)
    parents[0] = -1
    for j in range(1, NUM_JOINTS):
        if not 0 <= parents[j] < j:
            raise BodyModelError(
                f"{path}: field 'kintree_table': joint {j} has parent {parents[j]}; "
                "parents must come before children"
            )
    return parents


def _validate(fields: Any, path: Path, sha256: str) -> BodyArrays:
    v_template = _float_field(_get(fields, "v_template", path), path, "v_template")
    _check_shape(v_template, (None, 3), path, "v_template")
    num_vertices = v_template.shape[0]
    if num_vertices < 1:
        raise BodyModelError(f"{path}: field 'v_template' holds no vertices")

    faces = _get(fields, "f", path)
    _check_shape(faces, (None, 3), path, "f")
    faces = _index_field(faces, num_vertices, path, "f")

    shapedirs = _float_field(_get(fields, "shapedirs", path), path, "shapedirs")
    _check_shape(shapedirs, (num_vertices, 3, None), path, "shapedirs")
    posedirs = _float_field(_get(fields, "posedirs", path), path, "posedirs")
    _check_shape(posedirs, (num_vertices, 3, NUM_POSE_BASIS), path, "posedirs")
    j_regressor = _float_field(_get(fields, "J_regressor", path), path, "J_regressor")
    _check_shape(j_regressor, (NUM_JOINTS, num_vertices), path, "J_regressor")
    weights = _float_field(_get(fields, "weights", path), path, "weights")
    _check_shape(weights, (num_vertices, NUM_JOINTS), path, "weights")
    parents = _parents_from_kintree(_get(fields, "kintree_table", path), path)

    uv, uv_faces = _get(fields, "vt", path, required=False), _get(fields, "ft", path, required=False)
    if (uv is None) != (uv_faces is None):
        raise BodyModelError(f"{path}: fields 'vt' and 'ft' must come together (found only one)")
    if uv is not None:
        uv = _float_field(uv, path, "vt")
        _check_shape(uv, (None, 2), path, "vt")
        _check_shape(uv_faces, (faces.shape[0], 3), path, "ft")
        uv_faces = _index_field(uv_faces, uv.shape[0], path, "ft")

    return BodyArrays(
        path=path,
        sha256=sha256,
        v_template=v_template,
        faces=faces,
        shapedirs=shapedirs,
        posedirs=posedirs,
        J_regressor=j_regressor,
        weights=weights,
        parents=parents,
        uv=uv,
        uv_faces=uv_faces,
    )


def read_body_arrays(path: str | Path) -> BodyArrays:
    """Read and validate an SMPL-format .npz or .pkl; raises BodyModelError naming the file and field."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise BodyModelError(f"{path}: unsupported body model file type, expected .npz or .pkl")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BodyModelError(f"{path}: body model file not found") from None
    except OSError as e:
        raise BodyModelError(f"{path}: cannot read body model file ({e.strerror or e})") from None
    sha256 = hashlib.sha256(data).hexdigest()
    fields = _NpzFields(data, path) if path.suffix.lower() == ".npz" else _read_pkl(data, path)
    return _validate(fields, path, sha256)
