"""Off-site backups: the object store snapshots are uploaded to (S3, GCS, Azure Blob or a mounted
directory, through obstore), the object layout `<prefix>/<cluster>/<file name>` with
`<file name>.manifest.json` next to it, the signed manifest that describes each object, and the catalog of
both places. Credentials are never ours to hold: they come from the environment or the platform's
workload identity, as each cloud's SDK reads them.

What it may import is the import contracts' business (pyproject.toml, drawn in docs/architecture.md).
"""
