"""Build: the sharded, memory-bounded index build. `stages` holds its steps as plain
functions with their inputs and outputs on disk; `pipeline` runs them as a driver and Ray
tasks (`ray_jobs/build_index.py`).
"""
