"""What ``import metaplastic`` costs and gives: the theory without transformers, and the model registered with
transformers' Auto classes as soon as the program imports transformers (as after ``import fla``)."""
import subprocess
import sys

import pytest

from hostile import ROOT


def python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_metaplastic_and_the_light_commands_import_no_transformers():
    out = python("import sys, io, contextlib\n"
                 "import metaplastic\n"
                 "print('transformers' in sys.modules, 'metaplastic.models.modeling' in sys.modules)\n"
                 "from metaplastic.cli import main\n"
                 "with contextlib.redirect_stdout(io.StringIO()):\n"
                 "    code = main(['registry', '--json'])\n"
                 "print(code, 'transformers' in sys.modules, 'metaplastic.kernels.dispatch' in sys.modules)")
    assert out.splitlines() == ["False False", "0 False False"]


def test_auto_classes_know_the_model_after_import_metaplastic(tmp_path):
    """``import metaplastic``, then transformers: ``AutoModelForCausalLM.from_pretrained`` loads a converted
    checkpoint."""
    pytest.importorskip("transformers")
    from metaplastic import convert_checkpoint
    from metaplastic.demo import build_tiny_mamba2
    dst = convert_checkpoint(build_tiny_mamba2(tmp_path / "mamba2"), tmp_path / "converted", progress=False).dst
    out = python("import metaplastic\n"
                 "from transformers import AutoConfig, AutoModelForCausalLM\n"
                 f"model = AutoModelForCausalLM.from_pretrained({str(dst)!r})\n"
                 "print(type(AutoConfig.for_model('metaplastic')).__name__, type(model).__name__)")
    assert out.splitlines()[-1] == "MetaplasticConfig MetaplasticForCausalLM"


@pytest.mark.parametrize("first", ["import metaplastic.models.modeling", "from metaplastic import convert_checkpoint",
                                   "import transformers; import metaplastic"])
def test_the_model_registers_whatever_the_import_order(first):
    out = python(f"{first}\n"
                 "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING\n"
                 "from metaplastic.models.configuration import MetaplasticConfig\n"
                 "print(MODEL_FOR_CAUSAL_LM_MAPPING[MetaplasticConfig].__name__)")
    assert out.splitlines()[-1] == "MetaplasticForCausalLM"
