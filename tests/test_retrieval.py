"""Retrieval data: the Karpathy split reader (COCO / Flickr30K format) with named errors on bad input, and the
built-in caption set (truthful captions, word order that matters)."""

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from ermoe.data.captions import NAMES, PLACES, CaptionSetSpec, Item, build_caption_set, captions_for, compose
from ermoe.data.karpathy import CaptionDataError, read_karpathy

PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ERMOE_CACHE_DIR", str(tmp_path / "cache"))


def _pool(n=50, seed=0):
    g = np.random.default_rng(seed)
    return g.integers(0, 255, (n, 28, 28), dtype=np.uint8), g.integers(0, 10, n)


def _karpathy(tmp_path, entries, sizes=None):
    root = tmp_path / "flickr"
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, e in enumerate(entries):
        w, h = (sizes or {}).get(e["filename"], (40, 30))
        if not e.get("_missing"):
            PIL.fromarray(np.full((h, w, 3), (10 * i) % 256, dtype=np.uint8)).save(root / "img" / e["filename"])
        e.pop("_missing", None)
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path, root / "img"


def _entry(name, split, captions=("a dog", "a cat")):
    return {"filename": name, "split": split, "sentences": [{"raw": c} for c in captions]}


def test_karpathy_reader_splits_restval_and_resizes(tmp_path):
    path, root = _karpathy(tmp_path, [_entry("a.jpg", "train"), _entry("b.jpg", "restval"), _entry("c.jpg", "test"),
                                      _entry("d.jpg", "val", ["one", "two", "three"])], sizes={"a.jpg": (50, 20)})
    splits = read_karpathy(path, root, img_size=16, channels=3)
    assert sorted(splits) == ["test", "train", "val"]
    assert splits["train"].ids == ["a.jpg", "b.jpg"]
    assert tuple(splits["train"].images.shape) == (2, 3, 16, 16) and splits["train"].images.dtype == torch.uint8
    assert splits["val"].captions == [["one", "two", "three"]]
    texts, owner = splits["val"].flat_captions()
    assert texts == ["one", "two", "three"] and owner.tolist() == [0, 0, 0]
    assert (splits["test"].images == 20).all()  # the third image's flat colour survives resize and crop


@pytest.mark.parametrize("problem, match", [
    ("missing", "1 image file.* missing"),
    ("no_caption", r"images\[1\] \(b.jpg\) has no caption"),
    ("bad_split", r"split 'testing'; expected one of"),
    ("no_filename", r"images\[1\] has no 'filename'"),
    ("malformed", "is not valid JSON"),
    ("not_karpathy", "an 'images' list"),
    ("no_train", "no training images"),
    ("unreadable", "cannot be read"),
])
def test_karpathy_errors_name_the_problem(tmp_path, problem, match):
    entries = [_entry("a.jpg", "train"), _entry("b.jpg", "test")]
    if problem == "missing":
        entries[1]["_missing"] = True
    elif problem == "no_caption":
        entries[1]["sentences"] = [{"raw": "  "}]
    elif problem == "bad_split":
        entries[1]["split"] = "testing"
    elif problem == "no_train":
        entries[0]["split"] = "val"
    path, root = _karpathy(tmp_path, entries)
    if problem == "no_filename":
        data = json.loads(path.read_text())
        del data["images"][1]["filename"]
        path.write_text(json.dumps(data))
    elif problem == "malformed":
        path.write_text(path.read_text()[:-5])
    elif problem == "not_karpathy":
        path.write_text(json.dumps([1, 2]))
    elif problem == "unreadable":
        (root / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CaptionDataError, match=match):
        read_karpathy(path, root, img_size=16)


def test_one_image_under_two_karpathy_entries_is_refused(tmp_path):
    """Issue 42: one file in train and test (leakage), or one image id under two entries, is a named error."""
    entries = [_entry("a.jpg", "train"), _entry("b.jpg", "train"), _entry("c.jpg", "test")]
    path, root = _karpathy(tmp_path, entries)
    data = json.loads(path.read_text())
    data["images"].append(_entry("a.jpg", "test"))
    path.write_text(json.dumps(data))
    with pytest.raises(CaptionDataError, match=r"listed more than once: file .*a.jpg in train, test.*leakage"):
        read_karpathy(path, root, img_size=16)
    data["images"][3] = {**_entry("c.jpg", "val"), "filepath": "."}  # c.jpg again, by another path
    path.write_text(json.dumps(data))
    with pytest.raises(CaptionDataError, match=r"file .*c.jpg in test, val"):
        read_karpathy(path, root, img_size=16)
    data["images"] = [{**e, "imgid": k} for k, e in zip((7, 8, 7), data["images"][:3])]
    path.write_text(json.dumps(data))
    with pytest.raises(CaptionDataError, match="image id 7 in train, test"):
        read_karpathy(path, root, img_size=16)


def _label_of(phrase: str) -> tuple[int, str | None]:
    """The class of an item phrase like 'a small running shoe' (longest synonym match), and its size word."""
    phrase = re.sub(r"^(a|an) ", "", phrase.strip())
    size = None
    for word in ("small", "large", "big", "little"):
        if phrase.startswith(word + " "):
            size, phrase = word, phrase[len(word) + 1:]
    matches = [(len(s), c) for c, (singular, _) in enumerate(NAMES) for s in singular if phrase == s]
    assert matches, phrase
    return max(matches)[1], size


def test_relation_and_place_captions_are_true_of_the_canvas():
    rng = np.random.default_rng(0)
    images, labels = _pool()
    checked = 0
    for _ in range(300):
        canvas, items = compose(rng, images, labels)
        assert canvas.shape == (64, 64) and 2 <= len(items) <= 4 and len({(i.row, i.col) for i in items}) == len(items)
        caps = captions_for(rng, items)
        assert len(set(caps)) == 5
        for cap in caps:
            m = re.fullmatch(r"(.+) to the left of (.+)", cap)
            if m:
                (la, _), (lb, _) = _label_of(m[1]), _label_of(m[2])
                assert any(a.label == la and b.label == lb and a.row == b.row and a.col < b.col
                           for a in items for b in items), (cap, items)
                checked += 1
            m = re.fullmatch(r"(.+?)(?: sitting)? above (.+)", cap)
            if m:
                (la, _), (lb, _) = _label_of(m[1]), _label_of(m[2])
                assert any(a.label == la and b.label == lb and a.col == b.col and a.row < b.row
                           for a in items for b in items), (cap, items)
                checked += 1
            m = re.fullmatch(r"(.+) in the (.+) corner", cap)
            if m:
                (label, size), place = _label_of(m[1]), m[2]
                (item,) = [i for i in items if PLACES[(i.row, i.col)] == place]
                assert item.label == label and (size is None or (size in ("large", "big")) == item.large)
                checked += 1
    assert checked > 100


def test_word_order_matters_in_the_built_in_set():
    spec = CaptionSetSpec(train_size=20, val_size=5, test_size=300, seed=1)
    path = build_caption_set(spec, _pool(seed=1), _pool(seed=2))
    assert build_caption_set(spec, _pool(seed=1), _pool(seed=2)) == path  # cached: built once
    data = json.loads(path.read_text())
    test = [e for e in data["images"] if e["split"] == "test"]
    assert len(test) == 300 and all(len(e["sentences"]) == 5 for e in test)
    # captions of different images with the same words in another order: a bag of words cannot tell them apart
    by_words: dict[tuple, set] = {}
    for e in test:
        for s in e["sentences"]:
            by_words.setdefault(tuple(sorted(Counter(s["raw"].split()).elements())), set()).add((e["imgid"], s["raw"]))
    clashes = [v for v in by_words.values() if len({raw for _, raw in v}) > 1 and len({i for i, _ in v}) > 1]
    assert len(clashes) >= 10
    splits = read_karpathy(path, path.parent, img_size=64, channels=1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [20, 5, 300]
    assert Item(**test[0]["items"][0]).label in range(10)


def test_word_order_set_shares_no_caption_and_needs_word_order():
    from ermoe.data.tokenize import caption_tokenizer, encode

    spec = CaptionSetSpec(train_size=30, val_size=10, test_size=300, seed=3, style="word_order")
    data = json.loads(build_caption_set(spec, _pool(seed=1), _pool(seed=2)).read_text())
    test = [e for e in data["images"] if e["split"] == "test"]
    assert len(test) == 300 and all(len(e["sentences"]) == 5 for e in test)
    captions = [s["raw"] for e in test for s in e["sentences"]]
    owner = torch.tensor([i for i, e in enumerate(test) for _ in e["sentences"]])
    tok = caption_tokenizer([s["raw"] for e in data["images"] for s in e["sentences"]], 500)
    ambiguity = caption_ambiguity(encode(tok, captions, 64), owner)
    assert ambiguity["text_shared"] == 0.0 and ambiguity["order_decides"] >= 0.3
    twins = 0
    for e, f in zip(test, test[1:]):
        words = [sorted(re.findall(r"\w+|[^\w\s]+", s["raw"].lower())) for s in e["sentences"]]
        if words == [sorted(re.findall(r"\w+|[^\w\s]+", s["raw"].lower())) for s in f["sentences"]]:
            a, b = ([Item(**i) for i in x["items"]] for x in (e, f))
            moved = [(x, y) for x, y in zip(a, b) if (x.row, x.col) != (y.row, y.col)]
            assert len(moved) == 2 and {(x.label, x.large) for x, _ in moved} != {(moved[0][0].label,
                                                                                 moved[0][0].large)}
            twins += 1
    assert twins >= 0.3 * len(test) / 2
    for e in test:  # every caption is true of its canvas: the scene form read back item by item
        items = {PLACES[(i["row"], i["col"])]: i for i in e["items"]}
        parts = dict(part.split(": ", 1) for part in e["sentences"][0]["raw"].split("; "))
        assert sorted(parts) == sorted(items)
        for place, phrase in parts.items():
            label, size = _label_of(phrase)
            assert label == items[place]["label"] and (size is None or (size in ("large", "big")) ==
                                                       items[place]["large"])
        for clause in e["sentences"][2]["raw"].split(", and "):  # the row form: "x to the left of y in the top row"
            m = re.fullmatch(r"(.+) to the left of (.+) in the (top|bottom) row", clause)
            if m is None:
                continue
            row = ("top", "bottom").index(m[3])
            left, right = (items[PLACES[(row, c)]] for c in (0, 1))
            assert (_label_of(m[1])[0], _label_of(m[2])[0]) == (left["label"], right["label"])


def test_caption_styles_keep_the_mixed_sets_cache_key_and_refuse_unknown_styles():
    import hashlib
    from dataclasses import asdict

    from ermoe.data.captions import CAPTIONS_VERSION, caption_set_dir
    from ermoe.data.modules import FashionCaptionsOptions

    old = {k: v for k, v in asdict(CaptionSetSpec()).items() if k not in ("style", "twin_share")}
    key = hashlib.sha256(json.dumps({**old, "v": CAPTIONS_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    assert caption_set_dir(CaptionSetSpec()).name == key != caption_set_dir(CaptionSetSpec(style="word_order")).name
    with pytest.raises(ValueError, match="data.captions must be one of"):
        FashionCaptionsOptions(captions="poetry")
    with pytest.raises(ValueError, match="data.captions must be one of"):
        build_caption_set(CaptionSetSpec(style="poetry"), _pool(), _pool())


# --- metrics, loss, towers ----------------------------------------------------------------------------------------

from ermoe.analysis.retrieval import (ORDER_DECIDES, TEXT_SHARED, caption_ambiguity, caption_kinds,  # noqa: E402
                                      retrieval_metrics, retrieval_ranks, word_order_chance, word_order_correct)
from ermoe.models import create_model  # noqa: E402
from ermoe.models.dual import LOGIT_SCALE_INIT, clip_loss  # noqa: E402


def _reference_ranks(img, txt, owner):
    """Brute force in float64: ranks by sorting, ties resolved against the query."""
    sims = (txt.double() @ img.double().t())
    text_rank = [1 + int(((sims[m] >= sims[m, owner[m]]) & (torch.arange(len(img)) != owner[m])).sum())
                 for m in range(len(txt))]
    image_rank = []
    for i in range(len(img)):
        mine = owner == i
        best = sims[mine, i].max()
        image_rank.append(1 + int((sims[~mine, i] >= best).sum()))
    return torch.tensor(image_rank), torch.tensor(text_rank)


def test_retrieval_ranks_match_a_float64_reference_in_chunks():
    g = torch.Generator().manual_seed(0)
    owner = torch.repeat_interleave(torch.arange(40), torch.randint(1, 6, (40,), generator=g))
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img[owner] + 0.8 * torch.randn(len(owner), 8, generator=g,
                                                                        dtype=torch.float64), dim=1)
    want_i, want_t = _reference_ranks(img, txt, owner)
    got_i, got_t = retrieval_ranks(img, txt, owner, chunk=7)
    assert torch.equal(got_i, want_i) and torch.equal(got_t, want_t)
    m = retrieval_metrics(img, txt, owner, chunk=7)
    assert m["test_t2i_r@1"] == pytest.approx(float((want_t == 1).double().mean()))
    assert m["test_i2t_r@5"] == pytest.approx(float((want_i <= 5).double().mean()))
    assert m["test_t2i_medr"] == pytest.approx(float(want_t.double().quantile(0.5)))


def test_retrieval_ranks_by_hand_and_ties_count_against():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])  # captions 0, 1 of image 0; caption 2 of image 1
    image_rank, text_rank = retrieval_ranks(img, txt, torch.tensor([0, 0, 1]))
    # image 0: its best caption (0, sim 1) beats caption 2 (0.8): rank 1; image 1: its caption 2 (0.6) is beaten by
    # caption 1 (0.8): rank 2. Caption 1 (0.6 vs 0.8) ranks its image 2nd; caption 2 (0.6 vs 0.8) 2nd too.
    assert image_rank.tolist() == [1, 2] and text_rank.tolist() == [1, 2, 2]
    m = retrieval_metrics(img, txt, torch.tensor([0, 0, 1]), ks=(1,))
    assert m["test_i2t_r@1"] == 0.5 and m["test_t2i_r@1"] == pytest.approx(1 / 3)
    assert m["test_rsum"] == pytest.approx(100 * (0.5 + 1 / 3))
    same = torch.ones(4, 3)  # a collapsed model: every positive ranks last, not first
    image_rank, text_rank = retrieval_ranks(same, same[:4], torch.arange(4))
    assert image_rank.tolist() == [4] * 4 and text_rank.tolist() == [4] * 4


def test_clip_loss_and_logit_scale_as_open_clip():
    g = torch.Generator().manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1)
    scale = torch.tensor(14.3)
    logits = (scale * a @ b.t()).double()
    manual = -(logits.log_softmax(1).diagonal().mean() + logits.t().log_softmax(1).diagonal().mean()) / 2
    assert clip_loss(a, b, scale).item() == pytest.approx(manual.item(), rel=1e-5)
    model = create_model("dual_encoder", img_size=16, in_chans=1, vocab_size=20, context_length=6,
                         image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 1, "patch_size": 8},
                         text={"width": 16, "depth": 1, "num_heads": 2})
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_INIT) and model.scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)
    img, txt, s = model(torch.randn(3, 1, 16, 16), torch.tensor([[3, 4, 0, 0, 0, 0]] * 3))
    assert img.shape == txt.shape == (3, 256) and torch.allclose(img.norm(dim=1), torch.ones(3))


def test_text_tower_ignores_padding_and_routes_real_tokens_only():
    tower = create_model("dual_encoder", img_size=16, in_chans=1, vocab_size=30, context_length=10,
                         image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 1, "patch_size": 8},
                         text={"width": 16, "depth": 2, "num_heads": 2,
                               "moe": {"router": "ermoe", "num_experts": 2, "blocks": "all"}}).eval()
    short = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0], [8, 9, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        a = tower.encode_text(short)
        b = tower.encode_text(short[:, :4])  # the same captions with less padding
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    layers = [v for v in tower.routed_layers() if v.name.startswith("text.")]
    assert len(layers) == 2 and all(v.last_routing.num_tokens == 5 for v in layers)  # 3 + 2 real tokens
    with pytest.raises(ValueError, match="has no tokens"):
        tower.encode_text(torch.zeros(1, 4, dtype=torch.long))


def test_bag_of_words_tower_is_blind_to_word_order():
    kwargs = dict(img_size=16, in_chans=1, vocab_size=30, context_length=6,
                  image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 1, "patch_size": 8})
    torch.manual_seed(0)
    bow = create_model("dual_encoder", text={"width": 16, "depth": 0, "positions": False}, **kwargs).eval()
    seq = create_model("dual_encoder", text={"width": 16, "depth": 1, "num_heads": 2}, **kwargs).eval()
    one, other = torch.tensor([[4, 5, 6, 7]]), torch.tensor([[7, 5, 6, 4]])  # "bag left of shoe" / "shoe left of bag"
    with torch.no_grad():
        torch.testing.assert_close(bow.encode_text(one), bow.encode_text(other))
        assert not torch.allclose(seq.encode_text(one), seq.encode_text(other), atol=1e-4)
    with pytest.raises(ValueError, match="depth 0 has no FFN"):
        create_model("dual_encoder", text={"depth": 0, "moe": {"router": "ermoe", "num_experts": 2}}, **kwargs)


def test_tokenizer_vocabulary_is_deterministic_by_hand():
    from ermoe.data.tokenize import caption_tokenizer, encode

    caps = ["a bag to the left of a Sneaker", "two bags above an ankle boot", "top left: a coat"]
    tok = caption_tokenizer(caps, 8)
    # words by count, then alphabetically: a (4), left (2), then count-1 words: 6 word slots, the rest [UNK]
    assert [tok.id_to_token(i) for i in range(8)] == ["[PAD]", "[UNK]", "a", "left", ":", "above", "an", "ankle"]
    assert caption_tokenizer(list(reversed(caps)), 8).to_str() == tok.to_str()  # caption order does not matter
    ids = encode(tok, ["A BAG above the left", "a " * 20], context_length=8)
    assert ids[0].tolist() == [2, 1, 5, 1, 3, 0, 0, 0] and (ids[1] != 0).all()
    assert tok.decode(ids[0].tolist()) == "a [UNK] above [UNK] left"


# --- the task end to end ------------------------------------------------------------------------------------------

TINY = {"image": {"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 2, "patch_size": 16,
                  "moe": {"router": "ermoe", "num_experts": 2, "blocks": [1]}},
        "text": {"width": 16, "depth": 1, "num_heads": 2,
                 "moe": {"router": "softmax_topk", "num_experts": 2, "blocks": "all"}}}


def _cfg(tmp_path, data, **extra):
    from ermoe.train import load_config

    return load_config(None, {"task": "retrieval", "out_dir": str(tmp_path / "runs"), "progress": False,
                              "tensorboard": False, "probe_size": 8, "data": data,
                              "model": {"name": "dual_encoder", **TINY}, "task_options": {"vocab_size": 60},
                              "optim": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64, "warmup_steps": 1},
                              **extra})


def test_karpathy_json_by_someone_else_trains_and_evaluates(tmp_path):
    from ermoe.train import ConfigError, train

    entries = [_entry(f"{i}.jpg", "test" if i >= 40 else "val" if i >= 32 else "restval" if i % 2 else "train",
                      [f"a photo number {i}", f"picture {i} of a dog", "a cat"]) for i in range(48)]
    path, root = _karpathy(tmp_path, entries)
    run = train(_cfg(tmp_path, {"name": "karpathy", "json": str(path), "image_root": str(root), "img_size": 32}),
                quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == 8 and metrics["test_captions"] == 24
    assert metrics["chance_t2i_r@1"] == pytest.approx(1 / 8) and metrics["chance_i2t_r@1"] == pytest.approx(3 / 24)
    assert {"test_i2t_r@1", "test_t2i_r@10", "test_i2t_medr", "val_rsum"} <= set(metrics)
    text = metrics["layers"]["text.blocks.0.mlp"]
    assert sum(text["tokens_per_expert"]) > 24 and "mi_word_bits" in text and "probe_changed" in text
    from ermoe.train.run import Run
    examples = Run(run).read_examples()  # per test image and caption: the ranks the recalls come from
    assert examples["i2t_rank"].shape == (8,) and examples["caption/owner"].tolist() == [i // 3 for i in range(24)]
    assert 100 * sum((examples["i2t_rank"] <= k).mean() + (examples["caption/t2i_rank"] <= k).mean()
                     for k in (1, 5, 10)) == pytest.approx(metrics["test_rsum"])
    assert "mi_item_bits" not in metrics["layers"]["image.blocks.1.mlp"]  # no item labels in someone else's data
    with pytest.raises(ConfigError, match="data.hflip does not apply"):
        _cfg(tmp_path, {"name": "karpathy", "json": str(path), "image_root": str(root), "hflip": True})
    with pytest.raises(ValueError, match="needs data.json"):
        train(_cfg(tmp_path, {"name": "karpathy"}), quiet=True)


def test_built_in_caption_set_end_to_end_with_item_diagnostics(tmp_path):
    from ermoe.data.images import DEBIAN_FASHION_MNIST
    from ermoe.train import train

    if not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    run = train(_cfg(tmp_path, {"name": "fashion_captions", "caption_set_size": 64}), quiet=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == 1000 and metrics["test_captions"] == 5000  # Flickr30K's test size
    image = metrics["layers"]["image.blocks.1.mlp"]
    counts = np.asarray(image["expert_item_counts"])
    assert counts.shape == (2, 11) and counts.sum() == 1000 * 16  # 4 x 4 patches of 16 px, each in one cell
    assert counts[:, 10].sum() > 0 and counts[:, :10].sum() > counts[:, 10].sum() / 4  # background and items
    assert (run / "figures" / "expert_load.png").stat().st_size > 1000


def test_an_moe_spec_that_places_nothing_is_an_error():
    with pytest.raises(ValueError, match="none at depth 1"):
        create_model("dual_encoder", text={"width": 16, "depth": 1, "num_heads": 2,
                                           "moe": {"router": "ermoe", "num_experts": 2}})
    with pytest.raises(ValueError, match="empty list"):
        create_model("vit_tiny", num_classes=3, img_size=16, patch_size=8, depth=2,
                     moe={"router": "ermoe", "num_experts": 2, "blocks": []})


def test_retrieval_study_quick_end_to_end(tmp_path, capsys):
    """`ermoe study --config configs/study_retrieval.yaml --quick`: the claim-8 report from dual encoders whose
    towers differ in routing only."""
    from pathlib import Path

    from ermoe.cli import main
    from ermoe.data.images import DEBIAN_FASHION_MNIST
    from ermoe.study.retrieval import RETRIEVAL_DEFAULT_METHODS, RETRIEVAL_TRAIN, retrieval_method_model

    base = RETRIEVAL_TRAIN["model"]
    bow, ermoe_ = retrieval_method_model("bow", base), retrieval_method_model("ermoe_standardize", base)
    assert bow["text"]["depth"] == 0 and bow["text"]["positions"] is False and bow["image"]["moe"] is None
    assert ermoe_["image"]["moe"]["router_kwargs"] == ermoe_["text"]["moe"]["router_kwargs"] == {"standardize": True}
    assert ermoe_["image"]["patch_size"] == base["image"]["patch_size"]
    config = str(Path(__file__).parents[1] / "configs" / "study_retrieval.yaml")
    assert main(["study", "--config", config, "--list-methods"]) == 0
    assert capsys.readouterr().out.split() == RETRIEVAL_DEFAULT_METHODS
    if not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    args = ["study", "--config", config, "--quick", "--methods=[dense,bow,ermoe,switch,oracle]",
            f"--out_dir={tmp_path / 'runs'}", f"--report={tmp_path / 'results_retrieval.md'}"]
    assert main(args) == 0
    report = (tmp_path / "results_retrieval.md").read_text()
    assert "Claim 8:" in report and "| `bow` |" in report and "| `switch` |" in report
    assert "1000 test images" not in report and "100 test images x 500 captions" in report
    # the positive controls open the claims: the oracle against dense, the item probe of the dense towers
    controls = report[report.index("## Positive controls"):report.index("## The papers' claims")]
    assert "Oracle routing (`oracle`" in controls and "against `dense`" in controls and "MI item bits" in controls
    assert "A linear probe of the item class" in controls and "image.blocks.1" in controls
    oracle = json.loads((tmp_path / "runs" / "oracle" / "seed0" / "metrics.json").read_text())
    counts = np.asarray(oracle["layers"]["image.blocks.1.mlp"]["expert_item_counts"])  # (experts, items)
    for c in range(counts.shape[1]):  # every item class's patches on its expert, class mod 4
        assert counts[:, c].nonzero()[0].tolist() in ([], [c % 4])
    dense = json.loads((tmp_path / "runs" / "dense" / "seed0" / "metrics.json").read_text())
    probes = dense["truth_probe"]
    assert sorted(probes) == ["image.blocks.0", "image.blocks.1", "text.blocks.0", "text.blocks.1"]
    tokens = probes["image.blocks.0"]["tokens"]  # an eighth of the 64 training canvases fit it, the test read whole
    assert tokens["train"] == 8 * 16 and tokens["test"] == 100 * 16
    assert "truth_probe" not in oracle  # the probe reads dense towers only
    # word order measured in every run; a run evaluated before it was gets it from its final checkpoint, the same
    from ermoe.study.runner import record_word_order
    from ermoe.train.run import Run

    assert "| order acc |" in report and "order acc of a random ranking" in report
    run = Run(tmp_path / "runs" / "switch" / "seed0")
    metrics, examples = run.read_metrics(), run.read_examples()
    owner, kind, correct = examples["caption/owner"], examples["caption/kind"], examples["caption/order_correct"]
    assert len(kind) == len(correct) == len(owner) == 500 and ((correct >= 0) == (kind == ORDER_DECIDES)).all()
    assert metrics["test_word_order_acc"] == pytest.approx(correct[kind == ORDER_DECIDES].mean())
    assert metrics["test_caption_order_decides"] == pytest.approx((kind == ORDER_DECIDES).mean())
    assert not record_word_order(run.root)  # measured already
    old = {k: v for k, v in examples.items() if k not in ("caption/kind", "caption/order_correct")}
    run.write_examples(old)
    run.write_metrics({k: v for k, v in metrics.items() if not k.startswith("test_word_order")})
    assert record_word_order(run.root)
    again = run.read_examples()
    assert sorted(again) == sorted(examples) and all(np.array_equal(again[k], examples[k]) for k in examples)
    assert run.read_metrics() == metrics
    # a checkpoint that does not give back the recorded ranks: a warning, nothing written
    run.write_examples({**old, "i2t_rank": old["i2t_rank"] + 1})
    with pytest.warns(UserWarning, match="does not give back the test ranks"):
        assert not record_word_order(run.root)
    assert "caption/kind" not in run.read_examples()


def test_every_dual_encoder_parameter_learns_from_the_contrastive_loss():
    torch.manual_seed(0)
    model = create_model("dual_encoder", img_size=16, in_chans=1, vocab_size=30, context_length=8,
                         image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 2, "patch_size": 8,
                                "moe": {"router": "ermoe", "num_experts": 2, "blocks": "all"}},
                         text={"width": 16, "depth": 2, "num_heads": 2,
                               "moe": {"router": "emoe", "num_experts": 2, "blocks": "all"}})
    ids = torch.randint(2, 30, (6, 8))
    ids[:, 5:] = 0
    loss = clip_loss(*model(torch.randn(6, 1, 16, 16), ids)) + model.aux_loss()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    # the embedding rows of words absent from the batch get no gradient, by design
    assert dead == [] or all(n == "text.token_embed.weight" for n in dead)
    assert model.text.token_embed.weight.grad[ids.unique()[ids.unique() > 0]].abs().sum(1).gt(0).all()


def test_caption_ambiguity_by_hand():
    # image 0 "a b", image 1 "b a": the same words in another order -> order decides both;
    # images 2 and 3 both "c": identical text -> shared; image 4 "d e" and image 2's second caption "e c d": unique.
    ids = torch.tensor([[1, 2, 0], [2, 1, 0], [3, 0, 0], [3, 0, 0], [4, 5, 0], [5, 3, 4]])
    owner = torch.tensor([0, 1, 2, 3, 4, 2])
    got = caption_ambiguity(ids, owner)
    assert got == {"text_shared": 2 / 6, "order_decides": 2 / 6, "bag_unique": 2 / 6}
    # the same caption twice for one image is not ambiguous
    assert caption_ambiguity(torch.tensor([[1, 2], [1, 2]]), torch.tensor([0, 0]))["bag_unique"] == 1.0
    with pytest.raises(ValueError, match="M owners"):
        caption_ambiguity(ids, owner[:3])


def test_word_order_accuracy_by_hand():
    # images 0, 1, 2: "a b", "b a", "a b a" (a bag of its own); image 3: "b a" too (shared with image 1); images 4, 5
    # and 6: "c d e", "e d c", "d c e" (three images with one bag: each has two rivals)
    ids = torch.tensor([[1, 2, 0], [2, 1, 0], [1, 2, 1], [2, 1, 0], [3, 4, 5], [5, 4, 3], [4, 3, 5]])
    owner = torch.arange(7)
    kind, rivals = caption_kinds(ids, owner)
    assert kind.tolist() == [ORDER_DECIDES, TEXT_SHARED, 0, TEXT_SHARED, ORDER_DECIDES, ORDER_DECIDES, ORDER_DECIDES]
    assert rivals == [[1, 3], [], [], [], [5, 6], [4, 6], [4, 5]]
    assert word_order_chance(rivals) == pytest.approx(1 / 3)
    # one-dimensional embeddings: a caption's score for an image is the product of the two numbers
    images = torch.tensor([[3.0], [1.0], [0.0], [2.0], [1.0], [2.0], [2.0]])
    texts = torch.tensor([[1.0], [0.0], [0.0], [0.0], [1.0], [1.0], [-1.0]])
    got = word_order_correct(images, texts, owner, rivals)
    # caption 0: 3 > 1 and 3 > 2, right; caption 4: 1 < 2, wrong; caption 5: 2 ties image 6's 2, counted against it;
    # caption 6: -2 against -1 and -2, wrong
    assert got.tolist() == [1, -1, -1, -1, 0, 0, 0]
    with pytest.raises(ValueError, match="one rival list per caption"):
        word_order_correct(images, texts, owner, rivals[:3])


def test_word_order_groups_by_hand_and_the_batches_that_keep_them():
    from ermoe.analysis.retrieval import word_order_groups

    # the images of test_word_order_accuracy_by_hand: 0 "a b" has the words of 1 and 3 ("b a") -> one group; 2 alone;
    # 4, 5, 6 the same words in three orders; image 7 has no caption of its own kind and stays alone
    ids = torch.tensor([[1, 2, 0], [2, 1, 0], [1, 2, 1], [2, 1, 0], [3, 4, 5], [5, 4, 3], [4, 3, 5], [6, 0, 0]])
    assert word_order_groups(ids, torch.arange(8), 8) == [[0, 1, 3], [2], [4, 5, 6], [7]]
    assert word_order_groups(ids[:3], torch.tensor([0, 0, 1]), 2) == [[0], [1]]  # one image's own captions: no rivals


def test_word_order_batches_keep_the_built_in_sets_twins_together(tmp_path):
    """task_options.word_order_batches: a training image whose captions only word order tells from another's shares
    its batch with it (but where a batch ends); refused where no two images are such."""
    from ermoe.data.images import DEBIAN_FASHION_MNIST
    from ermoe.data.loader import grouped_epoch_order
    from ermoe.train import ConfigError, create_task, train

    if not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    cfg = _cfg(tmp_path, {"name": "fashion_captions", "caption_set_size": 64, "test_limit": 100,
                          "captions": "word_order"},
               task_options={"vocab_size": 60, "word_order_batches": True})
    task = create_task(cfg, torch.device("cpu"))
    task.load()
    groups, n, size = task.batches.train_groups, task.batches.num_train, cfg.optim.batch_size
    assert sorted(i for g in groups for i in g) == list(range(n)) and sum(len(g) > 1 for g in groups) >= n // 8
    order = grouped_epoch_order([torch.tensor(g) for g in groups], cfg.seed, 0)
    batches = list(task.batches.train_batches(0, n // size))
    for step, batch in enumerate(batches):  # the batches are the grouped order's rows
        rows = order[step * size:(step + 1) * size]
        assert torch.equal(batch.inputs[0], task.batches._normalize(task.splits["train"].images[rows]))
    together = [g for g in groups if len(g) > 1 and any(set(g) <= set(order[s * size:(s + 1) * size].tolist())
                                                         for s in range(len(batches)))]
    assert len(together) >= sum(len(g) > 1 for g in groups) - len(batches)  # a group is cut only at a batch end
    entries = [_entry(f"{i}.jpg", "test" if i >= 40 else "val" if i >= 32 else "train",
                      [f"a photo number {i}", f"picture {i} of a dog"]) for i in range(48)]
    path, root = _karpathy(tmp_path, entries)
    with pytest.raises((ConfigError, ValueError), match="nothing to keep in one batch"):
        train(_cfg(tmp_path, {"name": "karpathy", "json": str(path), "image_root": str(root), "img_size": 16},
                   task_options={"vocab_size": 60, "word_order_batches": True}), quiet=True)


def test_a_tower_blind_to_word_order_is_right_on_one_caption_of_each_swapped_pair():
    """The order-acc floor the report names: a bag-of-words text tower embeds a caption and its twin's reordering
    alike, so of the two it ranks exactly one right (random weights, random images, 20 swapped pairs); a
    transformer text tower is not tied to that."""
    kwargs = dict(img_size=16, in_chans=1, vocab_size=30, context_length=6,
                  image={"name": "vit_tiny", "embed_dim": 16, "num_heads": 2, "depth": 1, "patch_size": 8})
    torch.manual_seed(0)
    bow = create_model("dual_encoder", text={"width": 16, "depth": 0, "positions": False}, **kwargs).eval()
    bags = [torch.randperm(26)[:4] + 4 for _ in range(20)]
    ids = torch.stack([row for bag in bags for row in (bag, bag.flip(0))])  # image 2i and its twin 2i + 1
    owner = torch.arange(40)
    kind, rivals = caption_kinds(ids, owner)
    assert (kind == ORDER_DECIDES).all() and word_order_chance(rivals) == 0.5
    with torch.no_grad():
        images, texts = bow.encode_image(torch.randn(40, 1, 16, 16)), bow.encode_text(ids)
    got = word_order_correct(images, texts, owner, rivals).reshape(20, 2)
    assert (got.sum(1) == 1).all()


def test_karpathy_images_decoded_per_batch_in_workers_train_as_images_held_in_memory(tmp_path):
    """Past data.memory_cap_gb the images stay on disk and are decoded per batch in the loader's workers: the
    training curve and the test recall are those of the in-memory run; a distributed rank reads only its pairs."""
    from ermoe.train import create_task
    from ermoe.train import train

    entries = [_entry(f"{i}.jpg", "test" if i >= 40 else "train", [f"a photo number {i}", f"picture {i} of a dog",
                                                                   "a cat"]) for i in range(48)]
    path, root = _karpathy(tmp_path, entries)
    data = {"name": "karpathy", "json": str(path), "image_root": str(root), "img_size": 32}

    def losses(run) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    held = train(_cfg(tmp_path, data, run_name="held", log_every=1), quiet=True)
    disk = train(_cfg(tmp_path, {**data, "memory_cap_gb": 0.0, "num_workers": 2}, run_name="disk", log_every=1),
                 quiet=True)
    assert len(losses(held)) == 2 and losses(held) == losses(disk)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (held, disk))
    assert a["test_rsum"] == b["test_rsum"]

    task = create_task(_cfg(tmp_path, {**data, "memory_cap_gb": 0.0}), torch.device("cpu"))
    task.load()
    assert not task.splits["train"].in_memory
    whole = list(task.train_batches(0, 2))
    halves = [list(task.train_batches(0, 2, rank, 2)) for rank in range(2)]
    for step in range(2):
        for k in range(2):  # images and token ids
            assert torch.equal(torch.cat([h[step].inputs[k] for h in halves]), whole[step].inputs[k])

    (root / "41.jpg").write_bytes(b"not a jpeg")  # a test image: found when it is first decoded, in a worker
    with pytest.raises(CaptionDataError, match=r"image .*41\.jpg cannot be read") as err:
        train(_cfg(tmp_path, {**data, "memory_cap_gb": 0.0, "num_workers": 2}, run_name="bad"), quiet=True)
    assert "DataLoader worker" not in str(err.value)


def test_the_documented_karpathy_command_loads(tmp_path, capsys):
    from pathlib import Path

    from ermoe.train import load_config

    # docs/retrieval.md, "Your own data", with this machine's paths
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "retrieval_ermoe.yaml",
                      ["data.name=karpathy", f"data.json={tmp_path / 'dataset_flickr30k.json'}",
                       f"data.image_root={tmp_path}", "data.img_size=224"])
    assert cfg.data.name == "karpathy" and cfg.data.img_size == 224
    assert "caption_set_size" in capsys.readouterr().err
