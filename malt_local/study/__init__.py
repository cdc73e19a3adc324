"""`malt study`: the paper's protocol in one resumable command (issue 21).

Modules: `config` (the study's settings, TOML in and out, what a rerun may not change),
`pipeline` (the stages, each the existing command's library function, and state.json),
`results` (eval.db back to per-question outcomes, results.json), `stats` (the paired bootstrap,
McNemar, Wilson), `svg` (the figures) and `report` (REPORT.md). All but `pipeline` and `results`
are pure.
"""
