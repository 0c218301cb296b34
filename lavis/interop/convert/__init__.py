"""Qwen-VL's released checkpoints <-> ours (``python -m lavis.convert``): :mod:`.layout` (the mapping),
:mod:`.release` (reading and writing checkpoints on disk) and :mod:`.cli` (the command)."""
