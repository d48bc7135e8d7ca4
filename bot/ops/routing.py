"""Which cluster a command in a channel speaks of (pure).

A channel speaks only for the clusters bound to it; an explicit name must
be one of those, so nobody operates `prod` from the wrong room.
"""
from __future__ import annotations

from bot.config import ClusterConfig, Config


class RoutingError(Exception):
    """One line on why no cluster could be chosen."""


def resolve_cluster(config: Config, channel: str, requested: str | None) -> ClusterConfig:
    bound = config.clusters_for_channel(channel)
    if requested:
        cluster = config.cluster(requested)
        if cluster is None:
            known = ", ".join(c.name for c in bound) or "none here"
            raise RoutingError(f"unknown cluster {requested!r} (clusters bound to this channel: {known})")
        if cluster not in bound:
            raise RoutingError(f"cluster {requested!r} is not bound to this channel; "
                               "run the command in one of its channels")
        return cluster
    if not bound:
        raise RoutingError("this channel is not bound to any etcd cluster "
                           "(add its ID to a cluster's `channels` in the config)")
    if len(bound) > 1:
        names = ", ".join(c.name for c in bound)
        raise RoutingError(f"this channel is bound to several clusters ({names}): name one with --cluster NAME")
    return bound[0]
