"""ppo_update on 2 processes (torchrun, gloo on CPU) equals 1 process on the whole minibatch.

ppo.py claims that N processes and gradient accumulation give the gradient of one process on the
whole minibatch: every loss term is divided by the global minibatch's real-token count, and DDP
averages over ranks. The script below builds the same tiny policy, value model and rollout on every
rank (8 rows whose responses are long on rank 0's rows and short on rank 1's, so a per-rank token
normaliser would differ), takes this rank's rows (`dist.shard`), and runs two PPO epochs of one
minibatch each. The final weights and the logged loss, grad norm and approx_kl must agree with the
1-process run within 1e-5.
Run: `python -m pytest tests/test_ppo_dist.py -q` (marked slow: three torchrun processes start;
2 min measured on a shared, loaded 2-core machine).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from test_dist import torchrun

SCRIPT = """
import json, sys
from dataclasses import replace
import torch
from safetensors.torch import save_file
from nanorlcd import dist
from nanorlcd.model import LLaMA, LLaMAConfig
from nanorlcd.pm import PreferenceModel
from nanorlcd.ppo import PPOConfig, ppo_update
from nanorlcd.rollout import ActorCritic, Rollout, right_pad
from nanorlcd.tokenizer import left_pad

out = sys.argv[1]
rank, world, device = dist.init()
torch.set_num_threads(1)
config = LLaMAConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
ac = ActorCritic(LLaMA(config), PreferenceModel(config))
# 8 rows: even rows (rank 0 under 2 processes) long replies, odd rows short ones
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(3, 64, (3 + i % 4,), generator=g).tolist() for i in range(8)]
responses = [torch.randint(3, 64, (9 - i if i % 2 == 0 else 1 + i // 2,), generator=g).tolist()
             for i in range(8)]
query_ids, query_mask = left_pad(prompts, 0)
response_ids, response_mask = right_pad(responses, 0, "cpu")
with torch.no_grad():
    logprobs, entropy, values = ac(query_ids, query_mask, response_ids, response_mask, 1.0)
n, width = response_ids.shape
rollout = Rollout(query_ids=query_ids, query_mask=query_mask, response_ids=response_ids,
                  response_mask=response_mask, logprobs=logprobs, ref_logprobs=logprobs,
                  values=values, entropy=entropy, gen_logprobs=logprobs, pm_scores=torch.zeros(n),
                  scores=torch.zeros(n), finished=torch.ones(n, dtype=torch.bool),
                  prompts=[""] * n, replies=[""] * n,
                  advantages=torch.randn(n, width, generator=g) * response_mask,
                  returns=torch.randn(n, width, generator=g) * response_mask)
cfg = replace(PPOConfig(), rollout_batch_size=8, minibatch_size=8, micro_batch_size=2, ppo_epochs=2,
              lr=1e-3, ent_coef=0.01)
initial = {k: v.clone().contiguous() for k, v in ac.state_dict().items()}
ac_ddp = dist.wrap(ac)
optimizer = torch.optim.AdamW([p for p in ac.parameters()], lr=cfg.lr, eps=cfg.adam_eps)
stats = ppo_update(ac_ddp, optimizer, rollout.select(dist.shard(list(range(8)))), cfg,
                   torch.Generator().manual_seed(rank))
if dist.is_main():
    json.dump(stats, open(out + "/stats.json", "w"))
    save_file(initial, out + "/initial.safetensors")
    save_file({k: v.contiguous() for k, v in ac.state_dict().items()}, out + "/weights.safetensors")
dist.cleanup()
"""


def run(nproc, script, out):
    out.mkdir()
    torchrun(nproc, script, out)
    return json.loads((out / "stats.json").read_text()), load_file(out / "weights.safetensors")


@pytest.mark.slow
def test_two_processes_equal_one_on_the_whole_minibatch(tmp_path):
    script = tmp_path / "ppo_update_script.py"
    script.write_text(SCRIPT)
    one_stats, one_weights = run(1, script, tmp_path / "one")
    two_stats, two_weights = run(2, script, tmp_path / "two")
    assert one_stats["policy/epochs"] == two_stats["policy/epochs"] == 2
    for name in ("loss/total", "loss/policy", "loss/value", "loss/grad_norm", "policy/approx_kl",
                 "policy/clipfrac", "val/error"):
        assert abs(one_stats[name] - two_stats[name]) <= 1e-5, (name, one_stats[name],
                                                                two_stats[name])
    # the second epoch moved off the rollout policy
    assert one_stats["policy/approx_kl"] > 0
    initial = load_file(tmp_path / "one" / "initial.safetensors")
    assert max((one_weights[k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, rtol=0, atol=1e-5, msg=name)
