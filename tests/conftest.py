import os
import sys

# zoo.py and other test helpers import as top-level modules
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
