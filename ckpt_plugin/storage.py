"""Where checkpoints live, for code outside the package.

- :class:`Location`: a local path or a URL with the ``storage_options`` that reach it; every
  public class takes one wherever it takes a directory or URL, and shares its backend.
- :func:`backend_of`: the backend that reaches a path or URL (for
  :class:`~ckpt_plugin.distributed.BackendShardFiles`, say).
- :mod:`faults <ckpt_plugin._storage.faults>`: a backend wrapper that injects failures (a full
  disk, a dropped upload, a kill at a chosen operation) into a manager's whole save path, for the
  tests of code built on ckpt_plugin::

      from ckpt_plugin.storage import faults

      disk = faults.inject(manager, fail_after_bytes=4096)
"""

from ._storage import Location, backend_of, faults

__all__ = ["Location", "backend_of", "faults"]
