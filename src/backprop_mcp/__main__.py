"""`python -m backprop_mcp` runs the `backprop` CLI."""

from backprop_mcp.cli import main

raise SystemExit(main())
