"""`mlflow models serve` on the ONNX champion: real process, real HTTP requests, real photos."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time

import pytest
import requests

from tests.conftest import BIN, HYMENOPTERA, TURKEY
from tests.registry.conftest import MODEL_NAME, hymenoptera_images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def server(registered, store, tmp_path_factory):
    """`mlflow models serve -m models:/fowl-test-onnx@champion --env-manager local`."""
    from fowlflow.registry.promote import promote

    promote(MODEL_NAME, version=registered.version, policy="manual")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # The server execs `uvicorn` by name: the venv's bin must be on PATH (as when activated).
    env = {**os.environ, "MLFLOW_TRACKING_URI": store,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}-onnx@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path_factory.mktemp("cwd"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow models serve exited {proc.returncode}:\n"
                                     f"{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not up after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_turkey_photo_as_base64_in_dataframe_split(server):
    r = requests.post(f"{server}/invocations", timeout=60, json={
        "dataframe_split": {"columns": ["image"], "data": [[_b64(TURKEY)]]}})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert pred["label"] in {"ants", "bees"}
    assert set(pred["probabilities"]) == {"ants", "bees"}
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-5
    assert pred["score"] == max(pred["probabilities"].values())


def test_a_batch_of_hymenoptera_photos_as_inputs(server):
    photos = hymenoptera_images(2)
    r = requests.post(f"{server}/invocations", timeout=60,
                      json={"inputs": [_b64(p) for p in photos]})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == len(photos)


def test_a_non_image_gets_400_and_the_server_keeps_serving(server):
    # Decodable base64 that is no image: our ImageDecodeError, naming the item.
    r = requests.post(f"{server}/invocations", timeout=60, json={"dataframe_split": {
        "columns": ["image"],
        "data": [[_b64(TURKEY)], [base64.b64encode(b"just some text").decode()]]}})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "item 1: 14 bytes b'just some te' is not a readable image" in body["message"]
    # Not even base64: MLflow's own input parsing answers 400 before the model runs.
    r = requests.post(f"{server}/invocations", timeout=60, json={
        "dataframe_split": {"columns": ["image"], "data": [["%%% not base64 %%%"]]}})
    assert r.status_code == 400 and "base64" in r.json()["message"]
    # A server-side path is not read from a request.
    r = requests.post(f"{server}/invocations", timeout=60,
                      json={"inputs": [str(HYMENOPTERA / "val" / "ants")]})
    assert r.status_code == 400
    ok = requests.post(f"{server}/invocations", timeout=60, json={"inputs": [_b64(TURKEY)]})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 1
