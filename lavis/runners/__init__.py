"""Runners: the training loop, and the strategies that spread it over processes.
May import tasks and what is below them; only the top layer (cli, serving, interop) imports it.
"""

from lavis.runners import strategies  # noqa: F401  (registers single, ddp, fsdp)
from lavis.runners.iter_runner import IterRunner, build_runner  # noqa: F401  (registers iter_runner)
