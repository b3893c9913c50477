"""The classifier at inference time, used by eval, predict and serve: prompts fitted as in training, candidate
scoring (the batch laid out as ``llmcls.layouts`` says), probabilities and the prediction, batched generation,
and :func:`classify`, which runs all of it over a whole file, on one process or sharded over a launch.

``score``: the log-likelihood of each candidate label (all of its tokens, then the end token) given the prompt;
probabilities are the softmax of the log-likelihoods over the row's candidates. Multi-token labels are scored
exactly, and the end token tells "Sport" from "Sports".

``generate``: the tutorial's way, batched with left padding and greedy decoding; the text is mapped to a label.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from llmcls import dist
from llmcls.data import Row
from llmcls.encode import PromptBuilder, fit_prompts, fit_rows, left_pad
from llmcls.layouts import Layout, layout_for
from llmcls.model.load import compute_device


@dataclass
class Prediction:
    index: int
    pred: Optional[str]                     # None: generate produced no valid label
    probs: Optional[dict[str, float]]       # per candidate (score), calibrated where the run is; None for generate
    raw: Optional[str] = None               # generated text (generate)
    logliks: Optional[list[float]] = None   # per candidate (score), as the model gave them
    raw_probs: Optional[dict[str, float]] = None  # before calibration (only where calibrated)
    abstain: Optional[bool] = None          # below the abstention threshold (only where one is set)
    candidates: Optional[list[str]] = None  # those scored (score): the row's, or its shortlist (eval.shortlist)
    lexical: Optional[list[float]] = None   # per candidate, the TF-IDF model's score (hybrid / shortlist)

    @property
    def confidence(self) -> Optional[float]:
        return max(self.probs.values()) if self.probs else None

    def top_k(self, k: int) -> list[list]:
        """The k most probable candidates as [label, probability] pairs, most probable first."""
        return [[c, p] for c, p in sorted((self.probs or {}).items(), key=lambda x: -x[1])[:k]]


def to_probs(logliks: Sequence[float]) -> list[float]:
    return torch.softmax(torch.tensor(logliks, dtype=torch.float64), 0).tolist()


def scored_prediction(index: int, candidates: Sequence[str], logliks: Sequence[float], calibration=None,
                      abstain_below: Optional[float] = None, lexical: Optional[Sequence[float]] = None
                      ) -> Prediction:
    """Log-likelihoods of a row's candidates -> probabilities (calibrated by ``calibration``, a
    :class:`llmcls.calibration.Calibration`, where given; a hybrid one adds ``lexical``, the TF-IDF scores) -> the
    prediction (the most probable candidate) and, with a threshold (``abstain_below``, else the calibration's),
    whether to abstain."""
    logliks = [float(x) for x in logliks]
    lexical = None if lexical is None else [float(x) for x in lexical]
    raw = dict(zip(candidates, to_probs(logliks)))
    probs, raw_probs = raw, None
    if calibration is not None and not calibration.is_identity:
        probs = dict(zip(candidates, calibration.probs([logliks], [candidates],
                                                       None if lexical is None else [lexical])[0]))
        raw_probs = raw
    threshold = abstain_below if abstain_below is not None else getattr(calibration, "threshold", None)
    best = max(probs, key=probs.get)
    return Prediction(index, best, probs, logliks=logliks, raw_probs=raw_probs,
                      abstain=None if threshold is None else bool(probs[best] < threshold),
                      candidates=list(candidates), lexical=lexical)


def record(row: Row, p: Prediction, with_truth: bool, top_k: int = 0) -> dict:
    """A prediction as one line of ``predictions.jsonl`` (``with_truth``: eval, with the true label and whether it
    was right) or of ``llmcls predict``'s output."""
    rec: dict = {"index": p.index, "line": row.line}
    if with_truth:
        rec.update(truth=row.label, pred=p.pred, correct=p.pred == row.label if row.label is not None else None)
    else:
        rec["label"] = p.pred
    if p.probs is not None:
        rec["probs"] = {k: round(v, 6) for k, v in p.probs.items()}
        rec["confidence"] = round(p.confidence, 6)
    if p.abstain is not None:
        rec["abstain"] = p.abstain
    if top_k and p.probs is not None:  # generate gives no probabilities to rank
        rec["top_k"] = [[c, round(v, 6)] for c, v in p.top_k(top_k)]
    if p.raw_probs is not None:
        rec["raw_probs"] = {k: round(v, 6) for k, v in p.raw_probs.items()}
    if p.logliks is not None and with_truth:
        rec["logliks"] = [round(x, 5) for x in p.logliks]
    if p.lexical is not None and with_truth:
        rec["lexical"] = [round(x, 5) for x in p.lexical]
    if p.candidates is not None and p.candidates != row.candidates:
        rec["shortlist"] = p.candidates
    if p.raw is not None:
        rec["raw"] = p.raw
    return rec


def _budgets(builder: PromptBuilder, rows: Sequence[Row], max_length: int) -> list[int]:
    return [max_length - max(len(builder.answer_ids(c)) for c in r.candidates) for r in rows]


def prompts_for(builder: PromptBuilder, rows: Sequence[Row], max_length: Optional[int]) -> list[list[int]]:
    """Prompt ids, with texts shortened exactly as in training: prompt + longest answer fit ``max_length``."""
    if max_length is None:
        return builder.batch_prompt_ids(rows)
    return fit_prompts(builder, rows, _budgets(builder, rows, max_length))


def as_read(builder: PromptBuilder, rows: Sequence[Row], max_length: Optional[int]) -> list[Row]:
    """The rows as the model reads them: each text cut exactly as :func:`prompts_for` cuts it."""
    if max_length is None:
        return list(rows)
    return [r for r, _ in fit_rows(builder, rows, _budgets(builder, rows, max_length))]


def read_and_prompts(builder: PromptBuilder, rows: Sequence[Row], max_length: Optional[int]
                     ) -> tuple[list[Row], list[list[int]]]:
    """:func:`as_read` and :func:`prompts_for` from one pass of the tokenizer (what the hybrid needs per batch)."""
    if max_length is None:
        return list(rows), builder.batch_prompt_ids(rows)
    pairs = fit_rows(builder, rows, _budgets(builder, rows, max_length))
    return [r for r, _ in pairs], [p for _, p in pairs]


@torch.no_grad()
def score_batch(model, builder: PromptBuilder, rows: Sequence[Row], max_length: Optional[int] = None,
                prompts: Optional[list[list[int]]] = None, layout: Optional[Layout] = None) -> list[list[float]]:
    """Log-likelihood of every candidate of every row (same order as ``row.candidates``), in one forward;
    ``layout`` defaults to :func:`llmcls.layouts.layout_for` the model."""
    layout = layout or layout_for(model)
    prompts = prompts if prompts is not None else prompts_for(builder, rows, max_length)
    return layout.queue(model, layout.prepare(builder, rows, prompts)).result()


def map_output(text: str, candidates: Sequence[str]) -> Optional[str]:
    """A generated reply as a label: exact match first, then case-insensitive, then the one candidate it
    starts with or contains. Anything else is invalid (None)."""
    t = text.strip().strip("。.\"'`").strip()
    if t in candidates:
        return t
    low = {c.lower(): c for c in candidates}
    if t.lower() in low:
        return low[t.lower()]
    starts = [c for c in candidates if t.lower().startswith(c.lower())]
    if len(starts) == 1:
        return starts[0]
    inside = [c for c in candidates if c.lower() in t.lower()]
    return inside[0] if len(inside) == 1 else None


@torch.no_grad()
def generate_batch(model, builder: PromptBuilder, rows: Sequence[Row], max_new_tokens: int,
                   max_length: Optional[int] = None, prompts: Optional[list[list[int]]] = None,
                   **generate_kwargs) -> list[str]:
    dev = compute_device(model)
    prompts = prompts if prompts is not None else prompts_for(builder, rows, max_length)
    ids, mask = left_pad(prompts, builder.tok.pad_token_id)
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=builder.tok.pad_token_id,
                         eos_token_id=builder.tok.eos_token_id, **generate_kwargs)
    return builder.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def classify_with(cfg, model, tokenizer, rows: Sequence[Row], **kwargs) -> list[Prediction]:
    """:func:`classify` with a run's settings (its prompt, ``eval.method`` / ``batch_size`` / ``max_new_tokens``,
    ``data.max_length``); ``kwargs`` override or add to them."""
    from llmcls.windows import settings

    opts = dict(method=cfg.eval.method, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                max_length=cfg.data.max_length, shortlist=cfg.eval.shortlist, windows=settings(cfg))
    return classify(model, PromptBuilder(tokenizer, cfg.prompt), rows, **{**opts, **kwargs})


def _batches(order: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield order[i:i + size]


def classify(model, builder: PromptBuilder, rows: Sequence[Row], method: str = "score", batch_size: int = 16,
             max_new_tokens: int = 8, max_length: Optional[int] = None, progress: bool = True,
             desc: str = "classify", shard: Optional[tuple[int, int]] = None, calibration=None,
             abstain_below: Optional[float] = None, lockstep: bool = False, lexical=None,
             shortlist: int = 0, windows=None, timing: Optional[dict] = None) -> list[Prediction]:
    """Classify rows in batches (longest first, so padding stays small); results come back in input order.

    Under torchrun (several processes) each process classifies every world-th batch of the batch plan a single
    process would use, and every process gets all predictions back: a row meets the same batch as in one
    process, so the results are the same, not just close. ``shard=(rank, world)`` classifies only batches rank,
    rank + world, ... of that plan and leaves the other rows None (what each process does under a launch).
    ``lockstep``: every process runs the same number of forwards (FSDP gathers weights in each one, with every
    process taking part), the short ones repeating a batch whose results they drop. ``calibration`` and
    ``abstain_below``: see :func:`scored_prediction`. ``lexical`` (a :class:`llmcls.lexical.LexicalModel`) scores
    every candidate too, for a hybrid calibration and for ``shortlist``: then only each row's ``shortlist``
    candidates it ranks highest are offered to and scored by the LLM (0: all). ``windows``
    (:class:`llmcls.windows.WindowSettings`): a text too long for ``max_length`` is read in windows, all scored in
    one pass over the windows (batched and sharded like rows), their scores combined into one prediction per row.
    ``timing``: a dict that gets ``first_batch_at``, the ``time.perf_counter()`` at which the first batch's
    results were back on the host (compilation of the first batch's shapes included; the first batch is then
    read back before the second is queued)."""
    if shortlist and lexical is None and method == "score":
        raise ValueError("eval.shortlist ranks candidates with the run's TF-IDF model, and this run has none "
                         "(it is fitted when training with eval.shortlist or eval.hybrid set)")
    if windows is not None and windows.active and max_length is not None:
        return _classify_windows(model, builder, rows, windows, method, batch_size, max_length, progress, desc,
                                 shard, calibration, abstain_below, lockstep, lexical, shortlist, timing)
    if shard is None and dist.launched():
        mine = classify(model, builder, rows, method, batch_size, max_new_tokens, max_length,
                        progress and dist.is_main(), desc, shard=(dist.rank(), dist.world_size()),
                        calibration=calibration, abstain_below=abstain_below, lockstep=lockstep, lexical=lexical,
                        shortlist=shortlist, timing=timing)
        merged: list[Optional[Prediction]] = [None] * len(rows)
        for part in dist.all_gather([p for p in mine if p is not None]):
            for p in part:
                merged[p.index] = p
        missing = [i for i, p in enumerate(merged) if p is None]
        if missing:  # a broken batch plan would silently drop rows from the metrics
            raise RuntimeError(f"sharded classification lost {len(missing)} rows (first: {missing[:5]})")
        return merged  # type: ignore[return-value]
    from tqdm.auto import tqdm

    lengths = [len(r.text) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    batches = list(_batches(order, batch_size))
    if shard is not None:
        rounds, plan = -(-len(batches) // shard[1]), batches
        batches = plan[shard[0]::shard[1]]
        if lockstep and len(batches) < rounds:
            batches.append((batches or plan)[-1])  # a real batch's shapes; its rows are simply scored again
    preds: list[Optional[Prediction]] = [None] * len(rows)
    layout = layout_for(model) if method == "score" else None
    pin = layout is not None and layout.name != "cached" and compute_device(model).type == "cuda"

    def prep(idx):  # the next batch's tokens and tensors, made on a thread while the model runs this one
        batch, lex, prompts = [rows[i] for i in idx], None, None
        if lexical is not None and layout is not None:
            from llmcls.lexical import cut_texts, shortlist_rows

            if lexical.text == "same":  # the cut texts and the prompts from one tokenizer pass
                read, prompts = read_and_prompts(builder, batch, max_length)
            else:
                read = cut_texts(batch, lexical.text)
            short, lex = shortlist_rows(batch, lexical.candidate_scores(read), shortlist)
            if any(a is not b for a, b in zip(short, batch)):  # a shortlist changes the prompt's candidate list
                batch, prompts = short, None
        prompts = prompts if prompts is not None else prompts_for(builder, batch, max_length)
        return batch, lex, prompts, (layout.prepare(builder, batch, prompts, pin) if layout is not None else None)

    def first_back():
        if timing is not None and "first_batch_at" not in timing:
            timing["first_batch_at"] = time.perf_counter()

    def scored(idx, batch, lex, lls):
        first_back()  # lls were read back to the host: the batch is done
        for k, (i, ll) in enumerate(zip(idx, lls)):
            preds[i] = scored_prediction(i, batch[k].candidates, ll, calibration, abstain_below,
                                         None if lex is None else lex[k])
        bar.update(len(idx))

    with tqdm(total=sum(map(len, batches)), desc=desc, unit="row", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prep, batches[0]) if batches else None
        queued = None  # the batch on the GPU whose scores are read back once the next one is queued behind it
        for k, idx in enumerate(batches):
            batch, lex, prompts, prepared = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(prep, batches[k + 1])
            if layout is not None:
                now = (idx, batch, lex, layout.queue(model, prepared))
                if k == 0 and timing is not None:
                    # timed: the first batch is read back before the second is queued, so that its time is its
                    # own (one batch's overlap given up, once)
                    scored(*now[:3], now[3].result())
                    continue
                if queued is not None:
                    scored(*queued[:3], queued[3].result())
                queued = now
            else:
                batch = [rows[i] for i in idx]
                texts = generate_batch(model, builder, batch, max_new_tokens, prompts=prompts)
                first_back()
                for i, r, t in zip(idx, batch, texts):
                    preds[i] = Prediction(i, map_output(t, r.candidates), None, t)
                bar.update(len(idx))
        if queued is not None:
            scored(*queued[:3], queued[3].result())
    return preds  # type: ignore[return-value]


def reader(builder: PromptBuilder, max_length: Optional[int], windows=None):
    """What the LLM reads of each row (a function of rows): the text cut to fit ``max_length`` or, with windows,
    what the windows read. The TF-IDF model of a hybrid or a baseline with ``text: same`` reads the same."""
    if windows is not None and windows.active and max_length is not None:
        from llmcls.windows import as_read as windows_read

        return lambda rs: windows_read(builder, rs, max_length, windows)
    return lambda rs: as_read(builder, rs, max_length)


def lexical_scores(lexical, builder, rows, max_length, windows, shortlist):
    """The rows (cut to their shortlist) and their candidates' TF-IDF scores, the text read as the LLM reads it."""
    from llmcls.lexical import cut_texts, shortlist_rows

    scores = lexical.candidate_scores(cut_texts(rows, lexical.text, reader(builder, max_length, windows)))
    return shortlist_rows(rows, scores, shortlist)


def _classify_windows(model, builder, rows, windows, method, batch_size, max_length, progress, desc, shard,
                      calibration, abstain_below, lockstep, lexical=None, shortlist=0, timing=None
                      ) -> list[Prediction]:
    from llmcls.windows import combine, expand, regroup

    if method != "score":
        raise ValueError("data.long_text=windows combines the windows' candidate scores: it needs eval.method=score")
    lex = None
    if lexical is not None:  # the whole document's TF-IDF scores, once per row, not per window
        rows, lex = lexical_scores(lexical, builder, rows, max_length, windows, shortlist)
    flat, owner = expand(builder, rows, max_length, windows)
    per_window = classify(model, builder, flat, method, batch_size, max_length=max_length, progress=progress,
                          desc=f"{desc} ({len(flat)} windows)", shard=shard, lockstep=lockstep, timing=timing)
    preds: list[Optional[Prediction]] = [None] * len(rows)
    for i, (r, ps) in enumerate(zip(rows, regroup(per_window, owner, len(rows)))):
        if all(p is not None for p in ps):  # under shard=, a row's windows may lie in other shards
            preds[i] = scored_prediction(i, r.candidates, combine([p.logliks for p in ps], windows.combine),
                                         calibration, abstain_below, None if lex is None else lex[i])
    return preds  # type: ignore[return-value]
