"""Training: data, model loading, adapters, quantized base weights, optimizers and the loop."""
