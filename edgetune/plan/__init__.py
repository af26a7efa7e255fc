"""The memory model and the search over training settings. Pure arithmetic: no torch, no files."""
