"""etcd-chatops: a Slack bot that operates the etcd clusters behind Kubernetes.

The package is layered (docs/architecture.md); import-linter's contracts in pyproject.toml keep the
arrows pointing down and the packages free of cycles (`make lint`)."""
