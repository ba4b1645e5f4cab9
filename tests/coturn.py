"""A real coturn (Debian's ``turnserver``) for tests and benchmarks.

Loopback only: it listens and relays on 127.0.0.1, on free ports chosen at
start (one port for TURN over UDP and TCP, one for TLS) and a small relay
port range below the ephemeral range. Shared-secret credentials
(``use-auth-secret``), a test CA and certificate made at start, no CLI, no
DTLS, its log in a temporary directory (quiet unless a test prints it), and
bounded allocations and bandwidth. It dies with the process that started it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TURNSERVER = "/usr/bin/turnserver"
REALM = "scrubin.test"
START_TIMEOUT_S = 10.0


def available() -> bool:
    return Path(TURNSERVER).is_file() and os.access(TURNSERVER, os.X_OK)


@dataclass
class Coturn:
    secret: str
    port: int  # TURN over UDP and over TCP
    tls_port: int
    ca_file: Path  # trust this to verify the TLS listener's certificate
    log_file: Path
    process: subprocess.Popen[bytes]

    def url(self, transport: str) -> str:
        """The TURN URL a client uses over ``transport`` ("udp", "tcp", "tls")."""
        if transport == "tls":
            return f"turns:127.0.0.1:{self.tls_port}?transport=tcp"
        return f"turn:127.0.0.1:{self.port}?transport={transport}"

    @property
    def urls(self) -> list[str]:
        return [self.url(t) for t in ("udp", "tcp", "tls")]

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def allocations(self) -> int:
        """Relays coturn created so far, from its log."""
        return self.log().count("ALLOCATE processed, success")


def _free_port(udp_too: bool) -> int:
    """A loopback port free for TCP (and UDP when asked) right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            if not udp_too:
                return port
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port")


def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ScrubIn test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_file.write_bytes(ca.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _start(directory: Path, secret: str) -> Coturn:
    ca_file, cert_file, key_file = write_certificates(directory)
    port, tls_port = _free_port(udp_too=True), _free_port(udp_too=False)
    # Relays below Linux's ephemeral range (32768-60999), where aioice and
    # Chromium take their own ports; coturn skips ports that are taken.
    low = random.randrange(20000, 32000 - 256)
    log_file = directory / "turnserver.log"
    args = [
        # setpriv (util-linux): SIGTERM to coturn when the process that started it
        # goes away, however it ends (preexec_fn is unsafe with threads).
        "setpriv", "--pdeathsig", "TERM",
        TURNSERVER, "-n", "--no-cli", "--no-dtls", "--no-tlsv1", "--no-tlsv1_1",
        "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", "--allow-loopback-peers",
        f"--listening-port={port}", f"--tls-listening-port={tls_port}",
        f"--min-port={low}", f"--max-port={low + 255}",
        "--use-auth-secret", f"--static-auth-secret={secret}", f"--realm={REALM}",
        f"--cert={cert_file}", f"--pkey={key_file}", "--fingerprint",
        # Bounded: allocations per user and in all, bandwidth per allocation.
        "--user-quota=64", "--total-quota=256", "--max-bps=5000000", "--relay-threads=1",
        "--no-stdout-log", "--simple-log", f"--log-file={log_file}",
        f"--pidfile={directory / 'turnserver.pid'}", f"--userdb={directory / 'turndb'}",
        "--no-software-attribute", "--verbose",
    ]
    with open(directory / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                   cwd=directory)
    coturn = Coturn(secret, port, tls_port, ca_file, log_file, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _listening(port) and _listening(tls_port) and "turn server id=" in coturn.log():
            return coturn
        time.sleep(0.05)
    _stop(process)
    raise RuntimeError(f"coturn did not start (exit {process.returncode}):\n{coturn.log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def running_coturn() -> Iterator[Coturn]:
    if not available():
        raise RuntimeError(f"{TURNSERVER} is missing: run bash .ci/install --test (apt coturn)")
    directory = Path(tempfile.mkdtemp(prefix="scrubin-coturn-"))
    secret = secrets.token_urlsafe(24)
    try:
        for attempt in range(3):  # a port taken between choosing and binding
            try:
                coturn = _start(directory, secret)
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        try:
            yield coturn
        finally:
            _stop(coturn.process)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
