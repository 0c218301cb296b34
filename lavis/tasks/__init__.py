"""Tasks: what a training step means (``sft``, ``pretrain``, ``dpo``), the evaluation tasks (``captioning``, ``vqa``,
``grounding``, ``multiple_choice``). May import models, datasets and what is below them; never runners or above.
"""

from lavis.tasks import captioning, dpo, grounding, multiple_choice, sft, vqa  # noqa: F401  (register)
