from lavis.datasets.builders import (  # noqa: F401  (register)
    caption,
    conversation,
    grounding,
    multiple_choice,
    ocr,
    preference,
    released_mc,
    released_vqa,
    text,
    vqa,
    webdataset,
)
