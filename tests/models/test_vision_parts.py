"""The vision tower / projector / language model split of every family (ms-swift's `freeze_vit`,
`freeze_aligner`, `freeze_llm`, `vit_lr`, `aligner_lr`), on the real module trees: the prefixes name
real modules and cover every vision-side parameter, full fine-tuning freezes exactly the parts asked
for, LoRA adapters go on the tower when it is not frozen, and the optimiser groups carry their lrs."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from anatomy_lightning.grpo import rollout as R
from anatomy_lightning.models.families import PARTS, family_of
from anatomy_lightning.models.loading import load_policy
from anatomy_lightning.models.parts import LoraSettings, freeze_parts, resolve_frozen
from anatomy_lightning.optimization import apply_resumed_settings, configure_optimization, parameter_groups
from tests.models.test_loading import _inputs
from tests.support.standins import STANDIN_FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _meta_model(model_type: str) -> torch.nn.Module:
    """A family without a stand-in, built on the meta device from its default config (no weights)."""
    if model_type == "gemma4":
        from transformers.models.gemma4 import configuration_gemma4 as c

        config = c.Gemma4Config(vision_config=c.Gemma4VisionConfig(), audio_config=c.Gemma4AudioConfig())
    else:
        config = AutoConfig.for_model(model_type)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize("family", [*STANDIN_FAMILIES, "meta:gemma4", "meta:internvl"])
def test_tower_and_projector_prefixes_cover_the_vision_side(family: str, standin) -> None:
    if family.startswith("meta:"):
        model = _meta_model(family.removeprefix("meta:"))
    else:
        model = AutoModelForImageTextToText.from_pretrained(standin(family))
    fam = family_of(model)
    params = dict(model.named_parameters())
    modules = [n for n, _ in model.named_modules()]
    for part in ("vision_tower", "projector"):  # each part is there, under a prefix the family names
        assert any(fam.part_of(n) == part for n in params), f"{fam.name}: no {part} parameter"
    real = [p for p in fam.vision_tower + fam.projector if any(n == p or n.startswith(p + ".") for n in params)]
    assert all(p in modules or p in params for p in real)  # a module, or LLaVA-OneVision's image_newline vector
    # the rest is the language model: its decoder, embeddings, norm and lm_head, nothing of the vision side
    root = fam.language_layers.removesuffix(r"\.layers")
    rest = [n for n in params if fam.part_of(n) == "language_model"]
    assert rest and all(re.match(rf"{root}\.", n) or n.startswith("lm_head.") for n in rest), rest[:5]
    kept_unquantized = [n for n in params if any(n.startswith(p + ".") for p in fam.unquantized)]
    assert all(fam.part_of(n) != "language_model" for n in kept_unquantized)
    for n in modules:  # the regex form (peft's exclude_modules) says the same
        assert [p for p in PARTS if re.fullmatch(fam.part_regex(p), n)] == [fam.part_of(n)], n
    if fam.name == "qwen3-vl":
        assert fam.part_of("model.visual.deepstack_merger_list.0.linear_fc1.weight") == "projector"
    if family.startswith("meta:"):
        return
    # full fine-tuning with both frozen: only the language model trains, and it is the one group
    freeze_parts(model, fam, freeze_vit=True, freeze_aligner=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == rest
    with pytest.raises(ValueError, match="model.vit_lr = 0.001, but no weight of the vision tower trains"):
        parameter_groups(model, vit_lr=1e-3)
    model.requires_grad_(True)
    groups = parameter_groups(model, vit_lr=1e-3, aligner_lr=2e-3)
    assert [(g["name"], g.get("lr")) for g in groups] == [("language_model", None), ("vision_tower", 1e-3),
                                                          ("projector", 2e-3)]
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_defaults_follow_the_mode() -> None:
    assert resolve_frozen(None, None, None) == (False, False)  # full fine-tuning trains everything (ms-swift: frozen)
    assert resolve_frozen(None, None, {"r": 4}) == (True, True)  # LoRA: language model only, as ms-swift
    assert resolve_frozen(False, None, {"r": 4}) == (False, True)
    # the older key keeps its meaning for a target list, and changes nothing without one
    assert resolve_frozen(None, None, {"target_modules": ["qkv"], "include_vision": True}) == (False, False)
    assert resolve_frozen(None, None, {"include_vision": True}) == (True, True)


def test_full_fine_tuning_freezes_the_parts_asked_for() -> None:
    model, _ = load_policy("tiny-qwen2.5-vl", freeze_vit=True, freeze_aligner=False)
    fam = family_of(model)
    parts = {fam.part_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert parts == {"language_model", "projector"}
    assert not R.vision_frozen(model)  # the cached features are the merger's output, and it trains
    frozen, _ = load_policy("tiny-qwen2.5-vl", freeze_vit=True, freeze_aligner=True)
    assert R.vision_frozen(frozen)  # nothing on the vision side trains: features are reused
    only_vision, _ = load_policy("tiny-qwen2.5-vl", freeze_llm=True)
    assert {fam.part_of(n) for n, p in only_vision.named_parameters() if p.requires_grad} == {"vision_tower",
                                                                                               "projector"}


def test_lora_adapters_on_the_vision_tower_train() -> None:
    model, processor = load_policy("tiny-qwen2.5-vl", lora=LoraSettings(r=2, dropout=0.0), freeze_vit=False)
    fam = family_of(model)
    base = model.get_base_model()
    adapted = {n.split(".lora_")[0]: fam.part_of(n) for n, p in base.named_parameters() if "lora_" in n}
    tower = [n for n, part in adapted.items() if part == "vision_tower"]
    assert tower and any(".attn.qkv" in n for n in tower) and any(".mlp.down_proj" in n for n in tower)
    assert "projector" not in adapted.values()  # freeze_aligner stays at LoRA's default
    assert {part for part in adapted.values()} == {"vision_tower", "language_model"}
    assert not R.vision_frozen(model)
    groups = parameter_groups(model, vit_lr=0.05)
    opt = configure_optimization(groups, optimizer="adamw", learning_rate=0.01, weight_decay=0.0,
                                 lr_schedule="constant", warmup_steps=0, max_steps=None)["optimizer"]
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("language_model", 0.01), ("vision_tower", 0.05)]
    before = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    model.train()
    model(**_inputs(processor)).logits.float().pow(2).mean().backward()
    opt.step()
    moved = {n for n, p in base.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(fam.part_of(n) == "vision_tower" and "lora_B" in n for n in moved)  # lora_A waits for B != 0
    # the projector too; Qwen's merger MLP has a GELU between its linears, which gets no adapter
    both, _ = load_policy("tiny-qwen2.5-vl", lora=LoraSettings(r=2), freeze_vit=False, freeze_aligner=False)
    names = [n for n, _ in both.get_base_model().named_parameters()]
    merger = {n.split(".lora_")[0] for n in names if ".merger." in n and "lora_" in n}
    assert merger == {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}


def _grouped_checkpoint(vit_lr: float | None) -> tuple[dict, dict]:
    settings = {"optimizer": "adamw", "learning_rate": 1e-3, "weight_decay": 0.0, "lr_schedule": "constant",
                "warmup_steps": 0}
    hp = {**settings, "vit_lr": vit_lr, "aligner_lr": None}
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "name": "language_model"},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "name": "vision_tower", "lr": vit_lr}]
    conf = configure_optimization(groups, **settings, max_steps=10)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    opt.step()
    sched.step()
    return hp, {"hyper_parameters": hp, "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()]}


def test_resume_applies_each_groups_own_rate() -> None:
    from types import SimpleNamespace

    fitting = SimpleNamespace(state=SimpleNamespace(fn="fit"), max_steps=10)
    hp, ckpt = _grouped_checkpoint(vit_lr=1e-4)
    apply_resumed_settings(ckpt, {**hp, "learning_rate": 2e-3, "vit_lr": 5e-5}, fitting)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [(g["name"], g["lr"]) for g in groups] == [("language_model", 2e-3), ("vision_tower", 5e-5)]
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [2e-3, 5e-5]
    _, ckpt = _grouped_checkpoint(vit_lr=1e-4)  # a changed learning_rate leaves the tower's own rate alone
    apply_resumed_settings(ckpt, {**hp, "learning_rate": 2e-3}, fitting)
    assert [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] == [2e-3, 1e-4]
    with pytest.raises(ValueError, match="model.vit_lr = None, model.aligner_lr = None, but the checkpoint's "
                                         "optimizer state has a group per part"):
        apply_resumed_settings(_grouped_checkpoint(vit_lr=1e-4)[1], {**hp, "vit_lr": None}, fitting)


def test_cli_optimizer_takes_the_groups() -> None:
    """--optimizer: the language model's group takes its lr, the tower's and projector's keep their own."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "name": "language_model"},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "name": "projector", "lr": 0.01}]
    conf = configure_optimization(groups, optimizer="adamw", learning_rate=1e-5, weight_decay=0.0,
                                  lr_schedule="constant", warmup_steps=0, max_steps=None,
                                  cli_optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.2}})
    opt = conf["optimizer"]
    assert isinstance(opt, torch.optim.SGD) and [g["lr"] for g in opt.param_groups] == [0.2, 0.01]
