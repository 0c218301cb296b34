from lavis.models.llm import hf_causal_lm  # noqa: F401  (registers hf_causal_lm)
