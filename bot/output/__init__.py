"""Printers: one model per answer rendered as plain text, the CLI table and
JSON (etcdctl's printer.go); units and tables as etcd's tools print them.

May import: the etcd layer's data models only.
"""
