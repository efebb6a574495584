"""Where a rank's weights come from: the checkpoint (`loader.py`), peers at a re-cut
(`reshard.py`), and the host memory kept warm between re-cuts (`hostmem.py`). Import the modules
themselves; this package re-exports nothing.
"""
