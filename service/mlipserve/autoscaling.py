"""Autoscaling a family on the requests its replicas hold, not on Serve's ongoing-request count.

Client calls reach the front door inside a replica and go straight to its batch queues, so Serve's
own count of ongoing requests (which it takes at handles and proxies) sees none of them. Each
replica therefore reports the requests it holds (queued in or running through its models' batch
queues, MD session steps included) through Serve's ``record_autoscaling_stats``, and this policy
sizes the family on their sum: ``target_ongoing_requests`` requests per replica, as Serve's default
policy does with its own count. Serve wraps it with the config's bounds, delays and factors.

Queue depth rather than in-flight RPCs: a request waiting for a batch costs the same device time
whichever connection it came by, and the queue is where a replica being too few shows first.
"""

from __future__ import annotations

from typing import Any

REQUESTS_HELD = "mlipserve_requests_held"
POLICY = "mlipserve.autoscaling:requests_held_policy"


def requests_held_policy(ctx) -> tuple[float, dict[str, Any]]:
    """Serve's AutoscalingContext -> (desired replicas, policy state)."""
    held = (ctx.aggregated_metrics or {}).get(REQUESTS_HELD, {})
    target = ctx.config.get_target_ongoing_requests()
    return sum(held.values()) / target, {}


def with_policy(autoscaling: dict[str, Any]) -> dict[str, Any]:
    """A family's autoscaling_config with this policy unless it names its own."""
    return autoscaling if "policy" in autoscaling else {**autoscaling, "policy": {"policy_function": POLICY}}
