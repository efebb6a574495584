"""The math of one TP rank's model slice: the decoder (`model.py`), the TP layer types
(`layers.py`), the one table of shard rules (`sharding.py`), the sampler (`sampling.py`) and the
CPU kernels (`cpu_kernels.py`, `csrc/`). Import the modules themselves; this package re-exports
nothing, so importing one of them does not pull in the others.
"""
