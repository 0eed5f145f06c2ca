"""Interoperability with the transformers ecosystem: LLaVA checkpoints in and out."""
from mm.interop.llava_export import check_exportable, export_llava
from mm.interop.llava_import import import_llava

__all__ = ["check_exportable", "export_llava", "import_llava"]
