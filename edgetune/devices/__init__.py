"""Device profiles (`profiles.py`, data files in `profiles/`) and what export fits each one
(`selection.py`). Pure arithmetic and YAML: nothing here imports torch."""
