"""The commands ``train.py`` / ``lavis-train`` and ``evaluate.py`` / ``lavis-evaluate``.
The top layer: imports anything below it, nothing imports it.
"""
