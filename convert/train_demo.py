"""Trains the demo model: a 5.3 M-parameter mPLUG-Owl2 of the real architecture that answers
questions about generated pictures of shapes and clips of them (owl2_edge/scenes.py), on a
2-core CPU.

    python -m owl2_edge.convert.train_demo OUT_DIR [--seed 0] [--stage1-steps 1400]
                                                   [--stage2-steps 3200] [--stage3-steps 800]
                                                   [--stage4-steps 1400] [--stage5-steps 1200]
                                                   [--init CHECKPOINT] [--threads N]

OUT_DIR is a checkpoint in the release's layout (tiny.make_tiny_checkpoint writes it, with a
tokenizer trained here), which `owl2 convert` takes like the real one. The model and the recipe
are in docs/design.md §10; scripts/train_demo.sh is the command that made the committed one.

Why two stages before the third. Trained from scratch on the answer loss alone, the model first
learns the answers' format and their frequencies, which the text alone predicts ("Red." is as
good a colour as any); the gradient that would teach the vision tower to see has to flow back
through a decoder that does not yet look at the image positions, and is too weak to get out of
this image-blind plateau in the time we have: colour and count rise slowly, "what shape is on
the left?" stays at chance. Stage 1 therefore trains the vision tower and the abstractor alone,
with auxiliary linear heads that read the image tokens the decoder will receive (queries 0-4:
the colour and shape, or nothing, at each of the five places; query 5: the number of shapes).
When stage 2 starts, the image tokens already carry the answers, and the decoder only has to
learn to read them, which its visual route (MAM, learning rate 3× the rest) does within
minutes. Stage 2 trains on every kind of answer at once (plain questions, the picture as JSON,
calls of the report_shape tool, clips); stage 3, at 0.3× the rate, dwells on the calls and the
JSON, which stage 2 left weakest (a shape named by its colour, three shapes in one object).
Stage 4, at 0.4× the rate, weighs each answer alike instead of each token (answer_loss: a
call's or a JSON object's few deciding tokens were a tenth of a plain answer's weight), offers
the tool in half the pictures, and asks the colour at a place as a plain question (the lookup
a call by place makes first; color_at_questions, a training aid never scored). Stage 5, at 0.25×
the rate, dwells on the calls that name a shape by its place (three in four of the calls), which
stage 4 left weakest.

The schedules are cosine over STEPS (they were over wall time, which gave a faster machine a
better model), so every machine makes the same steps on the same pictures and questions, and
runs with one seed are alike everywhere (bit-equal only on one CPU at one thread count).
`--init` starts from a checkpoint's weights (a stage of 0 steps is skipped): the committed model
is stages 1-2 written to a checkpoint, stage 3 from it, stage 4 from that, then stage 5
(scripts/train_demo.sh: each stage was added once the one before it had been seen), which
differs from one uninterrupted run by the bfloat16 rounding of the weights between them and the
random draws of the later stages. Times are in docs/measurements.md ("The demo model's training runs").
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
    """A 512-piece BPE tokenizer trained on the tiny corpus plus the scenes' conversations (the
    JSON answers, the tool text and calls and the clip questions among them)."""
    rng = random.Random(7)
    dialogues = []
    for _ in range(3000):
        q = rng.choice(scenes.random_scene(rng, "train").questions())
        dialogues.append(f"USER: {q.text} ASSISTANT: {q.answer}")
    tools = scenes.REPORT_TOOL_OFFER
    for _ in range(600):
        scene = scenes.random_scene(rng, "train")
        q = scenes.json_question(scene)
        dialogues.append(f"USER: {q.text} ASSISTANT: {q.answer}")
        q = rng.choice(scenes.tool_questions(scene))
        dialogues.append(f"USER: {tools} {q.text} ASSISTANT: {q.answer}")
        clip = scenes.random_clip(rng, "train", rng.randint(scenes.MIN_FRAMES, scenes.MAX_FRAMES))
        q = rng.choice(clip.questions())
        dialogues.append(f"USER: {q.text} ASSISTANT: {q.answer}")
    return tiny.train_tokenizer(tiny._corpus() + dialogues + scenes.all_texts() * 20)


@dataclass
class Dialogue:
    ids: list[int]          # with one IMAGE_TOKEN_ID per image
    answer_spans: list[tuple[int, int]]  # [start, end) in ids of each answer's tokens (+ </s>)


def dialogue(sp, questions: list[scenes.Question], n_images: int = 1,
             system: str | None = None) -> Dialogue:
    """The conversation about n_images pictures (a clip's frames), as the runtime would tokenize
    each turn's prompt: the answer tokens of turn k are what follows the prompt of turn k in the
    closed conversation."""
    turns: list[Turn] = []
    spans = []
    ids: list[int] = []
    for q in questions:
        prompt = render([*turns, Turn(q.text)], n_images=n_images, system=system)
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


def _normalised(raw: np.ndarray, cfg: Owl2Config) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> the runtime's normalisation, float32 [N, 3, S, S]. The pictures are
    square, so with the resize done by the caller this is the runtime's whole preprocessing
    (equal to pixels_of up to float rounding, 5× faster on a batch)."""
    mean = torch.tensor(cfg.preprocess.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.preprocess.image_std).view(1, 3, 1, 1)
    return ((torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous()


def _drawn(rng: random.Random, draw, s: int) -> list[np.ndarray]:
    """draw(size) -> a picture (or a clip's frames) at one of DRAW_SIZES, resized to s."""
    size = rng.choice(DRAW_SIZES)
    pictures = draw(size)
    if not isinstance(pictures, list):
        pictures = [pictures]
    return [np.asarray(p if size == s else p.resize((s, s), Image.Resampling.BICUBIC))
            for p in pictures]


def picture_batch(rng: random.Random, cfg: Owl2Config, n: int, split: str = "train"):
    """n scenes, their pixels [n, 3, S, S] and auxiliary targets [n, places + 1]."""
    s = cfg.preprocess.image_size
    picked = [scenes.random_scene(rng, split) for _ in range(n)]
    raw = np.stack([_drawn(rng, sc.draw, s)[0] for sc in picked])
    targets = torch.tensor([aux_targets(sc) for sc in picked])
    return picked, _normalised(raw, cfg), targets


def clip_batch(rng: random.Random, cfg: Owl2Config, n: int, n_frames: int, split: str = "train"):
    """n clips of n_frames, and their frames' pixels [n · n_frames, 3, S, S] in clip order."""
    s = cfg.preprocess.image_size
    picked = [scenes.random_clip(rng, split, n_frames) for _ in range(n)]
    raw = np.stack([frame for clip in picked for frame in _drawn(rng, clip.frames, s)])
    return picked, _normalised(raw, cfg)


def _asked(rng: random.Random, pool: list[scenes.Question], turns: int) -> list[scenes.Question]:
    """Different questions while the pool has them, then repeats."""
    asked = rng.sample(pool, min(turns, len(pool)))
    return asked + [rng.choice(pool) for _ in range(turns - len(asked))]


def clip_questions(rng: random.Random, clip: scenes.Clip, turns: int) -> list[scenes.Question]:
    """The question about the change (which way, which shape) in one of the turns, questions on
    how many frames show a shape in the others."""
    change, *frames = clip.questions()
    asked = [rng.choice(frames) for _ in range(turns - 1)]
    asked.insert(rng.randrange(turns), change)
    return asked


def tool_dialogue_questions(rng: random.Random, scene: scenes.Scene, turns: int,
                            call_share: float = 0.5,
                            by_place: float | None = None) -> list[scenes.Question]:
    """With the tool offered: a call in about `call_share` of the turns, plain questions in the
    others. `by_place`: the share of the calls that name the shape by its place (else as the
    scene's calls come, about half)."""
    pool = scenes.tool_questions(scene)
    calls = [q for q in pool if q.kind == "tool_call"]
    plain = [q for q in pool if q.kind != "tool_call"]
    placed = [q for q in calls if _names_a_place(q.text)]
    named = [q for q in calls if not _names_a_place(q.text)]

    def call() -> scenes.Question:
        if by_place is None or not named:
            return rng.choice(calls)
        return rng.choice(placed if rng.random() < by_place else named)
    return [call() if rng.random() < call_share else rng.choice(plain) for _ in range(turns)]


def _names_a_place(call_question: str) -> bool:
    return any(call_question.endswith(f"{phrase}.") for phrase in scenes.PLACE_PHRASES.values())


def color_at_questions(scene: scenes.Scene) -> list[scenes.Question]:
    """A training aid of stage 4, never scored: "What color is the shape on the left?" ->
    "Red.", the lookup a call by place makes for its first argument, asked where the answer
    follows at once."""
    return [scenes.Question("color_at", f"What color is the shape {scenes.PLACE_PHRASES[t.place]}?",
                            f"{t.color.capitalize()}.") for t in scene.things]


@dataclass
class TextBatch:
    """Rows of spliced sequences, right-padded: token ids where the position is text, the index
    of an image embedding row (image k's position j is k · n_visual + j) where it is an image's,
    and the answer tokens to predict."""
    tokens: torch.Tensor       # [B, T] long (0 at image positions)
    image_rows: torch.Tensor   # [B, T] long, -1 at text positions
    rows: torch.Tensor         # [A] the row of each answer token
    predicted_at: torch.Tensor # [A] the position whose logits predict it
    targets: torch.Tensor      # [A] the token
    answer_of: torch.Tensor    # [A] which answer (numbered across the batch) the token is in


def text_batch(dialogues: list[Dialogue], n_visual: int, eos: int) -> TextBatch:
    """The dialogues' ids spliced as the runtime splices them: each IMAGE_TOKEN_ID becomes the
    next image's n_visual positions, the images numbered across the batch in row order."""
    spliced, answers, answer_of, image = [], [], [], 0
    for d in dialogues:
        seq, pos_of = [], []
        for tok in d.ids:
            pos_of.append(len(seq))
            if tok == IMAGE_TOKEN_ID:
                seq.extend(-(image * n_visual + j) - 1 for j in range(n_visual))
                image += 1
            else:
                seq.append(tok)
        spliced.append(seq)
        answers.append([(pos_of[i] - 1, d.ids[i]) for a, b in d.answer_spans for i in range(a, b)])
        first = answer_of[-1] + 1 if answer_of else 0
        answer_of.extend(first + k for k, (a, b) in enumerate(d.answer_spans) for _ in range(a, b))
    length = max(len(x) for x in spliced)
    grid = torch.full((len(spliced), length), eos, dtype=torch.long)
    for i, seq in enumerate(spliced):
        grid[i, :len(seq)] = torch.tensor(seq)
    is_image = grid < 0
    rows = [i for i, a in enumerate(answers) for _ in a]
    return TextBatch(tokens=torch.where(is_image, 0, grid),
                     image_rows=torch.where(is_image, -grid - 1, -1),
                     rows=torch.tensor(rows),
                     predicted_at=torch.tensor([p for a in answers for p, _ in a]),
                     targets=torch.tensor([t for a in answers for _, t in a]),
                     answer_of=torch.tensor(answer_of))


# --- The forward pass, batched (the reference's math, checked against it at start) --------------

def _routed(pair: reference.Multiway, x: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """A multiway module on [B, T, D]: the visual route where `visual` [B, T] is set (the
    pictures' positions), the text route elsewhere (docs/architecture.md §4.1). Each route runs
    on its own positions only."""
    text = pair.multiway[TEXT_ROUTE]
    first = text(x[:1, :1])  # the output's width (a norm keeps D, a projection may not)
    out = x.new_empty((*x.shape[:2], first.shape[-1]))
    out[~visual] = text(x[~visual])
    out[visual] = pair.multiway[VISUAL_ROUTE](x[visual])
    return out


def decoder_logits(dec: reference.MamDecoder, embeds: torch.Tensor,
                   visual: torch.Tensor) -> torch.Tensor:
    """embeds [B, T, D] -> logits [B, T, V], causal; each row one sequence from position 0."""
    b, t, _ = embeds.shape
    positions = torch.arange(t)
    x = embeds
    for layer in dec.layers:
        att = layer.self_attn
        h = _routed(layer.input_layernorm, x, visual)
        q = att.q_proj(h).view(b, t, att.n_heads, -1).transpose(1, 2)
        k = _routed(att.k_proj, h, visual).view(b, t, att.n_kv_heads, -1).transpose(1, 2)
        v = _routed(att.v_proj, h, visual).view(b, t, att.n_kv_heads, -1).transpose(1, 2)
        q, k = reference.rope(q, positions, att.theta), reference.rope(k, positions, att.theta)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + att.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        x = x + layer.mlp(_routed(layer.post_attention_layernorm, x, visual))
    return dec.lm_head(dec.norm(x))


def splice(dec: reference.MamDecoder, batch: TextBatch, image_embeds: torch.Tensor):
    """-> embeds [B, T, D] with each image position's embedding, and the visual mask [B, T]."""
    visual = batch.image_rows >= 0
    flat = image_embeds.reshape(-1, image_embeds.shape[-1])
    embeds = torch.where(visual[..., None], flat[batch.image_rows.clamp(min=0)],
                         dec.embed_tokens(batch.tokens))
    return embeds, visual


def answer_loss(dec, batch: TextBatch, image_embeds, per_answer: bool = False) -> torch.Tensor:
    """The mean loss per answer token, or with per_answer the mean over answers of each
    answer's summed token losses: a call's or a JSON object's few deciding tokens (a colour, a
    shape among forty tokens of syntax the model already writes) then weigh as much as a plain
    answer's one word, instead of a tenth of it."""
    embeds, visual = splice(dec, batch, image_embeds)
    logits = decoder_logits(dec, embeds, visual)
    token_losses = F.cross_entropy(logits[batch.rows, batch.predicted_at], batch.targets,
                                   reduction="none")
    if not per_answer:
        return token_losses.mean()
    n_answers = int(batch.answer_of.max()) + 1
    summed = token_losses.new_zeros(n_answers).index_add_(0, batch.answer_of, token_losses)
    return summed.mean()


def check_batched_math(model: reference.Owl2Reference, sp, cfg: Owl2Config) -> None:
    """The batched forward must give the reference's logits (it is the reference's math batched,
    and a mistake here would train a model the runtime does not run): on a batch with a picture,
    a picture with the tool offered and a clip, of different lengths."""
    rng = random.Random(0)
    picked, pixels, _ = picture_batch(rng, cfg, 2)
    clips, frames = clip_batch(rng, cfg, 1, 3)
    dialogues = [dialogue(sp, [picked[0].questions()[0], scenes.json_question(picked[0])]),
                 dialogue(sp, tool_dialogue_questions(rng, picked[1], 2),
                          system=scenes.REPORT_TOOL_OFFER),
                 dialogue(sp, clips[0].questions()[:2], n_images=3)]
    batch = text_batch(dialogues, cfg.n_visual, cfg.text.eos_token_id)
    with torch.no_grad():
        image_embeds = model.vision(torch.cat([pixels, frames]))
        embeds, visual = splice(model.decoder, batch, image_embeds)
        batched = decoder_logits(model.decoder, embeds, visual)
        first_image = [0, 1, 2]
        for row, d in enumerate(dialogues):
            n = d.ids.count(IMAGE_TOKEN_ID)
            one = model.logits(d.ids, image_embeds[first_image[row]:first_image[row] + n])
            err = (batched[row, :one.shape[0]] - one).abs().max().item()
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


@dataclass(frozen=True)
class Mix:
    """What one answer step trains on: four batches, each padded to its own longest row, their
    answer losses averaged."""
    plain: int            # pictures, `turns` plain questions each
    json: int             # pictures, the JSON question
    tools: int            # pictures with the tool offered: calls and plain questions
    clips: int            # clips of 2-8 frames (one count per step), `clip_turns` each
    tool_turns: int = 2
    call_share: float = 0.5   # of the tool dialogues' turns that ask for a call
    per_answer: bool = False  # the loss per answer rather than per token (answer_loss)
    color_at: bool = False    # color_at_questions among the plain questions
    by_place: float | None = None  # the share of calls naming a place (tool_dialogue_questions)


@dataclass
class Recipe:
    stage1_steps: int = 1400
    stage2_steps: int = 3200
    stage3_steps: int = 800
    stage4_steps: int = 1400
    stage5_steps: int = 1200
    stage1_batch: int = 64
    stage2_mix: Mix = Mix(plain=20, json=6, tools=4, clips=8)
    # Stage 3 dwells on what stage 2 left weakest (a shape named by its colour or place in a
    # call, and the three-shape JSON), keeping some of everything.
    stage3_mix: Mix = Mix(plain=8, json=12, tools=12, clips=4, tool_turns=3, call_share=0.75)
    # Stage 4 weighs each answer alike (answer_loss): the deciding tokens of calls and JSON
    # were a tenth of a plain answer's weight in stages 2-3, and stayed wrong on the training
    # pictures themselves. Calls in most tool turns, and the colour at a place asked plainly.
    stage4_mix: Mix = Mix(plain=10, json=8, tools=20, clips=4, tool_turns=2, call_share=0.8,
                          per_answer=True, color_at=True)
    # Stage 5 dwells on the calls that name a place (49/64 right after stage 4, against 35/36
    # by colour: the wrong ones wrote the colour of another shape, then that shape).
    stage5_mix: Mix = Mix(plain=8, json=6, tools=24, clips=4, tool_turns=2, call_share=0.85,
                          per_answer=True, color_at=True, by_place=0.75)
    turns: int = 3
    clip_turns: int = 2
    vision_lr: float = 2e-3
    heads_lr: float = 3e-3
    lr: float = 1e-3
    visual_route_lr: float = 3e-3
    stage3_lr_scale: float = 0.3
    stage4_lr_scale: float = 0.4
    stage5_lr_scale: float = 0.25
    aux_weight: float = 0.5   # stage 2; stage 3 trains on the answers alone


def train(cfg: Owl2Config, sp, recipe: Recipe, seed: int = 0,
          init: reference.Owl2Reference | None = None) -> reference.Owl2Reference:
    """The stages of `recipe` (a stage of 0 steps is skipped), from `init`'s weights if given."""
    torch.manual_seed(seed)
    picture_rng = random.Random(seed)     # the scenes and their drawing
    rng = random.Random(seed + 1)         # the questions asked about them
    model = reference.Owl2Reference(cfg)
    if init is None:
        init_weights(model, seed)
    else:
        model.load_state_dict(init.state_dict())
    heads = AuxHeads(cfg.text.hidden_size)
    check_batched_math(model, sp, cfg)
    model.train()
    eos = cfg.text.eos_token_id
    tools = scenes.REPORT_TOOL_OFFER

    def stage1():
        _, pixels, targets = picture_batch(picture_rng, cfg, recipe.stage1_batch)
        loss, acc = heads.loss_and_hits(model.vision(pixels), targets)
        return loss, f"aux loss {loss.item():.3f} · heads {acc:.2f}"

    def answers(mix: Mix, aux_weight: float):
        def step():
            picked, pixels, targets = picture_batch(picture_rng, cfg,
                                                    mix.plain + mix.json + mix.tools)
            n_frames = rng.randint(scenes.MIN_FRAMES, scenes.MAX_FRAMES)
            clips, frames = clip_batch(picture_rng, cfg, mix.clips, n_frames)
            image_embeds = model.vision(torch.cat([pixels, frames]))
            aux, acc = heads.loss_and_hits(image_embeds[:len(picked)], targets)
            a, b = mix.plain, mix.plain + mix.json
            families = [
                [dialogue(sp, _asked(rng, sc.questions() + (color_at_questions(sc) if mix.color_at
                                                            else []), recipe.turns))
                 for sc in picked[:a]],
                [dialogue(sp, [scenes.json_question(sc)]) for sc in picked[a:b]],
                [dialogue(sp, tool_dialogue_questions(rng, sc, mix.tool_turns, mix.call_share,
                                                      mix.by_place),
                          system=tools) for sc in picked[b:]],
                [dialogue(sp, clip_questions(rng, c, recipe.clip_turns), n_images=n_frames)
                 for c in clips],
            ]
            # Each family's images are a slice of image_embeds, in the order text_batch numbers
            # them.
            bounds = [0, a, b, len(picked), len(picked) + len(frames)]
            losses = [answer_loss(model.decoder, text_batch(ds, cfg.n_visual, eos),
                                  image_embeds[bounds[i]:bounds[i + 1]], mix.per_answer)
                      for i, ds in enumerate(families) if ds]
            ans = sum(losses) / len(losses)
            loss = ans + aux_weight * aux if aux_weight else ans
            return loss, ("answer loss " + " / ".join(f"{x.item():.3f}" for x in losses)
                          + f" · heads {acc:.2f}")
        return step

    with _progress() as bar:
        # Stage 1: the vision tower, the abstractor and its projection, with the heads.
        model.decoder.requires_grad_(False)
        _run_stage("stage 1", recipe.stage1_steps, stage1,
                   _groups(model.vision.named_parameters(), recipe.vision_lr)
                   + _groups(heads.named_parameters(), recipe.heads_lr), bar)
        # Stage 2: everything, on the answers (+ the heads at half weight).
        model.decoder.requires_grad_(True)
        _run_stage("stage 2", recipe.stage2_steps, answers(recipe.stage2_mix, recipe.aux_weight),
                   _groups(model.named_parameters(), recipe.lr, recipe.visual_route_lr)
                   + _groups(heads.named_parameters(), recipe.heads_lr), bar)
        # Stages 3-5: everything, on the answers alone, at lower rates, each dwelling on what
        # the one before left weakest (the mixes' comments in Recipe).
        for name, steps, mix, scale in [
                ("stage 3", recipe.stage3_steps, recipe.stage3_mix, recipe.stage3_lr_scale),
                ("stage 4", recipe.stage4_steps, recipe.stage4_mix, recipe.stage4_lr_scale),
                ("stage 5", recipe.stage5_steps, recipe.stage5_mix, recipe.stage5_lr_scale)]:
            _run_stage(name, steps, answers(mix, 0.0),
                       _groups(model.named_parameters(), recipe.lr * scale,
                               recipe.visual_route_lr * scale), bar)
    return model.eval().requires_grad_(False)  # the heads are not part of the model


# --- Held-out accuracy on the reference (the runtime's own is `owl2 eval`) ----------------------

def _greedy_answer(model, sp, cfg, prompt: str, pictures: list, max_new_tokens: int) -> str:
    pixels = torch.from_numpy(np.stack([reference_io.preprocess(p, cfg.preprocess)
                                        for p in pictures]))
    ids = reference_io.tokenize(sp, prompt)
    new = model.greedy(ids, model.encode_images(pixels), max_new_tokens=max_new_tokens)
    return sp.decode([t for t in new if t != cfg.text.eos_token_id]).strip()


def heldout_accuracy(model: reference.Owl2Reference, sp, cfg: Owl2Config, n_per_type: int,
                     seed: int = 1, split: str = "heldout", n_frames: int = 4) -> dict[str, float]:
    """Exact answers per type: the picture questions, JSON, the tool (calls and plain replies),
    and the clip questions at n_frames."""
    hits: dict[str, list[bool]] = {}
    for ex in scenes.examples(n_per_type, seed, split) + scenes.request_examples(n_per_type, seed,
                                                                                 split):
        offered = ex.question.kind in scenes.TOOL_KINDS
        prompt = render([Turn(ex.question.text)], n_images=1,
                        system=scenes.REPORT_TOOL_OFFER if offered else None)
        answer = _greedy_answer(model, sp, cfg, prompt, [ex.scene.draw(224)], 96)
        hits.setdefault(ex.question.kind, []).append(answer == ex.question.answer)
    for cx in scenes.clip_examples(n_per_type, n_frames, seed, split):
        prompt = render([Turn(cx.question.text)], n_images=n_frames)
        answer = _greedy_answer(model, sp, cfg, prompt, cx.clip.frames(224), 8)
        hits.setdefault(cx.question.kind, []).append(answer == cx.question.answer)
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
    parser.add_argument("--stage3-steps", type=int, default=Recipe.stage3_steps)
    parser.add_argument("--stage4-steps", type=int, default=Recipe.stage4_steps)
    parser.add_argument("--stage5-steps", type=int, default=Recipe.stage5_steps)
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this checkpoint's weights (one this script wrote)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--eval-per-type", type=int, default=200)
    parser.add_argument("--dtype", choices=sorted(tiny.DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    import sentencepiece as spm

    torch.set_num_threads(args.threads)
    cfg = demo_config()
    sp_bytes = tokenizer_model()
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    recipe = Recipe(stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                    stage3_steps=args.stage3_steps, stage4_steps=args.stage4_steps,
                    stage5_steps=args.stage5_steps)
    init = None
    if args.init is not None:
        from owl2_edge.convert.checkpoint import Checkpoint
        ckpt = Checkpoint.open(args.init)
        if ckpt.config != cfg or (args.init / "tokenizer.model").read_bytes() != sp_bytes:
            parser.error(f"--init {args.init}: not a demo checkpoint of this script's config and "
                         "tokenizer")
        init = reference.Owl2Reference.from_checkpoint(ckpt)
    model = train(cfg, sp, recipe, args.seed, init)
    tiny.make_tiny_checkpoint(args.out_dir, config=cfg, dtype=args.dtype, tensors=hf_tensors(model),
                              tokenizer_model=sp_bytes)
    if args.eval_per_type:
        acc = heldout_accuracy(model, sp, cfg, args.eval_per_type)
        print("held-out accuracy (float32 reference): "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
