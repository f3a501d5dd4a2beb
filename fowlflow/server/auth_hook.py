"""fowlflow's ``authorization_function`` for ``mlflow server --app-name basic-auth``.

MLflow's basic-auth app calls the function named in ``auth.ini`` before every request
(``authorization_function = fowlflow.server.auth_hook:authenticate``). This one runs
MLflow's own check (``authenticate_request_basic_auth``: password, login cache) and adds what
MLflow's permission model lacks; permissions themselves stay MLflow's:

- **throttling**: after ``max_failed_logins`` failed logins of one username from one address
  within ``failed_login_window_seconds``, further attempts get HTTP 429 with ``Retry-After``
  (the password is not even checked) until the oldest failure leaves the window. Counted per
  server worker process, so with W workers up to W x the limit fail before every worker
  refuses.
- **the read-only role**: a user holding MLflow's role ``read-only`` (``fowlflow server user
  add --read-only``) may not create experiments, registered models (or prompts) or AI-gateway
  objects (403); MLflow itself offers no "read but not create" unless workspaces are on.
- **attribution**: ``runs/create`` is stamped with the *authenticated* user (``user_id`` and
  the ``mlflow.user`` tag), not the client's OS user, and so is ``model-versions/create`` (the
  ``mlflow.user`` tag: MLflow's registry stores no user); new experiments get
  ``mlflow.experimentKind = custom_model_development`` unless the client set a kind.
- **the UI's defaults**: the UI starts in its "Model training" workflow (experiments open on
  their runs, not on traces) and doesn't pop up its assistant panel, unless the browser
  already chose otherwise.
- **a duplicate user**: ``users/create`` of an existing name answers 409 with a plain message
  (MLflow's own error embeds the SQL statement, including the password hash).

The ``[fowlflow]`` section of the same ``auth.ini`` configures the throttle.
"""

from __future__ import annotations

import collections
import configparser
import json
import math
import os
import threading
import time

from flask import Response, g, request

from fowlflow.server.users import READ_ONLY_ROLE

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# Creation routes gated by MLflow's "create in workspace" check (POST; /api/... and /ajax-api/...).
_CREATE_SUFFIXES = ("/mlflow/experiments/create", "/mlflow/registered-models/create",
                    "/mlflow/gateway/secrets/create", "/mlflow/gateway/endpoints/create",
                    "/mlflow/gateway/model-definitions/create")
# POST bodies the hook reads (and may rewrite before MLflow's handler parses them).
_JSON_REWRITES = ("/mlflow/runs/create", "/mlflow/model-versions/create",
                  "/mlflow/experiments/create", "/mlflow/users/create")
# UI defaults, kept by the UI in localStorage (mlflow's useLocalStorage: "<key>_v<version>"):
# the "Model training" workflow (runs, models) rather than GenAI (traces), and the assistant
# panel not opened by itself on the first visit. A choice made in the UI is kept.
_UI_DEFAULTS = {"mlflow.workflowType_v1": "machine_learning",
                "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True}
_UI_SCRIPT = ("<script>try{var d=%s;for(var k in d)if(localStorage.getItem(k)===null)"
              "localStorage.setItem(k,JSON.stringify(d[k]))}catch(e){}</script>"
              % json.dumps(_UI_DEFAULTS))


def _config() -> tuple[int, float]:
    cfg = configparser.ConfigParser()
    cfg.read(os.environ.get("MLFLOW_AUTH_CONFIG_PATH", ""))
    section = cfg["fowlflow"] if cfg.has_section("fowlflow") else {}
    return (int(section.get("max_failed_logins", 5)),
            float(section.get("failed_login_window_seconds", 60)))


class Throttle:
    """Failed-login timestamps per (username, address) in a sliding window."""

    def __init__(self, max_failures: int, window_s: float, max_keys: int = 10_000):
        self.max_failures, self.window_s, self.max_keys = max_failures, window_s, max_keys
        self._failures: dict[tuple, collections.deque] = {}
        self._lock = threading.Lock()

    def retry_after(self, key: tuple) -> int:
        """Seconds until ``key`` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            times = self._failures.get(key)
            if not times:
                return 0
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if len(times) < self.max_failures:
                return 0
            return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, key: tuple) -> None:
        now = time.monotonic()
        with self._lock:
            if key not in self._failures and len(self._failures) >= self.max_keys:
                self._prune(now)
            self._failures.setdefault(key, collections.deque(maxlen=self.max_failures)
                                      ).append(now)

    def succeeded(self, key: tuple) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _prune(self, now: float) -> None:
        stale = [k for k, t in self._failures.items() if not t or t[-1] <= now - self.window_s]
        for k in stale or list(self._failures)[: self.max_keys // 10]:
            del self._failures[k]


_THROTTLE = Throttle(*_config())


def _error(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return Response(json.dumps({"error_code": code, "message": message}), status=status,
                    mimetype="application/json", headers=headers)


def authenticate():
    """The ``authorization_function``: MLflow's basic-auth check plus fowlflow's rules.

    MLflow calls it several times per request (once per permission check), so the outcome is
    computed once and kept in ``flask.g``.
    """
    if "fowlflow_auth" not in g:
        g.fowlflow_auth = _authenticate_once()
    return g.fowlflow_auth


def _authenticate_once():
    from mlflow.server.auth import authenticate_request_basic_auth, make_basic_auth_response

    creds = request.authorization
    if creds is None:
        return make_basic_auth_response()
    key = (creds.username, request.remote_addr)
    wait = _THROTTLE.retry_after(key)
    if wait:
        return _error(429, "REQUEST_LIMIT_EXCEEDED",
                      f"too many failed logins for user {creds.username!r} from this address; "
                      f"try again in {wait} s with the right password (an admin can reset it "
                      "with `fowlflow server user password`)", {"Retry-After": str(wait)})
    result = authenticate_request_basic_auth()
    if isinstance(result, Response):
        _THROTTLE.failed(key)
        return result
    _THROTTLE.succeeded(key)
    return _apply_rules(result) or result


def _apply_rules(authorization) -> Response | None:
    """fowlflow's rules for an authenticated request; a Response refuses or replaces it."""
    from mlflow.server.auth import store

    path = request.path.rstrip("/")
    if request.method == "GET" and path == os.environ.get("_MLFLOW_STATIC_PREFIX", ""):
        return _ui_index()
    if request.method != "POST":
        return None
    username = authorization.username
    if path.endswith(_CREATE_SUFFIXES) and is_read_only(store, username):
        return _error(403, "PERMISSION_DENIED",
                      f"user {username!r} has the {READ_ONLY_ROLE} role and cannot create "
                      "experiments or registered models; ask the admin for write access "
                      f"(`fowlflow server user role {username} member`) or an EDIT grant on "
                      "an existing one")
    if not path.endswith(_JSON_REWRITES):  # never read other bodies (artifact uploads)
        return None
    body = request.get_json(force=True, silent=True)  # cached: MLflow's handler reads this dict
    if not isinstance(body, dict):
        return None
    if path.endswith(("/mlflow/runs/create", "/mlflow/model-versions/create")):
        # Who did it is the login, not what the client says (`mlflow run` sends the OS user).
        # MLflow's registry never stores a version's user ("Created by" stays empty there);
        # the tag at least records it.
        if path.endswith("/mlflow/runs/create"):
            body["user_id"] = username
        tags = [t for t in body.get("tags") or [] if t.get("key") != "mlflow.user"]
        body["tags"] = [*tags, {"key": "mlflow.user", "value": username}]
    elif path.endswith("/mlflow/experiments/create"):
        tags = body.setdefault("tags", [])
        if not any(t.get("key") == EXPERIMENT_KIND_TAG for t in tags):
            tags.append({"key": EXPERIMENT_KIND_TAG, "value": TRAINING_KIND})
    elif store.get_user(username).is_admin:  # users/create
        name = body.get("username")
        if name and store.has_user(name):
            return _error(409, "RESOURCE_ALREADY_EXISTS", f"user {name!r} already exists")
    return None


def is_read_only(store, username: str) -> bool:
    user = store.get_user(username)
    return any(role.name == READ_ONLY_ROLE for role in store.list_user_roles(user.id))


def _ui_index() -> Response:
    """MLflow's UI page, with fowlflow's defaults set before the UI reads them."""
    from mlflow.server import app

    html = open(os.path.join(app.static_folder, "index.html"), encoding="utf-8").read()
    return Response(html.replace("<head>", "<head>" + _UI_SCRIPT, 1), mimetype="text/html")
