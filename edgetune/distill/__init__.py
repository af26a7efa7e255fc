"""`edgetune distill`: a student trained through the one loop on what a teacher running in llama.cpp
says: its top-k log-probabilities at every response token (logits mode), or its responses (sequences
mode)."""
