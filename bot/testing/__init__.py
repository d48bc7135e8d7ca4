"""Real parts for tests and the demo: LocalCluster (real etcd on loopback),
the Slack stand-in, the demo workspace, the demo and its transcript.

May import: anything.
"""
