"""Dependency direction: pure planning modules import neither torch nor lvita_model."""

import subprocess
import sys


def test_pure_data_modules_import_neither_torch_nor_model():
    code = (
        "import sys, lvita_data.samples.tiling, lvita_data.samples.frames, lvita_data.samples.vision_tokens, lvita_data.records.mixture, "
        "lvita_data.samples.template, lvita_data.manifest; print(sorted(sys.modules))"
    )
    modules = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'torch'" not in modules and "lvita_model" not in modules
    assert "'av'" not in modules and "'PIL'" not in modules  # no media I/O in the pure core


def test_lvita_data_never_imports_lvita_model():
    code = (
        "import sys, lvita_data.build.plan; "
        "print([m for m in sys.modules if 'lvita_model' in m or m == 'torch'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lvita_model_imports_torch_and_safetensors_only():
    """The model package runs where only torch is installed (e.g. a GPU box without lvita_data's
    media and tokenizer stack): no lvita_data module, no transformers."""
    code = (
        "import sys, lvita_model.model, lvita_model.weights, lvita_model.attention.registry; "
        "print([m for m in sys.modules if m.startswith(('lvita_data', 'transformers', 'av', "
        "'PIL', 'tokenizers'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
