"""Config fields are checked before anything is built: one ConfigError (CLI: one line, exit 2) naming the field."""

import os
import subprocess
import sys

import pytest

from ramjax.configs import load_config, override
from ramjax.errors import ConfigError
from ramjax.train.setup import check_model_config


@pytest.mark.parametrize("items,needle", [
    (["model.ramnet.top_k=0"], "model.ramnet.top_k: must be an integer >= 1, got 0"),
    (["model.ramnet.top_k=65"], "model.ramnet.top_k: must be <= M"),
    (["model.ramnet.impl=fast"], "model.ramnet.impl: must be one of"),
    (["model.ramnet.decoder_impl=fast"], "model.ramnet.decoder_impl: must be one of"),
    (["model.ramnet.gamma=-1"], "model.ramnet.gamma: must be a finite number >= 0"),
    (["model.ramnet.grad_eps=1.0"], "model.ramnet.grad_eps"),
    (["model.ramnet.factor_size=1"], "model.ramnet.factor_size: 1 gives a memory of a single slot"),
    (["model.pattern=ramnet,foo"], "model.pattern: must be one of"),
    (["model.dtype=float16"], "model.dtype: must be one of"),
    (["model.pattern=gla", "model.gla.chunk_size=0"], "model.gla.chunk_size: must be an integer >= 1"),
    (["model.pattern=gla", "model.gla.conv_width=-1"], "model.gla.conv_width: must be an integer >= 0"),
    (["model.pattern=base_conv,ramnet", "model.base_conv.width=0"], "model.base_conv.width: must be an integer >= 1"),
    (["model.pattern=attention", "model.attention.impl=flash"], "model.attention.impl: must be one of"),
    (["model.pattern=loglinear", "model.loglinear.num_levels=3"],
     "model.loglinear.num_levels: 3 levels cover sequences up to 4 tokens; this run's longest is 64, which needs 7"),
    # an impl neither base has
    (["model.pattern=loglinear", "model.loglinear.base=gated_deltanet", "model.loglinear.impl=fused"],
     "model.loglinear.impl: must be one of"),
    # sizes that ended in raw JAX errors (a TypeError, a ZeroDivisionError) inside the layers
    (["model.mlp_hidden=-5"], "model.mlp_hidden: must be an integer >= 0, got -5"),
    (["model.pattern=mamba2", "model.mamba2.d_state=0"], "model.mamba2.d_state: must be an integer >= 1, got 0"),
    (["model.pattern=mamba2", "model.mamba2.head_dim=0"], "model.mamba2.head_dim: must be an integer >= 1, got 0"),
    (["model.pattern=mamba2", "model.mamba2.expand=0"], "model.mamba2.expand: must be an integer >= 1, got 0"),
    (["model.pattern=mamba2", "model.mamba2.head_dim=48"],
     "model.mamba2.head_dim: must divide expand * d_model = 128, got 48"),
    (["model.pattern=gated_deltanet", "model.gated_deltanet.expand_v=0"],
     "model.gated_deltanet.expand_v: must be an integer >= 1, got 0"),
    (["model.pattern=gated_deltanet", "model.gated_deltanet.head_dim=-1"],
     "model.gated_deltanet.head_dim: must be an integer >= 0, got -1"),
    (["model.pattern=gla", "model.gla.expand_k=0.0"], "model.gla.expand_k: expand_k * d_model = 0 must be a positive"),
    (["model.pattern=gla", "model.gla.gate_rank=0"], "model.gla.gate_rank: must be an integer >= 1, got 0"),
    (["model.pattern=loglinear", "model.loglinear.decay_hidden=0"],
     "model.loglinear.decay_hidden: must be an integer >= 1, got 0"),
    # a head width of d_model / num_heads rounded down: refused, naming both fields and the way out
    (["model.pattern=attention", "model.d_model=65"],
     "model.d_model: 65 is not divisible by model.num_heads = 4 (with model.attention.head_dim = 0"),
    (["model.pattern=gated_deltanet", "model.num_heads=5"],
     "model.d_model: 64 is not divisible by model.num_heads = 5 (with model.gated_deltanet.head_dim = 0"),
    (["model.pattern=loglinear", "model.loglinear.base=gated_deltanet", "model.num_heads=3"],
     "set model.gated_deltanet.head_dim explicitly or pick divisible sizes"),
    (["model.pattern=attention", "model.attention.head_dim=15"], "model.attention.head_dim: must be even and >= 2"),
])
def test_bad_model_fields_are_named(items, needle):
    config = load_config("configs/mqar.py:cpu")
    override(config, items)
    with pytest.raises(ConfigError, match=None) as error:
        check_model_config(config)
    assert needle in str(error.value)


def test_an_explicit_head_dim_needs_no_divisible_d_model():
    config = load_config("configs/mqar.py:cpu")
    override(config, ["model.pattern=attention,gated_deltanet", "model.d_model=65", "model.attention.head_dim=16",
                      "model.gated_deltanet.head_dim=16"])
    check_model_config(config)


@pytest.mark.parametrize("field", ["checkpoint_every", "keep_checkpoints"])
def test_checkpoint_fields_are_checked_before_the_model_is_built(field):
    from ramjax.train.setup import check_train_config

    config = load_config("configs/mqar.py:cpu")
    override(config, [f"train.{field}=0"])
    with pytest.raises(ConfigError, match=f"train.{field}: must be a positive integer, got 0"):
        check_train_config(config, None, 1)


def test_the_shipped_configs_pass():
    for spec in ("configs/mqar.py:cpu", "configs/mqar.py:ramnet", "configs/mqar.py:loglinear_mamba2,fig4",
                 "configs/lm.py:cpu", "configs/lm.py:transformer"):
        check_model_config(load_config(spec))


def test_cli_bad_field_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ramjax.cli", "train", "--config", "configs/mqar.py:cpu",
                             "--workdir", str(tmp_path / "run"), "--config.model.ramnet.impl=fast"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ramjax train: model.ramnet.impl: must be one of")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("command,args,line", [
    ("prepare", ["--config", "configs/lm.py:ramnet,cpu", "--config.data.tokenizer=bpe"],
     "ramjax prepare: data.tokenizer: must be one of ('byte', 'sentencepiece'), got 'bpe'"),
    ("prepare", ["--config", "configs/lm.py:ramnet,cpu", "--config.data.corpus_dir=/nonexistent/corpus"],
     "ramjax prepare: data.corpus_dir: '/nonexistent/corpus' is not a directory"),
    ("demo", ["--config.gamma=-1"], "ramjax demo: config.gamma: must be a finite number >= 0, got -1.0"),
    ("demo", ["--config.grad_eps=1.0"], "ramjax demo: config.grad_eps: must be a finite number >= 0 and < 1, got 1.0"),
])
def test_cli_commands_without_a_workdir_report_bad_fields_in_one_line(command, args, line):
    result = subprocess.run([sys.executable, "-m", "ramjax.cli", command] + args, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == line


def test_a_missing_config_file_names_each_place_looked_once(capsys, monkeypatch):
    from ramjax import cli

    monkeypatch.chdir(cli.REPO_ROOT)  # from the repository root, both places are the same path
    with pytest.raises(SystemExit):
        cli.resolve_config_spec("configs/nothere.py:cpu", "ramjax train")
    path = os.path.join(cli.REPO_ROOT, "configs", "nothere.py")
    assert capsys.readouterr().err.strip() == (f"ramjax train: config file 'configs/nothere.py' not found "
                                               f"(looked for {path})")


def test_train_help_lists_the_config_fields():
    result = subprocess.run([sys.executable, "-m", "ramjax.cli", "train", "--config", "configs/mqar.py:cpu", "-h"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:3] == ["model.ramnet.top_k", "=", "4"] and line.rstrip().endswith("K")
               for line in lines)
    assert any(line.strip().startswith("--workdir DIR") for line in lines)


def test_field_comments_take_end_of_line_comments_and_blocks_that_name_the_field():
    from ramjax.config_help import field_comments

    source = ("    m.ramnet.top_k = 8  # K\n"
              "    # Compute dtype: bfloat16 or float32. More words.\n"
              "    m.dtype = 'bfloat16'\n"
              "    # The small regime, set below.\n"
              "    config.data.vocab_size = 512\n")
    comments = field_comments(source)
    assert comments["ramnet.top_k"] == "K"
    assert comments["m.dtype"] == "Compute dtype: bfloat16 or float32."
    assert comments["data.vocab_size"] == ""
