"""A bad model source stops the start with one line naming the file and the reason;
GGUF conversions are cached by content and made once however many workers start."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from services.inference.model_loading import ModelLoadError, load_model
from services.inference.model_sources import content_digest, converted
from tests.doubles.tiny_model import build_tiny_model

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny = build_tiny_model(seed=3)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def fails(spec: Path, tmp_path: Path, *fragments: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(spec), device="cpu", dtype="float32", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def write_gguf(path: Path, arch: str, n: int = 64) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.ones((n, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_missing_folder_or_gguf(tmp_path: Path) -> None:
    fails(tmp_path / "nope" / "model", tmp_path, "nope/model", "no such file")
    fails(Path("missing-model.gguf"), tmp_path, "missing-model.gguf", "no such file")


def test_a_folder_without_a_config_or_weights(good_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, tmp_path, str(empty / "config.json"), "missing")
    no_weights = copy_dir(good_dir, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    fails(no_weights, tmp_path, str(no_weights), "no weights")
    bad_json = copy_dir(good_dir, tmp_path / "bad-json")
    (bad_json / "config.json").write_text("{not json", encoding="utf-8")
    fails(bad_json, tmp_path, str(bad_json / "config.json"), "not readable JSON")


def test_truncated_weights(good_dir: Path, tmp_path: Path) -> None:
    folder = copy_dir(good_dir, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 1000])
    fails(folder, tmp_path, str(weights), f"truncated ({len(whole) - 1000} of {len(whole)} bytes)")
    weights.write_bytes(whole[:5])
    fails(folder, tmp_path, str(weights), "truncated")
    sharded = copy_dir(good_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    fails(sharded, tmp_path, "model-00002-of-00002.safetensors", "missing (listed in")


def test_unsupported_model_types(good_dir: Path, tmp_path: Path) -> None:
    for model_type, reason in (
        ("vit", "is not a causal language model"),
        ("not-a-model", "is unknown to this transformers"),
    ):
        folder = copy_dir(good_dir, tmp_path / model_type)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        (folder / "config.json").write_text(
            json.dumps(config | {"model_type": model_type}), encoding="utf-8"
        )
        fails(folder, tmp_path, str(folder / "config.json"), repr(model_type), reason)


def test_bad_gguf_files(tmp_path: Path) -> None:
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 64)
    fails(other, tmp_path, str(other), "must be a .gguf file")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    fails(fake, tmp_path, str(fake), "not a GGUF file")
    unknown = write_gguf(tmp_path / "unknown.gguf", "made-up-arch")
    fails(unknown, tmp_path, str(unknown), "GGUF architecture 'made-up-arch' is not supported")
    whole = write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    for keep in (len(whole) - 100, 40):
        cut.write_bytes(whole[:keep])
        fails(cut, tmp_path, str(cut), "truncated")
    assert not (tmp_path / "cache").exists()  # nothing was converted


def test_the_worker_start_fails_with_one_line(tmp_path: Path) -> None:
    gone = tmp_path / "gone.gguf"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()[:-100])
    for model, reason in ((gone, "no such file or directory"), (cut, "truncated")):
        argv = ["inference", "serve", "--model", str(model), "--cache-dir", str(tmp_path)]
        code = f"from services.cli import main; raise SystemExit(main({argv!r}))"
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tokenyard: model file {model}: ")
        assert reason in lines[0]


def test_a_cache_dir_under_home_is_the_users_not_a_folder_named_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")

    def convert(source: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{}", encoding="utf-8")

    entry = converted(source, Path("~/models"), convert)
    assert entry.parent == home / "models" and (entry / "config.json").is_file()
    assert not any(work.iterdir())


def test_the_conversion_cache_is_keyed_by_content(tmp_path: Path) -> None:
    calls: list[bytes] = []

    def convert(source: Path, folder: Path) -> None:
        calls.append(source.read_bytes())
        (folder / "config.json").write_text("{}", encoding="utf-8")

    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF version one")
    first = converted(source, tmp_path / "cache", convert)
    assert converted(source, tmp_path / "cache", convert) == first
    assert first.name == f"model-{content_digest(source)}"
    source.write_bytes(b"GGUF version two")  # replaced in place, same name and path
    second = converted(source, tmp_path / "cache", convert)
    assert second != first
    assert calls == [b"GGUF version one", b"GGUF version two"]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert sorted(leftovers) == sorted([first.name, second.name])  # no temporary folders


def test_concurrent_cold_starts_convert_once(tmp_path: Path) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF contents")
    cache = tmp_path / "cache"
    calls: list[str] = []
    results: dict[str, Path] = {}

    def start(name: str) -> None:
        results[name] = converted(source, cache, convert)

    def waiting_on(lock: Path) -> bool:
        # Linux lists a lock's blocked waiters as "N: -> FLOCK ... maj:min:inode" lines.
        inode = f":{lock.stat().st_ino} "
        locks = Path("/proc/locks").read_text(encoding="utf-8").splitlines()
        return any("->" in line and inode in line for line in locks)

    def convert(_: Path, folder: Path) -> None:
        calls.append(threading.current_thread().name)
        # The second worker starts on the cold cache while this one converts, and
        # must wait for it rather than convert as well.
        second.start()
        lock = cache / f".model-{content_digest(source)}.lock"
        deadline = time.monotonic() + 20
        while not waiting_on(lock):
            assert second.is_alive(), "the second start did not wait for the first"
            assert time.monotonic() < deadline, "the second start never waited on the lock"
            second.join(0.001)  # poll
        (folder / "config.json").write_text("{}", encoding="utf-8")

    second = threading.Thread(target=start, args=("b",), name="b")
    first = threading.Thread(target=start, args=("a",), name="a")
    first.start()
    first.join(30)
    second.join(30)
    assert len(results) == 2
    assert calls == ["a"]
    assert results["a"] == results["b"] and (results["a"] / "config.json").is_file()


def test_the_model_revision_is_a_content_hash(good_dir: Path, tmp_path: Path) -> None:
    """Describe's model_revision: the same weights give the same revision wherever they
    lie; other weights (another seed) give another; a GGUF's is its conversion key."""
    from services.inference.model_sources import converted_digest, weights_digest

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in good_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert weights_digest(copy) == weights_digest(good_dir)
    other = tmp_path / "other"
    tiny = build_tiny_model(seed=4)
    tiny.model.save_pretrained(other)
    assert weights_digest(other) != weights_digest(good_dir)
    loaded = load_model(str(good_dir), device="cpu", dtype="float32", cache_dir=tmp_path)
    assert loaded.revision == weights_digest(good_dir)
    assert converted_digest(tmp_path / f"model-{'a' * 16}") == "a" * 16
    assert build_tiny_model(seed=3).revision == build_tiny_model(seed=3).revision
    assert build_tiny_model(seed=3).revision != build_tiny_model(seed=4).revision
