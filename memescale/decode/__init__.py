"""Decode: image bytes -> RGB arrays at the model's input size (`image`; `png` and
`resample` are its numba fast paths with Pillow's exact pixels).
"""
