"""Nothing lost, nothing silently wrong: saves that never delete what they did not write, torn saves
refused, non-finite adapters never written, loaded or half-merged, and a diverging run stopped at
the step it diverged."""
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_same_adapter, save_tiny_llama_with_real_tokenizer, tiny_llama

import svd_scale
from svd_scale import io as sio


def _adapted(seed=0):
    return svd_scale.apply(tiny_llama(seed), svd_scale.AdapterConfig(rank=4))


def test_save_adapter_keeps_everything_else_in_the_folder(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    svd_scale.save_adapter(_adapted(), str(out))
    svd_scale.save_adapter(_adapted(), str(out))  # and again over its own files
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-5" / "trainer_state.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", "notes.txt", "svd_scale_adapter.json", "svd_scale_adapter.safetensors"]
    svd_scale.load_adapter(tiny_llama(), str(out))


def test_a_save_torn_between_its_two_files_is_refused_and_its_leftovers_cleaned(tmp_path, monkeypatch, tokens):
    first = _adapted()
    svd_scale.save_adapter(first, str(tmp_path))
    second = _adapted()
    with torch.no_grad():
        for _, layer in svd_scale.adapter_layers(second):
            layer.sigma_delta.add_(0.5)
    calls = []
    real_replace = os.replace

    def crash_on_config(src, dst):
        calls.append(dst)
        if str(dst).endswith(sio.CONFIG_NAME):
            raise OSError("killed")  # the weights are renamed, the config is not
        return real_replace(src, dst)

    monkeypatch.setattr(sio.os, "replace", crash_on_config)
    with pytest.raises(OSError):
        svd_scale.save_adapter(second, str(tmp_path))
    monkeypatch.setattr(sio.os, "replace", real_replace)
    with pytest.raises(ValueError, match="come from different saves"):
        svd_scale.load_adapter(tiny_llama(), str(tmp_path))
    assert [p.name for p in tmp_path.glob(".*.tmp")]  # the interrupted save left its temporary config
    svd_scale.save_adapter(second, str(tmp_path))  # a complete save cleans that up and loads again
    assert not list(tmp_path.glob(".*.tmp"))
    loaded = svd_scale.load_adapter(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, second(input_ids=tokens).logits)


def test_non_finite_adapters_are_never_saved_loaded_or_half_merged(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = _adapted()
    svd_scale.save_adapter(good, str(tmp_path / "good"))
    bad = _adapted()
    last_name, last = list(svd_scale.adapter_layers(bad))[-1]
    with torch.no_grad():
        last.sigma_delta[0] = float("nan")
    with pytest.raises(ValueError, match="hold NaN or inf"):
        svd_scale.save_adapter(bad, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / sio.WEIGHTS_NAME).exists()
    # a file edited to hold NaN (same save id, so only the values are wrong)
    path = tmp_path / "good" / sio.WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state[f"{last_name}.sigma_delta"][0] = float("inf")
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match="hold NaN or inf"):
        svd_scale.load_adapter(tiny_llama(), str(tmp_path / "good"))
    # merge checks every layer before it changes any
    before = [type(m).__name__ for m in bad.modules()]
    with pytest.raises(ValueError, match="hold NaN or inf"):
        svd_scale.merge_and_unload(bad)
    assert [type(m).__name__ for m in bad.modules()] == before


def test_a_diverging_run_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from svd_scale.config import load_config
    from svd_scale.training import run

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    out = tmp_path / "out"
    cfg = load_config(None, (f"model={model}", "rank=4", "train.max_steps=6", "train.batch_size=4", "train.max_length=32",
                             "train.eval_examples=0", "train.logging_steps=1", "train.save_steps=1", "train.lr=1e30",
                             "train.warmup_ratio=0", f"train.output_dir={out}"))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step (\d+)") as err:
        run(cfg)
    step = int(err.value.args[0].split("at step ")[1].split()[0])
    assert 1 < step <= 6
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()  # nothing from the bad step
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept and f"checkpoint-{step}" not in kept
    state = json.loads((out / kept[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == step - 1
    from safetensors.torch import load_file

    assert not sio.non_finite(load_file(str(out / kept[-1] / "adapter" / sio.WEIGHTS_NAME)))


@pytest.mark.parametrize("override, message", [
    ('train.gradient_checkpointing="false"', r"train.gradient_checkpointing must be true or false \(unquoted\), got 'false'"),
    ("train.max_steps=2.7", r"train.max_steps must be a whole number, got 2.7"),
    ("train.warmup_ratio=5", r"train.warmup_ratio is a fraction of the steps, in \[0, 1\], got 5"),
    ("train.lr=inf", r"train.lr must be a finite number, got 'inf'"),
    ("adapter.niter=1.5", r"adapter.niter must be a whole number, got 1.5"),
    ('adapter.double_quant="yes"', r"adapter.double_quant must be true or false"),
])
def test_config_values_of_the_wrong_type_are_refused_by_name(override, message):
    from svd_scale.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, (override,))


def test_numbers_yaml_reads_as_strings_are_numbers_and_the_timeout_reaches_the_trainer(tmp_path):
    from svd_scale.config import load_config
    from svd_scale.engines import create
    from svd_scale.training import training_arguments

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  weight_decay: 1e-2\n  lr: 3e-3\n  timeout_minutes: 2\n")  # YAML 1.1: strings
    cfg = load_config(str(path), (f"train.output_dir={tmp_path / 'o'}",))
    assert cfg.train.weight_decay == 0.01 and cfg.train.lr == 0.003
    assert training_arguments(cfg, create(cfg)).ddp_timeout == 120


def test_resume_takes_the_newest_complete_checkpoint_or_the_one_named(tmp_path, capsys):
    import shutil

    from svd_scale.config import load_config
    from svd_scale.training import run

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    out = tmp_path / "out"
    args = (f"model={model}", "rank=4", "train.max_steps=3", "train.batch_size=4", "train.max_length=32",
            "train.eval_examples=0", "train.logging_steps=1", "train.save_steps=1", "train.lr=1e-2", f"train.output_dir={out}")
    cfg = load_config(None, args)
    full = run(cfg)
    # a rewrite of checkpoint-3 cut short: its adapter state from another save, the rest from the first
    shutil.copy(out / "checkpoint-2" / "training_state.safetensors", out / "checkpoint-3" / "training_state.safetensors")
    shutil.rmtree(out / "adapter")
    resumed = run(cfg, resume=True)
    assert "skipping " + str(out / "checkpoint-3") + ": its files come from two different saves" in capsys.readouterr().out
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert dict(resumed["losses"])[3] == pytest.approx(dict(full["losses"])[3], rel=1e-6)
    named = run(cfg, resume=str(out / "checkpoint-1"))
    assert named["resumed_from"].endswith("checkpoint-1")
    assert dict(named["losses"])[2] == pytest.approx(dict(full["losses"])[2], rel=1e-6)
    (out / "checkpoint-2" / "training_state.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2: cannot resume from it: no training_state"):
        run(cfg, resume=str(out / "checkpoint-2"))
    # a checkpoint of another run (another lr, other data) is refused naming the keys, before any model loads
    other = load_config(None, (*args, "train.lr=3e-2", "data=builtin:plot_vs_review"))
    with pytest.raises(ValueError, match=r"checkpoint-1 was written by a different run \(data: .*rotten_tomatoes.* there, "
                                         r".*plot_vs_review.* now; train.lr: 0.01 there, 0.03 now\)"):
        run(other, resume=str(out / "checkpoint-1"))
    from svd_scale.training import check_checkpoint_run
    with pytest.raises(ValueError, match=r"engine: \"single\" there, \"deepspeed\" now"):
        check_checkpoint_run(str(out / "checkpoint-1"), cfg, "deepspeed")  # a single-process optimizer state
    forced = run(load_config(None, (*args, "train.lr=3e-2", "train.resume_check=false")), resume=str(out / "checkpoint-1"))
    assert forced["resumed_from"].endswith("checkpoint-1")
    with pytest.raises(ValueError, match=r"checkpoint-3 was written by a different run \(train.lr: 0.03 there, 0.01 now\)"):
        run(cfg, resume=True)  # the forced run wrote checkpoints 2 and 3 anew, at its own lr
    longer = run(load_config(None, (*args, "train.lr=3e-2", "train.max_steps=4", "train.logging_steps=2")), resume=True)
    assert longer["resumed_from"].endswith("checkpoint-3")  # how long and how often to log may change
    # method options count with their defaults: another sigma_update is another run...
    with pytest.raises(ValueError, match=r"adapter.sigma_update: \"relative\" there, \"absolute\" now"):
        check_checkpoint_run(str(out / "checkpoint-1"), load_config(None, (*args, "adapter.sigma_update=absolute")), "single")
    # ...and a stamp written before the option existed names none: it was an absolute run (Option.saved_default)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from svd_scale.training import RUN_KEY
    path = out / "checkpoint-1" / "training_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    stamp = json.loads(meta[RUN_KEY])
    del stamp["adapter"]["sigma_update"]
    save_file(load_file(str(path)), str(path), metadata={**meta, RUN_KEY: json.dumps(stamp)})
    with pytest.raises(ValueError, match=r"adapter.sigma_update: \"absolute\" there, \"relative\" now"):
        check_checkpoint_run(str(out / "checkpoint-1"), cfg, "single")


def test_a_used_output_dir_needs_resume_or_overwrite_and_one_run_at_a_time(tmp_path):
    import subprocess
    import sys

    from svd_scale.config import load_config
    from svd_scale.training import OutputLock, run

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    out = tmp_path / "out"
    args = (f"model={model}", "rank=4", "train.max_steps=1", "train.batch_size=2", "train.max_length=32",
            "train.eval_examples=0", f"train.output_dir={out}")
    first = run(load_config(None, args))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds another run's results \(adapter, metrics.json\).*train.overwrite=true"):
        run(load_config(None, args))
    again = run(load_config(None, (*args, "train.overwrite=true")))
    assert again["losses"] == first["losses"] and (out / "notes.txt").read_text() == "mine"
    assert not (out / OutputLock.NAME).exists()  # released at the end
    # a live run holds the folder: a second one is refused, naming the holder
    lock = out / OutputLock.NAME
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": live.pid, "since": "now"}))
        with pytest.raises(RuntimeError, match=r"is in use by another run .*\"pid\": %d" % live.pid):
            run(load_config(None, (*args, "train.overwrite=true")))
    finally:
        live.kill()
        live.wait()
    # a lock left by a process that is gone is taken over
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": int(gone.stdout), "since": "then"}))
    run(load_config(None, (*args, "train.overwrite=true")))
    assert not lock.exists()


def test_config_reads_paths_dates_and_option_numbers_as_a_user_means_them(tmp_path):
    from svd_scale.config import TrainConfig, load_config

    assert TrainConfig(output_dir=tmp_path / "o").output_dir == str(tmp_path / "o")
    assert load_config(None, ("train.output_dir=2025-01-15",)).train.output_dir == "2025-01-15"
    assert load_config(None, ("train.output_dir=2024",)).train.output_dir == "2024"
    assert load_config(None, ("method=sorsa", "adapter.gamma=1e-3")).adapter.gamma == 0.001
    with pytest.raises(ValueError, match=r"train.output_dir must be a string, got True"):
        load_config(None, ("train.output_dir=true",))


def test_resume_flag_followed_by_an_override_is_still_an_override(monkeypatch):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
    import train as launcher

    seen = {}
    monkeypatch.setattr("svd_scale.training.run", lambda cfg, resume: seen.update(cfg=cfg, resume=resume))
    launcher.main(["--resume", "train.max_steps=7"])
    assert seen["resume"] is True and seen["cfg"].train.max_steps == 7


def test_ranks_with_different_configurations_are_named():
    from svd_scale.config import load_config
    from svd_scale.training import config_differences

    a = load_config(None, ("rank=8", "train.lr=1e-2")).to_dict()
    b = load_config(None, ("rank=16", "train.lr=1e-2")).to_dict()
    assert config_differences([a, a]) == {}
    assert config_differences([a, b, a]) == {"adapter.rank": ["8", "16", "8"]}


@pytest.mark.parametrize("content,match", [
    (b"", r"no examples"),
    (b'{"prompt": "a", "completion": " b"}\n', r"1 example; eval_fraction=0.5 needs at least 2"),
    (b'{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": " d"}\n{"prompt": "e", completion: 1}\n',
     r"d.jsonl, line 3: not valid JSON"),
    (b'{"prompt": "a", "completion": " b"}\n{"prompt": "c"}\n', r"d.jsonl, row 2: 'completion' must be a non-empty string, got missing"),
    (b'{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": 5}\n', r"row 2: 'completion' .* got int 5"),
    (b'{"prompt": "a", "completion": " b"}\n{"prompt": "c\xff", "completion": " d"}\n', r"line 2, column 14: byte 0xff is not UTF-8"),
    (b'[1, 2]\n', r"line 1: a JSON list, expected an object"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n', r"row 1: 'messages' has no assistant turn"),
    (b'{"messages": [{"role": "bot", "content": "hi"}]}\n', r"row 1: messages\[0\].role is 'bot'; allowed"),
    (b'{"instruction": "a", "output": 3}\n', r"row 1: 'output' must be a non-empty string, got int 3"),
], ids=["empty", "one_row", "malformed_line", "missing_field", "not_a_string", "not_utf8", "not_an_object",
        "chat_without_answer", "chat_bad_role", "alpaca_bad_output"])
def test_bad_data_files_are_refused_naming_file_line_or_row(content, match, tmp_path):
    from svd_scale.data import load_splits

    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_splits(str(tmp_path / "d.jsonl"), eval_fraction=0.5)


def test_labels_cut_by_max_length_fail_before_the_model_loads(tmp_path):
    from transformers import AutoTokenizer

    from svd_scale.builtin import smollm2_path
    from svd_scale.config import load_config
    from svd_scale.training import run

    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(tmp_path / "tok_only")  # no weights: loading would fail
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"prompt": f"review {i}", "completion": " positive"})
                                                for i in range(40)))
    args = (f"model={tmp_path / 'tok_only'}", f"data={tmp_path / 'd.jsonl'}", "train.max_steps=1",
            f"train.output_dir={tmp_path / 'out'}")
    with pytest.raises(ValueError, match=r"none of the 40 examples keeps a label token within train.max_length=1"):
        run(load_config(None, (*args, "train.max_length=1")))
    from svd_scale.data import tokenized_dataset
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok_only")
    long = [{"prompt": "p", "completion": " positive " * 50}, {"prompt": "p", "completion": " ok"}]
    assert len(tokenized_dataset(long, tok, 8)) == 2  # a cut completion keeps its first tokens


def test_a_checkpoint_write_failing_at_any_point_is_skipped_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    """A full disk (or a kill) at each file write of a checkpoint: the failing write leaves a truncated
    file and raises ENOSPC; --resume must skip that checkpoint and reproduce the uninterrupted run."""
    import pathlib

    import safetensors.torch
    from transformers.trainer_callback import TrainerState

    from svd_scale.config import load_config
    from svd_scale.training import run

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    args = lambda out, *more: load_config(None, (f"model={model}", "rank=4", "train.max_steps=2", "train.batch_size=4",  # noqa: E731
                                                 "train.max_length=32", "train.eval_examples=0", "train.logging_steps=1",
                                                 "train.save_steps=1", "train.lr=1e-2", f"train.output_dir={out}", *more))
    writes, fail_at = [], [None]

    def wrap(orig, path_of):
        def write(*a, **kw):
            path = str(path_of(a))
            writes.append(path)
            if len(writes) == fail_at[0]:
                pathlib.Path(path).write_bytes(b"{\"trunc")  # what a full disk leaves: a short file
                raise OSError(28, "No space left on device", path)
            return orig(*a, **kw)
        return write

    orig_write_text = pathlib.Path.write_text
    monkeypatch.setattr(safetensors.torch, "save_file", wrap(safetensors.torch.save_file, lambda a: a[1]))
    monkeypatch.setattr(svd_scale.io, "save_file", safetensors.torch.save_file)
    monkeypatch.setattr(torch, "save", wrap(torch.save, lambda a: a[1]))
    monkeypatch.setattr(TrainerState, "save_to_json", wrap(TrainerState.save_to_json, lambda a: a[1]))
    monkeypatch.setattr(pathlib.Path, "write_text", wrap(orig_write_text, lambda a: a[0]))
    full = run(args(tmp_path / "full"))
    points = [i + 1 for i, p in enumerate(writes) if "checkpoint-2" in p]
    assert len(points) >= 7, writes  # adapter (2 files), training state, optimizer, scheduler, RNG, trainer state, marker
    for k in points:
        out = tmp_path / f"fail{k}"
        writes.clear()
        fail_at[0] = k
        with pytest.raises(OSError, match="No space left"):
            run(args(out))
        fail_at[0] = None
        resumed = run(args(out), resume=True)
        assert resumed["resumed_from"].endswith("checkpoint-1"), k
        assert dict(resumed["losses"])[2] == pytest.approx(dict(full["losses"])[2], rel=1e-6)
        assert_same_adapter(tmp_path / "full" / "adapter", out / "adapter", atol=1e-6, rtol=1e-6)
    # save_total_limit=1: checkpoint-1 is deleted only once checkpoint-2 is complete (its marker, the last write,
    # failing here); the Trainer alone rotates first and would leave no checkpoint to resume
    limited = lambda out: args(out, "train.hf_args={save_total_limit: 1}")  # noqa: E731
    out, fail_at[0] = tmp_path / "limited", points[-1]
    writes.clear()
    with pytest.raises(OSError, match="No space left"):
        run(limited(out))
    fail_at[0] = None
    assert "svd_scale_checkpoint.json" in writes[points[-1] - 1] and (out / "checkpoint-1").is_dir()
    resumed = run(limited(out), resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-1")
    assert dict(resumed["losses"])[2] == pytest.approx(dict(full["losses"])[2], rel=1e-6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the limit still holds


def test_nan_policy_skip_drops_that_steps_update_and_stops_past_its_limit(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from svd_scale.config import load_config
    from svd_scale.training import SVDTrainer, run

    orig = SVDTrainer.compute_loss
    bad_steps, calls = {2}, []

    def compute_loss(self, *a, **kw):  # a non-finite loss in the FIRST micro-batch of the chosen steps
        out = orig(self, *a, **kw)
        step = self.state.global_step + 1
        calls.append(step)
        return out * float("nan") if step in bad_steps and calls.count(step) == 1 else out

    monkeypatch.setattr(SVDTrainer, "compute_loss", compute_loss)
    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    args = (f"model={model}", "rank=4", "train.max_steps=3", "train.batch_size=2", "train.grad_accum=2", "train.max_length=32",
            "train.eval_examples=0", "train.logging_steps=1", "train.save_steps=1", "train.lr=1e-2", "train.nan_policy=skip")
    out = tmp_path / "skip"
    metrics = run(load_config(None, (*args, f"train.output_dir={out}")))
    assert metrics["skipped_steps"] == [2]
    one, two, three = (load_file(str(out / f"checkpoint-{i}" / "training_state.safetensors")) for i in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)  # step 2 changed nothing, its finite micro-batch included
    assert any(not torch.equal(two[k], three[k]) for k in two) and not sio.non_finite(three)
    bad_steps.update({2, 3})
    calls.clear()
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 .* after skipping 1 step\(s\)"):
        run(load_config(None, (*args, "train.nan_skip_limit=1", f"train.output_dir={tmp_path / 'limit'}")))
    with pytest.raises(ValueError, match="nan_policy=skip is not supported with DeepSpeed"):
        load_config(None, ("train.nan_policy=skip", f"train.deepspeed={Path(__file__).parents[1] / 'configs/deepspeed/zero3.json'}"))


def test_mismatched_rank_configs_stop_every_rank_and_a_stopped_rank_ends_the_job_in_time(tmp_path):
    """A real 2-rank torchrun job (tests/dist/faults_job.py): ranks started with different lr all stop
    naming train.lr; then rank 1 is SIGSTOPped and rank 0 ends within train.timeout_minutes (15 s)."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, free_port

    model = save_tiny_llama_with_real_tokenizer(tmp_path / "m")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests/dist/faults_job.py"), "--model", model, "--out", str(tmp_path)]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    took = time.time() - t0
    assert p.returncode != 0
    for r in (0, 1):
        seen = json.loads((tmp_path / f"fault1_rank{r}.json").read_text())["error"]
        assert "started with different configurations" in seen and "train.lr: rank 0 0.01, rank 1 0.02" in seen, seen
    stopped = json.loads((tmp_path / "fault2_rank0.json").read_text())
    assert not (tmp_path / "fault2_rank1.json").exists()  # rank 1 never got past its stop
    assert stopped["error"] != "no error" and stopped["seconds"] < 15 + 30, stopped  # 15 s timeout + start-up slack
    assert took < 240, (took, p.stderr[-3000:])  # the launcher ended the job; not the 30-minute default


def test_resuming_with_recomputed_frozen_factors_refuses_ones_that_differ_from_the_checkpoint(tmp_path):
    """Under ZeRO-3 U, Vh, sigma0 are buffers that DeepSpeed's checkpoint does not hold, so --resume
    recomputes them by the init; they are compared with the checkpoint's training state, and a mismatch
    (another decomposition: the trained sigma would act on other vectors) is refused naming the tensor."""
    from safetensors.torch import save_file

    from svd_scale.access import WeightAccess
    from svd_scale.engines.zero3 import check_resumed_factors, replicate_frozen
    from svd_scale.io import training_state_dict

    class Replicating(WeightAccess):  # what ZeRO3Access.adopt does, in one process
        def adopt(self, model, layers):
            assert replicate_frozen(layers, 2.0) > 0

    model = svd_scale.apply(tiny_llama(), svd_scale.AdapterConfig(rank=4), access=Replicating())
    layers = list(svd_scale.adapter_layers(model))
    assert all({"U", "Vh", "sigma0"} <= dict(l.named_buffers()).keys() for _, l in layers)
    plain = svd_scale.apply(tiny_llama(), svd_scale.AdapterConfig(rank=4))
    assert svd_scale.parameter_counts(model) == svd_scale.parameter_counts(plain)  # the same total either way
    state = training_state_dict(model)
    save_file(state, str(tmp_path / "ok.safetensors"))
    assert check_resumed_factors(layers, str(tmp_path / "ok.safetensors")) == 3 * len(layers)
    name = f"{layers[1][0]}.Vh"
    state[name] = state[name].flip(0)  # the same singular vectors in another order
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(RuntimeError, match=rf"--resume: {name} recomputed by the init differs"):
        check_resumed_factors(layers, str(tmp_path / "bad.safetensors"))
