"""The run supervisor: one small, stdlib-only program that owns a launched command on a host.

The same file runs on this machine (torchrun backend) and is copied next to the project on a
remote host (ssh backend), where it is started detached from the SSH session::

    python3 supervise.py start  --run-dir D --name node0 --run-id ID [--finalize] -- ARGV...
    python3 supervise.py status --run-dir D --name node0          # prints one JSON object
    python3 supervise.py follow --run-dir D --name node0 --offset N   # streams the log
    python3 supervise.py cancel --run-dir D --name node0           # kills the whole tree

``start`` forks ``run`` into its own session (setsid, SIGHUP ignored, stdio on files), prints
its pid and returns, so a dropped SSH connection leaves the run alone. ``run`` starts the
command in its own process group with a marker variable ``FOWLFLOW_LAUNCH=<run id>/<name>``
in its environment; every descendant inherits it, which is how ``cancel`` finds processes that
left the group (torchrun starts each worker in a new session). When the command ends, ``run``
writes ``<name>.status.json`` and, with ``--finalize``, ends the MLflow run if it is still
RUNNING and uploads ``<name>.log`` as the artifact ``fowlflow-logs/<name>.log``.

A supervisor killed outright (``kill -9``, the OOM killer) must not leave its command running
on its own: ``run`` also starts a ``reap`` process (no marker) that the kernel signals when
the supervisor dies (``PR_SET_PDEATHSIG``). If no status was recorded by then, it kills every
marked process, records FAILED and, with ``--finalize``, ends the MLflow run FAILED, so the
run has one state everywhere, and no trainer goes on to end it FINISHED later.

Files in the run dir, per node name: ``.pid``, ``.log``, ``.status.json``, ``.env.json`` (0600,
the environment including credentials; removed once the command has started). ``status``
says LOST only when both the supervisor and its reaper died without recording an end.
Only the standard library is imported at module level: MLflow is imported lazily when
finalizing, from whatever Python runs this file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

MARKER = "FOWLFLOW_LAUNCH"
GRACE_S = 10.0
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def _paths(run_dir: str, name: str) -> dict:
    base = os.path.join(run_dir, name)
    return {"pid": f"{base}.pid", "log": f"{base}.log", "status": f"{base}.status.json",
            "env": f"{base}.env.json", "reason": f"{base}.cancel-reason"}


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _log(path: str, msg: str) -> None:
    with open(path, "a") as fh:
        fh.write(f"[fowlflow] {msg}\n")


def marked_pids(marker_value: str) -> list[int]:
    """Pids of every process whose environment carries ``FOWLFLOW_LAUNCH=<marker_value>``."""
    needle = f"{MARKER}={marker_value}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read() + b"\0":
                    found.append(int(entry))
        except OSError:  # gone, or not ours to read
            continue
    return found


def kill_tree(marker_value: str, pgid: int | None, grace: float = GRACE_S,
              signals: tuple = (signal.SIGTERM, signal.SIGKILL)) -> None:
    """SIGTERM the command's process group and every marked process, then SIGKILL survivors
    (``signals=(SIGKILL,)``: at once, nothing gets to record an end of its own)."""
    for sig in signals:
        if pgid:
            try:
                os.killpg(pgid, sig)
            except OSError:
                pass
        for pid in marked_pids(marker_value):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            alive = marked_pids(marker_value)
            if pgid:
                try:
                    os.killpg(pgid, 0)
                    alive.append(pgid)
                except OSError:
                    pass
            if not alive:
                return
            _reap()
            time.sleep(0.1)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _on_parent_death(sig: int):
    """A ``preexec_fn``: the kernel sends ``sig`` to the child when its parent dies (Linux)."""
    def preexec():
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return preexec


def end_run_if_running(client, run_id: str, status: str) -> bool:
    """End the MLflow run with ``status`` unless it already ended; True if this call ended it.

    The one place a fowlflow process ends a run: the supervisor when its command ends, and
    the client (a failed launch, a dead supervisor, a cancel). It lives in this file because
    this file must run alone, with only the standard library and MLflow, on a remote host.
    """
    if client.get_run(run_id).info.status in TERMINAL:
        return False
    client.set_terminated(run_id, status)
    return True


def _finalize(run_id: str, state: str, log_path: str, set_status: bool) -> None:
    """End the MLflow run if it is still RUNNING and upload the log; never raise."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        if set_status:
            end_run_if_running(client, run_id, state)
        client.log_artifact(run_id, log_path, "fowlflow-logs")
    except Exception as exc:  # the log keeps the reason; the client reconciles the status
        _log(log_path, f"finalize failed: {type(exc).__name__}: {exc}")


def cmd_run(args) -> int:
    p = _paths(args.run_dir, args.name)
    _write_atomic(p["pid"], str(os.getpid()))
    env, marker = _command_env(args, p)
    state = {"cancelled": False}

    def on_signal(_signum, _frame):
        state["cancelled"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log = open(p["log"], "ab", buffering=0)
    child = None
    code = None
    reaper = _start_reaper(args, os.environ)
    try:
        child = subprocess.Popen(args.argv, cwd=args.cwd or None, env=env, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if os.path.exists(p["env"]):
            os.unlink(p["env"])  # credentials now live only in the processes' environment
        code = child.wait()
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # command not found, bad cwd
        _log(p["log"], f"could not start {args.argv[0]!r}: {exc}")
        code = 127
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    status = _end_status(p, state["cancelled"], child, code, marker)
    if os.path.exists(p["env"]):
        os.unlink(p["env"])
    if args.finalize or args.upload_log:
        _finalize(args.run_id, status, p["log"], set_status=args.finalize)
    _write_atomic(p["status"], json.dumps({"state": status, "exit_code": code,
                                           "ended": time.time()}))
    if reaper is not None:
        reaper.kill()
        reaper.wait()
    return 0 if status == "FINISHED" else 1


def _command_env(args, p: dict) -> tuple[dict, str]:
    """The command's environment (this process's, which gets the node's env file and
    ``--path-prepend`` too) and the marker that ``kill_tree`` finds its processes by."""
    if os.path.exists(p["env"]):
        with open(p["env"]) as fh:  # tracking URI, run id, credentials: for us and the child
            os.environ.update(json.load(fh))
    if args.path_prepend:  # the environment's bin dir before the host's own PATH
        os.environ["PATH"] = os.pathsep.join([args.path_prepend, os.environ.get("PATH", "")])
    env = dict(os.environ)
    marker = f"{args.run_id}/{args.name}"
    env[MARKER] = marker
    return env, marker


def _end_status(p: dict, cancelled: bool, child, code, marker: str) -> str:
    """Stop what is left of the command; the node's status (KILLED, FINISHED, FAILED, or the
    reason file's status when the run is being cancelled because another node failed)."""
    if cancelled:
        _log(p["log"], "cancelled: stopping every process of this run")
        kill_tree(marker, child.pid if child else None)
        if child is not None:
            child.poll()
        status = "KILLED"
        if os.path.exists(p["reason"]):  # cancelled because another node failed
            with open(p["reason"]) as fh:
                status = fh.read().strip() or status
    else:
        kill_tree(marker, None, grace=2.0)  # stragglers the command left behind
        status = "FINISHED" if code == 0 else "FAILED"
        if code != 0:
            _log(p["log"], f"command exited with code {code}")
        if code != 0 and os.path.exists(p["reason"]):  # the run is being cancelled: the
            with open(p["reason"]) as fh:              # command ended because a peer stopped
                status = fh.read().strip() or status
    return status


def _start_reaper(args, env: dict):
    """Start ``reap`` for this node (not marked, so ``kill_tree`` leaves it alone)."""
    argv = [sys.executable, os.path.abspath(__file__), "reap", "--run-dir", args.run_dir,
            "--name", args.name, "--run-id", args.run_id, "--parent", str(os.getpid())]
    argv += ["--finalize"] * args.finalize + ["--upload-log"] * args.upload_log
    try:
        return subprocess.Popen(argv, env={k: v for k, v in env.items() if k != MARKER},
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                preexec_fn=_on_parent_death(signal.SIGTERM))
    except OSError as exc:
        _log(_paths(args.run_dir, args.name)["log"], f"could not start the reaper: {exc}")
        return None


def cmd_reap(args) -> int:
    """Wait for the supervisor ``--parent`` to die; if it recorded no end, end the node."""
    died = {"yes": False}

    def on_signal(_signum, _frame):
        died["yes"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while not died["yes"] and os.getppid() == args.parent:  # the parent may already be gone
        time.sleep(1)
    time.sleep(0.5)  # a supervisor ending normally writes its status, then kills this process
    p = _paths(args.run_dir, args.name)
    if os.path.exists(p["status"]):
        return 0
    _log(p["log"], f"the supervisor (pid {args.parent}) was killed: stopping every process of "
                   "this node; the run ends FAILED")
    kill_tree(f"{args.run_id}/{args.name}", None, signals=(signal.SIGKILL,))
    if args.finalize or args.upload_log:
        _finalize(args.run_id, "FAILED", p["log"], set_status=args.finalize)
    _write_atomic(p["status"], json.dumps({"state": "FAILED", "exit_code": None,
                                           "ended": time.time(),
                                           "reason": "supervisor killed"}))
    return 0


def cmd_start(args) -> int:
    """Fork ``run`` into a new session with stdio on files, print its pid and return."""
    os.makedirs(args.run_dir, mode=0o700, exist_ok=True)
    p = _paths(args.run_dir, args.name)
    argv = [sys.executable, os.path.abspath(__file__), "run", "--run-dir", args.run_dir,
            "--name", args.name, "--run-id", args.run_id, "--cwd", args.cwd or "",
            "--path-prepend", args.path_prepend or ""]
    argv += ["--finalize"] * args.finalize + ["--upload-log"] * args.upload_log
    with open(p["log"], "ab") as log:
        proc = subprocess.Popen(argv + ["--", *args.argv], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True)
    print(json.dumps({"pid": proc.pid, "run_dir": os.path.abspath(args.run_dir),
                      "log": os.path.abspath(p["log"])}), flush=True)
    return 0


def read_status(run_dir: str, name: str) -> dict:
    """The node's state: RUNNING, FINISHED, FAILED, KILLED, or LOST (died unrecorded)."""
    p = _paths(run_dir, name)
    if os.path.exists(p["status"]):
        with open(p["status"]) as fh:
            return json.load(fh)
    pid = None
    if os.path.exists(p["pid"]):
        with open(p["pid"]) as fh:
            pid = int(fh.read().strip() or 0)
    if pid:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"supervise" in fh.read():
                    return {"state": "RUNNING", "pid": pid}
        except OSError:
            pass
        if os.path.exists(p["status"]):  # finished between the two checks
            return read_status(run_dir, name)
        return {"state": "LOST", "pid": pid, "exit_code": None}
    return {"state": "STARTING" if os.path.exists(p["log"]) else "UNKNOWN"}


def cmd_status(args) -> int:
    print(json.dumps(read_status(args.run_dir, args.name)), flush=True)
    return 0


def cmd_follow(args) -> int:
    """Copy the log from byte ``offset`` to stdout until the node has ended."""
    p = _paths(args.run_dir, args.name)
    out = sys.stdout.buffer
    offset = args.offset
    while True:
        state = read_status(args.run_dir, args.name)["state"]
        if os.path.exists(p["log"]):
            with open(p["log"], "rb") as fh:
                fh.seek(offset)
                while chunk := fh.read(65536):
                    out.write(chunk)
                    offset += len(chunk)
                out.flush()
        if state not in ("RUNNING", "STARTING"):
            return 0
        time.sleep(args.poll)


def cmd_cancel(args) -> int:
    """SIGTERM the supervisor (it kills the tree and records KILLED); clean up if it is gone."""
    status = read_status(args.run_dir, args.name)
    if status["state"] in ("RUNNING", "STARTING"):
        _write_atomic(_paths(args.run_dir, args.name)["reason"], args.state)
    if args.mark_only:  # every node is told first, then stopped: a node whose command ends
        return 0        # because a peer was stopped records the cancel, not FAILED
    if status["state"] == "RUNNING":
        os.kill(status["pid"], signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S + 15
        while time.monotonic() < deadline and read_status(args.run_dir, args.name)["state"] \
                == "RUNNING":
            time.sleep(0.2)
    lost = status["state"] == "LOST"  # no supervisor (nor reaper) to record an end: kill only
    kill_tree(f"{args.run_id}/{args.name}", None, grace=2.0,
              signals=(signal.SIGKILL,) if lost else (signal.SIGTERM, signal.SIGKILL))
    print(json.dumps(read_status(args.run_dir, args.name)), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="supervise")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("start", "run", "status", "follow", "cancel", "reap"):
        sp = sub.add_parser(name)
        sp.add_argument("--run-dir", required=True)
        sp.add_argument("--name", required=True)
        if name in ("start", "run", "cancel", "reap"):
            sp.add_argument("--run-id", required=True)
        if name == "reap":
            sp.add_argument("--parent", type=int, required=True)
            sp.add_argument("--finalize", action="store_true")
            sp.add_argument("--upload-log", action="store_true")
        if name in ("start", "run"):
            sp.add_argument("--cwd", default="")
            sp.add_argument("--path-prepend", default="")
            sp.add_argument("--finalize", action="store_true",
                            help="end the MLflow run if still RUNNING; upload the log")
            sp.add_argument("--upload-log", action="store_true", help="only upload the log")
            sp.add_argument("argv", nargs=argparse.REMAINDER)
        if name == "cancel":
            sp.add_argument("--state", choices=("KILLED", "FAILED"), default="KILLED",
                            help="how the run ends (FAILED when another node failed)")
            sp.add_argument("--mark-only", action="store_true",
                            help="only record that a cancel with --state is coming")
        if name == "follow":
            sp.add_argument("--offset", type=int, default=0)
            sp.add_argument("--poll", type=float, default=0.3)
    args = parser.parse_args(argv)
    if getattr(args, "argv", None) and args.argv[0] == "--":
        args.argv = args.argv[1:]
    return {"start": cmd_start, "run": cmd_run, "status": cmd_status, "follow": cmd_follow,
            "cancel": cmd_cancel, "reap": cmd_reap}[args.cmd](args)


if __name__ == "__main__":
    # no fowlflow.errors.exit_code here: this file runs alone on hosts without fowlflow, and
    # every error it reports is an exit status plus a line in the node's log
    sys.exit(main())
