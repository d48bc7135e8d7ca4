"""The errors the domain's values raise: etcd's (what every layer catches, told apart so the bot can
explain them), a planner's Refusal, and a step's StepFailed or FactsChanged (the engine stops on them)."""
from __future__ import annotations


class EtcdError(Exception):
    """An etcd call failed; `message` is etcd's (or the transport's) own words."""

    def __init__(self, message: str, endpoint: str | None = None):
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint

    def __str__(self) -> str:
        return f"{self.endpoint}: {self.message}" if self.endpoint else self.message


class EtcdUnavailable(EtcdError):
    """Nothing answered: the member is down, refused the connection, or TLS failed."""


class EtcdTimeout(EtcdUnavailable):
    """No answer within the deadline (a black-holed host, an overloaded member)."""


class EtcdTLSError(EtcdUnavailable):
    """The TLS handshake failed: missing or wrong client certificate, or untrusted server."""


class EtcdUnusableURL(EtcdError):
    """A URL etcd published that the bot cannot dial (etcd stores what `member add` was given): nothing was sent,
    so it says nothing about whether the member is up."""


class EtcdAuthError(EtcdError):
    """etcd refused our credentials or permissions."""


class EtcdRequestError(EtcdError):
    """etcd understood the request and refused it (its message says why)."""


class MemberNotFound(EtcdRequestError):
    pass


class PeerURLExists(EtcdRequestError):
    pass


class LearnerNotReady(EtcdRequestError):
    """A learner that has not caught up with the leader cannot be promoted yet."""


class UnhealthyCluster(EtcdRequestError):
    pass


class TooManyLearners(EtcdRequestError):
    pass


class NotALearner(EtcdRequestError):
    pass


class LearnerUnsupported(EtcdRequestError):
    """A learner answers only Status and serializable reads: with auth on, not even Authenticate."""


class Refusal(Exception):
    """The plan cannot be made: `reason` (one line) and an optional `hint`."""

    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


class StepFailed(Exception):
    """A step could not do its work: `reason` (one line) and what to do next."""

    def __init__(self, reason: str, next_action: str):
        super().__init__(reason)
        self.reason = reason
        self.next_action = next_action


class PlanCancelled(Exception):
    """An approver stopped the plan while it waited on a person (a manual stage): the plan is cancelled
    already; the step that waited ends here and nothing more runs."""

    def __init__(self, stage: str, by: str, reason: str):
        super().__init__(f"cancelled at stage {stage} by {by}: {reason}")
        self.stage, self.by, self.reason = stage, by, reason


class FactsChanged(StepFailed):
    """A precondition does not hold: the cluster is no longer what the plan was
    made for, so the step was not attempted and the plan must be made anew."""

    def __init__(self, reason: str, plan_id: str):
        super().__init__(reason, f"a new plan is needed: `/etcd abandon {plan_id} <reason>`, then propose again")


# A call whose channel another call dropped (that call's deadline, or its failure): that call's error says why.
CLOSED_UNDER_CALL = "the connection was closed during the call; try again"
