"""`malt export`: role datasets (SFT, DPO, JSON) from the stored trees.

Read in this order: `options` (what is asked for), `trees` (the stored trees as export reads
them), `pairing` (the pure rules: positives, DPO pairs, the split), `records` (the lines of each
format), `writer` (files that appear whole), `manifest` (what the export holds and where it came
from), and `pipeline` (`export()`, which walks the trees once and writes everything).
"""
