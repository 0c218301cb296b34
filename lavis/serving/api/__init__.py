"""The OpenAI-compatible API (``python -m lavis.serve``): schema, prompts, images, videos, limits, streaming,
app.
Imports lavis.serving.engine and below; inside, app imports the other modules and nothing imports app.
"""
