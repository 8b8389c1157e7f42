"""backprop-mcp: safe, time-boxed, resumable ML training runs for agents (MCP) and people (CLI).

This package's top level stays stdlib-only so that the script helper (`backprop_mcp.script`) and the
supervisor start fast and import nothing heavy.
"""

__version__ = "0.1.0"
