"""Hourly prices of common GPU instance types and a run's estimated cost.

The table holds AWS's on-demand Linux list prices in us-east-1 (USD per hour, as published in
2025); other regions cost somewhat more. A spot run is priced at its ``max_price`` when given,
else at the latest spot price EC2 reports (:func:`fowlflow.projects.ec2_cloud.spot_price`)::

    hourly_price("g6e.xlarge")              # 1.861
    cost_usd(1.861, node_hours=0.5)         # 0.93
"""

from __future__ import annotations

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


def cost_usd(price: float | None, node_hours: float) -> float | None:
    """The estimated cost of ``node_hours`` at ``price`` USD per node-hour (cents)."""
    return None if price is None else round(price * node_hours, 2)


def describe(instance_type: str, node_count: int, price: float | None, spot: bool) -> str:
    """One line for the launch plan: what will run and what an hour costs."""
    kind = "spot" if spot else "on-demand"
    if price is None:
        return (f"{node_count} x {instance_type} ({kind}; price unknown to fowlflow: see "
                "https://aws.amazon.com/ec2/pricing/)")
    return (f"{node_count} x {instance_type} ({kind}, ~${price:.3f}/h each, "
            f"~${price * node_count:.2f}/h in all)")
