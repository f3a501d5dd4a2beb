"""Benchmark: what ``-b ec2`` adds over ``-b ssh``, on the emulated setup (moto + sshd hosts).

    sudo .venv/bin/python bench/ec2_overhead.py --repeat 3      # root: network namespaces

For each repetition, side by side (the order alternates), the stand-in entry point
(tests/projects/standin) runs on 1 node x 1 process through ``-b ssh`` (to an sshd in a network
namespace) and through ``-b ec2`` (a moto server for EC2/SSM/STS, and
:class:`tests.projects.ec2_hosts.FakeCloud` booting the instance as an sshd host), both logging
to one ``mlflow server`` on the bridge. The backends run in this process (what ``mlflow run -b``
calls), so ec2's phases can be timed: checks (config, credentials, preflight), create (key
pair, security group, instances until running), SSH readiness without the emulated boot (the
FakeCloud starting sshd), launch + run (the ssh path), teardown; plus provision-to-first-metric
without the boot, and the fowlflow-tagged leftovers in moto after each run (must be 0).
Prints a markdown table and the command. Everything started here (moto, sshd, namespaces,
mlflow server) is stopped at the end, also on Ctrl-C / SIGTERM or a failure. Not a test:
results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fowlflow.projects.ec2 import Ec2Backend  # noqa: E402
from fowlflow.projects.ec2_launch import Ec2Run  # noqa: E402
from fowlflow.projects.ssh import SshBackend  # noqa: E402
from tests.net import free_port, wait_port  # noqa: E402
from tests.conftest import BIN  # noqa: E402
from tests.projects.conftest import BRIDGE, BRIDGE_IP, NAMESPACES, Keys, _run, \
    _teardown_network, ssh_config, start_sshd, stop  # noqa: E402
from tests.projects.ec2_hosts import FakeCloud, _add_namespace  # noqa: E402
from tests.projects.ec2_moto import REGION, SUBNET_CIDR, Aws  # noqa: E402
from tests.projects.helpers import STANDIN, Store  # noqa: E402
from tests.projects.test_ec2_hosts import host_config  # noqa: E402

PARAMS = {"steps": "3", "sleep": "0.2"}
SPANS: dict[str, tuple[float, float]] = {}  # Ec2Run method -> (start, end), this run's


def _timed(owner, name: str) -> None:
    """Record when ``owner.name`` starts and ends (its first call per run) in SPANS."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            SPANS.setdefault(name, (start, time.time()))
    setattr(owner, name, wrapper)


for _method in ("_provision", "_wait_ready", "_release"):
    _timed(Ec2Run, _method)


class TimedCloud(FakeCloud):
    """FakeCloud that notes when it has finished booting an instance (its sshd listens)."""

    booted_at = 0.0

    def _boot(self, inst):
        booted = super()._boot(inst)
        self.booted_at = time.time()
        return booted


def _kill_namespace(ns: str) -> None:
    """Kill what runs in a namespace we made (a run interrupted on the ssh host)."""
    for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def network():
    """The tests' bridge and one namespace (the ssh host); all deleted by name afterwards."""
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    _teardown_network()
    ns, veth, address = NAMESPACES[0]
    try:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        _add_namespace(ns, veth, address)
        yield ns, address
    finally:
        _kill_namespace(ns)
        _teardown_network()


def ssh_host(stack: contextlib.ExitStack, tmp: Path, ns: str, address: str):
    """A client key and an sshd at ``address`` in ``ns`` trusting it: (keys, sshd)."""
    d = tmp / "ssh"
    d.mkdir(mode=0o700)
    for name in ("id_ed25519", "host_ed25519"):
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name))
    auth = d / "authorized_keys"
    auth.write_text((d / "id_ed25519.pub").read_text())
    keys = Keys(d, d / "id_ed25519", d / "host_ed25519", d / "known_hosts", auth)
    sshd = start_sshd(keys, address, 22, d / "sshd", netns=ns)
    stack.callback(stop, sshd.proc)
    return keys, sshd


def tracking_server(stack: contextlib.ExitStack, tmp: Path) -> Store:
    """``mlflow server`` on the bridge (SQLite + served artifacts) and an experiment there."""
    from mlflow import MlflowClient

    d, port = tmp / "mlflow-server", free_port(BRIDGE_IP)
    d.mkdir()
    with open(d / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", BRIDGE_IP, "--port", str(port),
             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
             "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=d)
    stack.callback(stop, proc)
    wait_port(BRIDGE_IP, port, timeout=180, proc=proc, log=d / "server.log")
    uri = f"http://{BRIDGE_IP}:{port}"
    store = Store(uri, MlflowClient(uri).create_experiment(f"ec2-overhead-{int(time.time())}"))
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_ID=store.experiment_id)
    return store


def moto(stack: contextlib.ExitStack, tmp: Path) -> tuple[str, str]:
    """A moto server, this process's AWS environment pointing at it: (url, a Linux AMI)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    stack.callback(server.stop)
    url = "http://%s:%d" % server.get_host_and_port()
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
        FOWLFLOW_EC2_HOME=str(tmp / "ec2-home"),
        **{f"AWS_ENDPOINT_URL_{s}": url for s in ("EC2", "SSM", "STS")})
    images = boto3.client("ec2", region_name=REGION).describe_images()["Images"]
    return url, next(i["ImageId"] for i in images if i.get("Platform") != "windows")


def fresh_account(url: str, image: str) -> Aws:
    """moto reset, then a VPC whose subnet is the bridge's /24 (as the ``aws`` fixture)."""
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"),
                           timeout=30).close()
    ec2 = boto3.client("ec2", region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET_CIDR)["Subnet"]["SubnetId"]
    return Aws(url, ec2, subnet, image)


def first_metric(store: Store, run_id: str) -> float:
    """When the stand-in logged its first metric (epoch seconds)."""
    history = store.client.get_metric_history(run_id, "allreduce_sum")
    return min(m.timestamp for m in history) / 1000


def run_ssh(env: dict, rep: int) -> dict:
    keys, sshd, store, tmp = env["keys"], env["sshd"], env["store"], env["tmp"]
    cfg = ssh_config(keys, sshd, remote_dir=str(tmp / f"ssh-remote{rep}"),
                     process_count_per_node=1)
    t0 = time.time()
    submitted = SshBackend().run(str(STANDIN), "main", PARAMS, None, cfg, store.uri,
                                 store.experiment_id)
    total = time.time() - t0
    assert store.client.get_run(submitted.run_id).info.status == "FINISHED"
    return {"ssh total": total,
            "ssh submit → first metric": first_metric(store, submitted.run_id) - t0}


def run_ec2(env: dict, rep: int) -> dict:
    store, tmp = env["store"], env["tmp"]
    aws = fresh_account(*env["moto"])
    cloud = TimedCloud(aws.ec2, tmp / f"cloud{rep}")
    SPANS.clear()
    try:
        cfg = host_config(aws, tmp / f"ec2-{rep}", ssh_timeout=300)
        t0 = time.time()
        submitted = Ec2Backend().run(str(STANDIN), "main", PARAMS, None, cfg, store.uri,
                                     store.experiment_id)
        end = time.time()
    finally:
        cloud.close()
    assert not cloud.errors, cloud.errors
    assert store.client.get_run(submitted.run_id).info.status == "FINISHED"
    (prov0, prov1), (ready0, ready1) = SPANS["_provision"], SPANS["_wait_ready"]
    rel0, rel1 = SPANS["_release"]
    boot = max(0.0, min(cloud.booted_at, ready1) - ready0)  # the emulated boot, while waiting
    return {"ec2 total (incl. emulated boot)": end - t0,
            "ec2 checks": prov0 - t0,
            "ec2 create key pair + SG + instance until running": prov1 - prov0,
            "ec2 emulated boot (excluded)": boot,
            "ec2 SSH readiness excl. boot": ready1 - ready0 - boot,
            "ec2 launch + run (ssh path)": rel0 - ready1,
            "ec2 teardown": rel1 - rel0,
            "ec2 provision → first metric excl. boot":
                first_metric(store, submitted.run_id) - prov0 - boot,
            "ec2 submit → first metric excl. boot":
                first_metric(store, submitted.run_id) - t0 - boot,
            "ec2 total excl. boot": end - t0 - boot,
            "ec2 leftovers in moto after the run (must be 0)":
                sum(len(v) for v in aws.leftovers().values())}


def table(reps: list[dict]) -> str:
    """Rows: the measurements; columns: each repetition and the median (seconds)."""
    for rep in reps:
        rep["ec2 − ssh, total excl. boot"] = rep["ec2 total excl. boot"] - rep["ssh total"]
    head = [f"rep {i + 1}" for i in range(len(reps))] + ["median"]
    lines = ["| s | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for key in reps[0]:
        values = [rep[key] for rep in reps]
        fmt = "{:d}" if "leftovers" in key else "{:.2f}"
        cells = [fmt.format(v) for v in values]
        cells.append(fmt.format(max(values)) if "leftovers" in key
                     else f"{statistics.median(values):.2f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sigterm(*_):
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: every cleanup runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    reps = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ec2-overhead-")))
        ns, address = stack.enter_context(network())
        keys, sshd = ssh_host(stack, tmp, ns, address)
        env = {"tmp": tmp, "keys": keys, "sshd": sshd, "store": tracking_server(stack, tmp),
               "moto": moto(stack, tmp)}
        for rep in range(args.repeat):
            order = (run_ssh, run_ec2) if rep % 2 == 0 else (run_ec2, run_ssh)
            result = {}
            for bench in order:
                result.update(bench(env, rep))
            reps.append({**{k: v for k, v in result.items() if k.startswith("ssh")},
                         **{k: v for k, v in result.items() if k.startswith("ec2")}})
            print(f"rep {rep + 1}/{args.repeat} done", file=sys.stderr, flush=True)
    print(table(reps))
    print(f"\ncommand: {' '.join([os.path.relpath(sys.executable), *sys.argv])}  "
          f"(stand-in {PARAMS}, 1 node x 1 process; order alternates, ssh first in rep 1)")


if __name__ == "__main__":
    main()
