"""The Bypass's FiLM of the time embedding (restuning.methods.bypass.variants.Film), case by case
from its contract: x·(1 + γ(e)) + β(e) per channel, [γ; β] = W_2 W_1 SiLU(e), the identity while
W_2 is zero, live once woken; and where the network uses it (time 'out' and 'all', Refine), the
correction still zero at attach."""

import pytest
import torch
import torch.nn.functional as F

from restuning.methods.bypass import variants
from restuning.methods.bypass.layer import BypassNetwork

TIME, CHANNELS = 12, 8


def film_by_hand(film, x, temb):
    h = F.silu(temb) @ film.down.weight.T + film.down.bias
    gb = h @ film.up.weight.T + film.up.bias
    gamma, beta = gb.chunk(2, dim=1)
    return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, CHANNELS, 5, 4, generator=g), torch.randn(3, TIME, generator=g) * 2


def test_a_film_starts_as_the_identity(inputs):
    x, temb = inputs
    film = variants.Film(TIME, CHANNELS, rank=4)
    assert torch.equal(film(x, temb), x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_woken_film_is_x_times_one_plus_gamma_plus_beta(inputs, seed):
    x, temb = inputs
    torch.manual_seed(seed)
    film = variants.Film(TIME, CHANNELS, rank=4)
    film.wake()
    assert film.up.weight.abs().sum() > 0
    out = film(x, temb)
    assert not torch.allclose(out, x)
    torch.testing.assert_close(out, film_by_hand(film, x, temb))


@pytest.mark.parametrize("gamma, beta, expected", [(0.0, 0.0, 1.0), (-1.0, 0.0, 0.0), (1.0, 0.0, 2.0), (0.0, 0.5, 1.5),
                                                   (-0.5, -1.0, -0.5)])
def test_gamma_scales_one_plus_and_beta_shifts_each_channel(gamma, beta, expected):
    film = variants.Film(TIME, CHANNELS, rank=4)
    with torch.no_grad():
        film.up.bias[:CHANNELS] = gamma  # W_2 stays zero: [γ; β] is its bias alone
        film.up.bias[CHANNELS:] = beta
    out = film(torch.ones(2, CHANNELS, 3, 3), torch.randn(2, TIME))
    assert torch.equal(out, torch.full_like(out, expected))


def test_only_the_film_s_own_channel_moves(inputs):
    x, temb = inputs
    film = variants.Film(TIME, CHANNELS, rank=4)
    with torch.no_grad():
        film.up.bias[2] = 1.0  # γ of channel 2
        film.up.bias[CHANNELS + 5] = 3.0  # β of channel 5
    out = film(x, temb)
    torch.testing.assert_close(out[:, 2], 2 * x[:, 2])
    torch.testing.assert_close(out[:, 5], x[:, 5] + 3)
    others = [c for c in range(CHANNELS) if c not in (2, 5)]
    assert torch.equal(out[:, others], x[:, others])


def test_the_embedding_goes_through_silu_first():
    film = variants.Film(TIME, CHANNELS, rank=4)
    with torch.no_grad():
        film.down.weight.copy_(torch.eye(4, TIME))
        film.down.bias.zero_()
        film.up.weight.zero_()
        film.up.weight[0, 0] = 1.0  # γ_0 = SiLU(e_0)
    temb = torch.full((1, TIME), -2.0)
    out = film(torch.ones(1, CHANNELS, 1, 1), temb)
    assert out[0, 0, 0, 0].item() == pytest.approx(1 + F.silu(torch.tensor(-2.0)).item())


def network(time, output="zero-conv", refine=0):
    torch.manual_seed(0)
    return BypassNetwork([8, 16, 16], "convpass", "convpass", dim=4, heads=2, output=output, text_channels=None,
                         time=time, time_channels=TIME, refine=refine)


def net_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 8, 8, 8, generator=g), [torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)],
            torch.randn(2, TIME, generator=g))


@pytest.mark.parametrize("time, output, refine", [("out", "zero-conv", 0), ("all", "zero-conv", 0), ("out", "zero-conv", 1),
                                                  ("out", "modulate", 0), ("out", "rearrange", 0)])
def test_a_time_conditioned_bypass_corrects_nothing_at_attach(time, output, refine):
    x0, features, temb = net_inputs()
    out = network(time, output, refine)(x0, features, temb=temb)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("time, output, live", [("out", "zero-conv", True), ("out", "rearrange", False)])
def test_the_output_film_is_live_where_zero_follows_it(time, output, live):
    net = network(time, output)
    assert (net.out_film.up.weight.abs().sum() > 0) == live


def test_time_all_films_every_stage_and_the_output():
    net = network("all")
    assert all(isinstance(stage.film, variants.Film) for stage in net.stages) and net.out_film is not None
    assert all(stage.film.up.weight.abs().sum() > 0 for stage in net.stages)  # the zero Z follows them
    assert all(stage.film is None for stage in network("out").stages)


def test_the_output_film_reads_the_normalised_state():
    net = network("out")
    with torch.no_grad():
        net.out[2].weight.normal_()
    x0, features, temb = net_inputs()
    seen = []
    net.out_film.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    out = net(x0, features, temb=temb)
    film_in, film_out = seen[0]
    torch.testing.assert_close(film_out, film_by_hand(net.out_film, film_in, temb))
    torch.testing.assert_close(out, net.out[2](F.silu(film_out)))


def test_refine_films_what_its_convpass_reads_and_keeps_the_state_on_the_skip():
    torch.manual_seed(0)
    block = variants.Refine(CHANNELS, dim=4, heads=2, text_channels=None, time_channels=TIME)
    block.film.wake()
    block.conv.up.reset_parameters()
    state, temb = torch.randn(2, CHANNELS, 4, 4), torch.randn(2, TIME)
    torch.testing.assert_close(block(state, None, temb), state + block.conv(film_by_hand(block.film, state, temb)))
