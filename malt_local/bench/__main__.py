"""`python -m malt_local.bench`: what `make bench` runs; `--part view` times `malt view`'s pages
on a paper-size synthetic database instead (it needs no model)."""

import sys

from malt_local.bench.throughput import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:2] == ["--part", "view"]:
        from malt_local.bench.view import main as view_main

        raise SystemExit(view_main(argv[2:]))
    raise SystemExit(main())
