"""Deployment: TLS and SuperNode credentials, and a SuperLink with SuperNodes on
127.0.0.1 that this process starts and stops by PID.

`make_credentials` writes what a federation needs: a local certificate authority,
the SuperLink's TLS certificate signed by it, and one EC key pair per SuperNode
(OpenSSH format, as `flower-supernode --auth-supernode-private-key` and
`flwr supernode register` read them). `LocalDeployment` runs the real deployment
runtime (no simulation): a SuperLink with TLS and SuperNode authentication on by
default, registered SuperNodes each with its own `--node-config`, and `flwr run`
against it. Tests, `scripts/deploy_local.py` and the benchmarks use it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedllm_tools.processes import stop_group, wait_for_port
from fedllm_tools.simulation import (
    _bin,
    _free_port,
    _toml_string,
    flower_env,
    run_flwr,
    staged_copy,
)

CONNECTION = "fedllm-deploy"


@dataclass
class Credentials:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def node_key(self, index: int) -> Path:
        return self.folder / f"node_{index}"

    def node_public_key(self, index: int) -> Path:
        return self.folder / f"node_{index}.pub"


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created that way, never widened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_credentials(folder: Path, nodes: int, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Credentials:
    """Create (or complete) a federation's credentials in `folder`.

    Existing files are kept, so adding SuperNodes later only adds key pairs. The
    server certificate names `hosts` (IP addresses or DNS names) and is valid for
    one year; private keys are written with mode 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    creds = Credentials(Path(folder))
    creds.folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    pem, ssh = serialization.Encoding.PEM, serialization.Encoding.OpenSSH

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    if not (creds.ca_cert.is_file() and (creds.folder / "ca.key").is_file()):
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name("fedllm-flwr local CA"))
            .issuer_name(name("fedllm-flwr local CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(
            creds.folder / "ca.key",
            ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
        creds.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    if not (creds.server_cert.is_file() and creds.server_key.is_file()):
        ca_key = serialization.load_pem_private_key((creds.folder / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP384R1())
        alt_names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt_names.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(hosts[0]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(
            creds.server_key,
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
        creds.server_cert.write_bytes(cert.public_bytes(pem))
    for index in range(nodes):
        if creds.node_key(index).is_file() and creds.node_public_key(index).is_file():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            creds.node_key(index),
            key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        )
        public = key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH)
        creds.node_public_key(index).write_bytes(public + f" fedllm-node-{index}\n".encode())
    return creds


@dataclass
class Node:
    index: int
    process: subprocess.Popen
    log_path: Path


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 (deployment runtime), owned by this object.

    with LocalDeployment(workdir, credentials=make_credentials(dir, 2)) as dep:
        dep.register(0); dep.start_node(0, {"partition-id": 0, "num-partitions": 2}); ...
        result = dep.run(app_dir, overrides="num_rounds=2")

    `credentials=None` runs insecure (no TLS, no SuperNode authentication).
    """

    def __init__(self, workdir: Path, credentials: Credentials | None = None, env: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.credentials = credentials
        self.flwr_home = self.workdir / "flwr-home"
        self.env = flower_env(self.flwr_home, env)
        self.port = 0
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, Node] = {}

    @property
    def secure(self) -> bool:
        return self.credentials is not None

    def _spawn(self, command: list[str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            # A session of its own, so stopping it stops whatever it spawned.
            return subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.workdir,
            )  # fmt: skip

    def start(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        command = [
            _bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.workdir / "state.db"), "--isolation", "subprocess",
        ]  # fmt: skip
        connection = (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
        )
        if self.credentials is not None:
            c = self.credentials
            command += ["--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile", str(c.server_cert),
                        "--ssl-keyfile", str(c.server_key), "--enable-supernode-auth"]  # fmt: skip
            connection += f"root-certificates = {_toml_string(str(c.ca_cert))}\n"
        else:
            command.append("--insecure")
            connection += "insecure = true\n"
        (self.flwr_home / "config.toml").write_text(connection)
        self.superlink = self._spawn(command, self.workdir / "superlink.log")
        wait_for_port(self.port, self.superlink, self.workdir / "superlink.log")
        return self

    def flwr(self, *args: str, timeout: float = 600, log_name: str = "flwr.log") -> subprocess.CompletedProcess:
        """A `flwr` CLI command against this SuperLink; its output also goes to a file."""
        return run_flwr(args, self.env, self.workdir / log_name, timeout)

    def register(self, index: int) -> None:
        """Register SuperNode `index`'s public key with the SuperLink."""
        if self.credentials is None:
            raise RuntimeError("an insecure deployment has no SuperNode authentication to register with")
        result = self.flwr("supernode", "register", str(self.credentials.node_public_key(index)), CONNECTION,
                           log_name=f"register_{index}.log")  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"registering node {index} failed:\n{result.stdout[-2000:]}")

    def start_node(self, index: int, node_config: dict[str, object], key_index: int | None = None) -> Node:
        """Start SuperNode `index` with `node_config` (authenticating with node key
        `key_index`, default its own)."""
        items = " ".join(
            f"{k}={_toml_string(v) if isinstance(v, str) else v}" for k, v in node_config.items()
        )  # fmt: skip
        command = [
            _bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(_free_port()), "--node-config", items, "--isolation", "subprocess",
            "--max-retries", "3", "--max-wait-time", "30",
        ]  # fmt: skip
        if self.credentials is not None:
            key = self.credentials.node_key(index if key_index is None else key_index)
            command += ["--root-certificates", str(self.credentials.ca_cert), "--auth-supernode-private-key", str(key)]
        else:
            command.append("--insecure")
        log_path = self.workdir / f"supernode_{index}.log"
        node = Node(index, self._spawn(command, log_path), log_path)
        self.nodes[index] = node
        return node

    def stop_node(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Stop SuperNode `index` and its ClientApp processes (SIGKILL simulates a crash)."""
        node = self.nodes.pop(index, None)
        if node is not None:
            stop_group(node.process, sig)

    def run(
        self, app_dir: Path, overrides: str = "", timeout: float = 600, echo: bool = False
    ) -> subprocess.CompletedProcess:
        """`flwr run APP --stream` on this federation, with Hydra overrides; `echo`
        also copies its output to this process's stdout as it comes (APP staged once
        into the work dir: see `simulation.stage_app`)."""
        args = ["run", str(staged_copy(app_dir, self.workdir)), CONNECTION, "--stream"]
        if overrides:
            args += ["--run-config", f"overrides={_toml_string(overrides)}"]
        if not echo:
            return self.flwr(*args, timeout=timeout, log_name="flwr-run.log")
        out = self.workdir / "flwr-run.log"
        deadline = time.monotonic() + timeout
        with open(out, "wb") as handle:
            proc = subprocess.Popen(
                [_bin("flwr"), *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                for line in proc.stdout:  # type: ignore[union-attr]
                    handle.write(line)
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(proc.args, timeout)
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(errors="replace"), "")

    def stop(self) -> None:
        for index in list(self.nodes):
            self.stop_node(index)
        if self.superlink is not None:
            stop_group(self.superlink, signal.SIGTERM)
            self.superlink = None

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
