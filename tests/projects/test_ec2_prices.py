"""The on-demand price from the AWS Pricing API, and the table when the API gives none.

moto does not emulate the Pricing API, and this machine has no internet, so a minimal local
HTTP endpoint stands in for it (moto's server mode stands in for EC2, SSM and STS in the
launch test): it answers boto3's JSON-1.1 ``AWSPriceListService.GetProducts``
POST with a PriceList as AWS returns it (each product a JSON string), or with AccessDenied, or
with an empty PriceList, or not at all. boto3 itself (real signing, real parsing) reaches it
through ``AWS_ENDPOINT_URL_PRICING``; nothing in boto3 is patched::

    .venv/bin/python -m pytest tests/projects/test_ec2_prices.py
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects.ec2 import Ec2Backend
from fowlflow.projects.ec2_config import parse_ec2_config
from fowlflow.projects.ec2_prices import (API_SOURCE, TABLE_SOURCE, describe, hourly_price,
                                          on_demand_price)
from tests.conftest import ROOT
from tests.projects.ec2_moto import aws, ec2_config, moto_url  # noqa: F401
from tests.net import free_port

SECRET = "fake-secret-key-do-not-print"


def launch(aws, tmp_path, **cfg):
    return Ec2Backend().run(str(ROOT), "main", {}, None, ec2_config(aws, **cfg),
                            f"sqlite:///{tmp_path / 'mlflow.db'}", "0")


def product(instance_type: str, region: str, usd: str) -> str:
    """One PriceList entry, shaped (and serialised) as the Pricing API returns it."""
    sku = "JRTCKXETXF7XQ3WA"
    return json.dumps({
        "product": {"productFamily": "Compute instance", "sku": sku, "attributes": {
            "instanceType": instance_type, "regionCode": region, "operatingSystem": "Linux",
            "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used",
            "gpu": "1", "vcpu": "4", "memory": "32 GiB", "servicecode": "AmazonEC2"}},
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {f"{sku}.JRTCKXETXF": {
            "offerTermCode": "JRTCKXETXF", "sku": sku, "effectiveDate": "2025-11-01T00:00:00Z",
            "termAttributes": {},
            "priceDimensions": {f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                "unit": "Hrs", "endRange": "Inf", "beginRange": "0",
                "description": f"${usd} per On Demand Linux {instance_type} Instance Hour",
                "rateCode": f"{sku}.JRTCKXETXF.6YS6EN2CT7", "appliesTo": [],
                "pricePerUnit": {"USD": usd}}}}}},
        "version": "20251101000000", "publicationDate": "2025-11-01T00:00:00Z"})


class FakePricing:
    """The local GetProducts endpoint; ``mode`` picks its answer, ``requests`` what it got."""

    def __init__(self):
        self.mode, self.requests = "price", []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"target": self.headers.get("X-Amz-Target"),
                                      "authorization": self.headers.get("Authorization", ""),
                                      "body": body})
                if fake.mode == "hang":
                    time.sleep(8)
                    return
                if fake.mode == "denied":
                    status, reply = 400, {
                        "__type": "AccessDeniedException",
                        "Message": "User: arn:aws:iam::123456789012:user/ci is not authorized "
                                   "to perform: pricing:GetProducts"}
                else:
                    filters = {f["Field"]: f["Value"] for f in body.get("Filters", [])}
                    plist = [] if fake.mode == "empty" else [
                        product(filters["instanceType"], filters["regionCode"], "2.0450000000")]
                    status, reply = 200, {"FormatVersion": "aws_v1", "PriceList": plist}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def session(monkeypatch, tmp_path):
    """A boto3 session with test credentials and no AWS config of this machine's."""
    import boto3

    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return boto3.Session(aws_access_key_id="AKIATESTPRICING", aws_secret_access_key=SECRET,
                         region_name="eu-west-1")


@pytest.fixture
def pricing(monkeypatch):
    fake = FakePricing()
    monkeypatch.setenv("AWS_ENDPOINT_URL_PRICING", fake.url)
    yield fake
    fake.close()


def test_price_from_the_pricing_api_with_the_run_filters(session, pricing):
    price, source = on_demand_price(session, "g6e.xlarge", "eu-west-1")
    assert (price, source) == (2.045, API_SOURCE)
    [req] = pricing.requests
    assert req["target"] == "AWSPriceListService.GetProducts"
    assert req["body"]["ServiceCode"] == "AmazonEC2"
    filters = {f["Field"]: (f["Type"], f["Value"]) for f in req["body"]["Filters"]}
    assert filters == {"instanceType": ("TERM_MATCH", "g6e.xlarge"),
                       "regionCode": ("TERM_MATCH", "eu-west-1"),
                       "operatingSystem": ("TERM_MATCH", "Linux"),
                       "tenancy": ("TERM_MATCH", "Shared"),
                       "preInstalledSw": ("TERM_MATCH", "NA"),
                       "capacitystatus": ("TERM_MATCH", "Used")}
    assert "us-east-1/pricing/aws4_request" in req["authorization"]  # signed for us-east-1
    assert describe("g6e.xlarge", 2, price, False, source) == (
        "2 x g6e.xlarge (on-demand, ~$2.045/h each, ~$4.09/h in all; Pricing API)")


@pytest.mark.parametrize("mode", ["down", "denied", "empty", "hang"])
def test_no_api_price_falls_back_to_the_table_quickly(session, pricing, mode, caplog, capsys,
                                                     monkeypatch):
    if mode == "down":  # a port nothing listens on
        monkeypatch.setenv("AWS_ENDPOINT_URL_PRICING", f"http://127.0.0.1:{free_port()}")
    pricing.mode = mode
    caplog.set_level(logging.DEBUG, logger="fowlflow")
    start = time.monotonic()
    price, source = on_demand_price(session, "g6e.xlarge", "eu-west-1")
    took = time.monotonic() - start
    assert (price, source) == (hourly_price("g6e.xlarge"), TABLE_SOURCE) == (1.861, TABLE_SOURCE)
    assert took < 10, f"the fallback took {took:.1f} s"
    assert len(pricing.requests) == (0 if mode == "down" else 1)  # one try, no retries
    said = caplog.text + "".join(capsys.readouterr())
    assert "list price table" in said and "g6e.xlarge" in said
    if mode == "denied":
        assert "AccessDenied" in said
    assert SECRET not in said and "AKIATESTPRICING" not in said
    assert describe("g6e.xlarge", 1, price, False, source) == (
        "1 x g6e.xlarge (on-demand, ~$1.861/h each, ~$1.86/h in all; "
        "list price table, us-east-1)")


def test_pricing_api_off_asks_nothing(session, pricing):
    assert on_demand_price(session, "g5.xlarge", "eu-west-1", use_api=False) == (
        1.006, TABLE_SOURCE)
    assert pricing.requests == []
    assert parse_ec2_config({"pricing_api": False}).pricing_api is False
    assert parse_ec2_config({}).pricing_api is True
    with pytest.raises(ConfigError, match="pricing_api must be true or false"):
        parse_ec2_config({"pricing_api": "no"})


def test_a_type_neither_knows_is_priced_unknown(session, pricing):
    pricing.mode = "empty"
    price, source = on_demand_price(session, "x9.huge", "eu-west-1")
    assert (price, source) == (None, TABLE_SOURCE)
    assert "price unknown to fowlflow" in describe("x9.huge", 1, price, False, source)


@pytest.mark.parametrize("pricing_api", [True, False])
def test_the_launch_plan_names_its_price_and_source(aws, pricing, tmp_path, caplog,
                                                    pricing_api):
    """A launch against moto (SSH never answers, so it fails after the plan is logged)."""
    caplog.set_level(logging.INFO, logger="fowlflow")
    with pytest.raises(RemoteError):
        launch(aws, tmp_path, ssh_timeout=1, pricing_api=pricing_api)
    assert aws.leftovers() == {}
    plan = next(r.getMessage() for r in caplog.records if "launching cluster" in r.getMessage())
    if pricing_api:
        assert "1 x g6e.xlarge (on-demand, ~$2.045/h each, ~$2.04/h in all; Pricing API)" in plan
        assert {f["Value"] for f in pricing.requests[0]["body"]["Filters"]} >= {
            "g6e.xlarge", "us-east-1"}
    else:
        assert "~$1.861/h each, ~$1.86/h in all; list price table, us-east-1)" in plan
        assert pricing.requests == []
