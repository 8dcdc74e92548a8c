"""`python -m cli`: the same as the `lora-server` command."""

from cli.main import main

raise SystemExit(main())
