from lavis.datasets.builders import caption, conversation, grounding, ocr, text, vqa, webdataset  # noqa: F401  (register)
