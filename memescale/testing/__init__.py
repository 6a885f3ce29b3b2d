"""Sample data and sample indexes for tests, benchmarks and the demo (`sample_data`:
Reddit-like records, an image server on loopback, vector shards; `sample_index`: small
searchable indexes).
"""
