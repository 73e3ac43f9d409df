"""Doors to the field's standard tools: Hugging Face ``transformers`` (:mod:`.hf_export`, :mod:`.hf_tokenizer`) and
lm-evaluation-harness (:mod:`.lm_eval`). Each imports its tool only when used, so ``import neurallm`` does not."""
