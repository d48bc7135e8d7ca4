"""etcd's values and errors as plain data: members, statuses, alarms and the
exceptions every layer catches. Pure: no gRPC, so the planner, the quorum
math and the tests load without it."""
from __future__ import annotations

from bot.domain.errors import (
    EtcdAuthError,
    EtcdError,
    EtcdRequestError,
    LearnerNotReady,
    LearnerUnsupported,
    MemberNotFound,
    NotALearner,
    PeerURLExists,
    TooManyLearners,
    UnhealthyCluster,
)

# ---------------------------------------------------------------- errors


_REQUEST_ERRORS: tuple[tuple[str, type[EtcdRequestError]], ...] = (
    ("member not found", MemberNotFound),
    ("peer urls already exists", PeerURLExists),
    ("can only promote a learner member which is in sync", LearnerNotReady),
    ("learner member which is in sync", LearnerNotReady),
    ("can only promote a learner member", NotALearner),
    ("unhealthy cluster", UnhealthyCluster),
    ("not enough started members", UnhealthyCluster),
    ("too many learner members", TooManyLearners),
    ("rpc not supported for learner", LearnerUnsupported),
)


AUTH_MESSAGES = ("authentication failed", "permission denied", "invalid auth token", "user name is empty",
                  "user name not found", "auth token is expired")


def request_error(details: str, endpoint: str) -> EtcdError:
    low = details.lower()
    if any(m in low for m in AUTH_MESSAGES):
        return EtcdAuthError(details, endpoint)
    for needle, cls in _REQUEST_ERRORS:
        if needle in low:
            return cls(details, endpoint)
    return EtcdRequestError(details, endpoint)


# ---------------------------------------------------------------- values


