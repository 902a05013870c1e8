"""Config parsing, overrides and validation; every shipped config must load."""
from pathlib import Path

import pytest

from svd_scale.config import AdapterConfig, TrainConfig, describe, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    assert cfg.adapter.rank > 0 and cfg.train.max_steps > 0


def test_overrides_dotted_and_short(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/quickstart.yaml", ("adapter.rank=16", "lr=3e-3", "method=svd_scale", "target_modules=[q_proj,v_proj]"))
    assert cfg.adapter.rank == 16 and cfg.train.lr == 3e-3 and cfg.adapter.target_modules == ["q_proj", "v_proj"]


def test_an_unset_lr_is_the_methods_own_default():
    """train.lr unset: each method's declared default_lr (svd_scale's from bench/results/quality.md), not one
    rate for every method; a method that declares none (a user's own) must be given one."""
    from svd_scale.methods import get_method

    for method in ("svd_scale", "sorsa", "lora"):
        assert load_config(None, (f"method={method}",)).train.lr == get_method(method).default_lr
    assert load_config(None, ("method=sorsa", "train.lr=2e-4")).train.lr == 2e-4
    assert get_method("svd_scale").default_lr != get_method("sorsa").default_lr
    from svd_scale.methods.svd_scale import SVDScaleLayer
    from svd_scale import register_method

    class NoRate(SVDScaleLayer):
        method = "no_rate_test"
        default_lr = None

    register_method(NoRate)
    try:
        with pytest.raises(ValueError, match="method 'no_rate_test' declares no default_lr; set train.lr"):
            load_config(None, ("method=no_rate_test",))
        assert load_config(None, ("method=no_rate_test", "train.lr=1e-3")).train.lr == 1e-3
    finally:
        from svd_scale.methods import METHODS
        METHODS.pop("no_rate_test", None)


@pytest.mark.parametrize("override, message", [
    ("adapter.rnak=4", r"unknown adapter key\(s\) \['rnak'\]"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("method=nope", "unknown adapter method 'nope'; available"),
    ("svd=qr", r"adapter.svd must be one of \['full', 'randomized'\], got 'qr'"),
    ("train.precision=fp8", "train.precision must be one of"),
    ("train.lr=-1", "train.lr must be a positive number"),
    ("adapter.gamma=0.1", r"adapter.gamma is not used by method 'svd_scale'"),
    ("adapter.scale=rows", r"adapter.scale must be one of \['output', 'none'\]"),
    ("train.deepspeed=missing.json", "train.deepspeed: no such file 'missing.json'"),
    ("rank", "is not key=value"),
])
def test_bad_values_are_named(override, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=message):
        load_config("configs/quickstart.yaml", (override,))


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_describe_lists_every_field():
    from svd_scale.methods import METHODS

    text = describe()
    for cls, prefix in ((AdapterConfig, "adapter."), (TrainConfig, "train.")):
        for name in cls.__dataclass_fields__:
            if name != "options":  # the method options are listed one by one, below
                assert f"{prefix}{name} = " in text
    for cls in METHODS.values():  # every option a method declares in its own file
        for name in cls.options:
            assert f"adapter.{name} = " in text and cls.method in text.split(f"adapter.{name} = ")[1].split("\n")[0]


def test_method_options_are_declared_by_the_method_and_kept_flat():
    cfg = AdapterConfig(method="lora", alpha=16)
    assert cfg.alpha == 16 and cfg.options == {"alpha": 16} and cfg.gamma is None
    assert cfg.to_dict()["alpha"] == 16 and "options" not in cfg.to_dict()
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.method_options() == {"alpha": 16}
    assert AdapterConfig(method="kasa").method_options() == {"alpha": None, "beta": 1e-4, "gamma": 1e-3}
    with pytest.raises(ValueError, match=r"adapter.budget must be in \(0, 1\] for salora, got 2"):
        AdapterConfig(method="salora", budget=2)
    with pytest.raises(ValueError, match=r"unknown adapter option 'nope'"):
        AdapterConfig(nope=1)


@pytest.mark.parametrize("overrides", [
    ("method=svd_scale", "rank=64"), ("method=svfit", "rank=64"), ("method=kasa", "rank=8", "lr=5e-4"),
    ("method=salora", "rank=16", "budget=0.5"), ("method=pissa", "rank=16", "lr=3e-5"), ("method=lora", "rank=16", "lr=3e-4"),
    ("adapter.quant=nf4", "adapter.quant_iters=5", "adapter.double_quant=true"),
    ("train.deepspeed=configs/deepspeed/zero3.json", "train.precision=bf16"),
])
def test_readme_examples_parse(overrides, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/quickstart.yaml", overrides)
    assert cfg.adapter.rank > 0


def test_eval_split_is_checked_before_any_work():
    import pytest

    from svd_scale.config import load_config

    assert load_config(None, ("train.eval_split=validation",)).train.eval_split == "validation"
    with pytest.raises(ValueError, match=r"train.eval_split must be one of \['test', 'validation'\], got 'val'"):
        load_config(None, ("train.eval_split=val",))


def test_fsdp2_configs_parse_and_refuse_bad_combinations_before_any_work():
    import pytest

    from svd_scale.config import load_config

    assert load_config("configs/fsdp/quickstart.yaml").train.engine == "fsdp2"
    assert load_config(None, ("train.engine=fsdp2", "adapter.quant=nf4")).adapter.quant == "nf4"
    assert load_config(None, ("train.engine=fsdp2", "adapter.quant=nf4", "adapter.double_quant=true")).adapter.double_quant
    for method in ("sorsa", "kasa", "salora"):  # their extra losses run under fsdp2 now
        assert load_config(None, ("train.engine=fsdp2", f"method={method}")).adapter.method == method
    with pytest.raises(ValueError, match=r"fsdp2 and train.deepspeed are exclusive"):
        load_config(None, ("train.engine=fsdp2", "train.deepspeed=configs/deepspeed/zero3.json"))


def test_zero3_speed_defaults_fill_only_what_the_users_config_leaves_unset():
    from svd_scale.engines.zero3 import SPEED_DEFAULTS, add_speed_defaults

    ds = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}}
    added = add_speed_defaults(ds)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == "auto"  # the user's choice stays
    assert set(added) == set(SPEED_DEFAULTS) - {"stage3_prefetch_bucket_size"}
    assert all(ds["zero_optimization"][k] == v for k, v in added.items())
    assert add_speed_defaults({"zero_optimization": {"stage": 2}}) == {}  # stage 3 only
