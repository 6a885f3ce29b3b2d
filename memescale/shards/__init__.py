"""Embedding shards, the interface between stages: `store` (the Parquet schema, the
resume manifest, writing) and `corpus` (streaming shards into a local work corpus for curate
and build).
"""
