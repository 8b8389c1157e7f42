"""Which backend serves a run: `local` (no object needed: the service's own `Backend`) or a
`RemoteBackend` chosen by the run's `backend` setting. Imports a remote backend only for its runs,
so local runs never load Ray."""

from __future__ import annotations

from backprop_mcp.backends.base import RemoteBackend


def remote_backend(backend: object, address: object = None) -> RemoteBackend | None:
    """The remote backend of that setting (and its address), or None for a local run."""
    if backend != "ray":
        return None
    from backprop_mcp.backends.ray import RayBackend

    return RayBackend(address if isinstance(address, str) else None)


def of_record(options: dict[str, object]) -> RemoteBackend | None:
    """The remote backend a stored run's options name, or None for a local run."""
    return remote_backend(options.get("backend"), options.get("ray_address"))
