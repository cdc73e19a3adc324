"""`malt pull` and `malt models`: the models.toml catalog, spec parsing, the pulled records, and
the download from the Hugging Face Hub into its cache layout.

* `catalog.py`: what a name means (models.toml, merged with the user's), licences;
* `spec.py`: what a `malt pull` argument names (`ModelSpec`, `parse_spec`);
* `records.py`: what is on this machine and verified (`pulled.json`);
* `resolve.py`: what `malt run --model` loads;
* `listing.py`: what `malt models` lists;
* `hf_cache.py`: the Hugging Face environment and cache layout;
* `hub_http.py`: the requests to the Hub and how its answers read;
* `download.py`: the pull itself (verified, resumable) and `--file` registration.
"""
