"""``python -m tokenproxy``."""

from tokenproxy.cli import main

raise SystemExit(main())
