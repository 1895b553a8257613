"""The warp-specialized Hopper forward (`attnopt/kernels/flash_hopper.py`).

On a Hopper GPU, each supported spec is checked against the float64 reference: the output, the
log-sum-exp, and the gradients, since the backward reads this forward's log-sum-exp. The specs
are head dims 64 and 128, fp16 and bf16, no mask and both causal alignments, GQA, lengths that
are not tile multiples, (B, S, H, D) views, ALiBi slopes and causal windows, and few persistent
programs walking many query tiles each; every case with the config its length takes, and at a
head dim with a short config (`SHORT_CONFIGS`) with the long one too. Elsewhere (CI) the tests
check which calls route to the kernel (`spec_reason`) with which config, and that every
shipped config compiles for sm_90 with the installed Triton within an H100's shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from attnopt.kernels import BlockSparseLayout, flash_attention, flash_attention_reference
from attnopt.kernels.params import AttentionParams

# skipped without Gluon only: a kernel module that fails to import otherwise fails here
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper",
                    reason="needs Gluon (Triton >= 3.5)")
from attnopt.kernels import flash_hopper  # noqa: E402

#: max |kernel - float64 reference|, per dtype (unit-normal inputs, outputs O(1))
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
#: max |log-sum-exp error| (float32 statistics of the rounded scores)
LSE_TOLERANCE = 1e-4
#: max |gradient error| relative to the reference gradient's largest entry
GRAD_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
H100_SHARED_MEMORY = 232448  # bytes a block may use on sm_90

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU")


def _draw(generator, shape, dtype, device, bshd=False):
    if bshd:  # (B, S, H, D) memory seen as (B, H, S, D), as models' transposed projections
        b, h, s, d = shape
        return torch.randn(b, s, h, d, generator=generator).to(device, dtype).transpose(1, 2)
    return torch.randn(*shape, generator=generator).to(device, dtype)


def _inputs(seed, *, heads=4, kv_heads=4, q_len=256, kv_len=256, head_dim=64,
            dtype=torch.bfloat16, device="cuda", bshd=False):
    generator = torch.Generator().manual_seed(seed)
    return (_draw(generator, (2, heads, q_len, head_dim), dtype, device, bshd),
            _draw(generator, (2, kv_heads, kv_len, head_dim), dtype, device, bshd),
            _draw(generator, (2, kv_heads, kv_len, head_dim), dtype, device, bshd))


def _params(q, k, v, **options):
    options = dict(dict(causal=False, scale=None, attn_bias=None, kv_lengths=None, window=None,
                        block_mask=None, softcap=None, alibi_slopes=None,
                        causal_alignment="top_left"), **options)
    return AttentionParams.build(q, k, v, **options)


# --------------------------------------------------------------------------- routing (CPU)

ACCEPTED = {
    "plain_64": (dict(head_dim=64), {}),
    "causal_128_fp16": (dict(head_dim=128, dtype=torch.float16), dict(causal=True)),
    "causal_bottom_right": (dict(q_len=100, kv_len=300), dict(causal=True,
                                                              causal_alignment="bottom_right")),
    "gqa_uneven_lengths": (dict(heads=8, kv_heads=2, q_len=200, kv_len=333), {}),
    "bshd_views": (dict(bshd=True), dict(causal=True)),
    "alibi_causal": (dict(head_dim=128), dict(causal=True, alibi_slopes=torch.rand(4))),
    "causal_window": (dict(head_dim=128), dict(causal=True, window=(64, 0))),
    "band_ending_at_the_diagonal": (dict(), dict(window=(64, 0))),
}

REJECTED = {
    "float32": (dict(dtype=torch.float32), {}, "dtype"),
    "head_dim_96": (dict(head_dim=96), {}, "head dim"),
    "additive_bias": (dict(), dict(attn_bias=torch.randn(256, 256)), "bias"),
    "softcap": (dict(), dict(softcap=30.0), "soft-cap"),
    "kv_lengths": (dict(), dict(kv_lengths=torch.tensor([100, 256], dtype=torch.int32)),
                   "lengths"),
    "window_past_the_diagonal": (dict(), dict(window=(64, 10)), "band"),
    "window_rows_past_the_keys": (dict(q_len=300, kv_len=100), dict(causal=True, window=(50, 0)),
                                  "window"),
    "block_layout": (dict(), dict(block_mask=BlockSparseLayout(torch.ones(1, 1, 2, 2, dtype=torch.bool),
                                                               128)), "layout"),
    "no_keys": (dict(kv_len=0), {}, "empty"),
    "rows_without_keys": (dict(q_len=300, kv_len=100),
                          dict(causal=True, causal_alignment="bottom_right"), "offset"),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_spec_accepted(name):
    shape, options = ACCEPTED[name]
    q, k, v = _inputs(1, device="cpu", **shape)
    assert flash_hopper.spec_reason(q, k, v, _params(q, k, v, **options)) is None


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_spec_rejected(name):
    shape, options, words = REJECTED[name]
    q, k, v = _inputs(1, device="cpu", **shape)
    reason = flash_hopper.spec_reason(q, k, v, _params(q, k, v, **options))
    assert reason is not None and words in reason


def test_misaligned_tensor_rejected():
    """TMA needs 16-byte-aligned addresses and strides: a view one element in is refused."""
    wide = torch.randn(2, 4, 256, 72).to(torch.bfloat16)
    q = wide[..., 1:65]
    reason = flash_hopper.spec_reason(q, q, q, _params(q, q, q))
    assert reason is not None and "aligned" in reason


def test_tma_operands_are_copies_only_where_needed():
    """`tma_operand`: a tensor TMA can address as it is, else a contiguous aligned copy, also
    of a contiguous tensor 2 bytes past an aligned address (which `contiguous()` keeps)."""
    aligned = torch.randn(2, 4, 64, 64).to(torch.float16)
    assert flash_hopper.tma_operand(aligned) is aligned
    bshd = aligned.transpose(1, 2)  # strides TMA takes: no copy
    assert flash_hopper.tma_operand(bshd) is bshd
    storage = torch.empty(aligned.numel() + 8, dtype=torch.float16)
    shifted = storage[1:aligned.numel() + 1].view(aligned.shape)
    shifted.copy_(aligned)
    broadcast = aligned[:, :1].expand(2, 4, 64, 64)
    for t in (shifted, broadcast):
        copied = flash_hopper.tma_operand(t)
        assert not flash_hopper.tma_ready(t) and flash_hopper.tma_ready(copied)
        assert torch.equal(copied, t)


def test_short_sequences_stay_on_the_triton_kernel():
    for (head_dim, causal), shortest in flash_hopper.MIN_LENGTH.items():
        q, k, v = _inputs(3, head_dim=head_dim, q_len=shortest, kv_len=shortest, device="cpu")
        assert flash_hopper.length_reason(_params(q, k, v, causal=causal)) is None
        q, k, v = _inputs(3, head_dim=head_dim, q_len=shortest // 2, kv_len=shortest,
                          device="cpu")
        assert "shorter" in flash_hopper.length_reason(_params(q, k, v, causal=causal))
    q, k, v = _inputs(3, head_dim=128, q_len=4096, kv_len=4096, device="cpu")
    assert flash_hopper.length_reason(_params(q, k, v, causal=True, window=(1023, 0))) is None
    assert "band" in flash_hopper.length_reason(_params(q, k, v, causal=True, window=(255, 0)))


def test_repeat_descriptors_match_triton_s_constructor(monkeypatch):
    """`flash_hopper.descriptor` builds the descriptors after the first of a (dtype, block,
    layout) without Triton's checks: every field Triton's launcher reads is what the
    constructor gives; an empty tensor still goes through the constructor (and its refusal)."""
    import dataclasses
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    monkeypatch.setattr(flash_hopper, "_CHECKED", set())
    first, second = (torch.randn(2, 4, 128, 64).to(torch.float16) for _ in range(2))
    flash_hopper._descriptor(first, 64)
    made = flash_hopper._descriptor(second, 64)
    block = [1, 1, 64, 64]
    checked = TensorDescriptor(second, second.shape, second.stride(), block,
                               flash_hopper._shared_layout(second.dtype, tuple(block)))
    for field in dataclasses.fields(TensorDescriptor):
        if field.name == "base":
            assert made.base is checked.base
        else:
            assert getattr(made, field.name) == getattr(checked, field.name), field.name
    with pytest.raises(AssertionError, match="positive"):
        flash_hopper._descriptor(torch.empty(0, 4, 128, 64, dtype=torch.float16), 64)


def test_configs_name_a_consumer_count_the_kernel_has():
    with pytest.raises(ValueError, match="consumers=5"):
        flash_hopper.HopperConfig(block_n=64, stages=2, overlap=False, consumers=5, q_buffers=1)


def test_off_cuda_and_switched_off(monkeypatch):
    q, k, v = _inputs(2, device="cpu")
    assert "CUDA" in flash_hopper.hopper_reason(q, k, v, _params(q, k, v))
    monkeypatch.setenv(flash_hopper.ENV, "0")
    assert flash_hopper.ENV in flash_hopper.hopper_reason(q, k, v, _params(q, k, v))


_SM90_PRELUDE = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

def descriptor(rows, head_dim):
    block = [1, 1, rows, head_dim]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
    return f"tensordesc<bf16[1, 1, {rows}, {head_dim}],{layout!r}>"

def compile_sm90(kernel, signature, constants, maxnreg):
    compiled = triton.compile(GluonASTSource(kernel, signature, constants),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, maxnreg=maxnreg))
    return [len(compiled.asm["cubin"]), compiled.metadata.shared]

results = {}
"""

_COMPILE_SCRIPT = """
from attnopt.kernels import flash_hopper
for head_dim, config in flash_hopper.shipped_configs():
    for causal in (False, True):
        signature = {"q_desc": descriptor(64, head_dim), "k_desc": descriptor(config.block_n, head_dim),
                     "v_desc": descriptor(config.block_n, head_dim), "o_desc": descriptor(64, head_dim),
                     "lse_ptr": "*fp32", "slopes_ptr": "*fp32", "heads": "i32", "group": "i32",
                     "seq_q": "i32", "seq_k": "i32", "offset": "i32", "window_left": "i32",
                     "qk_scale": "fp32", "stride_sb": "i32", "stride_sh": "i32",
                     "n_units": "i32", "units_per_head": "i32", "n_m": "i32"}
        maxnreg, consumer_regs = config.registers()
        constants = dict(BLOCK_N=config.block_n, HEAD_DIM=head_dim, STAGES=config.stages,
                         OVERLAP=config.overlap, CONSUMERS=config.consumers,
                         Q_BUFFERS=config.q_buffers, CAUSAL=causal,
                         HAS_WINDOW=causal, HAS_ALIBI=causal, CONSUMER_REGS=consumer_regs)
        results[f"{head_dim}-{config}-{causal}"] = compile_sm90(
            flash_hopper._hopper_forward_kernel, signature, constants, maxnreg)
"""


def _fresh_process(script: str, timeout: int) -> subprocess.CompletedProcess:
    """`script` run by this Python in a new process, outside the tests' interpreter mode."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout)


def check_compiles_for_sm90(script: str, configs: list) -> None:
    """`script` (after `_SM90_PRELUDE`, filling `results` with `compile_sm90`'s answers) builds
    each config plain and causal for sm_90 with the installed Triton, within an H100's shared
    memory. In a fresh process: the tests' interpreter mode would hand Gluon interpreted
    helpers."""
    done = _fresh_process(_SM90_PRELUDE + script + 'print("RESULTS", json.dumps(results))\n',
                          timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[0][len("RESULTS "):])
    assert len(results) == 2 * len(configs)
    for name, (cubin_bytes, shared) in results.items():
        assert cubin_bytes > 0, name
        assert 0 < shared <= H100_SHARED_MEMORY, f"{name}: {shared} bytes of shared memory"


def check_register_split(configs: list) -> None:
    """Each config's consumers' setmaxnreg budget plus the producer warpgroup's fits the
    register file (a consumer asking for more than is freed would wait forever)."""
    for config in configs:
        maxnreg, consumer = config.registers()
        threads = 128 * (config.consumers + 1)
        assert maxnreg * threads <= flash_hopper.REGISTER_FILE
        assert consumer * 128 * config.consumers + 128 * flash_hopper.PRODUCER_REGS \
            <= flash_hopper.REGISTER_FILE


def test_compiles_for_sm90():
    """The kernel builds for sm_90 (each shipped config, plain and causal with a window and
    ALiBi) within an H100's shared memory; the GPU tests run it under the GPU machine's
    Triton."""
    check_compiles_for_sm90(_COMPILE_SCRIPT, _shipped())


def test_register_split_fits_the_register_file():
    check_register_split(_shipped())


def _shipped() -> list:
    return [config for _, config in flash_hopper.shipped_configs()]


# --------------------------------------------------------------------------- numerics (GPU)

GPU_CASES = {
    "plain_64_bf16": (dict(head_dim=64), {}),
    "plain_128_fp16": (dict(head_dim=128, dtype=torch.float16), {}),
    "causal_64_fp16": (dict(head_dim=64, dtype=torch.float16), dict(causal=True)),
    "causal_128_bf16": (dict(head_dim=128), dict(causal=True)),
    "causal_bottom_right_128": (dict(head_dim=128, q_len=100, kv_len=300),
                                dict(causal=True, causal_alignment="bottom_right")),
    "causal_top_left_longer_keys": (dict(q_len=200, kv_len=300), dict(causal=True)),
    "gqa_uneven_lengths_128": (dict(head_dim=128, heads=8, kv_heads=2, q_len=200, kv_len=333),
                               {}),
    "bshd_causal_uneven_64": (dict(bshd=True, q_len=333, kv_len=333), dict(causal=True)),
    "scale": (dict(head_dim=128, q_len=130, kv_len=129), dict(scale=0.3)),
    "alibi_causal_bottom_right_per_batch": (
        dict(head_dim=128, heads=8, kv_heads=2, q_len=200, kv_len=333),
        dict(causal=True, causal_alignment="bottom_right", alibi_slopes=torch.rand(2, 8))),
    "alibi_plain_64_fp16": (dict(head_dim=64, dtype=torch.float16, q_len=150, kv_len=270),
                            dict(alibi_slopes=torch.rand(4))),
    "window_causal_128": (dict(head_dim=128, q_len=333, kv_len=333),
                          dict(causal=True, window=(70, 0))),
    "window_bottom_right_alibi_gqa_64": (
        dict(heads=8, kv_heads=2, q_len=200, kv_len=400),
        dict(causal=True, causal_alignment="bottom_right", window=(100, 0),
             alibi_slopes=torch.rand(8))),
}


def _on_gpu(case):
    shape, options = case
    return shape, {key: value.cuda() if isinstance(value, torch.Tensor) else value
                   for key, value in options.items()}


def count_calls(monkeypatch, module, name: str, params_at: int) -> list:
    """The params of each call of `module.name` (positional argument `params_at`) from now on."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[params_at])
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def no_min_length(monkeypatch, module) -> None:
    """`module.MIN_LENGTH` at 1 for every key: the small test shapes route there too."""
    monkeypatch.setattr(module, "MIN_LENGTH", dict.fromkeys(module.MIN_LENGTH, 1))


@pytest.fixture
def routed(monkeypatch):
    """The params of the calls that run on the Hopper kernel."""
    return count_calls(monkeypatch, flash_hopper, "hopper_forward", 3)


@pytest.fixture
def spy(routed, monkeypatch):
    """`routed`, with the small test shapes running on the Hopper kernel too."""
    no_min_length(monkeypatch, flash_hopper)
    return routed


def _head_dim(name: str) -> int:
    return GPU_CASES[name][0].get("head_dim", 64)


#: each case with the config its length takes, and the head dims with a short config again
#: with their long config ("long": SHORT_CONFIGS emptied)
CONFIG_CASES = [(name, "by_length") for name in sorted(GPU_CASES)] + [
    (name, "long") for name in sorted(GPU_CASES)
    if _head_dim(name) in {head_dim for head_dim, _ in flash_hopper.SHORT_CONFIGS}]


def _take_configs(choice: str, monkeypatch) -> None:
    if choice == "long":
        monkeypatch.setattr(flash_hopper, "SHORT_CONFIGS", {})


def test_short_configs_take_short_calls():
    """Below a short config's length (a window's band counting), calls take it; from there on,
    their head dim's config."""
    for (head_dim, causal), (length, short) in flash_hopper.SHORT_CONFIGS.items():
        q, k, v = _inputs(4, head_dim=head_dim, q_len=length - 1, kv_len=length, device="cpu")
        assert flash_hopper.config_for(_params(q, k, v, causal=causal)) == short
        q, k, v = _inputs(4, head_dim=head_dim, q_len=length, kv_len=length, device="cpu")
        assert flash_hopper.config_for(_params(q, k, v, causal=causal)) \
            == flash_hopper.CONFIGS[head_dim]
        if causal:
            window = (length // 2, 0)
            assert flash_hopper.config_for(_params(q, k, v, causal=True, window=window)) == short
    # head dim 128 at 1K: the short config under a causal mask only
    q, k, v = _inputs(4, head_dim=128, q_len=1024, kv_len=1024, device="cpu")
    assert flash_hopper.config_for(_params(q, k, v)) == flash_hopper.CONFIGS[128]
    assert flash_hopper.config_for(_params(q, k, v, causal=True)) \
        == flash_hopper.SHORT_CONFIGS[128, True][1]


@needs_hopper
@pytest.mark.parametrize("name, configs", CONFIG_CASES)
def test_forward_matches_reference(name, configs, spy, monkeypatch):
    from attnopt.kernels.flash import flash_forward
    _take_configs(configs, monkeypatch)
    shape, options = _on_gpu(GPU_CASES[name])
    q, k, v = _inputs(sum(map(ord, name)), **shape)
    params = _params(q, k, v, **options)
    out, lse = flash_forward(q, k, v, params)
    assert len(spy) == 1
    reference = flash_attention_reference(q.double(), k.double(), v.double(), **options)
    assert torch.isfinite(out).all()
    error = (out.double() - reference).abs().max().item()
    assert error <= TOLERANCE[q.dtype], f"{name}: max error {error:.2e}"

    # log-sum-exp of the scaled scores, base 2, from the rounded inputs
    qf, kf = q.double(), k.double().repeat_interleave(params.group, dim=1)
    scores = qf @ kf.transpose(-1, -2) * params.scale
    rows = torch.arange(params.q_len, device=q.device)[:, None]
    cols = torch.arange(params.kv_len, device=q.device)[None, :]
    if params.slopes_BH is not None:
        distance = (rows + params.offset - cols).abs().double()
        scores = scores - params.slopes_BH.double()[..., None, None] * distance
    if params.has_right:
        scores = scores.masked_fill(cols > rows + params.offset, float("-inf"))
    if params.has_left:
        scores = scores.masked_fill(cols < rows + params.offset - params.window_left,
                                    float("-inf"))
    expected = torch.logsumexp(scores, dim=-1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    lse_error = (lse.double() - expected).abs().max().item()
    assert lse_error <= LSE_TOLERANCE, f"{name}: log-sum-exp error {lse_error:.2e}"


@needs_hopper
@pytest.mark.parametrize("programs", [1, 3])
@pytest.mark.parametrize("name, configs", [
    case for case in CONFIG_CASES if case[0] in (
        "causal_128_bf16", "causal_bottom_right_128", "bshd_causal_uneven_64",
        "gqa_uneven_lengths_128", "causal_top_left_longer_keys",
        "window_bottom_right_alibi_gqa_64")])
def test_few_programs_take_every_tile(name, configs, programs, monkeypatch):
    """With fewer persistent programs than work units, each walks many query tiles: the Q and
    K/V rings wrap across tiles, and the pairs of query blocks (an odd count among them) all
    get computed, with consumers whose rows end a key tile early, start late (a window) or
    lie past the end passing tiles they do not read. Output and log-sum-exp are bit-equal to
    one program per SM's."""
    _take_configs(configs, monkeypatch)
    shape, options = _on_gpu(GPU_CASES[name])
    q, k, v = _inputs(sum(map(ord, name)) + 2, **shape)
    params = _params(q, k, v, **options)
    out, lse = flash_hopper.hopper_forward(q, k, v, params)
    few_out, few_lse = flash_hopper.hopper_forward(q, k, v, params, programs=programs)
    assert torch.equal(few_out, out) and torch.equal(few_lse, lse)
    reference = flash_attention_reference(q.double(), k.double(), v.double(), **options)
    error = (out.double() - reference).abs().max().item()
    assert error <= TOLERANCE[q.dtype], f"{name}: max error {error:.2e}"


@needs_hopper
@pytest.mark.parametrize("name", ["causal_128_bf16", "gqa_uneven_lengths_128",
                                  "bshd_causal_uneven_64", "plain_128_fp16",
                                  "alibi_causal_bottom_right_per_batch", "alibi_plain_64_fp16",
                                  "window_bottom_right_alibi_gqa_64"])
def test_gradients_through_hopper_forward(name, spy):
    """The backward kernels run on this forward's output and log-sum-exp."""
    shape, options = _on_gpu(GPU_CASES[name])
    q, k, v = (t.detach().requires_grad_() for t in _inputs(sum(map(ord, name)) + 1, **shape))
    grad = torch.randn_like(q)
    flash_attention(q, k, v, **options).backward(grad)
    assert len(spy) == 1
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    flash_attention_reference(q64, k64, v64, **options).backward(grad.double())
    for got, want, label in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"),
                             (v.grad, v64.grad, "dv")):
        error = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert error <= GRAD_TOLERANCE[q.dtype], f"{name} {label}: relative error {error:.2e}"


@needs_hopper
def test_unsupported_specs_run_the_triton_kernel(spy):
    q, k, v = _inputs(5, head_dim=64)
    bias = torch.randn(256, 256, device="cuda", dtype=q.dtype)
    out = flash_attention(q, k, v, attn_bias=bias)
    assert spy == []
    reference = flash_attention_reference(q.double(), k.double(), v.double(),
                                          attn_bias=bias.double())
    assert (out.double() - reference).abs().max().item() <= TOLERANCE[q.dtype]


@needs_hopper
@pytest.mark.parametrize("head_dim, causal", sorted(flash_hopper.MIN_LENGTH))
def test_long_calls_route_by_default(head_dim, causal, routed):
    """At MIN_LENGTH with the shipped configs (no test override), `flash_attention` runs here."""
    length = flash_hopper.MIN_LENGTH[head_dim, causal]
    generator = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(1, 2, length, head_dim, generator=generator).to("cuda", torch.bfloat16)
               for _ in range(3))
    out = flash_attention(q, k, v, causal=causal)
    assert len(routed) == 1
    reference = flash_attention_reference(q.double(), k.double(), v.double(), causal=causal)
    assert (out.double() - reference).abs().max().item() <= TOLERANCE[q.dtype]


def test_kernels_import_without_gluon():
    """On a Triton without Gluon the kernels package still imports, with the Hopper path off
    (`flash.flash_hopper` None): checked in a fresh process with Gluon's import blocked."""
    done = _fresh_process("import sys; sys.modules['triton.experimental.gluon'] = None\n"
                          "import attnopt.kernels.flash as flash\n"
                          "print('HOPPER', flash.flash_hopper)\n", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HOPPER None" in done.stdout
