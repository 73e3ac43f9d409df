"""Evaluation-time methods that improve a trained model's perplexity without retraining it: the continuous cache
pointer (:mod:`.cache_pointer`) and dynamic evaluation (:mod:`.dynamic_eval`)."""
