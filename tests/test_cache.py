"""The converted-model cache: keyed by content, shared between copies, listed and cleared."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from edgetune import cli, models

ROOT = Path(__file__).resolve().parents[1]


def test_the_key_follows_the_content_not_the_path_or_time(tmp_path):
    data = bytes(range(256)) * 20_000  # 5 MB: header, samples and tail all differ from the middle
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(data)
    os.utime(b, (1, 1))
    assert models.content_key(a) == models.content_key(b)
    changed = bytearray(data)
    changed[100] ^= 1  # a header byte
    b.write_bytes(bytes(changed))
    assert models.content_key(a) != models.content_key(b)
    b.write_bytes(data + b"\0")
    assert models.content_key(a) != models.content_key(b)


def test_copies_of_a_gguf_share_one_conversion_and_the_cache_verb(tiny_model, tmp_path, capsys):
    from edgetune.export.gguf import write_gguf

    first = tmp_path / "venv1" / "model.gguf"
    first.parent.mkdir()
    write_gguf(tiny_model, first, "f16")
    second = tmp_path / "venv2" / "model.gguf"
    second.parent.mkdir()
    shutil.copy(first, second)
    cache = tmp_path / "cache"
    converted = models.gguf_to_hf(first, str(cache))
    assert "converting" in capsys.readouterr().out
    assert models.gguf_to_hf(second, str(cache)) == converted
    assert "converting" not in capsys.readouterr().out
    dead = subprocess.Popen(["true"])
    dead.wait()
    (cache / "models" / f".{converted.name}.tmp-{dead.pid}").mkdir()  # a killed conversion

    assert cli.main(["cache", "list", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert converted.name in listing[0] and f"from {first.resolve()}" in listing[0]
    assert listing[-1].startswith("edgetune: 1 cached models, ")
    assert cli.main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.startswith("edgetune: removed 1 cached models")
    assert list((cache / "models").iterdir()) == []


def test_cache_list_imports_no_torch(tmp_path):
    code = ("import sys\nfrom edgetune.cli import main\n"
            f"assert main(['cache', 'list', '--cache-dir', {str(tmp_path)!r}]) == 0\n"
            "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
