"""`python -m backprop_mcp.sweeps HOME SWEEP_ID [--await-go]`: one sweep's runner."""

from backprop_mcp.sweeps.entry import main

raise SystemExit(main())
