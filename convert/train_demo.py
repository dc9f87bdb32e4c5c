"""Trains the demo model: a 5.3 M-parameter mPLUG-Owl2 of the real architecture that answers
questions about generated pictures of shapes (owl2_edge/scenes.py), on a 2-core CPU.

    python -m owl2_edge.convert.train_demo OUT_DIR [--seed 0] [--stage1-steps 1700]
                                                   [--stage2-steps 4000] [--threads N]

OUT_DIR is a checkpoint in the release's layout (tiny.make_tiny_checkpoint writes it, with a
tokenizer trained here), which `owl2 convert` takes like the real one. The model and the recipe
are in docs/design.md §10.

Why two stages. Trained from scratch on the answer loss alone, the model first learns the
answers' format and their frequencies, which the text alone predicts ("Red." is as good a colour
as any); the gradient that would teach the vision tower to see has to flow back through a
decoder that does not yet look at the image positions, and is too weak to get out of this
image-blind plateau in the time we have: colour and count rise slowly, "what shape is on the
left?" stays at chance. Stage 1 therefore trains the vision tower and the abstractor alone, with
auxiliary linear heads that read the image tokens the decoder will receive (queries 0-4: the
colour and shape, or nothing, at each of the five places; query 5: the number of shapes). When
stage 2 starts, the image tokens already carry the answers, and the decoder only has to learn to
read them, which its visual route (MAM, learning rate 3× the rest) does within minutes.

The schedules are cosine over STEPS (they were over wall time, which gave a faster machine a
better model), so every machine makes the same steps on the same pictures and questions, and
runs with one seed are alike everywhere (bit-equal only on one CPU at one thread count). The
default 1,700 + 4,000 steps took 41 minutes (6 + 35) on the 2-core Xeon with AVX-512 that
trained the committed model, 2 threads; a step takes about 1.75× as long on a 2-core AMD EPYC.
Why 4,000 in stage 2: at 2,121 (run 6 of docs/design.md §10) held-out shape-at was 0.948, at
4,000 it is 0.957, with colour and count at 1.000.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from owl2_edge import scenes
from owl2_edge.convert import reference, reference_io, tiny
from owl2_edge.convert.config import Owl2Config
from owl2_edge.names import IMAGE_TOKEN_ID, TEXT_ROUTE, VISUAL_ROUTE
from owl2_edge.prompt import Turn, render

# --- The model (docs/design.md §10) --------------------------------------------------------------

def demo_config() -> Owl2Config:
    return tiny.tiny_config(
        text={"hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 4,
              "num_kv_heads": 4, "vocab_size": tiny.TINY_VOCAB},
        vision={"hidden_size": 128, "intermediate_size": 512, "num_layers": 3, "num_heads": 4,
                "image_size": 112, "patch_size": 14},
        abstractor={"num_queries": 8, "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                    "intermediate_size": 384})


# Linear layers whose output is added to the residual stream: initialised at half scale, so the
# stream does not grow layer by layer at the start.
_RESIDUAL_OUTPUTS = ("self_attn.dense.weight", "mlp.fc2.weight", "out_proj.weight", "mlp.w2.weight",
                     "o_proj.weight", "down_proj.weight")
_SMALL_EMBEDDINGS = ("query_embeds", "vit_eos", "cls_token", "position_embedding")


def init_weights(model: reference.Owl2Reference, seed: int) -> None:
    """Linear weights N(0, 1/fan_in), residual outputs halved; norms 1, biases 0; the learned
    queries, vit_eos, cls and position embeddings N(0, 0.02); token embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:  # LayerNorm / RMSNorm weights
                p.fill_(1.0)
            elif name.endswith(_SMALL_EMBEDDINGS):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                scale = 0.5 if name.endswith(_RESIDUAL_OUTPUTS) else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


# --- The auxiliary heads (stage 1, and half-weighted in stage 2) ---------------------------------

N_SLOT_CLASSES = 1 + len(scenes.COLORS) * len(scenes.SHAPES)  # nothing, or (colour, shape)
COUNT_QUERY = len(scenes.PLACES)                               # query 5 tells the count


class AuxHeads(nn.Module):
    """Linear heads on the RMS-normalised image tokens: one per place, one for the count."""

    def __init__(self, width: int):
        super().__init__()
        self.slots = nn.ModuleList(nn.Linear(width, N_SLOT_CLASSES) for _ in scenes.PLACES)
        self.count = nn.Linear(width, scenes.MAX_SHAPES)

    def loss_and_hits(self, image_embeds: torch.Tensor, targets: torch.Tensor):
        """image_embeds [B, n_visual, D], targets [B, places + 1] -> (mean loss, accuracy)."""
        x = image_embeds * torch.rsqrt(image_embeds.pow(2).mean(-1, keepdim=True) + 1e-6)
        logits = [head(x[:, q]) for q, head in enumerate(self.slots)]
        logits.append(self.count(x[:, COUNT_QUERY]))
        loss = sum(F.cross_entropy(lg, targets[:, i]) for i, lg in enumerate(logits)) / len(logits)
        hits = torch.stack([lg.argmax(-1) == targets[:, i] for i, lg in enumerate(logits)])
        return loss, hits.float().mean().item()


def aux_targets(scene: scenes.Scene) -> list[int]:
    at = {t.place: t for t in scene.things}
    colors, shapes = list(scenes.COLORS), list(scenes.SHAPES)
    slots = [0 if p not in at else
             1 + colors.index(at[p].color) * len(shapes) + shapes.index(at[p].shape)
             for p in scenes.PLACES]
    return [*slots, len(scene.things) - 1]


# --- Text: the template, tokenized as the runtime does (docs/architecture.md §7) ----------------

def tokenizer_model() -> bytes:
    """A 512-piece BPE tokenizer trained on the tiny corpus plus the scenes' conversations."""
    rng = random.Random(7)
    dialogues = []
    for _ in range(3000):
        q = rng.choice(scenes.random_scene(rng, "train").questions())
        dialogues.append(f"USER: {q.text} ASSISTANT: {q.answer}")
    return tiny.train_tokenizer(tiny._corpus() + dialogues + scenes.all_texts() * 20)


@dataclass
class Dialogue:
    ids: list[int]          # with one IMAGE_TOKEN_ID
    answer_spans: list[tuple[int, int]]  # [start, end) in ids of each answer's tokens (+ </s>)


def dialogue(sp, questions: list[scenes.Question]) -> Dialogue:
    """The conversation about one picture, as the runtime would tokenize each turn's prompt: the
    answer tokens of turn k are what follows the prompt of turn k in the closed conversation."""
    turns: list[Turn] = []
    spans = []
    ids: list[int] = []
    for q in questions:
        prompt = render([*turns, Turn(q.text)], n_images=1)
        prompt_ids = reference_io.tokenize(sp, prompt)
        turns.append(Turn(q.text, q.answer))
        closed = prompt + " " + q.answer + "</s>"
        ids = reference_io.tokenize(sp, closed)
        if ids[:len(prompt_ids)] != prompt_ids:
            raise AssertionError(f"the template does not tokenize prefix-wise: {closed!r}")
        spans.append((len(prompt_ids), len(ids)))
    return Dialogue(ids, spans)


# --- Batches ------------------------------------------------------------------------------------

# Pictures are drawn at the model's size or twice it (then bicubic-resized as the runtime does:
# smooth edges, like a larger picture's). Drawing at 112 costs 0.05 ms, at 224 with the resize
# 0.8 ms; the mix keeps picture making a small part of a step.
DRAW_SIZES = (112, 112, 224)


def pixels_of(scene: scenes.Scene, cfg: Owl2Config, size: int) -> np.ndarray:
    """The runtime's preprocessing (docs/architecture.md §6): float32 [3, S, S]."""
    return reference_io.preprocess(scene.draw(size), cfg.preprocess)


def picture_batch(rng: random.Random, cfg: Owl2Config, n: int, split: str = "train"):
    """n scenes, their pixels [n, 3, S, S] and auxiliary targets [n, places + 1].

    The pictures are square, so the runtime's preprocessing is one bicubic resize to S and the
    normalisation: done here on the whole batch at once (5× faster than picture by picture, and
    equal to pixels_of up to float rounding)."""
    s = cfg.preprocess.image_size
    picked = [scenes.random_scene(rng, split) for _ in range(n)]
    raw = np.stack([np.asarray(sc.draw(size).resize((s, s), Image.Resampling.BICUBIC)
                               if (size := rng.choice(DRAW_SIZES)) != s else sc.draw(s))
                    for sc in picked])
    mean = torch.tensor(cfg.preprocess.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.preprocess.image_std).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255 - mean) / std
    targets = torch.tensor([aux_targets(sc) for sc in picked])
    return picked, pixels.contiguous(), targets


def text_batch(sp, rng: random.Random, picked: list[scenes.Scene], turns: int, eos: int):
    """ids [B, L] (right-padded with eos; one image slot at the same index in every row), the
    answer mask [B, L] (True on each answer's tokens and its </s>) and the slot's index."""
    dialogues = []
    for s in picked:
        qs = s.questions()
        # Different questions while the scene has them (a 1-shape scene has only 3).
        asked = rng.sample(qs, min(turns, len(qs)))
        asked += [rng.choice(qs) for _ in range(turns - len(asked))]
        dialogues.append(dialogue(sp, asked))
    length = max(len(d.ids) for d in dialogues)
    slot = dialogues[0].ids.index(IMAGE_TOKEN_ID)
    ids = torch.full((len(dialogues), length), eos, dtype=torch.long)
    answer = torch.zeros((len(dialogues), length), dtype=torch.bool)
    for i, d in enumerate(dialogues):
        if d.ids.index(IMAGE_TOKEN_ID) != slot:
            raise AssertionError("the image slot moved")
        ids[i, :len(d.ids)] = torch.tensor(d.ids)
        for a, b in d.answer_spans:
            answer[i, a:b] = True
    return ids, answer, slot


# --- The forward pass, batched (the reference's math, checked against it at start) --------------

def _routed(pair: reference.Multiway, x: torch.Tensor, image: slice) -> torch.Tensor:
    """A multiway module on [B, T, D] whose positions `image` are the picture's (same in every
    row): text route before and after, visual route on them (docs/architecture.md §4.1)."""
    return torch.cat([pair.multiway[TEXT_ROUTE](x[:, :image.start]),
                      pair.multiway[VISUAL_ROUTE](x[:, image]),
                      pair.multiway[TEXT_ROUTE](x[:, image.stop:])], dim=1)


def decoder_logits(dec: reference.MamDecoder, embeds: torch.Tensor, image: slice) -> torch.Tensor:
    """embeds [B, T, D] -> logits [B, T, V], causal; each row one sequence from position 0."""
    b, t, _ = embeds.shape
    positions = torch.arange(t)
    x = embeds
    for layer in dec.layers:
        att = layer.self_attn
        h = _routed(layer.input_layernorm, x, image)
        q = att.q_proj(h).view(b, t, att.n_heads, -1).transpose(1, 2)
        k = _routed(att.k_proj, h, image).view(b, t, att.n_kv_heads, -1).transpose(1, 2)
        v = _routed(att.v_proj, h, image).view(b, t, att.n_kv_heads, -1).transpose(1, 2)
        q, k = reference.rope(q, positions, att.theta), reference.rope(k, positions, att.theta)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + att.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        x = x + layer.mlp(_routed(layer.post_attention_layernorm, x, image))
    return dec.lm_head(dec.norm(x))


def splice(dec: reference.MamDecoder, ids: torch.Tensor, slot: int, image_embeds: torch.Tensor):
    """ids [B, L] with the image id at `slot` -> embeds [B, L - 1 + n_visual, D], image span."""
    before = dec.embed_tokens(ids[:, :slot])
    after = dec.embed_tokens(ids[:, slot + 1:])
    n = image_embeds.shape[1]
    return torch.cat([before, image_embeds, after], dim=1), slice(slot, slot + n)


def answer_loss(dec, ids, answer, slot, image_embeds) -> torch.Tensor:
    embeds, image = splice(dec, ids, slot, image_embeds)
    logits = decoder_logits(dec, embeds, image)
    n = image_embeds.shape[1]
    # Spliced position of token j (j > slot) is j - 1 + n; the logits one before predict it.
    tok_pos = torch.arange(ids.shape[1])
    tok_pos = torch.where(tok_pos > slot, tok_pos - 1 + n, tok_pos)
    rows, cols = answer.nonzero(as_tuple=True)
    predicted_at = tok_pos[cols] - 1
    return F.cross_entropy(logits[rows, predicted_at], ids[rows, cols])


def check_batched_math(model: reference.Owl2Reference, sp, cfg: Owl2Config) -> None:
    """The batched forward must give the reference's logits (it is the reference's math batched,
    and a mistake here would train a model the runtime does not run)."""
    rng = random.Random(0)
    picked, pixels, _ = picture_batch(rng, cfg, 2)
    ids, _, slot = text_batch(sp, rng, picked, 2, cfg.text.eos_token_id)
    with torch.no_grad():
        image_embeds = model.vision(pixels)
        embeds, image = splice(model.decoder, ids, slot, image_embeds)
        batched = decoder_logits(model.decoder, embeds, image)
        for row in range(2):
            one = model.logits(ids[row].tolist(), image_embeds[row:row + 1])
            err = (batched[row] - one).abs().max().item()
            if err > 1e-3:
                raise AssertionError(f"batched training forward differs from the reference ({err})")


# --- The schedule ------------------------------------------------------------------------------

def cosine(step: int, total: int, warmup: float = 0.03) -> float:
    frac = min(1.0, step / total)
    if frac < warmup:
        return frac / warmup
    return 0.5 * (1 + math.cos(math.pi * (frac - warmup) / (1 - warmup)))


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description:<8}"), BarColumn(),
                    TextColumn("{task.percentage:>3.0f}% · step {task.completed:.0f} · {task.fields[info]}"),
                    TimeElapsedColumn())


def _run_stage(name: str, steps: int, step_fn, params_groups, bar) -> None:
    opt = torch.optim.AdamW(params_groups, betas=(0.9, 0.98), weight_decay=0.01)
    base = [g["lr"] for g in opt.param_groups]
    task = bar.add_task(name, total=steps, info="")
    t0 = time.perf_counter()
    logged = t0
    for step in range(steps):
        factor = cosine(step, steps)
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * factor
        loss, info = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        bar.update(task, completed=step + 1, info=info)
        if not bar.console.is_terminal and time.perf_counter() - logged > 30:
            logged = time.perf_counter()  # a log file gets a line every 30 s instead of a bar
            print(f"{name}: {logged - t0:.0f} s, step {step + 1}/{steps}, {info}", flush=True)


def _groups(named, lr: float, visual_lr: float | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices only; the visual route at its own rate."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in named:
        rate = visual_lr if visual_lr and f"multiway.{VISUAL_ROUTE}." in name else lr
        decay = 0.01 if p.ndim >= 2 else 0.0
        groups.setdefault((rate, decay), []).append(p)
    return [{"params": ps, "lr": rate, "weight_decay": decay}
            for (rate, decay), ps in groups.items()]


@dataclass
class Recipe:
    stage1_steps: int = 1700
    stage2_steps: int = 4000
    stage1_batch: int = 64
    stage2_batch: int = 32
    turns: int = 3
    vision_lr: float = 2e-3
    heads_lr: float = 3e-3
    lr: float = 1e-3
    visual_route_lr: float = 3e-3
    aux_weight: float = 0.5


def train(cfg: Owl2Config, sp, recipe: Recipe, seed: int = 0) -> reference.Owl2Reference:
    torch.manual_seed(seed)
    picture_rng = random.Random(seed)     # the scenes and their drawing
    rng = random.Random(seed + 1)         # the questions asked about them
    model = reference.Owl2Reference(cfg)
    init_weights(model, seed)
    heads = AuxHeads(cfg.text.hidden_size)
    check_batched_math(model, sp, cfg)
    model.train()
    eos = cfg.text.eos_token_id

    def stage1():
        _, pixels, targets = picture_batch(picture_rng, cfg, recipe.stage1_batch)
        loss, acc = heads.loss_and_hits(model.vision(pixels), targets)
        return loss, f"aux loss {loss.item():.3f} · heads {acc:.2f}"

    def stage2():
        picked, pixels, targets = picture_batch(picture_rng, cfg, recipe.stage2_batch)
        ids, answer, slot = text_batch(sp, rng, picked, recipe.turns, eos)
        image_embeds = model.vision(pixels)
        aux, acc = heads.loss_and_hits(image_embeds, targets)
        ans = answer_loss(model.decoder, ids, answer, slot, image_embeds)
        return ans + recipe.aux_weight * aux, f"answer loss {ans.item():.3f} · heads {acc:.2f}"

    with _progress() as bar:
        # Stage 1: the vision tower, the abstractor and its projection, with the heads.
        model.decoder.requires_grad_(False)
        _run_stage("stage 1", recipe.stage1_steps, stage1,
                   _groups(model.vision.named_parameters(), recipe.vision_lr)
                   + _groups(heads.named_parameters(), recipe.heads_lr), bar)
        # Stage 2: everything, on the answers (+ the heads at half weight).
        model.decoder.requires_grad_(True)
        _run_stage("stage 2", recipe.stage2_steps, stage2,
                   _groups(model.named_parameters(), recipe.lr, recipe.visual_route_lr)
                   + _groups(heads.named_parameters(), recipe.heads_lr), bar)
    return model.eval().requires_grad_(False)  # the heads are not part of the model


# --- Held-out accuracy on the reference (the runtime's own is `owl2 eval`) ----------------------

def heldout_accuracy(model: reference.Owl2Reference, sp, cfg: Owl2Config, n_per_type: int,
                     seed: int = 1, split: str = "heldout") -> dict[str, float]:
    hits: dict[str, list[bool]] = {k: [] for k in scenes.QUESTION_TYPES}
    for ex in scenes.examples(n_per_type, seed, split):
        pixels = torch.from_numpy(pixels_of(ex.scene, cfg, 224))[None]
        ids = reference_io.tokenize(sp, render([Turn(ex.question.text)], n_images=1))
        new = model.greedy(ids, model.encode_images(pixels), max_new_tokens=8)
        answer = sp.decode([t for t in new if t != cfg.text.eos_token_id]).strip()
        hits[ex.question.kind].append(answer == ex.question.answer)
    return {k: sum(v) / len(v) for k, v in hits.items()}


# --- Writing the checkpoint ---------------------------------------------------------------------

def hf_tensors(model: reference.Owl2Reference) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint's (HF) names."""
    out = {reference._vision_hf_name(k): v for k, v in model.vision.state_dict().items()}
    out.update({reference._decoder_hf_name(k): v for k, v in model.decoder.state_dict().items()})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m owl2_edge.convert.train_demo",
                                     description="Train the demo model on generated pictures.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1-steps", type=int, default=Recipe.stage1_steps)
    parser.add_argument("--stage2-steps", type=int, default=Recipe.stage2_steps)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--eval-per-type", type=int, default=200)
    parser.add_argument("--dtype", choices=sorted(tiny.DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    import sentencepiece as spm

    torch.set_num_threads(args.threads)
    cfg = demo_config()
    sp_bytes = tokenizer_model()
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    recipe = Recipe(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps)
    model = train(cfg, sp, recipe, args.seed)
    tiny.make_tiny_checkpoint(args.out_dir, config=cfg, dtype=args.dtype, tensors=hf_tensors(model),
                              tokenizer_model=sp_bytes)
    if args.eval_per_type:
        acc = heldout_accuracy(model, sp, cfg, args.eval_per_type)
        print("held-out accuracy (float32 reference): "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
