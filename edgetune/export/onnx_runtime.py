"""onnxruntime plumbing both ONNX builders share: sessions, cache inputs, logits, a quiet quantizer."""

import contextlib
import logging
from pathlib import Path

from edgetune.shape import head_dim


def kv_shape(config: dict) -> tuple[int, int]:
    """(key/value heads, head size) of the cache, from config.json."""
    return config.get("num_key_value_heads") or config["num_attention_heads"], head_dim(config)


def session(model_path: Path):
    """An onnxruntime CPU session on `model_path`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the builders' graphs trigger harmless shape-merge warnings
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def step_feed(sess, config: dict, ids: list[int], start: int, past: dict | None) -> dict:
    """Inputs for one forward pass of `ids` at positions start.. with `past` (None: an empty cache)."""
    import numpy as np

    kv_heads, head_dim = kv_shape(config)
    feed = {"input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, start + len(ids)), dtype=np.int64)}
    for inp in sess.get_inputs():
        if inp.name == "position_ids":
            feed[inp.name] = np.arange(start, start + len(ids), dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values."):
            if past is None:
                dtype = np.float16 if "float16" in inp.type else np.float32
                feed[inp.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
            else:
                feed[inp.name] = past[inp.name.replace("past_key_values.", "present.")]
    return feed


def onnx_logits(model_path: Path, ids: list[int], config: dict):
    """Logits (positions x vocab, float32) of the ONNX model over `ids` in one pass from an empty cache."""
    import numpy as np

    sess = session(model_path)
    logits = sess.run(["logits"], step_feed(sess, config, ids, 0, None))[0]
    return logits[0].astype(np.float32)


@contextlib.contextmanager
def quiet_quantizer():
    """Hide onnxruntime's quantizer's log: a line per MatMul at INFO (its module turns INFO on at import)
    and an ERROR for the tied embedding's Gather at int8, which it skips as intended. A real failure
    raises an exception, which still shows."""
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
