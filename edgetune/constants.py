"""Sizes the trainer works with and the planner models: each written once, here, without torch."""

# Label of a token that carries no loss (PyTorch's cross-entropy default ignore_index).
IGNORE = -100
# The chunked loss (edgetune.train.loss) takes the vocabulary a block of rows at a time, with at most
# LOGITS_ELEMENTS fp32 logits (tokens x rows) per block: 2**22 is 16 MiB.
LOSS_BLOCK_ROWS = 4096
LOSS_LOGITS_ELEMENTS = 2**22
# At most this many elements of an output layer stored narrower than the compute dtype are widened at
# a time by the loss: 2**23 is 32 MiB of fp32.
WIDEN_ELEMENTS = 2**23
# 4-bit base layers on the CPU dequantize into one shared buffer of this many elements
# (edgetune.train.fourbit): 2**22 is 16 MiB of fp32.
DEQUANT_BUFFER_ELEMENTS = 2**22
# With gradient checkpointing the trainer maps every block of this size or more on its own, so that
# freeing it unmaps it (edgetune.train.heap.lean_heap).
LEAN_MMAP_THRESHOLD = 2**20
# llama.cpp processes a prompt in batches of this many tokens (its default n_ubatch): the scratch
# buffers of a device prediction, and what a sliding-window layer's cache keeps beyond its window.
PREFILL_BATCH = 512
# The trainer's default micro-batch and gradient accumulation. `edgetune plan` plans for the effective
# batch they make unless given --batch, so that it answers the question `edgetune train --plan auto`
# asks with the same defaults.
BATCH_SIZE = 4
GRAD_ACCUM = 1
