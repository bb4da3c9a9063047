"""RoPE read from transformers models and undone exactly, on every architecture that has one."""

import pytest
import torch

from eval.architectures import ARCHS, tiny_model
from kvstore.codecs.rope import rotate
from kvstore.errors import ConfigError
from kvstore.integrations.hf import extract_kv
from kvstore.integrations.hf_rope import rotary_table

# what these tiny configs do: rotate the whole head by position (cohere2 rotates interleaved
# pairs, phi3 and gpt_oss as llama; deepseek_v3 caches an MLA latent; qwen3_next a linear state)
UNDONE = ["llama", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt_oss"]


@pytest.mark.parametrize("arch", UNDONE)
def test_layer_zero_keys_lose_their_position_once_rope_is_undone(arch):
    # a first layer's key depends on its token and position only: undone, the same token at two
    # positions gives the same key
    model = tiny_model(arch)
    table = rotary_table(model)
    ids = torch.randint(2, 500, (40,), generator=torch.Generator().manual_seed(0))
    keys = [torch.stack([k for k, _ in extract_kv(model, t)]).float() for t in (ids, torch.cat([ids[:3], ids]))]
    plain = [rotate(k, table, 0, inverse=True) for k in keys]
    assert torch.allclose(plain[0][0, :, 1:], plain[1][0, :, 4:], atol=1e-4)
    assert not torch.allclose(keys[0][0, :, 1:], keys[1][0, :, 4:], atol=1e-2)
    assert torch.allclose(rotate(plain[0], table, 0), keys[0], atol=1e-4)


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - set(UNDONE)))
def test_rotations_it_cannot_undo_are_refused(arch):
    # cohere2: interleaved pairs; qwen3_next: a partial rotary; deepseek_v3: MLA latents
    with pytest.raises(ConfigError):
        rotary_table(tiny_model(arch))
