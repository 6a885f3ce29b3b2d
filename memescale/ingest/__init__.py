"""Ingest: Reddit dumps -> image references -> downloads -> embedding shards.

`dumps` (zstd lines) -> `urls` (image references) -> `chunks` (the resume units) ->
`download` + `netguard` (fetch, SSRF guard) -> `memescale.decode` -> `memescale.embed` ->
`assembler` (rows per chunk) -> `memescale.shards` (Parquet + manifest). `pipeline` wires
them into one Ray Data streaming job.
"""
