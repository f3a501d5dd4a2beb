"""`mlflow models serve` on the ONNX champion: real process, real HTTP requests, real photos."""

from __future__ import annotations

import base64
import json
import os
import subprocess

import pytest
import requests

from tests.conftest import BIN, HYMENOPTERA, TURKEY
from tests.net import free_port, wait_http
from tests.registry.conftest import MODEL_NAME, hymenoptera_images


@pytest.fixture(scope="package")
def server(registered, store, tmp_path_factory):
    """`mlflow models serve -m models:/fowl-test-onnx@champion --env-manager local`."""
    from fowlflow.registry.promote import promote

    promote(MODEL_NAME, version=registered.version, policy="manual")
    port = free_port()
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
        wait_http(f"{url}/ping", timeout=120, proc=proc, log=log)
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


def test_a_bad_image_gets_its_own_error_and_the_batch_is_answered(server):
    # Decodable base64 that is no image: an error on its own row, the photo is classified.
    r = requests.post(f"{server}/invocations", timeout=60, json={"dataframe_split": {
        "columns": ["image"],
        "data": [[_b64(TURKEY)], [base64.b64encode(b"just some text").decode()]]}})
    assert r.status_code == 200, r.text
    good, bad = r.json()["predictions"]
    assert good["label"] in {"ants", "bees"} and good["error"] is None
    assert bad["label"] is None and bad["score"] is None
    assert bad["error"].startswith("item 1: 'anVzdCBzb21lIHRleHQ=' is not a readable image")
    # Not even base64, and a server-side path (never read from a request): errors too.
    r = requests.post(f"{server}/invocations", timeout=60, json={
        "inputs": ["%%% not base64 %%%", str(HYMENOPTERA / "val" / "ants"), _b64(TURKEY)]})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert "base64" in preds[0]["error"] and "base64" in preds[1]["error"]
    assert preds[2]["label"] == good["label"] and preds[2]["error"] is None


def test_a_64_photo_batch_with_one_bad_item_gets_a_small_per_item_answer(server):
    """Issue 8.11: this batch got a 9.9 MB 400 that echoed the request."""
    photos = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:63]
    assert len(photos) == 63
    inputs = [_b64(p) for p in photos]
    inputs.insert(17, base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode())
    request = json.dumps({"inputs": inputs})
    r = requests.post(f"{server}/invocations", timeout=120, data=request,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:2000]
    preds = r.json()["predictions"]
    assert len(preds) == 64
    assert [i for i, p in enumerate(preds) if p["error"]] == [17]
    assert "item 17:" in preds[17]["error"] and len(preds[17]["error"]) < 500
    assert len(request) > 2_000_000 and len(r.content) < 20_000  # no echo of the request


def test_an_empty_batch_gets_an_empty_answer(server):
    for body in ({"inputs": []}, {"dataframe_split": {"columns": ["image"], "data": []}}):
        r = requests.post(f"{server}/invocations", timeout=60, json=body)
        assert r.status_code == 200, r.text
        assert r.json() == {"predictions": []}


def test_a_request_without_images_gets_a_small_400_naming_the_fix(server):
    many = [_b64(p) for p in hymenoptera_images(5)] * 4  # ~2 MB that must not come back
    r = requests.post(f"{server}/invocations", timeout=60, json={"inputs": {"photos": many}})
    assert r.status_code == 400
    assert "the input dict has keys ['photos']; put the images under 'image'" in r.text
    assert len(r.content) < 20_000, len(r.content)
