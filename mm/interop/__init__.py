"""Interoperability with the transformers ecosystem: LLaVA and LLaVA-NeXT checkpoints out, LLaVA in."""
from mm.interop.llava_export import check_exportable, export_llava, export_target
from mm.interop.llava_import import import_llava
from mm.interop.llava_next_export import export_llava_next

__all__ = ["check_exportable", "export_llava", "export_llava_next", "export_target", "import_llava"]
