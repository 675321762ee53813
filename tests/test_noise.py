import torch

from comfyui_xdit.noise import prepare_noise

from comfy_reference import import_comfy


def test_noise_is_the_seeded_cpu_stream_and_leaves_global_rng_alone():
    latent = torch.zeros(2, 16, 8, 6)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    noise = prepare_noise(latent, 7)
    assert torch.equal(torch.random.get_rng_state(), before)
    expected = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(noise, expected)
    assert not torch.equal(prepare_noise(latent, 8), noise)


def test_noise_equals_comfyui_prepare_noise():
    comfy_sample = import_comfy("comfy.sample")
    for seed in (0, 42, 2**32 + 5):
        latent = torch.zeros(2, 16, 16, 12)
        assert torch.equal(prepare_noise(latent, seed), comfy_sample.prepare_noise(latent, seed))
