"""Serving a trained model: the batching engine, the OpenAI-compatible API, the web demo, the
terminal chat and box drawing. The top layer: imports anything below it, nothing imports it.
"""
