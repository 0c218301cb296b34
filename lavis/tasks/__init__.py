"""Tasks: what a training step means (``sft``, ``pretrain``) and the evaluation tasks
(``captioning``, ``vqa``, ``grounding``, ``multiple_choice``)."""

from lavis.tasks import captioning, grounding, multiple_choice, sft, vqa  # noqa: F401  (register)
