"""Model sources on disk: checked before loading, GGUF files converted once.

A worker pointed at a missing, truncated or unsupported model must stop at start
with one line that names the file and the reason, not a traceback from deep inside
transformers or a hang while it dequantizes a damaged GGUF. `check_model_dir` and
`check_gguf` read only headers and sizes, so a healthy model pays milliseconds.

A GGUF file is converted to safetensors once (loading the copy is ~10x faster than
dequantizing on every start) into a cache entry named after the file's content
hash: a GGUF replaced in place gets a new entry, never a stale copy. Workers that
start together on a cold cache convert once: the conversion runs under a file
lock, and the entry appears by an atomic rename.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class ModelLoadError(ValueError):
    """The model spec, its files, device or dtype is unusable; the message says why."""


_SAFETENSORS_INDEX = "model.safetensors.index.json"
_DIGEST_CHARS = 16  # of sha256's hex: ample to tell versions of one file apart


def _fail(path: Path, reason: str) -> ModelLoadError:
    return ModelLoadError(f"model file {path}: {reason}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not readable JSON ({exc})") from None


def check_model_dir(folder: Path) -> None:
    """Raise `ModelLoadError` naming the file unless `folder` holds a loadable causal LM."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = folder / "config.json"
    config = _read_json(config_file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise _fail(config_file, "no model_type")
    if model_type not in CONFIG_MAPPING:
        raise _fail(config_file, f"model type {model_type!r} is unknown to this transformers")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise _fail(config_file, f"model type {model_type!r} is not a causal language model")
    for weights in _weight_files(folder):
        if weights.suffix == ".safetensors":
            check_safetensors(weights)
        elif not _is_complete_zip(weights):
            raise _fail(weights, "truncated or not a PyTorch checkpoint")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _fail(index, "no weight_map")
        shards = [folder / str(name) for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise _fail(shard, f"missing (listed in {_SAFETENSORS_INDEX})")
        return shards
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise _fail(folder, "no weights (no *.safetensors or pytorch_model*.bin files)")
    return files


def check_safetensors(path: Path) -> None:
    """Raise `ModelLoadError` unless `path`'s header is sound and its data all present."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"truncated ({size} bytes, not even a header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise _fail(path, f"truncated or not safetensors ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _fail(path, "not a safetensors file (unreadable header)") from None
    ends = [
        int(entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise _fail(path, f"truncated ({size} of {expected} bytes)")


def _is_complete_zip(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)  # its directory sits at the end: gone when truncated


def check_gguf(path: Path) -> None:
    """Raise `ModelLoadError` unless `path` is a whole GGUF file transformers can load."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if not path.is_file():
        raise _fail(path, "no such file")
    if path.suffix != ".gguf":
        raise _fail(path, "a model file must be a .gguf file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise _fail(path, "not a GGUF file (no GGUF magic)")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OSError) as exc:
        raise _fail(path, f"truncated or corrupt GGUF ({size} bytes: {exc})") from None
    if size < max(ends, default=0):
        raise _fail(path, f"truncated ({size} of {max(ends)} bytes)")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise _fail(path, f"GGUF architecture {arch!r} is not supported by transformers")


def content_digest(path: Path) -> str:
    """The file's sha256, shortened (~0.2 s for the 98 MB demo GGUF)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:_DIGEST_CHARS]


def weights_digest(folder: Path) -> str:
    """A content hash of a model directory's weight files (names and bytes), shortened.

    Reads every byte once (about 1 s per GB); a GGUF's converted copy is named by the
    GGUF's digest instead (`converted_digest`), which costs nothing more.
    """
    digest = hashlib.sha256()
    for weights in _weight_files(folder):
        digest.update(weights.name.encode() + b"\0")
        with weights.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:_DIGEST_CHARS]


def converted_digest(entry: Path) -> str:
    """The source's content digest a `converted` cache entry is named by."""
    return entry.name.rpartition("-")[2]


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


Converter = Callable[[Path, Path], None]


def converted(source: Path, cache_dir: Path, convert: Converter) -> Path:
    """The cache entry for `source`'s content, made by `convert(source, folder)` once.

    The entry is `cache_dir/<stem>-<content digest>`; a complete entry has a
    config.json. `convert` writes into a temporary folder renamed into place, under
    a lock that makes concurrent callers on a cold cache wait for the first. A
    `cache_dir` under ``~`` is the user's (the setting's default is written so): a
    library caller passing it as is once got a folder named ``~`` in its working
    directory.
    """
    cache_dir = cache_dir.expanduser()
    target = cache_dir / f"{source.stem}-{content_digest(source)}"
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # another worker converted it meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
        try:
            convert(source, tmp)
            if target.exists():  # an incomplete leftover (no config.json): replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
