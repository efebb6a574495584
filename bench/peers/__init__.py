"""Peers of the engine benchmark: the systems bench/engine.py measures Nitsum against."""
