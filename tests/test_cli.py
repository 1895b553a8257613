"""The command line: inspect on Hugging Face directories written in the test, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from attnopt.cli import EXIT_BAD_INPUT, EXIT_OK, main


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("bert")
    transformers.BertModel(config).save_pretrained(directory)
    return directory


def test_inspect_prints_the_sites_of_a_checkpoint(bert_dir, capsys):
    assert main(["inspect", str(bert_dir)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 site(s) found" in out and "encoder.layer.1.attention.self" in out


def test_inspect_json_report(bert_dir, capsys):
    assert main(["inspect", str(bert_dir), "--json", "--seq-len", "8"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert [s["q_len"] for s in report["sites"]] == [8, 8]
    assert {s["mask_kind"] for s in report["sites"]} == {"padding"}


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing", "no such directory"),
    (lambda d: d, "no config.json"),
    (lambda d: (d / "config.json").write_text("{}") and d, "no weights"),
])
def test_bad_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, setup, message):
    source = setup(tmp_path)
    assert main(["inspect", str(source)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_corrupt_safetensors_is_rejected(bert_dir, tmp_path, capsys):
    for item in bert_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    assert main(["inspect", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "attnopt: error:" in capsys.readouterr().err
