"""A library that stays out of the way: the U-Net's own state stays the base model's (LoRA's
peft layers included), attaching does not freeze tuners attached earlier, processor changes cannot silently drop bound tuners,
several bound tuners share an attention, and the package has no import cycle."""

import ast
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

import restuning
from restuning.arch import TINY_ARCHS, build_unet
from tests.conftest import run

PACKAGE = Path(restuning.__file__).parent


def _perturb(handle, seed=9):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _attach_one_of_each(unet):
    restuning.attach(unet, restuning.ResTuningConfig(tuners={"attn1": "prefix", "ff": "prompt", "block": "adapter"}), name="rt")
    restuning.attach(unet, restuning.BypassConfig(dim=4), name="bypass")
    restuning.attach(unet, restuning.AdapterConfig(), name="adapter")
    restuning.attach(unet, restuning.PrefixConfig(ops=("attn1", "attn2")), name="prefix")
    restuning.attach(unet, restuning.PromptConfig(), name="prompt")
    restuning.attach(unet, restuning.LoraConfig(blocks=("down", "mid", "up")), name="lora")
    for handle in restuning.attached(unet).values():
        _perturb(handle)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_unet_state_is_the_base_models_with_tuners_attached(tmp_path, arch, tiny_unet, unet_inputs):
    base_state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    _attach_one_of_each(tiny_unet)
    tuned = run(tiny_unet, unet_inputs)
    state = tiny_unet.state_dict()
    assert sorted(state) == sorted(base_state)
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)

    tiny_unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert sorted(reloaded.state_dict()) == sorted(base_state)
    assert torch.equal(run(reloaded, unet_inputs), run(build_unet(arch, seed=0).eval(), unet_inputs))

    # A base checkpoint loads strictly into the tuned U-Net and leaves its tuners as they were.
    tiny_unet.load_state_dict(base_state, strict=True)
    assert torch.equal(run(tiny_unet, unet_inputs), tuned)


def test_a_lora_attached_by_diffusers_keeps_its_keys_beside_ours(tiny_unet):
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    base = set(tiny_unet.state_dict())
    tiny_unet.add_adapter(PeftLoraConfig(r=2, target_modules=["to_q"]), adapter_name="theirs")
    theirs = set(tiny_unet.state_dict())
    ours = restuning.attach(tiny_unet, restuning.LoraConfig(), name="ours")
    _perturb(ours)
    assert set(tiny_unet.state_dict()) == theirs != base
    assert get_peft_model_state_dict(tiny_unet, adapter_name="theirs")
    assert ours.state_dict() and all(".lora_" in k for k in ours.state_dict())
    restuning.detach(tiny_unet, "ours")
    tiny_unet.delete_adapters("theirs")
    assert set(tiny_unet.state_dict()) == base


def test_attach_freezes_only_the_backbone(tiny_unet):
    bypass = restuning.attach(tiny_unet, restuning.BypassConfig(dim=4), name="bypass")
    restuners = restuning.attach(tiny_unet, restuning.ResTuningConfig(), name="rt")
    lora = restuning.attach(tiny_unet, restuning.LoraConfig(), name="lora")
    tuners = {id(p) for h in (bypass, restuners, lora) for p in h.parameters()}
    assert tuners
    assert {id(p) for p in restuning.trainable_parameters(tiny_unet)} == tuners
    restuning.detach(tiny_unet)
    assert restuning.trainable_parameters(tiny_unet) == []


@pytest.mark.parametrize("change", ["set_attn_processor", "xformers_off", "fuse_qkv"])
def test_changing_the_processor_is_refused_while_bound_tuners_live_in_it(tiny_unet, unet_inputs, change):
    _perturb(restuning.attach(tiny_unet, restuning.PrefixConfig(), name="p"))
    tuned = run(tiny_unet, unet_inputs)
    calls = {
        "set_attn_processor": lambda: tiny_unet.set_attn_processor(AttnProcessor2_0()),
        "xformers_off": lambda: tiny_unet.set_use_memory_efficient_attention_xformers(False),
        "fuse_qkv": lambda: tiny_unet.fuse_qkv_projections(),
    }
    before = dict(tiny_unet.attn_processors)
    with pytest.raises(restuning.AttachError, match="'p'.*[Dd]etach"):
        calls[change]()
    assert torch.equal(run(tiny_unet, unet_inputs), tuned)
    # refused before any attention changed, not part of the way through
    assert all(tiny_unet.attn_processors[k] is v for k, v in before.items())
    restuning.detach(tiny_unet)
    tiny_unet.set_attn_processor(AttnProcessor2_0())  # allowed again once the tuners are gone


def test_bound_tuners_share_an_attention_and_detach_in_any_order(unet_inputs):
    """The sampler loads every column's tuner onto one U-Net: a Prefix and a Prompt both on attn1
    must each give their own output when routed, and detaching one must keep the other."""
    configs = {"a": restuning.PrefixConfig(), "b": restuning.PromptConfig()}
    alone = {}
    for name, config in configs.items():
        unet = build_unet("tiny", seed=0).eval()
        torch.manual_seed(ord(name))
        _perturb(restuning.attach(unet, config, name=name), seed=ord(name))
        alone[name] = run(unet, unet_inputs)
    unet = build_unet("tiny", seed=0).eval()
    base = run(unet, unet_inputs)
    for name, config in configs.items():
        torch.manual_seed(ord(name))
        _perturb(restuning.attach(unet, config, name=name), seed=ord(name))
    assert not torch.equal(alone["a"], base) and not torch.equal(alone["b"], base)
    with restuning.route(["a", "b"]):
        routed = run(unet, unet_inputs)
    torch.testing.assert_close(routed[0], alone["a"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], alone["b"][1], atol=1e-5, rtol=0)
    restuning.detach(unet, "a")
    torch.testing.assert_close(run(unet, unet_inputs), alone["b"], atol=1e-5, rtol=0)
    restuning.detach(unet, "b")
    assert torch.equal(run(unet, unet_inputs), base)


def _imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports, at module level or inside functions."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("restuning")}
    return found


def test_the_package_has_no_import_cycle():
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}
    # A package's __init__ re-exporting its submodules is not a dependency of those submodules.
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_method_folder_has_the_same_shape():
    """PEFT's tuners/<method>/{config,model}.py: the config in config.py, attach in model.py,
    both exported by the folder's __init__; the registry is the one list of methods."""
    import importlib

    from restuning.methods import METHODS

    for method in METHODS.values():
        package = method.attach.__module__.rsplit(".", 1)[0]
        folder = PACKAGE.parent.joinpath(*package.split("."))
        assert method.attach.__module__ == f"{package}.model", method.name
        assert method.config.__module__ == f"{package}.config", method.name
        assert (folder / "config.py").is_file() and (folder / "model.py").is_file()
        exported = importlib.import_module(package)
        assert exported.attach is method.attach and getattr(exported, method.config.__name__) is method.config
