from lavis.models.llm import hf_causal_lm, qwen2_vl_lm  # noqa: F401  (registers hf_causal_lm, qwen2_vl_lm)
