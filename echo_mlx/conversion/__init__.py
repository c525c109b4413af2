"""Conversion: a pretrained LLaMA to an echo checkpoint (``convert.py``), and the
calibrated, closed-form fit of what a sharing plan changes (``fit.py``)."""
