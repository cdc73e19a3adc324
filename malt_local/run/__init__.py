"""`malt run`, `malt status` and `malt show`: the trees.

`pipeline` (one `malt run`, from flags to a finished database), `settings` (the run's settings
and identity, which a resume checks), `tree` (the scheduler that builds every question's tree),
`credit` (rewards up the tree as values and labels), `judge` (the LLM judge for answers no rule
can grade), `too_long` (questions that cannot fit the context), `status` (what status and show
print).
"""
