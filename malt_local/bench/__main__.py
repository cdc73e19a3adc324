"""`python -m malt_local.bench`: what `make bench` runs."""

from malt_local.bench.throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
