"""The model and its sharing: the LLaMA port with shared-KV layer groups
(``model.py``, also copied into every checkpoint), the sharing-plan format and
presets (``plans.py``), and the caches generation adds (``cache.py``)."""
