"""Talking to AWS before anything is created: credentials, region, instance type, image, price.

    session = aws_session(cfg.region)       # boto3's credential chain; a clear error without
    plan = preflight(session, cfg)          # Plan(region, image_id, gpus, price, ...)

boto3 finds its endpoints the usual way, so ``AWS_ENDPOINT_URL_EC2`` / ``_SSM`` / ``_STS``
(or ``AWS_ENDPOINT_URL``) point it elsewhere; the tests point it at a moto server.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from fowlflow.errors import ConfigError, RemoteError
from fowlflow.projects.ec2_config import Ec2Config
from fowlflow.projects.ec2_prices import hourly_price


@dataclass(frozen=True)
class Plan:
    """What the preflight found: enough to launch and to price the run."""

    region: str
    account: str
    image_id: str
    gpus: int
    price: float | None  # USD per instance-hour (spot: max_price or the market price)


def _client_error(exc) -> tuple[str, str]:
    err = getattr(exc, "response", {}).get("Error", {})
    return err.get("Code", type(exc).__name__), err.get("Message", str(exc))


def aws_session(region: str | None):
    """A boto3 session with credentials and a known region, checked without calling AWS.

    Raises:
        ConfigError: no credentials, no region, or a region EC2 does not have.
    """
    import boto3
    import botocore.exceptions

    try:
        session = boto3.Session(region_name=region)
        credentials = session.get_credentials()
    except botocore.exceptions.BotoCoreError as exc:
        raise ConfigError(f"AWS credentials could not be loaded: {exc}; fix the profile "
                          "(aws configure list)") from exc
    if credentials is None:
        raise ConfigError("no AWS credentials found (boto3 looked in AWS_ACCESS_KEY_ID/"
                          "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws and the instance role); "
                          "fix: run `aws configure` or `aws sso login`, or export the keys")
    if not session.region_name:
        raise ConfigError("no AWS region: add \"region\": \"us-east-1\" (for example) to the "
                          "config, or set AWS_DEFAULT_REGION")
    regions = set(session.get_available_regions("ec2")) | set(
        session.get_available_regions("ec2", partition_name="aws-us-gov"))
    if session.region_name not in regions:
        raise ConfigError(f"unknown AWS region {session.region_name!r}; use one of EC2's "
                          f"regions, e.g. us-east-1, us-west-2, eu-west-1")
    return session


def call(what: str, func, **kwargs):
    """One AWS call; an AWS error becomes a RemoteError naming ``what`` and AWS's message."""
    import botocore.exceptions

    try:
        return func(**kwargs)
    except botocore.exceptions.ClientError as exc:
        code, message = _client_error(exc)
        raise RemoteError(f"{what} failed: {code}: {message}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise RemoteError(f"{what} failed: {exc}; check your network and the region") from exc


def _account(session) -> str:
    import botocore.exceptions

    try:
        return session.client("sts").get_caller_identity()["Account"]
    except botocore.exceptions.ClientError as exc:
        code, message = _client_error(exc)
        raise ConfigError(f"AWS rejected the credentials ({code}: {message}); fix: renew "
                          "them (aws sso login, aws configure) or pick another AWS_PROFILE") \
            from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise RemoteError(f"AWS could not be reached to check the credentials: {exc}") from exc


def gpu_count(ec2, instance_type: str) -> int:
    """The type's GPUs (0 for a CPU type).

    Raises:
        ConfigError: EC2 has no such instance type in this region.
    """
    import botocore.exceptions

    try:
        info = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    except botocore.exceptions.ClientError as exc:
        if _client_error(exc)[0] != "InvalidInstanceType":
            raise RemoteError(f"describe_instance_types failed: {exc}") from exc
        info = []
    if not info:
        raise ConfigError(f"unknown instance type {instance_type!r} in {ec2.meta.region_name}; "
                          "use e.g. \"g6e.xlarge\" or \"g5.12xlarge\" (aws ec2 "
                          "describe-instance-types lists them)")
    return sum(g.get("Count", 0) for g in info[0].get("GpuInfo", {}).get("Gpus", []))


def resolve_image(session, ec2, image: str) -> str:
    """An AMI id, or the AMI id an SSM parameter path holds.

    Raises:
        ConfigError: the parameter or the AMI does not exist in this region.
    """
    import botocore.exceptions

    if image.startswith("/"):
        try:
            image_id = session.client("ssm").get_parameter(Name=image)["Parameter"]["Value"]
        except botocore.exceptions.ClientError as exc:
            raise ConfigError(f"image {image!r}: no such SSM parameter in "
                              f"{session.region_name} ({_client_error(exc)[0]}); give an AMI id "
                              "(ami-...) or an existing parameter path") from exc
    else:
        image_id = image
    try:
        found = ec2.describe_images(ImageIds=[image_id])["Images"]
    except botocore.exceptions.ClientError:
        found = []
    if not found:
        raise ConfigError(f"image {image_id!r} does not exist in {session.region_name} (or is "
                          "not shared with this account); give an AMI id from this region")
    return image_id


def spot_price(ec2, instance_type: str) -> float | None:
    """The lowest current spot price of the type across the region's zones."""
    now = datetime.datetime.now(datetime.timezone.utc)
    history = call("describe_spot_price_history", ec2.describe_spot_price_history,
                   InstanceTypes=[instance_type], StartTime=now,
                   ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"])
    prices = [float(p["SpotPrice"]) for p in history.get("SpotPriceHistory", [])]
    return min(prices) if prices else None


def preflight(session, cfg: Ec2Config) -> Plan:
    """Every check that needs AWS, before anything is created.

    Raises:
        ConfigError: bad credentials, instance type, image or a spot price below market.
    """
    account = _account(session)
    ec2 = session.client("ec2")
    gpus = gpu_count(ec2, cfg.instance_type)
    image_id = resolve_image(session, ec2, cfg.image)
    price = hourly_price(cfg.instance_type)
    if cfg.spot:
        market = spot_price(ec2, cfg.instance_type)
        if cfg.max_price is not None and market is not None and cfg.max_price < market:
            raise ConfigError(f"max_price {cfg.max_price} USD/h is below the current spot "
                              f"price of {cfg.instance_type} in {session.region_name} "
                              f"({market} USD/h), so no instance would start; raise max_price "
                              "or leave it out (then the cap is the on-demand price)")
        price = cfg.max_price if cfg.max_price is not None else (market or price)
    return Plan(session.region_name, account, image_id, gpus, price)
