"""llmcls: a chat LLM (the Qwen family first) fine-tuned with LoRA into an accurate text classifier.

Where each stage lives (the CLI, ``cli.py``, is a thin layer over these):

    config.py                  typed settings of every command, all cross-field checks
    rundir.py                  the run directory and export folder: their paths, loading a finished run
    data.py                    1  raw jsonl -> validated rows
    encode.py, collate.py      2  prompts, answer-keeping truncation; training batches and loss
    windows.py                 2  long texts read whole in windows; their scores combined (5)
    model/                     3  load.py (weights, LoRA, placement), attention.py, tiny.py
    trainer.py                 4  HF Trainer arguments, callbacks
    layouts.py, infer.py       5  scoring layouts; classify / generate
    metrics.py                 5  accuracy, macro-F1, confusion matrix; multi-label figures
    multilabel.py              5  multi-label runs: per-label thresholds chosen on the dev set, predicted sets
    reporting/                 6  track.py (SwanLab, TensorBoard), report.py, plots.py
    serving/                   7  classifier.py, batcher.py, app.py
    recipes/                   one file per command: prepare, train, evaluate, predict, export, baseline, pipeline
    dist.py, files.py, env.py  processes, atomic writes, versions
    errors.py                  how a command reports what is wrong; checks of its files before anything loads
"""
