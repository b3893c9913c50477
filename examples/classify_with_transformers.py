"""Classify with an ``llmcls export`` folder using nothing but ``transformers`` and ``torch`` (no llmcls, no peft).

    python examples/classify_with_transformers.py EXPORT_DIR < rows.jsonl > predictions.jsonl

Input rows: ``{"text": "...", "category": ["A", "B"]}`` (``category`` optional: default, the export's labels).
Output rows: ``{"label": "A", "probs": {"A": 0.93, "B": 0.07}, "confidence": 0.93, "abstain": false}``.

It scores every candidate the way llmcls trained the model to answer: the chat-template prompt, then the
candidate's tokens and the end-of-turn token; the label is the most likely candidate. Probabilities are calibrated
as ``llmcls.json``'s ``calibration`` says (softmax of (log-likelihood + the label's bias) / temperature), and a row
whose best probability is under its ``threshold`` is marked ``abstain``. It runs one plain forward
per candidate, without llmcls's batching and KV-cache sharing, so it doubles as an independent check of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def render_candidates(candidates: list[str], fmt: str) -> str:
    return str(list(candidates)) if fmt == "python_list" else ", ".join(candidates)


class ExportedClassifier:
    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        folder = Path(folder)
        self.meta = json.loads((folder / "llmcls.json").read_text(encoding="utf-8"))
        if (self.meta.get("calibration") or {}).get("lexical"):
            # probabilities = softmax(... + w * TF-IDF score): without the TF-IDF model they would be wrong
            raise SystemExit(f"{folder} is an LLM + TF-IDF hybrid (eval.hybrid): its probabilities need the TF-IDF "
                             "model in lexical/, which this transformers-only example does not compute; use "
                             "llmcls.serving.classifier.load_classifier or 'llmcls serve'")
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.device = device

    def prompt_ids(self, text: str, candidates: list[str]) -> list[int]:
        p = self.meta["prompt"]
        user = p["user_template"].format(text=text, category=render_candidates(candidates, p["category_format"]))
        messages = [{"role": "system", "content": p["system"]}, {"role": "user", "content": user}]
        rendered = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(rendered, add_special_tokens=False)["input_ids"]

    def fitted_prompt_ids(self, text: str, candidates: list[str], answer_len: int) -> list[int]:
        """Texts too long for ``max_length`` are shortened as in training: the text is cut (on a character
        boundary) so that prompt + longest answer fit, never the instructions or the candidates."""
        limit = self.meta["max_length"] - answer_len
        ids = self.prompt_ids(text, candidates)
        if len(ids) <= limit:
            return ids
        budget = limit - len(self.prompt_ids("", candidates))
        offsets = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        while True:
            keep = max(0, min(budget, len(offsets)))
            ids = self.prompt_ids(text[:offsets[keep - 1][1]] if keep else "", candidates)
            if len(ids) <= limit:
                return ids
            budget -= len(ids) - limit

    @torch.no_grad()
    def classify(self, text: str, candidates: list[str] | None = None) -> dict:
        candidates = candidates or self.meta["labels"]
        answers = [self.tok(c, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] for c in candidates]
        prompt = self.fitted_prompt_ids(text, candidates, max(len(a) for a in answers))
        scores = []
        for answer in answers:
            ids = torch.tensor([prompt + answer], device=self.device)
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
            target = torch.tensor(answer, device=self.device)[:, None]
            scores.append(torch.log_softmax(logits, -1).gather(1, target).sum().item())
        cal = self.meta.get("calibration") or {}
        bias = cal.get("bias") or {}
        z = torch.tensor([s + bias.get(c, 0.0) for s, c in zip(scores, candidates)], dtype=torch.float64)
        probs = torch.softmax(z / cal.get("temperature", 1.0), 0).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        out = {"label": candidates[best], "probs": dict(zip(candidates, probs)), "confidence": probs[best],
               "logliks": dict(zip(candidates, scores))}
        if cal.get("threshold") is not None:
            out["abstain"] = probs[best] < cal["threshold"]
        return out


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    clf = ExportedClassifier(sys.argv[1])
    for line in sys.stdin:
        if line.strip():
            row = json.loads(line)
            cands = row.get("category")
            print(json.dumps(clf.classify(row["text"], cands), ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
