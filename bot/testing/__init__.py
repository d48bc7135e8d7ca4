"""Real parts for tests and the demo: LocalCluster (real etcd on loopback) and NetnsCluster (each member a
network host of its own), the etcd releases, the Slack stand-in, PostgreSQL, S3 (moto), Prometheus and
Alertmanager, the kubelet and systemctl stand-ins, the demo and its workspace. Nothing in production
imports it (the CLI's `demo` is the one door).

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
