"""`python -m backprop_mcp.cli` runs the `backprop` CLI."""

from backprop_mcp.cli.commands import main

raise SystemExit(main())
