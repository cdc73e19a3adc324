"""Questions: `loading` turns a file's rows into `Question`s (task, ground truth, stable ids);
`formats` reads the files themselves (JSONL, JSON, CSV, Parquet, text) in their encodings;
`arithmetic` makes synthetic questions files (`malt questions arithmetic`).
"""
