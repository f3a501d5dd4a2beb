"""``fowlflow server ...``: start, stop and inspect the team tracking stack; manage users.

    fowlflow server start [--state-dir D] [--port 5000] [--s3-port 8333] [--postgres-port 5433]
    fowlflow server status
    eval "$(fowlflow server env)"          # point this shell's MLflow clients at the server
    fowlflow server stop
    fowlflow server user add alice         # password read from the terminal (or stdin)
    fowlflow server user add viewer --read-only
    fowlflow server user password alice    # a new password (terminal or stdin)
    fowlflow server user role viewer member
    fowlflow server grant alice experiment 1 EDIT
    fowlflow server revoke alice experiment 1

The state directory (default ``$FOWLFLOW_SERVER_HOME``, else ``~/.fowlflow/server``; as root
``/var/lib/fowlflow/server``) keeps data, ports and secrets across
restarts; ``stop`` stops only the processes that ``start`` recorded there.
"""

from __future__ import annotations

import argparse
import getpass
import shlex
import sys
from pathlib import Path

from fowlflow.errors import ServerError


def _stack(args, *, create: bool = False):
    from fowlflow.server.config import StackConfig
    from fowlflow.server.stack import Stack

    from fowlflow.server.config import default_state_dir

    state_dir = Path(args.state_dir).absolute() if args.state_dir else default_state_dir()
    if not create and not (state_dir / "ports.json").exists():
        raise ServerError(f"no server state in {state_dir}; start one with "
                          f"`fowlflow server start --state-dir {state_dir}`, or point "
                          "--state-dir or FOWLFLOW_SERVER_HOME at an existing one")
    cfg = StackConfig.load(state_dir, mlflow_port=getattr(args, "port", None),
                           postgres_port=getattr(args, "postgres_port", None),
                           s3_port=getattr(args, "s3_port", None),
                           workers=getattr(args, "workers", 2))
    return Stack(cfg)


def cmd_start(args) -> int:
    stack = _stack(args, create=True)
    stack.start()
    print(f"fowlflow server running at {stack.cfg.tracking_uri} (state in {stack.cfg.state_dir})")
    print(f"  admin user: {stack.secrets.admin_username}; password in "
          f"{stack.cfg.secrets_dir / 'admin_password'}")
    where = f" --state-dir {shlex.quote(args.state_dir)}" if args.state_dir else ""
    print(f"  use it:     eval \"$(fowlflow server env{where})\"")
    return 0


def cmd_stop(args) -> int:
    stopped = _stack(args).stop()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args) -> int:
    stack = _stack(args)
    rows = stack.status()
    for s in rows:
        state = s.state
        print(f"{s.name:9s} {state:22s} {s.address}")
    return 0 if all(s.running for s in rows) else 3


def cmd_env(args) -> int:
    """Print shell exports; the password is read from its 0600 file when evaluated."""
    from fowlflow.server.mlflow_server import CLIENT_RETRY_ENV

    stack = _stack(args)
    pw_file = stack.cfg.secrets_dir / "admin_password"
    print(f"export MLFLOW_TRACKING_URI={shlex.quote(stack.cfg.tracking_uri)}")
    print(f"export MLFLOW_TRACKING_USERNAME={shlex.quote(stack.secrets.admin_username)}")
    print(f"export MLFLOW_TRACKING_PASSWORD=\"$(cat {shlex.quote(str(pw_file))})\"")
    for name, value in CLIENT_RETRY_ENV.items():  # ride out a server restart
        print(f"export {name}={value}")
    if args.s3:
        # Only for reading `s3://` datasets from this server's S3; artifacts never need it.
        creds = stack.cfg.secrets_dir / "secrets.json"
        py = shlex.quote(sys.executable)
        print(f"export AWS_ENDPOINT_URL_S3={shlex.quote(stack.cfg.s3_endpoint)}")
        print(f"export AWS_ACCESS_KEY_ID={shlex.quote(stack.secrets.s3_access_key)}")
        print(f"export AWS_SECRET_ACCESS_KEY=\"$({py} -c 'import json,sys; print(json.load("
              f"open(sys.argv[1]))[\"s3_secret_key\"])' {shlex.quote(str(creds))})\"")
    return 0


def _admin(args):
    from fowlflow.server.users import AuthAdmin

    stack = _stack(args)
    return AuthAdmin(stack.cfg.tracking_uri, stack.secrets.admin_username,
                     stack.secrets.admin_password)


def _read_password(username: str) -> str:
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 12:
        raise ServerError("the password must have at least 12 characters")
    return password


def cmd_user_add(args) -> int:
    admin = _admin(args)
    if admin.user_exists(args.username):  # before asking for a password
        raise ServerError(f"user {args.username} already exists; to give it a new password "
                          f"run `fowlflow server user password {args.username}`")
    admin.create_user(args.username, _read_password(args.username), read_only=args.read_only)
    print(f"created user {args.username}" + (" (read-only)" if args.read_only else ""))
    return 0


def cmd_user_password(args) -> int:
    _admin(args).set_password(args.username, _read_password(args.username))
    print(f"changed the password of {args.username}")
    return 0


def cmd_user_role(args) -> int:
    _admin(args).set_role(args.username, args.role)
    print(f"{args.username} is now {args.role}")
    return 0


def cmd_grant(args) -> int:
    _admin(args).grant(args.username, args.resource_type, args.resource_id, args.permission)
    print(f"granted {args.permission} on {args.resource_type} {args.resource_id} "
          f"to {args.username}")
    return 0


def cmd_revoke(args) -> int:
    _admin(args).revoke(args.username, args.resource_type, args.resource_id)
    print(f"revoked the grant of {args.username} on {args.resource_type} {args.resource_id}; "
          "the default (READ) applies")
    return 0


def register(subparsers) -> None:
    """Add ``server`` and its sub-commands to the ``fowlflow`` CLI."""
    from fowlflow.server.users import PERMISSIONS, RESOURCE_TYPES, ROLES

    server = subparsers.add_parser("server", help="the team tracking server stack",
                                   description=__doc__.split("\n\n")[0])
    sub = server.add_subparsers(dest="server_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=None,
                        help="data, ports, secrets and pids (default: $FOWLFLOW_SERVER_HOME, "
                             "else ~/.fowlflow/server; as root /var/lib/fowlflow/server)")

    start = sub.add_parser("start", parents=[common], help="start (or complete) the stack")
    start.add_argument("--port", type=int, help="mlflow server port (first start: 5000)")
    start.add_argument("--s3-port", type=int, help="S3 port (first start: 8333)")
    start.add_argument("--postgres-port", type=int, help="PostgreSQL port (first start: 5433)")
    start.add_argument("--workers", type=int, default=2, help="mlflow server workers")
    start.set_defaults(func=cmd_start)

    sub.add_parser("stop", parents=[common], help="stop what `start` started"
                   ).set_defaults(func=cmd_stop)
    sub.add_parser("status", parents=[common], help="pids and addresses (exit 3 if not all up)"
                   ).set_defaults(func=cmd_status)
    env = sub.add_parser("env", parents=[common], help="shell exports for MLflow clients")
    env.add_argument("--s3", action="store_true",
                     help="also S3 endpoint and keys (to read s3:// datasets)")
    env.set_defaults(func=cmd_env)

    user = sub.add_parser("user", help="manage accounts").add_subparsers(
        dest="user_command", required=True)
    add = user.add_parser("add", parents=[common], help="create a user (password on stdin)")
    add.add_argument("username")
    add.add_argument("--read-only", action="store_true",
                     help="may read everything but create no experiment or model")
    add.set_defaults(func=cmd_user_add)
    pw = user.add_parser("password", parents=[common], help="set a user's password (stdin)")
    pw.add_argument("username")
    pw.set_defaults(func=cmd_user_password)
    role = user.add_parser("role", parents=[common],
                           help="read-only (no creating) or member (may create)")
    role.add_argument("username")
    role.add_argument("role", choices=ROLES)
    role.set_defaults(func=cmd_user_role)

    grant = sub.add_parser("grant", parents=[common],
                           help="give a user a permission on an experiment or registered model")
    revoke = sub.add_parser("revoke", parents=[common],
                            help="remove a user's grant on an experiment or registered model")
    for p in (grant, revoke):
        p.add_argument("username")
        p.add_argument("resource_type", choices=RESOURCE_TYPES)
        p.add_argument("resource_id", help="experiment id or registered model name")
    grant.add_argument("permission", choices=PERMISSIONS,
                       help="DENY: no access at all; READ: view; USE: view and use; "
                            "EDIT: log, register; MANAGE: edit, delete, grant")
    grant.set_defaults(func=cmd_grant)
    revoke.set_defaults(func=cmd_revoke)
