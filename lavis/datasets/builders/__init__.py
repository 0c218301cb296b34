from lavis.datasets.builders import conversation  # noqa: F401
