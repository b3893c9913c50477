"""Typed experiment configuration: one YAML file per experiment, overridable from the command line.

Every field carries a one-line doc (``doc=``) that the CLI turns into ``--help`` text, so the YAML keys, the
command-line options and the documentation cannot drift apart. Unknown or ill-typed keys fail here, before any
model is loaded, with the offending key named. Every rule that relates two settings (or a setting and the launch)
is at the end of this file.

Longer than most modules (~450 lines) on purpose: it is the one reference of every setting of every command, a
section per dataclass, read top to bottom; the README's table is generated from it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


def f(default: Any, doc: str, check: Optional[typing.Callable[[Any], Optional[str]]] = None) -> Any:
    """A dataclass field with a documentation line (lists and dicts are copied per instance). ``check`` returns
    what is wrong with a value (or None); :func:`load_config` applies it, so a value out of range stops a command
    before anything is imported or loaded."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# Value checks for ``f(..., check=...)``: each returns the problem with a value, or None, and carries its rule in
# words (``.rule``), which --help and the README's table show. None values (an unset optional setting) pass.
def _rule(check, rule: str):
    check.rule = rule
    return check


def at_least(low: float):
    return _rule(lambda v: None if v is None or v >= low else f"must be {low} or more", f"{low} or more")


def above(low: float):
    return _rule(lambda v: None if v is None or v > low else f"must be more than {low}", f"more than {low}")


def within(low: float, high: float, high_open: bool = False):
    rule = f"[{low}, {high}{')' if high_open else ']'}"

    def check(v):
        ok = v is None or (low <= v < high if high_open else low <= v <= high)
        return None if ok else f"must be in {rule}"
    return _rule(check, rule)


def one_of(*choices: str):
    return _rule(lambda v: None if v in choices else f"must be one of {', '.join(choices)}", ", ".join(choices))


def template_fields(*names: str):
    """A ``str.format`` template that may name only ``names`` (a typo would otherwise fail at the first row)."""
    def check(v):
        import string

        try:
            used = {fname.split(".")[0].split("[")[0] for _, fname, _, _ in string.Formatter().parse(v)
                    if fname is not None}
        except ValueError as e:
            return f"not a valid template ({e}; write a literal brace as {{{{ or }}}})"
        unknown = sorted(used - set(names))
        if unknown:
            return (f"names {{{unknown[0]}}}; a template may use only "
                    f"{', '.join('{' + n + '}' for n in names)}")
        return None
    return _rule(check, "a template naming only " + " and ".join("{" + n + "}" for n in names))


# The transformers SchedulerType values that need no extra arguments (tests check this list against the installed
# transformers); listed here so that a typo stops the command before transformers is imported.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


TUTORIAL_SYSTEM = (
    "You are an expert in text classification. You will receive a piece of text and several potential "
    "classification options. Please output the correct type of the text content."
)
TUTORIAL_USER = "Text: {text}, Type Options: {category}"
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TinyConfig:
    """Shape of the random-init ``tiny`` preset (a Qwen2-architecture model built from a config)."""

    num_hidden_layers: int = f(2, "Transformer layers of the tiny model.", check=at_least(1))
    hidden_size: int = f(64, "Hidden size of the tiny model.", check=at_least(1))
    intermediate_size: int = f(128, "MLP width of the tiny model.", check=at_least(1))
    num_attention_heads: int = f(4, "Attention heads of the tiny model.", check=at_least(1))
    num_key_value_heads: int = f(2, "Key/value heads of the tiny model (grouped-query attention).", check=at_least(1))
    tie_word_embeddings: bool = f(True, "Share the input embedding and the LM head (halves the tiny model).")


@dataclass
class ModelConfig:
    name_or_path: str = f("qwen/Qwen1.5-7B-Chat", "Local folder, ModelScope id, Hugging Face id, or 'tiny'.")
    source: Literal["auto", "modelscope", "huggingface", "local"] = f(
        "auto", "Where a model id is fetched from; 'auto' uses a local folder if it exists, else ModelScope."
    )
    revision: Optional[str] = f(None, "Model revision (branch, tag or commit) on the hub.")
    cache_dir: Optional[str] = f(None, "Download cache folder (default: the hub library's own).")
    offline: bool = f(False, "Never touch the network: use only local folders and hub caches.")
    trust_remote_code: bool = f(False, "Allow model code from the hub to run (off unless you trust it).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = f(
        "auto", "Weights dtype; 'auto' is bfloat16 on a GPU and float32 on a CPU."
    )
    tokenizer: Optional[str] = f(
        None, "Tokenizer folder; default: the model's own (the tiny preset uses the Qwen tokenizer)."
    )
    attn_implementation: Optional[str] = f(None, "Attention kernel ('sdpa', 'eager', 'flash_attention_2').")
    offload_embeddings: bool = f(False, "Keep the frozen input embedding table in CPU memory (16 GB mode).")
    quantize: Literal["none", "nf4", "fp8"] = f(
        "none", "Load the frozen base in 4-bit NF4 with double quantisation (QLoRA; needs bitsandbytes, "
        "'pip install llmcls[qlora]'), or compute its decoder-layer matrix products in FP8 e4m3 (fp8: an sm_89+ "
        "GPU; model.fp8_weights cast needs torchao, 'pip install llmcls[fp8]'; forward and backward, training and "
        "scoring). Adapters, norms, embeddings and the LM head stay in dtype; export merges into the unquantised "
        "base."
    )
    fp8_scaling: Literal["rowwise", "tensorwise"] = f(
        "rowwise", "quantize=fp8's dynamic scales: one per row of activations and per output channel of weights "
        "(rowwise, closer to bf16), or one per tensor (tensorwise, cheaper casts)."
    )
    fp8_weights: Literal["cast", "stored"] = f(
        "stored", "quantize=fp8's base weights: cast once at load and kept in e4m3 (stored: torch's _scaled_mm, "
        "rowwise only; the dtype copy is freed, a second e4m3 copy laid out for the backward is kept when "
        "training; 7B shape on an H200: 1.27-1.31x bf16 training), or kept in dtype and cast at every step (cast: "
        "torchao's Float8Linear, either scaling; 1.16x)."
    )
    fp8_fast_accum: Literal["auto", "none", "forward", "all"] = f(
        "auto", "quantize=fp8's products that accumulate in Hopper's fast mode (less precise sums, faster): none, "
        "forward (the output's product; torchao's own default) or all (the backward's input gradient too); auto: "
        "forward (real 0.5B, 3 seeds: within 0.12 pt accuracy of bf16; 7B shape: 1.31x bf16 training against "
        "1.27x with none, docs/BENCHMARKS.md)."
    )
    device_map: Optional[Literal["auto", "balanced", "balanced_low_0", "sequential"]] = f(
        None, "Spread the layers over all GPUs of one process (the tutorial's fallback for a model larger than "
        "one card; one GPU works at a time). Not with torchrun: use train.fsdp there."
    )
    compile_cache: Optional[str] = f(
        None, "Folder of torch.compile's on-disk caches (train.compile, eval.compile): a later run of the same "
        "shapes loads the compiled code instead of compiling again. Default: $LLMCLS_COMPILE_CACHE, else "
        "~/.cache/llmcls/compile; an already-set TORCHINDUCTOR_CACHE_DIR wins over both."
    )
    tiny: TinyConfig = field(default_factory=TinyConfig, metadata={"doc": "Shape of the 'tiny' preset."})


@dataclass
class DataConfig:
    train_file: Optional[str] = f(None, "Training data: rows of text, category (candidates), output: a .jsonl, "
                                       ".json (list), .csv/.tsv or .parquet file, a local dataset folder, or "
                                       "hf:/modelscope:owner/name[:split].")
    test_file: Optional[str] = f(None, "Test data in any of train_file's forms (used by eval).")
    text_field: str = f("text", "Field holding the text to classify.")
    category_field: str = f("category", "Field holding the candidate labels (list or comma/、-separated).")
    output_field: str = f("output", "Field holding the true label.")
    on_invalid: Literal["error", "skip"] = f("error", "Invalid rows: stop with an error, or skip and count them.")
    max_length: int = f(384, "Maximum tokens per training row (prompt + answer + end token).", check=at_least(8))
    truncation: Literal["text", "right"] = f(
        "text", "'text' shortens the text so the answer is always kept; 'right' is the tutorial's cut."
    )
    long_text: Literal["cut", "windows"] = f(
        "cut", "A text too long for max_length: 'cut' to its lead, or read whole in 'windows' (each window's prompt "
        "fits max_length; eval/predict/serve combine their scores, eval.window_combine).")
    window_overlap: int = f(64, "Tokens of text shared by consecutive windows (at most half a window).",
        check=at_least(0))
    max_windows: Optional[int] = f(16, "Most windows per text; a longer one keeps this many, evenly spaced (first and "
                                       "last included), and the text between them is not read (null: no cap).",
        check=at_least(1))
    num_proc: Optional[int] = f(None, "Processes that encode the training rows in prepare (null: one per CPU core "
                                      "this process may use; 1: this process, the tokenizer's own threads).",
        check=at_least(1))
    max_train_rows: Optional[int] = f(None, "Use only the first N training rows (quick experiments).",
        check=at_least(1))
    max_eval_rows: Optional[int] = f(None, "Evaluate only the first N test rows (default: all).",
                                      check=at_least(1))
    dev_file: Optional[str] = f(None, "Dev data (train_file's forms): scored during training to pick the best step "
                                     "and to calibrate.")
    dev_fraction: float = f(0.0, "Without dev_file: this share of each label's training rows (at least one row "
                                 "of every label that has two) becomes the dev set, taken out of training and "
                                 "recorded in RUN/data.", check=within(0, 1, high_open=True))
    split_seed: int = f(0, "Seed of the dev_fraction split.")
    multi_label: Literal["auto", "true", "false"] = f(
        "auto", "Rows with several true labels (output a list or 'A, B'): 'auto' makes the run multi-label when a "
        "training row has more than one, 'true' always, 'false' refuses such rows (docs/MULTILABEL.md).")


@dataclass
class PromptConfig:
    system: str = f(TUTORIAL_SYSTEM, "System message of the chat prompt.")
    user_template: str = f(TUTORIAL_USER, "User message; {text} and {category} are filled in.",
        check=template_fields("text", "category"))
    category_format: Literal["python_list", "comma"] = f(
        "python_list", "How candidates render in {category}: the tutorial's Python list, or 'A, B'."
    )


@dataclass
class LoraConfig:
    method: Literal["lora", "full"] = f("lora", "'lora' trains adapters; 'full' trains every weight.")
    r: int = f(8, "LoRA rank.", check=at_least(1))
    alpha: int = f(32, "LoRA alpha (scaling = alpha / r).", check=at_least(1))
    dropout: float = f(0.1, "LoRA dropout.", check=within(0, 1, high_open=True))
    target_modules: list[str] = f(list(ALL_PROJ), "Modules that get adapters.")
    dtype: Literal["auto", "float32"] = f(
        "auto", "Adapter weights dtype: 'auto' follows the base model (bf16 on a GPU); 'float32' is the tutorial's.")
    task: Literal["generate", "seq_cls"] = f(
        "generate", "'generate': train the answer tokens after the prompt, score each candidate's likelihood; "
        "'seq_cls': a classification head over the training labels on the same prompt (peft SEQ_CLS: LoRA + the "
        "head trained), initialised from the LM head's rows for each label's first token.")


@dataclass
class TrainConfig:
    output_dir: str = f("runs/qwen1.5-7b-chat-fudan", "Run directory: checkpoints, adapter, logs, metrics.")
    epochs: float = f(2.0, "Training epochs.", check=at_least(0))
    max_steps: int = f(-1, "Stop after this many optimizer steps (-1: run all epochs).", check=at_least(-1))
    batch_size: int = f(4, "Rows per device per micro-batch.", check=at_least(1))
    batch_tokens: Optional[int] = f(None, "Fill each micro-batch with rows up to this many real tokens instead of "
                                          "batch_size rows (overrides batch_size; needs packing; one process).",
                                    check=at_least(1))
    grad_accum: int = f(4, "Micro-batches per optimizer step.", check=at_least(1))
    lr: float = f(1e-4, "Peak learning rate.", check=above(0))
    lr_scheduler: str = f("linear", "Learning-rate schedule (transformers' names).", check=one_of(*SCHEDULERS))
    warmup_ratio: float = f(0.0, "Fraction of steps spent warming up the learning rate.",
        check=within(0, 1, high_open=True))
    weight_decay: float = f(0.0, "AdamW weight decay.", check=at_least(0))
    logging_steps: int = f(10, "Log loss and learning rate every N optimizer steps.", check=at_least(1))
    save_steps: int = f(100, "Save a checkpoint every N optimizer steps (0: none).", check=at_least(0))
    save_total_limit: Optional[int] = f(None, "Keep at most N checkpoints (default: all).", check=at_least(1))
    gradient_checkpointing: bool = f(True, "Recompute activations in backward to save memory.")
    seed: int = f(42, "Random seed (data order, LoRA init, dropout).")
    dataloader_workers: int = f(0, "Data-loading worker processes.", check=at_least(0))
    group_by_length: bool = f(False, "Batch rows of similar length together (less padding).")
    packing: bool = f(False, "Lay each micro-batch's rows end to end in one sequence, attention kept within each "
                             "row (FlashAttention's variable-length kernel): no compute on padding. GPU; on a CPU "
                             "it falls back to a dense mask and is slower than padding.")
    compile: bool = f(False, "torch.compile each decoder layer: fused kernels, far fewer launches (GPU; "
                             "the first steps pay the compile time).")
    cuda_graphs: bool = f(False, "Replay each step's forward and backward from recorded CUDA graphs (the decoder "
                                 "stack compiled whole, torch.compile's 'reduce-overhead'): for small models whose "
                                 "steps wait on the host launching kernels (real 0.5B: 1.98x tokens/s); the first "
                                 "compile is longer (~2 min with an empty cache). Needs train.compile, "
                                 "train.packing, train.grad_accum 1 and one CUDA GPU; each step's packed rows are "
                                 "padded up to a multiple of 512 tokens, so that a few lengths are recorded.")
    class_weights: str = f("none", "Weigh each row's answer tokens (lora.task=seq_cls: its cross-entropy) by its label: 'none', 'balanced' (rows / (labels x "
                                   "rows of the label)), or a JSON file {label: weight}.")
    skip_nonfinite_steps: int = f(
        0, "Drop the update of up to this many optimizer steps whose gradients are not finite (each named in a "
        "warning and in train_summary.json's skipped_steps) instead of stopping the run at the first; checking "
        "waits for the GPU once a step. 0: stop at the first non-finite loss or gradient norm logged.",
        check=at_least(0))
    select_best: Literal["last", "macro_f1", "accuracy", "nll"] = f(
        "last", "Which weights the run keeps: the last step's, or those of the dev evaluation with the best dev "
        "macro-F1, accuracy or NLL (needs a dev set).")
    early_stopping_patience: int = f(0, "Stop after this many dev evaluations without improvement of select_best "
                                        "(0: never).", check=at_least(0))
    select_confidence: float = f(
        0.95, "An earlier dev evaluation replaces the last step only if it beats it in at least this share of "
        "bootstrap resamples of the dev rows (paired; 0: plain best-of, whatever the noise).",
        check=within(0, 1, high_open=True))
    keep_last: bool = f(False, "Also keep the last step's weights in RUN/last when select_best picks an earlier step.")
    long_text_windows: Literal["first", "all"] = f(
        "first", "How training sees a text too long for data.max_length: its 'first' window (the lead, as today) or "
        "'all' its windows (data.window_overlap, data.max_windows), each an example with the text's label.")
    fsdp: Literal["off", "full_shard", "shard_grad_op"] = f(
        "off", "Shard the model over the processes of a torchrun/accelerate launch (FSDP2, CUDA only): "
        "'full_shard' shards weights, gradients and optimizer state; 'shard_grad_op' keeps weights whole "
        "between forward and backward (faster, more memory)."
    )


@dataclass
class EvalConfig:
    method: Literal["score", "generate"] = f(
        "score", "'score': likelihood of each candidate; 'generate': greedy decoding mapped to a label."
    )
    batch_size: int = f(16, "Rows per forward pass.", check=at_least(1))
    max_new_tokens: int = f(8, "Token budget for 'generate' (labels are short).", check=at_least(1))
    log_samples: int = f(10, "Sample predictions logged to the tracker (the tutorial printed 10).", check=at_least(0))
    every_steps: int = f(0, "Score the dev set every N optimizer steps during training (0: only at the end).",
        check=at_least(0))
    every_epoch: bool = f(False, "Score the dev set at the end of every epoch.")
    hybrid: bool = f(False, "Add a TF-IDF model's per-candidate scores (trained with the run, reading baseline.text) "
                            "to the LLM's log-likelihoods, their weight fitted with the calibration on the dev set.")
    shortlist: int = f(0, "Offer and score only each row's K candidates the run's TF-IDF model ranks highest "
                          "(many labels; 0: all).", check=at_least(0))
    zero_shot: bool = f(False, "'llmcls run' also scores the base model without fine-tuning (RUN/zero-shot), "
                               "for the report.")
    window_combine: Literal["mean", "max", "sum"] = f(
        "mean", "How data.long_text=windows joins a text's window scores: mean (of each window's log-probabilities; "
        "confidence does not grow with length), max (each candidate's best window) or sum (product of experts).")
    compile: bool = f(False, "torch.compile each decoder layer for eval and predict (GPU: fused kernels; the first "
                             "batches pay ~30 s of compile time, so it pays from a few thousand rows).")
    compile_background: bool = f(False, "With eval.compile: the first batches score eagerly while the compiled "
                                        "layers load on a thread, then the compiled ones take over (7B shape, H200, "
                                        "fresh eval of 1,669 rows: 92 against 83-88 rows/s). Off by default: which "
                                        "batches ran eagerly depends on timing, and eager and compiled scores differ "
                                        "in rounding, so two runs are no longer bit for bit the same.")
    merge_lora: bool = f(False, "Merge the LoRA adapter into the base weights before scoring (eval, predict, "
                                "calibrate, serve; in 'llmcls run' the run's own weights, scored after the others): "
                                "no adapter products per layer (7B shape, H200: 122 against 110 rows/s steady); the "
                                "merged weights are rounded to the base's dtype, as export's are, so scores move a "
                                "little (real 0.5B, bf16: 3 of 1,669 test labels changed).")


@dataclass
class TrackConfig:
    tracker: Literal["swanlab", "tensorboard", "none"] = f("swanlab", "Experiment tracker.")
    project: str = f("Qwen-fintune", "Tracker project name.")
    experiment: str = f("Qwen1.5-7B-Chat", "Tracker experiment (run) name.")
    mode: Literal["auto", "cloud", "offline", "local", "disabled"] = f(
        "auto", "SwanLab mode; 'auto' is cloud with an API key, else offline (no prompt, no network)."
    )


@dataclass
class CalibrationConfig:
    method: Literal["temperature", "vector", "none"] = f(
        "temperature", "Fitted on the dev set after training: one temperature (Guo et al. 2017), or a temperature "
        "and a per-label bias (vector scaling) for labels with min_rows_per_label dev rows, or none.")
    min_rows_per_label: int = f(50, "Dev rows a label needs for its own bias (vector scaling).", check=at_least(1))
    target_precision: Optional[float] = f(
        None, "Pick the abstention threshold: the lowest confidence at which the answered dev rows reach this "
        "precision (e.g. 0.995); rows below it are marked abstain.", check=within(0, 1))


@dataclass
class MultiLabelConfig:
    min_positives: int = f(5, "Dev rows a label must be true in to get its own threshold; rarer labels use the "
                              "global one (chosen on all labels' dev rows together).", check=at_least(1))
    at_least_one: bool = f(True, "Always predict a row's most probable candidate, even below its threshold.")
    default_threshold: float = f(0.2, "Probability threshold of every label for a run without dev-chosen "
                                      "thresholds (no dev set).", check=within(0, 1))


@dataclass
class PredictConfig:
    top_k: int = f(0, "Also list the k most probable candidates of each row (0: off).", check=at_least(0))
    abstain_below: Optional[float] = f(None, "Abstain when the best probability is below this (default: the "
                                             "run's calibrated threshold, if any).", check=within(0, 1))


@dataclass
class BaselineConfig:
    svm_c: float = f(2.0, "Inverse regularisation strength of the TF-IDF baseline's linear SVM.", check=above(0))
    text: str = f("same", "What of each text the baseline reads: 'same' (what the LLM reads: the text cut as the "
                          "run's prompt fitting cuts it; needs a run), 'whole', or a number of characters (the lead).")


@dataclass
class ExportConfig:
    device: str = f("cpu", "Where LoRA is merged into the base for 'llmcls export' (cpu or cuda).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = f(
        "auto", "Weights dtype of the export; 'auto' keeps the dtype the weights are stored in.")


@dataclass
class ServeConfig:
    host: str = f("127.0.0.1", "Address to bind (default: this machine only).")
    port: int = f(8000, "Port to listen on.", check=within(0, 65535))
    device: Optional[str] = f(None, "cuda or cpu (default: cuda if available).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = f(
        "auto", "Weights dtype; 'auto' is bfloat16 on a GPU and float32 on a CPU.")
    compile: bool = f(False, "torch.compile the decoder layers (GPU: faster passes; the first requests pay ~30 s).")
    max_batch: int = f(32, "Most rows per forward pass (1 turns batching off).", check=at_least(1))
    max_wait_ms: float = f(5.0, "How long a lone row waits for others to share its pass.", check=at_least(0))
    max_body_bytes: int = f(1 << 20, "Larger request bodies get 413.", check=at_least(1))
    max_texts: int = f(64, "Most texts in one request.", check=at_least(1))
    max_text_chars: int = f(100_000, "Longest text accepted (422 beyond; also capped so any accepted text fits "
                                     "in max_body_bytes).", check=at_least(1))
    max_queue_rows: int = f(4096, "Rows waiting beyond this get 503.", check=at_least(1))
    body_timeout_s: float = f(30.0, "Seconds a request body may take to arrive (408 beyond; 0: no limit): a client "
                                    "that sends less than its Content-Length does not hold a connection forever.",
                              check=at_least(0))
    prepare_threads: Optional[int] = f(None, "Threads that tokenise requests (default: min(4, CPU cores)).",
        check=at_least(1))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Model to fine-tune."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Dataset files and encoding."})
    prompt: PromptConfig = field(default_factory=PromptConfig, metadata={"doc": "Prompt text."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "Adapter settings."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Trainer settings."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Evaluation settings."})
    track: TrackConfig = field(default_factory=TrackConfig, metadata={"doc": "Experiment tracking."})
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig,
                                           metadata={"doc": "Calibrated probabilities and abstention."})
    multilabel: MultiLabelConfig = field(default_factory=MultiLabelConfig,
                                         metadata={"doc": "Multi-label runs: per-label thresholds."})
    predict: PredictConfig = field(default_factory=PredictConfig, metadata={"doc": "llmcls predict and serve."})
    baseline: BaselineConfig = field(default_factory=BaselineConfig, metadata={"doc": "TF-IDF baseline."})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"doc": "llmcls export."})
    serve: ServeConfig = field(default_factory=ServeConfig, metadata={"doc": "llmcls serve."})


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from the command line are parsed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML reads a bare true/false as a bool
            value = str(value).lower()
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # a programming error in this module


def _unknown(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(known)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [fl.name for fl in dataclasses.fields(cls)]
    checks = {fl.name: fl.metadata.get("check") for fl in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise _unknown(key, str(name), names)
        kwargs[name] = _coerce(value, hints[name], key)
        check = checks.get(name)
        problem = check(kwargs[name]) if check else None
        if problem:
            raise ConfigError(f"{key}={kwargs[name]!r}: {problem}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def config_from_dict(tree: dict, overrides: dict[str, Any] | None = None, source: str | None = None) -> Config:
    """A config from a nested dict (e.g. an export's ``llmcls.json``), with ``{"train.lr": "2e-4"}`` overrides."""
    tree = copy.deepcopy(tree)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    try:
        return _build(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML file (or the defaults) and apply ``{"train.lr": "2e-4"}``-style overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory, not a config file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        except (UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not a UTF-8 YAML file ({type(e).__name__})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(tree, overrides, str(path) if path else None)


def save_config(cfg: Config, path: str | Path) -> None:
    from llmcls.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield ``(dotted_key, type, default, doc)`` for every leaf field: the CLI builds its options from this."""
    hints = _hints(cls)
    for fl in dataclasses.fields(cls):
        key = f"{prefix}.{fl.name}" if prefix else fl.name
        tp = hints[fl.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, key)
        else:
            default = fl.default if fl.default is not dataclasses.MISSING else fl.default_factory()
            rule = getattr(fl.metadata.get("check"), "rule", None)
            doc = fl.metadata.get("doc", "")
            yield key, tp, default, f"{doc} Allowed: {rule}." if rule else doc


# ------------------------------------------------------------------------------------- cross-field checks
# Every rule that relates two settings, or a setting and the way the process was launched, lives here, so that
# each stops the run before anything is loaded and reads as one list.
def check_model(model: ModelConfig, world_size: int = 1) -> None:
    """Where the weights go: settings that contradict each other or the launch."""
    if model.device_map and model.offload_embeddings:
        raise ConfigError("model.device_map and model.offload_embeddings both decide where weights go; choose one")
    if model.device_map and model.quantize == "fp8":
        raise ConfigError("model.quantize=fp8 with model.device_map: the FP8 path runs on one GPU per process; "
                          "leave device_map unset (use train.fsdp off and DDP to use several GPUs)")
    if model.quantize == "fp8" and model.fp8_weights == "stored" and model.fp8_scaling != "rowwise":
        raise ConfigError(f"model.fp8_weights=stored keeps the weights in e4m3 with one scale per output channel "
                          f"(rowwise); model.fp8_scaling={model.fp8_scaling} needs model.fp8_weights cast")
    if model.quantize != "fp8" and model.fp8_fast_accum != "auto":
        raise ConfigError(f"model.fp8_fast_accum={model.fp8_fast_accum} changes FP8 matrix products; "
                          f"model.quantize={model.quantize} computes none (set model.quantize fp8, or leave "
                          "fp8_fast_accum auto)")
    if model.device_map and world_size > 1:
        raise ConfigError(
            f"model.device_map={model.device_map} spreads one model over the GPUs of a single process; it "
            f"cannot run under a launcher with {world_size} processes. Run without torchrun/accelerate, or "
            "(training) use train.fsdp to shard the model over the processes")


def check_launch(cfg: Config, world_size: int = 1, cuda: bool = False) -> None:
    """Refuse training settings that cannot work with the way ``train`` was launched, before anything is loaded
    (accelerate would otherwise quietly run DDP where FSDP was asked for on a CPU)."""
    check_model(cfg.model, world_size)
    if cfg.model.quantize == "fp8" and cfg.lora.method == "full":
        # FP8 here is a compute path for a *frozen* base under adapters; full training in FP8 would also need
        # bf16 master weights and gradient handling this tool has not validated
        raise ConfigError("model.quantize=fp8 computes a frozen base in FP8 under LoRA adapters; lora.method=full "
                          "trains every weight: use lora.method lora, or model.quantize none for full training")
    if cfg.model.offload_embeddings and world_size > 1:
        # DDP and FSDP want every weight of a process on its GPU (DDP refuses a module spread over devices).
        raise ConfigError("model.offload_embeddings is a single-GPU memory saver; it cannot run under a launcher "
                          f"with {world_size} processes (use train.fsdp to save memory there)")
    if cfg.train.fsdp != "off":
        if cfg.model.device_map:
            raise ConfigError("train.fsdp and model.device_map are two ways to split a model; choose one")
        if cfg.model.quantize == "nf4":
            raise ConfigError(f"model.quantize={cfg.model.quantize} with train.fsdp: FSDP cannot shard "
                              "bitsandbytes' packed 4-bit weights here; use DDP (train.fsdp: off) or no quantize")
        if cfg.model.quantize == "fp8":  # torchao's FSDP support is FSDP2's; the Trainer's FSDP is not tested
            raise ConfigError("model.quantize=fp8 with train.fsdp: not supported (untested with the Trainer's "
                              "FSDP); use DDP (train.fsdp: off) or model.quantize none")
        if world_size < 2:
            raise ConfigError(f"train.fsdp={cfg.train.fsdp} shards the model over several processes: launch with "
                              "'torchrun --nproc_per_node N -m llmcls.cli train ...' (or accelerate launch)")
        if not cuda:
            raise ConfigError("train.fsdp needs CUDA GPUs (on CPUs accelerate would silently fall back to DDP)")
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise ConfigError("the launcher asks for FSDP (an accelerate FSDP config) but train.fsdp is 'off'; set "
                          "train.fsdp to full_shard or shard_grad_op and launch without the FSDP config")
    if cfg.train.cuda_graphs:
        t = cfg.train
        refused = [  # (what refuses it, why): the first that holds is named
            (not t.compile, "needs train.compile: true (the graphs are recorded from the compiled layers)"),
            (not t.packing, "needs train.packing: true (padded batches change shape with every step)"),
            (not cuda, "needs a CUDA GPU"),
            (world_size > 1, f"runs in one process ({world_size} launched): not measured under DDP or FSDP yet"),
            (t.grad_accum > 1, f"needs train.grad_accum: 1 (got {t.grad_accum}): a replay overwrites the gradients of "
                               "the micro-batch before; raise train.batch_size instead"),
            (t.gradient_checkpointing, "with train.gradient_checkpointing: recomputation inside recorded graphs is "
                                       "not measured; turn one off"),
            (cfg.model.quantize != "none", f"with model.quantize={cfg.model.quantize}: not measured yet"),
            (cfg.model.offload_embeddings, "with model.offload_embeddings: the input table in host memory would put "
                                           "host work inside the recorded graph")]
        why = next((reason for holds, reason in refused if holds), None)
        if why:
            raise ConfigError(f"train.cuda_graphs {why}")
    if cfg.train.batch_tokens is not None and world_size > 1:
        # accelerate deals a batch sampler's batches out round robin: ranks would step on batches of different
        # token counts, and repeat rows to even out the count
        raise ConfigError(f"train.batch_tokens with {world_size} processes: token-budget batches are not split "
                          "across ranks yet; use train.batch_size under a launcher")


def check_training(cfg: Config) -> None:
    """Selection and early stopping need a dev set to select on."""
    has_dev = bool(cfg.data.dev_file) or cfg.data.dev_fraction > 0
    if cfg.train.batch_tokens is not None and not cfg.train.packing:
        raise ConfigError(f"train.batch_tokens={cfg.train.batch_tokens} needs train.packing: true (padded batches "
                          "of varying row counts waste compute on padding)")
    if cfg.train.epochs <= 0 and cfg.train.max_steps <= 0:  # would save an untrained adapter as if it were trained
        raise ConfigError(f"train.epochs={cfg.train.epochs} and train.max_steps={cfg.train.max_steps}: nothing to "
                          "train; set epochs above 0 or max_steps to 1 or more")
    if not 0 <= cfg.data.dev_fraction < 1:
        raise ConfigError(f"data.dev_fraction={cfg.data.dev_fraction}: a share of the training rows, in [0, 1)")
    if cfg.data.dev_file and cfg.data.dev_fraction > 0:
        raise ConfigError("data.dev_file and data.dev_fraction both name a dev set; choose one")
    if cfg.train.select_best != "last" and not has_dev:
        raise ConfigError(f"train.select_best={cfg.train.select_best} selects on a dev set: set data.dev_file or "
                          "data.dev_fraction")
    if cfg.train.early_stopping_patience > 0 and cfg.train.select_best == "last":
        raise ConfigError("train.early_stopping_patience counts evaluations without improvement of "
                          "train.select_best: set it to macro_f1, accuracy or nll")
    during = cfg.eval.every_steps > 0 or cfg.eval.every_epoch
    if cfg.train.select_best != "last" and not during:
        raise ConfigError(f"train.select_best={cfg.train.select_best} picks among dev evaluations during training: "
                          "set eval.every_steps or eval.every_epoch (otherwise only the last step is scored)")
    if cfg.train.early_stopping_patience > 0 and not during:
        raise ConfigError("train.early_stopping_patience needs dev evaluations during training: set "
                          "eval.every_steps or eval.every_epoch")
    if cfg.eval.hybrid and not has_dev:
        raise ConfigError("eval.hybrid fits the TF-IDF model's weight on a dev set: set data.dev_file or "
                          "data.dev_fraction")
    if cfg.eval.hybrid and cfg.calibration.method == "none":
        raise ConfigError("eval.hybrid's weight is fitted with the calibration: set calibration.method to "
                          "temperature or vector")
    if cfg.eval.shortlist < 0:
        raise ConfigError(f"eval.shortlist={cfg.eval.shortlist}: 0 (all candidates) or more")
    if (cfg.eval.hybrid or cfg.eval.shortlist) and cfg.eval.method != "score":
        raise ConfigError("eval.hybrid and eval.shortlist work on candidate scores: set eval.method=score")
    if not 0.0 <= cfg.train.select_confidence < 1.0:
        raise ConfigError(f"train.select_confidence={cfg.train.select_confidence}: a share in [0, 1)")
    for key, value in (("eval.every_steps", cfg.eval.every_steps),
                       ("train.early_stopping_patience", cfg.train.early_stopping_patience)):
        if value < 0:
            raise ConfigError(f"{key}={value}: 0 or more")
    if cfg.data.dev_file and not Path(cfg.data.dev_file).is_file():
        raise ConfigError(f"data.dev_file: {cfg.data.dev_file} not found")
    if not (cfg.baseline.text in ("same", "whole") or cfg.baseline.text.isdigit()):
        raise ConfigError(f"baseline.text={cfg.baseline.text!r}: 'same', 'whole' or a number of characters")
    cw = cfg.train.class_weights
    if cw not in ("none", "balanced") and not Path(cw).is_file():
        raise ConfigError(f"train.class_weights={cw!r}: 'none', 'balanced', or a JSON file of label weights "
                          "(file not found)")
    check_calibration(cfg)
    check_task(cfg)


# Settings that have no meaning for a classification head: refused rather than silently ignored.
_NOT_WITH_SEQ_CLS = {
    "eval.method": ("generate", "a classification head has no text to generate; use eval.method=score"),
    "data.truncation": ("right", "the tutorial's right cut exists to drop answer tokens, and a head has none; "
                                 "use data.truncation=text"),
    "train.packing": (True, "the head pools each row's last token, which packed rows do not keep apart"),
    "model.quantize": ("nf4", "not supported with the classification head yet"),
    "model.offload_embeddings": (True, "not supported with the classification head yet"),
    "train.fsdp": (("full_shard", "shard_grad_op"), "not supported with the classification head yet"),
}


def check_scoring(cfg: Config) -> None:
    """eval.merge_lora: an adapter to merge, into weights that can take it."""
    if cfg.eval.merge_lora and cfg.model.quantize != "none":
        # nf4 would be dequantised, merged and quantised again (lossy); FP8 bases are torchao modules
        raise ConfigError(f"eval.merge_lora with model.quantize={cfg.model.quantize}: merging into a quantised base "
                          "changes it; score with the adapter attached (eval.merge_lora false), or export the run "
                          "(which merges into the unquantised base)")
    if cfg.eval.merge_lora and cfg.lora.method == "full":
        raise ConfigError("eval.merge_lora with lora.method=full: a full fine-tune has no adapter to merge")


def check_task(cfg: Config) -> None:
    """lora.task=seq_cls: the settings that do not apply to a classification head."""
    if cfg.lora.task != "seq_cls":
        return
    for key, (bad, why) in _NOT_WITH_SEQ_CLS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value == bad or (isinstance(bad, tuple) and value in bad):
            raise ConfigError(f"{key}={value} with lora.task=seq_cls: {why}")


def check_calibration(cfg: Config) -> None:
    tp = cfg.calibration.target_precision
    if tp is not None and not 0 < tp <= 1:
        raise ConfigError(f"calibration.target_precision={tp}: a precision in (0, 1]")
    if cfg.calibration.min_rows_per_label < 1:
        raise ConfigError(f"calibration.min_rows_per_label={cfg.calibration.min_rows_per_label}: 1 or more")
    if cfg.multilabel.min_positives < 1:
        raise ConfigError(f"multilabel.min_positives={cfg.multilabel.min_positives}: 1 or more")
    if not 0 <= cfg.multilabel.default_threshold <= 1:
        raise ConfigError(f"multilabel.default_threshold={cfg.multilabel.default_threshold}: a probability in [0, 1]")
