"""One run of the rlhflab.parallel engine on a tiny Llama, for tests/test_parallel.py.

``python tests/parallel_worker.py OUT [key=value ...]`` (one process, no launcher) or
``python -m torch.distributed.run --nproc_per_node 2 tests/parallel_worker.py OUT [key=value ...]``.
The overrides are config keys (``parallel.sharding=fsdp2`` ...). What it does, with the SFT
stage's own functions and normalisation (loss summed over tokens / target tokens of the GLOBAL
batch, x num_processes for the engine's average over processes):

1. 4 optimizer steps on a fixed global batch of 8 sequences (2 micro-batches per process at 2
   processes, 4 at one), checkpointing after step 2 (sharded when wrapped);
2. records the global loss and grad norm of every step, the bytes of params + grads + AdamW
   states this process holds after the last backward, and the full final weights (gathered);
3. resumes a fresh model + optimizer from the step-2 checkpoint, runs steps 3-4 again and
   records those weights;
4. samples 6-token responses with PPO's ``sample_responses`` for 8 queries of different
   lengths (each process its slice; stopping at EOS synchronised over processes) and records
   the gathered tokens.
Results: ``OUT/result.json`` and ``OUT/weights.pt`` / ``OUT/resumed.pt`` (main process).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from ppo_fixtures import make_tokenizer  # noqa: E402

from rlhflab.config import ArchConfig, OptimConfig, load_config  # noqa: E402
from rlhflab.models.policy import build_policy  # noqa: E402
from rlhflab.parallel import make_engine  # noqa: E402
from rlhflab.runtime import CheckpointManager, rng_state  # noqa: E402
from rlhflab.stages.common import make_accelerator, make_optimizer, micro_batches  # noqa: E402
from rlhflab.stages.ppo import sample_responses, sample_seed  # noqa: E402
from rlhflab.stages.sft import token_loss_sum  # noqa: E402

out = Path(sys.argv[1])
cfg = load_config("smoke", sys.argv[2:])
acc = make_accelerator()
engine = make_engine(cfg, acc)
N, rank = acc.num_processes, acc.process_index
tok = make_tokenizer()
arch = ArchConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
optim = OptimConfig(lr=1e-2, eps=1e-5)

g = torch.Generator().manual_seed(0)
B, T = 8, 12
input_ids = torch.randint(3, len(tok), (B, T), generator=g)
lengths = torch.randint(6, T + 1, (B,), generator=g)
attention_mask = torch.arange(T)[None, :] < lengths[:, None]
labels = torch.where(attention_mask, input_ids, torch.full_like(input_ids, -100))
labels[:, :3] = -100  # the "query" carries no loss
n_targets = int((labels[:, 1:] != -100).sum())
rows = list(range(rank * B // N, (rank + 1) * B // N))


def fresh():
    model = engine.prepare(build_policy(tok, arch=arch, seed=0))
    return model, make_optimizer(model.parameters(), optim)


def step(model, opt):
    chunks = micro_batches(rows, 2)
    loss_sum = torch.zeros(())
    for k, idx in enumerate(chunks):
        batch = {"input_ids": input_ids[idx], "attention_mask": attention_mask[idx], "labels": labels[idx]}
        with engine.gradient_sync(model, sync=k == len(chunks) - 1):
            with engine.autocast():
                loss, _ = token_loss_sum(model, batch)
            (loss * (N / n_targets)).backward()
        loss_sum += loss.detach().float()
    norm = engine.clip_grad_norm_(model.parameters(), 1.0)
    held = local_bytes(model, opt)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if N > 1:
        torch.distributed.all_reduce(loss_sum)
    return float(loss_sum) / n_targets, float(norm), held


def local_bytes(model, opt) -> int:
    """Bytes of params + grads + optimizer states held by THIS process (DTensors: their local shard)."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    total = sum(nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    for st in opt.state.values():
        total += sum(nbytes(v) for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def save(model, path):
    sd = engine.full_state_dict(model) if engine.wrapped else model.state_dict()
    if engine.is_main:
        torch.save({k: v.detach().float().clone() for k, v in sd.items()}, path)


ckpts = CheckpointManager(out / "state")
model, opt = fresh()
losses, norms, held = [], [], 0
for s in range(1, 5):
    loss, norm, held = step(model, opt)
    losses.append(loss)
    norms.append(norm)
    if s == 2:
        engine.save_checkpoint(ckpts, s, {"model": model}, opt, {"step": s, "rng": rng_state()})
save(model, out / "weights.pt")

# Generation: the trained model, each process sampling its slice of 8 queries of different lengths.
queries = [input_ids[i, : 2 + i % 5].tolist() for i in range(B)]
width = max(len(q) for q in queries)
q_ids = torch.full((B, width), tok.pad_token_id)
q_mask = torch.zeros((B, width), dtype=torch.bool)
for i, q in enumerate(queries):
    q_ids[i, width - len(q):] = torch.tensor(q)
    q_mask[i, width - len(q):] = True
responses, _ = sample_responses(model, q_ids[rows], q_mask[rows], 6, 0.7, [sample_seed(5, i) for i in rows],
                                tok.eos_token_id, tok.pad_token_id)
gathered = [responses.tolist()]
if N > 1:
    gathered = [None] * N
    torch.distributed.all_gather_object(gathered, responses.tolist())
tokens = [row for part in gathered for row in part]

# Resume from the step-2 checkpoint into a fresh model and optimizer.
model2, opt2 = fresh()
engine.load_checkpoint(ckpts.latest(), {"model": model2}, opt2)
for s in (3, 4):
    step(model2, opt2)
save(model2, out / "resumed.pt")

if engine.is_main:
    (out / "result.json").write_text(json.dumps({"losses": losses, "grad_norms": norms, "bytes": held,
                                                 "tokens": tokens, "num_processes": N, "wrapped": engine.wrapped,
                                                 "sharded_ckpt": (ckpts.latest() / "shards").is_dir()}))
if N > 1:
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
