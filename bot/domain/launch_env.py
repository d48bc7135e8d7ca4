"""The environment variables the bot sets for a `command` launcher's process, beyond the runbook's ETCD_*
(the launcher contract in the README). A leaf: the launcher stand-in reads them in a process that imports
nothing else of the domain."""
from __future__ import annotations

# A plan run's fencing token, in the environment of every launcher process it starts (bot.ops.launcher): a
# launcher that saw a newer token refuses.
FENCE_VARIABLE = "ETCD_CHATOPS_FENCE"
# What a `command` launcher's restore gets when the member's etcdutl takes the flags, to pass them on
BUMP_VARIABLE, MARK_COMPACTED_VARIABLE = "ETCD_CHATOPS_BUMP_REVISION", "ETCD_CHATOPS_MARK_COMPACTED"
