"""The names of the files edgetune writes into run and export folders, in one place.

A run folder is a standard PEFT adapter folder plus these files; an export folder holds the exported
files plus the verification report.
"""

RUN_CONFIG = "edgetune_run.yaml"  # every setting of a run, so export needs nothing else
TRAIN_LOG = "train_log.jsonl"  # one JSON record per optimizer step
CHECKPOINTS = "checkpoints"  # step-NNNNNN/ folders, each whole or absent
TOKENIZER = "tokenizer"  # the tokenizer the run trained with
CHAT_TEMPLATE = "chat_template.jinja"  # the chat template a run trained with, when not the model's own
CURVES = "training.png"  # loss, learning rate, tokens/s and memory per step
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's adapter files
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPORT_CONFIG = "edgetune_export.yaml"  # an export's settings; marks the folder as an export
SOFT_PROMPT = "soft-prompt.safetensors"  # a soft prompt's virtual token embeddings, beside its GGUF
REPORT = "report.json"  # an export's verification rows
REPORT_MD = "report.md"  # the same as a table a person reads
QUICKSTART_RESULT = "quickstart.json"  # the quick start's result; marks its output folder
LOCK = ".edgetune.lock"  # held (fcntl.flock) while a process writes the folder
MERGE_RECORD = "edgetune_merge.yaml"  # what `edgetune merge --full` merged; marks the merged model
