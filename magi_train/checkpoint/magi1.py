"""The released MAGI-1 DiT weight format: safetensors shards, optionally zstd-compressed.

A checkpoint is a directory (``inference_weight/`` in the official release) holding either

* ``model.safetensors.index.json`` -- ``{"metadata": {"total_size": N}, "weight_map": {key: shard}}``
  -- plus the shard files it names, or
* a single ``model.safetensors``.

Any safetensors file ``X`` may be shipped as ``X.zst`` instead; it is then decompressed with the
``zstd`` command-line tool into memory. Our model's state-dict keys equal the official ones, so
no renaming happens here, and stored dtypes are kept exactly (bf16 stays bf16, fp32 stays fp32).

Integrity: every floating tensor read is checked to be finite (a flipped exponent bit shows as NaN/inf),
and shard files are checked against a sha256 manifest in ``sha256sum`` format (``<hex>  <file name>``
lines) when one is given, or when the directory holds one named ``SHA256SUMS`` (written by
``tools/hash_weights.py``). A flipped bit that leaves a finite value is caught only by the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from magi_train.checkpoint.atomic import fsync_dir, replace_dir, write_json_durably

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_ZST_SUFFIX = ".zst"
_LIST_LIMIT = 10  # how many offending keys an error message shows per category
MANIFEST_NAME = "SHA256SUMS"  # a sha256sum-format manifest beside the shards, checked whenever present
_MANIFEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")  # sha256sum's text (two spaces) and binary (" *") forms
_FINITE_CHUNK = 1 << 24  # elements checked at once: bounds the temporary mask (and fp8's float copy)


# ---------------------------------------------------------------------------- loading


def load_magi1_state_dict(
    directory: str | Path, *, sha256: str | Path | None = None, check_finite: bool = True
) -> dict[str, torch.Tensor]:
    """All tensors of a MAGI-1 checkpoint directory, on CPU, in index order, dtypes as stored.

    `sha256`: a sha256sum-format manifest the shard files must match (each is checked before it is read);
    without it, ``<directory>/SHA256SUMS`` is used if present. `check_finite=False` skips the NaN/inf check
    (only for copying files bit for bit, never for running a model)."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"MAGI-1 checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"MAGI-1 checkpoint {directory} is not a directory")
    manifest_path = Path(sha256) if sha256 is not None else directory / MANIFEST_NAME
    manifest = None
    if sha256 is not None or manifest_path.is_file():
        manifest = Manifest.read(manifest_path)

    index_path = directory / INDEX_NAME
    if index_path.is_file():
        if manifest is not None and INDEX_NAME in manifest.digests:
            manifest.check(index_path)
        return _load_indexed(directory, _read_weight_map(index_path), manifest, check_finite)
    single = directory / SINGLE_NAME
    if not (single.is_file() or _zst(single).is_file()):
        present = sorted(p.name for p in directory.iterdir())
        shown = ", ".join(present[:_LIST_LIMIT]) + (", ..." if len(present) > _LIST_LIMIT else "")
        raise FileNotFoundError(
            f"MAGI-1 checkpoint directory {directory} has neither {INDEX_NAME} nor {SINGLE_NAME}[{_ZST_SUFFIX}]"
            + (f" (it contains: {shown})" if present else " (it is empty)")
        )
    return _load_safetensors(single, manifest, check_finite)


class Manifest:
    """A sha256sum-format file: `<64 hex digits>  <file name>` per line (`*` instead of the second space
    marks binary mode, as sha256sum writes it). Names are matched by their last component, so a manifest made
    from the parent directory (`sha256sum inference_weight/*`) works too."""

    def __init__(self, path: Path, digests: dict[str, str]) -> None:
        self.path = path
        self.digests = digests  # file name -> lower-case hex digest

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sha256 manifest {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"sha256 manifest {path} is not text: {e}") from e
        digests: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            match = _MANIFEST_LINE.fullmatch(line.rstrip("\r"))
            if match is None:
                raise ValueError(f"{path}, line {number}: expected '<64 hex digits>  <file name>' "
                                 f"(sha256sum's format), got {line[:120]!r}")
            digest, name = match.group(1).lower(), os.path.basename(match.group(2))
            if digests.get(name, digest) != digest:
                raise ValueError(f"{path} lists {name} twice with different digests")
            digests[name] = digest
        if not digests:
            raise ValueError(f"sha256 manifest {path} lists no files")
        return cls(path, digests)

    def check(self, file: Path) -> None:
        """Raise unless `file` is listed and its contents hash to the listed digest."""
        want = self.digests.get(file.name)
        if want is None:
            raise ValueError(f"sha256 manifest {self.path} has no entry for {file.name}; it lists "
                             f"{', '.join(sorted(self.digests)[:_LIST_LIMIT])}")
        got = sha256_of(file)
        if got != want:
            raise ValueError(f"{file} does not match its sha256 in {self.path} (file {got}, manifest {want}): "
                             "the file is damaged or not the one the manifest describes; download it again")


def sha256_of(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: str | Path) -> Path:
    """Write ``<directory>/SHA256SUMS`` covering every regular file of `directory` (itself and hidden files
    excepted), atomically; returns its path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory")
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and not p.is_symlink() and p.name != MANIFEST_NAME and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{directory} holds no files to hash")
    lines = "".join(f"{sha256_of(p)}  {p.name}\n" for p in files)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{MANIFEST_NAME}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, directory / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return directory / MANIFEST_NAME


def verify_sha256(directory: str | Path, sha256: str | Path) -> None:
    """Check every file `load_magi1_state_dict(directory)` reads against manifest `sha256` without loading it."""
    directory = Path(directory)
    manifest = Manifest.read(sha256)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        if INDEX_NAME in manifest.digests:
            manifest.check(index_path)
        shards = dict.fromkeys(_read_weight_map(index_path).values())
        files = [directory / shard for shard in shards]
    else:
        files = [directory / SINGLE_NAME]
    for file in files:
        manifest.check(file if file.is_file() or not _zst(file).is_file() else _zst(file))


def _check_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        bad = _nonfinite(tensor)
        if bad:
            raise ValueError(f"{file}: tensor {key!r} {tuple(tensor.shape)} {tensor.dtype} holds {bad} NaN/inf "
                             "values; the shard is damaged (flipped bits?): download it again")


def _nonfinite(tensor: torch.Tensor) -> int:
    flat = tensor.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        part = flat[start:start + _FINITE_CHUNK]
        if part.element_size() == 1:  # fp8 has no isfinite kernel; its values are exact in float32
            part = part.float()
        finite = torch.isfinite(part)
        if not bool(finite.all()):
            bad += int(finite.numel() - finite.sum())
    return bad


def _read_weight_map(index_path: Path) -> dict[str, str]:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        # json.loads would silently keep the last of two equal keys, hiding a broken index.
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"{index_path}: key {key!r} appears more than once")
            seen[key] = value
        return seen

    try:
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index_path} is not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no non-empty 'weight_map' object")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.basename(shard) != shard:
            raise ValueError(f"{index_path}: key {key!r} maps to {shard!r}, which is not a file name")
    return weight_map


def _load_indexed(
    directory: Path, weight_map: dict[str, str], manifest: Manifest | None, check_finite: bool
) -> dict[str, torch.Tensor]:
    index_path = directory / INDEX_NAME
    wanted_by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        wanted_by_shard.setdefault(shard, []).append(key)

    loaded: dict[str, torch.Tensor] = {}
    for shard, wanted in wanted_by_shard.items():
        shard_path = directory / shard
        if not shard_path.is_file() and not _zst(shard_path).is_file():
            raise FileNotFoundError(
                f"{index_path} names shard {shard}, "
                f"but neither {shard_path} nor {_zst(shard_path).name} exists"
            )
        tensors = _load_safetensors(shard_path, manifest, check_finite)
        for key in wanted:
            if key not in tensors:
                raise ValueError(
                    f"{index_path} puts {key!r} in {shard_path}, but that shard does not contain it"
                )
        for key in tensors:
            home = weight_map.get(key)
            if home is None:
                raise ValueError(f"{shard_path} contains {key!r}, which {index_path} does not list")
            if home != shard:
                raise ValueError(f"{key!r} is stored in both {shard_path} and {directory / home}")
        loaded.update(tensors)
    # Return keys in index order (shards were read grouped, which may interleave differently).
    return {key: loaded[key] for key in weight_map}


def _load_safetensors(path: Path, manifest: Manifest | None, check_finite: bool) -> dict[str, torch.Tensor]:
    """Read ``path``, or ``path.zst`` when only the compressed file is there; checked against `manifest` first
    and (`check_finite`) for NaN/inf after."""
    stored = path if path.is_file() else _zst(path)
    if manifest is not None:
        manifest.check(stored)
    try:
        if stored is path:
            tensors = safetensors.torch.load_file(path, device="cpu")
        else:
            tensors = safetensors.torch.load(_zstd_decompress(stored))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from e
    if check_finite:
        _check_finite(tensors, stored)
    return tensors


def _zstd_decompress(path: Path) -> bytes:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise RuntimeError(
            f"{path} is zstd-compressed but the 'zstd' command-line tool is not installed "
            f"(e.g. apt-get install zstd), or decompress it yourself: zstd -d {path}"
        )
    result = subprocess.run([zstd, "-d", "-c", "-q", str(path)], capture_output=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise ValueError(f"zstd could not decompress {path} (exit {result.returncode}): {message}")
    return result.stdout


def _zst(path: Path) -> Path:
    return path.with_name(path.name + _ZST_SUFFIX)


# ---------------------------------------------------------------------------- saving


def save_magi1_checkpoint(
    state_dict: dict[str, torch.Tensor],
    directory: str | Path,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write ``state_dict`` as sharded safetensors plus an index, replacing ``directory`` atomically.

    Shards are filled greedily in key order; a tensor larger than ``max_shard_bytes`` gets a shard
    of its own. An existing ``directory`` is replaced only if it holds nothing but checkpoint files,
    so a mistyped path cannot wipe unrelated data.
    """
    directory = Path(directory)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not state_dict:
        raise ValueError(f"refusing to write an empty state dict to {directory}")
    for key, tensor in state_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"state dict entry {key!r} must map a str to a Tensor, got {type(tensor).__name__}"
            )
    if directory.exists():
        _check_replaceable(directory)

    shards = _plan_shards(state_dict, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp_", dir=directory.parent))
    # mkdtemp makes the directory private (0700); a published checkpoint gets the usual mode under the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        weight_map: dict[str, str] = {}
        for name, keys in zip(names, shards):
            _write_shard(tmp / name, {key: state_dict[key] for key in keys})
            weight_map.update({key: name for key in keys})
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in state_dict.values())},
            "weight_map": {key: weight_map[key] for key in state_dict},
        }
        write_json_durably(tmp / INDEX_NAME, index)
        fsync_dir(tmp)
        replace_dir(tmp, directory, aside_prefix=f".{directory.name}.old_")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plan_shards(state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, tensor in state_dict.items():
        size = _nbytes(tensor)
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors rejects non-contiguous tensors and tensors sharing storage (views, tied
    # weights), so every tensor that is not the sole owner of its memory is copied.
    prepared: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen_storage or storage.nbytes() != _nbytes(tensor):
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        seen_storage.add(storage.data_ptr())
        prepared[key] = tensor
    safetensors.torch.save_file(prepared, path, metadata={"format": "pt"})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _check_replaceable(directory: Path) -> None:
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; not overwriting it")
    foreign = [
        p.name
        for p in directory.iterdir()
        if not (p.is_file() and (p.name == MANIFEST_NAME or (p.name.startswith("model") and ".safetensors" in p.name)))
    ]
    if foreign:
        raise FileExistsError(
            f"{directory} already exists and holds files that are not MAGI-1 checkpoint files "
            f"({', '.join(sorted(foreign)[:_LIST_LIMIT])}); not overwriting it"
        )


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------- stored dtypes

# What the released files store in fp32 (checked against tests/fixtures/magi1_gelu); everything else is bf16.
RELEASED_FP32_PREFIXES = ("x_embedder.", "t_embedder.", "final_linear.")
RELEASED_FP32_KEYS = ("rope.bands",)


def released_dtype(key: str) -> torch.dtype:
    return torch.float32 if key.startswith(RELEASED_FP32_PREFIXES) or key in RELEASED_FP32_KEYS else torch.bfloat16


def cast_like_released(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whatever the training dtype, store what the released files store (the loader keeps stored dtypes)."""
    return {k: t.to(released_dtype(k)) if t.is_floating_point() else t for k, t in state.items()}


# ---------------------------------------------------------------------------- checking


def check_state_dict(
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]],
    got: dict[str, torch.Tensor],
    source: str | Path,
) -> None:
    """Raise a ``ValueError`` describing every way ``got`` (read from ``source``) misses ``expected``.

    ``expected`` maps each key to ``(shape, dtype)``; a dtype of None accepts any dtype.
    """
    missing = [key for key in expected if key not in got]
    unexpected = [key for key in got if key not in expected]
    shape_errors: list[str] = []
    dtype_errors: list[str] = []
    for key, (shape, dtype) in expected.items():
        if key not in got:
            continue
        tensor = got[key]
        if tuple(tensor.shape) != tuple(shape):
            shape_errors.append(f"{key}: expected {tuple(shape)}, checkpoint has {tuple(tensor.shape)}")
        if dtype is not None and tensor.dtype != dtype:
            dtype_errors.append(f"{key}: expected {dtype}, checkpoint has {tensor.dtype}")

    sections = [
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shape_errors),
        ("dtype mismatches", dtype_errors),
    ]
    lines = []
    for title, items in sections:
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items[:_LIST_LIMIT])
            if len(items) > _LIST_LIMIT:
                lines.append(f"    ... and {len(items) - _LIST_LIMIT} more")
    if lines:
        raise ValueError(f"state dict from {source} does not match the model:\n" + "\n".join(lines))
