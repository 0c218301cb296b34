"""Tasks: what a training step means (``sft``, ``pretrain``, ``dpo``), the evaluation tasks (``captioning``, ``vqa``,
``grounding``, ``multiple_choice``, ``heldout_loss``). May import models, datasets and what is below them; never runners or above.
"""

from lavis.tasks import captioning, dpo, grounding, heldout, multiple_choice, sft, vqa  # noqa: F401  (register)
