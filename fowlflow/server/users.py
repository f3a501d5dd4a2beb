"""Accounts, roles and permissions on a basic-auth MLflow server, as its admin.

Talks to the auth REST API with explicit HTTP basic credentials (not the process-wide
``MLFLOW_TRACKING_*`` variables, so a caller can act as admin and as a user side by side)::

    admin = AuthAdmin(stack.cfg.tracking_uri, "admin", admin_password)
    admin.create_user("alice", alice_password)
    admin.create_user("viewer", viewer_password, read_only=True)   # can't create anything
    admin.grant("alice", "experiment", experiment_id, "READ")
    admin.grant("alice", "registered_model", "fowl-classifier", "EDIT")
    admin.grant("bob", "experiment", experiment_id, "DENY")          # not even read
    admin.revoke("bob", "experiment", experiment_id)                  # back to the default

Permissions are MLflow's own (``mlflow.server.auth.permissions``): READ (view), USE, EDIT
(log, update), MANAGE (edit + delete + grant) and DENY (no access, overriding the default).
The read-only role is MLflow's role ``read-only``, which fowlflow's auth hook
(:mod:`fowlflow.server.auth_hook`) reads.
"""

from __future__ import annotations

from fowlflow.errors import ServerError

# MLflow 3.17 accepts these on a single experiment or registered model (its
# RESOURCE_GRANTABLE_PERMISSIONS; NO_PERMISSIONS is refused): weakest first.
PERMISSIONS = ("DENY", "READ", "USE", "EDIT", "MANAGE")
RESOURCE_TYPES = ("experiment", "registered_model")
READ_ONLY_ROLE = "read-only"  # an MLflow role; the auth hook refuses its holders any create
ROLES = (READ_ONLY_ROLE, "member")
_WORKSPACE = "default"  # where grants and roles live while MLflow workspaces are off


class AuthAdmin:
    """The admin side of basic-auth: users, the read-only role, grants."""

    def __init__(self, tracking_uri: str, username: str, password: str, timeout: float = 30):
        self.base = tracking_uri.rstrip("/")
        self._auth = (username, password)
        self.timeout = timeout

    def _call(self, method: str, path: str, *, quiet: bool = False, **kwargs) -> dict:
        """One API call; ``quiet``: leave the server's text out of the error (it may echo
        what was sent, e.g. a password hash)."""
        import requests

        resp = requests.request(method, self.base + path, auth=self._auth,
                                timeout=self.timeout, **kwargs)
        if resp.status_code >= 400:
            try:
                code = resp.json().get("error_code", "")
            except ValueError:
                code = ""
            detail = code if quiet else resp.text[:500]
            raise ServerError(f"{method} {path} on {self.base} failed with HTTP "
                              f"{resp.status_code}: {detail}")
        return resp.json() if resp.content else {}

    def create_user(self, username: str, password: str, *, read_only: bool = False) -> None:
        """Create ``username``; with ``read_only`` it gets the read-only role.

        Raises:
            ServerError: the user exists (use :meth:`set_password`), or the server refused.
        """
        if self.user_exists(username):
            raise ServerError(f"user {username} already exists; to give it a new password run "
                              f"`fowlflow server user password {username}`")
        self._call("POST", "/api/2.0/mlflow/users/create", quiet=True,
                   json={"username": username, "password": password})
        if read_only:
            self.set_role(username, READ_ONLY_ROLE)

    def set_password(self, username: str, password: str) -> None:
        if not self.user_exists(username):
            raise ServerError(f"there is no user {username}; create it with "
                              f"`fowlflow server user add {username}`")
        self._call("PATCH", "/api/2.0/mlflow/users/update-password", quiet=True,
                   json={"username": username, "password": password})

    def user_exists(self, username: str) -> bool:
        import requests

        resp = requests.get(self.base + "/api/2.0/mlflow/users/get",
                            params={"username": username}, auth=self._auth,
                            timeout=self.timeout)
        return resp.status_code == 200

    # -- the read-only role --------------------------------------------------------------------
    def _read_only_role_id(self, create: bool) -> int | None:
        roles = self._call("GET", "/api/3.0/mlflow/roles/list",
                           params={"workspace": _WORKSPACE})["roles"]
        for role in roles:
            if role["name"] == READ_ONLY_ROLE:
                return int(role["id"])
        if not create:
            return None
        role = self._call("POST", "/api/3.0/mlflow/roles/create", json={
            "name": READ_ONLY_ROLE, "workspace": _WORKSPACE,
            "description": "fowlflow: reads every experiment and model, creates none"})["role"]
        for resource_type in RESOURCE_TYPES:
            self._call("POST", "/api/3.0/mlflow/roles/permissions/add", json={
                "role_id": role["id"], "resource_type": resource_type,
                "resource_pattern": "*", "permission": "READ"})
        return int(role["id"])

    def role(self, username: str) -> str:
        """``"read-only"`` or ``"member"`` (may create experiments and models)."""
        roles = self._call("GET", "/api/3.0/mlflow/users/roles/list",
                           params={"username": username})["roles"]
        return READ_ONLY_ROLE if any(r["name"] == READ_ONLY_ROLE for r in roles) else "member"

    def set_role(self, username: str, role: str) -> None:
        if role not in ROLES:
            raise ServerError(f"role {role!r} is not one of {ROLES}")
        if self.role(username) == role:
            return
        role_id = self._read_only_role_id(create=role == READ_ONLY_ROLE)
        action = ("POST", "assign") if role == READ_ONLY_ROLE else ("DELETE", "unassign")
        self._call(action[0], f"/api/3.0/mlflow/roles/{action[1]}",
                   json={"username": username, "role_id": role_id})

    # -- grants --------------------------------------------------------------------------------
    def grant(self, username: str, resource_type: str, resource_id: str,
              permission: str) -> None:
        """Give ``username`` ``permission`` on one experiment (id) or registered model (name).

        Replaces the user's existing grant on that resource, if any (the API has no update).
        A read-only user can be given READ or DENY only.
        """
        if resource_type not in RESOURCE_TYPES:
            raise ServerError(f"resource type {resource_type!r} is not one of {RESOURCE_TYPES}")
        if permission not in PERMISSIONS:
            raise ServerError(f"permission {permission!r} is not one of {PERMISSIONS}")
        if permission not in ("READ", "DENY") and self.role(username) == READ_ONLY_ROLE:
            raise ServerError(f"user {username} has the {READ_ONLY_ROLE} role, which only READ "
                              f"or DENY grants fit; to let it write run `fowlflow server user "
                              f"role {username} member` first")
        body = {"username": username, "resource_type": resource_type,
                "resource_id": str(resource_id), "permission": permission}
        try:
            self._call("POST", "/api/3.0/mlflow/users/permissions/grant", json=body)
        except ServerError as exc:
            if "RESOURCE_ALREADY_EXISTS" not in exc.message:
                raise
            self.revoke(username, resource_type, resource_id)
            self._call("POST", "/api/3.0/mlflow/users/permissions/grant", json=body)

    def revoke(self, username: str, resource_type: str, resource_id: str) -> None:
        self._call("POST", "/api/3.0/mlflow/users/permissions/revoke",
                   json={"username": username, "resource_type": resource_type,
                         "resource_id": str(resource_id)})
