"""TarFlow model: configuration, shapes, density, incremental evaluation, published layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fixedpoint.tarflow import reverse
from fixedpoint.tarflow.model import KVCache, TarFlow, TarFlowConfig

TINY = dict(image_size=8, channels=1, patch_size=2, width=64, blocks=2, layers=2, head_dim=32)



def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> TarFlow:
    """A tiny model with small random non-zero out-projections (a non-trivial flow)."""
    torch.manual_seed(seed)
    model = TarFlow(TarFlowConfig(**{**TINY, **overrides})).to(dtype).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)
            block.proj_out.bias.normal_(0, 0.05)
    return model


# ---- configuration -------------------------------------------------------------------


def test_config_properties_and_round_trip():
    c = TarFlowConfig(image_size=28, channels=1, patch_size=4, width=128, head_dim=64)
    assert (c.seq_len, c.token_dim, c.heads, c.data_dim) == (49, 16, 2, 784)
    assert TarFlowConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=10, patch_size=4), "divisible by patch_size"),
        (dict(width=96, head_dim=64), "not divisible by head_dim"),
        (dict(width=32, head_dim=64), "at least one attention head"),
        (dict(blocks=0), "blocks must be a positive int"),
        (dict(num_classes=-1), "num_classes"),
        (dict(noise_std=-0.1), "noise_std"),
        (dict(layers=1.5), "layers must be a positive int"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TarFlowConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown TarFlowConfig field"):
        TarFlowConfig.from_dict({"width": 64, "depth": 3})


# ---- tokens --------------------------------------------------------------------------


def test_patchify_matches_unfold_layout_and_round_trips():
    model = make_model(channels=3, width=64)
    img = torch.randn(2, 3, 8, 8)
    tokens = model.patchify(img)
    # The published layout: F.unfold order (channel, row-in-patch, column-in-patch).
    expected = F.unfold(img, 2, stride=2).transpose(1, 2)
    assert torch.equal(tokens, expected)
    assert torch.equal(model.unpatchify(tokens), img)
    with pytest.raises(ValueError, match="expected images"):
        model.patchify(torch.randn(2, 1, 8, 8))


# ---- the flow ------------------------------------------------------------------------


def test_fresh_model_is_identity():
    model = TarFlow(TarFlowConfig(**TINY))
    img = torch.randn(3, 1, 8, 8)
    z, logdet = model(img, torch.tensor([0, 5, -1]))
    assert torch.equal(z, model.patchify(img))
    assert torch.equal(logdet, torch.zeros(3))


def test_logdet_matches_autograd_jacobian():
    model = make_model(image_size=4, blocks=3).double()
    img = torch.randn(1, 1, 4, 4, dtype=torch.float64)

    def flat(v: torch.Tensor) -> torch.Tensor:
        return model(v.view(1, 1, 4, 4))[0].flatten()

    jac = torch.autograd.functional.jacobian(flat, img.flatten())
    sign, logabs = torch.linalg.slogdet(jac)
    _, logdet = model(img)
    assert sign > 0
    torch.testing.assert_close(logdet[0], logabs, rtol=1e-10, atol=1e-10)


def test_block_is_triangular_in_its_permuted_order():
    model = make_model().double()
    tokens = torch.randn(1, 16, 4, dtype=torch.float64)
    for block in model.blocks:
        def out(v: torch.Tensor, block=block) -> torch.Tensor:
            return block.permute(block(v.view(1, 16, 4))[0]).flatten()

        jac = torch.autograd.functional.jacobian(out, tokens.flatten())
        # d z_perm / d x_perm must be block lower triangular with identity-scaled diagonal.
        perm = torch.arange(16).flip(0) if block.flip else torch.arange(16)
        idx = (perm[:, None] * 4 + torch.arange(4)).flatten()
        jp = jac[:, idx].view(16, 4, 16, 4)
        for t in range(16):
            assert torch.all(jp[t, :, t + 1 :] == 0)


def test_nll_bits_per_dim_formula():
    model = make_model()
    with torch.no_grad():
        model.var.uniform_(0.5, 2.0)
    img, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, -1])
    z, logdet = model(img, y)
    D = 64
    nll = 0.5 * (z**2 / model.var).sum((1, 2)) + 0.5 * torch.log(2 * math.pi * model.var).sum()
    expected = ((nll - logdet) / (D * math.log(2))).mean()
    torch.testing.assert_close(model.nll_bits_per_dim(img, y), expected)
    # A fresh (identity) model is a standard normal density.
    fresh = TarFlow(TarFlowConfig(**TINY))
    std_normal = (0.5 * img**2 + 0.5 * math.log(2 * math.pi)).sum((1, 2, 3)).mean() / (
        D * math.log(2)
    )
    torch.testing.assert_close(fresh.nll_bits_per_dim(img), std_normal)


def test_dropped_label_uses_mean_class_embedding():
    model = make_model()
    img = torch.randn(3, 1, 8, 8)
    z_none, _ = model(img)
    z_dropped, _ = model(img, torch.tensor([-1, -1, -1]))
    torch.testing.assert_close(z_none, z_dropped, rtol=0, atol=1e-6)
    z_mixed, _ = model(img, torch.tensor([2, -1, 7]))
    assert torch.allclose(z_mixed[1], z_none[1], atol=1e-6)
    assert not torch.allclose(z_mixed[0], z_none[0], atol=1e-6)


def test_labels_are_validated():
    model = make_model()
    img = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        model(img, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="shape"):
        model(img, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        model(img, torch.tensor([0.0, 1.0]))
    uncond = make_model(num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(img, torch.tensor([0, 1]))


def test_no_state_on_modules_after_forward():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {id(m): set(vars(m)) for m in model.modules()}
    model(torch.randn(2, 1, 8, 8))
    reverse(model, model.sample_noise(2), guidance=1.0)
    assert all(set(vars(m)) == attrs[id(m)] for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# ---- incremental evaluation ----------------------------------------------------------


@pytest.mark.parametrize("windows", [[16], [1] * 16, [5, 1, 7, 3], [3, 13]])
def test_incremental_network_equals_full(windows):
    model = make_model()
    block = model.blocks[1]
    x = torch.randn(3, 16, 4)
    emb = block.embedding(block.class_vector(torch.tensor([1, 4, -1]), 3))
    with torch.no_grad():
        full = block.network(x, emb)
        cache = KVCache.allocate(model.config, 3)
        outs, start = [], 0
        for w in windows:
            outs.append(block.network(x[:, start : start + w], emb[:, start : start + w],
                                      cache=cache, start=start))
            start += w
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)


def test_kv_cache_layout():
    cache = KVCache.allocate(TarFlowConfig(**TINY), batch=5)
    assert cache.keys.shape == (2, 5, 2, 16, 32)  # (layers, B, heads, T, head_dim)
    assert cache.values.shape == cache.keys.shape and cache.length == 0 and cache.batch == 5


# ---- mixed precision -----------------------------------------------------------------


def test_autocast_bfloat16_forward_close_to_float32():
    model = make_model()
    img, y = torch.randn(2, 1, 8, 8), torch.tensor([3, -1])
    z32, ld32 = model(img, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z16, ld16 = model(img, y)
    assert z16.dtype == torch.float32 and ld16.dtype == torch.float32
    torch.testing.assert_close(z16, z32, rtol=0, atol=5e-2)
    torch.testing.assert_close(ld16, ld32, rtol=0, atol=5e-1)


# ---- published layout ----------------------------------------------------------------


def published_keys(blocks: int, layers: int, conditional: bool) -> set[str]:
    keys = {"var"}
    for k in range(blocks):
        p = f"blocks.{k}."
        keys |= {p + "proj_in.weight", p + "proj_in.bias", p + "pos_embed", p + "attn_mask",
                 p + "proj_out.weight", p + "proj_out.bias"}
        if conditional:
            keys.add(p + "class_embed")
        for layer in range(layers):
            q = f"{p}attn_blocks.{layer}."
            for mod in ("attention.norm", "attention.qkv", "attention.proj", "mlp.norm",
                        "mlp.main.0", "mlp.main.2"):
                keys |= {f"{q}{mod}.weight", f"{q}{mod}.bias"}
    return keys


def test_state_dict_follows_published_layout():
    model = make_model()
    sd = model.state_dict()
    assert set(sd) == published_keys(2, 2, conditional=True)
    W, T, d = 64, 16, 4
    assert sd["blocks.0.pos_embed"].shape == (T, W)
    assert sd["blocks.0.class_embed"].shape == (10, 1, W)
    assert sd["blocks.0.proj_out.weight"].shape == (2 * d, W)
    assert sd["blocks.0.attn_blocks.0.attention.qkv.weight"].shape == (3 * W, W)
    assert sd["blocks.0.attn_blocks.1.mlp.main.0.weight"].shape == (4 * W, W)
    assert sd["blocks.1.attn_mask"].shape == (T, T) and sd["var"].shape == (T, d)
    assert set(make_model(num_classes=0).state_dict()) == published_keys(2, 2, False)
    fresh = TarFlow(TarFlowConfig(**TINY)).state_dict()
    assert not fresh["blocks.0.proj_out.weight"].any() and not fresh["blocks.0.proj_out.bias"].any()


@pytest.mark.parametrize("num_classes", [0, 10])
def test_from_published_state_dict_round_trip(num_classes):
    model = make_model(num_classes=num_classes, channels=3, blocks=3, layers=1)
    with torch.no_grad():
        model.var.uniform_(0.5, 2.0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = TarFlow.from_published_state_dict(sd, channels=3, head_dim=32)
    assert loaded.config == model.config
    img = torch.randn(2, 3, 8, 8)
    y = torch.tensor([1, -1]) if num_classes else None
    z0, ld0 = model(img, y)
    z1, ld1 = loaded(img, y)
    assert torch.equal(z0, z1) and torch.equal(ld0, ld1)
    noise = model.sample_noise(2)
    assert torch.equal(reverse(model, noise, y).images, reverse(loaded, noise, y).images)
    # The config may also be given and is then checked against the shapes.
    TarFlow.from_published_state_dict(sd, config=model.config)


def test_from_published_state_dict_errors():
    model = make_model()
    sd = dict(model.state_dict())
    with pytest.raises(ValueError, match="missing key.*blocks.1.proj_out.bias"):
        TarFlow.from_published_state_dict(
            {k: v for k, v in sd.items() if k != "blocks.1.proj_out.bias"}, channels=1,
            head_dim=32,
        )
    with pytest.raises(ValueError, match="unexpected key.*blocks.0.extra"):
        TarFlow.from_published_state_dict({**sd, "blocks.0.extra": torch.zeros(1)}, channels=1)
    with pytest.raises(ValueError, match="unexpected key.*blocks.0.attn_blocks.2"):
        bad = {**sd, "blocks.0.attn_blocks.2.mlp.norm.weight": torch.zeros(64)}
        TarFlow.from_published_state_dict(bad, config=model.config)
    with pytest.raises(ValueError, match="shape mismatch.*blocks.1.pos_embed"):
        bad = {**sd, "blocks.1.pos_embed": torch.zeros(15, 64)}
        TarFlow.from_published_state_dict(bad, channels=1, head_dim=32)
    with pytest.raises(ValueError, match="causal mask"):
        bad = {**sd, "blocks.0.attn_mask": torch.ones(16, 16)}
        TarFlow.from_published_state_dict(bad, channels=1, head_dim=32)
    with pytest.raises(ValueError, match="channels"):
        TarFlow.from_published_state_dict(sd, channels=3, head_dim=32)


def test_from_published_state_dict_refuses_non_finite_weights():
    model = make_model()
    sd = dict(model.state_dict())
    weight = sd["blocks.1.proj_in.weight"].clone()
    weight[0, :3] = float("nan")
    with pytest.raises(ValueError) as info:
        TarFlow.from_published_state_dict({**sd, "blocks.1.proj_in.weight": weight},
                                          channels=1, head_dim=32)
    assert str(info.value) == (
        "non-finite weights (NaN or inf) in 1 tensor(s): blocks.1.proj_in.weight (3); the "
        "checkpoint is damaged or came from a diverged run")
    sd["var"] = sd["var"].clone().fill_(float("inf"))
    with pytest.raises(ValueError, match=r"in 1 tensor\(s\): var \(64\)"):
        TarFlow.from_published_state_dict(sd, channels=1, head_dim=32)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_from_published_state_dict_hints_at_a_wrapper_prefix(prefix):
    sd = {prefix + k: v for k, v in make_model().state_dict().items()}
    with pytest.raises(ValueError, match=f"every key starts with '{prefix}'.*strip it") as info:
        TarFlow.from_published_state_dict(sd, channels=1, head_dim=32)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError) as info:  # an ordinary stray key gets no such hint
        TarFlow.from_published_state_dict({"blocks.0.extra": torch.zeros(1)}, channels=1)
    assert "starts with" not in str(info.value)


def test_windows_past_the_cache_read_the_causal_mask_buffer():
    model = make_model()
    block = model.blocks[0]
    assert torch.equal(block.window_mask(3, 4), torch.ones(4, 7, dtype=torch.bool).tril(3))
    assert block.window_mask(0, 5) is None and block.window_mask(3, 1) is None
    c = model.config
    x = torch.randn(2, c.seq_len, c.token_dim, generator=torch.Generator().manual_seed(1))
    emb = block.embedding(block.class_vector(None, 2))

    def window() -> torch.Tensor:
        cache = KVCache.allocate(c, 2)
        with torch.no_grad():
            block.network(x[:, :3], emb[:, :3], cache=cache, start=0)
            return block.network(x[:, 3:9], emb[:, 3:9], cache=cache, start=3)

    with torch.no_grad():
        full = block.network(x, emb)
    torch.testing.assert_close(window(), full[:, 3:9], rtol=1e-5, atol=1e-5)
    # The buffer is what the attention uses: a mask that lets queries see the whole
    # window changes the result (position 3 would read positions 4..8).
    with torch.no_grad():
        block.attn_mask.fill_(1.0)
    assert not torch.allclose(window()[:, 0], full[:, 3], atol=1e-3)
