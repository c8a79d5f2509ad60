"""Data sources: the UCI HAPT raw format, the seglearn watch dataset (embedded default), and .npz."""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path

import numpy as np

from toolchain.core.errors import ToolchainError
from toolchain.data.windows import STEP, WINDOW, WindowDataset, concat, select_split, sliding_windows

HAPT_BASIC = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING")
HAPT_BASIC_IDS = (1, 2, 3, 4, 5, 6)
HAPT_ALL = tuple(range(1, 13))  # with the six postural transitions (7-12)
HAPT_TEST_USERS = (2, 4, 9, 10, 12, 13, 18, 20, 24)
WATCH_SHA256 = "eb122f23cdf06ef6bd6c6c5312958ec5cf9d038e2e6d457b8081662c75a42537"
WATCH_TARGETS = (8, 9, 10)


def load_hapt(folder: str | Path, activities: tuple[int, ...] = (1, 2, 3, 4, 5, 6)) -> WindowDataset:
    """UCI HAPT raw recordings -> 128-sample windows, 50% overlap, inside labelled segments.

    Channels: acc x, y, z (g), gyro x, y, z (rad/s). Classes are ``activities`` in the given order.
    """
    raw = Path(folder) / "RawData"
    labels_path = raw / "labels.txt"
    if not labels_path.is_file():
        raise ToolchainError(
            "not a HAPT folder: RawData/labels.txt is missing",
            seen=str(folder),
            remedy="point at the folder that holds RawData/ (UCI HAPT layout)",
        )
    labels = _read_labels(labels_path)
    names = _hapt_names(Path(folder))
    order = np.lexsort((labels[:, 3], labels[:, 0]))
    parts: list[tuple[np.ndarray, int, int, int]] = []
    cache: dict[int, np.ndarray] = {}
    for seg_id, (exp, user, act, start, end) in enumerate(labels[order]):
        if act not in activities:
            continue
        if exp not in cache:
            cache.clear()
            cache[exp] = _hapt_signal(raw, int(exp), int(user))
        sig = cache[exp][start - 1 : end]
        parts.append((sliding_windows(sig, WINDOW, STEP), activities.index(int(act)), int(user), seg_id))
    classes = [names.get(a, f"activity_{a}") for a in activities]
    return concat(parts, classes, "hapt", 6)


def _hapt_names(folder: Path) -> dict[int, str]:
    path = folder / "activity_labels.txt"
    if not path.is_file():
        return {i + 1: n for i, n in enumerate(HAPT_BASIC)}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    return out


def _hapt_signal(raw: Path, exp: int, user: int) -> np.ndarray:
    acc, gyro = (raw / f"{k}_exp{exp:02d}_user{user:02d}.txt" for k in ("acc", "gyro"))
    if not acc.is_file() or not gyro.is_file():
        raise ToolchainError(
            "HAPT recording named in labels.txt is missing",
            seen=acc.name,
            remedy="restore RawData from the UCI distribution",
        )
    a, g = _read_table(acc, 3), _read_table(gyro, 3)
    if len(a) != len(g):
        raise ToolchainError("HAPT acc and gyro files differ in length", seen=(acc.name, len(a), len(g)))
    return np.concatenate([a, g], axis=1).astype(np.float32)


def _read_table(path: Path, cols: int) -> np.ndarray:
    """A whitespace table of finite numbers, ``cols`` per row."""
    try:
        flat = (
            np.array(path.read_text(encoding="utf-8").split(), dtype=np.float64) if path.stat().st_size else np.zeros(0)
        )
    except (UnicodeDecodeError, ValueError) as err:
        raise ToolchainError(
            f"{path.name} must hold numbers only",
            seen=f"{path}: {str(err)[:80]}",
            remedy="restore the file from the UCI distribution",
        ) from None
    if flat.size % cols:
        raise ToolchainError(f"expected {cols} numbers per row", seen=f"{path.name}: {flat.size} numbers")
    if not np.all(np.isfinite(flat)):
        raise ToolchainError(
            f"{path.name} holds NaN or Inf", seen=str(path), remedy="restore the file from the UCI distribution"
        )
    return flat.reshape(-1, cols)


def _read_labels(path: Path) -> np.ndarray:
    """labels.txt: experiment, user, activity, first and last sample (1-based, inclusive), whole
    numbers with first <= last; anything else is refused, not truncated or dropped."""
    table = _read_table(path, 5)
    bad = ~np.all(table == np.round(table), axis=1) | np.any(table < 1, axis=1) | (table[:, 3] > table[:, 4])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ToolchainError(
            "HAPT labels.txt rows must be whole numbers >= 1 with first sample <= last",
            seen=f"row {row + 1}: {table[row].tolist()}",
            remedy="restore the file from the UCI distribution",
        )
    return table.astype(np.int64)


def watch_path() -> Path:
    """Where the seglearn wheel put its watch dataset (the package is not imported)."""
    spec = importlib.util.find_spec("seglearn")
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainError(
            "the embedded default dataset needs the seglearn wheel",
            seen="seglearn not installed",
            remedy="pip install seglearn (it is in toolchain's [train] extra)",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "watch_dataset.npy"


def load_watch() -> WindowDataset:
    """seglearn's smartwatch dataset: 10 subjects, 6 channels at 50 Hz, 7 exercise classes.

    The file is a pickled dict, so it is loaded only after its SHA-256 matches the published wheel.
    """
    path = watch_path()
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != WATCH_SHA256:
        raise ToolchainError(
            "seglearn's watch_dataset.npy does not match the known file, refusing to unpickle it",
            seen=str(path),
            remedy="reinstall seglearn==1.2.5",
        )
    d = np.load(path, allow_pickle=True).item()
    parts = [
        (sliding_windows(np.asarray(x, dtype=np.float32)), int(y), int(s), i)
        for i, (x, y, s) in enumerate(zip(d["X"], d["y"], d["subject"], strict=True))
    ]
    return concat(parts, [str(c) for c in d["y_labels"]], "watch", 6)


MAX_NPZ_BYTES = 4 << 30  # uncompressed, all arrays together
MAX_CLASSES = 10_000


def _npz_sizes(path: str | Path) -> dict[str, int]:
    """Uncompressed size of each array member, read from the zip directory before anything is inflated."""
    try:
        with zipfile.ZipFile(path) as z:
            return {i.filename.removesuffix(".npy"): i.file_size for i in z.infolist()}
    except (OSError, zipfile.BadZipFile) as err:
        raise ToolchainError(
            "cannot read .npz: not a zip archive of .npy arrays",
            seen=f"{path}: {err}",
            remedy="save it with numpy.savez or savez_compressed",
        ) from None


def _check_declared(path: str | Path, sizes: dict[str, int]) -> None:
    """Each .npy member's header declares a shape and dtype: their byte count must be what the member
    holds, checked before numpy allocates anything (a header declaring terabytes is refused)."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(f)
                    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if declared > sizes[info.filename.removesuffix(".npy")] or declared > MAX_NPZ_BYTES:
                        raise ToolchainError(
                            f".npz member {info.filename} declares an array larger than it holds",
                            seen=f"shape {tuple(shape)} of {dtype} ({declared} bytes) in {info.file_size} bytes",
                            remedy="save the data again with numpy.savez",
                        )
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ToolchainError(
            "cannot read .npz: a member is not a valid .npy array",
            seen=f"{path}: {str(err)[:120]}",
            remedy="save it with numpy.savez or savez_compressed",
        ) from None


def _int_array(a: np.ndarray, name: str, path: str | Path) -> np.ndarray:
    """A 1-D integer array; floats only when every value is a whole, finite number."""
    if a.ndim != 1:
        raise ToolchainError(f".npz {name} must be 1-D (one value per window)", seen=f"{path}: shape {a.shape}")
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise ToolchainError(
        f".npz {name} must hold integers",
        seen=f"{path}: dtype {a.dtype}",
        remedy=f"store {name} as integers (class indices / ids)",
    )


def load_npz(path: str | Path) -> WindowDataset:
    """A generic ``.npz`` with X (N, C, T) windows or (N, C, H, W) images, y (N,), subject (N,);
    optional segment and classes.

    Sizes are checked from the zip directory before any array is inflated (at most
    ``MAX_NPZ_BYTES`` uncompressed); dtypes, ranks and label ranges before any copy.
    """
    sizes = _npz_sizes(path)
    if sum(sizes.values()) > MAX_NPZ_BYTES:
        raise ToolchainError(
            f".npz expands to more than {MAX_NPZ_BYTES >> 30} GiB",
            seen=f"{path}: {sum(sizes.values())} bytes",
            remedy="split the data into smaller files",
        )
    missing = [k for k in ("X", "y", "subject") if k not in sizes]
    if missing:
        raise ToolchainError(".npz data needs arrays X, y and subject", seen=f"missing {missing}")
    _check_declared(path, sizes)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("X", "y", "subject", "segment", "classes") if k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ToolchainError(
            "cannot read .npz (pickled arrays are refused)",
            seen=f"{path}: {str(err)[:120]}",
            remedy="save plain numeric arrays X, y, subject",
        ) from None
    X = arrays["X"]
    if X.dtype.kind not in "fiu" or X.ndim not in (3, 4) or X.shape[0] < 1 or X.shape[1] < 1 or min(X.shape[2:]) < 2:
        raise ToolchainError(
            ".npz X must be numeric (N, C, T) or (N, C, H, W) with N >= 1, C >= 1, T (H, W) >= 2",
            seen=f"{path}: dtype {X.dtype}, shape {X.shape}",
            remedy="store windows as float32 (N, C, T) or images as (N, C, H, W)",
        )
    y, subject = _int_array(arrays["y"], "y", path), _int_array(arrays["subject"], "subject", path)
    segment = _int_array(arrays["segment"], "segment", path) if "segment" in arrays else subject
    if not (len(y) == len(subject) == len(segment) == len(X)):
        raise ToolchainError(
            ".npz X, y, subject (and segment) must have one entry per window",
            seen=(len(X), len(y), len(subject), len(segment)),
        )
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        raise ToolchainError(
            f".npz labels must be class indices in 0..{MAX_CLASSES - 1}",
            seen=(int(y.min()), int(y.max())),
            remedy="relabel y as 0..K-1",
        )
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(i) for i in range(int(y.max()) + 1)]
    X = X.astype(np.float32)
    if not np.all(np.isfinite(X)):
        raise ToolchainError(".npz X has NaN or Inf values", seen=str(path))
    return WindowDataset(X, y, subject, segment, classes, Path(path).stem)


def data_files(spec: str | None) -> list[Path]:
    """The user's files a data spec reads directly (an .npz), so that no output may replace them."""
    if spec and spec.endswith(".npz"):
        return [Path(spec)]
    return []


def load_data(spec: str) -> WindowDataset:
    """``watch`` (embedded default), ``hapt:FOLDER`` or a HAPT folder (6 basic activities),
    ``hapt12:FOLDER`` (all 12, the postural transitions too), ``digits[:SEVERITY]``,
    ``imagefolder:ROOT[:SIZE]`` or ``file.npz``.

    Parsed datasets are cached for the process (keyed on the spec and the files' modification
    times), so a benchmark that runs ``finetune`` hundreds of times parses the raw files once.
    """
    if spec == "watch":
        return _cached(spec, watch_path())
    if spec.startswith(("hapt:", "hapt12:")):
        return _cached(spec, Path(spec.partition(":")[2]) / "RawData" / "labels.txt")
    if spec == "digits" or spec.startswith("digits:"):
        from toolchain.data.images import load_digits_shift

        level = spec.partition(":")[2] or "3"
        if not level.isdigit():
            raise ToolchainError("digits takes a severity 1..5", seen=spec, remedy="use digits or digits:3")
        return load_digits_shift(int(level))
    if spec.startswith("imagefolder:"):
        from toolchain.data.images import load_image_folder

        root, _, size = spec[len("imagefolder:") :].partition(":")
        if size and not size.isdigit():
            raise ToolchainError("imagefolder takes ROOT or ROOT:SIZE", seen=spec, remedy="e.g. imagefolder:photos:32")
        return load_image_folder(root, int(size) if size else 32)
    if spec.endswith(".npz"):
        if not Path(spec).is_file():
            raise ToolchainError("data file does not exist", seen=spec)
        return load_npz(spec)
    if Path(spec).is_dir():
        return load_hapt(spec)
    raise ToolchainError(
        "unknown data spec",
        seen=spec,
        remedy="use watch, digits[:SEVERITY], hapt:FOLDER, hapt12:FOLDER, imagefolder:ROOT[:SIZE], a HAPT "
        "folder or a .npz file",
    )


_CACHE: dict[tuple[str, float], WindowDataset] = {}


def _cached(spec: str, stamp_file: Path) -> WindowDataset:
    try:
        key = (spec, stamp_file.stat().st_mtime)
    except OSError:
        key = (spec, -1.0)
    if key not in _CACHE:
        kind, _, folder = spec.partition(":")
        ds = load_watch() if spec == "watch" else load_hapt(folder, HAPT_ALL if kind == "hapt12" else HAPT_BASIC_IDS)
        _CACHE.clear()
        _CACHE[key] = ds
    ds = _CACHE[key]
    return WindowDataset(
        ds.X, ds.y, ds.subject, ds.segment, list(ds.classes), ds.name
    )  # callers may replace fields, never arrays in place


def default_target_subjects(ds: WindowDataset) -> tuple[int, ...]:
    """The usual target subjects: UCI-HAR's test users for HAPT, the last three subjects otherwise."""
    if ds.name == "hapt":
        return tuple(t for t in HAPT_TEST_USERS if t in ds.subjects())
    if ds.name == "watch":
        return WATCH_TARGETS
    if ds.name == "digits":
        return (1, 2, 3, 4)
    return tuple(ds.subjects()[-max(1, len(ds.subjects()) // 3) :])


def load_split(spec: str, split: str, subjects: tuple[int, ...] | None = None) -> WindowDataset:
    """``load_data(spec)`` narrowed to one of ``windows.SPLITS`` around the target ``subjects`` (None: the
    data's usual ones, ``default_target_subjects``)."""
    ds = load_data(spec)
    if split == "all":
        return ds
    return select_split(ds, split, default_target_subjects(ds) if subjects is None else subjects)
