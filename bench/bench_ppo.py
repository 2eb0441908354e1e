"""Benchmark of one PPO iteration (nanorlcd/rollout.py + nanorlcd/ppo.py), optionally against
Hugging Face TRL's PPOTrainer on the same work.

What: the work of one iteration, modelled on TRL 1.12.0's PPO: 64 prompts of exactly 16 tokens
(BOS + 15 random ids, no padding), 32 new tokens each at temperature 1 with no early stop (EOS
switched off, no penalty for unfinished replies), a frozen reference, a frozen reward model (PM)
and a value model, per-token KL penalty β = 0.05, GAE γ = 1, λ = 0.95, advantage whitening (no
reward whitening), then 2 epochs x 4 minibatches of 16, one AdamW step each (clip 0.2, value clip
0.2, vf_coef 0.1). Models: random LLaMAs, "25.6M" (hidden 512, 8 layers, 8 heads, intermediate 1376,
vocab 512, tied embeddings) and "tiny" (hidden 128, 2 layers, 8 query / 2 key-value heads). We
print rollout and update seconds (wall and process CPU) per iteration, best of --repeats, methods
alternating so background load hits them alike. TRL runs only if it is importable (install it in a
throwaway venv; it is never a dependency of this repository).
Run (repo root): `python -m bench.bench_ppo [--model 25.6M|tiny] [--threads 1] [--repeats 3]
[--sampler-logprobs] [--profile]`
"""
import argparse
import copy
import io
import random
import time
from dataclasses import replace

import torch

from nanorlcd.model import LLaMA, LLaMAConfig
from nanorlcd.pm import PreferenceModel
from nanorlcd.ppo import PPOConfig, compute_advantages, ppo_update, rollout_stats
from nanorlcd.rollout import ActorCritic, collect_rollouts, make_value_model
from nanorlcd.tokenizer import Tokenizer

MODELS = {
    "25.6M": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  intermediate_size=1376),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=256),
}
# the PPO work; micro-batch = minibatch (one forward and backward per optimiser step)
CFG = replace(PPOConfig(), rollout_batch_size=64, minibatch_size=16, micro_batch_size=16,
              gen_batch_size=64, ppo_epochs=2, max_new_tokens=32, temperature=1.0, kl_coef=0.05,
              gamma=1.0, gae_lambda=0.95, norm_adv=True, whiten_rewards=False, clip_coef=0.2,
              vf_clip_coef=0.2, vf_coef=0.1, penalty_reward=None, lr=1e-5, pm_max_len=512)
N_PROMPTS, PROMPT_LEN = 64, 16


class NoEOS:
    """The tokenizer with EOS switched off for sampling (eos_id [] disables it in `generate`), so
    every reply has exactly max_new_tokens tokens, as in TRL without a stop token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def train_tokenizer(vocab_size):
    """A sentencepiece BPE tokenizer.model of `vocab_size` pieces on a small HH-style corpus,
    written to a temporary directory. The PM re-tokenises prompt + reply text, as in training;
    without byte-fallback pieces every random id decodes to text that re-encodes to about as many
    tokens, so the PM reads ~55 tokens where TRL's reward model reads the 48 sampled ids."""
    import os
    import tempfile

    import sentencepiece as spm
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7)))
             for _ in range(400)]
    lines = [f"\n\nHuman: {' '.join(rng.choices(words, k=8))}?\n\nAssistant: "
             f"{' '.join(rng.choices(words, k=12))}." for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=False,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        num_threads=1, minloglevel=2)
    directory = tempfile.mkdtemp()
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(directory)


def build(model_name, seed=0):
    """(policy, ref, pm, value, tokenizer, prompt_texts, prompt_ids) for the issue's work."""
    tokenizer = train_tokenizer(512)
    cfg = LLaMAConfig(vocab_size=512, tie_word_embeddings=True, max_position_embeddings=128,
                      **MODELS[model_name])
    torch.manual_seed(seed)
    policy = LLaMA(cfg)
    ref = copy.deepcopy(policy).requires_grad_(False)
    pm = PreferenceModel(cfg).requires_grad_(False)
    value = make_value_model(pm)
    rng = random.Random(seed)
    prompt_ids = [[1] + [rng.randrange(3, 512) for _ in range(PROMPT_LEN - 1)]
                  for _ in range(N_PROMPTS)]
    prompt_texts = [tokenizer.decode(ids) for ids in prompt_ids]
    return policy, ref, pm, value, NoEOS(tokenizer), prompt_texts, prompt_ids


def nanorlcd_iteration(models, cfg, recompute_logprobs=True):
    """A closure running one PPO iteration (the body of ppo.train_ppo's loop) on fresh copies of the
    trained models; returns ({"rollout": (wall, cpu), "update": (wall, cpu)} in seconds, stats)."""
    policy, ref, pm, value, tokenizer, prompt_texts, prompt_ids = models

    def run(seed):
        ac = ActorCritic(copy.deepcopy(policy), copy.deepcopy(value),
                         entropy_grad=cfg.ent_coef > 0).train()
        params = [p for p in ac.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps)
        sample_gen = torch.Generator().manual_seed(seed)
        w0, c0 = time.perf_counter(), time.process_time()
        rollout = collect_rollouts(ac, ref, pm, tokenizer, prompt_texts, prompt_ids, cfg,
                                   sample_gen, recompute_logprobs=recompute_logprobs)
        w1, c1 = time.perf_counter(), time.process_time()
        rollout = compute_advantages(rollout, cfg, cfg.kl_coef)
        stats = rollout_stats(rollout, cfg.kl_coef)
        # the sampler-vs-forward gap over the rows that were recomputed
        checked = rollout.response_mask * rollout.recomputed[:, None]
        stats["rollout/logprob_gap"] = float(
            ((rollout.gen_logprobs - rollout.logprobs).abs() * checked).sum() / checked.sum())
        stats.update(ppo_update(ac, optimizer, rollout, cfg, torch.Generator().manual_seed(seed)))
        w2, c2 = time.perf_counter(), time.process_time()
        assert rollout.response_mask.sum(-1).eq(cfg.max_new_tokens).all(), "a reply stopped early"
        return {"rollout": (w1 - w0, c1 - c0), "update": (w2 - w1, c2 - c1)}, stats
    return run


def trl_iteration(models, cfg, collect_garbage=True):
    """A closure running one iteration of TRL's PPOTrainer (trl.experimental.ppo, TRL 1.12) on the
    same weights, prompts and hyper-parameters, or None when TRL is not importable. TRL reads the
    reward model on the sampled ids (no re-tokenisation) and takes π_old from generate's scores;
    its pad id must be one the model cannot sample (512, past the vocabulary). TRL's train() has no
    rollout/update split, so only the whole iteration is timed. collect_garbage=False turns its two
    gc.collect() calls per iteration into no-ops."""
    try:
        import datasets
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import WordLevel
        from transformers import (LlamaForCausalLM, LlamaForSequenceClassification,
                                  PreTrainedTokenizerFast)
        from trl.experimental.ppo import PPOConfig as TRLConfig
        from trl.experimental.ppo import PPOTrainer
        from trl.experimental.ppo import ppo_trainer
    except ImportError:
        return None
    import os
    import tempfile
    policy, ref, pm, value, _, _, prompt_ids = models
    tmp = tempfile.mkdtemp()
    policy.save_pretrained(os.path.join(tmp, "policy"))
    pm.save_pretrained(os.path.join(tmp, "pm"))
    value.save_pretrained(os.path.join(tmp, "value"))
    vocab = {str(i): i for i in range(512)} | {"<pad>": 512}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(WordLevel(vocab, "0")),
                                        pad_token="<pad>", eos_token="2", bos_token="1")
    dataset = datasets.Dataset.from_dict({"input_ids": prompt_ids})

    def run(seed):
        load = lambda cls, name: cls.from_pretrained(os.path.join(tmp, name),   # noqa: E731
                                                     dtype=torch.float32)
        hf_policy, hf_ref = load(LlamaForCausalLM, "policy"), load(LlamaForCausalLM, "policy")
        hf_pm = load(LlamaForSequenceClassification, "pm")
        hf_value = load(LlamaForSequenceClassification, "value")
        for m in (hf_pm, hf_value):
            m.config.pad_token_id = 512
        args = TRLConfig(
            output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=len(prompt_ids),
            gradient_accumulation_steps=1, num_mini_batches=len(prompt_ids) // cfg.minibatch_size,
            num_ppo_epochs=cfg.ppo_epochs, total_episodes=len(prompt_ids),
            local_rollout_forward_batch_size=len(prompt_ids), response_length=cfg.max_new_tokens,
            temperature=cfg.temperature, kl_coef=cfg.kl_coef, kl_estimator="k1", gamma=cfg.gamma,
            lam=cfg.gae_lambda, cliprange=cfg.clip_coef, cliprange_value=cfg.vf_clip_coef,
            vf_coef=cfg.vf_coef, whiten_rewards=False, missing_eos_penalty=None, stop_token=None,
            learning_rate=cfg.lr, num_sample_generations=0, report_to=[], save_strategy="no",
            logging_steps=1000, use_cpu=True, seed=seed, disable_tqdm=True)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=hf_policy,
                             ref_model=hf_ref, reward_model=hf_pm, value_model=hf_value,
                             train_dataset=dataset, eval_dataset=dataset)
        gc_collect = ppo_trainer.gc.collect
        if not collect_garbage:
            ppo_trainer.gc.collect = lambda: 0
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            trainer.train()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        finally:
            ppo_trainer.gc.collect = gc_collect
        return {"iteration": (wall, cpu)}, {}
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="25.6M")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="iterations per method; best kept")
    parser.add_argument("--sampler-logprobs", action="store_true",
                        help="also time collect_rollouts(recompute_logprobs=False)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top operators of one nanorlcd iteration")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CFG
    models = build(args.model)
    n_params = sum(p.numel() for p in models[0].parameters())
    print(f"model {args.model}: {n_params / 1e6:.2f}M params, fp32, {args.threads} threads, "
          f"torch {torch.__version__}")
    fns = {"nanorlcd": nanorlcd_iteration(models, cfg)}
    if args.sampler_logprobs:
        fns["nanorlcd, sampler logp"] = nanorlcd_iteration(models, cfg, recompute_logprobs=False)
    trl = trl_iteration(models, cfg)
    if trl is not None:
        fns["trl"] = trl
        fns["trl, no gc.collect"] = trl_iteration(models, cfg, collect_garbage=False)
    else:
        print("trl not importable: timing nanorlcd only")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fns["nanorlcd"](0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    best = {name: {} for name in fns}
    for r in range(args.repeats):
        for name, fn in fns.items():
            times, stats = fn(r)
            for part, (wall, cpu) in times.items():
                old = best[name].get(part, (float("inf"), float("inf")))
                best[name][part] = (min(old[0], wall), min(old[1], cpu))
            print(f"round {r} {name:22s} " + "  ".join(
                f"{part} {wall:6.2f} s wall {cpu:6.2f} s cpu"
                for part, (wall, cpu) in times.items())
                + (f"  (approx_kl {stats['policy/approx_kl']:.2e}, "
                   f"logprob_gap {stats['rollout/logprob_gap']:.1e})" if stats else ""))
    total = {name: tuple(sum(p[i] for p in parts.values()) for i in (0, 1))
             for name, parts in best.items()}
    for name, parts in best.items():
        print(f"best {name:22s} iteration {total[name][0]:6.2f} s wall "
              f"{total[name][1]:6.2f} s cpu ("
              + ", ".join(f"{part} {w:.2f}/{c:.2f} s" for part, (w, c) in parts.items()) + ")")
    # time ratios: every nanorlcd variant against every other method (< 1: nanorlcd is faster)
    for ours in (name for name in total if name.startswith("nanorlcd")):
        for other in (name for name in total if not name.startswith("nanorlcd")):
            print(f"time {ours} / {other}: wall {total[ours][0] / total[other][0]:.2f}x, "
                  f"cpu {total[ours][1] / total[other][1]:.2f}x")

if __name__ == "__main__":
    main()
