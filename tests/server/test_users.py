"""Users, roles and permissions through the CLI, enforced by the real server.

DENY and revoke, the read-only role (no creating), the failed-login throttle (429 +
Retry-After), a duplicate user (a clear message, no password hash) and password changes; plus
what fowlflow's auth hook records: the authenticated user on every run and the training kind
on every new experiment.
"""

from __future__ import annotations

import secrets
import subprocess

import pytest
import requests

from tests.conftest import BIN
from tests.server.conftest import fowlflow

API = "/api/2.0/mlflow"


def _state(stack) -> list[str]:
    return ["--state-dir", str(stack.cfg.state_dir)]


def _cli_with_password(stack, *args: str, password: str) -> subprocess.CompletedProcess:
    """``fowlflow server user ...`` with the password on stdin (as from a script)."""
    return subprocess.run([str(BIN / "fowlflow"), "server", "user", *args, *_state(stack)],
                          input=password + "\n", capture_output=True, text=True, timeout=120)


def _new_user(stack, name: str, *extra: str) -> tuple[str, str]:
    password = secrets.token_urlsafe(16)
    proc = _cli_with_password(stack, "add", name, *extra, password=password)
    assert proc.returncode == 0, proc.stderr
    return name, password


def _post(stack, path: str, auth, **body) -> requests.Response:
    return requests.post(stack.cfg.tracking_uri + path, json=body, auth=auth, timeout=30)


def _get(stack, path: str, auth, **params) -> requests.Response:
    return requests.get(stack.cfg.tracking_uri + path, params=params, auth=auth, timeout=30)


@pytest.fixture(scope="module")
def experiment(stack):
    auth = (stack.secrets.admin_username, stack.secrets.admin_password)
    resp = _post(stack, f"{API}/experiments/create", auth, name=f"users-{secrets.token_hex(3)}")
    assert resp.status_code == 200, resp.text
    return resp.json()["experiment_id"]


def test_cli_offers_exactly_mlflows_grantable_permissions():
    from mlflow.server.auth.permissions import RESOURCE_GRANTABLE_PERMISSIONS

    from fowlflow.server.users import PERMISSIONS

    assert set(PERMISSIONS) == set(RESOURCE_GRANTABLE_PERMISSIONS)
    assert "NO_PERMISSIONS" not in PERMISSIONS


def test_deny_blocks_reading_and_revoke_restores_the_default(stack, experiment):
    user = _new_user(stack, "denied-user")
    assert _get(stack, f"{API}/experiments/get", user, experiment_id=experiment).status_code == 200
    out = fowlflow("server", "grant", *_state(stack), user[0], "experiment", experiment, "DENY")
    assert "granted DENY" in out.stdout
    got = _get(stack, f"{API}/experiments/get", user, experiment_id=experiment)
    assert got.status_code == 403, got.text
    # ...and the search leaves it out.
    found = _post(stack, f"{API}/experiments/search", user, max_results=1000).json()
    assert experiment not in [e["experiment_id"] for e in found.get("experiments", [])]

    fowlflow("server", "revoke", *_state(stack), user[0], "experiment", experiment)
    assert _get(stack, f"{API}/experiments/get", user, experiment_id=experiment).status_code == 200


def test_no_permissions_is_refused_by_the_cli_with_the_choices(stack, experiment):
    proc = fowlflow("server", "grant", *_state(stack), "admin", "experiment", experiment,
                    "NO_PERMISSIONS", check=False)
    assert proc.returncode == 2
    assert "DENY" in proc.stderr and "READ" in proc.stderr


def test_read_only_user_reads_but_cannot_create(stack, experiment):
    user = _new_user(stack, "viewer", "--read-only")
    assert _get(stack, f"{API}/experiments/get", user, experiment_id=experiment).status_code == 200
    created = _post(stack, f"{API}/experiments/create", user, name="viewer-exp")
    assert created.status_code == 403, created.text
    assert "read-only" in created.json()["message"]
    model = _post(stack, f"{API}/registered-models/create", user, name="viewer-model")
    assert model.status_code == 403, model.text
    # The UI's routes (/ajax-api) are the same rule.
    ajax = _post(stack, "/ajax-api/2.0/mlflow/experiments/create", user, name="viewer-exp2")
    assert ajax.status_code == 403
    run = _post(stack, f"{API}/runs/create", user, experiment_id=experiment)
    assert run.status_code == 403  # default READ: no logging either

    # Only READ or DENY grants fit the role: the CLI says how to change the role instead.
    refused = fowlflow("server", "grant", *_state(stack), user[0], "experiment", experiment,
                       "EDIT", check=False)
    assert refused.returncode != 0
    assert "read-only" in refused.stderr and "user role viewer member" in refused.stderr

    fowlflow("server", "user", "role", *_state(stack), user[0], "member")
    created = _post(stack, f"{API}/experiments/create", user, name="viewer-exp")
    assert created.status_code == 200, created.text
    fowlflow("server", "user", "role", *_state(stack), user[0], "read-only")
    again = _post(stack, f"{API}/registered-models/create", user, name="viewer-model")
    assert again.status_code == 403


def test_repeated_wrong_passwords_are_throttled(stack):
    from fowlflow.server.mlflow_server import MAX_FAILED_LOGINS

    user, password = _new_user(stack, "throttled-user")
    statuses, limited = [], None
    for _ in range(20):
        resp = _get(stack, f"{API}/experiments/search", (user, "wrong-" + password),
                    max_results=1)
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            limited = resp
            break
    assert limited is not None, f"20 wrong passwords, never throttled: {statuses}"
    assert statuses[0] == 401
    # Counted per worker: each of the server's workers refuses after MAX_FAILED_LOGINS.
    assert MAX_FAILED_LOGINS <= len(statuses) - 1 <= MAX_FAILED_LOGINS * stack.cfg.workers
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert "too many failed logins" in limited.json()["message"]
    assert password not in limited.text
    # Another user from the same address is not affected.
    admin = (stack.secrets.admin_username, stack.secrets.admin_password)
    assert _get(stack, f"{API}/experiments/search", admin, max_results=1).status_code == 200


def test_duplicate_user_gets_a_clear_message_and_no_hash(stack):
    user, first = _new_user(stack, "dup-user")
    second = secrets.token_urlsafe(16)
    proc = _cli_with_password(stack, "add", user, password=second)
    assert proc.returncode != 0
    assert ("user dup-user already exists; to give it a new password run "
            "`fowlflow server user password dup-user`") in proc.stderr
    # MLflow's own error embeds the INSERT with the password hash (scrypt:/pbkdf2:).
    for text in (proc.stdout, proc.stderr):
        assert "scrypt" not in text and "pbkdf2" not in text and second not in text
    # The API answers the same without the hash (the hook, before MLflow's INSERT).
    admin = (stack.secrets.admin_username, stack.secrets.admin_password)
    resp = _post(stack, f"{API}/users/create", admin, username=user, password=second)
    assert resp.status_code == 409, resp.text
    assert "already exists" in resp.text and "scrypt" not in resp.text
    assert "pbkdf2" not in resp.text


def test_user_password_changes_the_password(stack):
    user, old = _new_user(stack, "rotating-user")
    new = secrets.token_urlsafe(16)
    proc = _cli_with_password(stack, "password", user, password=new)
    assert proc.returncode == 0, proc.stderr
    assert _get(stack, f"{API}/users/current", (user, new)).status_code == 200
    # The old one may still be cached by a worker for auth_cache_ttl_seconds; a never-cached
    # worker refuses it. Only the new one is certain to work.
    missing = _cli_with_password(stack, "password", "no-such-user", password=new)
    assert missing.returncode != 0 and "fowlflow server user add no-such-user" in missing.stderr


def test_runs_record_the_authenticated_user_and_experiments_the_training_kind(stack):
    user = _new_user(stack, "author")
    exp = _post(stack, f"{API}/experiments/create", user, name=f"author-{secrets.token_hex(3)}")
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment_id"]
    tags = _get(stack, f"{API}/experiments/get", user, experiment_id=exp_id
                ).json()["experiment"]["tags"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in tags

    # A client that claims to be someone else (as `mlflow run` does with the OS user).
    run = _post(stack, f"{API}/runs/create", user, experiment_id=exp_id, user_id="root",
                tags=[{"key": "mlflow.user", "value": "root"}]).json()["run"]
    assert run["info"]["user_id"] == "author"
    assert {"key": "mlflow.user", "value": "author"} in run["data"]["tags"]
    assert [t for t in run["data"]["tags"] if t["key"] == "mlflow.user"] == [
        {"key": "mlflow.user", "value": "author"}]


def test_start_renews_an_older_auth_ini_and_keeps_the_throttle_settings(stack):
    """``fowlflow server start`` rewrites auth.ini, so a server home made before the server
    package moved (its auth.ini names ``fowlflow.tracking.server.auth_hook``, which no longer
    exists) starts with the hook's current path; an admin's ``[fowlflow]`` edit is kept and
    enforced (the 429 comes from the hook, so the hook is loaded)."""
    import importlib.util

    from fowlflow.server.mlflow_server import AUTH_HOOK

    old_hook = "fowlflow.tracking.server.auth_hook:authenticate"
    assert importlib.util.find_spec("fowlflow.tracking.server") is None
    ini = stack.mlflow.auth_config
    original = ini.read_text()
    assert f"authorization_function = {AUTH_HOOK}\n" in original
    user, password = _new_user(stack, "strict-user")
    try:
        ini.write_text(original.replace(AUTH_HOOK, old_hook)
                       .replace("max_failed_logins = 5", "max_failed_logins = 1"))
        stack.stop_component("mlflow")
        fowlflow("server", "start", *_state(stack))
        renewed = ini.read_text()
        assert f"authorization_function = {AUTH_HOOK}\n" in renewed and old_hook not in renewed
        assert "max_failed_logins = 1" in renewed
        statuses = []
        for _ in range(stack.cfg.workers + 1):  # each worker refuses after its 1st failure
            statuses.append(_get(stack, f"{API}/experiments/search",
                                 (user, "wrong-" + password), max_results=1).status_code)
            if statuses[-1] == 429:
                break
        assert statuses[0] == 401 and statuses[-1] == 429, statuses
    finally:
        ini.write_text(original)
        stack.stop_component("mlflow")
        stack.start_component("mlflow")
    assert "max_failed_logins = 5" in ini.read_text()
