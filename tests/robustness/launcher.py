"""The `command` launcher the seeds configure: the real one (bot.testing.start_member), with each call
written to a log first, so that the harness knows exactly when the bot stopped, restored or started a
member (the members' own history, against which the audit chain and the quorum are judged).

    python tests/robustness/launcher.py LOG -- ARGV...
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    log, command = argv[0], argv[argv.index("--") + 1:]
    action = os.environ.get("ETCD_CHATOPS_ACTION") or command[command.index("--action") + 1]
    name = command[command.index("--name") + 1] if "--name" in command else os.environ.get("ETCD_NAME", "")
    record = {"at": time.time(), "member": name, "action": action, "fence": os.environ.get("ETCD_CHATOPS_FENCE")}
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")
    code = subprocess.run(command).returncode
    with open(log, "a") as f:
        f.write(json.dumps({**record, "ended": time.time(), "exit": code}) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
