"""Analysis and evaluation: layer similarity and suggested plans (``analyze.py``),
plan search by measured damage (``search.py``), perplexity protocols (``evaluate.py``)."""
