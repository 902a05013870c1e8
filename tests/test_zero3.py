"""DeepSpeed ZeRO-3 on CPU (gloo), with 2 and 3 ranks: sharded init, partitioning,
agreement with a single process, resume, export and fp32 trainables under bf16; and the
multi-node launch path (two nodes of one rank each on one host, ``--no_ssh --node_rank``).

Each world size is one `deepspeed` launch of tests/dist/zero3_job.py (start-up costs
~20-30 s on 2 cores); this file only asserts on what the job recorded.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_resumed_like_uninterrupted, assert_same_adapter, assert_chat_run_like_one_process, assert_same_peft_export, free_port, save_tiny_llama_with_real_tokenizer
from safetensors.torch import load_file

import svd_scale
from svd_scale.config import load_config
from svd_scale.training import run

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "dist" / "zero3_job.py"
TOL_LOSS = 1e-4  # relative: fp32 both ways; only the gradient all-reduce order differs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama (untied embeddings) with SmolLM2's real tokenizer."""
    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny_llama"), tie_word_embeddings=False)


def _launch(n: int, model: str, out: Path, *flags: str) -> Path:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", str(n), "--master_port", str(free_port()), str(JOB),
           "--model", model, "--out", str(out), *flags]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        pytest.fail(f"deepspeed job failed ({p.returncode}):\n{(p.stdout + p.stderr)[-6000:]}")
    return out


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """The same tiny Llama with tied embeddings (as SmolLM2, the quickstart's model)."""
    return save_tiny_llama_with_real_tokenizer(tmp_path_factory.mktemp("tiny_llama_tied"), tie_word_embeddings=True)


@pytest.fixture(scope="module")
def world2(model_dir, tied_model_dir, tmp_path_factory):
    return 2, _launch(2, model_dir, tmp_path_factory.mktemp("z3_w2"), "--train", "--resume", "--bf16", "--methods", "--nf4",
                      "--tied-model", tied_model_dir)


@pytest.fixture(scope="module")
def world3(model_dir, tmp_path_factory, world2):
    """Also resumes the 2-rank run's checkpoint-5 with 3 ranks (svd_scale converts it to DeepSpeed's
    universal format)."""
    return 3, _launch(3, model_dir, tmp_path_factory.mktemp("z3_w3"), "--train", "--resume-from", str(world2[1] / "train"))


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """The single-process reference with the jobs' global batch (the same at every world size)."""
    sys.path.insert(0, str(JOB.parent))
    from zero3_job import GLOBAL_BATCH

    out = tmp_path_factory.mktemp("single")
    ref = run(load_config(None, (f"model={model_dir}", "rank=8", "train.eval_examples=0", "train.logging_steps=1",
                                 "train.max_length=48", f"train.batch_size={GLOBAL_BATCH}", "train.lr=1e-2",
                                 "train.max_steps=10", f"train.output_dir={out}"))), out
    return {2: ref, 3: ref}


@pytest.fixture(params=["world2", "world3"])
def job(request):
    return request.getfixturevalue(request.param)


def _facts(out: Path, world: int) -> list:
    return _facts_named(out, "init", world)


def _facts_named(out: Path, name: str, world: int) -> list:
    return [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(world)]


def test_every_rank_holds_identical_factors_equal_to_a_single_process_init(job, model_dir):
    world, out = job
    states = [load_file(str(out / f"init_rank{r}.safetensors")) for r in range(world)]
    assert all(set(s) == set(states[0]) for s in states)
    for s in states[1:]:
        assert all(torch.equal(s[k], states[0][k]) for k in s)
    from transformers import AutoModelForCausalLM
    ref = svd_scale.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          svd_scale.AdapterConfig(rank=8, svd="full"))
    from svd_scale.io import adapter_state_dict
    expected = adapter_state_dict(ref)
    assert set(expected) == set(states[0])
    for k, v in expected.items():
        torch.testing.assert_close(states[0][k], v, atol=1e-6, rtol=1e-6)


def test_a_users_own_deepspeed_script_gets_single_process_factors_and_steps(job, model_dir):
    """The plugin use: the user's script builds the model under zero.Init (HfDeepSpeedConfig +
    from_pretrained) and calls ``svd_scale.apply(model, cfg)`` with no access argument. Its factors
    equal a single-process init, and its own DeepSpeed AdamW loop (one sequence per rank) equals
    one process stepping on the mean loss over those sequences."""
    from transformers import AutoModelForCausalLM
    from svd_scale.io import adapter_state_dict
    sys.path.insert(0, str(JOB.parent))
    from zero3_job import METHOD_BATCH, USER_STEPS

    world, out = job
    facts = [json.loads((out / f"user_rank{r}.json").read_text()) for r in range(world)]
    assert all(f["partitioned_before_apply"] for f in facts)
    ref = svd_scale.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          svd_scale.AdapterConfig(rank=8, svd="full"))
    for r in range(world):
        got = load_file(str(out / f"user_init_rank{r}.safetensors"))
        for k, v in adapter_state_dict(ref).items():
            torch.testing.assert_close(got["init." + k], v, atol=1e-6, rtol=1e-6)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(USER_STEPS):
        losses = [ref(input_ids=METHOD_BATCH[r:r + 1], labels=METHOD_BATCH[r:r + 1]).loss for r in range(world)]
        for r in range(world):
            assert facts[r]["losses"][step] == pytest.approx(float(losses[r].detach()), rel=1e-4)
        torch.stack(losses).mean().backward()
        opt.step()
        opt.zero_grad()
    saved = load_file(str(out / "user_adapter" / "svd_scale_adapter.safetensors"))
    for k, v in adapter_state_dict(ref).items():
        torch.testing.assert_close(saved[k], v, atol=1e-5, rtol=1e-4)


def test_a_users_own_script_with_the_speedups_trains_the_same_steps(world2):
    """The plugin user's script with ``add_speed_defaults(ds, compile=True)`` and ``speed_up_layers``
    (leaf decoder layers, compiled forwards, gradient checkpointing) takes the same steps as the plain
    script (rel 1e-4; fp32, only the compiled kernels differ), without recompiling."""
    world, out = world2
    for r in range(world):
        plain = json.loads((out / f"user_rank{r}.json").read_text())
        fast = json.loads((out / f"user_fast_rank{r}.json").read_text())
        assert fast["added"]["memory_efficient_linear"] is False and "stage3_param_persistence_threshold" in fast["added"]
        assert fast["done"] == {"leaf_modules": "LlamaDecoderLayer", "compiled_layers": 2} and all(fast["compiled"])
        # torch's own F.linear (the plain script's zero.Init left DeepSpeed's in this process); one batch shape:
        # the first step compiles, later steps and the second layer reuse it
        assert fast["torch_linear"] and fast["graphs"] > 0 and fast["recompile_reasons"] == []
        assert plain["losses"][0] != plain["losses"][-1]
        assert fast["losses"] == pytest.approx(plain["losses"], rel=1e-4)


def test_the_defaults_hold_no_layer_gathered_between_forward_and_backward(world2):
    """With the engine's ZeRO-3 defaults (no prefetch, no reuse window) no decoder layer is still gathered at
    the end of the forward; a prefetch bucket the user sets is kept, and then DeepSpeed holds layers into the
    backward (what made the per-GPU peak exceed one process's: bench/results/zero3_memory_H200x4.md)."""
    world, out = world2
    for r in range(world):
        held = json.loads((out / f"held_rank{r}.json").read_text())
        d, u = held["defaults"], held["user_prefetch"]
        assert {"stage3_prefetch_bucket_size", "stage3_max_reuse_distance"} <= set(d["added"])
        assert "stage3_prefetch_bucket_size" not in u["added"]  # the user's value stays
        assert d["partitioned"] > 0 and d["layers"] == 2
        assert d["held_after_forward"] == [0, 0, 0, 0]
        assert max(u["held_after_forward"][2:]) > 0  # the check sees held layers when there are some


def test_outputs_equal_the_base_model_after_sharded_init(job):
    world, out = job
    for f in _facts(out, world):
        assert f["max_abs_logit_diff_vs_base"] < 1e-4


def test_model_is_partitioned_from_load_to_training(job):
    world, out = job
    for f in _facts(out, world):
        # loaded partitioned (zero.Init): each rank stores ~1/world of the base ...
        assert f["base_local"] <= f["base_total"] / world * 1.02 + 64 * world
        # ... and after deepspeed.initialize, of everything including the adapter
        assert f["local"] <= f["total"] / world * 1.02 + 64 * world
        # during init at most max_group whole weights were gathered at once, never the model
        assert f["peak_gathered_numel"] <= f["max_group"] * f["max_weight_numel"]
        assert f["peak_gathered_numel"] < f["model_weight_numel"] / 10
        # the adapters' frozen factors are whole buffers on every rank (fewer tensors for DeepSpeed to
        # release and re-gather each step); the trainables stay ZeRO-3 parameters
        assert f["buffers"] == ["U", "Vh", "sigma0"] and f["zero_params"] == ["scale", "sigma_delta"]
        assert f["replicated_bytes"] > 0


def test_losses_match_a_single_process_run(job, single):
    world, out = job
    ref_metrics, _ = single[world]
    name = "metrics_uninterrupted.json" if (out / "metrics_uninterrupted.json").exists() else "train/metrics.json"
    got = json.loads((out / name).read_text())
    assert got["engine"] == "deepspeed" and got["world_size"] == world
    a = torch.tensor([l for _, l in got["losses"]])
    b = torch.tensor([l for _, l in ref_metrics["losses"]])
    assert len(a) == len(b) == 10
    torch.testing.assert_close(a, b, rtol=TOL_LOSS, atol=0)


def test_exported_adapter_is_fp32_and_equals_the_single_process_one(job, single, model_dir, tmp_path):
    world, out = job
    adapter = out / ("adapter_uninterrupted" if (out / "adapter_uninterrupted").exists() else "train/adapter")
    got = load_file(str(adapter / "svd_scale_adapter.safetensors"))
    ref = load_file(str(single[world][1] / "adapter" / "svd_scale_adapter.safetensors"))
    assert set(got) == set(ref) and len(got) > 0
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].numel() > 0
        if k.endswith((".sigma", ".sigma_delta", ".scale")):
            assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-3)
    moved = max((got[k] - load_file(str(out / "init_rank0.safetensors"))[k]).abs().max() for k in got if k.endswith(".sigma_delta"))
    assert moved > 1e-4  # training really changed sigma, so the comparison above means something
    assert_same_peft_export(single[world][1] / "adapter", adapter, model_dir, tmp_path, atol=1e-4, rtol=1e-3)


def test_decoder_layer_leaf_modules_with_checkpointing_train_like_one_process(job, model_dir, tmp_path):
    """With gradient checkpointing the ZeRO-3 engine fetches each decoder layer whole (DeepSpeed leaf
    modules, for speed); the losses still equal a single process with checkpointing."""
    sys.path.insert(0, str(JOB.parent))
    from zero3_job import GLOBAL_BATCH

    world, out = job
    got = json.loads((out / "checkpointed" / "metrics.json").read_text())
    assert got["zero3_leaf_modules"] == "LlamaDecoderLayer"
    ref = run(load_config(None, (f"model={model_dir}", "rank=8", "train.eval_examples=0", "train.logging_steps=1",
                                 "train.max_length=48", f"train.batch_size={GLOBAL_BATCH}", "train.lr=1e-2",
                                 "train.max_steps=4", "train.gradient_checkpointing=true", f"train.output_dir={tmp_path}")))
    torch.testing.assert_close(torch.tensor([l for _, l in got["losses"]]), torch.tensor([l for _, l in ref["losses"]]),
                               rtol=TOL_LOSS, atol=0)
    plain = json.loads((out / ("metrics_uninterrupted.json" if world == 2 else "train/metrics.json")).read_text())
    assert "zero3_leaf_modules" not in plain  # without checkpointing DeepSpeed's leaf mode breaks backward


def test_compiled_layers_train_under_zero3_like_eager(world2):
    """train.compile under ZeRO-3: each decoder layer's forward compiled, DeepSpeed's fetch/release hooks
    eager; the losses and adapter equal the eager run with the same checkpointing, and the compiled
    code serves every layer: dynamo recompiles only for new batch shapes and for the held-out evaluation
    before and after training (no grad), never per layer (a guard on DeepSpeed's ds_id, which its
    F.linear wrapper causes, would show in the logged reasons)."""
    world, out = world2
    facts = _facts_named(out, "compiled", world)
    assert all(f["forward_compiled"] == [True] * f["layers"] for f in facts)  # really compiled, on every rank
    for f in facts:
        # every graph after the first one of this code was a logged recompilation (so the log was caught) ...
        assert f["graphs"] > 0 and len(f["recompile_reasons"]) >= f["graphs"] - 1, f
        # ... for a new batch shape or the evaluation's no-grad mode only, never for something that differs per
        # layer (a weight's ds_id)
        assert all(("size mismatch" in r or "grad_mode" in r) and "ds_" not in r for r in f["recompile_reasons"]), f
    eager, comp = (json.loads((out / d / "metrics.json").read_text()) for d in ("checkpointed", "compiled"))
    assert comp["compiled_blocks"] == facts[0]["layers"] and "compiled_blocks" not in eager
    assert 0 <= comp["accuracy_before"] <= 1 and 0 <= comp["accuracy_after"] <= 1  # compiled layers evaluate too
    assert comp["median_step_seconds"] > 0 and eager["median_step_seconds"] > 0  # metrics say how fast it trained
    a, b = (torch.tensor([l for _, l in m["losses"]]) for m in (eager, comp))
    assert len(a) == 4 and a[0] != a[-1]
    torch.testing.assert_close(b, a, rtol=TOL_LOSS, atol=0)
    assert_same_adapter(out / "checkpointed" / "adapter", out / "compiled" / "adapter", atol=1e-5, rtol=1e-4)


def test_resume_reproduces_the_uninterrupted_run(world2):
    """The checkpoint kept U, V, sigma0 as ZeRO-3 parameters (train.zero3_replicate_frozen_gib=0, the layout
    before they became buffers); the resumed run, with the default, follows the checkpoint's marker."""
    _, out = world2
    full = json.loads((out / "metrics_uninterrupted.json").read_text())
    resumed = json.loads((out / "train" / "metrics.json").read_text())
    marker = json.loads((out / "train" / "checkpoint-5" / "svd_scale_checkpoint.json").read_text())
    assert marker["zero3_frozen"] == "parameters" and "zero3_replicated_frozen_mib" not in resumed
    # the resumed run also kept every 16-bit residual whole on every rank (train.zero3_replicate_residual_gib=100),
    # where the checkpoint's run had them partitioned (0, the default on CPU)
    assert full["zero3_whole_residual_layers"] == 0 and resumed["zero3_whole_residual_layers"] > 0
    assert_resumed_like_uninterrupted(full, resumed, rel=1e-6)
    assert_same_adapter(out / "adapter_uninterrupted", out / "train" / "adapter", atol=1e-6, rtol=1e-6)


def test_the_data_is_tokenized_once_by_the_first_rank_and_read_from_its_cache(world2):
    """Rank 0 tokenizes the training rows while rank 1 waits (main_process_first), then rank 1 reads
    rank 0's Arrow file; the resumed run tokenizes nothing on any rank."""
    _, out = world2
    from svd_scale.data import load_splits

    n = len(load_splits("builtin:rotten_tomatoes").train)
    counts = [json.loads((out / f"tokenize_rank{r}.json").read_text()) for r in (0, 1)]
    assert counts == [{"first_run": n, "resumed_run": 0}, {"first_run": 0, "resumed_run": 0}]
    from datasets import Dataset

    files = sorted((out / "cache" / "tokenized").glob("tokenized-*.arrow"))  # the job's later runs add their own
    assert files and all(len(Dataset.from_file(str(f))) > 0 for f in files)
    assert not list((out / "cache" / "tokenized").glob("tmp*"))  # no temporary left behind


@pytest.fixture(scope="module")
def two_nodes(model_dir, tmp_path_factory, world2):
    """The multi-node launch path on one host: a hostfile with two nodes of one slot each and one
    ``deepspeed --no_ssh --node_rank K`` launcher per node (what a cluster without ssh between nodes
    runs on each node), rendezvous at 127.0.0.1. The job trains 10 steps, then resumes checkpoint-5."""
    out = tmp_path_factory.mktemp("z3_two_nodes")
    hostfile = out / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    deepspeed, port = Path(sys.executable).with_name("deepspeed"), str(free_port())
    procs = [subprocess.Popen([str(deepspeed), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k),
                               "--master_addr", "127.0.0.1", "--master_port", port, str(JOB), "--model", model_dir,
                               "--out", str(out / "job"), "--train-resume-only"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for k, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            pytest.fail(f"node {k} failed ({p.returncode}):\n{log[-6000:]}")
    return out / "job", world2[1]


def test_two_nodes_train_and_resume_like_one_node(two_nodes):
    """Two nodes x 1 rank: each rank knows its node, the run's losses equal the single-node 2-rank run's,
    and --resume from checkpoint-5 reproduces steps 6-10."""
    out, one_node = two_nodes
    ranks = [json.loads((out / f"node_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(f["rank"], f["world"], f["node_rank"], f["local_rank"]) for f in ranks] == [(0, 2, "0", "0"), (1, 2, "1", "0")]
    full = json.loads((out / "metrics_uninterrupted.json").read_text())
    assert full["engine"] == "deepspeed" and full["world_size"] == 2
    ref = dict(json.loads((one_node / "metrics_uninterrupted.json").read_text())["losses"])
    assert len(full["losses"]) == 10
    for step, loss in full["losses"]:
        assert loss == pytest.approx(ref[step], rel=TOL_LOSS), step
    assert_resumed_like_uninterrupted(full, json.loads((out / "train" / "metrics.json").read_text()), rel=1e-6)


def test_a_checkpoint_resumes_under_another_world_size(world2, world3):
    """2 ranks wrote checkpoint-5, 3 ranks resume it: svd_scale converts it once to DeepSpeed's
    universal format (beside the original) and loads that. Steps 6-10 and the adapter match the
    uninterrupted 2-rank run (observed ~1e-7; with the converted Adam moments zeroed, steps 7-10
    moved by 3.5e-4 to 6e-4 relative, so rel 1e-5 fails then)."""
    _, out2 = world2
    _, out3 = world3
    full = json.loads((out2 / "metrics_uninterrupted.json").read_text())
    resumed = json.loads((out3 / "reworld" / "metrics.json").read_text())
    assert resumed["world_size"] == 3 and full["world_size"] == 2
    ckpt = out3 / "reworld" / "checkpoint-5"
    assert (ckpt / "latest_universal").read_text() == "global_step5_universal"
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left
    assert_resumed_like_uninterrupted(full, resumed, rel=1e-5)
    assert_same_adapter(out2 / "adapter_uninterrupted", out3 / "reworld" / "adapter", atol=1e-5, rtol=1e-4)


def test_bf16_run_keeps_trainables_fp32_in_module_and_optimizer(world2):
    _, out = world2
    m = json.loads((out / "bf16" / "metrics.json").read_text())
    # held-out evaluation ran under ZeRO-3 at both ends, and the export after it still worked
    assert m["accuracy_before"] is not None and m["accuracy_after"] is not None
    assert m["dtypes"]["trainable"] == ["torch.float32"]
    assert m["dtypes"]["optimizer"] == ["torch.float32"]
    assert "torch.bfloat16" in m["dtypes"]["frozen"]  # the base really is bf16
    state = load_file(str(out / "bf16" / "adapter" / "svd_scale_adapter.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith((".sigma", ".sigma_delta", ".scale")))
    assert any(k.endswith(".sigma_delta") for k in state)  # the default trains sigma relatively


@pytest.mark.parametrize("method", sorted(svd_scale.METHODS))
def test_every_method_under_zero3_matches_one_process(world2, model_dir, method):
    """Sharded init equals a single-process init; one ZeRO-3 SGD step over 2 ranks (one
    sequence each, regularizer included) equals one single-process step on both sequences."""
    from transformers import AutoModelForCausalLM
    from svd_scale.io import adapter_state_dict
    sys.path.insert(0, str(JOB.parent))
    from zero3_job import METHOD_BATCH

    world, out = world2
    per_rank = [load_file(str(out / f"method_{method}_rank{r}.safetensors")) for r in range(world)]
    for k in per_rank[0]:
        assert torch.equal(per_rank[1][k], per_rank[0][k]), k  # ranks agree, before and after the step
    model = svd_scale.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                            svd_scale.AdapterConfig(method=method, rank=4, svd="full")).eval()
    init = adapter_state_dict(model)
    for k, v in init.items():
        torch.testing.assert_close(per_rank[0]["init." + k], v, atol=1e-6, rtol=1e-6)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = [model(input_ids=METHOD_BATCH[r:r + 1], labels=METHOD_BATCH[r:r + 1]).loss for r in range(world)]
    reg = svd_scale.regularization_loss(model)
    total = torch.stack(losses).mean() + (reg if reg is not None else 0)
    total.backward()
    opt.step()
    after = adapter_state_dict(model)
    moved = 0.0
    for k, v in after.items():
        torch.testing.assert_close(per_rank[0]["after." + k], v, atol=2e-6, rtol=1e-5)
        moved = max(moved, float((v - init[k]).abs().max()))
    assert moved > 1e-5
    facts = json.loads((out / f"method_{method}_rank0.json").read_text())
    assert (facts["reg"] is None) == (reg is None)
    if reg is not None:
        assert facts["reg"] == pytest.approx(float(reg.detach()), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("tag", ["nf4", "nf4_whole", "nf4_streamed"])
def test_nf4_under_zero3_is_partitioned_identical_on_ranks_and_matches_one_process(world2, model_dir, tag):
    """``nf4``: every 4-bit residual partitioned. ``nf4_whole``: a budget of half the codes' bytes
    (``ZeRO3Access(replicate_residual_gib=...)``): the first layers' codes are whole buffers on every rank, the
    others partitioned -- the same model either way. ``nf4_streamed``: the same budget, the model built by
    ``load_partitioned`` (the engine's NF4 loader) instead of ``svd_scale.apply`` on a dense partitioned base."""
    from transformers import AutoModelForCausalLM
    from svd_scale.io import adapter_state_dict
    sys.path.insert(0, str(JOB.parent))
    from zero3_job import METHOD_BATCH

    world, out = world2
    facts = [json.loads((out / f"{tag}_rank{r}.json").read_text()) for r in range(world)]
    state = [load_file(str(out / f"{tag}_rank{r}.safetensors")) for r in range(world)]
    for f in facts:  # the 4-bit residual is partitioned like any bf16 tensor, never cast
        assert f["local4"] <= f["total4"] / world + 64 and f["weight_dtypes"] == ["torch.bfloat16"]
        if tag == "nf4":
            assert f["whole"] == [] and f["partitioned_layers"] == f["layers"]
        else:  # within the budget, in layer order; the rest partitioned
            assert 0 < len(f["whole"]) < f["layers"] and len(f["whole"]) + f["partitioned_layers"] == f["layers"]
            all4 = json.loads((out / "nf4_rank0.json").read_text())["total4"]  # every layer's codes (bf16 values)
            assert f["whole_bytes"] + 2 * f["total4"] == 2 * all4 and f["whole_bytes"] <= all4  # the budget: half
            assert f["whole"] == facts[0]["whole"] == f["names"][:len(f["whole"])]  # the first layers, in order
    for k in state[0]:  # codes kept whole, quant_state (absmax, code), logits and the stepped adapter agree on every rank
        assert torch.equal(state[1][k], state[0][k]), k
    ref = svd_scale.apply(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          svd_scale.AdapterConfig(rank=8, svd="full", quant="nf4", quant_iters=1))
    # vs. one process only up to LAPACK's thread-count-dependent rounding (the job runs 1 thread)
    for name, l in svd_scale.adapter_layers(ref):
        torch.testing.assert_close(state[0][f"{name}.absmax"], l.base_layer.weight.quant_state.absmax.float(),
                                   rtol=1e-5, atol=1e-7)
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(state[0]["logits"], ref(input_ids=METHOD_BATCH[:2]).logits, atol=1e-4, rtol=0)
    ref.train()
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    torch.stack([ref(input_ids=METHOD_BATCH[r:r + 1], labels=METHOD_BATCH[r:r + 1]).loss for r in range(world)]).mean().backward()
    opt.step()
    for k, v in adapter_state_dict(ref).items():
        torch.testing.assert_close(state[0]["after." + k], v, atol=1e-5, rtol=1e-4)


def test_nf4_built_while_loading_equals_the_dense_load_and_reads_only_each_owners_weights(world2):
    """``load_partitioned`` never loads a target's dense weight (the 70B load peak was every rank's bf16 shards of
    the whole model, bench/results/perf_notes.md): each owner rank reads its own targets from the file and nothing
    is gathered. The model it builds is bit for bit the one ``svd_scale.apply`` builds on a dense partitioned load
    with the same budget: codes kept whole, block scales, logits, the adapter after one step."""
    world, out = world2
    for r in range(world):
        streamed = json.loads((out / f"nf4_streamed_rank{r}.json").read_text())
        dense = json.loads((out / f"nf4_whole_rank{r}.json").read_text())
        assert streamed["weights_read"] == streamed["owned"] > 0 and streamed["peak_gathered"] == 0
        assert dense["weights_read"] == 0 and dense["peak_gathered"] > 0  # the other path gathers every weight
        assert streamed["whole"] == dense["whole"] and streamed["loss"] == dense["loss"]
        a = load_file(str(out / f"nf4_streamed_rank{r}.safetensors"))
        b = load_file(str(out / f"nf4_whole_rank{r}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert sum(json.loads((out / f"nf4_streamed_rank{r}.json").read_text())["weights_read"]
               for r in range(world)) == streamed["layers"]  # every target read once, by one rank
    # a bf16 model from the fp32 file: each weight is decomposed as the model holds it (rounded to bf16), both ways
    for r in range(world):
        both = load_file(str(out / f"nf4_bf16_identity_rank{r}.safetensors"))
        keys = [k.removeprefix("dense.") for k in both if k.startswith("dense.")]
        assert keys and all(torch.equal(both["streamed." + k], both["dense." + k]) for k in keys)


def test_nf4_built_while_loading_ties_the_head_to_the_embedding_like_one_process(world2, tied_model_dir):
    """A model with tied embeddings (SmolLM2): the head is the embedding's parameter, read and partitioned once;
    the logits equal one process's NF4 adapter on the same model."""
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, str(JOB.parent))
    from zero3_job import METHOD_BATCH

    world, out = world2
    state = [load_file(str(out / f"nf4_streamed_tied_rank{r}.safetensors")) for r in range(world)]
    assert torch.equal(state[0]["logits"], state[1]["logits"])
    for r in range(world):
        assert json.loads((out / f"nf4_streamed_tied_rank{r}.json").read_text())["head_is_embedding"]
        assert not json.loads((out / f"nf4_streamed_rank{r}.json").read_text())["head_is_embedding"]  # untied model
    ref = svd_scale.apply(AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32),
                          svd_scale.AdapterConfig(rank=8, svd="full", quant="nf4", quant_iters=1)).eval()
    assert ref.lm_head.weight is ref.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(state[0]["logits"], ref(input_ids=METHOD_BATCH[:2]).logits, atol=1e-4, rtol=0)


def test_an_nf4_zero3_checkpoint_resumes_and_keeps_the_residuals_it_kept_whole(world2):
    """DeepSpeed's checkpoint holds bitsandbytes' quant-state entries, and transformers loads it strictly: before,
    every NF4 --resume under ZeRO-3 failed ("Unexpected key(s) ... weight.absmax"). The checkpoint's run kept the
    codes whole on every rank (the GPU default's layout); the resumed run, asked for a budget of 0, still keeps
    those whole, as its checkpoint marker says (DeepSpeed would look for their shards in the checkpoint). (The
    16-bit resume test goes from partitioned to whole.) Both runs built the model while loading
    (``load_partitioned``: the engine's loader for NF4 from a safetensors folder)."""
    _, out = world2
    full = json.loads((out / "nf4_metrics_uninterrupted.json").read_text())
    resumed = json.loads((out / "nf4_train" / "metrics.json").read_text())
    assert full["zero3_load"] == resumed["zero3_load"] == "partitioned while loading: no dense target weight loaded"
    marker = json.loads((out / "nf4_train" / "checkpoint-2" / "svd_scale_checkpoint.json").read_text())
    assert full["zero3_whole_residual_layers"] > 0 and full["zero3_whole_residual_mib"] > 0
    assert marker["zero3_whole_residual_layers"] == full["zero3_whole_residual_layers"]
    assert resumed["zero3_whole_residual_layers"] == full["zero3_whole_residual_layers"]
    assert_resumed_like_uninterrupted(full, resumed, rel=1e-6, at=2, end=4)


def test_a_zero3_checkpoint_is_stamped_with_its_run_and_refused_by_another_engine(world2):
    from safetensors import safe_open

    from svd_scale.config import load_config
    from svd_scale.training import RESUME_STATE, RUN_KEY, check_checkpoint_run

    _, out = world2
    ckpt = out / "train" / "checkpoint-5"
    with safe_open(str(ckpt / RESUME_STATE), framework="pt") as f:
        stamp = json.loads(f.metadata()[RUN_KEY])
    assert stamp["engine"] == "deepspeed" and stamp["global_batch"] == 6 and stamp["train"]["lr"] == 1e-2
    cfg = load_config(str(out / "train" / "run_config.json"))  # the same run, now without DeepSpeed
    with pytest.raises(ValueError, match=r"engine: \"deepspeed\" there, \"single\" now"):
        check_checkpoint_run(str(ckpt), cfg, "single")


def test_a_chat_file_trains_under_zero3_like_one_process(world2, model_dir, tmp_path):
    sys.path.insert(0, str(JOB.parent))
    from zero3_job import GLOBAL_BATCH

    _, out = world2
    assert json.loads((out / "chat" / "metrics.json").read_text())["engine"] == "deepspeed"
    assert_chat_run_like_one_process(out / "chat", model_dir, tmp_path,
                                     ("rank=8", "train.eval_examples=0", f"train.batch_size={GLOBAL_BATCH}", "train.lr=1e-2"))


def test_a_streamed_file_trains_under_zero3_like_the_file_read_whole(world2):
    """data_streaming under 2 ZeRO-3 ranks, rows of many lengths (so ranks' batches differ in shape): each rank
    reads the stream and keeps its share of each global batch; losses and adapter equal the rows read whole in order."""
    _, out = world2
    s, w = (json.loads((out / d / "metrics.json").read_text()) for d in ("chat_stream", "chat_whole"))
    assert len(s["losses"]) == 3 and s["engine"] == "deepspeed"
    for (_, a), (_, b) in zip(s["losses"], w["losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    assert_same_adapter(out / "chat_stream" / "adapter", out / "chat_whole" / "adapter", atol=1e-6, rtol=1e-5)


def test_a_checkpoint_with_buffered_factors_resumes_with_them(two_nodes):
    """The two-node job runs the default: U, V, sigma0 are buffers, its checkpoint says so, and the resumed
    run keeps them buffers (its losses are checked against the single-node run above)."""
    out, _ = two_nodes
    marker = json.loads((out / "train" / "checkpoint-5" / "svd_scale_checkpoint.json").read_text())
    resumed = json.loads((out / "train" / "metrics.json").read_text())
    assert marker["zero3_frozen"] == "buffers" and resumed["zero3_replicated_frozen_mib"] > 0
    # the recomputed U, Vh, sigma0 were compared with the checkpoint's (every layer, all three)
    adapter = json.loads((out / "train" / "adapter" / "svd_scale_adapter.json").read_text())
    assert resumed["zero3_resume_factors_checked"] == 3 * len(adapter["layers"])


def test_a_second_node_reads_the_first_nodes_tokenized_cache(two_nodes):
    """Two nodes on one file system: rank 0 (node 0) tokenizes; rank 1, the first rank of node 1, waits for it
    and finds its file instead of tokenizing the same rows at the same time."""
    out, _ = two_nodes
    from svd_scale.data import load_splits

    n = len(load_splits("builtin:rotten_tomatoes").train)
    counts = [json.loads((out / f"tokenize_rank{r}.json").read_text()) for r in (0, 1)]
    assert counts == [{"first_run": n, "resumed_run": 0}, {"first_run": 0, "resumed_run": 0}]


def test_the_residual_budget_is_a_quarter_of_the_gpu_and_zero_on_cpu_or_with_offload(monkeypatch):
    """``ZeRO3Access()``'s default budget for residuals kept whole (what ``svd_scale.apply`` uses in a user's script
    and ``train.zero3_replicate_residual_gib: null`` in the launch path)."""
    from types import SimpleNamespace

    import svd_scale.engines.zero3 as z3
    from svd_scale.engines.zero3 import ZeRO3Access, residual_budget_gib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert residual_budget_gib({}) == 0.0 and ZeRO3Access(ds_config={}).replicate_residual_gib == 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(z3, "_accelerator_is_cuda", lambda: False)  # DS_ACCELERATOR=cpu on a GPU host
    assert residual_budget_gib({}) == 0.0
    monkeypatch.setattr(z3, "_accelerator_is_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    assert residual_budget_gib({"zero_optimization": {"stage": 3}}) == 20.0
    offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert residual_budget_gib(offload) == 0.0
    assert ZeRO3Access(ds_config=offload, replicate_residual_gib=3).replicate_residual_gib == 3.0  # an explicit value wins
    with pytest.raises(ValueError, match=r"train.zero3_replicate_residual_gib must be a non-negative number, got -1"):
        load_config(None, ("model=m", "data=d", "train.zero3_replicate_residual_gib=-1"))


def test_residuals_kept_as_buffers_are_counted_and_merge_back_into_parameters():
    """A residual kept whole as buffers (what ``keep_whole`` does under ZeRO-3) still counts in the model's total,
    and ``merge_and_unload`` makes it a parameter again: a merged model saved with ``state_dict()`` must not lose
    the weight (a non-persistent buffer is not saved)."""
    from conftest import tiny_llama

    from svd_scale.engines.zero3 import keep_whole
    from svd_scale.inject import parameter_counts
    from svd_scale.io import merge_and_unload

    model = svd_scale.apply(tiny_llama(), svd_scale.AdapterConfig(rank=4, svd="full"))
    before = parameter_counts(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in svd_scale.adapter_layers(model):
            layer.sigma_delta.normal_(0, 0.1)  # a trained-looking adapter, so merging changes the weights
            keep_whole(layer.base_layer)
    assert parameter_counts(model) == before
    name, layer = next(svd_scale.adapter_layers(model))
    assert "weight" in layer.base_layer._buffers and f"{name}.base_layer.weight" not in model.state_dict()
    x = torch.tensor([[5, 17, 30, 42, 7, 99, 100, 3]])
    with torch.no_grad():
        want = model(input_ids=x).logits
        merged = merge_and_unload(model)
        torch.testing.assert_close(merged(input_ids=x).logits, want, atol=1e-4, rtol=1e-4)
    state = merged.state_dict()
    assert isinstance(merged.get_submodule(name).weight, torch.nn.Parameter) and f"{name}.weight" in state
    torch.testing.assert_close(state[f"{name}.weight"], merged.get_submodule(name).weight.detach())


def test_building_while_loading_names_a_bad_checkpoint_tensor_before_reading_any(tmp_path, model_dir, monkeypatch):
    """A checkpoint that lacks a tensor the model needs, or holds one of another shape, is refused with its key from
    the files' headers alone: no tensor is read and no collective runs (this test has no process group), by ZeRO-3's
    loader and FSDP2's. A residual
    kept in the base weight is not this loader's. The launch path falls back to the dense load for such a checkpoint
    (e.g. keys without the model's prefix, which ``from_pretrained`` renames), saying why."""
    import shutil

    from safetensors.torch import load_file as load, save_file

    from svd_scale.engines import checkpoint
    from svd_scale.engines.zero3 import ZeRO3Engine, load_partitioned

    def no_read(self, key):
        raise AssertionError(f"read {key} before the checks")

    monkeypatch.setattr(checkpoint.TensorReader, "__call__", no_read)
    cfg = svd_scale.AdapterConfig(rank=4, quant="nf4")
    ds = {"zero_optimization": {"stage": 3}}
    tensors = load(str(Path(model_dir) / "model.safetensors"))
    variants = {"missing": {k: v for k, v in tensors.items() if k not in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight")},
                "shape": {**tensors, "model.layers.0.self_attn.q_proj.weight": tensors["model.layers.0.self_attn.q_proj.weight"][:8]},
                "prefix": {k.removeprefix("model."): v for k, v in tensors.items()}}
    for name, t in variants.items():
        shutil.copytree(model_dir, tmp_path / name)
        save_file(t, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensors for \['model.layers.1.mlp.down_proj.weight', 'model.norm.weight'\] \(2 of the"):
        load_partitioned(str(tmp_path / "missing"), cfg, ds, torch.float32)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(8, 64\), the model's is \(64, 64\)"):
        load_partitioned(str(tmp_path / "shape"), cfg, ds, torch.float32)
    from svd_scale.engines.fsdp2 import load_sharded  # FSDP2's loader runs the same check, before sharding

    for name, match in (("missing", "no tensors for"), ("shape", "has shape \\(8, 64\\)")):
        with pytest.raises(ValueError, match=match):
            load_sharded(str(tmp_path / name), cfg, torch.float32)
    with pytest.raises(ValueError, match="adapter.quant='none'"):
        load_partitioned(model_dir, svd_scale.AdapterConfig(rank=4), ds, torch.float32)
    for folder, built in ((tmp_path / "prefix", False), (model_dir, True)):
        engine = ZeRO3Engine(load_config(None, (f"model={folder}", "adapter.quant=nf4")))
        assert (engine._while_loading() is not None) == built
        assert engine.notes["zero3_load"].startswith("partitioned while loading" if built else "dense base loaded partitioned first (no tensors for")
