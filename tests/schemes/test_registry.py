"""A scheme defined outside the package, registered with the public decorator, is available
everywhere: the attention module, convert, save/load, export (or a clear refusal), the CLI and
``available_schemes()``; plugins are found through the ``kdgqa.schemes`` entry points."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import kdgqa
from conftest import TINY_VIT
from kdgqa import (
    GroupedQueryAttention,
    QueryAllocator,
    SchemeError,
    available_schemes,
    convert,
    create_timm_vit,
    export_mha,
    load,
    register_scheme,
    save_pretrained,
    validate_cell,
)
from kdgqa.cli import main
from kdgqa.core.apportion import counts_to_kv_index
from kdgqa.schemes import registry


class FirstHeavy(QueryAllocator):
    """Static uneven groups: the first KV head serves all query heads but one per other head."""

    name = "first-heavy"

    def __init__(self, num_heads: int, num_kv_heads: int, **options: Any) -> None:
        super().__init__(num_heads, num_kv_heads, **options)
        counts = torch.tensor([num_heads - num_kv_heads + 1] + [1] * (num_kv_heads - 1))
        self.static_kv_index.copy_(counts_to_kv_index(counts, num_heads))
        self.uniform = num_kv_heads in (1, num_heads)


class Reversed(QueryAllocator):
    """Dynamic: reads the KV heads in reverse order of their key norms on every input."""

    name = "norm-reversed"
    key_driven = True
    uniform = False

    def forward(self, k: Tensor) -> Tensor:
        order = torch.linalg.vector_norm(k.detach().float(), dim=(0, 2, 3)).argsort()
        return order[self.static_kv_index]


@pytest.fixture
def plugin_schemes() -> Iterator[None]:
    register_scheme(FirstHeavy)
    register_scheme(Reversed)
    yield
    table: Any = registry.SCHEMES
    for name in (FirstHeavy.name, Reversed.name):
        table._classes.pop(name, None)


def _model():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return create_timm_vit(**TINY_VIT)


def test_a_registered_scheme_is_available_everywhere(plugin_schemes, tmp_path, images, capsys):
    assert {"first-heavy", "norm-reversed"} <= set(available_schemes())
    assert validate_cell("first-heavy", 6, 3) is FirstHeavy
    module = GroupedQueryAttention(48, 6, 3, "first-heavy")
    module(torch.randn(2, 5, 48))
    assert torch.bincount(module.last_kv_index).tolist() == [4, 1, 1]

    model = convert(_model(), "first-heavy", 3).eval()
    with torch.no_grad():
        expected = model(images)
    save_pretrained(model, tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "ckpt")(images), expected, atol=0, rtol=0)

    export_mha(model, tmp_path / "mha")
    import timm

    plain = timm.create_model("local-dir:" + str(tmp_path / "mha"), pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(images), expected, atol=1e-5, rtol=0)

    assert main(["schemes"]) == 0
    listed = capsys.readouterr().out
    assert "first-heavy: Static uneven groups" in listed and "norm-reversed:" in listed


def test_a_dynamic_plugin_scheme_saves_and_loads_but_export_refuses(plugin_schemes, tmp_path,
                                                                   images):
    model = convert(_model(), "norm-reversed", 3).eval()
    with torch.no_grad():
        expected = model(images)
    save_pretrained(model, tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "ckpt")(images), expected, atol=0, rtol=0)
    with pytest.raises(kdgqa.ExportError, match=r"cannot export 'blocks\.0\.attn': scheme "
                       r"'norm-reversed' decides its allocation or output at run time"):
        export_mha(model, tmp_path / "mha")


def test_the_cli_converts_with_a_registered_scheme(plugin_schemes, tmp_path, capsys):
    from safetensors.torch import save_file

    model = _model()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    args = ["convert", "--model", str(tmp_path / "w.safetensors"), "--arch",
            "vit_base_patch16_224", *[f"--model-arg={k}={v}" for k, v in TINY_VIT.items()],
            "--scheme", "first-heavy", "--kv-heads", "3", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert "query heads per KV head [4, 1, 1]" in capsys.readouterr().out


@pytest.mark.parametrize(("cls", "message"), [
    (int, "expects a QueryAllocator subclass"),
    (type("Nameless", (QueryAllocator,), {}), "needs its own class attribute name"),
    (type("Upper", (QueryAllocator,), {"name": "GQA2"}), "lower case"),
    (type("Taken", (QueryAllocator,), {"name": "gqa"}), "scheme name 'gqa' is taken"),
])
def test_bad_registrations_are_refused_in_one_line(cls, message):
    with pytest.raises(SchemeError, match=message):
        register_scheme(cls)
    assert "gqa" in available_schemes()


PLUGIN = textwrap.dedent('''
    from kdgqa import QueryAllocator, register_scheme

    @register_scheme
    class Plugged(QueryAllocator):
        """Even groups, contributed by an installed package."""
        name = "plugged-gqa"
''')


def _install_plugin(root: Path, module: str, source: str) -> None:
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kdgqa.schemes]\n{module} = {module}\n")


def _env_with(folder: Path) -> dict[str, str]:
    """This environment with ``folder`` first on the import path (kdgqa stays importable,
    installed or from PYTHONPATH=src)."""
    paths = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def test_installed_plugins_are_found_through_entry_points(tmp_path):
    _install_plugin(tmp_path, "kdgqa_plugin_demo", PLUGIN)
    env = _env_with(tmp_path)
    done = subprocess.run([sys.executable, "-m", "kdgqa.cli", "schemes", "--names"],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "plugged-gqa"


def test_a_broken_plugin_is_named_in_one_line(tmp_path):
    _install_plugin(tmp_path, "kdgqa_plugin_broken", "raise ImportError('no such thing')\n")
    env = _env_with(tmp_path)
    done = subprocess.run([sys.executable, "-m", "kdgqa.cli", "schemes"], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == ("kdgqa: error: scheme plugin 'kdgqa_plugin_broken' "
                                   "(kdgqa_plugin_broken) failed to load: no such thing")
