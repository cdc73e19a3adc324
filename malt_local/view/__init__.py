"""`malt view`: a local, read-only web view of a malt database (runs, trees, pairs, evals).

The package imports nothing itself, so its modules can import each other without a circle;
the server is `malt_local.view.server.ViewServer`.
"""
