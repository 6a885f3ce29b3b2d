"""Search: the Ray-free logic behind the HTTP API: request and response models and input
checks (`requests`), page cursors (`cursor`), and filters, dedup and paging over an opened
index (`engine`). `serve/` wires it into Ray Serve.
"""
