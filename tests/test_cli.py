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


# ------------------------------------------------------------------------------ convert

def _save(tmp_path_factory, name, model):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return directory


CHECKPOINTS = {
    "bert": lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, attn_implementation="eager")),
    "llama-gqa": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")),
    "t5": lambda: transformers.T5Model(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4, decoder_start_token_id=0, attn_implementation="eager")),
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, attn_implementation="eager")),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_convert_checkpoint_to_onnx_runs_in_onnxruntime(name, tmp_path_factory, capsys):
    import onnxruntime
    source = _save(tmp_path_factory, name, CHECKPOINTS[name]())
    output = source / "model.onnx"
    report = source / "report.json"
    assert main(["convert", str(source), "-o", str(output), "--seq-len", "12",
                 "--report", str(report)]) == EXIT_OK
    captured = capsys.readouterr()
    assert "onnxruntime vs PyTorch: passed" in captured.out
    assert "checking in onnxruntime" in captured.err  # progress, step by step, on stderr
    sites = json.loads(report.read_text())["sites"]
    assert sites and all(s["rewrite"] == "exact" for s in sites)
    session = onnxruntime.InferenceSession(str(output))
    names = {i.name for i in session.get_inputs()}
    assert names & {"input_ids", "pixel_values"}  # the model's own input names


def test_convert_to_pt2_loads_back_after_import(tmp_path_factory, capsys):
    source = _save(tmp_path_factory, "bert-pt2", CHECKPOINTS["bert"]())
    output = source / "model.pt2"
    assert main(["convert", str(source), "-o", str(output)]) == EXIT_OK
    program = torch.export.load(str(output))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "attnopt.attention.default" in targets
    ids = torch.randint(0, 100, (1, 16))
    module = program.module()
    assert module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False) is not None


@pytest.mark.parametrize("extra, message", [
    (["--policy", "fastest"], "unknown policy"),
    (["-o", "model.txt"], "must end in"),
])
def test_convert_bad_arguments_exit_2(bert_dir, tmp_path, capsys, extra, message):
    output = ["-o", str(tmp_path / "model.onnx")] if "-o" not in extra else []
    assert main(["convert", str(bert_dir), *output, *extra]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


def test_convert_refuses_to_overwrite_without_force(bert_dir, tmp_path, capsys):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"keep me")
    assert main(["convert", str(bert_dir), "-o", str(output)]) == EXIT_BAD_INPUT
    assert "--force" in capsys.readouterr().err and output.read_bytes() == b"keep me"
    assert main(["convert", str(bert_dir), "-o", str(output), "--force"]) == EXIT_OK
    assert output.read_bytes() != b"keep me"


def test_bench_prints_pytorch_and_onnxruntime_latency(bert_dir, capsys):
    assert main(["bench", str(bert_dir), "--seq-len", "16", "--runs", "2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "| PyTorch |" in out and "| onnxruntime |" in out and "2 site(s) rewritten" in out


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing", "no such directory"),
    (lambda d: (d / "config.json").write_text("{}") and d, "no weights"),
])
def test_convert_bad_checkpoint_writes_nothing(tmp_path, capsys, setup, message):
    source = setup(tmp_path)
    output = tmp_path / "out.onnx"
    assert main(["convert", str(source), "-o", str(output)]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err and not output.exists()


def test_convert_corrupt_safetensors_writes_nothing(bert_dir, tmp_path, capsys):
    for item in bert_dir.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    next(tmp_path.glob("*.safetensors")).write_bytes(b"not a safetensors file")
    output = tmp_path / "out.onnx"
    assert main(["convert", str(tmp_path), "-o", str(output)]) == EXIT_BAD_INPUT
    assert "attnopt: error:" in capsys.readouterr().err and not output.exists()


def test_convert_with_the_compact_preset_writes_a_smaller_onnx(bert_dir, tmp_path, capsys):
    """Random-weight heads are independent: the guard takes back pruning and GQA, keeps the
    int8 projections; the file is smaller and runs in onnxruntime."""
    exact, compact = tmp_path / "exact.onnx", tmp_path / "compact.onnx"
    report = tmp_path / "report.json"
    assert main(["convert", str(bert_dir), "-o", str(exact)]) == EXIT_OK
    assert main(["convert", str(bert_dir), "-o", str(compact), "--policy", "compact",
                 "--report", str(report)]) == EXIT_OK
    assert "onnxruntime vs PyTorch: passed" in capsys.readouterr().out
    data = json.loads(report.read_text())
    sites = [s for s in data["sites"] if s.get("approximation")]
    assert len(sites) == 2
    assert all("int8" in s["approximation"]["weights"] for s in sites)
    assert data["parameters"]["after_bytes"] < data["parameters"]["before_bytes"]
    assert compact.stat().st_size < exact.stat().st_size
