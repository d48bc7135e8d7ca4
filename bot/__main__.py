"""`python -m bot` is the same as the `etcd-chatops` console script."""
from bot.cli import main

raise SystemExit(main())
