import os
import sys

# Tests import the flat top-level modules (unet.py, sd.py, ...) from the repository root.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
