"""Embed: open_clip image and text towers (`encoder`), and the torchvision import shim a
CPU torch needs (`torchvision_shim`).
"""
