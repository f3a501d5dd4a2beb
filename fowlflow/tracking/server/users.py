"""Accounts and permissions on a basic-auth MLflow server, as its admin.

Talks to the auth REST API with explicit HTTP basic credentials (not the process-wide
``MLFLOW_TRACKING_*`` variables, so a caller can act as admin and as a user side by side)::

    admin = AuthAdmin(stack.cfg.tracking_uri, "admin", admin_password)
    admin.create_user("alice", alice_password)
    admin.grant("alice", "experiment", experiment_id, "READ")
    admin.grant("alice", "registered_model", "fowl-classifier", "EDIT")

Permissions: READ (view), USE, EDIT (log, update), MANAGE (edit + grant), NO_PERMISSIONS.
"""

from __future__ import annotations

from fowlflow.errors import ServerError

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
RESOURCE_TYPES = ("experiment", "registered_model")


class AuthAdmin:
    """The admin side of basic-auth: create users, grant and revoke permissions."""

    def __init__(self, tracking_uri: str, username: str, password: str, timeout: float = 30):
        self.base = tracking_uri.rstrip("/")
        self._auth = (username, password)
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs) -> dict:
        import requests

        resp = requests.request(method, self.base + path, auth=self._auth,
                                timeout=self.timeout, **kwargs)
        if resp.status_code >= 400:
            raise ServerError(f"{method} {path} on {self.base} failed with HTTP "
                              f"{resp.status_code}: {resp.text[:500]}")
        return resp.json() if resp.content else {}

    def create_user(self, username: str, password: str) -> None:
        self._call("POST", "/api/2.0/mlflow/users/create",
                   json={"username": username, "password": password})

    def user_exists(self, username: str) -> bool:
        import requests

        resp = requests.get(self.base + "/api/2.0/mlflow/users/get",
                            params={"username": username}, auth=self._auth,
                            timeout=self.timeout)
        return resp.status_code == 200

    def grant(self, username: str, resource_type: str, resource_id: str,
              permission: str) -> None:
        """Give ``username`` ``permission`` on one experiment (id) or registered model (name).

        Replaces the user's existing grant on that resource, if any (the API has no update).
        """
        if resource_type not in RESOURCE_TYPES:
            raise ServerError(f"resource type {resource_type!r} is not one of {RESOURCE_TYPES}")
        if permission not in PERMISSIONS:
            raise ServerError(f"permission {permission!r} is not one of {PERMISSIONS}")
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
