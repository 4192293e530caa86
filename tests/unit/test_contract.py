"""The public contract: documented, lint-clean, and guarded against breaking changes."""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
BUF = ROOT / "tools" / "node_modules" / ".bin" / "buf"
needs_buf = pytest.mark.skipif(not BUF.exists(), reason="buf not installed (make setup)")


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path / "set.bin"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ]
    )
    assert rc == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_every_service_rpc_message_field_and_enum_value_has_a_comment(tmp_path: Path) -> None:
    """Users in other languages read the .proto files: nothing may be undocumented."""
    missing: list[str] = []
    for file in _descriptor_set(tmp_path).file:
        commented = {
            tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments
        }

        def need(
            path: tuple[int, ...],
            name: str,
            file_name: str = file.name,
            commented: set[tuple[int, ...]] = commented,
        ) -> None:
            if path not in commented:
                missing.append(f"{file_name}: {name}")

        for si, service in enumerate(file.service):
            need((6, si), service.name)
            for mi, method in enumerate(service.method):
                need((6, si, 2, mi), f"{service.name}.{method.name}")
        for mi, message in enumerate(file.message_type):
            need((4, mi), message.name)
            for fi, fld in enumerate(message.field):
                need((4, mi, 2, fi), f"{message.name}.{fld.name}")
        for ei, enum in enumerate(file.enum_type):
            need((5, ei), enum.name)
            for vi, value in enumerate(enum.value):
                need((5, ei, 2, vi), f"{enum.name}.{value.name}")
    assert missing == []


def test_generation_request_carries_the_designed_fields(tmp_path: Path) -> None:
    """Sampling fields are optional (unset differs from zero); input is a oneof."""
    files = {f.name: f for f in _descriptor_set(tmp_path).file}
    gen = files["tokenyard/generation/v1/generation_service.proto"]
    messages = {m.name: m for m in gen.message_type}
    sampling = messages["SamplingParams"]
    for fld in sampling.field:
        if fld.label != descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
            assert fld.proto3_optional, f"SamplingParams.{fld.name} must be optional"
    request = messages["StreamGenerateRequest"]
    assert next(o.name for o in request.oneof_decl) == "input"


@needs_buf
def test_buf_lint_passes() -> None:
    proc = subprocess.run(
        [str(BUF), "lint"], cwd=PROTOS, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_buf
def test_buf_breaking_catches_a_renumbered_field(tmp_path: Path) -> None:
    """The CI guard fails on a change that would break generated clients."""
    repo = tmp_path / "repo"
    shutil.copytree(PROTOS, repo / "protos")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    proto = repo / "protos/tokenyard/generation/v1/generation_service.proto"
    text = proto.read_text()
    assert "string affinity_key = 8;" in text
    proto.write_text(text.replace("string affinity_key = 8;", "string affinity_key = 18;"))
    proc = subprocess.run(
        [str(BUF), "breaking", "protos", "--against", ".git#ref=HEAD,subdir=protos"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert "affinity_key" in proc.stdout + proc.stderr


def test_the_product_never_imports_test_code() -> None:
    """Test doubles live under tests/; nothing in services/ may depend on them."""
    import ast
    from pathlib import Path

    offenders = []
    for path in Path(__file__).resolve().parents[2].joinpath("services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{path}: {n}" for n in names if n == "tests" or n.startswith("tests.")]
    assert not offenders, offenders
