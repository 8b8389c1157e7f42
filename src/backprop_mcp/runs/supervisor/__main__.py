"""`python -m backprop_mcp.runs.supervisor HOME RUN_ID [--await-go]`: one run's supervisor."""

from backprop_mcp.runs.supervisor.entry import main

raise SystemExit(main())
