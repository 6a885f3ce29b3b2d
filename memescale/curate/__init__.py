"""Curate: placeholders and NSFW (`screens`), near-duplicate clusters (`dedup`), the
per-row decisions (`decide`); `pipeline` applies them and the quality heads with Ray Data.
"""
