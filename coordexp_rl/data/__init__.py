"""Data: the JSONL contract (``contract``), its checker (``validate``), the training loader
(``loader``), converters from COCO / Pascal VOC / RefCOCO (``convert``) and the synthetic shapes
set (``synth``). See docs/DATA_JSONL_CONTRACT.md.
"""
