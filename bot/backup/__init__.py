"""Off-site backups: the object store snapshots are uploaded to (S3, GCS, Azure
Blob or a mounted directory, through obstore), the object layout
`<prefix>/<cluster>/<file name>` with `<file name>.manifest.json` next to it,
and the manifest that describes each object.

May import: `bot.etcd` (the pure parts: SnapshotStatus), `bot.output.model` (catalog.py builds the
catalog of both places as its CatalogView), obstore, and botocore
lazily (only to list and abort the multipart uploads a killed bot left on S3,
which obstore cannot). Never `bot.ops`, `bot.store`, `bot.slack`, slack_sdk,
slack_bolt or aiohttp (tests/test_layers.py checks the Slack side).
Credentials are never ours to hold: they come from the environment or the
platform's workload identity, as each cloud's SDK reads them.
"""
