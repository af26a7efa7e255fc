"""Export: merge an adapter, write GGUF and ONNX files, verify each in its own runtime."""
