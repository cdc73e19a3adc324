"""The SQLite store every command shares.

`store` (the tables, one transaction per node, reads for the other commands), `migrations` (the
schema's history, applied in code), `claims` (which process builds which question when several
share one database).
"""
