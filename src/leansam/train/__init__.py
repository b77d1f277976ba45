"""Training (SPEC section 5): ``distill`` (stage 1), ``finetune`` (stage 2) and ``warmup`` (the
decoder warm start) on the loop they share (``loop``); ``config``, ``losses`` and ``prompts`` are
their building blocks."""
