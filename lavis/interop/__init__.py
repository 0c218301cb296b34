"""Models in and out: Qwen-VL's released layout (``convert``) and self-contained exports (``export``).
The top layer: imports anything below it, nothing imports it.
"""
