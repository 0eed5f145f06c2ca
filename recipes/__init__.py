"""The shipped training recipes, one folder of YAML files per model family; installed as ``mm.recipes``."""
