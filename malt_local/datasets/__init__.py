"""`malt pull --dataset` and the `hf:OWNER/NAME[/CONFIG]:SPLIT` question sources: Hub datasets
in the Hugging Face cache, fetched with the model pull's machinery, read offline.

* `hub.py`: the pull (the file list at a revision, each file verified and resumable, the ref
  written last) and what counts as pulled;
* `splits.py`: parsing an `hf:` source and finding its split's files (the card's `configs:`,
  else the Hub's file-name conventions), rows out of them;
* `sources.py`: `load_source`, what `malt run` and `malt eval` read: a file or an `hf:` source;
* `fields.py`: the column mapping (`--question-field`...) and the known datasets' defaults.
"""
