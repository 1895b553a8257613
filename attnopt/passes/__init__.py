"""Graph passes over exported fx graphs: cleanup → detect → classify masks → canonicalize.

Each pass is a small named callable `(graph_module, context) -> PassResult`; `manager.py` runs
them. `detect.py` and `masks.py` hold the matching and mask logic the passes use.
"""
