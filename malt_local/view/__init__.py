"""`malt view`: a local, read-only web view of a malt database (runs, trees, pairs, evals)."""

from malt_local.view.server import ViewServer

__all__ = ["ViewServer"]
