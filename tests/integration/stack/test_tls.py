"""`tokenyard up --tls-dir`: TLS on the router's port, mutual TLS inside."""

from __future__ import annotations

from pathlib import Path

from services.stack.certs import make_dev_certs
from tests.integration.stack.launcher import READY, StackProcess, run_cli


def test_the_stack_runs_over_tls_and_workers_refuse_strangers(
    tiny_model: Path, tmp_path: Path
) -> None:
    certs = make_dev_certs(tmp_path / "tls")
    stranger = make_dev_certs(tmp_path / "other-ca")
    stack = StackProcess(tmp_path / "state", tiny_model, extra=["--tls-dir", str(certs)])
    try:
        stack.wait_for(READY)
        assert f"--tls-ca {certs / 'ca.pem'}" in stack.output
        ok = run_cli(
            "generate", "--address", stack.address, "--state-dir", str(stack.state_dir),
            "--tls-ca", str(certs / "ca.pem"), "--model", "tiny", "--max-tokens", "3",
            "--ignore-eos", "over TLS",
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert "completion 3 tokens" in ok.stderr

        plain = run_cli(
            "generate", "--address", stack.address, "--state-dir", str(stack.state_dir),
            "--model", "tiny", "--timeout", "5", "plaintext",
        )  # fmt: skip
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr

        worker = f"127.0.0.1:{stack.worker_port}"
        ca = str(certs / "ca.pem")
        as_router = [
            "--tls-cert",
            str(certs / "router.pem"),
            "--tls-key",
            str(certs / "router.key"),
        ]
        assert run_cli("health", worker, "--tls-ca", ca, *as_router).returncode == 0
        assert run_cli("health", worker, "--tls-ca", ca).returncode == 1  # no client cert
        foreign = [
            "--tls-cert", str(stranger / "router.pem"), "--tls-key", str(stranger / "router.key"),
        ]  # fmt: skip
        assert run_cli("health", worker, "--tls-ca", ca, *foreign).returncode == 1
        assert run_cli("health", worker).returncode == 1  # plaintext
        auth = f"127.0.0.1:{stack.auth_port}"
        assert run_cli("health", auth, "--tls-ca", ca).returncode == 1
        assert run_cli("health", auth, "--tls-ca", ca, *as_router).returncode == 0
    finally:
        assert stack.stop() == 0
