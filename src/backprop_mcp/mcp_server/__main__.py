"""`python -m backprop_mcp.mcp_server` runs the `backprop-mcp` command."""

from backprop_mcp.mcp_server.server import main

raise SystemExit(main())
