"""`malt pull` and `malt models`: the models.toml catalog, spec parsing, the pulled records, and
the download from the Hugging Face Hub into its cache layout.
"""
