"""One checker for every setting (ermoe.settings, pydantic in strict JSON mode): the rules by hand, the messages,
the dataset registry with each dataset's own options, and configs written before it (one flat data section)."""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import torch
import yaml

from ermoe.data.modules import data_options, dataset_keys, list_datasets
from ermoe.settings import FORBID_EXTRA, check, yaml_load
from ermoe.tasks import list_tasks, task_class
from ermoe.train import ConfigError, load_config
from ermoe.train.config import config_to_dict
from ermoe.train.run import Run


@dataclass
class Inner:
    __pydantic_config__ = FORBID_EXTRA
    scale: list[float] = field(default_factory=lambda: [0.1, 1.0])

    def __post_init__(self) -> None:
        if self.scale[0] > self.scale[1]:
            raise ValueError("scale must be increasing")


@dataclass
class Section:
    __pydantic_config__ = FORBID_EXTRA
    steps: int = 1
    lr: float = 0.1
    flag: bool = False
    blocks: str | list[int] = "all"
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    inner: Inner | None = None


@pytest.mark.parametrize("value, message", [
    ({"steps": "5"}, "s.steps: expected int, got str '5'"),  # no string coercion
    ({"steps": True}, "s.steps: expected int, got bool True"),  # a bool is not a number
    ({"steps": 2.0}, "s.steps: expected int, got float 2.0"),  # a float is not an int
    ({"lr": False}, "s.lr: expected float, got bool False"),
    ({"flag": "false"}, "s.flag: expected bool, got str 'false'"),  # 'false' would be truthy
    ({"flag": 1}, "s.flag: expected bool, got int 1"),
    ({"blocks": [1, "x"]}, r"s.blocks: expected str \| list\[int\], got list \[1, 'x'\]"),
    ({"mode": "c"}, r"s.mode: expected one of \['a', 'b'\], got 'c'"),
    ({"limit": "3"}, r"s.limit: expected int \| None, got str '3'"),
    ({"inner": {"scale": [1.0, 0.5]}}, "s.inner: scale must be increasing"),  # its own message, placed
    ({"inner": {"scale": [1.0, "x"]}}, r"s.inner.scale\[1\]: expected float, got str 'x'"),
    ({"inner": {"size": 3}}, "unknown config key 's.inner.size'"),
    ({"other": 1}, "unknown config key 's.other'"),
])
def test_strict_rules_and_one_line_messages(value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check(value, Section, "s")


def test_what_passes_and_what_it_becomes():
    got = check({"steps": 3, "lr": 2, "blocks": [1, 3], "limit": None, "inner": {}}, Section, "s")
    assert got == Section(steps=3, lr=2.0, blocks=[1, 3], inner=Inner())
    assert isinstance(got.lr, float)  # an int is a float
    assert check(float("inf"), float, "x") == float("inf")  # ranges are the consumer's to check
    t = torch.zeros(2)
    assert check(t, torch.Tensor, "x") is t  # a type pydantic cannot check passes to its consumer
    assert check({"a": [1, "b"]}, Any, "x") == {"a": [1, "b"]}
    with pytest.raises(ValueError, match="x: a Tensor .* is not a setting"):
        check(t, float, "x")


def test_yaml_reads_exponents_as_numbers_as_yaml_1_2_does():
    text = "a: 3e-4\nb: 1e5\nc: 1.5\nd: .inf\ne: '3e-4'\nf: 10\ng: 1.0e-3\n"
    assert yaml.safe_load(text)["a"] == "3e-4"  # PyYAML's YAML 1.1 reading, the reason for the own loader
    assert yaml_load(text) == {"a": 3e-4, "b": 1e5, "c": 1.5, "d": float("inf"), "e": "3e-4", "f": 10, "g": 1e-3}
    assert load_config(None, ["--optim.lr=2e-4"]).optim.lr == 2e-4


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    """Issue 42: PyYAML keeps the last of a repeated key silently; YAML says keys are unique. A merge key's keys
    (``<<: *base``) may still be overridden."""
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML: found the key 'lr' twice \(lines 2 and 4\)$"):
        load_config(str(config))
    assert yaml_load("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 5\n")["other"] == {"x": 5, "y": 2}
    with pytest.raises(yaml.YAMLError, match="found the key 'a' twice"):
        yaml_load("a: 1\nb: {a: 1, a: 2}\n")


def test_every_dataset_is_registered_with_options_that_build_from_defaults():
    for task in list_tasks():
        for name in task_class(task).datasets:
            assert name in list_datasets(), (task, name)
    for name in list_datasets():
        options = data_options(name)()
        assert options.name == name and list(options.to_dict())[1:] == dataset_keys(name)
    assert "augment" in dataset_keys("imagefolder") and "augment" not in dataset_keys("fashion_mnist")
    assert "cohort_size" in dataset_keys("brain_cohort") and "cohort_size" not in dataset_keys("nifti_csv")
    with pytest.raises(ValueError, match="unknown dataset 'mnist3d'"):
        data_options("mnist3d")


def test_data_sections_round_trip_and_refuse_keys_their_dataset_does_not_read():
    cfg = load_config(None, {"data": {"name": "imagefolder", "data_dir": "/x", "augment": {"re_prob": 0.1}}})
    again = load_config(None, config_to_dict(cfg))
    assert again.data == cfg.data and again.data.augment.re_prob == 0.1
    with pytest.raises(ConfigError, match=r"data.cohort_size does not apply to dataset 'digits' \(it reads: "):
        load_config(None, {"data": {"name": "digits", "cohort_size": 600}})  # even at the old default


def test_a_run_written_with_the_old_flat_data_section_still_reads(tmp_path):
    """Configs written before each dataset had its own options listed every dataset's keys; those a dataset does
    not read held the old defaults and are dropped on reading. Any other value stays an error."""
    cfg = load_config(None, {"data": {"name": "digits", "train_limit": 640}, "optim": {"epochs": 1}})
    tree = config_to_dict(cfg)
    tree["data"] = {"name": "digits", "data_dir": None, "download": False, "mirror": None, "img_size": None,
                    "train_limit": 640, "test_limit": None, "val_size": 0, "split_seed": 0, "stem_cache": False,
                    "csv": None, "spacing": 2.0, "cohort_size": 600, "cohort_seed": 0, "test_size": 0, "json": None,
                    "image_root": None, "caption_set_size": 10000, "crop_padding": 0, "hflip": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    assert Run(tmp_path).read_config() == cfg
    tree["data"]["cohort_size"] = 50  # not the old default: it was set, and does not apply
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    with pytest.raises(ConfigError, match="data.cohort_size does not apply to dataset 'digits'"):
        Run(tmp_path).read_config()


def test_every_settings_dataclass_refuses_unknown_keys():
    """A dataclass validated from a mapping without FORBID_EXTRA would drop a misspelt key silently."""
    import ermoe.data.folder
    import ermoe.models.vit
    import ermoe.tasks.brain_age
    import ermoe.tasks.retrieval
    import ermoe.train.config

    classes = [ermoe.data.folder.ImageAugment, ermoe.models.vit.MoESpec, ermoe.tasks.brain_age.BrainAgeOptions,
               ermoe.tasks.retrieval.RetrievalOptions, ermoe.train.config.OptimConfig,
               *(data_options(n) for n in list_datasets())]
    for cls in classes:
        assert dataclasses.is_dataclass(cls) and cls.__pydantic_config__ == FORBID_EXTRA, cls
        hints = typing.get_type_hints(cls)
        assert "__pydantic_config__" not in hints  # a class attribute, not a field


@pytest.mark.parametrize("override,message", [
    ("--optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("--optim.lr=0", "optim.lr must be > 0, got 0"),
    ("--optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("--optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be <= 1, got 1.5"),
    ("--optim.label_smoothing=1.0", "optim.label_smoothing must be < 1, got 1.0"),
    ("--optim.betas=[0.9]", r"optim.betas must hold 2 values, got \[0.9\]"),
    ("--optim.betas=[0.9, 1.0]", r"optim.betas\[1\] must be < 1, got 1.0"),
    ("--optim.amp=fp8", r"optim.amp: expected one of \['auto', 'bf16', 'fp16', 'none'\], got 'fp8'"),
    ("--optim.clip_grad=0", "optim.clip_grad must be > 0, got 0"),
    ("--log_every=0", "log_every must be >= 1, got 0"),
    ("--checkpoint_every=-1", "checkpoint_every must be >= 0, got -1"),
    ("--dist_timeout_s=0", "dist_timeout_s must be > 0, got 0"),
    ("--ep_size=0", "ep_size must be >= 1, got 0"),
    ("--data.train_limit=0", "data.train_limit must be >= 1, got 0"),
    ("--model.moe_init_batches=0", "model.moe_init_batches must be >= 1, got 0"),
])
def test_ranges_are_field_constraints_named_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config(None, [override])


def test_a_dataset_says_what_it_needs_of_the_rest_of_the_run():
    """Cross-section rules live with the section that needs them (``DataOptions.check_run``), not in generic code
    naming dataset classes."""
    with pytest.raises(ConfigError, match="data.stem_cache caches a frozen stem's features: model 'vit_tiny' has"):
        load_config(None, {"data": {"name": "digits", "stem_cache": True}})
    with pytest.raises(ConfigError, match="optim.batch_size must be even with data.augment's mixup"):
        load_config(None, {"data": {"name": "imagefolder", "data_dir": "/x", "augment": {}},
                           "optim": {"batch_size": 7}})
    assert load_config(None, {"data": {"name": "imagefolder", "data_dir": "/x", "augment": {"mixup_alpha": 0,
                                                                                       "cutmix_alpha": 0}},
                              "optim": {"batch_size": 7}}).optim.batch_size == 7
