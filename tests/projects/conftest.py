"""Real servers for the backend tests: OpenSSH sshd, network namespaces, ``mlflow server``.

* ``hosts``: a session-wide bridge ``ffbr<slot>`` (10.77.<slot>.1/24) and two network
  namespaces ``ffn<slot>-0``/``ffn<slot>-1`` (.2, .3), each reached through a veth pair and each
  running its own ``sshd``. Traffic stays between this machine and these namespaces. Each
  namespace has Debian's ``/etc/hosts`` (``127.0.1.1 <hostname>``): ``ip netns exec`` mounts
  ``/etc/netns/<ns>/hosts`` over ``/etc/hosts`` for what it starts (the sshd, so every session).
* ``tracking_server``: ``mlflow server`` (SQLite + served artifacts) on the bridge address, so
  processes in the namespaces and on this machine reach the same server.
* ``loopback_sshd``: one more sshd on 127.0.0.1 in the root namespace.
* ``server_store`` / ``local_store``: this test's experiment on that server, or a fresh SQLite
  store, as a :class:`tests.projects.helpers.Store` (an explicit ``MlflowClient(uri)``).

Every process is started by pid and stopped by pid; namespaces and links are deleted by name,
even when a test fails. ``<slot>`` is a number no other live test session holds (a lock file
per slot), so two test sessions at once never share names or addresses. Needs root and iproute2 (CI runs as root); without them the fixtures
fail loudly rather than skip.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.mlflow_server import MlflowServer, mlflow_server
from tests.net import free_port, wait_port
from tests.projects.helpers import Store


def _claim_network_slot(slots: int = 16) -> int:
    """A network number no other live test session holds: an flock on a file per slot, held
    until this process exits (so a crashed session frees its slot). Two sessions at once (two
    engineers, or a sweep's tests beside the ssh tests) then get different names and subnets."""
    lock_dir = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path("/tmp")
    for slot in range(slots):
        fh = open(lock_dir / f"fowlflow-tests-net{slot}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        _HELD_LOCKS.append(fh)
        return slot
    raise RuntimeError(f"all {slots} test network slots are held by live test sessions")


_HELD_LOCKS: list = []
SLOT = _claim_network_slot()
SUBNET = f"10.77.{SLOT}"  # this session's /24: the bridge is .1, the hosts .2 and .3
BRIDGE, BRIDGE_IP = f"ffbr{SLOT}", f"{SUBNET}.1"
NAMESPACES = tuple((f"ffn{SLOT}-{i}", f"ffv{SLOT}-{i}", f"{SUBNET}.{2 + i}") for i in range(2))
NS_IFACE = "ffeth"  # the interface name inside each namespace (names are per namespace)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr}")
    return proc


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop one process we started, by its pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@pytest.fixture(autouse=True)
def reap_launched(tmp_path):
    """After each test, stop what a failed test may have left: supervisors whose run dir is
    under this test's tmp_path, and every process carrying their run's marker."""
    yield
    import psutil

    markers = set()
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if any("supervise" in a for a in argv[:3]) and any(str(tmp_path) in a for a in argv):
            opts = dict(zip(argv, argv[1:]))
            markers.add(f"{opts.get('--run-id')}/{opts.get('--name')}")
            proc.kill()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FOWLFLOW_LAUNCH") in markers:
                proc.kill()
        except (psutil.Error, OSError):
            continue


@dataclass
class Keys:
    """A client key pair and the known_hosts file that trusts our sshd host key."""

    dir: Path
    identity: Path
    host_key: Path
    known_hosts: Path
    authorized_keys: Path


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> Keys:
    d = tmp_path_factory.mktemp("ssh")
    d.chmod(0o700)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id_ed25519"))
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_ed25519"))
    auth = d / "authorized_keys"
    auth.write_text((d / "id_ed25519.pub").read_text())
    auth.chmod(0o600)
    return Keys(d, d / "id_ed25519", d / "host_ed25519", d / "known_hosts", auth)


@dataclass
class Sshd:
    """A running sshd: where it listens, and the process (to drop its connections)."""

    address: str
    port: int
    proc: subprocess.Popen
    netns: str | None = None
    log: Path | None = None

    def drop_connections(self) -> int:
        """Kill every per-connection sshd child (a network drop as the client sees it)."""
        import psutil

        children = psutil.Process(self.proc.pid).children(recursive=False)
        for child in children:
            child.kill()
        return len(children)


def start_sshd(keys: Keys, address: str, port: int, workdir: Path,
               netns: str | None = None) -> Sshd:
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress {address}
HostKey {keys.host_key}
PidFile {workdir / 'sshd.pid'}
AuthorizedKeysFile {keys.authorized_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
MaxStartups 50
MaxSessions 50
Subsystem sftp internal-sftp
SetEnv OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} PYENV_REHASH_TIMEOUT=0
""")
    # PYENV_REHASH_TIMEOUT: where root's .bashrc runs `pyenv init` (this machine's), each login
    # rehashes pyenv's shims under a lock file in ~/.pyenv, which every test host shares. A
    # session killed mid-login (an ec2 instance terminated) leaves that lock behind, and each
    # later login would wait 60 s for it (past a remote probe's 60 s timeout: whole groups of
    # ssh and ec2 tests failed); with 0 a login tries it once and goes on.
    log = workdir / "sshd.log"
    argv = [shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(log)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    pub = keys.host_key.with_suffix(".pub").read_text().split()
    with open(keys.known_hosts, "a") as fh:
        name = address if port == 22 else f"[{address}]:{port}"  # ssh's known_hosts syntax
        fh.write(f"{name} {pub[0]} {pub[1]}\n")
    wait_port(address, port, proc=proc, log=log)  # namespaces: through the bridge
    return Sshd(address, port, proc, netns, log)


@pytest.fixture(scope="session")
def loopback_sshd(keys, tmp_path_factory):
    sshd = start_sshd(keys, "127.0.0.1", free_port(), tmp_path_factory.mktemp("sshd-lo"))
    yield sshd
    stop(sshd.proc)


NETNS_ETC = Path("/etc/netns")  # ip netns exec mounts /etc/netns/<ns>/<file> on /etc/<file>


def _teardown_network() -> None:
    for ns, veth, _ in NAMESPACES:
        _run("ip", "netns", "del", ns, check=False)
        _run("ip", "link", "del", veth, check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    _run("ip", "link", "del", BRIDGE, check=False)
    if NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):
        NETNS_ETC.rmdir()


@dataclass
class Hosts:
    """Two hosts as network namespaces, each with an sshd on port 22 of its address."""

    sshds: list[Sshd] = field(default_factory=list)


@pytest.fixture(scope="session")
def network():
    """The bridge and two namespaces (no sshd yet); deleted by name afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the ssh backend tests need root and iproute2 (network namespaces); "
                    "run them as root, e.g. in CI")
    _teardown_network()  # leftovers of an interrupted session have these names
    try:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for ns, veth, ip in NAMESPACES:
            (NETNS_ETC / ns).mkdir(parents=True)
            (NETNS_ETC / ns / "hosts").write_text(  # Debian's: the host name is loopback
                f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", NS_IFACE,
                 "netns", ns)
            _run("ip", "link", "set", veth, "master", BRIDGE)
            _run("ip", "link", "set", veth, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", NS_IFACE)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", NS_IFACE, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield [ip for _, _, ip in NAMESPACES]
    finally:
        _teardown_network()


@pytest.fixture(scope="session")
def hosts(network, keys, tmp_path_factory) -> Hosts:
    started = Hosts()
    try:
        for (ns, _, ip) in NAMESPACES:
            started.sshds.append(start_sshd(keys, ip, 22, tmp_path_factory.mktemp(f"sshd-{ns}"),
                                            netns=ns))
        yield started
    finally:
        for sshd in started.sshds:
            stop(sshd.proc)


@pytest.fixture(scope="session")
def tracking_server(network, tmp_path_factory) -> MlflowServer:
    """A real ``mlflow server`` on the bridge address (SQLite + served artifacts)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server"), host=BRIDGE_IP) as server:
        yield server


@pytest.fixture
def server_store(tracking_server, monkeypatch, request) -> Store:
    """This test's own experiment on the shared tracking server; the ``mlflow`` and
    ``fowlflow`` CLIs it starts log there too (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID)."""
    import uuid

    from mlflow import MlflowClient

    name = f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"
    experiment_id = MlflowClient(tracking_server.uri).create_experiment(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    return Store(tracking_server.uri, experiment_id)


@pytest.fixture
def local_store(tracking_uri) -> Store:
    """A fresh SQLite store in tmp_path (``tracking_uri``), its Default experiment."""
    return Store(tracking_uri, "0")


def ssh_config(keys: Keys, sshd: Sshd, **extra) -> dict:
    """A backend config that reaches ``sshd`` with the test key, verifying its host key."""
    host = {"host": sshd.address, "port": sshd.port}
    return {"hosts": [host], "user": "root", "identity_file": str(keys.identity),
            "known_hosts_file": str(keys.known_hosts), "python": sys.executable,
            "connect_timeout": 5, **extra}


class Relay:
    """A TCP relay on 127.0.0.1 to another address: "a tracking server on my laptop"."""

    def __init__(self, target: tuple[str, int]):
        import socketserver
        import threading

        def pipe(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                upstream = socket.create_connection(target, timeout=10)
                upstream.settimeout(None)
                back = threading.Thread(target=pipe, args=(upstream, self.request), daemon=True)
                back.start()
                pipe(self.request, upstream)
                back.join()
                upstream.close()

        socketserver.ThreadingTCPServer.daemon_threads = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
