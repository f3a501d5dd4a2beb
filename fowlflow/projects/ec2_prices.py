"""Hourly prices of EC2 instance types and a run's estimated cost.

An on-demand run is priced by the AWS Pricing API (``pricing:GetProducts``, Linux, shared
tenancy, in the run's region) where it answers within a few seconds; where it is unreachable,
refuses or knows no price, by a small table of AWS's on-demand Linux list prices in us-east-1
(USD per hour, as published in 2025; other regions cost somewhat more). A spot run is priced at
its ``max_price`` when given, else at the latest spot price EC2 reports
(:func:`fowlflow.projects.ec2_cloud.spot_price`)::

    hourly_price("g6e.xlarge")                  # 1.861
    on_demand_price(boto3.Session(), "g6e.xlarge", "eu-west-1")
    # (2.045, "Pricing API"), or else (1.861, "list price table, us-east-1")
    cost_usd(1.861, node_hours=0.5)             # 0.93

``AWS_ENDPOINT_URL_PRICING`` points the Pricing API client elsewhere, as boto3 does for any
service.
"""

from __future__ import annotations

import json
import logging

_logger = logging.getLogger(__name__)
# The Pricing API answers from us-east-1 (and a few others) for every region's prices.
PRICING_REGION = "us-east-1"
API_SOURCE = "Pricing API"
TABLE_SOURCE = "list price table, us-east-1"

ON_DEMAND_USD_PER_HOUR = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.12xlarge": 5.672, "g5.48xlarge": 16.288,
    "g6.xlarge": 0.805, "g6.12xlarge": 4.602, "g6e.xlarge": 1.861, "g6e.12xlarge": 10.493,
    "p3.2xlarge": 3.06, "p3.8xlarge": 12.24, "p4d.24xlarge": 32.773, "p5.48xlarge": 55.04,
    # CPU types, for smoke tests
    "t3.medium": 0.0416, "m5.large": 0.096, "c5.xlarge": 0.17,
}


def hourly_price(instance_type: str) -> float | None:
    """The on-demand list price, or None for a type the table doesn't know."""
    return ON_DEMAND_USD_PER_HOUR.get(instance_type)


def api_price(session, instance_type: str, region: str) -> float | None:
    """The on-demand Linux USD price per hour from the AWS Pricing API, None if it knows none.

    One try, 3 s to connect and 3 s to read: a launch never waits long on it.

    Raises:
        botocore.exceptions.BotoCoreError, ClientError: unreachable, refused, throttled.
    """
    from botocore.config import Config

    one_try = Config(connect_timeout=3, read_timeout=3, retries={"total_max_attempts": 1})
    client = session.client("pricing", region_name=PRICING_REGION, config=one_try)
    filters = {"instanceType": instance_type, "regionCode": region, "operatingSystem": "Linux",
               "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used"}
    reply = client.get_products(
        ServiceCode="AmazonEC2", MaxResults=10,
        Filters=[{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()])
    prices = [_usd_per_hour(json.loads(p) if isinstance(p, str) else p)
              for p in reply.get("PriceList", [])]
    prices = [p for p in prices if p]
    return min(prices) if prices else None


def _usd_per_hour(product: dict) -> float | None:
    """A PriceList product's on-demand hourly USD price (the first hourly dimension)."""
    for term in product.get("terms", {}).get("OnDemand", {}).values():
        for dim in term.get("priceDimensions", {}).values():
            usd = dim.get("pricePerUnit", {}).get("USD")
            if usd is not None and dim.get("unit", "Hrs").lower().startswith("hr"):
                return float(usd)
    return None


def on_demand_price(session, instance_type: str, region: str,
                    use_api: bool = True) -> tuple[float | None, str]:
    """The on-demand price and where it came from: the Pricing API, else the table."""
    if use_api:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            price = api_price(session, instance_type, region)
        except (BotoCoreError, ClientError) as exc:
            code = exc.response.get("Error", {}).get("Code") if isinstance(
                exc, ClientError) else type(exc).__name__
            _logger.info("the AWS Pricing API gave no price for %s in %s (%s); using the list "
                         "price table", instance_type, region, code)
        else:
            if price is not None:
                return price, API_SOURCE
            _logger.info("the AWS Pricing API knows no Linux on-demand price for %s in %s; "
                         "using the list price table", instance_type, region)
    return hourly_price(instance_type), TABLE_SOURCE


def cost_usd(price: float | None, node_hours: float) -> float | None:
    """The estimated cost of ``node_hours`` at ``price`` USD per node-hour (cents)."""
    return None if price is None else round(price * node_hours, 2)


def describe(instance_type: str, node_count: int, price: float | None, spot: bool,
             source: str | None = None) -> str:
    """One line for the launch plan: what will run, what an hour costs and by whose word."""
    kind = "spot" if spot else "on-demand"
    if price is None:
        return (f"{node_count} x {instance_type} ({kind}; price unknown to fowlflow: see "
                "https://aws.amazon.com/ec2/pricing/)")
    return (f"{node_count} x {instance_type} ({kind}, ~${price:.3f}/h each, "
            f"~${price * node_count:.2f}/h in all" + (f"; {source})" if source else ")"))
