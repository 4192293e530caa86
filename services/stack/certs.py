"""Throwaway certificates for local TLS: a CA and one certificate per service.

`tokenyard up --tls` and the TLS tests use these (made with the `openssl` CLI, so
no extra Python dependency). Each leaf is valid for serving and as a client
certificate, for `localhost`, 127.0.0.1 and the service name; production
deployments bring their own (cert-manager, a service mesh).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SERVICES = ("router", "auth", "worker")


class CertError(RuntimeError):
    """Certificates could not be made (openssl missing or failing)."""


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise CertError("openssl is needed to make TLS certificates (or pass --tls-dir)")
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CertError(f"openssl {args[0]} failed: {done.stderr.strip()[:300]}")


def make_dev_certs(folder: Path, services: tuple[str, ...] = SERVICES, days: int = 30) -> Path:
    """Write ca.pem and `<service>.pem`/`<service>.key` for each service into `folder`.

    Existing files are kept (idempotent); keys are 0600.
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    if not (folder / "ca.pem").is_file():
        _openssl(
            "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
            "-subj", "/CN=tokenyard dev CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=folder,
        )  # fmt: skip
    for name in services:
        if (folder / f"{name}.pem").is_file():
            continue
        ext = folder / f"{name}.ext"
        ext.write_text(
            f"subjectAltName=DNS:localhost,DNS:{name},IP:127.0.0.1\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "basicConstraints=CA:FALSE\n"
        )
        _openssl(
            "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", str(days), "-extfile", ext.name,
            cwd=folder,
        )  # fmt: skip
        (folder / f"{name}.csr").unlink()
        ext.unlink()
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return folder
