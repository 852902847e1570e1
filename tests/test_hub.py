"""The Hub layout (ermoe.models.hub, ermoe.train.export): every model family and router saved and rebuilt bit for
bit from a local folder, upcycled models too; foreign or broken folders refused naming what is wrong; a run exported
with a card of its own numbers; a repository id offline is a clear error, with no network call."""

import json

import pytest
import torch

import ermoe
from ermoe.cli import main
from ermoe import list_routers
from ermoe.models import HubError, create_model, from_pretrained, save_pretrained, upcycle
from test_models import DATA, FAMILY_ARGS, VIT, VOLUME_ARGS, registered

DUAL = dict(img_size=16, in_chans=1, vocab_size=20, context_length=6,
            image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 2, "patch_size": 8,
                   "moe": {"router": "ermoe", "num_experts": 2, "blocks": [1]}},
            text={"width": 16, "depth": 1, "num_heads": 2,
                  "moe": {"router": "softmax_topk", "num_experts": 2, "blocks": "all"}})


def build(name, family):
    if family == "retrieval":
        return create_model(name, **DUAL), (torch.randn(3, 1, 16, 16), torch.tensor([[3, 4, 5, 0, 0, 0]] * 3))
    if family == "brain":
        args = VOLUME_ARGS[name]
        return create_model(name, **args), (torch.randn(2, 2, *args["volume_shape"]),)
    return create_model(name, **DATA, **FAMILY_ARGS[family]), (torch.randn(3, 2, 16, 16),)


def same_model(a, b, inputs):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b = a(*inputs), b(*inputs)
    for x, y in zip(out_a if isinstance(out_a, tuple) else (out_a,), out_b if isinstance(out_b, tuple) else (out_b,)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name,family", registered())
def test_every_model_family_round_trips_bit_for_bit(tmp_path, name, family):
    torch.manual_seed(0)
    model, inputs = build(name, family)
    save_pretrained(model, tmp_path / "folder")
    assert {p.name for p in (tmp_path / "folder").iterdir()} == {"model.safetensors", "config.json", "README.md"}
    torch.manual_seed(1)  # another initialisation: every weight must come from the folder
    same_model(model, from_pretrained(tmp_path / "folder"), inputs)


@pytest.mark.parametrize("router", list_routers())
def test_every_router_round_trips_bit_for_bit(tmp_path, router):
    torch.manual_seed(0)
    model = create_model("vit_tiny", **DATA, **VIT, moe=dict(router=router, num_experts=4, blocks="all"))
    model.train()
    model(torch.randn(8, 2, 16, 16))  # a step's state: loss-free bias's counts, running statistics
    model.after_step(1)
    same_model(model, from_pretrained(save_pretrained(model, tmp_path / router)), (torch.randn(3, 2, 16, 16),))


def test_an_upcycled_model_is_rebuilt_by_upcycling(tmp_path):
    torch.manual_seed(0)
    model = upcycle(create_model("vit_tiny", **DATA, **VIT, moe=None), "ermoe", 4, blocks=[1])
    config = json.loads((save_pretrained(model, tmp_path / "up") / "config.json").read_text())
    assert config["upcycle"]["router"] == "ermoe" and config["upcycle"]["blocks"] == [1]
    same_model(model, ermoe.from_pretrained(tmp_path / "up"), (torch.randn(3, 2, 16, 16),))


def test_broken_or_foreign_folders_are_refused_naming_the_problem(tmp_path):
    model = create_model("vit_tiny", **DATA, **VIT, moe=dict(router="ermoe", num_experts=4))
    folder = save_pretrained(model, tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())

    def write(**changes):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    write(format="ermoe-hub/9", ermoe_version="9.0")
    with pytest.raises(HubError, match=r"format 'ermoe-hub/9'; this ermoe .* reads 'ermoe-hub/1' \(written by ermoe 9.0"):
        from_pretrained(folder)
    write(model={"name": "vit_gigantic", "args": {}})
    with pytest.raises(HubError, match="unknown model 'vit_gigantic'"):
        from_pretrained(folder)
    write(model={**config["model"], "args": {**config["model"]["args"], "moe": {"router": "hsah"}}})
    with pytest.raises(HubError, match="unknown router 'hsah'"):
        from_pretrained(folder)
    write(upcycle={"bases": "split"})
    with pytest.raises(HubError, match="'upcycle' must be null or upcycle's settings with 'router' and 'num_experts'"):
        from_pretrained(folder)
    write(model={**config["model"], "args": {**config["model"]["args"], "depth": 3}})
    with pytest.raises(HubError, match=r"does not fit model 'vit_tiny' .*missing \['blocks.2"):
        from_pretrained(folder)
    write()
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HubError, match="cannot read .*model.safetensors"):
        from_pretrained(folder)
    with pytest.raises(HubError, match="has no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(HubError, match="was not built by ermoe.create_model"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")


def test_a_repository_id_offline_is_a_clear_error_without_a_network_call(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="anzheCheng/EMoE: not in the local Hub cache and the Hub cannot be reached"):
        from_pretrained("anzheCheng/EMoE")
    with pytest.raises(HubError, match="is not a Hub folder .* nor a repository id"):
        from_pretrained(tmp_path / "missing" / "deeper")


def test_a_run_exports_with_a_card_of_its_numbers_and_starts_another_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from ermoe.train import load_config, train
    from ermoe.train.init_weights import init_from_checkpoint

    overrides = {"out_dir": str(tmp_path), "run_name": "run", "progress": False, "tensorboard": False,
                 "probe_size": 16, "data": {"name": "digits", "train_limit": 128},
                 "model": {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2,
                           "moe": {"router": "ermoe", "num_experts": 2, "blocks": "all"}},
                 "optim": {"epochs": 1, "batch_size": 64, "warmup_steps": 1}}
    run = train(load_config(None, overrides), quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert main(["export", str(run), str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f"test top-1 {metrics['test_top1']:.4f}" in card and "router `ermoe`, 2 experts" in card
    assert "data: `digits`; budget: 1 epochs of batch 64" in card and "license:" in card
    assert (tmp_path / "hub" / "train_config.yaml").read_text() == (run / "config.yaml").read_text()
    from ermoe.train.trainer import load_run
    _, task, model, _, _ = load_run(run)
    batch = next(iter(task.eval_batches("test")))
    same_model(model, from_pretrained(tmp_path / "hub"), batch.inputs)
    # a Hub folder starts another model (model.init_checkpoint takes it)
    fresh = create_model("vit_tiny", num_classes=10, img_size=8, in_chans=1, patch_size=4, depth=1, embed_dim=16,
                         num_heads=2, moe=dict(router="ermoe", num_experts=2, blocks="all"))
    report = init_from_checkpoint(fresh, str(tmp_path / "hub"))[0]
    assert not report.missing and not report.unexpected
    capsys.readouterr()
    # ermoe eval of a Hub folder on data a config names: the run's own test numbers
    data = ["--data.name=digits", "--data.train_limit=128", "--probe_size=16"]
    assert main(["eval", str(tmp_path / "hub"), *data]) == 0
    assert f"test top-1 {metrics['test_top1']:.4f}" in capsys.readouterr().out
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    config["model"]["args"]["num_classes"] = 5  # as if built for another dataset
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    assert main(["eval", str(tmp_path / "hub"), *data]) == 1
    assert "was built for other data than 'digits': num_classes: the model's 5, the data's 10" in \
        capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "ermoe export: error:" in capsys.readouterr().err
