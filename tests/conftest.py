import os
import sys

from hypothesis import settings

# zoo.py and other test helpers import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The suite (and CI) draws the same hypothesis examples every run; set
# ATTNOPT_HYPOTHESIS_PROFILE=default to explore new ones.
settings.register_profile("deterministic", derandomize=True)
settings.load_profile(os.environ.get("ATTNOPT_HYPOTHESIS_PROFILE", "deterministic"))
